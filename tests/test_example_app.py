"""The example app end to end, on a fresh database built by its committed migrations.

Nothing is mocked: every request runs against a real PostgreSQL, and what a test expects to
be stored (or not) is read back from the database through a separate connection.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import pathlib
import shutil
import tempfile
import typing as t
from collections.abc import Iterator

import flask_migrate  # type: ignore[import-untyped]
import pytest
from flask import Flask
from flask.testing import FlaskClient

from example_app import create_app
from example_app.devdb import DATABASE, database_url_configured, running_port, use_local_database
from example_app.extensions import db
from example_app.models import Note
from flask_neon._url import parse_url
from flask_neon.testing import round_trips

from .conftest import admin_execute

JSON = dict[str, t.Any]


@pytest.fixture
def app(fresh_database: str) -> Iterator[Flask]:
    """The example app on a fresh database, migrated to head by its committed migrations."""
    app = create_app({"TESTING": True, "DB_URL": fresh_database})
    with app.app_context():
        flask_migrate.upgrade()
    yield app
    db.get_engine(app).dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def url(app: Flask) -> str:
    """The app's database URL, for reading back rows outside the app."""
    return str(app.config["DB_URL"])


def stored(url: str) -> list[tuple[t.Any, ...]]:
    """Every stored note as ``(id, title, body, done)``, read through a separate connection."""
    return admin_execute(url, "SELECT id, title, body, done FROM notes ORDER BY id")


def create(client: FlaskClient, **fields: t.Any) -> JSON:
    response = client.post("/notes", json=fields)
    assert response.status_code == 201, response.json
    note: JSON = response.get_json()
    return note


# -- CRUD ----------------------------------------------------------------------------------------


def test_crud_round_trip(client: FlaskClient, url: str) -> None:
    response = client.post("/notes", json={"title": "  Buy milk  ", "body": "2 litres"})
    assert response.status_code == 201
    note = response.json
    assert note is not None
    assert response.headers["Location"] == f"/notes/{note['id']}"
    # The title is stored trimmed; done and the timestamps come from the defaults.
    assert note["title"] == "Buy milk"
    assert note["body"] == "2 litres"
    assert note["done"] is False
    created = dt.datetime.fromisoformat(note["created_at"])
    assert created.tzinfo is not None
    assert note["updated_at"] == note["created_at"]
    assert stored(url) == [(note["id"], "Buy milk", "2 litres", False)]

    fetched = client.get(response.headers["Location"])
    assert fetched.status_code == 200
    assert fetched.json == note

    patched = client.patch(f"/notes/{note['id']}", json={"done": True})
    assert patched.status_code == 200
    assert patched.json is not None
    assert patched.json["done"] is True
    assert patched.json["title"] == "Buy milk"
    assert patched.json["created_at"] == note["created_at"]
    # now() is the time the updating transaction began, later than the inserting one.
    assert dt.datetime.fromisoformat(patched.json["updated_at"]) > created
    assert stored(url) == [(note["id"], "Buy milk", "2 litres", True)]

    deleted = client.delete(f"/notes/{note['id']}")
    assert deleted.status_code == 204
    assert deleted.data == b""
    assert stored(url) == []
    assert client.get(f"/notes/{note['id']}").status_code == 404
    assert client.delete(f"/notes/{note['id']}").status_code == 404


def test_create_with_all_fields_and_boundary_title(client: FlaskClient, url: str) -> None:
    note = create(client, title="x" * 200, body="", done=True)
    assert note["title"] == "x" * 200
    assert stored(url) == [(note["id"], "x" * 200, "", True)]


def test_patch_changes_only_the_fields_sent(client: FlaskClient, url: str) -> None:
    note = create(client, title="Draft", body="keep me")
    response = client.patch(f"/notes/{note['id']}", json={"title": "Final"})
    assert response.status_code == 200
    assert stored(url) == [(note["id"], "Final", "keep me", False)]
    # An empty patch is valid and changes nothing.
    response = client.patch(f"/notes/{note['id']}", json={})
    assert response.status_code == 200
    assert response.json is not None
    assert response.json["title"] == "Final"
    assert stored(url) == [(note["id"], "Final", "keep me", False)]


def test_unicode_round_trip(client: FlaskClient, url: str) -> None:
    # 200 characters, but 800 bytes in UTF-8: the limit counts characters, as PostgreSQL does.
    title = "😀" * 200
    note = create(client, title=title, body="café")
    assert client.get(f"/notes/{note['id']}").json == note
    assert stored(url) == [(note["id"], title, "café", False)]


# -- listing ---------------------------------------------------------------------------------


