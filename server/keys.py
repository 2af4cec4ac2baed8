"""API keys: who may call the server, which organization (tenant) each key belongs to, and its own limits.

Keys come from ``--api-key`` / ``MLX_DROPIN_API_KEYS`` (each its own tenant)
and from ``--api-keys-file``, in either of two formats::

    # one key per line: KEY [ORG] [rpm=N] [tpm=N] [max_concurrent=N]
    sk-alice-1   acme    rpm=600
    sk-alice-2   acme
    sk-bob       globex  tpm=20000 max_concurrent=4
    sk-solo

    {"keys": [{"key": "sk-alice-1", "organization": "acme", "rpm": 600}, ...]}

Keys of one organization share its tenant: files, fine-tuning jobs and
``ft:`` models, stored responses and cached KV. A key without one is a tenant
of its own, named by a hash of the key (``key-<16 hex>``) as before orgs
existed, so what it stored stays reachable. Limits are per key either way.

Logs never show that bare hash (a SHA-256 prefix lets anyone test guessed
keys offline): they show ``ApiKey.log_id``, an HMAC-SHA256 of the key under a
random secret kept in the data dir (``key-id-secret``, mode 0600, made once),
so a key's log id is stable across restarts on one data dir and differs
between data dirs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ORG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrent")
PUBLIC_TENANT = "public"
SECRET_FILE = "key-id-secret"
_USAGE = "expected KEY [ORG] [rpm=N] [tpm=N] [max_concurrent=N]"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def keyed_id(secret: bytes, key: str) -> str:
    """The id logs show for a key: ``key-`` + 16 hex digits of HMAC-SHA256(secret, key)."""
    return "key-" + hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:16]


def key_id_secret(data_dir: Path) -> bytes:
    """The data dir's secret for log ids, made on first use; ValueError when it cannot be read or made."""
    path = Path(data_dir) / SECRET_FILE
    try:
        if not path.exists():
            _create_secret(path)
        secret = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read or create the key-id secret {path}: {exc}") from exc
    if len(secret) < 16:
        raise ValueError(f"the key-id secret {path} is too short; delete it to make a new one")
    return secret


def _create_secret(path: Path) -> None:
    """Write 32 random bytes (hex) with mode 0600 to a temporary file, then link it in: the file appears whole,
    and a secret another process made first is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@dataclass(frozen=True)
class ApiKey:
    """One accepted key (never the key itself): its id for limits, its tenant, and per-key limit overrides."""

    id: str  # "key-<16 hex of sha256>", or "public" on an open server: limits' bucket, never logged
    organization: str | None = None
    rpm: int | None = None  # None: the server's default (--rate-limit-rpm)
    tpm: int | None = None
    max_concurrent: int | None = None
    log_id: str = ""  # "key-<16 hex of HMAC-SHA256>" (set by KeyRing), or "public": what logs show

    @property
    def tenant(self) -> str:
        """The storage scope: the organization, else the bare-hash id (unchanged, so stored data stays reachable)."""
        return self.organization or self.id

    @property
    def log_tenant(self) -> str:
        """The tenant as logs show it: the organization, else the log id (never the bare hash)."""
        return self.organization or self.log_id

    def scrub(self, text: str) -> str:
        """`text` for a log: a fine-tuned model id or a path naming this key's bare-hash tenant names its log id."""
        return text.replace(self.id, self.log_id) if self.organization is None and self.log_id else text

    @classmethod
    def of(
        cls,
        key: str,
        organization: str | None = None,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrent: int | None = None,
    ) -> ApiKey:
        if not key or any(c.isspace() for c in key):
            raise ValueError("API keys must be non-empty and contain no whitespace")
        if organization is not None:
            if not ORG_NAME.match(organization) or organization == PUBLIC_TENANT or organization.startswith("key-"):
                raise ValueError(
                    f"bad organization {organization!r}: use 1-64 letters, digits, '.', '_' or '-' "
                    f"(not 'public', not starting with 'key-')"
                )
        for name, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return cls("key-" + _digest(key).hex()[:16], organization, rpm, tpm, max_concurrent)


