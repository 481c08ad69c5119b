"""Tags on notes under ``/tags``: a listing that loads each tag's notes, done right and (to
show what flask-neon reports) done wrong.

``GET /tags`` asks for the notes of all the tags in one more statement (``selectinload``):
two round trips whatever the number of tags. ``GET /tags/naive`` lets each tag load its notes
when ``to_dict`` reads them: one round trip per tag, the N+1 that flask-neon names in
development (``DB_NPLUSONE``, docs/round-trips.md) with the option that fixes it.
"""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, abort, request
from flask.typing import ResponseReturnValue
from sqlalchemy.orm import selectinload

from .extensions import db
from .models import Note, Tag

bp = Blueprint("tags", __name__, url_prefix="/tags")


@bp.get("")
def list_tags() -> ResponseReturnValue:
    """``GET /tags``: every tag with the titles of its notes, in two statements."""
    query = sa.select(Tag).order_by(Tag.name).options(selectinload(Tag.notes))
    return {"tags": [tag.to_dict() for tag in db.session.scalars(query)]}


@bp.get("/naive")
def list_tags_naively() -> ResponseReturnValue:
    """``GET /tags/naive``: the same answer, one statement per tag more (an N+1)."""
    query = sa.select(Tag).order_by(Tag.name)
    return {"tags": [tag.to_dict() for tag in db.session.scalars(query)]}


@bp.post("")
def create_tag() -> ResponseReturnValue:
    """``POST /tags`` with ``{"name": ..., "notes": [note ids]}``."""
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        abort(400, description="send {'name': str, 'notes': [note ids]}")
    ids = payload.get("notes", [])
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        abort(400, description="notes must be a list of note ids")
    notes = db.session.scalars(sa.select(Note).where(Note.id.in_(ids))).all()
    if len(notes) != len(set(ids)):
        abort(404, description="no such note")
    tag = Tag(name=payload["name"].strip(), notes=list(notes))
    db.session.add(tag)
    db.session.flush()
    body = tag.to_dict()
    db.session.commit()
    return body, 201
