"""The peers of ``bench_latency.py`` that are not an app of their own: bare Flask and a Flask
app on a raw psycopg2 pool or a raw psycopg 3 connection queue, all serving the notes routes
the other peers serve (``GET /notes/<id>``, ``POST /notes``). Served by gunicorn from the
repository root::

    DB_URL=postgresql://... gunicorn 'benchmarks.latency_apps:raw()'
"""

from __future__ import annotations

import os
import queue
import re

import psycopg
import psycopg2.pool  # type: ignore[import-untyped]
from flask import Flask, abort, request
from flask.typing import ResponseReturnValue

NOTE = {"id": 1, "title": "note 1", "body": "Lorem ipsum dolor sit amet. " * 4}


def bare() -> Flask:
    """The same routes with no database: the floor every peer is measured against."""
    app = Flask(__name__)

    @app.get("/notes/<int:note_id>")
    def get_note(note_id: int) -> ResponseReturnValue:
        return {**NOTE, "id": note_id}

    @app.post("/notes")
    def create_note() -> ResponseReturnValue:
        return {**NOTE, **(request.get_json() or {})}, 201

    return app


def raw() -> Flask:
    """psycopg2's own pool, used as its documentation shows: BEGIN, the query, then ROLLBACK
    (or COMMIT) before the connection goes back."""
    app = Flask(__name__)
    dsn = re.sub(r"^postgresql\+psycopg2?://", "postgresql://", os.environ["DB_URL"])
    pool = psycopg2.pool.ThreadedConnectionPool(1, 5, dsn)

    @app.get("/notes/<int:note_id>")
    def get_note(note_id: int) -> ResponseReturnValue:
        connection = pool.getconn()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT id, title, body FROM notes WHERE id = %s", [note_id])
                row = cursor.fetchone()
            connection.rollback()
        finally:
            pool.putconn(connection)
        if row is None:
            abort(404)
        return {"id": row[0], "title": row[1], "body": row[2]}

    @app.post("/notes")
    def create_note() -> ResponseReturnValue:
        fields = request.get_json() or {}
        connection = pool.getconn()
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO notes (title, body) VALUES (%s, %s) RETURNING id",
                    [fields.get("title", ""), fields.get("body", "")],
                )
                (note_id,) = cursor.fetchone()
            connection.commit()
        finally:
            pool.putconn(connection)
        return {"id": note_id, **fields}, 201

    return app


def raw_psycopg() -> Flask:
    """psycopg 3 as its documentation shows, on a plain queue of connections (psycopg_pool
    is not a dependency): psycopg sends ``BEGIN`` before the query and waits for it, then
    ``rollback()`` (or ``commit()``) before the connection goes back. Its defaults are kept:
    the sixth run of a query prepares it (one round trip more, once per connection)."""
    app = Flask(__name__)
    dsn = re.sub(r"^postgresql\+psycopg2?://", "postgresql://", os.environ["DB_URL"])
    pool: queue.SimpleQueue[psycopg.Connection[tuple[object, ...]]] = queue.SimpleQueue()
    for _ in range(5):
        pool.put(psycopg.connect(dsn))

    @app.get("/notes/<int:note_id>")
    def get_note(note_id: int) -> ResponseReturnValue:
        connection = pool.get()
        try:
            row = connection.execute(
                "SELECT id, title, body FROM notes WHERE id = %s", [note_id]
            ).fetchone()
            connection.rollback()
        finally:
            pool.put(connection)
        if row is None:
            abort(404)
        return {"id": row[0], "title": row[1], "body": row[2]}

    @app.post("/notes")
    def create_note() -> ResponseReturnValue:
        fields = request.get_json() or {}
        connection = pool.get()
        try:
            row = connection.execute(
                "INSERT INTO notes (title, body) VALUES (%s, %s) RETURNING id",
                [fields.get("title", ""), fields.get("body", "")],
            ).fetchone()
            connection.commit()
        finally:
            pool.put(connection)
        assert row is not None
        return {"id": row[0], **fields}, 201

    return app


def neon_rls() -> Flask:
    """The example app with a tenant setting on every request, as a row-level security app
    has: it travels in the message that carries ``BEGIN`` (docs/row-level-security.md)."""
    from example_app import create_app
    from example_app.extensions import db

    app = create_app()

    @db.request_context
    def tenant() -> dict[str, int]:
        return {"app.tenant_id": 1}

    return app
