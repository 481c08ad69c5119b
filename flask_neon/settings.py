"""Typed settings, read once at ``init_app`` from ``app.config``, the environment and ``.env``.

Precedence, highest first: ``app.config[KEY]``, the environment variable ``KEY``, the ``.env``
file, then the default. Every key starts with ``DB_``; the model's field ``pool_size`` is the key
``DB_POOL_SIZE``.
"""

from __future__ import annotations

import dataclasses
import os
import typing as t

import annotated_types
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import NeonConfigError

PREFIX = "DB_"
Profile = t.Literal["development", "production", "serverless"]
SessionLimits = t.Literal["auto", "startup", "transaction", "off"]

#: Where a setting's value came from, shown by ``flask db-check config``.
Source = t.Literal["app.config", "environment", ".env", "default", "profile"]


class NeonSettings(BaseSettings):
    """Every setting flask-neon reads. Field ``pool_size`` is the key ``DB_POOL_SIZE``.

    The README's configuration table is checked against this model by a test, so the
    descriptions here are the documentation.
    """

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        str_strip_whitespace=True,
        validate_default=True,
        frozen=True,
    )

    url: SecretStr = Field(
        description="PostgreSQL URL (postgresql://, postgres:// or postgresql+psycopg2://). "
        "Neon: copy it from the console; the -pooler host is recognised."
    )
    direct_url: SecretStr | None = Field(
        default=None,
        description="Direct (non-pooled) URL for migrations and flask db-check. Unset: derived "
        "from a Neon -pooler host by removing -pooler.",
    )
    read_url: SecretStr | None = Field(
        default=None,
        description="URL of a read replica for db.read_session. Unset: db.read_session reads "
        "from the primary (in read-only transactions).",
    )
    pooled: bool | None = Field(
        default=None,
        description="DB_URL goes through a transaction-mode pooler (PgBouncer). Unset: true "
        "for a Neon -pooler host.",
    )
    require_tls: bool | None = Field(
        default=None,
        description="Refuse a non-local host whose sslmode may fall back to plaintext. Unset: "
        "on in the production profile.",
    )
    profile: Profile | None = Field(
        default=None,
        description="Pool profile: development, production or serverless. Unset: development "
        "when the app runs in debug mode, else production.",
    )
    pool_size: int = Field(
        default=5,
        ge=1,
        le=100,
        description="Connections kept open per process (production profile). Workers x "
        "(pool size + overflow) must stay under the compute's max_connections "
        "(104 at 0.25 CU).",
    )
    max_overflow: int = Field(
        default=10,
        ge=0,
        le=100,
        description="Extra connections opened under load and closed when returned.",
    )
    pool_timeout: float = Field(
        default=30.0,
        ge=1,
        le=300,
        description="Seconds a request waits for a free connection before failing (503).",
    )
    pool_recycle: int = Field(
        default=1800,
        ge=300,
        le=86400,
        description="Seconds after which a connection is replaced when next checked out.",
    )
    echo: bool = Field(default=False, description="Log every SQL statement (never parameters).")
    statement_timeout: float = Field(
        default=30.0,
        ge=0,
        le=86400,
        description="Seconds a statement may run before the server cancels it (0: no limit).",
    )
    idle_in_transaction_timeout: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        description="Seconds a transaction may sit idle before the server ends it (0: no limit).",
    )
    connect_timeout: int = Field(
        default=10,
        ge=2,
        le=300,
        description="Seconds to open a new connection, retries included. Neon recommends "
        "10-15 s so a waking compute can answer.",
    )
    connect_retry_seconds: float = Field(
        default=3.0,
        ge=0,
        le=300,
        description="Time budget for retrying transient connect failures (refused, compute "
        "waking) with backoff and jitter; 0 turns retries off. Never longer than "
        "DB_CONNECT_TIMEOUT.",
    )
    connect_on_start: bool = Field(
        default=False,
        description="Open one connection in init_app and fail at startup, with the classified "
        "cause, when the database cannot be reached.",
    )
    session_limits: SessionLimits = Field(
        default="auto",
        description="How the statement and idle-in-transaction limits reach the server: "
        "startup (connection options, free), transaction (SET LOCAL per transaction, works "
        "through PgBouncer), off (set them on the role), auto (startup, or transaction "
        "through a pooler).",
    )
    health_enabled: bool = Field(
        default=True,
        description="Register the health routes (GET {prefix}/db readiness, {prefix}/live "
        "liveness).",
    )
    health_prefix: str = Field(
        default="/health",
        pattern=r"^/[A-Za-z0-9_\-/.]*$",
        max_length=200,
        description="URL prefix of the health routes.",
    )
    health_timeout: float = Field(
        default=2.0,
        ge=0.1,
        le=60,
        description="Seconds the health check may take, whatever the database does.",
    )
    health_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="Reuse the last health result this long (0: query on every probe). A "
        "query keeps a Neon compute awake: a longer cache lets it suspend.",
    )
    health_mode: t.Literal["query", "pool"] = Field(
        default="query",
        description="query: a round trip to the database; pool: report pool state only, never "
        "waking or keeping awake a suspended compute.",
    )
    health_details: bool | None = Field(
        default=None,
        description="Add URL (masked), server version, user, TLS and error text to the health "
        "body. Unset: on in the development profile only.",
    )
    leak_threshold: float | None = Field(
        default=None,
        ge=0,
        le=86400,
        description="Warn when a connection is held longer than this many seconds (0: off). "
        "Unset: 30 in the development profile, off otherwise.",
    )
    slow_query_ms: int = Field(
        default=0,
        ge=0,
        le=3_600_000,
        description="Log statements slower than this many milliseconds, with the endpoint, "
        "never the parameters (0: off).",
    )
    metrics: bool = Field(
        default=False,
        description="Export pool metrics to Prometheus (needs flask-neon[metrics]); works "
        "across gunicorn workers in prometheus_client's multiprocess mode.",
    )
    error_handler: bool = Field(
        default=True,
        description="Answer 503 JSON with Retry-After, not a 500 traceback, when a view fails "
        "because the database is unavailable or the pool is exhausted.",
    )
    fast_begin: bool = Field(
        default=True,
        description="Send BEGIN in the same round trip as a transaction's first statement "
        "(psycopg2 waits for it separately): one round trip less per transaction.",
    )
    ping_after_idle: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="A pooled connection idle longer than this many seconds is pinged before "
        "use; a closed socket is always detected without a round trip. 0: ping every checkout "
        "(like pool_pre_ping).",
    )


