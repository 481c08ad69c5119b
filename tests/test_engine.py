"""The engine on a real server: session limits, the liveness check, connect retries, and the
startup check's classified errors."""

from __future__ import annotations

import time
import typing as t
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from flask import Flask
from sqlalchemy.events import ConnectionEvents

from flask_neon import DatabaseUnavailableError, NeonDB
from flask_neon._errors import classify
from flask_neon.local import LocalPostgres

from .conftest import (
    DRIVER,
    AppFactory,
    admin_execute,
    backend_pids,
    closed_port,
    terminate_backends,
    wait_until,
)
from .proxy import FaultProxy

PASSWORD = "Pw-7zQ!x@y:z/%#"


def query(db: NeonDB, app: Flask, sql: str) -> t.Any:
    with app.app_context():
        return db.session.execute(sa.text(sql)).scalar()


# -- session limits -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["startup", "transaction"])
def test_statement_timeout_cancels_a_long_query(make_app: AppFactory, mode: str) -> None:
    app, db = make_app(DB_STATEMENT_TIMEOUT=0.2, DB_SESSION_LIMITS=mode)
    started = time.monotonic()
    with pytest.raises(sa_exc.OperationalError, match="statement timeout"):
        query(db, app, "SELECT pg_sleep(5)")
    assert time.monotonic() - started < 4
    assert query(db, app, "SELECT 1") == 1  # the connection is still usable


