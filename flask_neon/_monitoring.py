"""Pool statistics, checkout counters and connection leak detection for one engine.

SQLAlchemy's pool reports a few raw numbers (``overflow()`` even starts at minus the pool
size); :class:`PoolMonitor` turns them, and counters kept by pool events, into what an operator
asks: how many connections are open and in use, is the pool exhausted, how long do requests
wait for a connection, and who holds one too long.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
import typing as t

import sqlalchemy as sa
from flask import has_request_context, request
from sqlalchemy import event
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from ._liveness import LivenessCheck
from ._settling import SettlingQueuePool

log = logging.getLogger("flask_neon")

# Frames from these packages are plumbing (tracing tools wrap SQLAlchemy's calls); the code
# location of a leak is the first other one.
_PLUMBING = (
    "sqlalchemy",
    "flask_neon",
    "flask",
    "werkzeug",
    "contextlib",
    "threading",
    "opentelemetry",
    "sentry_sdk",
    "wrapt",
)


class PoolObserver(t.Protocol):
    """Told of every pool event :class:`PoolMonitor` counts (the Prometheus exporter is one)."""

    def opened(self) -> None: ...
    def invalidated(self) -> None: ...
    def checked_out(self, pool: QueuePool, waited: float, timed_out: bool) -> None: ...
    def returned(self, pool: QueuePool) -> None: ...


class MeasuredQueuePool(SettlingQueuePool):
    """A QueuePool that reports each checkout, its wait and its timeout to its monitor, which
    :meth:`PoolMonitor.install` sets before the first checkout."""

    monitor: PoolMonitor
    #: Checks each connection handed out (set by the engine); None: no check.
    liveness: LivenessCheck | None = None

    def _do_get(self) -> ConnectionPoolEntry:
        started = time.perf_counter()
        # Counted here rather than in a checkout listener: one less event per request.
        timed_out = False
        try:
            record = super()._do_get()
        except sa.exc.TimeoutError:
            timed_out = True
            raise
        finally:
            self.monitor.checked_out(self, time.perf_counter() - started, timed_out)
        if self.liveness is not None:
            self.liveness.handing_out(record)
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        if self.liveness is not None:
            self.liveness.returned(record)
        super()._do_return_conn(record)
        for observer in self.monitor.observers:
            observer.returned(self)

    def recreate(self) -> QueuePool:
        pool = t.cast(MeasuredQueuePool, super().recreate())
        pool.monitor, pool.liveness = self.monitor, self.liveness
        return pool


@dataclasses.dataclass(frozen=True)
class Leak:
    """A connection checked out for longer than the leak threshold."""

    held_seconds: float
    endpoint: str | None
    location: str
    thread: str

    def as_dict(self) -> dict[str, t.Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Checkout:
    started: float
    endpoint: str | None
    location: str
    thread: str
    warned: bool = False


class PoolMonitor:
    """Pool statistics, counters and leak tracking for one engine, installed with :meth:`install`.

    Args:
        max_overflow: The pool's ``max_overflow``, for its capacity.
        leak_threshold: Seconds after which a checked-out connection counts as leaked.
    """

    def __init__(self, max_overflow: int = 0, leak_threshold: float | None = None) -> None:
        self.max_overflow = max_overflow
        self.leak_threshold = leak_threshold or None
        self.observers: list[PoolObserver] = []
        self.connections_opened = 0
        self.checkouts = 0
        self.invalidations = 0
        self.checkout_timeouts = 0
        self.checkout_wait_seconds = 0.0
        self._held: dict[int, _Checkout] = {}
        self._lock = threading.Lock()
        self._scanner: threading.Thread | None = None

    def install(self, engine: sa.Engine) -> None:
        pool = engine.pool
        if isinstance(pool, MeasuredQueuePool):
            pool.monitor = self
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "invalidate", self._on_invalidate)
        if self.leak_threshold:
            event.listen(engine, "checkout", self._on_checkout)
            event.listen(engine, "checkin", self._on_checkin)

    # -- events ----------------------------------------------------------------------------------

    def checked_out(self, pool: QueuePool, waited: float, timed_out: bool) -> None:
        """Count a checkout (called by :class:`MeasuredQueuePool`)."""
        self.checkouts += 1
        self.checkout_timeouts += timed_out
        self.checkout_wait_seconds += waited
        for observer in self.observers:
            observer.checked_out(pool, waited, timed_out)

    def _on_connect(self, dbapi_connection: t.Any, record: ConnectionPoolEntry) -> None:
        self.connections_opened += 1
        for observer in self.observers:
            observer.opened()

    def _on_invalidate(
        self, dbapi_connection: t.Any, record: ConnectionPoolEntry, exception: BaseException | None
    ) -> None:
        self.invalidations += 1
        for observer in self.observers:
            observer.invalidated()

    def _on_checkin(self, dbapi_connection: t.Any, record: ConnectionPoolEntry) -> None:
        with self._lock:
            checkout = self._held.pop(id(record), None)
        if checkout is not None and checkout.warned:
            log.warning(
                "flask-neon: connection held %.1fs came back (checked out by %s at %s)",
                time.monotonic() - checkout.started,
                checkout.endpoint or "no request",
                checkout.location,
            )

    # -- leaks -----------------------------------------------------------------------------------

    def _on_checkout(
        self, dbapi_connection: t.Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        checkout = _Checkout(
            time.monotonic(), _endpoint(), _caller_location(), threading.current_thread().name
        )
        with self._lock:
            self._held[id(record)] = checkout
        if self._scanner is None or not self._scanner.is_alive():
            self._scanner = threading.Thread(
                target=self._scan, name="flask-neon-leaks", daemon=True
            )
            self._scanner.start()

    def _scan(self) -> None:
        assert self.leak_threshold is not None
        interval = max(0.05, min(self.leak_threshold / 2, 5.0))
        while True:
            time.sleep(interval)
            self.check_leaks(warn=True)

    def check_leaks(self, *, warn: bool = False) -> list[Leak]:
        """Connections held longer than the threshold now; with ``warn`` log each once."""
        if not self.leak_threshold:
            return []
        now = time.monotonic()
        leaks = []
        with self._lock:
            held = list(self._held.values())
        for checkout in held:
            age = now - checkout.started
            if age < self.leak_threshold:
                continue
            leaks.append(
                Leak(round(age, 3), checkout.endpoint, checkout.location, checkout.thread)
            )
            if warn and not checkout.warned:
                checkout.warned = True
                log.warning(
                    "flask-neon: connection held for %.1fs (threshold %.1fs), checked out by "
                    "endpoint %s at %s in thread %s",
                    age,
                    self.leak_threshold,
                    checkout.endpoint or "(no request)",
                    checkout.location,
                    checkout.thread,
                )
        return leaks

    # -- statistics ----------------------------------------------------------------------------

    def stats(self, engine: sa.Engine) -> dict[str, t.Any]:
        """Pool statistics; ``overflow`` counts connections beyond the pool size (never < 0)."""
        pool = t.cast(QueuePool, engine.pool)  # flask-neon always builds a QueuePool
        size = pool.size()
        checked_out = pool.checkedout()
        capacity = size + max(0, self.max_overflow)
        if checked_out >= capacity:
            status = "exhausted"
        elif checked_out >= size:
            status = "busy"
        else:
            status = "ok"
        return {
            "status": status,
            "size": size,
            "checked_in": pool.checkedin(),
            "checked_out": checked_out,
            "overflow": max(0, pool.overflow()),
            "max_capacity": capacity,
            "connections_opened": self.connections_opened,
            "checkouts": self.checkouts,
            "invalidations": self.invalidations,
            "checkout_timeouts": self.checkout_timeouts,
            "checkout_wait_seconds": round(self.checkout_wait_seconds, 6),
        }


def _endpoint() -> str | None:
    return request.endpoint if has_request_context() else None


def _caller_location() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".", 1)[0] not in _PLUMBING:
            return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "unknown"


def install_slow_query_log(engine: sa.Engine, threshold_ms: int) -> None:
    """Log statements slower than ``threshold_ms`` once, with the endpoint; never parameters."""
    threshold = threshold_ms / 1000

    @event.listens_for(engine, "before_cursor_execute", named=True)
    def _start(conn: sa.Connection, **_: t.Any) -> None:
        conn.info["flask_neon.query_started"] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute", named=True)
    def _finish(conn: sa.Connection, statement: str, **_: t.Any) -> None:
        started = conn.info.pop("flask_neon.query_started", None)
        if started is None:
            return
        elapsed = time.perf_counter() - started
        if elapsed < threshold:
            return
        text = " ".join(statement.split())
        log.warning(
            "flask-neon: slow query %.1f ms (threshold %d ms) in endpoint %s: %s",
            elapsed * 1000,
            threshold_ms,
            _endpoint() or "(no request)",
            text if len(text) <= 300 else text[:297] + "...",
        )
