"""The on-disk model cache: ready MLX directories built atomically and verified by a manifest.

Layout under the cache root (``~/.cache/mlx-dropin`` unless overridden):

    downloads/<name>          raw files fetched from PyPI packages or elsewhere
    models/<key>/             a ready model directory, with MANIFEST_NAME inside
    models/<key>.tmp-<pid>    a directory being built; renamed into place when complete

An entry whose manifest is missing or does not match its files (a killed
conversion, a truncated copy, a flipped byte) is not loaded: it is removed and
built again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST_NAME = ".mlx-dropin-manifest.json"


def default_cache_root() -> Path:
    return Path(os.path.expanduser("~/.cache/mlx-dropin"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _listing(directory: Path) -> dict[str, dict[str, int | str]]:
    files: dict[str, dict[str, int | str]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            rel = path.relative_to(directory).as_posix()
            files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return files


def write_manifest(directory: Path, source: str) -> None:
    """Record every file's size and hash; the entry counts as complete from here on."""
    manifest = {"source": source, "files": _listing(directory)}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def verify_manifest(directory: Path) -> str | None:
    """Return None when the directory matches its manifest, else why it does not."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return "no manifest (incomplete build)"
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest: {exc}"
    if not expected:
        return "manifest lists no files"
    actual = _listing(directory)
    for rel, info in expected.items():
        got = actual.get(rel)
        if got is None:
            return f"missing file {rel}"
        if got != info:
            return f"file {rel} does not match its manifest"
    return None


@dataclass(frozen=True)
class ModelCache:
    """Where models are cached, and how an entry is built once and found again."""

    root: Path

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def entry(self, key: str) -> Path:
        return self.models / key

    def ready(self, key: str) -> Path | None:
        """The entry's directory when it is complete and intact, else None."""
        path = self.entry(key)
        if not path.exists():
            return None
        problem = verify_manifest(path)
        if problem is None:
            return path
        log.warning("cache entry %s is damaged (%s); rebuilding it", path, problem)
        shutil.rmtree(path, ignore_errors=True)
        return None

    def build(self, key: str, source: str, builder: Callable[[Path], None]) -> Path:
        """Return the entry for key, running builder(tmp_dir) first if it is absent or damaged."""
        found = self.ready(key)
        if found is not None:
            return found
        target = self.entry(key)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            builder(tmp)
            write_manifest(tmp, source)
            if target.exists():  # a concurrent builder won the race, or a damaged leftover
                shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
