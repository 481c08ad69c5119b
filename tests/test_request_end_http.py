"""When a request's response has reached the client, no other request can find what its
transactions locked: the same app on Flask-SQLAlchemy (the oracle: its sessions end in Flask's
teardown) and on flask-neon, under gunicorn with each worker class, over real HTTP.

A holder request takes a lock (a row ``FOR UPDATE``, an ``UPDATE``, an advisory lock, a write
whose view then fails with a 500) and answers without committing; the client then sends the
next request at once, whose view probes the lock (``FOR UPDATE NOWAIT``,
``pg_try_advisory_xact_lock``, an ``UPDATE`` under ``lock_timeout = '1ms'``): it must never be
refused. A plain read may keep its transaction until after the response on flask-neon (the
saving of a round trip) because it holds nothing a probe can see; its ``ROLLBACK`` is measured
to still come after the response, and a locking request's before it.

The app's connections to PostgreSQL go through :class:`~tests.lock_probes.JitterProxy`, which
holds one message in ten back for 10 ms, as a real network does now and then: nothing orders two
connections. A library that sends the ``ROLLBACK`` and answers without waiting for its reply
(flask-neon before this change, for every transaction) is then caught by the next request's
probe, whatever the machine's load; one that waits for the reply is not, however the network
behaves. Checked: with ``PYTHONPATH`` pointing at a copy of ``flask_neon`` whose ``_request.py``
is that of commit 87a2893 (gunicorn takes the test run's ``PYTHONPATH`` first), every worker
class fails, with 2-12% of flask-neon's probes refused and none of Flask-SQLAlchemy's.

The second part: a WSGI middleware that never calls the response's ``close()`` (against
PEP 3333). flask-neon ends the sessions it handed to that response within
``CLOSE_GRACE_SECONDS`` (a watchdog) or at its thread's next request, warns once, and ends the
app's sessions before the response from then on; the pool never runs dry.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import pathlib
import select
import socket
import threading
import time
import typing as t
import uuid
from collections.abc import Callable, Iterator

import psycopg2  # type: ignore[import-untyped]
import pytest

from flask_neon._request import CLOSE_GRACE_SECONDS
from flask_neon._url import parse_url

from . import lock_probes
from .conftest import admin_execute, wait_until
from .http_server import LiveServer
from .lock_probes import (
    CLIENT_TIMEOUT,
    KINDS,
    LIBRARIES,
    Gunicorn,
    JitterProxy,
    Library,
    Tally,
    get,
)
from .proxy import FaultProxy

TRIES = 200
#: The network's hiccups: this share of the app's messages to PostgreSQL waits this long.
HICCUP_ODDS = 0.1
HICCUP_S = 0.010


@pytest.fixture(scope="module")
def probe_database(database_url: str) -> Iterator[str]:
    """A database of this module's own, with the rows the locks are taken on."""
    name = f"lock_probe_{uuid.uuid4().hex[:10]}"
    admin_execute(database_url, f'CREATE DATABASE "{name}"')
    url = parse_url(database_url).to_sqlalchemy().set(database=name)
    rendered = url.render_as_string(hide_password=False)
    try:
        lock_probes.prepare_database(lambda sql: admin_execute(rendered, sql))
        yield rendered
    finally:
        admin_execute(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def network(probe_database: str) -> Iterator[JitterProxy]:
    """The network between the apps and PostgreSQL (see the module)."""
    url = parse_url(probe_database)
    proxy = JitterProxy((url.host or "127.0.0.1", url.port or 5432), HICCUP_S, odds=HICCUP_ODDS)
    yield proxy
    proxy.close()


def app_env(url: str, library: Library, **options: str) -> dict[str, str]:
    return {lock_probes.ENV_URL: url, lock_probes.ENV_LIBRARY: library, **options}


def tracebacks_but_the_failing_view(log: str) -> int:
    """Tracebacks in a gunicorn log other than the failing view's own."""
    return log.count("Traceback (most recent call last)") - log.count(lock_probes.VIEW_FAILED)


# -- the next request never finds the locks held ---------------------------------------------

#: worker class, gunicorn options, client streams per server, async views. Each stream is a
#: client that sends a request only once it has the answer to its previous one; sync and gevent
#: workers get as many streams as workers, so that a request does not wait in the listen
#: queue behind another stream's (it would give the last ROLLBACK all the time it needs).
#: No --preload (gunicorn's default; test_under_preload_... covers a forked app).
SERVERS: dict[str, tuple[str, dict[str, t.Any], int, bool]] = {
    "sync": ("sync", {"workers": 2}, 2, False),
    "gthread": ("gthread", {"workers": 1, "threads": 4}, 4, False),
    "gevent": ("gevent", {"workers": 2}, 2, False),
    "gthread-async-views": ("gthread", {"workers": 1, "threads": 4}, 4, True),
}


def refusal_table(tallies: t.Mapping[Library, Tally]) -> str:
    lines = [f"{'':18}" + "".join(f"{kind:>14}" for kind in KINDS)]
    for library, tally in tallies.items():
        cells = "".join(f"{tally.refused[kind]:>7} of {tally.tries[kind]:<3}" for kind in KINDS)
        lines.append(f"{library:18}{cells}")
    return "\n".join(lines)


@pytest.mark.parametrize("server", SERVERS)
def test_the_next_request_never_finds_the_locks_held(
    server: str, probe_database: str, network: JitterProxy, tmp_path: pathlib.Path
) -> None:
    worker_class, options, streams, async_views = SERVERS[server]
    if worker_class == "gevent":
        pytest.importorskip("gevent")
    url = network.url(probe_database)
    extra = {lock_probes.ENV_ASYNC: "1" if async_views else "0"}

    def serve(library: Library) -> Callable[[], Gunicorn]:
        env = app_env(url, library, **extra)
        return lambda: Gunicorn(worker_class, env, tmp_path, **options)

    with lock_probes.gunicorns(*(serve(library) for library in LIBRARIES)) as servers:
        jobs = {
            lib: (gunicorn.port, streams) for lib, gunicorn in zip(LIBRARIES, servers, strict=True)
        }
        tallies = lock_probes.in_streams(jobs, TRIES)
    print(f"\n{server}: refusals of the next request's probe\n{refusal_table(tallies)}")
    for library, gunicorn in zip(LIBRARIES, servers, strict=True):
        tally = tallies[library]
        assert tally.unexpected == [], (library, tally.unexpected[:5])
        assert dict(tally.tries) == dict.fromkeys(KINDS, TRIES), library
        log = gunicorn.log_text()
        assert tracebacks_but_the_failing_view(log) == 0, log[-3000:]
    assert {library: sum(tallies[library].refused.values()) for library in LIBRARIES} == {
        library: 0 for library in LIBRARIES
    }, refusal_table(tallies)


# -- a plain read's ROLLBACK still comes after the response, a locking one's before --------

#: When each library's ROLLBACK reaches the server: before or after the client has the answer.
ROLLBACK_COMES: dict[Library, dict[str, str]] = {
    "flask_sqlalchemy": dict.fromkeys(KINDS, "before"),
    "flask_neon": {**dict.fromkeys(KINDS, "before"), "read": "after"},
}


def when_the_rollback_comes(proxy: FaultProxy, port: int, kind: str) -> str:
    """Hold the next ROLLBACK back at ``proxy`` while ``/hold/<kind>`` is answered: "after"
    when the answer is at the client once the ROLLBACK reached the proxy, "before" when it is
    not (it cannot come before the ROLLBACK's reply).

    The answer is looked for without reading it, as soon as the ROLLBACK is held: a server
    that wrote it before sending the ROLLBACK wrote it to loopback, where it is in the
    client's socket when ``send`` returns, long before the ROLLBACK is through the proxy.
    """
    proxy.held.clear()
    proxy.release.clear()
    proxy.hold = "ROLLBACK"
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as client:
        try:
            client.sendall(
                f"GET /hold/{kind}/0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            wait_until(proxy.held.is_set, message=f"{kind}: the ROLLBACK at the proxy")
            readable, _, _ = select.select([client], [], [], 0)
        finally:
            proxy.hold = None
            proxy.release.set()
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status == (500 if kind == "failed_write" else 200), (kind, answer[:200])
    return "after" if readable else "before"


def test_a_plain_reads_rollback_comes_after_the_response_a_locking_ones_before(
    probe_database: str, proxy: FaultProxy, tmp_path: pathlib.Path
) -> None:
    url = proxy.url(probe_database)

    def serve(library: Library) -> Callable[[], Gunicorn]:
        return lambda: Gunicorn("sync", app_env(url, library), tmp_path)

    with lock_probes.gunicorns(*(serve(library) for library in LIBRARIES)) as servers:
        found: dict[Library, dict[str, str]] = {}
        for library, server in zip(LIBRARIES, servers, strict=True):
            # SQLAlchemy's first ROLLBACK (its dialect setup) and a write's go before the
            # answer: none is still on its way when the hold begins.
            assert get(server.port, "/hold/update/1")[0] == 200
            found[library] = {
                kind: when_the_rollback_comes(proxy, server.port, kind) for kind in KINDS
            }
    assert found == ROLLBACK_COMES


def test_under_preload_the_next_request_does_not_wait_for_a_rollback_in_flight(
    probe_database: str, proxy: FaultProxy, tmp_path: pathlib.Path
) -> None:
    # As tests/test_request_end.py's test_the_request_thread_does_not_wait_for_the_rollback_reply,
    # in a gunicorn worker forked from a master that imported the app: flask-neon's fork hook
    # disposes the engine there, and the recreated pool once lost the driver that reads a
    # ROLLBACK's reply (it handed the connection out with the ROLLBACK in flight, and the
    # next request waited for it in libpq: no answer within 3 s).
    env = app_env(proxy.url(probe_database), "flask_neon")
    with Gunicorn("sync", env, tmp_path, preload=True) as server:
        # SQLAlchemy's first ROLLBACK (its dialect setup) and a write's go before the answer:
        # none is still on its way when the hold begins.
        assert get(server.port, "/hold/update/1")[0] == 200
        proxy.hold = "ROLLBACK"
        try:
            status, first, _ = get(server.port, "/ready")  # a read: its ROLLBACK comes after
            assert status == 200
            wait_until(proxy.held.is_set, message="the ROLLBACK at the proxy")
            # Another connection, while this one's ROLLBACK is in flight; not this one, whose
            # ROLLBACK reply libpq would wait for first.
            status, then, _ = get(server.port, "/ready", timeout=3)
        finally:
            proxy.hold = None
            proxy.release.set()
        assert status == 200
        assert then["pid"] != first["pid"]


# -- a middleware that never calls the response's close() ------------------------------------

#: A pool that a few requests whose sessions never ended would drain at once.
SMALL_POOL: dict[str, float] = {"size": 2, "overflow": 0, "timeout": 5}
DROPPED_CLOSE_SERVERS = ("gunicorn-sync", "gunicorn-gthread", "werkzeug")
WARNING = "was not closed within"
#: The longest a request may take behind such a middleware: the watchdog's turn, and some.
ANSWER_BOUND = CLOSE_GRACE_SECONDS + 1.5


class DroppedCloseServer(t.Protocol):
    @property
    def port(self) -> int: ...

    def warnings(self) -> list[str]: ...


@dataclasses.dataclass
class _Gunicorned:
    server: Gunicorn

    @property
    def port(self) -> int:
        return self.server.port

    def warnings(self) -> list[str]:
        return [line for line in self.server.log_text().splitlines() if WARNING in line]


@dataclasses.dataclass
class _Werkzeuged:
    live: LiveServer
    caplog: pytest.LogCaptureFixture

    @property
    def port(self) -> int:
        return self.live.port

    def warnings(self) -> list[str]:
        return [
            record.getMessage()
            for record in self.caplog.records
            if record.name == "flask_neon" and WARNING in record.getMessage()
        ]


@contextlib.contextmanager
def behind_dropped_close(
    server: str,
    libraries: t.Sequence[Library],
    url: str,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> Iterator[list[DroppedCloseServer]]:
    """Each library's app behind :class:`~tests.lock_probes.DropClose` with a small pool, on
    ``server``: gunicorn (one worker; its own process) or werkzeug's (in this process)."""
    options: dict[str, str] = {
        lock_probes.ENV_DROP_CLOSE: "1",
        lock_probes.ENV_POOL: json.dumps(SMALL_POOL),
    }
    if server.startswith("gunicorn-"):
        worker_class = server.removeprefix("gunicorn-")
        threads = 4 if worker_class == "gthread" else 1

        def serve(library: Library) -> Callable[[], Gunicorn]:
            env = app_env(url, library, **options)
            return lambda: Gunicorn(worker_class, env, tmp_path, threads=threads)

        with lock_probes.gunicorns(*(serve(library) for library in libraries)) as servers:
            yield [_Gunicorned(gunicorn) for gunicorn in servers]
        return
    apps = [
        lock_probes.create_app(library, url, drop_close=True, pool=SMALL_POOL)
        for library in libraries
    ]
    try:
        with contextlib.ExitStack() as stack:
            lives = [stack.enter_context(LiveServer(app)) for app in apps]
            yield [_Werkzeuged(live, caplog) for live in lives]
            for live in lives:
                assert live.errors == []
    finally:
        for app in apps:
            with app.app_context():
                app.extensions["lock_probe"].engine.dispose()


def wait_for_the_warning(app: DroppedCloseServer) -> None:
    wait_until(lambda: len(app.warnings()) > 0, message="the warning")


class Backends:
    """What PostgreSQL's backends are doing, read on one connection of its own."""

    def __init__(self, url: str) -> None:
        self._connection = psycopg2.connect(
            parse_url(url).to_sqlalchemy().set(drivername="postgresql").render_as_string(False)
        )
        self._connection.autocommit = True

    def state(self, pid: int) -> str:
        with self._connection.cursor() as cursor:
            cursor.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid])
            found = cursor.fetchone()
        return str(found[0]) if found else "gone"

    def close(self) -> None:
        self._connection.close()


@pytest.fixture
def backends(probe_database: str) -> Iterator[Backends]:
    watcher = Backends(probe_database)
    yield watcher
    watcher.close()


def ended_before_each_response(port: int, backends: Backends, requests: int = 20) -> list[str]:
    """The state of each read's backend right after its answer: "idle" when its session ended
    before the response."""
    states = []
    for _ in range(requests):
        status, body, _ = get(port, "/ready", timeout=ANSWER_BOUND)
        assert status == 200, (status, body)
        states.append(backends.state(body["pid"]))
    return states


@pytest.mark.parametrize("server", DROPPED_CLOSE_SERVERS)
def test_a_response_never_closed_has_its_sessions_ended_by_the_watchdog(
    server: str,
    probe_database: str,
    backends: Backends,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with behind_dropped_close(server, ["flask_neon"], probe_database, tmp_path, caplog) as [app]:
        status, body, answered = get(app.port, "/ready")
        assert status == 200
        pid = body["pid"]
        # Handed to the response's close(), which never comes: open after the answer.
        assert backends.state(pid) == "idle in transaction"
        while backends.state(pid) == "idle in transaction":
            assert time.monotonic() - answered < CLOSE_GRACE_SECONDS + 5, "never ended"
        ended = time.monotonic() - answered
        print(f"\n{server}: the session ended {ended:.3f} s after the answer")
        assert ended <= CLOSE_GRACE_SECONDS + 0.5
        wait_for_the_warning(app)
        # From now on the app's sessions end before the response, as Flask-SQLAlchemy's.
        assert set(ended_before_each_response(app.port, backends)) == {"idle"}
        [warning] = app.warnings()
        assert "middleware" in warning, warning
        assert "PEP 3333" in warning, warning


def test_a_response_never_closed_has_its_sessions_ended_by_the_threads_next_request(
    probe_database: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # gunicorn's sync worker serves every request on its one thread.
    with behind_dropped_close(
        "gunicorn-sync", ["flask_neon"], probe_database, tmp_path, caplog
    ) as [app]:
        status, first, answered = get(app.port, "/ready")
        assert status == 200
        status, then, next_answered = get(app.port, f"/state/{first['pid']}")
        assert status == 200
        print(f"\nthe next request came {next_answered - answered:.3f} s after the first")
        assert next_answered - answered < CLOSE_GRACE_SECONDS  # before the watchdog's turn
        # Its first statement saw the first request's transaction ended ("active" when it got
        # the same connection).
        assert then["state"] in ("idle", "active"), then
        wait_for_the_warning(app)
        assert len(app.warnings()) == 1


def many_reads(port: int, requests: int, clients: int) -> list[tuple[int, float]]:
    """``requests`` reads from ``clients`` threads at once: (status, seconds) of each; status 0
    for no answer within :data:`ANSWER_BOUND` (the reads after it are not sent: -1)."""
    stop = threading.Event()

    def read(_: int) -> tuple[int, float]:
        if stop.is_set():
            return -1, 0.0
        started = time.monotonic()
        try:
            status, _, answered = get(port, "/ready", timeout=ANSWER_BOUND)
        except TimeoutError:
            stop.set()
            return 0, time.monotonic() - started
        return status, answered - started

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(read, range(requests)))


@pytest.mark.parametrize("server", DROPPED_CLOSE_SERVERS)
def test_behind_a_middleware_that_drops_close_the_pool_never_runs_dry(
    server: str,
    probe_database: str,
    backends: Backends,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with behind_dropped_close(server, LIBRARIES, probe_database, tmp_path, caplog) as apps:
        for library, app in zip(LIBRARIES, apps, strict=True):
            started = time.monotonic()
            answers = many_reads(app.port, requests=100, clients=4)
            took = time.monotonic() - started
            slowest = max(seconds for _, seconds in answers)
            print(f"\n{server} {library}: 100 reads in {took:.2f} s, slowest {slowest:.3f} s")
            assert [status for status, _ in answers] == [200] * 100
            # None waited for a connection longer than the watchdog's turn (pool timeout: 5 s).
            assert slowest < ANSWER_BOUND
            assert set(ended_before_each_response(app.port, backends)) == {"idle"}
            if library == "flask_neon":
                wait_for_the_warning(app)
                assert len(app.warnings()) == 1, app.warnings()
            else:  # Flask-SQLAlchemy ended every session at teardown
                assert app.warnings() == []
