"""The differential suite: every case of :mod:`tests.parity` on psycopg2's own connection and on
the fast-BEGIN connection, against the same real PostgreSQL; the outcomes must be identical.

The same cases run a second time through PgBouncer in transaction mode with the per-transaction
limits on, where the limits travel with ``BEGIN``.

What fast BEGIN cannot make identical, and docs/fast-begin.md documents, is asserted as documented
(:func:`test_first_statement_time_and_text_differ_as_documented`), so that a change is noticed.
"""

from __future__ import annotations

import functools
import typing as t
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_neon import NeonDB

from . import parity
from .conftest import admin_execute
from .servers import PgBouncer, pgbouncer_fixture  # noqa: F401 - fixture used by name

# Session state that PgBouncer in transaction mode does not keep from one transaction to the
# next: through it these cases are nondeterministic on either connection. The first-statement
# cases that need it are in parity.SESSION_STATE, with the reason.
SESSION_STATE_CASES = {"listen_notify", "client_encoding_change_inside", "two_phase"}


class World(t.NamedTuple):
    """The same database reached through psycopg2's own connection and through ours."""

    url: str
    plain: sa.Engine
    fast: sa.Engine


def engine_of(url: str, **config: t.Any) -> tuple[sa.Engine, Flask]:
    app = Flask(f"parity_{uuid.uuid4().hex[:8]}")
    app.config.update({"DB_URL": url, **config})
    db = NeonDB(env_file=None)
    db.init_app(app)
    with app.app_context():
        return db.engine, app


def first_query(engine: sa.Engine) -> bytes:
    """What psycopg2 sent for a transaction's first statement."""
    with engine.connect() as connection:
        return t.cast(bytes, connection.exec_driver_sql("SELECT 1").cursor.query)


def _like(url: str, fast_begin: bool, config: dict[str, t.Any], **more: t.Any) -> sa.Engine:
    return engine_of(url, DB_FAST_BEGIN=fast_begin, **{**config, **more})[0]


def make_world(admin_url: str, url: str, *, fast_expected: bool = True, **config: t.Any) -> World:
    plain, _ = engine_of(url, DB_FAST_BEGIN=False, **config)
    fast, _ = engine_of(url, DB_FAST_BEGIN=True, **config)
    # Cases that need another engine of the same kind (a pool of one, startup options).
    parity.ENGINE_FACTORIES[plain] = functools.partial(_like, url, False, config)
    parity.ENGINE_FACTORIES[fast] = functools.partial(_like, url, True, config)
    # Without this the comparison would be between two psycopg2 BEGINs (unless a tool's
    # cursor class is in the way: then fast BEGIN steps aside, which is what is tested).
    query = first_query(fast)
    assert query.startswith(b"BEGIN;") is fast_expected, query
    if fast_expected:
        # BEGIN, the limits and context, a newline, then the statement as written.
        assert query.endswith(b"\nSELECT 1"), query
    assert first_query(plain) == b"SELECT 1"
    return World(admin_url, plain, fast)


