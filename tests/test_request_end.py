"""A request's transactions end after its response has been sent, never before the client has
its data, and the connection goes back to the pool only once they have ended (issue 15).

Observed through a proxy that holds the ``ROLLBACK`` back: the client has the whole response
while the transaction is still open, the pool still counts the connection as checked out, and
once the ``ROLLBACK`` reaches the server all is as before: nothing uncommitted is kept.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import typing as t
import uuid
from collections.abc import Iterator

import psycopg2  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
from flask import Flask, abort, stream_with_context

from flask_neon import NeonDB
from flask_neon._drivers import _psycopg2_c
from flask_neon._settling import SettlingQueuePool

from .conftest import admin_execute, wait_until
from .http_server import LiveServer
from .proxy import FaultProxy

TABLE = "request_end_rows"


@pytest.fixture
def table(database_url: str) -> Iterator[str]:
    admin_execute(database_url, f"CREATE TABLE IF NOT EXISTS {TABLE} (tag text)")
    yield TABLE
    admin_execute(database_url, f"DROP TABLE IF EXISTS {TABLE}")


def rows(database_url: str, tag: str) -> int:
    return int(
        admin_execute(database_url, f"SELECT count(*) FROM {TABLE} WHERE tag = %s", [tag])[0][0]
    )


def make_app(url: str, **settings: t.Any) -> tuple[Flask, NeonDB]:
    app = Flask(f"end_{uuid.uuid4().hex[:6]}")
    app.config.update(DB_URL=url, DB_SESSION_LIMITS="off", **settings)
    db = NeonDB(app, env_file=None)
    insert = sa.text(f"INSERT INTO {TABLE} VALUES (:tag)")

    @app.get("/pid")
    def pid() -> dict[str, t.Any]:
        return {"pid": db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()}

    @app.get("/write/<tag>/<how>")
    def write(tag: str, how: str) -> dict[str, t.Any]:
        db.session.execute(insert, {"tag": tag})
        if how == "commit":
            db.session.commit()
        if how == "fail":
            abort(409)
        if how == "raise":
            raise RuntimeError("the view failed")
        pid = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        return {"pid": pid}

    @app.get("/big")
    def big() -> dict[str, t.Any]:
        pid = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        return {"pid": pid, "padding": "x" * 100_000}

    @app.get("/stream/<tag>")
    def stream(tag: str) -> t.Any:
        def rows() -> Iterator[str]:
            db.session.execute(insert, {"tag": tag})
            for number in range(3):
                yield f"{db.session.execute(sa.text('SELECT :n'), {'n': number}).scalar()}\n"

        return app.response_class(stream_with_context(rows()))

    return app, db


def backend_state(database_url: str, pid: int) -> str:
    found = admin_execute(database_url, "SELECT state FROM pg_stat_activity WHERE pid = %s", [pid])
    return str(found[0][0]) if found else "gone"


def checked_out(app: Flask, db: NeonDB) -> int:
    with app.app_context():
        return int(db.pool_stats()["checked_out"])


@contextlib.contextmanager
def rollback_held(
    proxy: FaultProxy, database_url: str, **settings: t.Any
) -> Iterator[tuple[Flask, NeonDB]]:
    """An app through ``proxy``, which holds its ROLLBACKs back until ``proxy.release``."""
    app, db = make_app(proxy.url(database_url), **settings)
    # The first connection's dialect setup runs a ROLLBACK of its own: done before the hold.
    assert app.test_client().get("/pid").status_code == 200
    proxy.hold = "ROLLBACK"
    try:
        yield app, db
    finally:
        proxy.release.set()
        with app.app_context():
            db.engine.dispose()


@contextlib.contextmanager
def released_at_the_end(proxy: FaultProxy) -> Iterator[None]:
    """The block runs while ``proxy`` holds the ROLLBACK back; it goes through at the end, also
    when an assertion in the block fails (the server could not stop with it held)."""
    try:
        yield
    finally:
        proxy.release.set()


def test_a_read_gets_its_response_before_the_transaction_ends(
    database_url: str, proxy: FaultProxy, table: str
) -> None:
    with rollback_held(proxy, database_url) as (app, db):
        with LiveServer(app) as server:
            with released_at_the_end(proxy):
                reply = server.get("/pid")  # the whole response; the ROLLBACK comes after it
                wait_until(proxy.held.is_set, message="the ROLLBACK sent")
                assert reply.status == 200
                assert checked_out(app, db) == 1  # not back in the pool before it has ended
                state = backend_state(database_url, reply.json()["pid"])
                assert state == "idle in transaction"
            wait_until(lambda: checked_out(app, db) == 0, message="connection checked in")
        assert server.errors == []


@pytest.mark.parametrize("how", ["uncommitted", "fail", "raise"])
def test_a_write_ends_its_transaction_before_the_response(
    database_url: str, proxy: FaultProxy, table: str, how: str
) -> None:
    # Its row versions and locks must be gone when the client has the answer, as with
    # Flask-SQLAlchemy: the response waits for the ROLLBACK.
    tag = f"{how}-{uuid.uuid4().hex[:6]}"
    replies: list[t.Any] = []
    with rollback_held(proxy, database_url) as (app, db):
        with LiveServer(app) as server:
            client = threading.Thread(
                target=lambda: replies.append(server.get(f"/write/{tag}/{how}"))
            )
            client.start()
            with released_at_the_end(proxy):
                wait_until(proxy.held.is_set, message="the ROLLBACK sent")
                assert replies == []  # the response waits for the ROLLBACK
            client.join(30)
        expected = {"uncommitted": 200, "fail": 409, "raise": 500}[how]
        assert replies[0].status == expected
        assert checked_out(app, db) == 0
        assert rows(database_url, tag) == 0  # nothing uncommitted is kept
        assert server.errors == [] or how == "raise"


def test_a_large_response_ends_the_transaction_before_it_is_sent(
    database_url: str, proxy: FaultProxy
) -> None:
    # A slow client must not hold a pooled connection open while it reads a large body.
    replies: list[t.Any] = []
    with rollback_held(proxy, database_url) as (app, db):
        with LiveServer(app) as server:
            client = threading.Thread(target=lambda: replies.append(server.get("/big")))
            client.start()
            with released_at_the_end(proxy):
                wait_until(proxy.held.is_set, message="the ROLLBACK sent")
                assert replies == []  # the response waits for the ROLLBACK
            client.join(30)
        assert replies[0].status == 200
        assert checked_out(app, db) == 0


def test_a_commit_is_confirmed_before_the_response(
    database_url: str, proxy: FaultProxy, table: str
) -> None:
    tag = f"commit-{uuid.uuid4().hex[:6]}"
    with rollback_held(proxy, database_url) as (app, db):
        with LiveServer(app) as server:
            with released_at_the_end(proxy):
                assert server.get(f"/write/{tag}/commit").status == 200
                assert rows(database_url, tag) == 1  # committed before the response
                wait_until(proxy.held.is_set, message="the ROLLBACK sent")
            wait_until(lambda: checked_out(app, db) == 0, message="connection checked in")
        assert rows(database_url, tag) == 1


def test_a_streamed_response_keeps_its_session_until_the_end(
    database_url: str, table: str
) -> None:
    app, db = make_app(database_url)
    tag = f"stream-{uuid.uuid4().hex[:6]}"
    try:
        with LiveServer(app) as server:
            reply = server.get(f"/stream/{tag}")
            assert (reply.status, reply.text) == (200, "0\n1\n2\n")
            wait_until(lambda: checked_out(app, db) == 0, message="connection checked in")
        assert rows(database_url, tag) == 0
    finally:
        with app.app_context():
            db.engine.dispose()


def test_the_test_client_ends_the_session_before_it_returns(database_url: str, table: str) -> None:
    # Flask's test client never calls the response's close: the session ends at teardown.
    app, db = make_app(database_url)
    try:
        for _ in range(20):  # more than the pool holds: none may stay checked out
            assert app.test_client().get("/pid").status_code == 200
            assert checked_out(app, db) == 0
    finally:
        with app.app_context():
            db.engine.dispose()


def test_a_teardown_hook_that_commits_still_commits(database_url: str, table: str) -> None:
    # An old Flask-SQLAlchemy habit: commit in teardown_request when the view did not fail.
    app, db = make_app(database_url)
    tag = f"teardown-{uuid.uuid4().hex[:6]}"

    @app.teardown_request
    def commit(exc: BaseException | None) -> None:
        if exc is None:
            db.session.commit()

    try:
        with LiveServer(app) as server:
            assert server.get(f"/write/{tag}/uncommitted").status == 200
            wait_until(lambda: checked_out(app, db) == 0, message="connection checked in")
        assert rows(database_url, tag) == 1
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.parametrize(
    ("settings", "path", "expected"),
    [
        ({}, "/pid", None),  # off unless asked
        ({"DB_SERVER_TIMING": True}, "/pid", "1 statement, 1 round trip"),
        ({"DB_SERVER_TIMING": True}, "/write/t/commit", "2 statements, 3 round trips"),
        ({"DB_SERVER_TIMING": True, "DB_FAST_BEGIN": False}, "/pid", "1 statement, 2 round trips"),
    ],
)
def test_server_timing_header(
    database_url: str, table: str, settings: dict[str, t.Any], path: str, expected: str | None
) -> None:
    app, db = make_app(database_url, **settings)
    try:
        header = app.test_client().get(path).headers.get("Server-Timing")
        if expected is None:
            assert header is None
        else:
            assert header is not None
            name, duration, description = header.split(";")
            assert name == "db"
            assert float(duration.removeprefix("dur=")) > 0
            assert description == f'desc="{expected}"'
    finally:
        with app.app_context():
            db.engine.dispose()


# -- the ROLLBACK after a response goes out without waiting (flask_neon._settling) -------------


def pid_of(reply: t.Any) -> int:
    assert reply.status == 200
    return int(reply.json()["pid"])


def test_the_request_thread_does_not_wait_for_the_rollback_reply(
    database_url: str, proxy: FaultProxy, table: str
) -> None:
    with rollback_held(proxy, database_url) as (app, db):
        with LiveServer(app) as server:
            with released_at_the_end(proxy):
                first = pid_of(server.get("/pid"))
                wait_until(proxy.held.is_set, message="the ROLLBACK sent")
                # psycopg2's rollback() would keep the thread until the server's reply.
                wait_until(lambda: server.active_requests == 0, message="the thread free")
                assert checked_out(app, db) == 1  # kept aside until the reply
                assert backend_state(database_url, first) == "idle in transaction"
                # Meanwhile another request gets another connection, never this one.
                assert pid_of(server.get("/pid")) != first
            wait_until(lambda: checked_out(app, db) == 0, message="connections checked in")
            assert backend_state(database_url, first) == "idle"
        assert server.errors == []


@contextlib.contextmanager
def descriptors_above(highest: int) -> Iterator[None]:
    """Every file descriptor up to ``highest`` in use: sockets opened inside get higher ones."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < highest + 256:
        pytest.skip(f"the open-file limit ({hard}) is too low to open {highest} descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, highest + 256), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY)]
    try:
        while fillers[-1] < highest:  # the lowest free one each time: the holes first
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("descriptors", ["low", "above 1023"])
def test_at_capacity_the_next_request_gets_the_connection_once_its_rollback_ended(
    database_url: str, proxy: FaultProxy, table: str, descriptors: str
) -> None:
    # "above 1023": the connection's socket is one select() refuses; the wait must not fail.
    replies: list[t.Any] = []
    high = descriptors_above(1023) if descriptors != "low" else contextlib.nullcontext()
    with high, rollback_held(proxy, database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0) as (app, db):
        with LiveServer(app) as server:
            with released_at_the_end(proxy):
                first = pid_of(server.get("/pid"))
                wait_until(proxy.held.is_set, message="the ROLLBACK sent")
                client = threading.Thread(target=lambda: replies.append(server.get("/pid")))
                client.start()
                wait_until(lambda: server.active_requests == 2, message="the next request in")
                assert replies == []  # no connection for it while the ROLLBACK is due
            client.join(30)
            assert pid_of(replies[0]) == first  # the same connection, its transaction ended
            wait_until(lambda: checked_out(app, db) == 0, message="connection checked in")
            with app.app_context():
                raw = db.engine.raw_connection()
                descriptor = raw.dbapi_connection.fileno()  # type: ignore[union-attr]
                raw.close()
            assert (descriptor > 1023) == (descriptors != "low")
        assert server.errors == []


def test_a_rollback_that_fails_discards_the_connection(
    database_url: str, proxy: FaultProxy, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    with rollback_held(proxy, database_url) as (app, db):
        with LiveServer(app) as server:
            with released_at_the_end(proxy):
                first = pid_of(server.get("/pid"))
                wait_until(proxy.held.is_set, message="the ROLLBACK sent")
                admin_execute(database_url, "SELECT pg_terminate_backend(%s)", [first])
                wait_until(lambda: backend_state(database_url, first) == "gone", message="gone")
            wait_until(lambda: checked_out(app, db) == 0, message="connection given up")
            assert "the ROLLBACK after a response failed" in caplog.text
            with app.app_context():
                assert db.pool_stats()["invalidations"] == 1
            proxy.hold = None
            assert pid_of(server.get("/pid")) != first  # a new connection, no error
        assert server.errors == []


def test_dispose_closes_a_connection_whose_rollback_is_in_flight(
    database_url: str, proxy: FaultProxy, table: str
) -> None:
    with rollback_held(proxy, database_url) as (app, db), LiveServer(app) as server:
        first = pid_of(server.get("/pid"))
        wait_until(proxy.held.is_set, message="the ROLLBACK sent")
        wait_until(lambda: server.active_requests == 0, message="the thread free")
        with app.app_context():
            pool = t.cast(SettlingQueuePool, db.engine.pool)
            settling = [record.dbapi_connection for record in pool._settling]
            assert [connection.info.backend_pid for connection in settling] == [first]
            db.engine.dispose()
            assert settling[0].closed
            assert db.pool_stats()["checked_out"] == 0


def named_cursor_steps(database_url: str, kind: str, **settings: t.Any) -> dict[str, t.Any]:
    """A named cursor left open by one request, closed by the next one on the same connection."""
    app, db = make_app(database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, **settings)
    kept: list[t.Any] = []
    query = "SELECT pg_backend_pid() FROM generate_series(1, 3)"

    @app.get("/named")
    def named() -> dict[str, t.Any]:
        if kind == "sqlalchemy":  # a server-side cursor through SQLAlchemy
            result = db.session.execute(sa.text(query), execution_options={"stream_results": True})
            kept.append(t.cast(sa.CursorResult[t.Any], result).cursor)
            return {"pid": result.fetchone()[0]}  # the cursor stays open
        # One made on the DBAPI connection itself, which SQLAlchemy never sees.
        connection = db.session.connection().connection.dbapi_connection
        assert connection is not None
        cursor = connection.cursor("raw_named")
        cursor.execute(query)
        kept.append(cursor)
        return {"pid": cursor.fetchone()[0]}

    @app.get("/close-kept")
    def close_kept() -> dict[str, t.Any]:
        pid = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        closing = "closed"
        try:
            kept[0].close()
        except psycopg2.Error as exc:  # psycopg2's answer: nothing is sent
            closing = f"{type(exc).__name__}: {exc}"
        db.session.execute(sa.text("SELECT 1"))  # the transaction is intact
        return {"pid": pid, "closing": closing}

    try:
        with LiveServer(app) as server:
            first = server.get("/named").json()["pid"]
            reply = server.get("/close-kept").json()
        assert server.errors == []
        return {"same connection": reply["pid"] == first, "closing": reply["closing"]}
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.psycopg2_only  # psycopg 3 tracks no ended transactions: its close() is the same
@pytest.mark.parametrize("kind", ["sqlalchemy", "dbapi"])
def test_a_named_cursor_after_a_rollback_sent_without_waiting_is_as_after_psycopg2s(
    database_url: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # psycopg2's own rollback() counts the transaction as ended, which makes its named cursors
    # invalid: closing one later (in the next request, on the same connection) sends nothing
    # into that request's transaction. The ROLLBACK sent without waiting must leave the same.
    ended: list[t.Any] = []
    end_transaction = _psycopg2_c.end_transaction
    monkeypatch.setattr(
        _psycopg2_c, "end_transaction", lambda c: (ended.append(c), end_transaction(c))[-1]
    )
    psycopg2_way = named_cursor_steps(database_url, kind, DB_FAST_BEGIN=False)
    assert ended == []
    ours = named_cursor_steps(database_url, kind)
    # Both requests' ROLLBACKs went out without waiting; but a transaction that a cursor on the
    # DBAPI connection opened (flask-neon did not see its statements) ends before the response.
    assert len(ended) == (2 if kind == "sqlalchemy" else 1)
    assert (
        ours
        == psycopg2_way
        == {
            "same connection": True,
            "closing": "ProgrammingError: named cursor isn't valid anymore",
        }
    )


def test_a_rollback_that_fails_discards_the_connection_also_after_dispose(
    database_url: str, proxy: FaultProxy, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    # As test_a_rollback_that_fails_discards_the_connection, once the engine was disposed: what
    # flask-neon's fork hook does in a process forked from one that used the engine (gunicorn
    # --preload). The recreated pool once lost its driver, and counted the ROLLBACK in flight
    # as ended without reading its reply: the next request got the dead connection (a 503).
    with rollback_held(proxy, database_url) as (app, db):
        with app.app_context():
            db.engine.dispose()
        proxy.hold = None
        with LiveServer(app) as server:
            # The new pool's first connection, by a write: its ROLLBACK is through before the
            # answer, none is on its way when the hold begins.
            assert server.get(f"/write/dispose-{uuid.uuid4().hex[:6]}/uncommitted").status == 200
            proxy.held.clear()
            proxy.release.clear()
            proxy.hold = "ROLLBACK"
            with released_at_the_end(proxy):
                first = pid_of(server.get("/pid"))
                wait_until(proxy.held.is_set, message="the ROLLBACK sent")
                in_flight = checked_out(app, db)  # 1: kept aside until its reply
                admin_execute(database_url, "SELECT pg_terminate_backend(%s)", [first])
                wait_until(lambda: backend_state(database_url, first) == "gone", message="gone")
            wait_until(lambda: checked_out(app, db) == 0, message="connection given up")
            proxy.hold = None
            after = server.get("/pid")  # the dead connection: 503 connection_lost
            assert (in_flight, after.status) == (1, 200), after.text
            assert "the ROLLBACK after a response failed" in caplog.text
            assert pid_of(after) != first
        assert server.errors == []
