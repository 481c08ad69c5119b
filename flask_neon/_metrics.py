"""Prometheus metrics for the pool, when ``prometheus_client`` is installed.

Turn them on with ``DB_METRICS=true`` (``pip install 'flask-neon[metrics]'``). The metrics are
updated by the pool's own events, never at scrape time, so they stay correct under gunicorn
with several workers in prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``):
counters and the histogram add up across workers and the connection gauges are summed over
live workers (``multiprocess_mode="livesum"``).

Names follow Prometheus conventions (``_total`` for counters, base units in the name)::

    flask_neon_pool_connections{app, state="idle|used"}
    flask_neon_pool_connections_opened_total{app}
    flask_neon_pool_checkouts_total{app}
    flask_neon_pool_checkout_timeouts_total{app}
    flask_neon_pool_invalidations_total{app}
    flask_neon_pool_checkout_wait_seconds{app}   (histogram)
    flask_neon_nplusone_requests_total{app, endpoint, pattern}   (N+1 detection, _nplusone)
"""

from __future__ import annotations

import threading
import typing as t

import sqlalchemy as sa
from sqlalchemy.pool import QueuePool

from ._errors import NeonConfigError
from ._monitoring import PoolMonitor

#: Checkout waits of interest: a free connection (under 1 ms) up to a 30 s pool timeout.
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_lock = threading.Lock()
_families: dict[str, t.Any] = {}


def _metric_families() -> dict[str, t.Any]:
    """The metric objects, created once per process: Prometheus refuses duplicate names."""
    try:
        import prometheus_client as prom
    except ImportError:
        raise NeonConfigError(
            "DB_METRICS is on but prometheus_client is not installed. Install it with "
            "pip install 'flask-neon[metrics]', or set DB_METRICS=false."
        ) from None
    with _lock:
        if not _families:
            _families.update(
                connections=prom.Gauge(
                    "flask_neon_pool_connections",
                    "Pooled connections by state.",
                    ["app", "state"],
                    multiprocess_mode="livesum",
                ),
                opened=prom.Counter(
                    "flask_neon_pool_connections_opened",
                    "Connections opened to the database.",
                    ["app"],
                ),
                checkouts=prom.Counter(
                    "flask_neon_pool_checkouts", "Connections checked out of the pool.", ["app"]
                ),
                timeouts=prom.Counter(
                    "flask_neon_pool_checkout_timeouts",
                    "Checkouts that gave up after DB_POOL_TIMEOUT.",
                    ["app"],
                ),
                invalidations=prom.Counter(
                    "flask_neon_pool_invalidations",
                    "Connections discarded as broken (disconnects detected).",
                    ["app"],
                ),
                nplusone=prom.Counter(
                    "flask_neon_nplusone_requests",
                    "Requests in which an N+1 pattern (or the statement budget) was found.",
                    ["app", "endpoint", "pattern"],
                ),
                wait=prom.Histogram(
                    "flask_neon_pool_checkout_wait_seconds",
                    "Time spent waiting for a pooled connection.",
                    ["app"],
                    buckets=WAIT_BUCKETS,
                ),
            )
        return _families


def nplusone_counter() -> t.Any:
    """The counter of requests with an N+1 pattern, labelled (app, endpoint, pattern)."""
    return _metric_families()["nplusone"]


class PoolMetrics:
    """The metrics of one app's pool: an observer of its :class:`PoolMonitor`."""

    def __init__(self, app_name: str) -> None:
        families = _metric_families()
        self._idle = families["connections"].labels(app=app_name, state="idle")
        self._used = families["connections"].labels(app=app_name, state="used")
        self._opened = families["opened"].labels(app=app_name)
        self._checkouts = families["checkouts"].labels(app=app_name)
        self._timeouts = families["timeouts"].labels(app=app_name)
        self._invalidations = families["invalidations"].labels(app=app_name)
        self._wait = families["wait"].labels(app=app_name)

    def opened(self) -> None:
        self._opened.inc()

    def invalidated(self) -> None:
        self._invalidations.inc()

    def checked_out(self, pool: QueuePool, waited: float, timed_out: bool) -> None:
        self._checkouts.inc()
        self._wait.observe(waited)
        if timed_out:
            self._timeouts.inc()
        self.returned(pool)

    def returned(self, pool: QueuePool) -> None:
        """Set the connection gauges from the pool."""
        self._used.set(pool.checkedout())
        self._idle.set(pool.checkedin())


def install_metrics(engine: sa.Engine, monitor: PoolMonitor, app_name: str) -> PoolMetrics:
    """Export ``engine``'s pool as Prometheus metrics labelled with ``app_name``."""
    metrics = PoolMetrics(app_name)
    if isinstance(engine.pool, QueuePool):
        metrics.returned(engine.pool)
    monitor.observers.append(metrics)
    return metrics
