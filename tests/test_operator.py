"""Operator surface on a real server: health routes, pool statistics, leaks, 503s, slow queries."""

from __future__ import annotations

import logging
import threading
import time
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_neon import NeonDB
from flask_neon._url import parse_url

from .conftest import DRIVER, AppFactory, backend_pids, closed_port, terminate_backends, wait_until
from .proxy import FaultProxy

SECRET = "Hx7-unique-Secret"


def hold_connections(db: NeonDB, app: Flask, count: int) -> list[sa.Connection]:
    held = [db.get_engine(app).connect() for _ in range(count)]
    for connection in held:
        connection.exec_driver_sql("SELECT 1")
    return held


# -- health ------------------------------------------------------------------------------------


def test_health_is_healthy_with_safe_fields_only(make_app: AppFactory) -> None:
    app, _ = make_app(DB_HEALTH_CACHE_SECONDS=0)
    response = app.test_client().get("/health/db")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json
    assert body is not None
    assert body["status"] == "healthy"
    assert body["database"] == "postgresql"
    assert body["host_kind"] == "direct"
    assert body["latency_ms"] > 0
    assert body["cached"] is False
    assert body["pool"]["status"] == "ok"
    assert "details" not in body
    text = response.get_data(as_text=True)
    for private in ("127.0.0.1", "postgres@", "PostgreSQL 1", "server_version"):
        assert private not in text


def test_health_details_can_be_turned_on(make_app: AppFactory, database_url: str) -> None:
    app, _ = make_app(DB_HEALTH_DETAILS=True)
    details = app.test_client().get("/health/db").json["details"]  # type: ignore[index]
    assert details["database"] == parse_url(database_url).database
    assert details["server_version"][0].isdigit()
    assert details["url"].startswith("postgresql://")


def test_head_and_liveness(make_app: AppFactory) -> None:
    app, _ = make_app(DB_URL=f"postgresql://u:{SECRET}@127.0.0.1:{closed_port()}/db")
    client = app.test_client()
    assert client.head("/health/db").status_code == 503
    live = client.get("/health/live")
    assert live.status_code == 200
    assert live.json == {"status": "alive"}
    assert client.head("/health/live").status_code == 200


def test_liveness_never_touches_the_database(make_app: AppFactory) -> None:
    app, db = make_app()
    app.test_client().get("/health/live")
    assert db.pool_stats(app)["checkouts"] == 0
    assert db.pool_stats(app)["connections_opened"] == 0


def test_health_result_is_cached(make_app: AppFactory) -> None:
    app, db = make_app(DB_HEALTH_CACHE_SECONDS=300)
    client = app.test_client()
    first = client.get("/health/db").json
    second = client.get("/health/db").json
    assert first is not None
    assert second is not None
    assert first["cached"] is False
    assert second["cached"] is True
    assert db.pool_stats(app)["checkouts"] == 1


def test_health_cache_zero_queries_every_time(make_app: AppFactory) -> None:
    app, db = make_app(DB_HEALTH_CACHE_SECONDS=0)
    client = app.test_client()
    for _ in range(3):
        assert client.get("/health/db").json["cached"] is False  # type: ignore[index]
    assert db.pool_stats(app)["checkouts"] == 3


