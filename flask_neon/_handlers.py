"""Turn "the database is unavailable" into a 503 the client can act on, not a 500 traceback."""

from __future__ import annotations

import logging
import typing as t

import sqlalchemy.exc as sa_exc
from flask import Flask, Response, jsonify

from ._errors import DatabaseUnavailableError, classify
from ._state import current_state

log = logging.getLogger("flask_neon")


def json_response(
    body: dict[str, t.Any], status: int, *, retry_after: int | None = None
) -> Response:
    """A JSON answer that no cache keeps; a ``503`` says when to try again (``DB_RETRY_AFTER``)."""
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    if status == 503 and retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def register_error_handlers(app: Flask) -> None:
    """Answer database outages with ``503`` JSON and ``Retry-After``."""
    app.register_error_handler(sa_exc.OperationalError, _handle)
    app.register_error_handler(sa_exc.TimeoutError, _handle)
    app.register_error_handler(sa_exc.InterfaceError, _handle)
    # psycopg 3 raises the server's idle-in-transaction timeout (25P03) as an InternalError.
    app.register_error_handler(sa_exc.InternalError, _handle)
    app.register_error_handler(DatabaseUnavailableError, _handle)


def _handle(error: Exception) -> Response:
    state = current_state()
    if isinstance(error, DatabaseUnavailableError):
        cause = error.cause
    else:
        cause = classify(error, state.secrets())
    if not cause.transient:
        # Not an outage (a statement timeout, a bug): Flask's usual 500 handling applies.
        raise error
    log.error(
        "flask-neon: database unavailable (%s): %s. %s", cause.name, cause.title, cause.detail
    )
    retry_after = state.settings.retry_after
    body = {"error": "database unavailable", "cause": cause.name, "retry_after": retry_after}
    return json_response(body, 503, retry_after=retry_after)
