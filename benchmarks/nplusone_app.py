"""The example app with two 50-statement views: what N+1 detection costs (``bench_cpu.py
--nplusone``).

* ``GET /bench/selects``: 50 ``SELECT title FROM notes WHERE id = :id``, one per note id 1..50:
  one statement shape with 50 parameters (a repeated statement, as detection sees it);
* ``GET /bench/lazy``: the 50 tags ``bench-1`` .. ``bench-50`` (one statement), then each tag's
  notes loaded lazily (50 statements: ORM lazy loads of ``Tag.notes``);
* ``GET /notes/<id>``: the example app's one-query read, as it is.

:func:`seed` adds the tags, each on one note (the notes 1..50 of ``load_test.prepare``).
"""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, Flask

from example_app import create_app as create_example_app
from example_app.extensions import db
from example_app.models import Note, Tag

STATEMENTS = 50
bp = Blueprint("bench", __name__, url_prefix="/bench")


@bp.get("/selects")
def selects() -> dict[str, list[str | None]]:
    """50 statements of one shape, other parameters."""
    titles = [
        db.session.scalar(sa.select(Note.title).where(Note.id == ident))
        for ident in range(1, STATEMENTS + 1)
    ]
    return {"titles": titles}


@bp.get("/lazy")
def lazy() -> dict[str, list[tuple[str, int]]]:
    """A listing, then one lazy load per row."""
    query = sa.select(Tag).where(Tag.name.startswith("bench-")).order_by(Tag.id)
    tags = db.session.scalars(query.limit(STATEMENTS)).all()
    return {"tags": [(tag.name, len(tag.notes)) for tag in tags]}


def create_app() -> Flask:
    """The example app (its settings from the environment) with the views above."""
    app = create_example_app()
    app.register_blueprint(bp)
    return app


def seed(url: str) -> None:
    """The tags ``bench-1`` .. ``bench-50``, tag ``bench-N`` on note N (idempotent)."""
    from flask_neon._url import parse_url

    engine = sa.create_engine(parse_url(url).to_sqlalchemy())
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO tags (name) SELECT 'bench-' || n FROM generate_series(1, :count)"
                    " AS n ON CONFLICT (name) DO NOTHING"
                ),
                {"count": STATEMENTS},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO note_tags (note_id, tag_id) SELECT n, tags.id"
                    " FROM generate_series(1, :count) AS n JOIN tags ON tags.name = 'bench-' || n"
                    " ON CONFLICT DO NOTHING"
                ),
                {"count": STATEMENTS},
            )
    finally:
        engine.dispose()
