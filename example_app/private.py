"""Private notes under ``/me/notes``: each user sees only their own, enforced by the database.

A row-level security policy (created by the ``private_notes`` migration) compares each row's
owner with the transaction's ``app.user_id`` setting, which flask-neon sets for every
transaction of the request from :func:`database_context`, together with the role the policy
binds (``example_notes_user``). The view code has no ``WHERE owner =
...``: forgetting one cannot leak a row. ``X-User-Id`` stands in for real authentication (a
session cookie or a verified JWT); see docs/row-level-security.md.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from flask import Blueprint, abort, request
from flask.typing import ResponseReturnValue

from flask_neon import DatabaseContext

from .extensions import db
from .models import PrivateNote

bp = Blueprint("me", __name__, url_prefix="/me")


@db.request_context
def database_context() -> DatabaseContext | dict[str, t.Any]:
    """Every request's database context: the user for ``/me``, none elsewhere."""
    if request.blueprint != bp.name:
        return DatabaseContext()
    user = request.headers.get("X-User-Id", "").strip()
    if not user:
        abort(401, description="send X-User-Id (a stand-in for real authentication)")
    # The role: the app may log in as the tables' owner or a superuser, who bypass policies.
    return DatabaseContext({"app.user_id": user}, role="example_notes_user")


@bp.get("/notes")
def list_private_notes() -> ResponseReturnValue:
    """``GET /me/notes``: the caller's notes; the policy filters the rows."""
    notes = db.session.scalars(sa.select(PrivateNote).order_by(PrivateNote.id))
    return {"notes": [note.to_dict() for note in notes]}


@bp.post("/notes")
def create_private_note() -> ResponseReturnValue:
    """``POST /me/notes`` with ``{"body": ...}``; the owner is set by the database."""
    body = (request.get_json(silent=True) or {}).get("body")
    if not isinstance(body, str):
        abort(400, description="body must be a string")
    note = PrivateNote(body=body)
    db.session.add(note)
    db.session.flush()  # the INSERT returns the owner the database set
    result = note.to_dict()
    db.session.commit()
    return result, 201
