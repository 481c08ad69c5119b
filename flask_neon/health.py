"""Health: a database probe bounded in time, its cache, and the ``/health`` blueprint.

The probe runs in a worker thread and the caller waits at most ``DB_HEALTH_TIMEOUT``: whatever
the database does (a pool with no free connection, a server that accepts and never answers, a
network that drops packets), the answer comes in time. Only one probe per app is in flight;
callers that arrive meanwhile wait for the same result instead of piling up threads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
import typing as t

from flask import Blueprint, Flask, Response, jsonify

from .errors import ErrorCause, classify

if t.TYPE_CHECKING:
    from .extension import NeonState

log = logging.getLogger("flask_neon")

_TIMEOUT_CAUSE = ErrorCause(
    name="health_timeout",
    title="The database did not answer within DB_HEALTH_TIMEOUT",
    hint="The server hangs, the network drops packets, or every pooled connection is busy.",
    transient=True,
)

_PROBE_SQL = (
    "SELECT current_setting('server_version'), current_database(), current_user, "
    "(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), "
    "(SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()), "
    "(SELECT cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()), "
    "current_setting('statement_timeout'), "
    "current_setting('idle_in_transaction_session_timeout'), "
    "pg_is_in_recovery()"
)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """One round trip to the database, or the classified reason it failed."""

    healthy: bool
    latency_ms: float
    checked_at: float
    cause: ErrorCause | None = None
    server_version: str | None = None
    database: str | None = None
    user: str | None = None
    tls: bool | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    statement_timeout: str | None = None
    idle_in_transaction_session_timeout: str | None = None
    in_recovery: bool | None = None

    def as_dict(self) -> dict[str, t.Any]:
        data = dataclasses.asdict(self)
        data["cause"] = self.cause.as_dict() if self.cause else None
        return data


def run_probe(engine: t.Any, secrets: list[str]) -> ProbeResult:
    """One round trip on ``engine`` with server facts; never raises."""
    started = time.perf_counter()
    try:
        with engine.connect() as connection:
            row = connection.exec_driver_sql(_PROBE_SQL).one()
            connection.rollback()
    except Exception as exc:
        return ProbeResult(
            healthy=False,
            latency_ms=_ms(started),
            checked_at=time.time(),
            cause=classify(exc, secrets),
        )
    return ProbeResult(
        healthy=True,
        latency_ms=_ms(started),
        checked_at=time.time(),
        server_version=row[0],
        database=row[1],
        user=row[2],
        tls=bool(row[3]),
        tls_version=row[4],
        tls_cipher=row[5],
        statement_timeout=row[6],
        idle_in_transaction_session_timeout=row[7],
        in_recovery=row[8],
    )


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


class HealthChecker:
    """Bounded, cached, single-flight probes of one engine."""

    def __init__(
        self, engine: t.Any, secrets: list[str], timeout: float, cache_seconds: float
    ) -> None:
        self.engine = engine
        self.secrets = secrets
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._inflight: concurrent.futures.Future[ProbeResult] | None = None
        self._last: ProbeResult | None = None
        self._last_at = 0.0

    def check(
        self, *, use_cache: bool = True, timeout: float | None = None
    ) -> tuple[ProbeResult, bool]:
        """The latest result and whether it came from the cache."""
        started = time.monotonic()
        pending = self.start(use_cache=use_cache)
        deadline = started + (self.timeout if timeout is None else timeout)
        return self.wait(pending, deadline)

    def start(
        self, *, use_cache: bool = True
    ) -> ProbeResult | concurrent.futures.Future[ProbeResult]:
        """A fresh-enough cached result, or the future of the probe in flight (started now if
        none is), so that several checkers can run side by side under one deadline."""
        with self._lock:
            now = time.monotonic()
            if use_cache and self._last is not None and now - self._last_at < self.cache_seconds:
                return self._last
            future = self._inflight
            if future is None or future.done():
                future = concurrent.futures.Future()
                self._inflight = future
                threading.Thread(
                    target=self._probe_into, args=(future,), name="flask-neon-health", daemon=True
                ).start()
            return future

    def wait(
        self, pending: ProbeResult | concurrent.futures.Future[ProbeResult], deadline: float
    ) -> tuple[ProbeResult, bool]:
        """The result of :meth:`start`, waiting at most until ``deadline`` (monotonic)."""
        if isinstance(pending, ProbeResult):
            return pending, True
        started = time.monotonic()
        try:
            result = pending.result(timeout=max(0.0, deadline - started))
        except concurrent.futures.TimeoutError:
            result = ProbeResult(
                healthy=False,
                latency_ms=round((time.monotonic() - started) * 1000, 2),
                checked_at=time.time(),
                cause=_TIMEOUT_CAUSE,
            )
        with self._lock:
            self._last, self._last_at = result, time.monotonic()
        return result, False

    def _probe_into(self, future: concurrent.futures.Future[ProbeResult]) -> None:
        future.set_result(run_probe(self.engine, self.secrets))


# -- the blueprint -------------------------------------------------------------------------------


def make_blueprint(prefix: str) -> Blueprint:
    """The health routes: ``{prefix}/db`` (readiness) and ``{prefix}/live`` (liveness)."""
    blueprint = Blueprint("flask_neon_health", __name__, url_prefix=prefix)

    @blueprint.route("/db", methods=["GET", "HEAD"])
    def database() -> Response:
        from .extension import current_state

        state = current_state()
        return _no_store(*health_response(state))

    @blueprint.route("/live", methods=["GET", "HEAD"])
    def live() -> Response:
        # Liveness says the process answers; the database belongs to readiness only, or an
        # outage would make the orchestrator restart every healthy worker.
        return _no_store({"status": "alive"}, 200)

    return blueprint


def health_response(state: NeonState) -> tuple[dict[str, t.Any], int]:
    """The JSON body and status of ``GET /health/db`` for one app."""
    settings = state.settings
    pool = state.monitor.stats(state.engine)
    body: dict[str, t.Any] = {
        "database": "postgresql",
        "host_kind": "pooled" if state.pooled else "direct",
        "mode": settings.health_mode,
        "pool": pool,
    }
    if settings.health_mode == "pool":
        # No query: a probe that never wakes a suspended compute nor keeps it awake.
        body["status"] = "unhealthy" if pool["status"] == "exhausted" else "healthy"
        return body, 200 if body["status"] == "healthy" else 503
    # Primary and replica are probed side by side under one deadline.
    deadline = time.monotonic() + settings.health_timeout
    pending = state.health.start()
    replica_pending = state.read.health.start() if state.read is not None else None
    result, cached = state.health.wait(pending, deadline)
    body.update(
        status="healthy" if result.healthy else "unhealthy",
        latency_ms=result.latency_ms,
        cached=cached,
        age_seconds=round(max(0.0, time.time() - result.checked_at), 3),
    )
    if result.cause is not None:
        body["cause"] = result.cause.name
        if not cached:
            log.warning(
                "flask-neon: health check failed for %s: %s. %s Hint: %s",
                state.url.masked(),
                result.cause.title,
                result.cause.detail,
                result.cause.hint,
            )
    if state.read is not None:
        # The replica is reported, not judged: the app still serves writes without it.
        assert replica_pending is not None
        replica, replica_cached = state.read.health.wait(replica_pending, deadline)
        body["replica"] = {
            "status": "healthy" if replica.healthy else "unhealthy",
            "latency_ms": replica.latency_ms,
            "cached": replica_cached,
            "cause": replica.cause.name if replica.cause else None,
        }
    if state.health_details:
        body["details"] = {
            "url": state.url.masked(),
            "server_version": result.server_version,
            "database": result.database,
            "user": result.user,
            "tls": result.tls,
            "tls_version": result.tls_version,
            "error": result.cause.detail if result.cause else None,
            "hint": result.cause.hint if result.cause else None,
        }
    return body, 200 if result.healthy else 503


def _no_store(body: dict[str, t.Any], status: int) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    if status == 503:
        response.headers["Retry-After"] = "5"
    return response


def register(app: Flask, prefix: str) -> None:
    app.register_blueprint(make_blueprint(prefix))
