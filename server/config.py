"""One settings object, from command-line flags and MLX_DROPIN_* environment variables.

Nothing else in the package reads the environment. Precedence: flag, then
environment variable, then default. Every flag has an environment twin named
``MLX_DROPIN_`` + the flag in upper case with dashes as underscores
(``--max-body-mb`` -> ``MLX_DROPIN_MAX_BODY_MB``); list flags take a
comma-separated value there (``MLX_DROPIN_API_KEYS=k1,k2``). The flags themselves (names, help,
choices) are declared in server/serve_flags.py.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from server.engine import EngineConfig, SchedulerConfig
from server.models.cache import default_cache_root

ENV_PREFIX = "MLX_DROPIN_"


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: its public id and where it comes from (hub repo, local dir or GGUF file)."""

    id: str
    source: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``ID=SOURCE`` or just ``SOURCE`` (the id is then the repo name or file stem)."""
        if "=" in text:
            model_id, source = text.split("=", 1)
            if not model_id or not source:
                raise ValueError(f"bad --model value {text!r}: expected ID=SOURCE or SOURCE")
            return cls(model_id, source)
        source = text.rstrip("/")
        if not source:
            raise ValueError("empty --model value")
        path = Path(os.path.expanduser(source))
        if path.suffix == ".gguf":
            return cls(path.stem, source)
        if path.exists():
            return cls(path.name, source)
        return cls(source, source)  # a hub repo id keeps its org/name form


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    models: tuple[ModelSpec, ...] = ()
    default_models: bool = True
    api_keys: tuple[str, ...] = ()
    cache_dir: Path = field(default_factory=default_cache_root)
    data_dir: Path = field(default_factory=lambda: Path(os.path.expanduser("~/.local/share/mlx-dropin")))
    database_url: str | None = None  # postgresql://... shared by replicas; None: SQLite in the data dir
    fine_tuning_lease_s: float = 30.0  # a replica's claim on a running job lapses this long after it stops renewing
    dtype: str = "auto"
    max_body_mb: float = 32.0
    max_file_mb: float = 512.0
    max_storage_gb_per_tenant: float | None = None  # bytes of /v1/files a tenant may hold; None = no quota
    log_level: str = "info"
    offline: bool = False
    kv_cache_gb: float = 2.0
    mlx_cache_gb: float | None = None  # MLX's buffer cache limit; None: derived on a GPU (engine/memory_limits.py)
    block_size: int = 16
    max_num_seqs: int = 64
    prefill_chunk: int | None = None  # None: 512 on a CPU, 2048 on a GPU
    # the same while streamed sequences decode; None: 64 on a CPU, 2048 on a GPU
    decoding_prefill_chunk: int | None = None
    prefill_buckets: str = "auto"  # pad prefill shapes to buckets run at start-up: auto (on CUDA), on or off
    exact_cpu_layers: bool = False  # keep mlx-lm's attention and MLP on a CPU (see server/models/cpu_layers.py)
    # where a base chat model's engine runs: "process" (its own; the command's default) or "thread" (this process)
    engine: str = "thread"
    distributed_backend: str = "any"  # under mlx.launch: the mx.distributed backend the ranks join
    split: str = "auto"  # under mlx.launch: how the model is split over the ranks (tensor, pipeline, auto)
    rank_timeout: float = 120.0  # seconds one step of a split model may wait for the other ranks
    queue_timeout: float = 30.0
    sse_keepalive: float = 5.0
    max_training_jobs: int = 1
    max_loaded_adapters: int = 4
    adapter_kv_cache_gb: float = 0.5
    api_keys_file: Path | None = None  # keys with organizations and per-key limits (server.keys)
    rate_limit_rpm: int | None = None  # requests per window per key; None = off
    rate_limit_tpm: int | None = None  # tokens per window per key; None = off
    rate_limit_window: float = 60.0  # seconds the rpm/tpm limits are per (no flag: a minute, tests shorten it)
    max_concurrent_per_key: int | None = None  # sequences generating at once per key; None = off
    request_timeout: float | None = None  # seconds for a non-streamed generation before a 504; None = off
    cors_origins: tuple[str, ...] = ()
    shutdown_timeout: float = 10.0  # seconds in-flight requests may run on after SIGTERM before they are cut
    metrics_key: str | None = None  # when set, GET /metrics needs exactly this key; else it is open

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_body_mb <= 0 or self.max_file_mb <= 0:
            raise ValueError("max_body_mb and max_file_mb must be positive")
        if self.max_storage_gb_per_tenant is not None and not self.max_storage_gb_per_tenant > 0:
            raise ValueError(f"max_storage_gb_per_tenant must be positive, got {self.max_storage_gb_per_tenant}")
        if (
            self.kv_cache_gb <= 0
            or self.block_size < 1
            or self.max_num_seqs < 1
            or any(c is not None and c < 1 for c in (self.prefill_chunk, self.decoding_prefill_chunk))
        ):
            raise ValueError("kv_cache_gb, block_size, max_num_seqs and the prefill chunks must be positive")
        if self.mlx_cache_gb is not None and self.mlx_cache_gb < 0:
            raise ValueError(f"mlx_cache_gb must be >= 0, got {self.mlx_cache_gb}")
        if self.queue_timeout < 0 or self.sse_keepalive <= 0:
            raise ValueError("queue_timeout must be >= 0 and sse_keepalive > 0")
        if self.max_training_jobs < 1 or self.max_loaded_adapters < 1 or self.adapter_kv_cache_gb <= 0:
            raise ValueError("max_training_jobs, max_loaded_adapters and adapter_kv_cache_gb must be positive")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.distributed_backend not in DISTRIBUTED_BACKENDS:
            raise ValueError(
                f"distributed_backend must be one of {', '.join(DISTRIBUTED_BACKENDS)}, got {self.distributed_backend!r}"
            )
        if self.prefill_buckets not in PREFILL_BUCKETS:
            raise ValueError(
                f"prefill_buckets must be one of {', '.join(PREFILL_BUCKETS)}, got {self.prefill_buckets!r}"
            )
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not self.rank_timeout > 0:
            raise ValueError(f"rank_timeout must be positive, got {self.rank_timeout}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        for name in ("rate_limit_rpm", "rate_limit_tpm", "max_concurrent_per_key"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 when set, got {value}")
        if self.rate_limit_window <= 0 or (self.request_timeout is not None and self.request_timeout <= 0):
            raise ValueError("rate_limit_window and request_timeout must be positive")
        if not self.fine_tuning_lease_s >= 2:
            raise ValueError(f"fine_tuning_lease_s must be at least 2 seconds, got {self.fine_tuning_lease_s}")
        if self.database_url is not None and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("database_url must be a PostgreSQL URL (postgresql://user@host:port/dbname)")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.metrics_key is not None and (not self.metrics_key or any(c.isspace() for c in self.metrics_key)):
            raise ValueError("the metrics key must be non-empty and contain no whitespace")
        ids = [spec.id for spec in self.models]
        if len(ids) != len(set(ids)):
            raise ValueError(f"model ids must be unique, got {ids}")
        if not self.models and not self.default_models:
            raise ValueError("no models to serve: pass --model or drop --no-default-models")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def max_storage_bytes_per_tenant(self) -> int | None:
        gb = self.max_storage_gb_per_tenant
        return None if gb is None else int(gb * 1024**3)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys) or self.api_keys_file is not None

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            block_size=self.block_size,
            kv_cache_gb=self.kv_cache_gb,
            rank_timeout_s=self.rank_timeout,
            prefill_buckets={"auto": None, "on": True, "off": False}[self.prefill_buckets],
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                prefill_chunk=self.prefill_chunk,
                decoding_prefill_chunk=self.decoding_prefill_chunk,
                queue_timeout=self.queue_timeout,
            ),
        )

    def adapter_engine_config(self) -> EngineConfig:
        """A fine-tuned chat model's engine: the same scheduling with its own, smaller KV pool."""
        return replace(self.engine_config(), kv_cache_gb=self.adapter_kv_cache_gb)


