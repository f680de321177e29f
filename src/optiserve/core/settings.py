"""Settings from the environment, with the seed's variable names and defaults.

The seed's four variables keep their bare names (OPTIMIZATION_MAX_TIME_MINUTES, ...); optiserve's
own settings are prefixed OPTISERVE_. Named SQL data sources come from OPTISERVE_DATA_SOURCE_<NAME>
variables; the source `demo` is built in (a seeded, synthetic churn table, see optiserve.demo).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from optiserve.core.errors import ConfigError, UnknownNameError

DATA_SOURCE_PREFIX = "OPTISERVE_DATA_SOURCE_"
DEMO_SOURCE = "demo"


class Settings(BaseSettings):
    """The effective configuration. `optiserve config` prints it."""

    # Only the documented variable names are read: no populate_by_name, or pydantic-settings
    # would also read each field's own name ($HOME into `home`, $DATABASE_URL, $THREADS).
    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    optimization_max_time_minutes: float = Field(
        30, gt=0, validation_alias="OPTIMIZATION_MAX_TIME_MINUTES",
        description="Wall-clock limit of one optimization run; the best result so far is kept.",
    )
    optimization_accuracy_threshold: float = Field(
        0.99, validation_alias="OPTIMIZATION_ACCURACY_THRESHOLD",
        description="Minimum ratio of the optimized metric to the original's (0 < t <= 1).",
    )
    tensorrt_workspace_size_gb: float = Field(
        4, gt=0, validation_alias="TENSORRT_WORKSPACE_SIZE_GB",
        description="TensorRT builder workspace memory.",
    )
    onnx_opset_version: int = Field(
        17, ge=7, le=23, validation_alias="ONNX_OPSET_VERSION",
        description="Opset used when converting models to ONNX.",
    )
    home: Path = Field(
        default_factory=lambda: find_home(), validation_alias="OPTISERVE_HOME",
        description="Folder for the embedded defaults: SQLite registry, artifacts, demo data. "
        "Default: the nearest .optiserve in this folder or a parent (as git finds its "
        "repository), else ./.optiserve.",
    )
    database_url: str | None = Field(
        None, validation_alias="OPTISERVE_DATABASE_URL",
        description="SQLAlchemy URL of the registry database; default SQLite under home.",
    )
    artifact_url: str | None = Field(
        None, validation_alias="OPTISERVE_ARTIFACT_URL",
        description="Where artifacts live: a local folder or an fsspec URL (s3://...).",
    )
    default_data_source: str = Field(
        DEMO_SOURCE, validation_alias="OPTISERVE_DEFAULT_DATA_SOURCE",
        description="Data source used for SQL validation data when the request names none.",
    )
    threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, validation_alias="OPTISERVE_THREADS",
        description="Threads per inference session while benchmarking (intra-op).",
    )
    sql_max_rows: int = Field(
        100_000, ge=1, validation_alias="OPTISERVE_SQL_MAX_ROWS",
        description="Most rows a validation query may return.",
    )
    sql_timeout_s: float = Field(
        60, gt=0, validation_alias="OPTISERVE_SQL_TIMEOUT_S",
        description="Longest a validation query may run.",
    )
    # -- the server (optiserve serve) ---------------------------------------------------
    auth: Literal["on", "off"] = Field(
        "on", validation_alias="OPTISERVE_AUTH",
        description="API keys required on every endpoint but health; 'off' only for local "
        "development (the server warns when it is off on a non-loopback address).",
    )
    data_dir: Path | None = Field(
        None, validation_alias="OPTISERVE_DATA_DIR",
        description="The only folder file datasets may come from over HTTP; default home/data.",
    )
    max_upload_mb: float = Field(
        1024, gt=0, validation_alias="OPTISERVE_MAX_UPLOAD_MB",
        description="Largest request body of the management API (model uploads).",
    )
    max_request_mb: float = Field(
        64, gt=0, validation_alias="OPTISERVE_MAX_REQUEST_MB",
        description="Largest inference request (/v2 REST after decompression, gRPC messages): "
        "64 MB, as Triton's --http-max-input-size (64 MiB). Every request is held in memory "
        "whole, so this bounds what one request can cost.",
    )
    max_json_mb: float = Field(
        8, gt=0, validation_alias="OPTISERVE_MAX_JSON_MB",
        description="Largest JSON part of a /v2 inference request. JSON is parsed holding "
        "Python's lock, so this bounds how long one request can hold up every other "
        "(measured: 15.7 MB of float32 JSON, 49 ms to parse and 18 ms to an array); larger "
        "tensors go as binary data (the binary "
        "tensor extension, or gRPC), which is read without parsing.",
    )
    max_inflate_ratio: float = Field(
        100, ge=1, validation_alias="OPTISERVE_MAX_INFLATE_RATIO",
        description="A gzip/deflate request body that inflates more than this many times its "
        "size (once past 10 MB) is refused as a decompression bomb.",
    )
    min_free_mb: float = Field(
        200, ge=0, validation_alias="OPTISERVE_MIN_FREE_MB",
        description="Uploads are refused (507) and /api/v1/health says 'degraded' when the disk "
        "of OPTISERVE_HOME has less free space than this.",
    )
    body_timeout_s: float = Field(
        30, gt=0, validation_alias="OPTISERVE_BODY_TIMEOUT_S",
        description="A request whose body stops arriving for this long is answered 408 and "
        "its connection closed (a client that sends a byte a minute holds no connection).",
    )
    job_workers: int = Field(
        1, ge=1, le=64, validation_alias="OPTISERVE_JOB_WORKERS",
        description="Optimization jobs run at once. More than one shares the cores, so their "
        "latency numbers disturb each other.",
    )
    job_grace_s: float = Field(
        60, ge=0, validation_alias="OPTISERVE_JOB_GRACE_S",
        description="A job still running this long after OPTIMIZATION_MAX_TIME_MINUTES is "
        "killed and marked timeout.",
    )
    job_stale_s: float = Field(
        60, ge=15, validation_alias="OPTISERVE_JOB_STALE_S",
        description="A running job whose server has not beaten its heartbeat (every 5 s) for "
        "this long is marked failed; at least 15 s.",
    )

    tls_cert: Path | None = Field(
        None, validation_alias="OPTISERVE_TLS_CERT",
        description="PEM certificate (chain) of the server: REST and gRPC speak TLS with it "
        "(`serve --tls-cert`); needs OPTISERVE_TLS_KEY.",
    )
    tls_key: Path | None = Field(
        None, validation_alias="OPTISERVE_TLS_KEY",
        description="PEM private key of OPTISERVE_TLS_CERT.",
    )
    tls_client_ca: Path | None = Field(
        None, validation_alias="OPTISERVE_TLS_CLIENT_CA",
        description="PEM CA bundle: when set, every client must present a certificate it "
        "signed (mutual TLS), on REST and gRPC.",
    )
    insecure: bool = Field(
        False, validation_alias="OPTISERVE_INSECURE",
        description="Allow API keys over plain HTTP on a non-loopback address (behind a proxy "
        "that terminates TLS); without it such a server refuses to start.",
    )
    grpc_port: int = Field(
        8001, ge=0, le=65535, validation_alias="OPTISERVE_GRPC_PORT",
        description="Port of the Open Inference Protocol gRPC service (on the same host as "
        "HTTP); 0 turns it off.",
    )

    @field_validator("optimization_accuracy_threshold")
    @classmethod
    def _threshold_range(cls, v: float) -> float:
        check_threshold(v)
        return v

    @property
    def home_origin(self) -> str:
        """How `home` was chosen: the variable, a parent folder's .optiserve, or the default."""
        if "home" in self.model_fields_set:
            return "OPTISERVE_HOME"
        if self.home.is_absolute():
            return "the nearest .optiserve above this folder"
        return ("this folder's .optiserve; set OPTISERVE_HOME, or run from the folder holding "
                "another, to use that")

    def describe_registry(self) -> str:
        """Which registry a command used, for messages about an empty listing."""
        home = f"{self.home.resolve()} ({self.home_origin})"
        if self.database_url:
            return (f"the registry {_hide_password(self.database_url)} (OPTISERVE_DATABASE_URL; "
                    f"home {home})")
        return f"the registry in {home}"

    @cached_property
    def registry_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'registry.db').resolve()}"

    @cached_property
    def artifacts_location(self) -> str:
        return self.artifact_url or str((self.home / "artifacts").resolve())

    @cached_property
    def data_folder(self) -> Path:
        return (self.data_dir or self.home / "data").resolve()

    def environment(self) -> dict[str, str]:
        """These settings as environment variables, for a child process to load the same."""
        env = {}
        for name, f in Settings.model_fields.items():
            value = getattr(self, name)
            if value is not None:
                env[f.validation_alias] = str(value.resolve() if isinstance(value, Path)
                                              else value)
        return env

    @property
    def builtin_demo_url(self) -> str:
        """The synthetic churn database optiserve creates itself (see data/demo_source.py)."""
        return f"sqlite:///{(self.home / 'demo' / 'demo.db').resolve()}"

    def data_sources(self) -> dict[str, str]:
        """Named SQL data sources: OPTISERVE_DATA_SOURCE_<NAME>=<url>, plus the built-in demo."""
        sources = {DEMO_SOURCE: self.builtin_demo_url}
        for key, value in os.environ.items():
            if key.startswith(DATA_SOURCE_PREFIX) and value:
                sources[key[len(DATA_SOURCE_PREFIX):].lower()] = value
        return sources

    def data_source_url(self, name: str | None) -> tuple[str, str]:
        """(name, url) of a configured data source; unknown names list the known ones."""
        name = (name or self.default_data_source).lower()
        sources = self.data_sources()
        if name not in sources:
            raise UnknownNameError("data source", name, sources)
        return name, sources[name]

    def redacted(self) -> dict[str, object]:
        """Settings for display, with passwords in URLs hidden."""
        out: dict[str, object] = {
            "OPTIMIZATION_MAX_TIME_MINUTES": self.optimization_max_time_minutes,
            "OPTIMIZATION_ACCURACY_THRESHOLD": self.optimization_accuracy_threshold,
            "TENSORRT_WORKSPACE_SIZE_GB": self.tensorrt_workspace_size_gb,
            "ONNX_OPSET_VERSION": self.onnx_opset_version,
            "OPTISERVE_HOME": str(self.home.resolve()),
            "OPTISERVE_DATABASE_URL": _hide_password(self.registry_url),
            "OPTISERVE_ARTIFACT_URL": _hide_password(self.artifacts_location),
            "OPTISERVE_DEFAULT_DATA_SOURCE": self.default_data_source,
            "OPTISERVE_THREADS": self.threads,
            "OPTISERVE_SQL_MAX_ROWS": self.sql_max_rows,
            "OPTISERVE_SQL_TIMEOUT_S": self.sql_timeout_s,
            "OPTISERVE_AUTH": self.auth,
            "OPTISERVE_DATA_DIR": str(self.data_folder),
            "OPTISERVE_MAX_UPLOAD_MB": self.max_upload_mb,
            "OPTISERVE_MAX_REQUEST_MB": self.max_request_mb,
            "OPTISERVE_MAX_JSON_MB": self.max_json_mb,
            "OPTISERVE_MAX_INFLATE_RATIO": self.max_inflate_ratio,
            "OPTISERVE_BODY_TIMEOUT_S": self.body_timeout_s,
            "OPTISERVE_MIN_FREE_MB": self.min_free_mb,
            "OPTISERVE_JOB_WORKERS": self.job_workers,
            "OPTISERVE_JOB_GRACE_S": self.job_grace_s,
            "OPTISERVE_JOB_STALE_S": self.job_stale_s,
            "OPTISERVE_GRPC_PORT": self.grpc_port,
            "OPTISERVE_TLS_CERT": str(self.tls_cert or ""),
            "OPTISERVE_TLS_KEY": str(self.tls_key or ""),
            "OPTISERVE_TLS_CLIENT_CA": str(self.tls_client_ca or ""),
            "OPTISERVE_INSECURE": self.insecure,
        }
        for name, url in self.data_sources().items():
            out[f"{DATA_SOURCE_PREFIX}{name.upper()}"] = _hide_password(url)
        return out


