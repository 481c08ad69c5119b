"""The example app's private notes (``/me/notes``): row-level security per request, with the
policy and role its own migration creates, on a real PostgreSQL."""

from __future__ import annotations

import flask_migrate  # type: ignore[import-untyped]

from example_app import create_app
from example_app.extensions import db

from .conftest import admin_execute


def test_each_user_sees_only_their_own_private_notes(fresh_database: str) -> None:
    app = create_app({"TESTING": True, "DB_URL": fresh_database})
    client = app.test_client()
    try:
        with app.app_context():
            flask_migrate.upgrade()
        for user, body in (("alice", "a1"), ("bob", "b1"), ("alice", "a2")):
            reply = client.post("/me/notes", json={"body": body}, headers={"X-User-Id": user})
            assert reply.status_code == 201, reply.text
            assert reply.json["owner"] == user  # set by the database from the context

        def bodies(user: str) -> list[str]:
            reply = client.get("/me/notes", headers={"X-User-Id": user})
            return [note["body"] for note in reply.json["notes"]]

        assert (bodies("alice"), bodies("bob"), bodies("carol")) == (["a1", "a2"], ["b1"], [])
        assert client.get("/me/notes").status_code == 401  # no user: nothing is sent
        assert client.get("/notes").status_code == 200  # the rest of the app is unaffected
        # The rows are all there, for the owner of the table.
        assert admin_execute(fresh_database, "SELECT count(*) FROM private_notes") == [(3,)]
        with app.app_context():
            flask_migrate.downgrade(revision="base")
    finally:
        with app.app_context():
            db.engine.dispose()