DTYPES = ("auto", "float32", "float16", "bfloat16", "keep")
ENGINES = ("process", "thread")
PREFILL_BUCKETS = ("auto", "on", "off")  # --prefill-buckets (server/engine/prefill_buckets.py)
SPLITS = ("auto", "tensor", "pipeline")  # --split (server/engine/world.py)
DISTRIBUTED_BACKENDS = ("any", "ring", "jaccl", "nccl", "mpi")  # mx.distributed's (server/engine/world.py)
_DEFAULTS = Settings()


def _optional_int(value: int | str | None) -> int | None:
    return None if value is None else int(value)


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(ENV_PREFIX + name)
    return value if value not in (None, "") else None


def _env_list(environ: Mapping[str, str], name: str) -> list[str]:
    value = _env(environ, name)
    return [item.strip() for item in value.split(",") if item.strip()] if value else []


def _env_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = _env(environ, name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_PREFIX}{name} must be true or false, got {value!r}")


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ

    # argparse's values and Settings' defaults are untyped (Any) here; each caller converts what it picks
    def pick(name: str, flag_value: Any, convert: Callable[[str], Any] = str) -> Any:
        if flag_value is not None:
            return flag_value
        raw = _env(env, name.upper())
        if raw is not None:
            try:
                return convert(raw)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: {exc}") from exc
        return getattr(_DEFAULTS, name)

    model_texts = args.model if args.model is not None else _env_list(env, "MODELS")
    api_keys = args.api_key if args.api_key is not None else _env_list(env, "API_KEYS")
    no_defaults = (
        args.no_default_models if args.no_default_models is not None else _env_bool(env, "NO_DEFAULT_MODELS", False)
    )
    offline = args.offline if args.offline is not None else _env_bool(env, "OFFLINE", False)
    exact_cpu_layers = (
        args.exact_cpu_layers if args.exact_cpu_layers is not None else _env_bool(env, "EXACT_CPU_LAYERS", False)
    )
    cors = args.cors_origin if args.cors_origin is not None else _env_list(env, "CORS_ORIGINS")
    keys_file = pick("api_keys_file", args.api_keys_file)

    def optional(name: str, convert: Callable[[Any], Any]) -> Any:
        value = pick(name, getattr(args, name), convert)
        return None if value is None else convert(value)

    cache_dir = pick("cache_dir", args.cache_dir)
    data_dir = pick("data_dir", args.data_dir)
    return Settings(
        host=str(pick("host", args.host)),
        port=int(pick("port", args.port, int)),
        models=tuple(ModelSpec.parse(text) for text in model_texts),
        default_models=not no_defaults,
        api_keys=tuple(api_keys),
        cache_dir=Path(os.path.expanduser(str(cache_dir))),
        data_dir=Path(os.path.expanduser(str(data_dir))),
        database_url=optional("database_url", str) or None,
        fine_tuning_lease_s=float(pick("fine_tuning_lease_s", args.fine_tuning_lease_seconds, float)),
        dtype=str(pick("dtype", args.dtype)),
        max_body_mb=float(pick("max_body_mb", args.max_body_mb, float)),
        max_file_mb=float(pick("max_file_mb", args.max_file_mb, float)),
        max_storage_gb_per_tenant=optional("max_storage_gb_per_tenant", float),
        log_level=str(pick("log_level", args.log_level)),
        offline=offline,
        kv_cache_gb=float(pick("kv_cache_gb", args.kv_cache_gb, float)),
        mlx_cache_gb=optional("mlx_cache_gb", float),
        block_size=int(pick("block_size", args.block_size, int)),
        max_num_seqs=int(pick("max_num_seqs", args.max_num_seqs, int)),
        prefill_chunk=_optional_int(pick("prefill_chunk", args.prefill_chunk, int)),
        decoding_prefill_chunk=_optional_int(pick("decoding_prefill_chunk", args.decoding_prefill_chunk, int)),
        prefill_buckets=str(pick("prefill_buckets", args.prefill_buckets)),
        exact_cpu_layers=exact_cpu_layers,
        engine=str(args.engine or _env(env, "ENGINE") or "process"),
        distributed_backend=str(pick("distributed_backend", args.distributed_backend)),
        split=str(pick("split", args.split)),
        rank_timeout=float(pick("rank_timeout", args.rank_timeout, float)),
        queue_timeout=float(pick("queue_timeout", args.queue_timeout, float)),
        sse_keepalive=float(pick("sse_keepalive", args.sse_keepalive, float)),
        max_training_jobs=int(pick("max_training_jobs", args.max_training_jobs, int)),
        max_loaded_adapters=int(pick("max_loaded_adapters", args.max_loaded_adapters, int)),
        adapter_kv_cache_gb=float(pick("adapter_kv_cache_gb", args.adapter_kv_cache_gb, float)),
        api_keys_file=Path(os.path.expanduser(str(keys_file))) if keys_file is not None else None,
        rate_limit_rpm=optional("rate_limit_rpm", int),
        rate_limit_tpm=optional("rate_limit_tpm", int),
        max_concurrent_per_key=optional("max_concurrent_per_key", int),
        request_timeout=optional("request_timeout", float),
        cors_origins=tuple(cors),
        shutdown_timeout=float(pick("shutdown_timeout", args.shutdown_timeout, float)),
        metrics_key=optional("metrics_key", str),
    )


def resolve_cache_dir(flag_value: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """The cache directory for commands other than `serve`: flag, then MLX_DROPIN_CACHE_DIR, then default."""
    value = flag_value or _env(os.environ if environ is None else environ, "CACHE_DIR")
    return Path(os.path.expanduser(value)) if value else default_cache_root()


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings for `serve` from argv (without the subcommand) and the environment."""
    from server.serve_flags import add_serve_arguments  # imported here: that module builds on this one

    parser = argparse.ArgumentParser(prog="mlx-dropin serve")
    add_serve_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)), environ)
