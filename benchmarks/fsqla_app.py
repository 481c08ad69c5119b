"""The example app's notes API on plain Flask-SQLAlchemy 3.1: the baseline of ``load_test.py``.

Configured the way the guides tell PostgreSQL users to: ``pool_pre_ping=True`` (a ``SELECT 1``
round trip on every checkout) and Flask-SQLAlchemy's default pool (5 connections + 10
overflow, the same sizes as flask-neon's production profile). It serves the same routes with
the same JSON as ``example_app`` (``GET /notes``, ``POST /notes``, ``GET /notes/<id>``) from the
same ``notes`` table, created by the example app's migrations. The model, the input
validation and the JSON error handling are the example app's own; only the session differs.

Served by gunicorn from the repository root::

    DB_URL=postgresql://... gunicorn 'benchmarks.fsqla_app:create_app()'
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from flask import Flask, abort, url_for
from flask.typing import ResponseReturnValue
from flask_sqlalchemy import SQLAlchemy

from example_app.errors import register_error_handlers
from example_app.models import Note
from example_app.views import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_OFFSET,
    int_arg,
    json_object,
    note_fields,
)
from flask_neon._url import parse_url

# Flask-SQLAlchemy's session binds a model it did not declare to its default engine, so the
# example app's Note (declared on NeonDB's metadata) is used as it is.
db = SQLAlchemy()


def create_app() -> Flask:
    """Build the app; the database URL comes from ``$DB_URL``."""
    raw_url = os.environ.get("DB_URL", "").strip()
    if not raw_url:
        raise RuntimeError("fsqla_app: set DB_URL to the PostgreSQL URL")
    app = Flask(__name__)
    url = parse_url(raw_url).to_sqlalchemy()
    app.config["SQLALCHEMY_DATABASE_URI"] = url.render_as_string(hide_password=False)
    # FSQLA_PRE_PING=0: as Flask-SQLAlchemy comes, without the ping (bench_latency.py).
    pre_ping = os.environ.get("FSQLA_PRE_PING", "1") != "0"
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_pre_ping": pre_ping}
    db.init_app(app)
    app.add_url_rule("/notes", view_func=list_notes, methods=["GET"])
    app.add_url_rule("/notes", view_func=create_note, methods=["POST"])
    app.add_url_rule("/notes/<int:note_id>", view_func=get_note, methods=["GET"])
    register_error_handlers(app)
    return app


def list_notes() -> ResponseReturnValue:
    limit = int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = int_arg("offset", 0, 0, MAX_OFFSET)
    page = db.session.scalars(sa.select(Note).order_by(Note.id).limit(limit).offset(offset))
    total = db.session.scalar(sa.select(sa.func.count()).select_from(Note))
    return {
        "notes": [note.to_dict() for note in page],
        "limit": limit,
        "offset": offset,
        "total": total,
    }


def create_note() -> ResponseReturnValue:
    note = Note(**note_fields(json_object(), partial=False))
    db.session.add(note)
    # The flush sends the INSERT, which returns the id and timestamps the server set; the
    # note is read before COMMIT, after which every attribute is expired and reading one
    # would cost a round trip more.
    db.session.flush()
    body = note.to_dict()
    db.session.commit()
    return body, 201, {"Location": url_for("get_note", note_id=body["id"])}


def get_note(note_id: int) -> ResponseReturnValue:
    note = db.session.get(Note, note_id)
    if note is None:
        abort(404, description=f"note {note_id} not found")
    return note.to_dict()
