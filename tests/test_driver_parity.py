"""The differential suite: every case of :mod:`tests.parity` with the driver's own transaction
handling (``DB_FAST_BEGIN=false``, the oracle) and with fast BEGIN, against the same real
PostgreSQL, for psycopg2 and for psycopg 3; the outcomes must be identical.

The same cases run a second time through PgBouncer in transaction mode with the per-transaction
limits on, where the limits travel with ``BEGIN``.

What fast BEGIN cannot make identical, and docs/fast-begin.md documents, is asserted as documented
(:func:`test_first_statement_time_and_text_differ_as_documented` on psycopg2, where they are the
same on psycopg 3; :func:`test_psycopg_autocommit_reads_true_in_a_fast_transaction`), so that a
change is noticed.
"""

from __future__ import annotations

import functools
import time
import typing as t
import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_neon import NeonDB
from flask_neon._drivers import psycopg as psycopg_driver

from . import parity
from .conftest import admin_execute
from .servers import PgBouncer, pgbouncer_fixture  # noqa: F401 - fixture used by name

DRIVERS = ("psycopg2", "psycopg")
# Session state that PgBouncer in transaction mode does not keep from one transaction to the
# next: through it these cases are nondeterministic on either connection. The first-statement
# cases that need it are in parity.SESSION_STATE, with the reason.
SESSION_STATE_CASES = {"listen_notify", "client_encoding_change_inside", "two_phase"}


class World(t.NamedTuple):
    """The same database reached through the driver's own transactions and through ours."""

    url: str
    plain: sa.Engine
    fast: sa.Engine
    driver: str = "psycopg2"


def with_driver(url: str, driver: str) -> str:
    """``url`` with the SQLAlchemy dialect of ``driver`` (``psycopg2`` or ``psycopg``)."""
    return (
        sa.make_url(url)
        .set(drivername=f"postgresql+{driver}")
        .render_as_string(hide_password=False)
    )


def engine_of(url: str, **config: t.Any) -> tuple[sa.Engine, Flask]:
    app = Flask(f"parity_{uuid.uuid4().hex[:8]}")
    app.config.update({"DB_URL": url, **config})
    db = NeonDB(env_file=None)
    db.init_app(app)
    with app.app_context():
        engine = db.engine
    if engine.dialect.driver == "psycopg":
        # psycopg 3 keeps no list of notices: a handler collects them from the connect on.
        sa.event.listen(engine, "connect", lambda dbapi, record: parity.watch_notices(dbapi))
    return engine, app


def first_query(engine: sa.Engine) -> bytes:
    """What psycopg2 sent for a transaction's first statement."""
    with engine.connect() as connection:
        return t.cast(bytes, connection.exec_driver_sql("SELECT 1").cursor.query)


def opened_fast(engine: sa.Engine) -> bool:
    """True when a transaction's first statement on ``engine`` carried its ``BEGIN``.

    psycopg2: the text it sent starts with ``BEGIN;``. psycopg 3: its connection is in the
    autocommit mode fast BEGIN switched it to while the transaction is open (psycopg would
    have sent BEGIN and waited otherwise).
    """
    if engine.dialect.driver == "psycopg2":
        return first_query(engine).startswith(b"BEGIN;")
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")
        raw = connection.connection.dbapi_connection
        fast = raw in psycopg_driver._switched and raw.autocommit
        assert raw.info.transaction_status == 2  # INTRANS
        connection.rollback()
        assert not raw.autocommit  # given back when the transaction ended
        return bool(fast)


def _like(url: str, fast_begin: bool, config: dict[str, t.Any], **more: t.Any) -> sa.Engine:
    return engine_of(url, DB_FAST_BEGIN=fast_begin, **{**config, **more})[0]


