"""A server that is starting, recovering or shutting down: every message PostgreSQL sends then
is a transient cause, so connects are retried, requests get 503 with Retry-After (never a 500)
and ``flask db-check --wait`` waits.

The messages come from real servers: a crash recovery replaying a few hundred MB of WAL, a
standby that waits for WAL it never gets, a standby with hot_standby off, a smart and a fast
shutdown, a server whose backend crashed, connection limits, recovery conflicts on a hot
standby. What no test can get from a server (a postmaster killed under its backends, whose
goodbye the client never reads) is checked on the server's exact text. Every wait polls
against a deadline.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pathlib
import re
import select
import signal
import subprocess
import threading
import time
import typing as t
from collections.abc import Callable, Iterator

import psycopg2  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
from flask import Flask

from flask_neon._errors import _RULES, ErrorCause, classify
from flask_neon.local import LocalPostgres, server_account

from .conftest import AppFactory, wait_until
from .servers import STARTUP_TIMEOUT, Replica

#: Every cause a 503 may name: the transient rules, and the health probe's own timeout.
TRANSIENT = {rule.name for rule in _RULES if rule.transient} | {"health_timeout"}
#: Rows written after the last checkpoint: about 200 MB of WAL, 1-2 s of replay here.
REPLAY_ROWS = 1_500_000
NOT_YET_ACCEPTING = "the database system is not yet accepting connections"


# -- the server's messages, on their exact text ---------------------------------------------------

#: Every message PostgreSQL (15 to 18, lc_messages C) sends a client while it is starting,
#: recovering or shutting down, or when it ends a session for such a reason, and the cause it
#: must get. From the server's source (backend_startup.c, postgres.c, be-secure.c, proc.c,
#: postinit.c, standby.c); the tests below get each one from a real server, but for the two
#: marked "text only".
MESSAGES: dict[str, str] = {
    # A connect refused while the server is not serving (SQLSTATE 57P03, cannot_connect_now).
    "FATAL:  the database system is starting up": "server_starting",
    "FATAL:  the database system is not yet accepting connections\n"
    "DETAIL:  Consistent recovery state has not been yet reached.": "server_starting",
    "FATAL:  the database system is not accepting connections\n"
    "DETAIL:  Hot standby mode is disabled.": "server_starting",
    "FATAL:  the database system is in recovery mode": "server_starting",
    "FATAL:  the database system is shutting down": "server_shutting_down",
    # A connect refused for want of a slot (53300).
    "FATAL:  sorry, too many clients already": "too_many_connections",
    'FATAL:  too many connections for role "alex"': "too_many_connections",
    'FATAL:  too many connections for database "capped"': "too_many_connections",
    # A session ended by a shutdown (57P01), a crash (57P02) or its idle limit (57P05). Since
    # PostgreSQL 14 a crash and an immediate shutdown say it in a WARNING, and the next query
    # fails with libpq's "server closed the connection unexpectedly".
    "FATAL:  terminating connection due to administrator command": "connection_lost",
    "WARNING:  terminating connection due to immediate shutdown command": "connection_lost",
    "WARNING:  terminating connection because of crash of another server process\n"
    "DETAIL:  The postmaster has commanded this server process to roll back the current "
    "transaction and exit, because another server process exited abnormally and possibly "
    "corrupted shared memory.\n"
    "HINT:  In a moment you should be able to reconnect to the database and repeat your "
    "command.": "connection_lost",
    "WARNING:  terminating connection because of unexpected SIGQUIT signal": "connection_lost",
    # Text only: a postmaster killed under its backends (they exit before a client can read
    # this: it sees "server closed the connection unexpectedly"), a parallel query meanwhile.
    "FATAL:  terminating connection due to unexpected postmaster exit": "connection_lost",
    "ERROR:  postmaster exited during a parallel transaction": "connection_lost",
    "FATAL:  terminating connection due to idle-session timeout": "connection_lost",
    "server closed the connection unexpectedly\n\tThis probably means the server terminated "
    "abnormally\n\tbefore or while processing the request.": "connection_lost",
    # A hot standby that cancels a query or ends a session to go on replaying (40001, 57P04).
    "ERROR:  canceling statement due to conflict with recovery\n"
    "DETAIL:  User was holding a relation lock for too long.": "recovery_conflict",
    "FATAL:  terminating connection due to conflict with recovery\n"
    "DETAIL:  User was holding a relation lock for too long.": "recovery_conflict",
    "FATAL:  terminating connection due to conflict with recovery\n"
    "DETAIL:  User was connected to a database that must be dropped.": "recovery_conflict",
}


@pytest.mark.parametrize(("message", "cause"), MESSAGES.items(), ids=lambda v: v[:60])
def test_each_message_is_a_transient_cause(message: str, cause: str) -> None:
    # Also as libpq words a failed connect.
    for text in (message, f'connection to server at "127.0.0.1", port 5432 failed: {message}'):
        classified = classify(psycopg2.OperationalError(text))
        assert (classified.name, classified.transient) == (cause, True), text


def test_a_database_closed_to_connections_is_not_a_server_state() -> None:
    """``ALLOW_CONNECTIONS false`` is a setting to change, not a state that passes."""
    error = psycopg2.OperationalError(
        'FATAL:  database "archive" is not currently accepting connections'
    )
    assert classify(error).transient is False


# -- helpers ------------------------------------------------------------------------------------


def connect(cluster: LocalPostgres, **params: t.Any) -> t.Any:
    """A plain psycopg2 connection to ``cluster`` (autocommit)."""
    params = {"user": cluster.user, "dbname": cluster.database, **params}
    connection = psycopg2.connect(
        host=cluster.host, port=cluster.port, connect_timeout=5, **params
    )
    connection.autocommit = True
    return connection


def connect_error(cluster: LocalPostgres, **params: t.Any) -> psycopg2.OperationalError | None:
    """The exception a connect to ``cluster`` raises right now, or None if it succeeds."""
    try:
        connect(cluster, **params).close()
    except psycopg2.OperationalError as exc:
        return exc
    return None


def refusal(cluster: LocalPostgres, text: str, **params: t.Any) -> psycopg2.OperationalError:
    """Connect until the server answers with ``text``; that exception."""
    seen: list[psycopg2.OperationalError] = []

    def refused() -> bool:
        error = connect_error(cluster, **params)
        if error is not None and text in str(error):
            seen.append(error)
        return bool(seen)

    wait_until(refused, STARTUP_TIMEOUT, f"a connect refused with {text!r}")
    return seen[0]


def goodbye(connection: t.Any, timeout: float = 10.0) -> list[str]:
    """Wait until the server sends ``connection`` something unasked, as it does when it ends
    the session, and return what it sent.

    libpq passes a message that arrives while no query runs to the notice processor (a FATAL
    too); a read that finds the connection closed raises instead.
    """
    deadline = time.monotonic() + timeout
    while not select.select([connection.fileno()], [], [], 0.05)[0]:
        assert time.monotonic() < deadline, "the server sent nothing"
    try:
        connection.poll()
    except psycopg2.OperationalError as exc:
        return [*connection.notices, str(exc)]
    return list(connection.notices)


#: What psycopg2 says of a connection the server closed without a word.
CLOSED = (
    "server closed the connection unexpectedly\n\tThis probably means the server terminated "
    "abnormally\n\tbefore or while processing the request.\n"
)


def saying(messages: list[str], text: str) -> str:
    """The one of ``messages`` that contains ``text``."""
    found = [message for message in messages if text in message]
    assert found, messages
    return found[0]


def failure(connection: t.Any) -> psycopg2.OperationalError:
    """The exception a query on a connection the server has ended raises."""
    with pytest.raises(psycopg2.OperationalError) as info:
        connection.cursor().execute("SELECT 1")
    return info.value


def assert_transient(error: BaseException | str, name: str) -> ErrorCause:
    """``error`` (or a server message) is classified ``name``, a transient cause."""
    cause = classify(psycopg2.OperationalError(error) if isinstance(error, str) else error)
    assert (cause.name, cause.transient) == (name, True), cause
    return cause


def postmaster_pid(cluster: LocalPostgres) -> int:
    return int((cluster.data_dir / "postmaster.pid").read_text().split()[0])


def wait_stopped(cluster: LocalPostgres) -> None:
    """Wait until the postmaster is gone, then let ``cluster`` know it stopped."""
    pid_file = cluster.data_dir / "postmaster.pid"
    wait_until(lambda: not pid_file.exists(), STARTUP_TIMEOUT, "the postmaster's exit")
    cluster.stop_server()  # nothing left to stop: marks the cluster stopped


def stop_immediately(cluster: LocalPostgres) -> None:
    """``pg_ctl stop -m immediate``: every process exits at once, no checkpoint is written, and
    the next start replays the WAL as after a crash."""
    os.kill(postmaster_pid(cluster), signal.SIGQUIT)
    wait_stopped(cluster)


def as_server_account(path: pathlib.Path) -> None:
    account = server_account()
    if account is not None:
        os.chown(path, *account)


def make_standby(cluster: LocalPostgres) -> None:
    """Stop ``cluster`` and turn it into a standby with no primary and no archive: it replays
    what its pg_wal holds, then waits for more WAL forever."""
    cluster.stop_server()
    signal_file = cluster.data_dir / "standby.signal"
    signal_file.touch()
    as_server_account(signal_file)


@pytest.fixture
def cluster() -> Iterator[LocalPostgres]:
    """A throwaway cluster of this test's own: these tests stop, crash and reconfigure it."""
    with LocalPostgres() as local:
        yield local