def test_limits_travel_as_startup_options_on_a_direct_host(make_app: AppFactory) -> None:
    app, db = make_app(DB_STATEMENT_TIMEOUT=7, DB_IDLE_IN_TRANSACTION_TIMEOUT=9)
    with app.app_context():
        rows = db.session.execute(
            sa.text(
                "SELECT name, setting, source FROM pg_settings WHERE name IN "
                "('statement_timeout', 'idle_in_transaction_session_timeout') ORDER BY name"
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("idle_in_transaction_session_timeout", "9000", "client"),
        ("statement_timeout", "7000", "client"),
    ]


def test_per_transaction_limits_leave_no_session_state(make_app: AppFactory) -> None:
    app, db = make_app(DB_STATEMENT_TIMEOUT=7, DB_SESSION_LIMITS="transaction")
    engine = db.get_engine(app)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "7s"
        connection.commit()
        # Outside our transaction (as a pooler's next client would see the server connection),
        # the setting is back to the server default.
        raw = connection.connection.dbapi_connection
        assert raw is not None
        raw.autocommit = True
        with raw.cursor() as cursor:
            cursor.execute("SHOW statement_timeout")
            assert cursor.fetchone() == ("0",)
        raw.autocommit = False


def test_limits_off_sends_nothing(make_app: AppFactory) -> None:
    app, db = make_app(DB_STATEMENT_TIMEOUT=7, DB_SESSION_LIMITS="off")
    assert query(db, app, "SHOW statement_timeout") == "0"


def test_idle_transaction_is_ended_by_the_server_and_the_next_request_is_fine(
    make_app: AppFactory, fresh_database: str
) -> None:
    app, db = make_app(fresh_database, DB_IDLE_IN_TRANSACTION_TIMEOUT=0.3)
    engine = db.get_engine(app)
    connection = engine.connect()
    connection.exec_driver_sql("SELECT 1")
    pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    # The server ends the idle transaction and its backend on its own.
    wait_until(lambda: pid not in backend_pids(fresh_database))
    with pytest.raises(sa_exc.DBAPIError) as info:
        connection.exec_driver_sql("SELECT 1")
    # psycopg2 finds the connection closed (OperationalError, no SQLSTATE); psycopg 3 reads the
    # server's FATAL error (25P03, an InternalError). Both are a disconnect, and transient.
    assert info.value.connection_invalidated
    cause = classify(info.value)
    assert cause.transient
    assert cause.name == (
        "idle_in_transaction_timeout" if DRIVER == "psycopg" else "connection_lost"
    )
    connection.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert query(db, app, "SELECT 2") == 2


@pytest.mark.parametrize("fast_begin", [True, False], ids=["fast-begin", "driver-begin"])
def test_a_transaction_left_idle_after_its_first_statement_is_ended(
    make_app: AppFactory, fresh_database: str, fast_begin: bool
) -> None:
    """DB_IDLE_IN_TRANSACTION_TIMEOUT ends a transaction whose only statement was its first
    (on psycopg 3 fast BEGIN then steps aside: docs/fast-begin.md)."""
    app, db = make_app(
        fresh_database, DB_IDLE_IN_TRANSACTION_TIMEOUT=0.2, DB_FAST_BEGIN=fast_begin
    )
    connection = db.get_engine(app).connect()
    try:
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        wait_until(lambda: pid not in backend_pids(fresh_database), timeout=5)
        with pytest.raises(sa_exc.DBAPIError):
            connection.exec_driver_sql("SELECT 1")
    finally:
        connection.invalidate()


# -- liveness check -----------------------------------------------------------------------------


def count_pings(db: NeonDB, app: Flask) -> list[int]:
    """Count the liveness check's round trips by wrapping the dialect's ping."""
    engine = db.get_engine(app)
    calls = [0]
    original = engine.dialect.do_ping

    def counting(dbapi_connection: t.Any) -> bool:
        calls[0] += 1
        return original(dbapi_connection)

    engine.dialect.do_ping = counting  # type: ignore[method-assign]
    return calls


def warm_pool(db: NeonDB, app: Flask, connections: int) -> None:
    engine = db.get_engine(app)
    held = [engine.connect() for _ in range(connections)]
    for connection in held:
        connection.exec_driver_sql("SELECT 1")
    for connection in held:
        connection.close()


@pytest.mark.parametrize("profile", ["development", "production", "serverless"])
def test_no_listener_on_sqlalchemys_connection_events(make_app: AppFactory, profile: str) -> None:
    # One connection-level listener (begin, rollback, before_cursor_execute...) puts every
    # statement of every request on SQLAlchemy's event path: seven dispatches a request. The
    # defaults work through pool and dialect hooks only; the opt-in Server-Timing header and
    # slow-query log are the exceptions (their own tests).
    app, db = make_app(DB_PROFILE=profile)
    with app.app_context():
        engine = db.engine
        query(db, app, "SELECT 1")
    names = [name for name in vars(ConnectionEvents) if name[0] != "_" and name != "dispatch"]
    listened = {name: len(getattr(engine.dispatch, name)) for name in names}
    assert {name: count for name, count in listened.items() if count} == {}


@pytest.mark.parametrize("profile", ["production", "serverless"])
def test_no_listener_on_the_pools_checkout_and_checkin(make_app: AppFactory, profile: str) -> None:
    # The liveness check runs inside the pool: a checkout or checkin listener would cost
    # every request SQLAlchemy's event dispatch twice. (Development's leak detection listens.)
    app, db = make_app(DB_PROFILE=profile)
    with app.app_context():
        engine = db.engine
        query(db, app, "SELECT 1")
    assert (len(engine.pool.dispatch.checkout), len(engine.pool.dispatch.checkin)) == (0, 0)


def test_recently_used_connection_is_not_pinged(make_app: AppFactory) -> None:
    app, db = make_app()
    pings = count_pings(db, app)
    for _ in range(20):
        assert query(db, app, "SELECT 1") == 1
    assert pings[0] == 0


def test_connection_idle_past_the_threshold_is_pinged(make_app: AppFactory) -> None:
    app, db = make_app(DB_PING_AFTER_IDLE=0)
    pings = count_pings(db, app)
    for _ in range(5):
        query(db, app, "SELECT 1")
    assert pings[0] == 4  # every checkout but the first, which opened a fresh connection


def test_a_connection_due_for_recycling_is_replaced_unchecked(make_app: AppFactory) -> None:
    # Every checkout recycles (pool_recycle=0): checking the old connection first would cost a
    # round trip (or a wait on a vanished peer) for a connection that is closed anyway.
    app, db = make_app(DB_PING_AFTER_IDLE=0, DB_ENGINE_OPTIONS={"pool_recycle": 0})
    pings = count_pings(db, app)
    backends = {query(db, app, "SELECT pg_backend_pid()") for _ in range(5)}
    assert (pings[0], len(backends)) == (0, 5)


def test_terminated_idle_connections_are_never_handed_out(
    make_app: AppFactory, fresh_database: str
) -> None:
    app, db = make_app(fresh_database, DB_POOL_SIZE=4)
    warm_pool(db, app, 4)
    pings = count_pings(db, app)
    assert terminate_backends(fresh_database) == 4
    # Wait until the server has really gone: the sockets then carry the FATAL and EOF.
    wait_until(lambda: not backend_pids(fresh_database))
    results = [query(db, app, "SELECT 1") for _ in range(12)]
    assert results == [1] * 12
    assert pings[0] >= 1  # the readable socket triggered a real check


def test_server_restart_causes_no_failed_request(tmp_path_factory: pytest.TempPathFactory) -> None:
    with LocalPostgres() as cluster:
        app = Flask(__name__)
        app.config.update(DB_URL=cluster.url, DB_POOL_SIZE=3)
        db = NeonDB(app, env_file=None)
        warm_pool(db, app, 3)
        cluster.restart()
        assert [query(db, app, "SELECT 1") for _ in range(10)] == [1] * 10
        db.get_engine(app).dispose()


# -- connect retries and the startup check ----------------------------------------------------


def test_waking_compute_is_retried_until_it_answers(
    make_app: AppFactory, database_url: str, proxy: FaultProxy
) -> None:
    proxy.wake_failures = 3
    app, db = make_app(proxy.url(database_url), DB_CONNECT_RETRY_SECONDS=5)
    assert query(db, app, "SELECT 1") == 1
    assert proxy.accepted == 4


def test_retries_stop_at_their_budget(
    make_app: AppFactory, database_url: str, proxy: FaultProxy
) -> None:
    proxy.wake_failures = 10_000
    app, db = make_app(proxy.url(database_url), DB_CONNECT_RETRY_SECONDS=0.5)
    started = time.monotonic()
    with pytest.raises(sa_exc.OperationalError, match="compute node"):
        query(db, app, "SELECT 1")
    assert time.monotonic() - started < 3
    assert proxy.accepted >= 2


def test_slow_waking_compute_answers_within_the_connect_bound(
    make_app: AppFactory, database_url: str, proxy: FaultProxy
) -> None:
    """A compute that accepts but answers only after a delay: the first request waits for it
    (within DB_CONNECT_TIMEOUT) and succeeds."""
    proxy.connect_delay = 1.0
    app, db = make_app(proxy.url(database_url), DB_CONNECT_TIMEOUT=5)
    started = time.monotonic()
    assert query(db, app, "SELECT 1") == 1
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 5


def test_retries_can_be_turned_off(
    make_app: AppFactory, database_url: str, proxy: FaultProxy
) -> None:
    proxy.wake_failures = 1
    app, db = make_app(proxy.url(database_url), DB_CONNECT_RETRY_SECONDS=0)
    with pytest.raises(sa_exc.OperationalError):
        query(db, app, "SELECT 1")
    assert proxy.accepted == 1


@pytest.fixture(scope="module")
def password_cluster() -> Iterator[LocalPostgres]:
    """A cluster that checks passwords, with a role whose password has every awkward character."""
    with LocalPostgres(hba=["host all alex 127.0.0.1/32 scram-sha-256"]) as cluster:
        cluster.execute("CREATE ROLE alex LOGIN PASSWORD %s", params=(PASSWORD,))
        yield cluster


def start_check(url: str, **config: t.Any) -> DatabaseUnavailableError:
    app = Flask(__name__)
    app.config.update(DB_URL=url, DB_CONNECT_ON_START=True, DB_CONNECT_RETRY_SECONDS=0, **config)
    with pytest.raises(DatabaseUnavailableError) as info:
        NeonDB(app, env_file=None)
    assert "flask-neon" not in app.extensions
    return info.value


def alex_url(cluster: LocalPostgres, password: str, database: str = "postgres") -> str:
    from urllib.parse import quote

    return f"postgresql://alex:{quote(password, safe='')}@127.0.0.1:{cluster.port}/{database}"


def test_startup_check_passes_with_the_right_password(password_cluster: LocalPostgres) -> None:
    app = Flask(__name__)
    app.config.update(DB_URL=alex_url(password_cluster, PASSWORD), DB_CONNECT_ON_START=True)
    db = NeonDB(app, env_file=None)
    assert query(db, app, "SELECT current_user") == "alex"


def test_startup_check_wrong_password(password_cluster: LocalPostgres) -> None:
    wrong = PASSWORD + "-wrong"
    error = start_check(alex_url(password_cluster, wrong))
    assert error.cause.name == "auth_failed"
    assert wrong not in str(error)
    assert PASSWORD not in str(error)
    assert "DB_CONNECT_ON_START" in str(error)


def test_startup_check_unknown_database(password_cluster: LocalPostgres) -> None:
    error = start_check(alex_url(password_cluster, PASSWORD, "no_such_db"))
    assert error.cause.name == "database_missing"
    assert PASSWORD not in str(error)


def test_startup_check_refused_port() -> None:
    error = start_check(f"postgresql://alex:{PASSWORD}@127.0.0.1:{closed_port()}/db")
    assert error.cause.name == "connection_refused"
    assert error.cause.transient
    assert PASSWORD not in str(error)


def test_startup_check_unknown_host() -> None:
    error = start_check(f"postgresql://alex:{PASSWORD}@no-such-host.invalid/db?sslmode=require")
    assert error.cause.name == "unknown_host"


def test_startup_check_times_out_against_a_silent_server(
    proxy: FaultProxy, database_url: str
) -> None:
    proxy.mode = "blackhole"
    started = time.monotonic()
    error = start_check(proxy.url(database_url), DB_CONNECT_TIMEOUT=2)
    assert error.cause.name == "connect_timeout"
    assert time.monotonic() - started < 6


def test_startup_check_tls_required_by_server(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The server only accepts TLS connections (hostssl) but has no TLS configured: the
    # plaintext attempt is refused by pg_hba with "no encryption", as a TLS-only server does.
    with LocalPostgres(hba=["hostnossl all all 127.0.0.1/32 reject"]) as cluster:
        error = start_check(cluster.url + "?sslmode=disable")
    assert error.cause.name == "tls_required"


def test_dead_sockets_are_counted_out(make_app: AppFactory, fresh_database: str) -> None:
    """After the terminate storm the pool holds no more connections than it should."""
    app, db = make_app(fresh_database, DB_POOL_SIZE=2, DB_MAX_OVERFLOW=0)
    warm_pool(db, app, 2)
    terminate_backends(fresh_database)
    wait_until(lambda: not backend_pids(fresh_database))
    for _ in range(5):
        query(db, app, "SELECT 1")
    assert len(backend_pids(fresh_database)) <= 2
    assert admin_execute(fresh_database, "SELECT 1") == [(1,)]


def test_too_many_connections_is_classified() -> None:
    """A low max_connections cluster: the server's own refusal, classified and 503-able."""
    with LocalPostgres(
        settings={"max_connections": "5", "superuser_reserved_connections": "3"}
    ) as pg:
        pg.execute("CREATE ROLE alex LOGIN")
        app = Flask(__name__)
        app.config.update(
            DB_URL=f"postgresql://alex@127.0.0.1:{pg.port}/postgres",
            DB_CONNECT_RETRY_SECONDS=0,
            DB_POOL_SIZE=4,
        )
        db = NeonDB(app, env_file=None)
        engine = db.get_engine(app)
        held = []

        def connect_all() -> None:
            for _ in range(4):
                held.append(engine.connect())

        with pytest.raises(sa_exc.OperationalError) as info:
            connect_all()
        for connection in held:
            connection.close()
        engine.dispose()
    assert held  # at least one slot was free before the limit
    assert classify(info.value).name == "too_many_connections"