def make_world(
    admin_url: str,
    url: str,
    *,
    fast_expected: bool = True,
    driver: str = "psycopg2",
    **config: t.Any,
) -> World:
    url = with_driver(url, driver)
    if driver == "psycopg":
        # With an idle-in-transaction timeout in force fast BEGIN opens only a connection's
        # first transaction on psycopg 3 (docs/fast-begin.md; tested apart, below): the
        # comparison is made where it opens every one.
        config.setdefault("DB_IDLE_IN_TRANSACTION_TIMEOUT", 0)
    plain, _ = engine_of(url, DB_FAST_BEGIN=False, **config)
    fast, _ = engine_of(url, DB_FAST_BEGIN=True, **config)
    # Cases that need another engine of the same kind (a pool of one, startup options).
    parity.ENGINE_FACTORIES[plain] = functools.partial(_like, url, False, config)
    parity.ENGINE_FACTORIES[fast] = functools.partial(_like, url, True, config)
    # Without this the comparison would be between two of the driver's BEGINs (unless a tool's
    # cursor class is in the way: then fast BEGIN steps aside, which is what is tested).
    assert opened_fast(fast) is fast_expected
    assert not opened_fast(plain)
    if driver == "psycopg2" and fast_expected:
        # BEGIN, the limits and context, a newline, then the statement as written.
        query = first_query(fast)
        assert query.endswith(b"\nSELECT 1"), query
    if driver == "psycopg2":
        assert first_query(plain) == b"SELECT 1"
    return World(admin_url, plain, fast, driver)


@pytest.fixture(scope="module", name="parity_database")
def parity_database_fixture(database_url: str) -> Iterator[str]:
    name = f"parity_{uuid.uuid4().hex[:8]}"
    admin_execute(database_url, f'CREATE DATABASE "{name}"')
    url = sa.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        admin_execute(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


Worlds = Callable[[str], World]


def _worlds(make: Callable[[str], World]) -> Iterator[Worlds]:
    """A world per driver, made when a test first asks for it, disposed at the end."""
    made: dict[str, World] = {}

    def get(driver: str) -> World:
        if driver not in made:
            made[driver] = make(driver)
        return made[driver]

    yield get
    for world in made.values():
        world.plain.dispose()
        world.fast.dispose()


@pytest.fixture(scope="module")
def direct(parity_database: str) -> Iterator[Worlds]:
    yield from _worlds(lambda driver: make_world(parity_database, parity_database, driver=driver))


@pytest.fixture(scope="module")
def pooled(parity_database: str, pgbouncer: PgBouncer) -> Iterator[Worlds]:
    url = pgbouncer.url_for(sa.make_url(parity_database).database or "")
    yield from _worlds(
        lambda driver: make_world(
            parity_database,
            url,
            driver=driver,
            DB_SESSION_LIMITS="transaction",
            DB_STATEMENT_TIMEOUT=7,
        )
    )


def two_phase_available(url: str) -> bool:
    return int(admin_execute(url, "SHOW max_prepared_transactions")[0][0]) > 0


def compare(case: parity.Case, world: World) -> None:
    if "two_phase" in case.__name__ and not two_phase_available(world.url):
        pytest.skip("the server has max_prepared_transactions = 0")
    oracle = parity.Out(world.url)
    expected = parity.outcome(case, world.plain, world.url, oracle)
    actual = parity.outcome(case, world.fast, world.url)
    assert oracle.documented == 0
    if world.driver == "psycopg":
        actual, _ = parity.documented_connection_loss(expected, actual)
    assert actual == expected


CASES = [
    pytest.param(driver, case, id=f"{driver}-{case.__name__}")
    for driver in DRIVERS
    for case in parity.CASES_BY_DRIVER[driver]
]


def documented(driver: str, case: parity.Case, request: pytest.FixtureRequest) -> None:
    """Cases whose difference is documented must differ (a change is noticed)."""
    if driver == "psycopg" and case.__name__ in parity.RAW_END_THEN_RAW_STATEMENTS:
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="documented: statements on the raw psycopg connection after the "
                "application ended fast BEGIN's transaction there run in autocommit",
            )
        )


@pytest.mark.parametrize(("driver", "case"), CASES)
def test_same_outcome_as_the_drivers_begin(
    driver: str, case: parity.Case, direct: Worlds, request: pytest.FixtureRequest
) -> None:
    documented(driver, case, request)
    compare(case, direct(driver))


