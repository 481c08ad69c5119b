"""Typed settings, read once at ``init_app`` from ``app.config``, the environment and ``.env``.

Precedence, highest first: ``app.config[KEY]``, the environment variable ``KEY``, the ``.env``
file, then the default. Every key starts with ``DB_``; the model's field ``pool_size`` is the key
``DB_POOL_SIZE``.
"""

from __future__ import annotations

import typing as t

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    engine_options: dict[str, t.Any] = Field(
        default_factory=dict,
        description="Extra create_engine() options, over the profile's (a JSON object in the "
        "environment). flask-neon builds the pool itself: poolclass, pool and creator are "
        "refused; connect_args are merged over its own.",
    )
    binds: dict[str, str | dict[str, t.Any]] = Field(
        default_factory=dict,
        description="Other databases, by bind key (a JSON object in the environment): a URL, "
        "or create_engine() options with a url. Models choose one with __bind_key__; each "
        "gets its own engine with the profile, limits, TLS policy and health line of DB_URL.",
    )
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
    retry_after: int = Field(
        default=5,
        ge=1,
        le=3600,
        description="Seconds in the Retry-After header of every 503 answer (an outage seen by a "
        "view, an unhealthy GET /health/db).",
    )
    driver: t.Literal["psycopg2", "psycopg"] = Field(
        default="psycopg2",
        description="The DBAPI driver for URLs that name none (postgresql://, postgres://): "
        "psycopg2, or psycopg (psycopg 3, the extra flask-neon[psycopg]). A URL's own "
        "postgresql+psycopg:// or postgresql+psycopg2:// is honoured as written.",
    )
    fast_begin: bool = Field(
        default=True,
        description="Send BEGIN in the same round trip as a transaction's first statement "
        "(psycopg2 waits for it separately): one round trip less per transaction; and send the "
        "ROLLBACK after a response without waiting for its reply.",
    )
    nplusone: t.Literal["auto", "off", "count", "warn", "raise"] = Field(
        default="auto",
        description="N+1 detection: statements of one shape repeated DB_NPLUSONE_THRESHOLD times "
        "in a request, lazy loads named with their fix. warn: log once per endpoint and "
        "pattern; count: only the Prometheus counter (DB_METRICS); raise: fail the request "
        "(tests); auto: warn in development, off otherwise.",
    )
    nplusone_threshold: int = Field(
        default=3,
        ge=2,
        le=1000,
        description="How many statements of one shape in one request make an N+1 candidate.",
    )
    statement_budget: int = Field(
        default=0,
        ge=0,
        le=100000,
        description="A request with more statements than this is reported like an N+1 (with "
        "DB_NPLUSONE's mode; warn when that is off). 0: no budget.",
    )
    server_timing: bool = Field(
        default=False,
        description="Add a Server-Timing header to each response that used the database: its "
        "time, statements and round trips, shown by browsers' developer tools. Off in every "
        "profile unless set.",
    )
    ping_after_idle: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="A pooled connection idle longer than this many seconds is pinged before "
        "use; a closed socket is always detected without a round trip. 0: ping every checkout "
        "(like pool_pre_ping).",
    )


def key_for(field: str) -> str:
    """The configuration key of a field: ``pool_size`` -> ``DB_POOL_SIZE``."""
    return PREFIX + field.upper()
