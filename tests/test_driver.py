"""Fast BEGIN: fewer round trips, the same transaction semantics (the full comparison with
psycopg2's own handling is in test_driver_parity.py).

Round trips are counted on the wire by the proxy, which records every Query message."""

from __future__ import annotations

import io
import typing as t

import psycopg2.extensions as ext
import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from flask import Flask

from flask_neon import NeonDB, driver

from .conftest import AppFactory, admin_execute
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


def test_a_transaction_costs_two_round_trips_not_three(
    make_app: AppFactory, proxy: FaultProxy, database_url: str
) -> None:
    fast = queries_of_one_request(make_app, proxy, database_url)
    assert fast == ["BEGIN;\nSELECT 41 + 1", "ROLLBACK"]
    slow = queries_of_one_request(make_app, proxy, database_url, DB_FAST_BEGIN=False)
    assert slow == ["BEGIN", "SELECT 41 + 1", "ROLLBACK"]


def test_per_transaction_limits_ride_along(
    make_app: AppFactory, proxy: FaultProxy, database_url: str
) -> None:
    sent = queries_of_one_request(
        make_app, proxy, database_url, DB_SESSION_LIMITS="transaction", DB_STATEMENT_TIMEOUT=7
    )
    assert len(sent) == 2
    assert sent[0].startswith("BEGIN; SET LOCAL statement_timeout = 7000; ")
    assert sent[0].endswith(";\nSELECT 41 + 1")


def test_a_transaction_without_statements_costs_nothing(
    make_app: AppFactory, proxy: FaultProxy, database_url: str
) -> None:
    app, db = make_app(proxy.url(database_url))
    one_request(db, app)
    proxy.queries.clear()
    with db.get_engine(app).connect() as connection:
        connection.commit()
    assert proxy.queries == []


@pytest.fixture
def engine(make_app: AppFactory, fresh_database: str) -> sa.Engine:
    app, db = make_app(fresh_database)
    engine = db.get_engine(app)
    admin_execute(fresh_database, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    return engine


def count(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("SELECT count(*) FROM t").scalar_one())


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
        assert raw.status == ext.STATUS_READY
    assert count(engine) == 100
    with engine.connect() as connection:
        first = connection.execution_options(stream_results=True).execute(
            sa.select(table.c.id).order_by(table.c.id).limit(3)
        )
        assert [row.id for row in first] == [0, 1, 2]
        connection.rollback()


def test_copy_runs_inside_the_transaction(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert raw is not None
        with raw.cursor() as cursor:
            cursor.copy_expert("COPY t (id, v) FROM STDIN", io.StringIO("7\tseven\n8\teight\n"))
        connection.rollback()
    assert count(engine) == 0