def test_list_pagination(client: FlaskClient) -> None:
    ids = [create(client, title=f"note {n}")["id"] for n in range(25)]

    first = client.get("/notes")
    assert first.status_code == 200
    page = first.json
    assert page is not None
    assert (page["limit"], page["offset"], page["total"]) == (20, 0, 25)
    assert [note["id"] for note in page["notes"]] == ids[:20]
    assert page["notes"][0]["title"] == "note 0"

    last = client.get("/notes?limit=10&offset=20").json
    assert last is not None
    assert [note["id"] for note in last["notes"]] == ids[20:]
    assert (last["limit"], last["offset"], last["total"]) == (10, 20, 25)

    middle = client.get("/notes?limit=3&offset=5").json
    assert middle is not None
    assert [note["id"] for note in middle["notes"]] == ids[5:8]

    everything = client.get("/notes?limit=100").json
    assert everything is not None
    assert len(everything["notes"]) == 25

    beyond = client.get("/notes?offset=25").json
    assert beyond is not None
    assert beyond["notes"] == []
    assert beyond["total"] == 25


def test_list_orders_by_id_not_by_update(client: FlaskClient) -> None:
    first = create(client, title="first")
    second = create(client, title="second")
    client.patch(f"/notes/{first['id']}", json={"done": True})
    listed = client.get("/notes").json
    assert listed is not None
    assert [note["id"] for note in listed["notes"]] == [first["id"], second["id"]]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("limit=", "limit"),
        ("limit=1.5", "limit"),
        ("limit=+5", "limit"),
        ("limit=%205", "limit"),
        ("limit=%D9%A5", "limit"),  # ARABIC-INDIC DIGIT FIVE, which int() would accept
        ("offset=-1", "offset"),
        ("offset=x", "offset"),
        ("offset=99999999999999999999", "offset"),
        ("limit=5&offset=1e3", "offset"),
    ],
)
def test_list_rejects_bad_paging(client: FlaskClient, query: str, field: str) -> None:
    response = client.get(f"/notes?{query}")
    assert response.status_code == 400
    assert response.json is not None
    assert response.json["field"] == field
    assert field in response.json["error"]


# -- validation ------------------------------------------------------------------------------

