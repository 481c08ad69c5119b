"""A database probe bounded in time, cached and single-flight: what health and CLI ask.

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

from ._errors import ErrorCause, classify

log = logging.getLogger("flask_neon")

_TIMEOUT_CAUSE = ErrorCause(
    name="health_timeout",
    title="The database did not answer within DB_HEALTH_TIMEOUT",
    hint="The server hangs, the network drops packets, or every pooled connection is busy.",
    transient=True,
)

# Each column is named after the ProbeResult field it fills.
_PROBE_SQL = (
    "SELECT current_setting('server_version') AS server_version, current_database() AS database, "
    'current_user AS "user", '
    "coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false) AS tls, "
    "(SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()) AS tls_version, "
    "(SELECT cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()) AS tls_cipher, "
    "current_setting('statement_timeout') AS statement_timeout, "
    "current_setting('idle_in_transaction_session_timeout') "
    "AS idle_in_transaction_session_timeout, "
    "pg_is_in_recovery() AS in_recovery"
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


def run_probe(engine: t.Any, secrets: list[str]) -> ProbeResult:
    """One round trip on ``engine`` with server facts; never raises."""
    started = time.perf_counter()
    try:
        with engine.connect() as connection:
            row = connection.exec_driver_sql(_PROBE_SQL).one()
            connection.rollback()
    except Exception as exc:
        return ProbeResult(False, _ms(started), time.time(), cause=classify(exc, secrets))
    return ProbeResult(True, _ms(started), time.time(), **row._asdict())


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


class HealthChecker:
    """Bounded, cached, single-flight probes of one engine."""

    def __init__(self, engine: t.Any, secrets: list[str], cache_seconds: float) -> None:
        self.engine = engine
        self.secrets = secrets
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._inflight: concurrent.futures.Future[ProbeResult] | None = None
        self._last: ProbeResult | None = None
        self._last_at = 0.0

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
        started = time.perf_counter()
        try:
            result = pending.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            result = ProbeResult(False, _ms(started), time.time(), cause=_TIMEOUT_CAUSE)
        with self._lock:
            self._last, self._last_at = result, time.monotonic()
        return result, False

    def _probe_into(self, future: concurrent.futures.Future[ProbeResult]) -> None:
        future.set_result(run_probe(self.engine, self.secrets))
