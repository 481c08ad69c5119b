"""The pytest plugin ``flask_neon.testing``, run on generated test projects with ``pytester``.

Each project is a tiny app with a model and views that commit, run by a separate pytest process
with ``-p flask_neon.testing``, on a fresh database of this suite given as
``FLASK_NEON_TEST_URL``. The outcomes, the output and what the database holds afterwards show
what the plugin promises.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import textwrap

import psycopg2  # type: ignore[import-untyped]
import pytest

import flask_neon.testing

from .conftest import admin_execute, closed_port

# The pytester fixture comes from pytest's own "pytester" plugin, which is off by default.
pytest_plugins = ["pytester"]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

APP = """
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import Mapped, mapped_column

from flask_neon import NeonDB

db = NeonDB(env_file=None)


class Item(db.Model):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(40), unique=True)


def create_app(url):
    app = Flask("itemsapp")
    app.config.update(TESTING=True, DB_URL=url)
    db.init_app(app)

    @app.post("/items/<name>")
    def add(name):
        # A read through the read session, then a write: both in one request.
        if db.read_session.scalar(sa.select(Item.id).where(Item.name == name)) is not None:
            return {"error": "exists"}, 409
        db.session.add(Item(name=name))
        db.session.commit()
        return {"name": name}, 201

    @app.post("/items/<name>/insert")
    def insert(name):
        # No check first: a duplicate name violates the unique constraint in the database.
        db.session.add(Item(name=name))
        db.session.commit()
        return {"name": name}, 201

    @app.post("/items/<name>/then-fail")
    def add_then_fail(name):
        db.session.add(Item(name=name))
        db.session.flush()
        raise RuntimeError("the view failed after writing")

    @app.get("/items")
    def count():
        return {"count": db.read_session.scalar(sa.select(sa.func.count(Item.id)))}

    return app
"""

CONFTEST = """
import pytest

from itemsapp import create_app


@pytest.fixture(scope="session")
def neon_app(neon_database_url):
    return create_app(neon_database_url)
"""

COUNT = "sa.select(sa.func.count(Item.id))"


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run pytest on the project in a new process, with the plugin and warnings as errors."""
    return pytester.runpytest_subprocess(
        "-p", "flask_neon.testing", "-p", "no:cacheprovider", "-W", "error", *args
    )


def output(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines + result.errlines)


@pytest.fixture
def project(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, fresh_database: str
) -> pytest.Pytester:
    """A project with the items app, its conftest, and ``FLASK_NEON_TEST_URL`` set."""
    monkeypatch.setenv("FLASK_NEON_TEST_URL", fresh_database)
    # Installed plugins stay out of the inner runs, so -p is the one way the plugin loads
    # (an entry point naming it differently would register the module a second time).
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    # example_app is not installed; the inner runs import it from the checkout.
    pythonpath = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, pythonpath)))
    pytester.makepyfile(itemsapp=APP)
    pytester.makeconftest(CONFTEST)
    return pytester