@dataclasses.dataclass(frozen=True)
class LoadedSettings:
    """The settings and where each value came from."""

    settings: NeonSettings
    sources: dict[str, Source]

    def explicit(self, field: str) -> bool:
        """True when the user set ``field`` (anywhere), False when it is the default."""
        return self.sources.get(field, "default") != "default"


def key_for(field: str) -> str:
    """The configuration key of a field: ``pool_size`` -> ``DB_POOL_SIZE``."""
    return PREFIX + field.upper()


def load_settings(
    config: t.Mapping[str, t.Any], env_file: str | os.PathLike[str] | None = ".env"
) -> LoadedSettings:
    """Read the settings with ``config`` (usually ``app.config``) taking precedence.

    Raises:
        NeonConfigError: naming the first invalid settings, never showing a secret.
    """
    fields = NeonSettings.model_fields
    overrides = {
        name: config[key_for(name)] for name in fields if config.get(key_for(name)) is not None
    }
    try:
        settings = NeonSettings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        # ``from None``: pydantic's own text repeats the input, which may be the password.
        raise NeonConfigError(_explain(exc)) from None
    return LoadedSettings(settings, _sources(overrides, env_file))


def _sources(
    overrides: t.Mapping[str, t.Any], env_file: str | os.PathLike[str] | None
) -> dict[str, Source]:
    environ = {key.upper() for key in os.environ}
    dotenv: set[str] = set()
    if env_file is not None and os.path.isfile(env_file):
        from dotenv import dotenv_values

        dotenv = {key.upper() for key, value in dotenv_values(env_file).items() if value}
    sources: dict[str, Source] = {}
    for name in NeonSettings.model_fields:
        key = key_for(name)
        if name in overrides:
            sources[name] = "app.config"
        elif key in environ:
            sources[name] = "environment"
        elif key in dotenv:
            sources[name] = ".env"
        else:
            sources[name] = "default"
    return sources


_SECRET_FIELDS = frozenset({"url", "direct_url", "read_url"})


def _explain(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        key = key_for(field)
        if error["type"] == "missing":
            if field == "url":
                lines.append(
                    f"{key} is not set. Set it in the environment, in .env or in "
                    f"app.config['{key}'], e.g. {key}=postgresql://user:password@host/dbname."
                )
            else:
                lines.append(f"{key} is required.")
            continue
        if field in _SECRET_FIELDS:
            lines.append(f"{key} must be a string URL ({error['msg'].lower()}).")
            continue
        shown = repr(error.get("input"))
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"{key} must be {_allowed(field)}, got {shown}.")
    return "Invalid flask-neon settings: " + " ".join(lines) if len(lines) > 1 else lines[0]


def _allowed(field: str) -> str:
    """Say in words what ``field`` accepts, from the model's own constraints."""
    info = NeonSettings.model_fields[field]
    annotation = info.annotation
    # Unwrap ``X | None``: the None only means "unset, use the profile's choice".
    args = [a for a in t.get_args(annotation) if a is not type(None)]
    if type(None) in t.get_args(annotation) and len(args) == 1:
        annotation = args[0]
    if t.get_origin(annotation) is t.Literal:
        return "one of " + ", ".join(str(c) for c in t.get_args(annotation))
    if annotation is SecretStr:
        return "a PostgreSQL URL"
    if annotation is str:
        return "a URL path starting with '/'"
    if annotation is bool:
        return "a boolean (true/false, 1/0, yes/no, on/off)"
    low = high = None
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Le):
            high = item.le
    kind = "an integer" if annotation is int else "a number"
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}"
    if low is not None:
        return f"{kind} >= {low}"
    return kind


def describe_settings() -> list[dict[str, str]]:
    """One row per setting: key, default, allowed values, description (for docs and the CLI)."""
    rows = []
    for name, info in NeonSettings.model_fields.items():
        default = "required" if info.is_required() else _show_default(info.default)
        rows.append(
            {
                "key": key_for(name),
                "default": default,
                "allowed": _allowed(name),
                "description": info.description or "",
            }
        )
    return rows


def _show_default(value: t.Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
