"""The service's settings: environment variables prefixed ``COTUNE_`` (pydantic-settings).

``get_settings()`` builds them once per process (``get_settings.cache_clear()`` to rebuild).
Complex values are JSON in the environment::

    COTUNE_ENVIRONMENT=production
    COTUNE_DATABASE_URL=postgresql+psycopg://cotune@db:5432/cotune
    COTUNE_BROKER_URL=redis://redis:6379/0
    COTUNE_ARTIFACTS=s3://bucket/cotune          # or a local folder on a shared volume
    COTUNE_JUDGES='{"gpt-judge": {"url": "https://api.example.com/v1", "model": "gpt-4o-mini",
                    "api_key_env": "JUDGE_API_KEY"}}'
    COTUNE_HTTP_SEARCH_ALLOWED_HOSTS=search.example.com,wiki.example.org

Hosted judges are referenced by name in a job (``judge: {model: gpt-judge}``); their URL and the
*name* of the environment variable holding their key live here, and the key itself is read from
the server's environment when the judge is called: it is never stored in the settings, a job,
the database, a response or a log line.

Outside ``development`` the settings refuse unsafe defaults (a SQLite database, artifacts in a
temporary folder or at the default location, a wildcard host allow-list), naming the setting.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cotune.engines.vllm import DEFAULT_GPU_MEMORY_SHARE

ENV_PREFIX = "COTUNE_"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
JUDGE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
MiB = 1 << 20
DEFAULT_LEASE_SECONDS = 30.0
# The reaper looks at the queues twice, this far apart, before it re-sends a stalled job's work.
REAPER_SECOND_LOOK_SECONDS = 0.5
GiB = 1 << 30


def _default_home() -> Path:
    from cotune.models import cotune_home

    return cotune_home() / "service"


def default_database_url() -> str:
    return f"sqlite:///{_default_home() / 'cotune.db'}"


def default_artifacts() -> str:
    return str(_default_home() / "artifacts")


class HostedJudge(BaseModel):
    """An OpenAI-compatible judge the server may call. ``api_key_env`` names the server's
    environment variable holding the key (None: the endpoint needs no key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="the endpoint's base URL, e.g. https://host/v1")
    model: str = Field(min_length=1, description="the served model's name")
    api_key_env: str | None = Field(default=None, pattern=ENV_NAME)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL with a host")
        return url

    def api_key(self) -> str | None:
        """The key, read from the environment now (never kept)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def __repr__(self) -> str:  # the URL may carry credentials in its userinfo: leave it out
        return f"HostedJudge(model={self.model!r}, api_key_env={self.api_key_env!r})"


def _split_list(value: Any) -> Any:
    """``a,b`` or a JSON list ``["a", "b"]`` from the environment; a list as is."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything the API, the embedded server and the workers read from the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", validate_default=True, frozen=True
    )

    environment: Literal["development", "production"] = "development"
    database_url: str = Field(
        default_factory=default_database_url,
        description="postgresql+psycopg://... in production; sqlite:///... for development",
    )
    broker_url: str | None = Field(
        default=None, description="redis://... (Celery); None: no broker"
    )
    broker_key_prefix: str = Field(
        default="",
        description="a prefix for every Redis key of the broker: several deployments (or test "
        "runs) can share one Redis database without taking each other's messages",
    )
    artifacts: str = Field(
        default_factory=default_artifacts,
        description="the artifact store's root: a local folder (shared by every worker) or s3://",
    )
    migrate_on_start: bool | None = Field(
        default=None, description="run the migrations at start-up (default: in development only)"
    )

    # Uploads
    max_upload_bytes: int = Field(default=100 * MiB, ge=1)
    max_line_bytes: int = Field(default=1 * MiB, ge=64, description="one JSONL line or CSV row")
    max_json_body_bytes: int = Field(default=4 * MiB, ge=1024, description="any non-upload body")

    # What a job may name
    judges: dict[str, HostedJudge] = Field(default_factory=dict)
    http_search_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    http_search_private_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="allowed hosts that may resolve to internal addresses (a local search "
        "service); each must also be in http_search_allowed_hosts",
    )

    # Per-tenant limits (a tenant row may override them)
    max_running_jobs_per_tenant: int = Field(default=4, ge=1)
    max_storage_bytes_per_tenant: int = Field(default=10 * GiB, ge=1)

    # Workers
    # Recovery from a dead worker: these three add up to ``recovery_bound_seconds`` (40 s with
    # the defaults, under a minute by construction). A stage's holder renews its lease every
    # third of it, so a live worker keeps it through two missed beats.
    lease_seconds: float = Field(
        default=DEFAULT_LEASE_SECONDS,
        gt=0,
        description="how long a stage's lease lasts without a heartbeat (renewed every third)",
    )
    reaper_interval: float = Field(
        default=10.0, gt=0, description="how often beat runs the reaper (workers/reaper.py)"
    )
    stall_seconds: float = Field(
        default=30.0,
        gt=0,
        description="a job with no stage running and no progress for this long, whose message "
        "is in no queue, lost its next task: the reaper sends it again",
    )
    visibility_timeout: float = Field(default=6 * 3600.0, gt=0)
    # Devices (DESIGN.md §7). A model's tensor parallel size and dtype are its registration's.
    gpus: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="GPUs this worker uses (None: every visible CUDA device; 0: CPU only); "
        "a registered model's tensor_parallel may not exceed it",
    )
    gpu_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="memory of one of the workers' GPUs in GiB, for the fit check when a job "
        "is created (None: the API skips it; a worker measures its own GPUs before training)",
    )
    gpu_memory_share: float = Field(
        default=DEFAULT_GPU_MEMORY_SHARE,
        gt=0,
        le=1,
        description="the share of each GPU's memory cotune may take: vLLM's "
        "gpu_memory_utilization, divided among a job's engines; a trainer gets it while the "
        "engines sleep",
    )
    train_gpus: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs one adapter trains on; more than 1 trains with accelerate FSDP "
        "(written, never run on several GPUs: README 'GPU')",
    )
    release_cpu_engine: bool = Field(
        default=False,
        description="CPU only: shut the vLLM engine down while a trainer runs and start it "
        "again after (a few seconds per switch), for machines short of memory; by default "
        "the engine stays loaded (one per base model per process)",
    )
    workdir: str | None = Field(
        default=None,
        description="where jobs' files are materialised for a run (default: a folder under "
        "the system's temporary directory)",
    )

    # API
    max_page_size: int = Field(default=100, ge=1, le=10_000)
    events_poll_seconds: float = Field(default=0.5, gt=0)
    rate_limit_per_minute: int = Field(
        default=1200,
        ge=1,
        description="requests one API key may make per minute on average (per API process); "
        "more answer 429 with Retry-After",
    )
    rate_limit_burst: int = Field(
        default=120, ge=1, description="requests one API key may make at once"
    )
    auth_failures_per_minute: int = Field(
        default=10,
        ge=1,
        description="failed authentications one client address may make per minute on average "
        "once its burst is spent; meanwhile its authentications answer 429",
    )
    auth_failure_burst: int = Field(
        default=20, ge=1, description="failed authentications one client address may make at once"
    )
    max_streams_per_tenant: int = Field(
        default=8,
        ge=1,
        le=10_000,
        description="open ?stream=true event streams a tenant may hold at once; one more "
        "answers 429. A waiting stream holds no server thread, only a connection",
    )
    log_level: str = "INFO"
    log_json: bool = True

    # The served system (`cotune serve-system BUNDLE`, cotune/serving.py); its API keys, rate
    # limits and http_search allow-list are the settings above.
    system_traces: str | None = Field(
        default=None,
        description="the folder of the served system's trace log (traces.db, SQLite: every "
        "request's trace and its feedback); None: $COTUNE_HOME/system-traces. "
        "`serve-system --traces DIR` overrides it",
    )
    trace_retention_days: float = Field(
        default=30.0,
        gt=0,
        description="the served system deletes a trace (and its feedback) this many days after "
        "it was made: at start-up and then hourly",
    )

    @field_validator("http_search_allowed_hosts", "http_search_private_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        value = _split_list(value)
        if isinstance(value, list):
            return [str(v).strip().lower() for v in value if str(v).strip()]
        return value

    @field_validator("judges")
    @classmethod
    def _judge_names(cls, judges: dict[str, HostedJudge]) -> dict[str, HostedJudge]:
        import re

        for name in judges:
            if not re.match(JUDGE_NAME, name):
                raise ValueError(f"judge name {name!r} must match {JUDGE_NAME}")
        return judges

    @model_validator(mode="after")
    def _safe(self) -> Settings:
        stray = sorted(set(self.http_search_private_hosts) - set(self.http_search_allowed_hosts))
        if stray:
            raise ValueError(
                f"COTUNE_HTTP_SEARCH_PRIVATE_HOSTS: {stray} are not in "
                "COTUNE_HTTP_SEARCH_ALLOWED_HOSTS"
            )
        if self.gpus is not None and self.train_gpus > max(self.gpus, 1):
            raise ValueError(
                f"COTUNE_TRAIN_GPUS: {self.train_gpus} is more than COTUNE_GPUS {self.gpus}"
            )
        if self.environment != "development":
            problems = self.unsafe_settings()
            if problems:
                raise ValueError(
                    f"refusing unsafe settings for environment {self.environment!r}: "
                    + "; ".join(problems)
                )
        return self

    def unsafe_settings(self) -> list[str]:
        """What would be unsafe outside development, each naming its setting."""
        problems = []
        if self.database_url.startswith("sqlite"):
            problems.append(
                "COTUNE_DATABASE_URL is SQLite; use PostgreSQL (postgresql+psycopg://...)"
            )
        if "://" not in self.artifacts or self.artifacts.startswith("file://"):
            root = Path(self.artifacts.removeprefix("file://")).expanduser().resolve()
            temps = {Path(tempfile.gettempdir()).resolve(), Path("/tmp").resolve()}
            if any(root == t or t in root.parents for t in temps):
                problems.append(f"COTUNE_ARTIFACTS is in a temporary folder ({root})")
            elif self.artifacts == default_artifacts():
                problems.append(
                    "COTUNE_ARTIFACTS is the development default; set it to a shared volume "
                    "or an s3:// bucket"
                )
        if "*" in self.http_search_allowed_hosts:
            problems.append("COTUNE_HTTP_SEARCH_ALLOWED_HOSTS may not hold '*'")
        for name, judge in self.judges.items():
            if urlsplit(judge.url).scheme != "https" and judge.api_key_env:
                problems.append(f"COTUNE_JUDGES[{name!r}] sends its key over plain http")
        return problems

    @property
    def is_development(self) -> bool:
        return self.environment == "development"

    @property
    def should_migrate(self) -> bool:
        return self.is_development if self.migrate_on_start is None else self.migrate_on_start

    @property
    def recovery_bound_seconds(self) -> float:
        """The longest a job waits for its work to be re-sent after its worker died (not
        counting the time a worker needs to pick the work up): the lease running out (or the
        stall threshold passing) plus one reaper interval, plus the reaper's second look."""
        return (
            max(self.lease_seconds, self.stall_seconds)
            + self.reaper_interval
            + REAPER_SECOND_LOOK_SECONDS
        )

    def traces_dir(self) -> Path:
        """The served system's trace log folder (``system_traces``; not created here)."""
        if self.system_traces:
            return Path(self.system_traces).expanduser()
        from cotune.models import cotune_home

        return cotune_home() / "system-traces"

    def work_dir(self) -> Path:
        """Where jobs' files are materialised for a run (created)."""
        base = (
            Path(self.workdir).expanduser()
            if self.workdir
            else Path(tempfile.gettempdir()) / "cotune-work"
        )
        base.mkdir(parents=True, exist_ok=True)
        return base


@functools.cache
def get_settings() -> Settings:
    """The process's settings from the environment, built once."""
    return Settings()
