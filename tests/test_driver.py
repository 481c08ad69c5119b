"""Fast BEGIN: fewer round trips, the same transaction semantics (the full comparison with
each driver's own handling is in test_driver_parity.py).

Round trips are counted on the wire by the proxy: psycopg2 sends one Query message per round
trip; psycopg 3 sends Parse/Bind/Execute messages up to a Sync, which the proxy groups into
exchanges (``FaultProxy.exchanges``): each is a point where the client may wait for the server.
"""

from __future__ import annotations

import io
import typing as t

import psycopg
import psycopg2.extensions as ext
import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from flask import Flask

from flask_neon import NeonDB, driver

from .conftest import DRIVER, SHOW_IDLE, AppFactory, admin_execute, wait_until, with_driver
from .http_server import LiveServer
from .proxy import FaultProxy


def one_request(db: NeonDB, app: Flask) -> None:
    with app.app_context():
        assert db.session.execute(sa.text("SELECT 41 + 1")).scalar() == 42


def queries_of_one_request(
    make_app: AppFactory, proxy: FaultProxy, database_url: str, **config: t.Any
) -> list[str]:
    app, db = make_app(proxy.url(database_url), **config)
    one_request(db, app)  # opens the connection (and SQLAlchemy's first-connect queries)
    proxy.queries.clear()
    one_request(db, app)
    return list(proxy.queries)


def exchanges_of_one_request(
    make_app: AppFactory, proxy: FaultProxy, database_url: str, **config: t.Any
) -> list[list[str]]:
    app, db = make_app(proxy.url(database_url), **config)
    one_request(db, app)
    proxy.exchanges.clear()
    one_request(db, app)
    return [list(exchange) for exchange in proxy.exchanges]


@pytest.mark.psycopg2_only
def test_a_transaction_costs_two_round_trips_not_three(
    make_app: AppFactory, proxy: FaultProxy, database_url: str
) -> None:
    fast = queries_of_one_request(make_app, proxy, database_url)
    assert fast == ["BEGIN;\nSELECT 41 + 1", "ROLLBACK"]
    slow = queries_of_one_request(make_app, proxy, database_url, DB_FAST_BEGIN=False)
    assert slow == ["BEGIN", "SELECT 41 + 1", "ROLLBACK"]


@pytest.mark.psycopg_only
def test_psycopg_sends_begin_and_the_statement_in_one_exchange(
    make_app: AppFactory, proxy: FaultProxy, database_url: str
) -> None:
    """psycopg 3: one pipeline, each statement its own Parse/Bind/Execute, one Sync; psycopg's
    own way waits for its BEGIN. (The ROLLBACK is SQLAlchemy's here, outside a request.)"""
    fast = exchanges_of_one_request(
        make_app, proxy, database_url, DB_IDLE_IN_TRANSACTION_TIMEOUT=0
    )
    assert fast == [["BEGIN", "SELECT 41 + 1", SHOW_IDLE], ["ROLLBACK"]]
    slow = exchanges_of_one_request(make_app, proxy, database_url, DB_FAST_BEGIN=False)
    assert slow == [["BEGIN"], ["SELECT 41 + 1"], ["ROLLBACK"]]
    # With an idle-in-transaction timeout (the default, 60 s), psycopg's own way: the pipeline
    # would turn the server's timer off (docs/drivers.md).
    timed = exchanges_of_one_request(make_app, proxy, database_url)
    assert timed == slow


@pytest.mark.psycopg2_only
def test_per_transaction_limits_ride_along(
    make_app: AppFactory, proxy: FaultProxy, database_url: str
) -> None:
    sent = queries_of_one_request(
        make_app, proxy, database_url, DB_SESSION_LIMITS="transaction", DB_STATEMENT_TIMEOUT=7
    )
    assert len(sent) == 2
    assert sent[0].startswith("BEGIN; SET LOCAL statement_timeout = 7000; ")
    assert sent[0].endswith(";\nSELECT 41 + 1")


@pytest.mark.psycopg_only
def test_psycopg_per_transaction_limits_ride_along(
    make_app: AppFactory, proxy: FaultProxy, database_url: str
) -> None:
    sent = exchanges_of_one_request(
        make_app,
        proxy,
        database_url,
        DB_SESSION_LIMITS="transaction",
        DB_STATEMENT_TIMEOUT=7,
        DB_IDLE_IN_TRANSACTION_TIMEOUT=0,
    )
    limits = "SET LOCAL statement_timeout = 7000"
    assert sent == [["BEGIN", limits, "SELECT 41 + 1", SHOW_IDLE], ["ROLLBACK"]]


