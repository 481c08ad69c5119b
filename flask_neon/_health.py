"""The ``/health`` blueprint: readiness (``/db``) from a bounded probe, liveness (``/live``)."""

from __future__ import annotations

import logging
import time
import typing as t

from flask import Blueprint, Response

from ._handlers import json_response
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
    # Primary and replica are probed side by side under one deadline.
    deadline = time.monotonic() + settings.health_timeout
    pending = state.primary.health.start()
    replica_pending = state.read.health.start() if state.read is not None else None
    result, cached = state.primary.health.wait(pending, deadline)
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
    if state.read is not None and replica_pending is not None:
        # The replica is reported, not judged: the app still serves writes without it.
        replica, replica_cached = state.read.health.wait(replica_pending, deadline)
        body["replica"] = {
            "status": "healthy" if replica.healthy else "unhealthy",
            "latency_ms": replica.latency_ms,
            "cached": replica_cached,
            "cause": replica.cause.name if replica.cause else None,
        }
    if state.health_details:
        facts = ("server_version", "database", "user", "tls", "tls_version")
        body["details"] = {
            "url": state.url.masked(),
            **{name: getattr(result, name) for name in facts},
            "error": result.cause.detail if result.cause else None,
            "hint": result.cause.hint if result.cause else None,
        }
    return body, 200 if result.healthy else 503