# -- connects refused while the server starts or stops -----------------------------------------


@pytest.mark.slow
def test_starting_up(cluster: LocalPostgres) -> None:
    """A standby whose WAL is gone waits for its checkpoint record before it begins to replay:
    it answers "starting up" for as long as that lasts (here until we stop it)."""
    make_standby(cluster)
    for segment in (cluster.data_dir / "pg_wal").iterdir():
        if segment.is_file():
            segment.unlink()
    account = server_account()
    uid, gid = account if account is not None else (None, None)
    binaries = cluster.binaries
    assert binaries is not None
    # Not pg_ctl start -w: it would wait for a server that never gets ready.
    with cluster.log_file.open("ab") as log:
        server = subprocess.Popen(
            [str(binaries / "postgres"), "-D", str(cluster.data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd="/",
            user=uid,
            group=gid,
            extra_groups=[] if uid is not None else None,
            start_new_session=True,
        )
    try:
        error = refusal(cluster, "the database system is starting up")
        assert_transient(error, "server_starting")
        # Not a moment: the state lasts.
        assert "starting up" in str(connect_error(cluster))
    finally:
        server.send_signal(signal.SIGQUIT)
        server.wait(STARTUP_TIMEOUT)


@pytest.mark.slow
def test_standby_with_hot_standby_off(cluster: LocalPostgres) -> None:
    """A standby with hot_standby off never takes connections: the same cause, whose hint
    names hot_standby (waiting does not help there, but the message cannot tell it from a
    primary's crash recovery with hot_standby off)."""
    make_standby(cluster)
    cluster.settings["hot_standby"] = "off"
    cluster.start_server()  # pg_ctl returns once recovery has begun
    error = refusal(cluster, "the database system is not accepting connections")
    assert "Hot standby mode is disabled." in str(error)
    cause = assert_transient(error, "server_starting")
    assert "hot_standby" in cause.hint


@pytest.mark.slow
def test_shutting_down(cluster: LocalPostgres) -> None:
    """A smart shutdown waits for the open sessions and refuses new ones; a fast shutdown then
    ends the sessions."""
    session = connect(cluster)
    os.kill(postmaster_pid(cluster), signal.SIGTERM)  # pg_ctl stop -m smart
    try:
        assert_transient(refusal(cluster, "is shutting down"), "server_shutting_down")
        assert session.cursor().execute("SELECT 1") is None  # still served
    finally:
        os.kill(postmaster_pid(cluster), signal.SIGINT)  # pg_ctl stop -m fast
    said = saying(goodbye(session), "terminating connection due to administrator command")
    assert_transient(said, "connection_lost")
    assert_transient(failure(session), "connection_lost")
    wait_stopped(cluster)


@pytest.mark.slow
def test_backend_crash(cluster: LocalPostgres) -> None:
    """A backend exits abnormally: the postmaster ends every session, waits for them to exit
    ("in recovery mode"), replays the WAL and serves again by itself."""
    stuck, bystander, victim = connect(cluster), connect(cluster), connect(cluster)
    stuck_pid = stuck.get_backend_pid()
    # A stopped backend cannot exit yet, so the postmaster waits for it (up to 5 s, then it
    # kills it): the state lasts until we let it go.
    os.kill(stuck_pid, signal.SIGSTOP)
    try:
        # A SIGQUIT that the postmaster did not send: the backend says so and exits with the
        # status of a crash.
        os.kill(victim.get_backend_pid(), signal.SIGQUIT)
        assert_transient(refusal(cluster, "in recovery mode"), "server_starting")
    finally:
        os.kill(stuck_pid, signal.SIGCONT)
    # Each session is told why (the server's last words), or, when the server's write did not
    # make it before the exit (a loaded machine), finds the connection closed: lost either way.
    for connection, words in (
        (victim, "terminating connection because of unexpected SIGQUIT"),
        (bystander, "terminating connection because of crash of another"),
    ):
        said = goodbye(connection)
        assert any(words in message for message in said) or said == [CLOSED], said
        for message in said:
            assert_transient(message, "connection_lost")
    for connection in (victim, bystander, stuck):
        if not connection.closed:  # (one that read the close above knows it already)
            assert_transient(failure(connection), "connection_lost")

    # It comes back by itself; whatever it answers meanwhile is transient.
    errors: list[psycopg2.OperationalError] = []

    def serving() -> bool:
        error = connect_error(cluster)
        if error is not None:
            errors.append(error)
        return error is None

    wait_until(serving, STARTUP_TIMEOUT, "the server after its crash")
    for error in errors:
        assert classify(error).transient, error


@pytest.mark.slow
def test_idle_session_timeout(cluster: LocalPostgres) -> None:
    session = connect(cluster, options="-c idle_session_timeout=100")
    said = saying(goodbye(session), "terminating connection due to idle-session timeout")
    assert_transient(said, "connection_lost")
    assert_transient(failure(session), "connection_lost")


@pytest.mark.slow
def test_connection_limits() -> None:
    """Every slot taken, a role's and a database's CONNECTION LIMIT reached."""
    limits = {"max_connections": "4", "superuser_reserved_connections": "0"}
    with LocalPostgres(settings=limits) as local, contextlib.ExitStack() as stack:
        local.execute("CREATE ROLE alex LOGIN CONNECTION LIMIT 1")
        local.execute("CREATE ROLE sam LOGIN")
        local.execute("CREATE DATABASE capped CONNECTION LIMIT 1")

        stack.enter_context(contextlib.closing(connect(local, user="alex")))
        error = connect_error(local, user="alex")
        assert 'too many connections for role "alex"' in str(error)
        assert_transient(t.cast(Exception, error), "too_many_connections")

        stack.enter_context(contextlib.closing(connect(local, user="sam", dbname="capped")))
        error = connect_error(local, user="sam", dbname="capped")
        assert 'too many connections for database "capped"' in str(error)
        assert_transient(t.cast(Exception, error), "too_many_connections")

        for _ in range(2):
            stack.enter_context(contextlib.closing(connect(local)))
        error = connect_error(local)
        assert "sorry, too many clients already" in str(error)
        assert_transient(t.cast(Exception, error), "too_many_connections")


# -- recovery conflicts on a hot standby ----------------------------------------------------------


@pytest.fixture(scope="module")
def replica() -> Iterator[Replica]:
    """A primary and a hot standby that cancels conflicting queries at once."""
    pair = Replica()
    pair.standby.settings["max_standby_streaming_delay"] = "0"
    with pair:
        yield pair


def replayed(pair: Replica) -> Callable[[], bool]:
    """Whether the standby has replayed everything the primary has written so far."""
    target = pair.primary.execute("SELECT pg_current_wal_lsn()::text")[0][0]
    sql = "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn"
    return lambda: bool(pair.standby.execute(sql, params=(target,))[0][0])


@pytest.mark.slow
def test_recovery_conflicts(replica: Replica) -> None:
    """On a hot standby, replaying the primary's DROPs cancels a query that holds a lock they
    need (the session lives on), ends an idle transaction holding one, and ends the sessions
    on a dropped database."""
    primary, standby = replica.primary, replica.standby
    primary.execute("CREATE TABLE queried AS SELECT 1 AS id")
    primary.execute("CREATE TABLE held (id int)")
    primary.execute("CREATE DATABASE doomed")
    wait_until(replayed(replica), STARTUP_TIMEOUT, "the standby's replay")

    idle = connect(standby)
    idle.autocommit = False
    idle.cursor().execute("SELECT count(*) FROM held")  # locked until the transaction ends
    in_doomed = connect(standby, dbname="doomed")
    busy = connect(standby)
    errors: list[psycopg2.Error] = []

    def query() -> None:
        try:
            busy.cursor().execute("SELECT pg_sleep(60) FROM queried")
        except psycopg2.Error as exc:
            errors.append(exc)

    sleeper = threading.Thread(target=query, name="sleeper", daemon=True)
    sleeper.start()
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
    wait_until(lambda: standby.execute(sleeping)[0][0] == 1, 10, "the query on the standby")

    primary.execute("DROP TABLE queried, held")
    sleeper.join(30)
    assert not sleeper.is_alive()
    assert len(errors) == 1
    assert "canceling statement due to conflict with recovery" in str(errors[0])
    assert_transient(errors[0], "recovery_conflict")
    assert busy.cursor().execute("SELECT 1") is None  # only the statement was cancelled

    said = saying(goodbye(idle), "terminating connection due to conflict with recovery")
    assert "relation lock" in said
    assert_transient(said, "recovery_conflict")

    primary.execute("DROP DATABASE doomed")  # SQLSTATE 57P04, database_dropped
    said = saying(goodbye(in_doomed), "terminating connection due to conflict with recovery")
    assert "must be dropped" in said
    assert_transient(said, "recovery_conflict")
    for connection in (idle, in_doomed, busy):
        connection.close()


# -- crash recovery under traffic -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answer:
    path: str
    started: float
    ended: float
    status: int
    retry_after: str | None
    cause: str | None


class Traffic(threading.Thread):
    """Requests ``path`` of ``app`` with the Flask test client every 10 ms or so, until
    stopped (the pause leaves the 2 cores to the server)."""

    def __init__(self, app: Flask, path: str, stop: threading.Event) -> None:
        super().__init__(name=f"traffic {path}", daemon=True)
        self.app, self.path, self.stop = app, path, stop
        self.answers: list[Answer] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        client = self.app.test_client()
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                response = client.get(self.path)
                body = response.get_json(silent=True) or {}
                self.answers.append(
                    Answer(
                        self.path,
                        started,
                        time.monotonic(),
                        response.status_code,
                        response.headers.get("Retry-After"),
                        body.get("cause"),
                    )
                )
                self.stop.wait(0.01)
        except BaseException as exc:  # reported by the test
            self.error = exc


class Prober(threading.Thread):
    """Connects with plain psycopg2 every 10 ms until a connect succeeds, keeping each error."""

    def __init__(self, cluster: LocalPostgres) -> None:
        super().__init__(name="prober", daemon=True)
        self.cluster = cluster
        self.errors: list[tuple[float, psycopg2.OperationalError]] = []
        self.served_at: float | None = None

    def run(self) -> None:
        while True:
            at = time.monotonic()
            error = connect_error(self.cluster)
            if error is None:
                self.served_at = at
                return
            self.errors.append((at, error))
            time.sleep(0.01)

    def first(self, text: str) -> tuple[float, psycopg2.OperationalError] | None:
        return next(((at, e) for at, e in self.errors if text in str(e)), None)


@pytest.fixture
def crashable() -> Iterator[LocalPostgres]:
    """A cluster that keeps all the WAL written since its last checkpoint for a replay."""
    settings = {
        # No checkpoint between the writes and the crash...
        "max_wal_size": "4GB",
        "checkpoint_timeout": "1h",
        # ...and full page images in the WAL, as on a production server.
        "full_page_writes": "on",
    }
    with LocalPostgres(settings=settings) as local:
        yield local


@pytest.mark.slow
def test_crash_recovery_under_traffic(crashable: LocalPostgres, make_app: AppFactory) -> None:
    """The server stops without a checkpoint and starts again, replaying about 200 MB of WAL,
    while requests keep coming.

    No request fails with anything but a 503 with Retry-After naming a transient cause; those
    made during the replay name ``server_starting``; ``flask db-check --wait`` started during
    the replay waits for its end and succeeds; once the server is back every request succeeds,
    with the same app and pool.
    """
    cluster = crashable
    began = time.monotonic()
    cluster.execute("CREATE TABLE filler (id int, pad text)")
    cluster.execute("CHECKPOINT")
    cluster.execute(
        "INSERT INTO filler SELECT g, repeat('x', 100) FROM generate_series(1, %s) g",
        params=(REPLAY_ROWS,),
    )
    wal_mb = cluster.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), redo_lsn) / 1e6 FROM pg_control_checkpoint()"
    )[0][0]
    assert wal_mb > 150, f"only {wal_mb:.0f} MB of WAL to replay"
    written = time.monotonic()

    # Short connect retries, so that a request made during the replay answers within it, and
    # a health probe for each GET /health/db.
    app, db = make_app(cluster.url, DB_CONNECT_RETRY_SECONDS=0.2, DB_HEALTH_CACHE_SECONDS=0)
    # No retries inside the engine: each attempt of --wait is one connect.
    cli_app, cli_db = make_app(cluster.url, DB_CONNECT_RETRY_SECONDS=0)

    @app.get("/filler")
    def filler() -> dict[str, t.Any]:
        return {"max": db.session.scalar(sa.text("SELECT max(id) FROM filler"))}

    retry_after = str(db.state(app).settings.retry_after)
    held = connect(cluster)  # the immediate shutdown says goodbye to it
    stop = threading.Event()
    traffic = [Traffic(app, path, stop) for path in ("/filler", "/filler", "/health/db")]
    prober = Prober(cluster)
    started: list[float | BaseException] = []

    def start_server() -> None:
        try:
            cluster.start_server()  # pg_ctl start -w: returns once the server takes connections
            started.append(time.monotonic())
        except BaseException as exc:  # reported by the test
            started.append(exc)

    starter = threading.Thread(target=start_server, name="starter", daemon=True)

    def answers(path: str = "/filler") -> list[Answer]:
        return [a for loop in traffic for a in loop.answers if a.path == path]

    try:
        for loop in traffic:
            loop.start()
        wait_until(lambda: sum(a.status == 200 for a in answers()) >= 10, 20, "traffic")

        crashed_at = time.monotonic()
        stop_immediately(cluster)
        prober.start()
        goodbye_said = goodbye(held)
        wait_until(
            lambda: sum(a.started > crashed_at for a in answers()) >= 4, 20, "requests while down"
        )
        restarted_at = time.monotonic()
        starter.start()
        wait_until(lambda: prober.first(NOT_YET_ACCEPTING) is not None, 30, "the replay")

        cli_started = time.monotonic()
        result = cli_app.test_cli_runner().invoke(args=["db-check", "--wait", "60"])
        cli_ended = time.monotonic()

        starter.join(STARTUP_TIMEOUT + 60)
        assert len(started) == 1
        ready_at = started[0]
        assert isinstance(ready_at, float), ready_at
        wait_until(lambda: prober.served_at is not None, 10, "a plain connect")
        wait_until(
            lambda: sum(a.started > ready_at and a.status == 200 for a in answers()) >= 10,
            20,
            "traffic after the replay",
        )
        wait_until(
            lambda: any(a.started > ready_at and a.status == 200 for a in answers("/health/db")),
            20,
            "a healthy /health/db",
        )
    finally:
        stop.set()
        for loop in traffic:
            loop.join(30)
        db.state(app).engine.dispose()
        cli_db.state(cli_app).engine.dispose()
        held.close()
    assert [loop.error for loop in traffic] == [None] * len(traffic)

    # Every answer: 200, or 503 with Retry-After and a transient cause. Never a 500.
    everything = [a for loop in traffic for a in loop.answers]
    for answer in everything:
        assert answer.status in (200, 503), answer
        if answer.status == 503:
            assert answer.retry_after == retry_after, answer
            assert answer.cause in TRANSIENT, answer

    # db-check, started during the replay, met it at its first attempt and waited it out.
    assert result.exit_code == 0, result.output
    progress = result.stderr.splitlines()
    assert progress, result.output
    assert "server_starting" in progress[0], result.stderr

    # The immediate shutdown's goodbye to a session.
    assert_transient(saying(goodbye_said, "due to immediate shutdown command"), "connection_lost")

    # The replay, as a plain connect saw it: the real exception of that phase.
    first_replay = prober.first(NOT_YET_ACCEPTING)
    assert first_replay is not None
    replay_at, replay_error = first_replay
    assert "Consistent recovery state has not been yet reached." in str(replay_error)
    assert_transient(replay_error, "server_starting")
    for _, error in prober.errors:
        assert classify(error).transient, error
    served_at = prober.served_at
    assert served_at is not None

    for path in ("/filler", "/health/db"):
        during = [a for a in answers(path) if replay_at <= a.started and a.ended <= served_at]
        assert any(a.status == 503 and a.cause == "server_starting" for a in during), during
    # Back to normal with the same app and pool.
    after = [a for a in answers() if a.started > ready_at]
    assert [a.status for a in after] == [200] * len(after)

    redo = re.search(r"redo done at .* elapsed: ([\d.]+) s", cluster.log_file.read_text())
    last_replay_at = max(at for at, e in prober.errors if NOT_YET_ACCEPTING in str(e))
    replay_connects = sum(NOT_YET_ACCEPTING in str(e) for _, e in prober.errors)
    seen = collections.Counter(classify(e).name for _, e in prober.errors)
    statuses = collections.Counter(f"{a.path} {a.status} {a.cause or ''}" for a in everything)
    print(
        f"\ncrash recovery: {wal_mb:.0f} MB of WAL written in {written - began:.1f} s; the "
        f"server's log: redo {redo.group(1) if redo else '?'} s; 'not yet accepting' for "
        f"{last_replay_at - replay_at:.2f} s ({replay_connects} plain connects), first plain "
        f"connect served {served_at - replay_at:.2f} s after the first refusal; down "
        f"{restarted_at - crashed_at:.2f} s before the restart; plain connects {dict(seen)}; "
        f"answers {dict(statuses)}; db-check waited {cli_ended - cli_started:.2f} s, "
        f"{len(progress)} retries, first: {progress[0]}"
    )