def test_a_read_request_waits_for_one_round_trip(
    make_app: AppFactory, proxy: FaultProxy, database_url: str
) -> None:
    """BEGIN and the read in one exchange; the ROLLBACK goes after the response and is not
    waited for: the proxy holds it back, and the client has its answer meanwhile. (psycopg 3:
    without an idle-in-transaction timeout, docs/drivers.md.)"""
    app, db = make_app(
        proxy.url(database_url), DB_SESSION_LIMITS="off", DB_IDLE_IN_TRANSACTION_TIMEOUT=0
    )

    @app.get("/read")
    def read() -> dict[str, t.Any]:
        return {"v": db.session.execute(sa.text("SELECT 41 + 1")).scalar()}

    with LiveServer(app) as server:
        assert server.get("/read").json() == {"v": 42}  # connects (the dialect's first queries)
        wait_until(lambda: db.pool_stats(app)["checked_out"] == 0, message="connection back")
        proxy.exchanges.clear()
        proxy.hold = "ROLLBACK"
        try:
            assert server.get("/read").json() == {"v": 42}
            wait_until(proxy.held.is_set, message="the ROLLBACK held by the proxy")
            sent = [list(exchange) for exchange in proxy.exchanges]
        finally:
            proxy.release.set()
        wait_until(lambda: db.pool_stats(app)["checked_out"] == 0, message="connection back")
    begin_and_read = (
        ["BEGIN;\nSELECT 41 + 1"]
        if DRIVER == "psycopg2"
        else ["BEGIN", "SELECT 41 + 1", SHOW_IDLE]
    )
    assert sent == [begin_and_read, ["ROLLBACK"]]


def test_a_transaction_without_statements_costs_nothing(
    make_app: AppFactory, proxy: FaultProxy, database_url: str
) -> None:
    app, db = make_app(proxy.url(database_url))
    one_request(db, app)
    proxy.statements.clear()
    with db.get_engine(app).connect() as connection:
        connection.commit()
    assert proxy.statements == []