def tables(url: str) -> set[str]:
    rows = admin_execute(
        url, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    return {row[0] for row in rows}


# -- isolation -----------------------------------------------------------------------------------


def test_commits_in_requests_are_rolled_back_after_each_test(
    project: pytest.Pytester, fresh_database: str
) -> None:
    project.makepyfile(
        f"""
        import sqlalchemy as sa
        from itemsapp import Item

        def test_a_commits_through_requests(neon_client, neon_db_session):
            assert neon_client.post("/items/a").status_code == 201
            # A second request joins the same transaction and sees the first one's row.
            assert neon_client.post("/items/a").status_code == 409
            assert neon_client.post("/items/b").status_code == 201
            assert neon_client.get("/items").json == {{"count": 2}}
            assert neon_db_session.scalar({COUNT}) == 2

        def test_b_starts_empty(neon_client, neon_db_session):
            assert neon_client.get("/items").json == {{"count": 0}}
            assert neon_db_session.scalar({COUNT}) == 0

        def test_c_rows_added_by_the_test_reach_requests(neon_client, neon_db_session):
            neon_db_session.add(Item(name="from-test"))
            neon_db_session.commit()
            assert neon_client.post("/items/from-test").status_code == 409
            assert neon_client.get("/items").json == {{"count": 1}}

        def test_d_starts_empty_again(neon_transaction):
            rows = neon_transaction.connection.exec_driver_sql("SELECT count(*) FROM items")
            assert rows.scalar() == 0
        """
    )
    result = run(project)
    result.assert_outcomes(passed=4)
    # create_all() made the table for the session, and it is gone again.
    assert "items" not in tables(fresh_database)


def test_a_failing_test_is_rolled_back_too(project: pytest.Pytester, fresh_database: str) -> None:
    # A table that exists before the run is used as is and kept: the rows it holds afterwards
    # are what really reached the database.
    admin_execute(
        fresh_database, "CREATE TABLE items (id serial PRIMARY KEY, name varchar(40) UNIQUE)"
    )
    project.makepyfile(
        f"""
        import sqlalchemy as sa
        from itemsapp import Item

        def test_a_fails_after_committing(neon_client):
            assert neon_client.post("/items/a").status_code == 201
            assert neon_client.get("/items").json == {{"count": 1}}
            raise AssertionError("the test fails after its request committed")

        def test_b_sees_no_row(neon_client, neon_db_session):
            assert neon_client.get("/items").json == {{"count": 0}}
            assert neon_db_session.scalar({COUNT}) == 0
        """
    )
    result = run(project)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*AssertionError: the test fails after its request committed"])
    assert admin_execute(fresh_database, "SELECT count(*) FROM items") == [(0,)]


def test_a_view_that_raises_leaves_the_test_usable(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import pytest
        import sqlalchemy as sa
        from itemsapp import Item

        def test_errors_in_views(neon_client, neon_db_session):
            assert neon_client.post("/items/kept").status_code == 201
            # TESTING: the view's exception reaches the test; the request's teardown has
            # rolled its session back to its savepoint.
            with pytest.raises(RuntimeError, match="failed after writing"):
                neon_client.post("/items/lost/then-fail")
            # A database error aborts the request's savepoint, not the test's transaction.
            with pytest.raises(sa.exc.IntegrityError):
                neon_client.post("/items/kept/insert")
            assert neon_client.get("/items").json == {"count": 1}
            assert neon_db_session.scalars(sa.select(Item.name)).all() == ["kept"]
            neon_db_session.add(Item(name="more"))
            neon_db_session.commit()
            assert neon_client.post("/items/again").status_code == 201
            assert neon_client.get("/items").json == {"count": 3}

        def test_next_test_is_clean(neon_client):
            assert neon_client.get("/items").json == {"count": 0}
        """
    )
    run(project).assert_outcomes(passed=2)


def test_the_app_uses_its_engine_again_after_the_test(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        from itemsapp import db

        def test_during(neon_app, neon_transaction):
            with neon_app.app_context():
                assert db.session.get_bind() is neon_transaction.connection
                assert db.read_session is db.session

        def test_after(neon_app):
            with neon_app.app_context():
                assert db.session.get_bind() is db.engine
                assert db.read_session is not db.session
        """
    )
    run(project).assert_outcomes(passed=2)


# -- the schema from migrations ------------------------------------------------------------------


def test_migrations_build_the_schema(project: pytest.Pytester, fresh_database: str) -> None:
    project.makeconftest(
        """
        import logging

        import pytest

        from example_app import MIGRATIONS_DIR, create_app


        @pytest.fixture(scope="session")
        def neon_app(neon_database_url):
            return create_app({"TESTING": True, "DB_URL": neon_database_url})


        @pytest.fixture(scope="session")
        def neon_migrations_dir():
            return MIGRATIONS_DIR
        """
    )
    project.makepyfile(
        """
        import logging

        def test_a_creates_a_note(neon_client):
            response = neon_client.post("/notes", json={"title": "Buy milk"})
            assert response.status_code == 201
            assert neon_client.get("/notes").json["total"] == 1
            # Alembic's logging setup did not silence the app's loggers.
            assert not logging.getLogger("flask_neon").disabled

        def test_b_sees_no_note(neon_client):
            assert neon_client.get("/notes").json["total"] == 0
        """
    )
    run(project).assert_outcomes(passed=2)
    # The schema came from the migrations (create_all() makes no alembic_version) and stays.
    assert {"notes", "alembic_version"} <= tables(fresh_database)
    assert admin_execute(fresh_database, "SELECT count(*) FROM notes") == [(0,)]


# -- the documented example ----------------------------------------------------------------------


def literal_blocks(doc: str) -> list[str]:
    """The literal blocks (the indented text after ``::``) of a docstring, dedented."""
    blocks = []
    for part in doc.split("::\n")[1:]:
        lines = []
        for line in part.splitlines()[1:]:
            if line and not line.startswith("    "):
                break
            lines.append(line)
        blocks.append(textwrap.dedent("\n".join(lines)).strip() + "\n")
    return blocks


def test_the_documented_example_works_as_written(
    project: pytest.Pytester, fresh_database: str
) -> None:
    """The module docstring's conftest and tests (the README's), on the example app."""
    assert flask_neon.testing.__doc__ is not None
    conftest, tests = literal_blocks(flask_neon.testing.__doc__)[:2]
    # The example's "myapp" has the example app's API, and the migrations next to conftest.py.
    project.makeconftest(conftest.replace("myapp", "example_app"))
    project.makepyfile(tests.replace("myapp", "example_app"))
    shutil.copytree(REPO_ROOT / "example_app" / "migrations", project.path / "migrations")
    run(project).assert_outcomes(passed=2)
    assert "alembic_version" in tables(fresh_database)


# -- setup problems: one clear message -----------------------------------------------------------

DATABASE_TESTS = """
def test_one(neon_client):
    pass

def test_two(neon_db_session):
    pass
"""


def assert_one_clean_message(result: pytest.RunResult, message: str) -> str:
    text = output(result)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text
    assert text.count(message) == 1, text
    assert "Traceback" not in text, text
    assert "passed" not in text, text
    return text


def test_no_database_and_no_server_programs(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.delenv("FLASK_NEON_TEST_URL")
    empty = tmp_path / "no-postgres"
    empty.mkdir()
    monkeypatch.setenv("PG_BIN", str(empty))
    monkeypatch.setenv("PATH", str(empty))
    project.makepyfile(DATABASE_TESTS)
    text = assert_one_clean_message(run(project), "the tests need a PostgreSQL database")
    assert "Set FLASK_NEON_TEST_URL" in text
    assert "pip install 'flask-neon[local]'" in text
    assert f"PG_BIN is set to {str(empty)!r}" in text


def test_unreachable_test_url_is_named_without_its_password(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql://alice:s3cret-pw@127.0.0.1:{closed_port()}/app_test"
    monkeypatch.setenv("FLASK_NEON_TEST_URL", url)
    project.makepyfile(DATABASE_TESTS)
    text = assert_one_clean_message(run(project), "FLASK_NEON_TEST_URL is set to")
    assert "postgresql://alice:***@127.0.0.1" in text
    assert "s3cret-pw" not in text


def test_invalid_test_url(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASK_NEON_TEST_URL", "mysql://bob:hunter2@db/app")
    project.makepyfile(DATABASE_TESTS)
    text = assert_one_clean_message(run(project), "FLASK_NEON_TEST_URL must be a PostgreSQL URL")
    assert "hunter2" not in text


def test_missing_neon_app_fixture(project: pytest.Pytester) -> None:
    project.makeconftest("")
    project.makepyfile(DATABASE_TESTS)
    text = assert_one_clean_message(run(project), "define the fixture neon_app")
    assert "def neon_app(neon_database_url):" in text


def test_neon_app_without_flask_neon(project: pytest.Pytester) -> None:
    project.makeconftest(
        """
        import pytest
        from flask import Flask

        @pytest.fixture(scope="session")
        def neon_app(neon_database_url):
            return Flask("plain")
        """
    )
    project.makepyfile(DATABASE_TESTS)
    assert_one_clean_message(run(project), "flask-neon is not initialised on the app 'plain'")


def test_session_wide_app_context_is_refused(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="module")
        def context(neon_app):
            with neon_app.app_context():
                yield

        def test_in_context(context, neon_client):
            pass
        """
    )
    result = run(project)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*an app context of 'itemsapp' is already active*"])


# -- the throwaway server ------------------------------------------------------------------------


@pytest.mark.slow
def test_without_test_url_a_throwaway_server_is_started_and_stopped(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.delenv("FLASK_NEON_TEST_URL")
    record = tmp_path / "url.txt"
    project.makepyfile(
        f"""
        import pathlib

        def test_a(neon_database_url, neon_client):
            pathlib.Path({str(record)!r}).write_text(neon_database_url)
            assert neon_client.post("/items/a").status_code == 201

        def test_b(neon_client):
            assert neon_client.get("/items").json == {{"count": 0}}
        """
    )
    run(project).assert_outcomes(passed=2)
    url = record.read_text()
    assert url.endswith("/flask_neon_test")
    # The server is gone with the test session.
    with pytest.raises(psycopg2.OperationalError):
        admin_execute(url, "SELECT 1")
