"""The ``/health`` blueprint: readiness (``/db``) from a bounded probe, liveness (``/live``)."""

from __future__ import annotations

import logging
import time
import typing as t

from flask import Blueprint, Response

from ._handlers import json_response
from ._probe import ProbeResult
from ._state import NeonState, current_state

log = logging.getLogger("flask_neon")


def make_blueprint(prefix: str) -> Blueprint:
    """The health routes: ``{prefix}/db`` (readiness) and ``{prefix}/live`` (liveness)."""
    blueprint = Blueprint("flask_neon_health", __name__, url_prefix=prefix)

    @blueprint.route("/db", methods=["GET", "HEAD"])
    def database() -> Response:
        state = current_state()
        body, status = health_response(state)
        return json_response(body, status, retry_after=state.settings.retry_after)

    @blueprint.route("/live", methods=["GET", "HEAD"])
    def live() -> Response:
        # Liveness says the process answers; the database belongs to readiness only, or an
        # outage would make the orchestrator restart every healthy worker.
        return json_response({"status": "alive"}, 200)

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
    # Every database is probed side by side under one deadline.
    deadline = time.monotonic() + settings.health_timeout
    pending = state.primary.health.start()
    replica_pending = state.read.health.start() if state.read is not None else None
    binds_pending = {key: bind.primary.health.start() for key, bind in state.binds.items()}
    result, cached = state.primary.health.wait(pending, deadline)
    body.update(
        status="healthy" if result.healthy else "unhealthy",
        latency_ms=result.latency_ms,
        cached=cached,
        age_seconds=round(max(0.0, time.time() - result.checked_at), 3),
    )
    if result.cause is not None:
        body["cause"] = result.cause.name
    _log_failure(state.url.masked(), result, cached)
    if state.read is not None and replica_pending is not None:
        # The replica is reported, not judged: the app still serves writes without it.
        replica, replica_cached = state.read.health.wait(replica_pending, deadline)
        body["replica"] = {
            "status": "healthy" if replica.healthy else "unhealthy",
            "latency_ms": replica.latency_ms,
            "cached": replica_cached,
            "cause": replica.cause.name if replica.cause else None,
        }
    healthy = result.healthy
    if state.binds:
        # A bind holds the app's data as DB_URL does: judged like it.
        body["binds"] = {}
        for key, bind_pending in binds_pending.items():
            bind = state.binds[key]
            bind_result, bind_cached = bind.primary.health.wait(bind_pending, deadline)
            healthy = healthy and bind_result.healthy
            _log_failure(bind.primary.url.masked(), bind_result, bind_cached)
            body["binds"][key] = {
                "status": "healthy" if bind_result.healthy else "unhealthy",
                "host_kind": "pooled" if bind.primary.pooled else "direct",
                "latency_ms": bind_result.latency_ms,
                "cached": bind_cached,
                "cause": bind_result.cause.name if bind_result.cause else None,
                "pool": bind.primary.monitor.stats(bind.primary.engine),
            }
            if state.health_details:
                body["binds"][key]["url"] = bind.primary.url.masked()
        body["status"] = "healthy" if healthy else "unhealthy"
    if state.health_details:
        facts = ("server_version", "database", "user", "tls", "tls_version")
        body["details"] = {
            "url": state.url.masked(),
            **{name: getattr(result, name) for name in facts},
            "error": result.cause.detail if result.cause else None,
            "hint": result.cause.hint if result.cause else None,
        }
    return body, 200 if healthy else 503


def _log_failure(url: str, result: ProbeResult, cached: bool) -> None:
    """Log a failed probe once, when it ran (a cached failure was logged when it ran)."""
    if result.cause is not None and not cached:
        cause = result.cause
        log.warning(
            "flask-neon: health check failed for %s: %s. %s Hint: %s",
            url,
            cause.title,
            cause.detail,
            cause.hint,
        )