ANONYMOUS = ApiKey(PUBLIC_TENANT, log_id=PUBLIC_TENANT)


class KeyRing:
    """The accepted keys, looked up by the SHA-256 of what the client presents, each with its log id set.

    `secret` keys the log ids (`key_id_secret(data_dir)`); without one, a random
    secret of this ring's own makes them stable only while it lives.
    """

    def __init__(self, entries: Iterable[tuple[str, ApiKey]] = (), secret: bytes | None = None) -> None:
        secret = secret if secret is not None else secrets.token_bytes(32)
        self._by_digest: dict[bytes, ApiKey] = {}
        for key, api_key in entries:
            api_key = replace(api_key, log_id=keyed_id(secret, key))
            digest = _digest(key)
            known = self._by_digest.get(digest)
            if known is not None and known != api_key:
                raise ValueError(f"API key {api_key.log_id} is configured twice with different settings")
            self._by_digest[digest] = api_key

    @classmethod
    def from_settings(cls, api_keys: Iterable[str], keys_file: Path | None, secret: bytes | None = None) -> KeyRing:
        entries = [(key, ApiKey.of(key)) for key in api_keys]
        if keys_file is not None:
            entries += read_keys_file(keys_file)
        return cls(entries, secret)

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def lookup(self, presented: str) -> ApiKey | None:
        """The key's entry, or None. A dict lookup by digest reveals nothing about the keys' prefixes."""
        return self._by_digest.get(_digest(presented)) if presented else None


def read_keys_file(path: Path) -> list[tuple[str, ApiKey]]:
    """(key, entry) pairs from a keys file (JSON or the line format); ValueError naming the line when bad."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the API keys file {path}: {exc.strerror or exc}") from exc
    entries = _parse_json(text, path) if text.lstrip()[:1] in ("{", "[") else _parse_lines(text, path)
    if not entries:
        raise ValueError(f"the API keys file {path} holds no keys")
    return entries


def _parse_json(text: str, path: Path) -> list[tuple[str, ApiKey]]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    items = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f'{path}: expected {{"keys": [...]}} or a list of key objects')
    out = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise ValueError(f'{path}: keys[{i}] must be an object with a string "key"')
        if item["key"] in seen:
            raise ValueError(f"{path}: keys[{i}] repeats the key of keys[{seen[item['key']]}]; give each key once")
        seen[item["key"]] = i
        unknown = set(item) - {"key", "organization", *LIMIT_FIELDS}
        if unknown:
            raise ValueError(f"{path}: keys[{i}] has unknown fields {sorted(unknown)}")
        limits: dict[str, Any] = {name: item.get(name) for name in LIMIT_FIELDS}
        try:
            out.append((item["key"], ApiKey.of(item["key"], item.get("organization"), **limits)))
        except ValueError as exc:
            raise ValueError(f"{path}: keys[{i}]: {exc}") from exc
    return out


def _parse_lines(text: str, path: Path) -> list[tuple[str, ApiKey]]:
    out = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        key, rest = words[0], words[1:]
        if key in seen:
            raise ValueError(f"{path}, line {number}: repeats the key of line {seen[key]}; give each key once")
        seen[key] = number
        organization = rest.pop(0) if rest and "=" not in rest[0] else None
        try:
            out.append((key, ApiKey.of(key, organization, **_limits(rest))))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from exc
    return out


def _limits(words: list[str]) -> dict[str, Any]:
    """``name=N`` words as limits; ValueError naming the field for an unknown, repeated or non-integer one."""
    limits: dict[str, Any] = {}
    for word in words:
        name, equals, value = word.partition("=")
        if not equals or name not in LIMIT_FIELDS:
            raise ValueError(f"unexpected {word!r}; {_USAGE}")
        if name in limits:
            raise ValueError(f"{name} is given twice; {_USAGE}")
        try:
            limits[name] = int(value)
        except ValueError:
            raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    return limits
