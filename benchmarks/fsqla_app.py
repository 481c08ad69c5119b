"""The example app's notes API on plain Flask-SQLAlchemy 3.1: the baseline of ``load_test.py``.

Configured the way the guides tell PostgreSQL users to: ``pool_pre_ping=True`` (a ``SELECT 1``
round trip on every checkout) and Flask-SQLAlchemy's default pool (5 connections + 10
overflow, the same sizes as flask-neon's production profile). It serves the same routes with
the same JSON as ``example_app`` (``GET /notes``, ``POST /notes``, ``GET /notes/<id>``) from the
same ``notes`` table, created by the example app's migrations; validation is kept minimal.

Served by gunicorn from the repository root::

    DB_URL=postgresql://... gunicorn 'benchmarks.fsqla_app:create_app()'
"""

from __future__ import annotations

import datetime as dt
import os
import typing as t

import sqlalchemy as sa
from flask import Flask, abort, json, request, url_for
from flask.typing import ResponseReturnValue
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import orm
from werkzeug.exceptions import HTTPException

from flask_neon.url import parse_url

TITLE_MAX_LENGTH = 200
DEFAULT_LIMIT = 20
MAX_LIMIT = 100


class Base(orm.DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)

if t.TYPE_CHECKING:
    # Type checkers accept only a class statement as a base class, not db.Model.
    Model = Base
else:
    Model = db.Model


class Note(Model):
    __tablename__ = "notes"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str] = orm.mapped_column(sa.String(TITLE_MAX_LENGTH))
    body: orm.Mapped[str] = orm.mapped_column(sa.Text, default="", server_default="")
    done: orm.Mapped[bool] = orm.mapped_column(default=False, server_default=sa.false())
    created_at: orm.Mapped[dt.datetime] = orm.mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )
    updated_at: orm.Mapped[dt.datetime] = orm.mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now(), onupdate=sa.func.now()
    )

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "id": self.id,
            "title": self.title,
            "body": self.body,
            "done": self.done,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def create_app() -> Flask:
    """Build the app; the database URL comes from ``$DB_URL``."""
    raw_url = os.environ.get("DB_URL", "").strip()
    if not raw_url:
        raise RuntimeError("fsqla_app: set DB_URL to the PostgreSQL URL")
    app = Flask(__name__)
    url = parse_url(raw_url).to_sqlalchemy()
    app.config["SQLALCHEMY_DATABASE_URI"] = url.render_as_string(hide_password=False)
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_pre_ping": True}
    db.init_app(app)
    app.add_url_rule("/notes", view_func=list_notes, methods=["GET"])
    app.add_url_rule("/notes", view_func=create_note, methods=["POST"])
    app.add_url_rule("/notes/<int:note_id>", view_func=get_note, methods=["GET"])
    app.register_error_handler(InvalidInputError, _invalid_input)
    app.register_error_handler(HTTPException, _http_error)
    return app


def list_notes() -> ResponseReturnValue:
    limit = _int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _int_arg("offset", 0, 0, 2**63 - 1)
    page = db.session.scalars(sa.select(Note).order_by(Note.id).limit(limit).offset(offset))
    total = db.session.scalar(sa.select(sa.func.count()).select_from(Note))
    return {
        "notes": [note.to_dict() for note in page],
        "limit": limit,
        "offset": offset,
        "total": total,
    }


def create_note() -> ResponseReturnValue:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise InvalidInputError("the request body must be a JSON object")
    title = payload.get("title")
    if title is None:
        raise InvalidInputError("title is required", "title")
    if not isinstance(title, str) or not 1 <= len(title.strip()) <= TITLE_MAX_LENGTH:
        raise InvalidInputError(f"title must be 1 to {TITLE_MAX_LENGTH} characters", "title")
    note = Note(
        title=title.strip(), body=payload.get("body", ""), done=bool(payload.get("done", False))
    )
    db.session.add(note)
    db.session.commit()
    return note.to_dict(), 201, {"Location": url_for("get_note", note_id=note.id)}


def get_note(note_id: int) -> ResponseReturnValue:
    note = db.session.get(Note, note_id)
    if note is None:
        abort(404, description=f"note {note_id} not found")
    return note.to_dict()


def _int_arg(name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    value = int(raw) if raw.isascii() and raw.isdecimal() and len(raw) <= 19 else None
    if value is None or not minimum <= value <= maximum:
        raise InvalidInputError(f"{name} must be an integer from {minimum} to {maximum}", name)
    return value


class InvalidInputError(Exception):
    """Answered with 400 ``{"error": ..., "field": ...}``, as the example app does."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _invalid_input(error: InvalidInputError) -> ResponseReturnValue:
    return {"error": error.message, "field": error.field}, 400


def _http_error(error: HTTPException) -> ResponseReturnValue:
    response = error.get_response()
    response.set_data(json.dumps({"error": error.description}))
    response.mimetype = "application/json"
    return response
