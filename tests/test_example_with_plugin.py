"""The example app's tests written the way a user writes theirs: with flask_neon.testing.

Each test runs in a transaction that is rolled back at the end, so the tests can commit
freely and still start from an empty table."""

from __future__ import annotations

import pathlib

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import orm

from example_app import MIGRATIONS_DIR, create_app
from example_app.models import Note


@pytest.fixture(scope="session")
def neon_app(neon_database_url: str) -> Flask:
    return create_app({"TESTING": True, "DB_URL": neon_database_url})


@pytest.fixture(scope="session")
def neon_migrations_dir() -> pathlib.Path:
    return MIGRATIONS_DIR


def count_notes(session: orm.Session) -> int:
    return int(session.scalar(sa.select(sa.func.count()).select_from(Note)) or 0)


def test_create_commits_inside_the_test(
    neon_client: FlaskClient, neon_db_session: orm.Session
) -> None:
    response = neon_client.post("/notes", json={"title": "Buy milk"})
    assert response.status_code == 201
    assert neon_client.get(response.headers["Location"]).json["title"] == "Buy milk"  # type: ignore[index]
    assert count_notes(neon_db_session) == 1


def test_the_next_test_starts_empty(neon_db_session: orm.Session) -> None:
    assert count_notes(neon_db_session) == 0


def test_arranged_rows_are_visible_to_requests(
    neon_client: FlaskClient, neon_db_session: orm.Session
) -> None:
    neon_db_session.add(Note(title="arranged"))
    neon_db_session.flush()
    listed = neon_client.get("/notes").json
    assert listed is not None
    assert [note["title"] for note in listed["notes"]] == ["arranged"]


def test_a_rejected_request_changes_nothing(
    neon_client: FlaskClient, neon_db_session: orm.Session
) -> None:
    assert neon_client.post("/notes", json={"title": ""}).status_code == 400
    assert count_notes(neon_db_session) == 0
