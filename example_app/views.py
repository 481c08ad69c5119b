"""The JSON API: create, list, read, update and delete notes under ``/notes``.

Every view uses ``db.session`` (one per request, opened on first use) and commits explicitly:
flask-neon never commits for you, and rolls back whatever was left uncommitted when the
request ends, e.g. after an exception.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from flask import Blueprint, abort, request, url_for
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest

from .errors import ValidationError
from .extensions import db
from .models import TITLE_MAX_LENGTH, Note

bp = Blueprint("notes", __name__, url_prefix="/notes")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
#: PostgreSQL's OFFSET is a bigint; anything larger is a server error rather than a 400.
MAX_OFFSET = 2**63 - 1

#: The fields a client may send, and the JSON type each must have.
WRITABLE_FIELDS: dict[str, type] = {"title": str, "body": str, "done": bool}


@bp.get("")
def list_notes() -> ResponseReturnValue:
    """``GET /notes?limit=20&offset=0``: one page of notes, oldest first."""
    limit = int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = int_arg("offset", 0, 0, MAX_OFFSET)
    # Ordered by the primary key, so that pages neither overlap nor skip rows.
    page = db.session.scalars(sa.select(Note).order_by(Note.id).limit(limit).offset(offset))
    total = db.session.scalar(sa.select(sa.func.count()).select_from(Note))
    return {
        "notes": [note.to_dict() for note in page],
        "limit": limit,
        "offset": offset,
        "total": total,
    }


@bp.post("")
def create_note() -> ResponseReturnValue:
    """``POST /notes`` with ``{"title": ..., "body": ..., "done": ...}``; title is required."""
    note = Note(**note_fields(json_object(), partial=False))
    db.session.add(note)
    # The flush sends the INSERT, which returns the id and timestamps the server set; the
    # note is read before COMMIT, after which every attribute is expired and reading one
    # would cost a round trip more.
    db.session.flush()
    body = note.to_dict()
    db.session.commit()
    return body, 201, {"Location": url_for(".get_note", note_id=body["id"])}


@bp.get("/<int:note_id>")
def get_note(note_id: int) -> ResponseReturnValue:
    """``GET /notes/<id>``."""
    return _note_or_404(note_id).to_dict()


@bp.patch("/<int:note_id>")
def update_note(note_id: int) -> ResponseReturnValue:
    """``PATCH /notes/<id>``: change only the fields sent."""
    fields = note_fields(json_object(), partial=True)
    note = _note_or_404(note_id)
    for name, value in fields.items():
        setattr(note, name, value)
    db.session.commit()
    return note.to_dict()


@bp.delete("/<int:note_id>")
def delete_note(note_id: int) -> ResponseReturnValue:
    """``DELETE /notes/<id>``."""
    db.session.delete(_note_or_404(note_id))
    db.session.commit()
    return "", 204


# -- helpers (also used by benchmarks/fsqla_app.py, the same API on Flask-SQLAlchemy) ----------


def _note_or_404(note_id: int) -> Note:
    note = db.session.get(Note, note_id)
    if note is None:
        abort(404, description=f"note {note_id} not found")
    return note


def int_arg(name: str, default: int, minimum: int, maximum: int) -> int:
    """The query parameter ``name`` as an integer in ``[minimum, maximum]``."""
    raw = request.args.get(name)
    if raw is None:
        return default
    # ASCII digits only: int() alone would also accept " 5", "+5", "1_0" and other scripts'
    # digits. At most 19 digits, as the largest limit (2**63 - 1) has; longer is out of range.
    value = int(raw) if raw.isascii() and raw.isdecimal() and len(raw) <= 19 else None
    if value is None or not minimum <= value <= maximum:
        raise ValidationError(f"{name} must be an integer from {minimum} to {maximum}", name)
    return value


def json_object() -> dict[str, t.Any]:
    """The request body, which must be a JSON object."""
    if not request.is_json:
        raise ValidationError("the request body must be JSON (Content-Type: application/json)")
    try:
        payload = request.get_json()
    except BadRequest:
        raise ValidationError("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ValidationError("the request body must be a JSON object")
    return payload


def note_fields(payload: dict[str, t.Any], *, partial: bool) -> dict[str, t.Any]:
    """Check a client's note fields and return them ready for the model.

    Args:
        payload: The decoded JSON object.
        partial: True for an update, where every field is optional.

    Raises:
        ValidationError: naming the first offending field.
    """
    # Sorted, so the same bad request always names the same field.
    for name in sorted(payload):
        if name not in WRITABLE_FIELDS:
            allowed = ", ".join(sorted(WRITABLE_FIELDS))
            raise ValidationError(f"unknown field {name!r} (allowed: {allowed})", name)
        expected = WRITABLE_FIELDS[name]
        # bool is checked with isinstance on purpose: JSON true/false only, never 0/1.
        if not isinstance(payload[name], expected):
            kind = "a boolean" if expected is bool else "a string"
            raise ValidationError(f"{name} must be {kind}", name)
        # PostgreSQL text cannot hold NUL; the driver would fail with a 500.
        if expected is str and "\x00" in payload[name]:
            raise ValidationError(f"{name} must not contain NUL characters", name)
    if not partial and "title" not in payload:
        raise ValidationError("title is required", "title")

    fields = dict(payload)
    if "title" in fields:
        fields["title"] = title = fields["title"].strip()
        if not title:
            raise ValidationError("title must not be empty", "title")
        if len(title) > TITLE_MAX_LENGTH:
            raise ValidationError(f"title must be at most {TITLE_MAX_LENGTH} characters", "title")
    return fields
