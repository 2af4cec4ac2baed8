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
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrent")
PUBLIC_TENANT = "public"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    """One accepted key (never the key itself): its id for limits, its tenant, and per-key limit overrides."""

    id: str  # "key-<16 hex of sha256>", or "public" on an open server
    organization: str | None = None
    rpm: int | None = None  # None: the server's default (--rate-limit-rpm)
    tpm: int | None = None
    max_concurrent: int | None = None

    @property
    def tenant(self) -> str:
        return self.organization or self.id

    @classmethod
    def of(cls, key: str, organization: str | None = None, **limits: int | None) -> ApiKey:
        if not key or any(c.isspace() for c in key):
            raise ValueError("API keys must be non-empty and contain no whitespace")
        if organization is not None:
            if not ORG_NAME.match(organization) or organization == PUBLIC_TENANT or organization.startswith("key-"):
                raise ValueError(f"bad organization {organization!r}: use 1-64 letters, digits, '.', '_' or '-' "
                                 f"(not 'public', not starting with 'key-')")
        for name, value in limits.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return cls("key-" + _digest(key).hex()[:16], organization, **limits)


ANONYMOUS = ApiKey(PUBLIC_TENANT)


class KeyRing:
    """The accepted keys, looked up by the SHA-256 of what the client presents."""

    def __init__(self, entries: Iterable[tuple[str, ApiKey]] = ()) -> None:
        self._by_digest: dict[bytes, ApiKey] = {}
        for key, api_key in entries:
            digest = _digest(key)
            known = self._by_digest.get(digest)
            if known is not None and known != api_key:
                raise ValueError(f"API key {api_key.id} is configured twice with different settings")
            self._by_digest[digest] = api_key

    @classmethod
    def from_settings(cls, api_keys: Iterable[str], keys_file: Path | None) -> KeyRing:
        entries = [(key, ApiKey.of(key)) for key in api_keys]
        if keys_file is not None:
            entries += read_keys_file(keys_file)
        return cls(entries)

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
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise ValueError(f'{path}: keys[{i}] must be an object with a string "key"')
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
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        key, rest = words[0], words[1:]
        organization = rest.pop(0) if rest and "=" not in rest[0] else None
        limits: dict[str, Any] = {}
        try:
            for word in rest:
                name, _, value = word.partition("=")
                if name not in LIMIT_FIELDS or name in limits:
                    raise ValueError(f"unexpected {word!r}; expected KEY [ORG] [rpm=N] [tpm=N] [max_concurrent=N]")
                limits[name] = int(value)
            out.append((key, ApiKey.of(key, organization, **limits)))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from exc
    return out