@pytest.mark.parametrize(("driver", "case"), CASES)
def test_same_outcome_through_pgbouncer(
    driver: str, case: parity.Case, pooled: Worlds, request: pytest.FixtureRequest
) -> None:
    documented(driver, case, request)
    if case.__name__ in parity.SESSION_STATE:
        pytest.skip(
            f"needs {parity.SESSION_STATE[case.__name__]}: PgBouncer in transaction mode "
            "does not keep it"
        )
    if any(name in case.__name__ for name in SESSION_STATE_CASES):
        pytest.skip("session state that PgBouncer in transaction mode does not keep")
    compare(case, pooled(driver))


def test_the_suite_is_large_enough() -> None:
    # The issue asks for at least 60 cases over psycopg2's surface and SQLAlchemy's paths.
    assert len(parity.CASES) >= 60
    for cases in parity.CASES_BY_DRIVER.values():
        names = [case.__name__ for case in cases]
        assert len(set(names)) == len(names)
    # A family of first-statement cases for each difference a review found (items 4 to 11 but
    # 8, which is documented and asserted below).
    for item in (4, 5, 6, 7, 9, 10, 11):
        assert sum(case.__name__.startswith(f"item{item}_") for case in parity.FIRST) >= 3, item
    # psycopg 3's own surface, in three positions.
    assert len(parity.RAW3) >= 30
    first_and_sqlalchemy = {case.__name__ for case in [*parity.SQLALCHEMY, *parity.FIRST]}
    assert first_and_sqlalchemy <= {c.__name__ for c in parity.CASES_BY_DRIVER["psycopg"]}


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

    With fast BEGIN on psycopg2 the transaction starts with its first statement (``now()``
    equals ``statement_timestamp()``), and the server's record of the query text --
    ``current_query()``, ``pg_stat_activity.query`` -- is the whole message: ``BEGIN;`` ... then
    the statement. With psycopg2's own BEGIN only this is certain: the transaction began no
    later than the statement, and the text is the statement's.
    """
    world: World = request.getfixturevalue(route)("psycopg2")
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


@pytest.mark.parametrize("route", ["direct", "pooled"])
def test_psycopg_first_statement_time_and_text_are_the_drivers(
    route: str, request: pytest.FixtureRequest
) -> None:
    """On psycopg 3 BEGIN, the setup and the statement are commands of their own in one
    pipeline: the statement's text is its own (``current_query()``, ``pg_stat_activity``), and
    the transaction began with the ``BEGIN`` before it, not with the statement."""
    world: World = request.getfixturevalue(route)("psycopg")
    for engine in (world.fast, world.plain):
        (equal, ordered, text, activity), second = time_and_text(engine)
        assert equal is False
        assert ordered is True
        assert text == activity == TIME_AND_TEXT
        assert second[2] == TIME_AND_TEXT


def test_psycopg_autocommit_reads_true_in_a_fast_transaction(direct: Worlds) -> None:
    """Documented: inside a transaction fast BEGIN opened on psycopg 3, the DBAPI connection
    reads ``autocommit`` as True (psycopg would send BEGIN otherwise); False again once the
    transaction ended, and False throughout with psycopg's own BEGIN. The differential suite
    checks it where it reads the attribute (:attr:`parity.Out.documented`)."""
    world = direct("psycopg")
    seen = {}
    for name, engine in (("plain", world.plain), ("fast", world.fast)):
        with engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            before = raw.autocommit
            connection.exec_driver_sql("SELECT 1")
            inside = raw.autocommit
            connection.commit()
            seen[name] = (before, inside, raw.autocommit)
    assert seen == {"plain": (False, False, False), "fast": (False, True, False)}
    case = parity.inside_sqlalchemy(
        next(s for s in parity.RAW3 if s.__name__ == "commit_and_rollback")
    )
    out = parity.Out(world.url)
    parity.outcome(case, world.fast, world.url, out)
    assert out.documented >= 1


def test_psycopg_a_transaction_ended_on_the_raw_connection(direct: Worlds) -> None:
    """Documented: after the application ends fast BEGIN's transaction on the raw psycopg
    connection, statements there run in autocommit until flask-neon sees the connection again;
    then psycopg has its own autocommit back. With psycopg's own BEGIN the next statement opens
    a transaction."""
    world = direct("psycopg")
    seen = {}
    for name, engine in (("plain", world.plain), ("fast", world.fast)):
        parity.reset_database(world.url)
        with engine.connect() as connection:
            connection.exec_driver_sql("INSERT INTO t VALUES (1, 'sa')")
            raw = connection.connection.dbapi_connection
            raw.commit()
            after_commit = raw.autocommit
            raw.execute("INSERT INTO t VALUES (2, 'raw')")
            status = raw.info.transaction_status.name
            raw.rollback()
            # SQLAlchemy's next statement: flask-neon sees the transaction ended.
            connection.exec_driver_sql("INSERT INTO t VALUES (3, 'sa again')")
            back = (raw.autocommit, raw.info.transaction_status.name)
            connection.rollback()
            seen[name] = (after_commit, status, back, parity.kept(world.url)["t"])
    assert seen["plain"] == (False, "INTRANS", (False, "INTRANS"), [(1, "sa")])
    assert seen["fast"] == (True, "IDLE", (True, "INTRANS"), [(1, "sa"), (2, "raw")])


def fast_inside(connection: sa.Connection) -> bool:
    """Run a transaction's first statement on ``connection``; True when fast BEGIN opened it."""
    connection.exec_driver_sql("SELECT 1")
    raw = connection.connection.dbapi_connection
    opened = raw in psycopg_driver._switched and raw.autocommit
    connection.rollback()
    return bool(opened)


