"""The app's models: a note (title, body, done flag), tags on notes, and a private note only
its owner sees."""

from __future__ import annotations

import datetime as dt
import typing as t

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .extensions import Model

TITLE_MAX_LENGTH = 200


class Note(Model):
    """A note. ``created_at`` and ``updated_at`` are set by the database, not by Python."""

    __tablename__ = "notes"
    # The views validate titles too; the constraint keeps other writers (scripts, psql) honest.
    # Named "title_length", it becomes "ck_notes_title_length" by NeonDB's naming convention.
    __table_args__ = (
        sa.CheckConstraint(
            f"char_length(title) BETWEEN 1 AND {TITLE_MAX_LENGTH}", name="title_length"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(TITLE_MAX_LENGTH))
    # Both defaults: Python's for objects built here, the server's for rows inserted elsewhere.
    body: Mapped[str] = mapped_column(sa.Text, default="", server_default="")
    done: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    # timestamptz: an instant, unambiguous whatever the server's or the client's time zone.
    created_at: Mapped[dt.datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )
    # onupdate adds "updated_at = now()" to every UPDATE this app issues. The server's now()
    # (the transaction's start) rather than Python's clock keeps both columns on one clock.
    updated_at: Mapped[dt.datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now(), onupdate=sa.func.now()
    )

    def to_dict(self) -> dict[str, t.Any]:
        """The note as the API returns it."""
        return {
            "id": self.id,
            "title": self.title,
            "body": self.body,
            "done": self.done,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }

    def __repr__(self) -> str:
        return f"<Note {self.id} {self.title!r}>"


#: Which notes carry which tags (many-to-many).
note_tags = sa.Table(
    "note_tags",
    Model.metadata,
    sa.Column("note_id", sa.ForeignKey("notes.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag_id", sa.ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True),
)


class Tag(Model):
    """A tag; each note may carry several (``POST /tags``, ``GET /tags``)."""

    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50), unique=True)
    # Loaded lazily unless a query asks otherwise: GET /tags asks (selectinload), and
    # GET /tags/naive shows what flask-neon reports when a listing does not.
    notes: Mapped[list[Note]] = relationship(secondary=note_tags, order_by=Note.id)

    def to_dict(self) -> dict[str, t.Any]:
        """The tag with the titles of its notes."""
        return {"id": self.id, "name": self.name, "notes": [note.title for note in self.notes]}


class PrivateNote(Model):
    """A note only its owner can see: the ``private_notes`` migration adds the policy."""

    __tablename__ = "private_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Set by the database from the transaction's ``app.user_id`` (see example_app/private.py).
    owner: Mapped[str] = mapped_column(
        sa.Text, server_default=sa.text("nullif(current_setting('app.user_id', true), '')")
    )
    body: Mapped[str] = mapped_column(sa.Text)

    def to_dict(self) -> dict[str, t.Any]:
        """The note as the API returns it."""
        return {"id": self.id, "owner": self.owner, "body": self.body}