# (request keyword arguments, the field named in the answer); None: the body as a whole.
BAD_CREATES: list[tuple[dict[str, t.Any], str | None]] = [
    ({"data": "title=x", "content_type": "application/x-www-form-urlencoded"}, None),
    ({"data": "title=x"}, None),
    ({"data": '{"title": ', "content_type": "application/json"}, None),
    ({"json": ["title"]}, None),
    ({"json": "title"}, None),
    ({"json": None}, None),
    ({"json": {}}, "title"),
    ({"json": {"body": "no title"}}, "title"),
    ({"json": {"title": 5}}, "title"),
    ({"json": {"title": None}}, "title"),
    ({"json": {"title": ["a"]}}, "title"),
    ({"json": {"title": ""}}, "title"),
    ({"json": {"title": " \t\n "}}, "title"),
    ({"json": {"title": "x" * 201}}, "title"),
    ({"json": {"title": "nul\x00byte"}}, "title"),
    ({"json": {"title": "a", "done": "yes"}}, "done"),
    ({"json": {"title": "a", "done": 1}}, "done"),
    ({"json": {"title": "a", "done": None}}, "done"),
    ({"json": {"title": "a", "body": 5}}, "body"),
    ({"json": {"title": "a", "body": None}}, "body"),
    ({"json": {"title": "a", "body": "nul\x00"}}, "body"),
    ({"json": {"title": "a", "colour": "red"}}, "colour"),
    ({"json": {"title": "a", "id": 7}}, "id"),
    ({"json": {"title": "a", "created_at": "2020-01-01"}}, "created_at"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_CREATES)
def test_create_rejects_bad_input(
    client: FlaskClient, url: str, kwargs: dict[str, t.Any], field: str | None
) -> None:
    response = client.post("/notes", **kwargs)
    assert response.status_code == 400
    assert response.mimetype == "application/json"
    assert response.json is not None
    assert response.json["field"] == field
    assert isinstance(response.json["error"], str)
    assert response.json["error"]
    assert stored(url) == []


BAD_PATCHES: list[tuple[dict[str, t.Any], str | None]] = [
    ({"data": "done=true"}, None),
    ({"data": "{", "content_type": "application/json"}, None),
    ({"json": [1]}, None),
    ({"json": {"title": ""}}, "title"),
    ({"json": {"title": "   "}}, "title"),
    ({"json": {"title": None}}, "title"),
    ({"json": {"title": "y" * 201}}, "title"),
    ({"json": {"done": "true"}}, "done"),
    ({"json": {"done": 0}}, "done"),
    ({"json": {"body": False}}, "body"),
    ({"json": {"done": True, "priority": 1}}, "priority"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_PATCHES)
def test_patch_rejects_bad_input(
    client: FlaskClient, url: str, kwargs: dict[str, t.Any], field: str | None
) -> None:
    note = create(client, title="unchanged", body="b")
    response = client.patch(f"/notes/{note['id']}", **kwargs)
    assert response.status_code == 400
    assert response.json is not None
    assert response.json["field"] == field
    # A rejected patch changes nothing, not even the valid fields sent along.
    assert stored(url) == [(note["id"], "unchanged", "b", False)]


def test_error_messages_say_what_is_wrong(client: FlaskClient) -> None:
    answers = {
        "missing": client.post("/notes", json={}).json,
        "long": client.post("/notes", json={"title": "x" * 201}).json,
        "unknown": client.post("/notes", json={"title": "a", "colour": "red"}).json,
        "not json": client.post("/notes", data="x").json,
    }
    assert answers["missing"] == {"error": "title is required", "field": "title"}
    assert answers["long"] == {"error": "title must be at most 200 characters", "field": "title"}
    assert answers["unknown"] == {
        "error": "unknown field 'colour' (allowed: body, done, title)",
        "field": "colour",
    }
    assert answers["not json"] is not None
    assert "Content-Type: application/json" in answers["not json"]["error"]


# -- HTTP errors ---------------------------------------------------------------------------------


def test_missing_note_is_404_json(client: FlaskClient) -> None:
    for response in (
        client.get("/notes/999"),
        client.patch("/notes/999", json={"done": True}),
        client.delete("/notes/999"),
    ):
        assert response.status_code == 404
        assert response.mimetype == "application/json"
        assert response.json == {"error": "note 999 not found"}


def test_unknown_url_is_404_json(client: FlaskClient) -> None:
    response = client.get("/nothing/here")
    assert response.status_code == 404
    assert response.mimetype == "application/json"
    assert response.json is not None
    assert "not found" in response.json["error"].lower()
    # <int:...> does not match a non-integer id.
    assert client.get("/notes/abc").status_code == 404


def test_wrong_method_is_405_json_with_allow(client: FlaskClient) -> None:
    response = client.put("/notes/1", json={"title": "a"})
    assert response.status_code == 405
    assert response.mimetype == "application/json"
    assert response.json is not None
    assert "not allowed" in response.json["error"]
    assert {"GET", "PATCH", "DELETE"} <= set(response.headers["Allow"].split(", "))
    assert "PUT" not in response.headers["Allow"]
    assert client.delete("/notes").status_code == 405


def test_failed_view_commits_nothing(app: Flask, client: FlaskClient, url: str) -> None:
    @app.post("/explode")
    def explode() -> t.NoReturn:
        # The row reaches the server inside the request's transaction, then the view fails
        # before committing: flask-neon's teardown must roll it back.
        db.session.add(Note(title="never stored"))
        db.session.flush()
        raise RuntimeError("view failed after a flush")

    with pytest.raises(RuntimeError, match="view failed"):
        client.post("/explode")
    assert stored(url) == []

    # Without propagation (as in production) the failure is a JSON 500, still uncommitted.
    app.config["PROPAGATE_EXCEPTIONS"] = False
    response = client.post("/explode")
    assert response.status_code == 500
    assert response.mimetype == "application/json"
    assert response.json is not None
    assert "error" in response.json
    assert stored(url) == []

    # The failed requests left no broken session or transaction behind.
    note = create(client, title="after the failure")
    assert stored(url) == [(note["id"], "after the failure", "", False)]


# -- the local development database ------------------------------------------------------------


def test_testing_app_without_db_url_fails_instead_of_starting_a_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.delenv("DB_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    with pytest.raises(ValueError, match="DB_URL is not set"):
        create_app({"TESTING": True})
    assert not list(tmp_path.iterdir())


def test_database_url_configured_looks_where_flask_neon_looks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.delenv("DB_URL", raising=False)
    env_file = tmp_path / ".env"
    assert not database_url_configured({}, env_file)
    assert not database_url_configured({"DB_URL": "  "}, None)
    assert database_url_configured({"DB_URL": "postgresql://h/d"}, env_file)

    env_file.write_text("DB_POOL_SIZE=3\n")
    assert not database_url_configured({}, env_file)
    env_file.write_text("DB_URL=postgresql://h/d\n")
    assert database_url_configured({}, env_file)
    assert not database_url_configured({}, None)

    monkeypatch.setenv("DB_URL", "postgresql://h/d")
    assert database_url_configured({}, None)


@pytest.fixture
def reachable_dir() -> Iterator[pathlib.Path]:
    """A directory the server's OS user can enter (as root, pytest's tmp_path is 0700)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="fnpg-app-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_running_port_ignores_stale_and_foreign_pid_files(
    database_url: str, reachable_dir: pathlib.Path
) -> None:
    data_dir = reachable_dir / "pgdata"
    data_dir.mkdir()
    assert running_port(data_dir) is None

    # A server is listening on this port, but its data directory is another one.
    port = parse_url(database_url).port
    assert port is not None
    pid_lines = ["12345", str(data_dir), "1700000000", str(port), "/tmp", "127.0.0.1"]
    (data_dir / "postmaster.pid").write_text("\n".join(pid_lines) + "\n")
    assert running_port(data_dir) is None

    # A crashed server's file: nothing listens on the port any more.
    pid_lines[3] = "1"
    (data_dir / "postmaster.pid").write_text("\n".join(pid_lines) + "\n")
    assert running_port(data_dir) is None

    (data_dir / "postmaster.pid").write_text("garbage")
    assert running_port(data_dir) is None


@pytest.mark.slow
def test_local_database_is_started_once_then_reused(
    reachable_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    instance = str(reachable_dir / "instance")
    first = Flask("example_app", instance_path=instance)
    with caplog.at_level(logging.WARNING, logger=first.logger.name):
        cluster = use_local_database(first)
    assert cluster is not None
    try:
        data_dir = reachable_dir / "instance" / "pgdata"
        assert cluster.data_dir == data_dir
        # No driver in the URL: the app's DB_DRIVER picks it.
        assert first.config["DB_URL"] == cluster.url_for(DATABASE, driver=None)
        assert first.config["DB_URL"].startswith("postgresql://")
        assert "started a local PostgreSQL" in caplog.text
        assert "rm -rf" in caplog.text  # how to remove the kept data
        assert str(data_dir) in caplog.text
        assert running_port(data_dir) == cluster.port

        # A second app (the reloader's child, another command) reuses the running server.
        caplog.clear()
        second = Flask("example_app", instance_path=instance)
        with caplog.at_level(logging.WARNING, logger=second.logger.name):
            assert use_local_database(second) is None
        assert second.config["DB_URL"] == first.config["DB_URL"]
        assert "already running" in caplog.text

        # The database the URL names exists and flask-neon can use it.
        assert admin_execute(second.config["DB_URL"], "SELECT current_database()") == [(DATABASE,)]
    finally:
        cluster.stop()
    assert running_port(data_dir) is None
    # Only the server stopped: the data stays for the next run.
    assert (data_dir / "PG_VERSION").exists()
    assert not (data_dir / "postmaster.pid").exists()
    assert os.listdir(reachable_dir / "instance")


# -- tags: a listing done right, and the N+1 flask-neon reports --------------------------------


def tag_notes(client: FlaskClient, tags: int = 4) -> None:
    notes = [create(client, title=f"note {number}")["id"] for number in range(3)]
    for number in range(tags):
        reply = client.post(
            "/tags", json={"name": f"tag {number}", "notes": notes[: number % 3 + 1]}
        )
        assert reply.status_code == 201, reply.json


@pytest.fixture
def development_app(fresh_database: str) -> Iterator[Flask]:
    """The example app in the development profile (N+1 detection warns), migrated."""
    app = create_app({"TESTING": True, "DB_URL": fresh_database, "DB_PROFILE": "development"})
    with app.app_context():
        flask_migrate.upgrade()
    # Flask-Migrate's env.py (logging.config.fileConfig) disables the loggers it does not name,
    # flask-neon's among them, in the process that ran the migration.
    logging.getLogger("flask_neon").disabled = False
    yield app
    db.get_engine(app).dispose()


def test_tags_list_their_notes_in_two_round_trips_and_the_naive_listing_is_reported(
    development_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    client = development_app.test_client()
    tag_notes(client)
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="flask_neon")
    with round_trips(max=2) as listing:
        right = client.get("/tags").json
    assert len(listing.statements) == 2  # the tags, then all their notes
    assert [record.getMessage() for record in caplog.records] == []
    with round_trips() as naive:
        assert client.get("/tags/naive").json == right
        client.get("/tags/naive")
    assert len(naive.statements) == 2 * (1 + 4)  # the tags, then each tag's notes
    (warning,) = [record.getMessage() for record in caplog.records]  # once per endpoint
    assert "N+1 in GET tags.list_tags_naively: 4 lazy loads of Tag.notes" in warning
    assert "example_app/models.py" in warning  # Tag.to_dict reads them
    assert ".options(selectinload(Tag.notes))" in warning