def test_unreachable_database_is_503_without_error_text(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = make_app(
        f"postgresql://alex:{SECRET}@127.0.0.1:{closed_port()}/db", DB_CONNECT_RETRY_SECONDS=0
    )
    with caplog.at_level(logging.WARNING, logger="flask_neon"):
        response = app.test_client().get("/health/db")
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    body = response.json
    assert body is not None
    assert body["status"] == "unhealthy"
    assert body["cause"] == "connection_refused"
    assert "refused" not in response.get_data(as_text=True).replace("connection_refused", "")
    # The full cause goes to the log, password masked.
    assert "refused" in caplog.text
    assert SECRET not in caplog.text
    assert "alex:***@" in caplog.text


def test_health_is_bounded_when_the_server_never_answers(
    make_app: AppFactory, database_url: str, proxy: FaultProxy
) -> None:
    proxy.mode = "blackhole"
    app, _ = make_app(proxy.url(database_url), DB_HEALTH_TIMEOUT=0.5, DB_CONNECT_TIMEOUT=30)
    started = time.monotonic()
    response = app.test_client().get("/health/db")
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.json["cause"] == "health_timeout"  # type: ignore[index]
    assert elapsed < 2.5  # far below the 30 s connect timeout


def test_health_is_bounded_when_the_pool_is_exhausted(make_app: AppFactory) -> None:
    app, db = make_app(
        DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=30, DB_HEALTH_TIMEOUT=0.5
    )
    held = hold_connections(db, app, 1)
    try:
        started = time.monotonic()
        response = app.test_client().get("/health/db")
        assert time.monotonic() - started < 2.5  # not the 30 s pool timeout
        assert response.status_code == 503
        body = response.json
        assert body is not None
        assert body["pool"]["status"] == "exhausted"
    finally:
        for connection in held:
            connection.close()


def test_pool_mode_reports_without_querying(make_app: AppFactory) -> None:
    app, db = make_app(DB_HEALTH_MODE="pool")
    body = app.test_client().get("/health/db").json
    assert body is not None
    assert body["status"] == "healthy"
    assert body["mode"] == "pool"
    assert db.pool_stats(app)["checkouts"] == 0


def test_health_can_be_disabled_or_moved(make_app: AppFactory) -> None:
    off, _ = make_app(DB_HEALTH_ENABLED=False)
    assert off.test_client().get("/health/db").status_code == 404
    moved, _ = make_app(DB_HEALTH_PREFIX="/ops/health")
    assert moved.test_client().get("/ops/health/db").status_code == 200


# -- pool statistics and leaks ------------------------------------------------------------------


def test_pool_stats_status_moves_from_ok_to_busy_to_exhausted(make_app: AppFactory) -> None:
    app, db = make_app(DB_POOL_SIZE=2, DB_MAX_OVERFLOW=1)
    stats = db.pool_stats(app)
    assert (stats["status"], stats["overflow"], stats["max_capacity"]) == ("ok", 0, 3)
    held = hold_connections(db, app, 2)
    assert db.pool_stats(app)["status"] == "busy"
    held += hold_connections(db, app, 1)
    stats = db.pool_stats(app)
    assert (stats["status"], stats["checked_out"], stats["overflow"]) == ("exhausted", 3, 1)
    for connection in held:
        connection.close()
    stats = db.pool_stats(app)
    assert (stats["status"], stats["checked_out"], stats["checked_in"]) == ("ok", 0, 2)
    assert stats["connections_opened"] == 3
    assert stats["checkouts"] == 3


def test_counters_for_invalidations_and_checkout_timeouts(
    make_app: AppFactory, fresh_database: str
) -> None:
    app, db = make_app(fresh_database, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=1)
    held = hold_connections(db, app, 1)
    with pytest.raises(sa.exc.TimeoutError):
        db.get_engine(app).connect()
    held[0].close()
    stats = db.pool_stats(app)
    assert stats["checkout_timeouts"] == 1
    assert stats["checkout_wait_seconds"] >= 1.0
    terminate_backends(fresh_database)
    wait_until(lambda: not backend_pids(fresh_database))
    with app.app_context():
        assert db.session.execute(sa.text("SELECT 1")).scalar() == 1
    assert db.pool_stats(app)["invalidations"] >= 1


def test_leak_is_reported_with_endpoint_and_location(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, db = make_app(DB_LEAK_THRESHOLD=0.2)
    release = threading.Event()
    inside = threading.Event()

    @app.get("/slow")
    def slow_view() -> str:
        db.session.execute(sa.text("SELECT 1"))
        inside.set()
        release.wait(10)
        return "done"

    with caplog.at_level(logging.WARNING, logger="flask_neon"):
        worker = threading.Thread(target=lambda: app.test_client().get("/slow"))
        worker.start()
        assert inside.wait(10)
        wait_until(lambda: bool(db.check_connection_leaks(app)))
        leak = db.check_connection_leaks(app)[0]
        assert leak.endpoint == "slow_view"
        assert "test_operator.py" in leak.location
        wait_until(lambda: "connection held for" in caplog.text)
        release.set()
        worker.join(10)
        wait_until(lambda: "came back" in caplog.text)
    assert caplog.text.count("connection held for") == 1
    assert db.check_connection_leaks(app) == []


def test_leak_detection_is_off_in_production_by_default(make_app: AppFactory) -> None:
    app, db = make_app()
    hold = hold_connections(db, app, 1)
    assert db.state(app).monitor.leak_threshold is None
    assert db.check_connection_leaks(app) == []
    hold[0].close()


# -- 503 error handler ---------------------------------------------------------------------------


def test_view_on_an_exhausted_pool_gets_503_with_retry_after(make_app: AppFactory) -> None:
    app, db = make_app(DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=1)

    @app.get("/q")
    def q() -> dict[str, t.Any]:
        return {"v": db.session.execute(sa.text("SELECT 1")).scalar()}

    held = hold_connections(db, app, 1)
    response = app.test_client().get("/q")
    held[0].close()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.json["cause"] == "pool_exhausted"  # type: ignore[index]
    assert app.test_client().get("/q").json == {"v": 1}
    assert db.pool_stats(app)["checked_out"] == 0


def test_view_on_a_down_database_gets_503(make_app: AppFactory) -> None:
    app, db = make_app(
        f"postgresql://alex:{SECRET}@127.0.0.1:{closed_port()}/db", DB_CONNECT_RETRY_SECONDS=0
    )

    @app.get("/q")
    def q() -> str:
        db.session.execute(sa.text("SELECT 1"))
        return "never"

    response = app.test_client().get("/q")
    assert response.status_code == 503
    assert SECRET not in response.get_data(as_text=True)
    assert response.json["cause"] == "connection_refused"  # type: ignore[index]


def test_a_transaction_ended_by_idle_in_transaction_timeout_gets_503(
    make_app: AppFactory, fresh_database: str
) -> None:
    """The server ends a transaction left idle, and its backend. psycopg2 then reads a closed
    connection (an OperationalError); psycopg 3 reads the server's FATAL error, SQLSTATE 25P03,
    which it raises as an InternalError: both are answered 503, not 500."""
    app, db = make_app(fresh_database, DB_IDLE_IN_TRANSACTION_TIMEOUT=0.2)
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.get("/stall")
    def stall() -> str:
        db.session.execute(sa.text("SELECT 1"))
        # A second statement: under fast BEGIN on psycopg 3 the first one leaves the server's
        # idle-in-transaction timer off (test_engine.py, the first statement left idle).
        pid = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        wait_until(lambda: pid not in backend_pids(fresh_database))
        db.session.execute(sa.text("SELECT 1"))
        return "never"

    response = app.test_client().get("/stall")
    assert response.status_code == 503
    expected = "idle_in_transaction_timeout" if DRIVER == "psycopg" else "connection_lost"
    assert response.json["cause"] == expected  # type: ignore[index]
    assert db.pool_stats(app)["checked_out"] == 0


def test_statement_timeout_is_not_an_outage(make_app: AppFactory) -> None:
    app, db = make_app(DB_STATEMENT_TIMEOUT=0.1)
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.get("/slow")
    def slow() -> str:
        db.session.execute(sa.text("SELECT pg_sleep(2)"))
        return "never"

    assert app.test_client().get("/slow").status_code == 500


def test_error_handler_can_be_turned_off(make_app: AppFactory) -> None:
    app, db = make_app(
        f"postgresql://u:p@127.0.0.1:{closed_port()}/db",
        DB_ERROR_HANDLER=False,
        DB_CONNECT_RETRY_SECONDS=0,
    )
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.get("/q")
    def q() -> str:
        db.session.execute(sa.text("SELECT 1"))
        return "never"

    assert app.test_client().get("/q").status_code == 500


# -- slow query log -------------------------------------------------------------------------------


def test_slow_queries_are_logged_without_parameters(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, db = make_app(DB_SLOW_QUERY_MS=50)

    @app.get("/slow")
    def slow_endpoint() -> str:
        db.session.execute(
            sa.text("SELECT pg_sleep(0.1), :secret_param"), {"secret_param": "param-Value-42"}
        )
        db.session.execute(sa.text("SELECT 1"))
        return "ok"

    with caplog.at_level(logging.WARNING, logger="flask_neon"):
        assert app.test_client().get("/slow").status_code == 200
    slow_lines = [r.getMessage() for r in caplog.records if "slow query" in r.getMessage()]
    assert len(slow_lines) == 1
    assert "slow_endpoint" in slow_lines[0]
    assert "pg_sleep" in slow_lines[0]
    assert "param-Value-42" not in caplog.text