@pytest.fixture
def engine(make_app: AppFactory, fresh_database: str) -> sa.Engine:
    # No idle-in-transaction timeout: with one, psycopg 3 opens transactions its own way.
    app, db = make_app(fresh_database, DB_IDLE_IN_TRANSACTION_TIMEOUT=0)
    engine = db.get_engine(app)
    admin_execute(fresh_database, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    return engine


def count(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("SELECT count(*) FROM t").scalar_one())


def transaction_open(raw: t.Any) -> bool:
    """What the server last said: a transaction is open on ``raw`` (either driver)."""
    if isinstance(raw, psycopg.Connection):
        return raw.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    return bool(raw.get_transaction_status() == ext.TRANSACTION_STATUS_INTRANS)


@pytest.mark.psycopg2_only
def test_connections_stay_psycopg2s_own(engine: sa.Engine) -> None:
    assert driver.AVAILABLE
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert type(raw) is ext.connection
        assert raw.status == ext.STATUS_READY
        result = connection.exec_driver_sql("SELECT 1")
        # The first statement carried the BEGIN, and psycopg2 knows a transaction is open.
        assert result.cursor.query == b"BEGIN;\nSELECT 1"
        assert raw.status == ext.STATUS_BEGIN
        assert raw.get_transaction_status() == ext.TRANSACTION_STATUS_INTRANS


@pytest.mark.psycopg_only
def test_connections_stay_psycopgs_own(engine: sa.Engine) -> None:
    """psycopg 3: its own Connection class; while a transaction that fast BEGIN opened runs,
    psycopg's autocommit reads True (it sent no BEGIN of its own), and it is False again once
    SQLAlchemy has ended the transaction (docs/fast-begin.md)."""
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert type(raw) is psycopg.Connection
        assert raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert not raw.autocommit
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1
        assert transaction_open(raw)
        assert raw.autocommit
        connection.rollback()
        assert raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert not raw.autocommit


def test_commit_and_rollback(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        connection.exec_driver_sql("INSERT INTO t VALUES (1, 'a')")
        connection.rollback()
        connection.exec_driver_sql("INSERT INTO t VALUES (2, 'b')")
        connection.commit()
    assert count(engine) == 1


def test_a_failing_first_statement_leaves_the_connection_usable(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        with pytest.raises(sa_exc.ProgrammingError):
            connection.exec_driver_sql("SELECT * FROM no_such_table")
        connection.rollback()
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1


def test_isolation_levels_and_autocommit(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        repeatable = connection.execution_options(isolation_level="REPEATABLE READ")
        assert repeatable.exec_driver_sql("SHOW transaction_isolation").scalar() == (
            "repeatable read"
        )
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SHOW transaction_isolation").scalar() == (
            "read committed"
        )
    with engine.connect() as connection:
        auto = connection.execution_options(isolation_level="AUTOCOMMIT")
        auto.exec_driver_sql("INSERT INTO t VALUES (3, 'c')")
        # No transaction is open: the server reports none for this backend.
        assert auto.exec_driver_sql("SELECT txid_current_if_assigned()").scalar() is None
    assert count(engine) == 1  # autocommitted without a commit


def test_read_only_transactions(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        readonly = connection.execution_options(postgresql_readonly=True)
        with pytest.raises(sa_exc.InternalError, match="read-only transaction"):
            readonly.exec_driver_sql("INSERT INTO t VALUES (4, 'd')")


def test_executemany_and_server_side_cursors(engine: sa.Engine) -> None:
    table = sa.table("t", sa.column("id"), sa.column("v"))
    with engine.connect() as connection:
        connection.execute(sa.insert(table), [{"id": i, "v": str(i)} for i in range(100)])
        connection.execute(
            sa.update(table).where(table.c.id == sa.bindparam("key")).values(v="x"),
            [{"key": i} for i in range(5)],
        )
        # A named (server-side) cursor after other statements in the same transaction.
        streamed = connection.execution_options(stream_results=True).execute(
            sa.select(table.c.id).order_by(table.c.id)
        )
        assert [row.id for row in streamed] == list(range(100))
        connection.commit()
        raw = connection.connection.dbapi_connection
        assert raw is not None
        assert not transaction_open(raw)
    assert count(engine) == 100
    with engine.connect() as connection:
        first = connection.execution_options(stream_results=True).execute(
            sa.select(table.c.id).order_by(table.c.id).limit(3)
        )
        assert [row.id for row in first] == [0, 1, 2]
        connection.rollback()


@pytest.mark.psycopg2_only
def test_copy_runs_inside_the_transaction(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert raw is not None
        with raw.cursor() as cursor:
            cursor.copy_expert("COPY t (id, v) FROM STDIN", io.StringIO("7\tseven\n8\teight\n"))
        connection.rollback()
    assert count(engine) == 0


@pytest.mark.psycopg_only
def test_psycopg_copy_runs_inside_the_transaction(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert raw is not None
        with raw.cursor() as cursor, cursor.copy("COPY t (id, v) FROM STDIN") as copy:
            copy.write_row((7, "seven"))
            copy.write_row((8, "eight"))
        assert transaction_open(raw)
        connection.rollback()
    assert count(engine) == 0


@pytest.mark.parametrize("name", ["psycopg2", "psycopg"])
def test_install_on_a_plain_engine_of_either_driver(
    name: str, proxy: FaultProxy, database_url: str
) -> None:
    """``flask_neon.driver.install`` on an engine flask-neon did not make: its driver's way."""
    engine = sa.create_engine(with_driver(proxy.url(database_url), name))
    try:
        driver.install(engine, ["SET LOCAL statement_timeout = 5000"])
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")  # the dialect's first queries
            connection.rollback()
            proxy.exchanges.clear()
            assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "5s"
            connection.rollback()
        sent = [list(exchange) for exchange in proxy.exchanges]
    finally:
        engine.dispose()
    if name == "psycopg2":
        assert sent == [
            ["BEGIN; SET LOCAL statement_timeout = 5000;\nSHOW statement_timeout"],
            ["ROLLBACK"],
        ]
    else:
        assert sent == [
            ["BEGIN", "SET LOCAL statement_timeout = 5000", "SHOW statement_timeout", SHOW_IDLE],
            ["ROLLBACK"],
        ]


@pytest.mark.parametrize(
    ("name", "idle_timeout"), [("psycopg2", 60), ("psycopg", 60), ("psycopg", 0)]
)
def test_read_requests_keep_their_connection(
    make_app: AppFactory, database_url: str, name: str, idle_timeout: float
) -> None:
    """The ROLLBACK after each read's response ends its transaction and nothing else: the
    next request gets the same connection (a second ROLLBACK sent while the first was in
    flight once made psycopg 3 discard it, a new connection per read)."""
    app, db = make_app(
        with_driver(database_url, name),
        DB_POOL_SIZE=1,
        DB_MAX_OVERFLOW=0,
        DB_IDLE_IN_TRANSACTION_TIMEOUT=idle_timeout,
    )
    invalidated: list[t.Any] = []
    with app.app_context():
        sa.event.listen(db.engine.pool, "invalidate", lambda *args: invalidated.append(args))

    @app.get("/pid")
    def pid() -> dict[str, t.Any]:
        return {"pid": db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()}

    with LiveServer(app) as server:
        pids = {server.get("/pid").json()["pid"] for _ in range(6)}
        assert server.errors == []
    assert invalidated == []
    assert len(pids) == 1
