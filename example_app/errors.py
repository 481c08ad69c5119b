"""Errors as JSON: every error answer is ``{"error": "..."}``, plus ``"field"`` for bad input."""

from __future__ import annotations

from flask import Flask, json
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException


class ValidationError(Exception):
    """The request's input is invalid; answered with 400 ``{"error": ..., "field": ...}``.

    Args:
        message: What is wrong, for a person reading the answer.
        field: The offending JSON field or query parameter; ``None`` when the request body as
            a whole is unusable (not JSON, not an object).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _validation_error(error: ValidationError) -> ResponseReturnValue:
    return {"error": error.message, "field": error.field}, 400


def _http_error(error: HTTPException) -> ResponseReturnValue:
    # Start from werkzeug's own response so headers such as 405's "Allow" are kept, and
    # replace only the HTML body. Unhandled exceptions arrive here as a 500 too.
    response = error.get_response()
    response.set_data(json.dumps({"error": error.description}))
    response.mimetype = "application/json"
    return response


def register_error_handlers(app: Flask) -> None:
    """Answer validation errors and every HTTP error (404, 405, 400, 500, ...) with JSON."""
    app.register_error_handler(ValidationError, _validation_error)
    app.register_error_handler(HTTPException, _http_error)
