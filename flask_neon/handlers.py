"""Turn "the database is unavailable" into a 503 the client can act on, not a 500 traceback."""

from __future__ import annotations

import logging

import sqlalchemy.exc as sa_exc
from flask import Flask, Response, jsonify

from .errors import DatabaseUnavailableError, classify

log = logging.getLogger("flask_neon")

#: Causes that mean "try again later", answered with 503; anything else stays a 500.
UNAVAILABLE_CAUSES = frozenset(
    {
        "pool_exhausted",
        "compute_waking",
        "connection_refused",
        "connect_timeout",
        "connection_lost",
        "too_many_connections",
        "unknown_host",
        "tls_failed",
        "idle_in_transaction_timeout",
    }
)
RETRY_AFTER_SECONDS = 5


def register_error_handlers(app: Flask) -> None:
    """Answer database outages with ``503`` JSON and ``Retry-After``."""
    app.register_error_handler(sa_exc.OperationalError, _handle)
    app.register_error_handler(sa_exc.TimeoutError, _handle)
    app.register_error_handler(sa_exc.InterfaceError, _handle)
    app.register_error_handler(DatabaseUnavailableError, _handle)


def _handle(error: Exception) -> Response:
    from .extension import current_state

    state = current_state()
    if isinstance(error, DatabaseUnavailableError):
        cause = error.cause
    else:
        cause = classify(error, state.url.secrets())
    if cause.name not in UNAVAILABLE_CAUSES:
        # Not an outage (a statement timeout, a bug): Flask's usual 500 handling applies.
        raise error
    log.error(
        "flask-neon: database unavailable (%s): %s. %s", cause.name, cause.title, cause.detail
    )
    response = jsonify(
        {"error": "database unavailable", "cause": cause.name, "retry_after": RETRY_AFTER_SECONDS}
    )
    response.status_code = 503
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    response.headers["Cache-Control"] = "no-store"
    return response