HOME_DIR = ".optiserve"


def find_home(start: Path | None = None) -> Path:
    """The home when OPTISERVE_HOME is unset, found the way git finds its repository: a
    `.optiserve` folder in `start` (default: the current folder) or the nearest parent that
    has one (as an absolute path); when there is none, `./.optiserve` (created on first use)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / HOME_DIR).is_dir():
            return Path(HOME_DIR) if start is None and folder == here else folder / HOME_DIR
    return Path(HOME_DIR) if start is None else here / HOME_DIR


def check_threshold(value: float) -> float:
    if not (0 < value <= 1):
        raise ConfigError(
            f"Accuracy threshold {value} is outside (0, 1].",
            hint="It is the fraction of the original metric to keep: 0.99 keeps 99 %.",
        )
    return value


def _hide_password(url: str) -> str:
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def load_settings(**overrides: object) -> Settings:
    """Read the environment; turn pydantic's validation errors into one readable ConfigError.
    Overrides use field names (threads=1)."""
    from pydantic import ValidationError

    aliases = {name: f.validation_alias for name, f in Settings.model_fields.items()}
    try:
        return Settings(**{aliases.get(k) or k: v for k, v in overrides.items()})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = err.get("loc", ("?",))[0]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(
            f"Setting {where} = {err.get('input')!r} is invalid: {err.get('msg')}.",
            hint="Fix the environment variable of that name (see `optiserve config`).",
        ) from None