@pytest.mark.parametrize("timeout", [0, 60])
def test_psycopg_opens_fast_where_no_idle_timeout_is_in_force(
    parity_database: str, timeout: float
) -> None:
    """Without an idle-in-transaction timeout every transaction opens fast; with one, the
    connection's first (which then sends one more Sync, as psycopg's own BEGIN costs a round
    trip too), and the next ones psycopg's way."""
    url = with_driver(parity_database, "psycopg")
    engine, _ = engine_of(url, DB_IDLE_IN_TRANSACTION_TIMEOUT=timeout)
    try:
        with engine.connect() as connection:
            opened = [fast_inside(connection) for _ in range(3)]
    finally:
        engine.dispose()
    # (The connection's first transaction may be SQLAlchemy's own, when it first connects.)
    assert opened[1:] == ([True, True] if timeout == 0 else [False, False])
    assert opened[0] is True or timeout > 0


@pytest.mark.parametrize("transaction", ["first", "second"])
@pytest.mark.parametrize("setting", ["startup", "transaction", "server"])
def test_psycopg_a_transaction_left_idle_after_its_first_statement_is_ended(
    parity_database: str, transaction: str, setting: str
) -> None:
    """idle_in_transaction_session_timeout ends a transaction whose only statement was its
    first, on a connection's first transaction (fast BEGIN, then the Sync that arms the timer)
    and on a later one (psycopg's own BEGIN); set by flask-neon at connect, in the
    transaction's setup, or by the server (a role's default)."""
    url = with_driver(parity_database, "psycopg")
    role = f"idle_{uuid.uuid4().hex[:8]}"
    config: dict[str, t.Any] = {"DB_IDLE_IN_TRANSACTION_TIMEOUT": 0.3}
    if setting == "transaction":
        config["DB_SESSION_LIMITS"] = "transaction"
    elif setting == "server":
        config["DB_IDLE_IN_TRANSACTION_TIMEOUT"] = 0
        admin_execute(parity_database, f'CREATE ROLE "{role}" LOGIN SUPERUSER')
        admin_execute(
            parity_database,
            f"ALTER ROLE \"{role}\" SET idle_in_transaction_session_timeout = '300ms'",
        )
        url = sa.make_url(url).set(username=role).render_as_string(hide_password=False)
    engine, _ = engine_of(url, **config)
    try:
        with engine.connect() as connection:
            if transaction == "second":
                fast_inside(connection)
            pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            deadline = time.monotonic() + 10
            while admin_execute(
                parity_database, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
            ):
                assert time.monotonic() < deadline, "the idle transaction was not ended"
                time.sleep(0.02)
            with pytest.raises(sa.exc.DBAPIError):
                connection.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()
        if setting == "server":
            admin_execute(parity_database, f'DROP ROLE IF EXISTS "{role}"')


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