@pytest.fixture(scope="module", name="parity_database")
def parity_database_fixture(database_url: str) -> Iterator[str]:
    name = f"parity_{uuid.uuid4().hex[:8]}"
    admin_execute(database_url, f'CREATE DATABASE "{name}"')
    url = sa.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        admin_execute(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def direct(parity_database: str) -> Iterator[World]:
    world = make_world(parity_database, parity_database)
    yield world
    world.plain.dispose()
    world.fast.dispose()


@pytest.fixture(scope="module")
def pooled(parity_database: str, pgbouncer: PgBouncer) -> Iterator[World]:
    url = pgbouncer.url_for(sa.make_url(parity_database).database or "")
    world = make_world(
        parity_database,
        url,
        DB_SESSION_LIMITS="transaction",
        DB_STATEMENT_TIMEOUT=7,
    )
    yield world
    world.plain.dispose()
    world.fast.dispose()


def two_phase_available(url: str) -> bool:
    return int(admin_execute(url, "SHOW max_prepared_transactions")[0][0]) > 0


def compare(case: parity.Case, world: World) -> None:
    if "two_phase" in case.__name__ and not two_phase_available(world.url):
        pytest.skip("the server has max_prepared_transactions = 0")
    expected = parity.outcome(case, world.plain, world.url)
    actual = parity.outcome(case, world.fast, world.url)
    assert actual == expected


CASE_IDS = [case.__name__ for case in parity.CASES]


@pytest.mark.parametrize("case", parity.CASES, ids=CASE_IDS)
def test_same_outcome_as_psycopg2(case: parity.Case, direct: World) -> None:
    compare(case, direct)


@pytest.mark.parametrize("case", parity.CASES, ids=CASE_IDS)
def test_same_outcome_through_pgbouncer(case: parity.Case, pooled: World) -> None:
    if case.__name__ in parity.SESSION_STATE:
        pytest.skip(
            f"needs {parity.SESSION_STATE[case.__name__]}: PgBouncer in transaction mode "
            "does not keep it"
        )
    if any(name in case.__name__ for name in SESSION_STATE_CASES):
        pytest.skip("session state that PgBouncer in transaction mode does not keep")
    compare(case, pooled)


def test_the_suite_is_large_enough() -> None:
    # The issue asks for at least 60 cases over psycopg2's surface and SQLAlchemy's paths.
    assert len(parity.CASES) >= 60
    assert len(set(CASE_IDS)) == len(CASE_IDS)
    # A family of first-statement cases for each difference a review found (items 4 to 11 but
    # 8, which is documented and asserted below).
    for item in (4, 5, 6, 7, 9, 10, 11):
        assert sum(case.__name__.startswith(f"item{item}_") for case in parity.FIRST) >= 3, item


# -- what remains different, as documented ------------------------------------------------------

TIME_AND_TEXT = (
    "SELECT now() = statement_timestamp(), now() <= statement_timestamp(), current_query(), "
    "(SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid())"
)


def time_and_text(engine: sa.Engine) -> list[tuple[t.Any, ...]]:
    """What the first and the second statement of a transaction say of its start and text."""
    with engine.connect() as connection:
        rows = [
            tuple(connection.exec_driver_sql(TIME_AND_TEXT).one()),
            tuple(connection.exec_driver_sql(TIME_AND_TEXT).one()),
        ]
        connection.rollback()
    return rows


@pytest.mark.parametrize("route", ["direct", "pooled"])
def test_first_statement_time_and_text_differ_as_documented(
    route: str, request: pytest.FixtureRequest
) -> None:
    """One message cannot have two start times, nor two texts: docs/fast-begin.md says so.

    With fast BEGIN the transaction starts with its first statement (``now()`` equals
    ``statement_timestamp()``), and the server's record of the query text -- ``current_query()``,
    ``pg_stat_activity.query`` -- is the whole message: ``BEGIN;`` ... then the statement.
    With psycopg2's own BEGIN only this is certain: the transaction began no later than the
    statement, and the text is the statement's.
    """
    world: World = request.getfixturevalue(route)
    (equal, ordered, text, activity), second = time_and_text(world.fast)
    assert equal is True
    assert ordered is True
    assert text.startswith("BEGIN;"), text
    assert text.endswith(f"\n{TIME_AND_TEXT}"), text
    assert activity == text
    # The transaction's next statements are the application's alone. (Not pg_stat_activity's
    # record of them: it is read once per transaction, and then kept.)
    assert second[2] == TIME_AND_TEXT
    (_, ordered, text, activity), second = time_and_text(world.plain)
    assert ordered is True
    assert text == activity == TIME_AND_TEXT
    assert second[2] == TIME_AND_TEXT


def schema(url: str) -> list[t.Any]:
    """Tables, columns, constraints and the migration revision of a database."""
    return [
        admin_execute(
            url,
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = 'public' "
            "ORDER BY table_name, column_name",
        ),
        admin_execute(
            url,
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2",
        ),
        admin_execute(url, "SELECT to_regclass('alembic_version') IS NOT NULL"),
    ]


def test_flask_migrate_upgrade_and_downgrade(database_url: str) -> None:
    import flask_migrate

    from example_app import create_app
    from example_app.extensions import db as example_db

    results = []
    for fast in (False, True):
        name = f"parity_migrate_{uuid.uuid4().hex[:8]}"
        admin_execute(database_url, f'CREATE DATABASE "{name}"')
        url = sa.make_url(database_url).set(database=name).render_as_string(hide_password=False)
        app = create_app({"TESTING": True, "DB_URL": url, "DB_FAST_BEGIN": fast})
        try:
            with app.app_context():
                flask_migrate.upgrade()
                upgraded = schema(url)
                revision = admin_execute(url, "SELECT version_num FROM alembic_version")
                flask_migrate.downgrade(revision="base")
                results.append((upgraded, revision, schema(url)))
        finally:
            example_db.get_engine(app).dispose()
            admin_execute(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert results[0] == results[1]
    assert results[0][1]  # a revision was applied
