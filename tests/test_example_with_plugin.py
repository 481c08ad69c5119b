"""The example app's tests written the way a user writes theirs: with flask_neon.testing.

Each test runs in a transaction that is rolled back at the end, so the tests can commit
freely and still start from an empty table."""

from __future__ import annotations

import pathlib
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import orm

from example_app import MIGRATIONS_DIR, create_app
from example_app.models import Note
from flask_neon import NPlusOneError


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


def test_each_request_runs_under_its_own_database_context(
    neon_client: FlaskClient, neon_db_session: orm.Session
) -> None:
    # The requests and the test's session share the test's one transaction: each statement
    # still runs with its own settings and role (row-level security), never another's.
    for user, body in (("alice", "a1"), ("bob", "b1"), ("alice", "a2")):
        reply = neon_client.post("/me/notes", json={"body": body}, headers={"X-User-Id": user})
        assert reply.status_code == 201, reply.text

    def bodies(user: str) -> list[str]:
        notes = neon_client.get("/me/notes", headers={"X-User-Id": user}).json
        assert notes is not None
        return [note["body"] for note in notes["notes"]]

    assert (bodies("alice"), bodies("bob"), bodies("carol")) == (["a1", "a2"], ["b1"], [])
    # The test's own session runs without a context, as the login role: it sees every row.
    owners = neon_db_session.scalars(sa.text("SELECT owner FROM private_notes ORDER BY id"))
    assert list(owners) == ["alice", "bob", "alice"]
    assert neon_db_session.scalar(sa.text("SELECT current_setting('app.user_id', true)")) in (
        None,
        "",
    )
    assert bodies("bob") == ["b1"]  # and the next request is bob again


def tag_notes(client: FlaskClient) -> None:
    ids = [client.post("/notes", json={"title": f"n{i}"}).json["id"] for i in range(3)]  # type: ignore[index]
    for number in range(4):
        reply = client.post("/tags", json={"name": f"t{number}", "notes": ids[: number % 3 + 1]})
        assert reply.status_code == 201


@pytest.mark.no_nplusone
def test_the_tag_listing_has_no_n_plus_one(neon_client: FlaskClient) -> None:
    tag_notes(neon_client)
    assert len(neon_client.get("/tags").json["tags"]) == 4  # type: ignore[index]


@pytest.mark.no_nplusone
def test_the_marker_fails_an_n_plus_one(neon_client: FlaskClient) -> None:
    tag_notes(neon_client)
    with pytest.raises(NPlusOneError, match=r"3 lazy loads of Tag\.notes"):
        neon_client.get("/tags/naive")


def test_the_tag_listing_costs_two_round_trips(
    neon_client: FlaskClient, db_round_trips: t.Any
) -> None:
    tag_notes(neon_client)
    with db_round_trips(max=2):
        neon_client.get("/tags")
    too_many = "5 round trips to the database, more than 2"
    with pytest.raises(AssertionError, match=too_many), db_round_trips(max=2):
        neon_client.get("/tags/naive")
