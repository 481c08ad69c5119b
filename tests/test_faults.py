"""Fault injection over real HTTP: the example app on werkzeug's threaded server, driven by
concurrent clients while the database fails under it.

Nothing is mocked. Backends are killed with ``pg_terminate_backend``, a dedicated cluster is
stopped and started again, the pool is exhausted by requests that hold their connection, and
the server's own statement and idle-in-transaction timeouts cancel work. Every wait polls
against a deadline; every time bound is generous for a busy 2-core machine yet proves that
nothing hangs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import pathlib
import threading
import time
import typing as t
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import psycopg2  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
from flask import Flask, got_request_exception, request

from example_app import create_app
from example_app.extensions import db
from example_app.models import Note
from flask_neon._settings import NeonSettings
from flask_neon._url import parse_url
from flask_neon.local import LocalPostgres

from .conftest import admin_execute, backend_pids, terminate_backends
from .http_server import LiveServer, Reply
from .servers import wait_until

#: Added to time bounds: thread scheduling and HTTP round trips on a busy 2-core machine.
SLACK = 2.0
#: The longest a test route blocks waiting for the test, so a failing test cannot hang the run.
HOLD_LIMIT = 30.0
#: Title prefix of the notes /fail writes before raising: none of them may ever be committed.
FAIL_PREFIX = "fail-"
#: Text that must never reach a client: it would mean a traceback or driver error leaked.
LEAK_MARKERS = (b"Traceback", b"psycopg2", b"sqlalchemy", b'File "')

Spec = tuple[str, str, t.Any]  # method, path, JSON body (None: no body)

#: DB_RETRY_AFTER's default, the Retry-After of every 503.
RETRY_AFTER = NeonSettings.model_fields["retry_after"].default


# -- the app under test ---------------------------------------------------------------------------


@dataclasses.dataclass
class Controls:
    """What the test routes share with the test: events that release views, and counters."""

    release: threading.Event = dataclasses.field(default_factory=threading.Event)
    resume: threading.Event = dataclasses.field(default_factory=threading.Event)
    holding: int = 0
    sleeps: int = 0
    idle_pid: int | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def count(self, name: t.Literal["holding", "sleeps"]) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


def add_fault_routes(app: Flask, controls: Controls) -> None:
    """Routes that provoke faults, next to the example app's own /notes API."""

    @app.get("/pid")
    def pid() -> dict[str, t.Any]:
        return {"pid": db.session.scalar(sa.text("SELECT pg_backend_pid()"))}

    @app.get("/sleep/<float:seconds>")
    def sleep(seconds: float) -> dict[str, t.Any]:
        controls.count("sleeps")
        db.session.execute(sa.text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})
        return {"slept": seconds}

    @app.post("/fail")
    def fail() -> dict[str, t.Any]:
        db.session.add(Note(title=FAIL_PREFIX + request.args["tag"]))
        db.session.flush()  # the INSERT reaches the server, inside the request's transaction
        raise RuntimeError("the view failed after writing")

    @app.get("/hold")
    def hold() -> dict[str, t.Any]:
        db.session.execute(sa.text("SELECT 1"))  # a connection is checked out from here on
        controls.count("holding")
        return {"released": controls.release.wait(HOLD_LIMIT)}

    @app.get("/idle")
    def idle() -> dict[str, t.Any]:
        # The first query opens a transaction, which then sits idle until the test resumes us.
        backend = db.session.scalar(sa.text("SELECT pg_backend_pid()"))
        controls.idle_pid = backend
        controls.resume.wait(HOLD_LIMIT)
        if request.args.get("then") == "query":
            db.session.execute(sa.text("SELECT 1"))
        return {"pid": backend}


def build_app(url: str, **config: t.Any) -> tuple[Flask, Controls]:
    """The example app on ``url`` with the fault routes and its tables created.

    ``PROPAGATE_EXCEPTIONS`` is off so that an exception in a view reaches the app's JSON
    error handler, as in production, rather than escaping to the server's bare 500 page.
    """
    app = create_app({"DB_URL": url, "TESTING": True, "PROPAGATE_EXCEPTIONS": False, **config})
    controls = Controls()
    add_fault_routes(app, controls)
    with app.app_context():
        db.metadata.create_all(db.engine)
    return app, controls


@contextlib.contextmanager
def serve(app: Flask) -> Iterator[LiveServer]:
    """Serve ``app`` over HTTP; afterwards close the server and the app's engine.

    On a normal exit it also checks that no exception escaped to werkzeug.
    """
    server = LiveServer(app)
    try:
        yield server
    finally:
        try:
            server.close()
        finally:
            db.state(app).engine.dispose()
    assert server.errors == []


# -- helpers --------------------------------------------------------------------------------------


def dsn(url: str) -> str:
    return parse_url(url).to_sqlalchemy().set(drivername="postgresql").render_as_string(False)


def notes_traffic(count: int, tag: str) -> list[Spec]:
    """The example app's ordinary work: two reads of a page of notes for every note created."""
    return [
        ("POST", "/notes", {"title": f"{tag}-{i}"})
        if i % 3 == 0
        else ("GET", "/notes?limit=5", None)
        for i in range(count)
    ]


def run_requests(server: LiveServer, specs: Sequence[Spec], threads: int) -> list[Reply]:
    """Send ``specs`` from ``threads`` concurrent clients; replies in the order of ``specs``."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda spec: server.request(*spec), specs))


def failures(replies: Sequence[Reply]) -> list[str]:
    return [f"{reply.status} {reply.text[:300]}" for reply in replies if not reply.ok]


def checked_out(app: Flask) -> int:
    return int(db.pool_stats(app)["checked_out"])


def assert_clean_error(reply: Reply, status: int) -> dict[str, t.Any]:
    """``reply`` is a JSON error with ``status`` and shows nothing of the server's internals."""
    assert reply.status == status, reply.text
    assert reply.headers["content-type"] == "application/json", reply.headers
    for marker in LEAK_MARKERS:
        assert marker not in reply.body, reply.text
    body = reply.json()
    assert isinstance(body, dict)
    assert body["error"]
    return body


def sleeping_pids(url: str) -> list[int]:
    """Backends of the app that are running a pg_sleep right now."""
    rows = admin_execute(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'flask-neon%%' AND state = 'active' "
        "AND query LIKE '%%pg_sleep%%' AND pid <> pg_backend_pid()",
    )
    return [row[0] for row in rows]


def rss_kib() -> int:
    """Resident memory of this process, after a full garbage collection."""
    gc.collect()
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line in /proc/self/status")


class BackendMonitor:
    """Sample the app's backends on the server from a thread, every ``interval`` seconds.

    ``maximum`` is the largest count seen. A backend lingers in ``pg_stat_activity`` for a
    moment after the app has closed its connection (while the process exits), so when
    overflow connections come and go a sample can show one more than the app ever held.
    ``lasting_maximum`` counts only backends present in two samples at least ``settle``
    seconds apart: an exiting backend is gone by then, a leaked one is not.
    """

    def __init__(self, url: str, interval: float = 0.05, settle: float = 0.25) -> None:
        self.maximum = 0
        self.lasting_maximum = 0
        self.samples = 0
        self.error: BaseException | None = None
        self._interval = interval
        self._settle = settle
        self._connection = psycopg2.connect(dsn(url))
        self._connection.autocommit = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backend-monitor", daemon=True)

    def _run(self) -> None:
        # (when, pids) of recent samples; the first is the newest at least ``settle`` old.
        history: collections.deque[tuple[float, frozenset[int]]] = collections.deque()
        try:
            with self._connection.cursor() as cursor:
                while True:
                    cursor.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name LIKE 'flask-neon%'"
                    )
                    now = time.monotonic()
                    pids = frozenset(row[0] for row in cursor.fetchall())
                    self.maximum = max(self.maximum, len(pids))
                    while len(history) > 1 and now - history[1][0] >= self._settle:
                        history.popleft()
                    if history and now - history[0][0] >= self._settle:
                        lasting = len(history[0][1] & pids)
                        self.lasting_maximum = max(self.lasting_maximum, lasting)
                    history.append((now, pids))
                    self.samples += 1
                    if self._stop.wait(self._interval):
                        return
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> BackendMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._connection.close()
        assert not self._thread.is_alive(), "the backend monitor did not stop"
        assert self.error is None, f"the backend monitor failed: {self.error!r}"


class LoadLoop:
    """Client threads sending notes traffic back to back until the block ends; keeps replies."""

    def __init__(self, server: LiveServer, threads: int) -> None:
        self.server = server
        self.replies: list[Reply] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"load-{n}", daemon=True)
            for n in range(threads)
        ]

    def _run(self, n: int) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                if i % 3 == 0:
                    reply = self.server.request("POST", "/notes", {"title": f"load-{n}-{i}"})
                else:
                    reply = self.server.request("GET", "/notes?limit=5")
                self.replies.append(reply)
                i += 1
        except BaseException as exc:
            self.errors.append(exc)

    def count(self, predicate: Callable[[Reply], bool]) -> int:
        return sum(1 for reply in list(self.replies) if predicate(reply))

    def __enter__(self) -> LoadLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(HOLD_LIMIT)
        assert not any(thread.is_alive() for thread in self._threads), "a client hung"
        assert self.errors == [], self.errors


def wait_for_server(cluster: LocalPostgres, timeout: float = 30.0) -> float:
    """Poll with plain psycopg2 until the server accepts a connection; return that moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = psycopg2.connect(
                host=cluster.host,
                port=cluster.port,
                user=cluster.user,
                dbname=cluster.database,
                connect_timeout=2,
            )
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the server did not come back within {timeout:g} s"
                ) from None
            time.sleep(0.01)
            continue
        accepted = time.monotonic()
        connection.close()
        return accepted


@pytest.fixture(scope="module")
def outage_cluster() -> Iterator[LocalPostgres]:
    """A cluster of this module's own, stopped and started by tests without harming others."""
    cluster = LocalPostgres().start()
    try:
        yield cluster
    finally:
        cluster.stop()


# -- terminated backends --------------------------------------------------------------------------


def test_backends_terminated_while_idle_cost_no_request(fresh_database: str) -> None:
    """Between two bursts of concurrent traffic every pooled backend is killed: the liveness
    check on checkout finds each dead connection and replaces it, so not one request of the
    next burst fails."""
    app, _ = build_app(fresh_database, DB_POOL_SIZE=4, DB_MAX_OVERFLOW=0)
    with serve(app) as server:
        assert failures(run_requests(server, notes_traffic(200, "before"), threads=4)) == []
        wait_until(lambda: checked_out(app) == 0, message="connections back in the pool")
        before = db.pool_stats(app)
        assert before["checked_in"] >= 1

        assert terminate_backends(fresh_database) == before["checked_in"]
        wait_until(lambda: not backend_pids(fresh_database), message="backends gone")

        replies = run_requests(server, notes_traffic(200, "after"), threads=4)
        assert failures(replies) == []
        # The dead connections were really handed to the check, and replaced.
        assert db.pool_stats(app)["invalidations"] > before["invalidations"]
        wait_until(lambda: checked_out(app) == 0, message="connections back in the pool")


def test_backends_terminated_during_requests_fail_cleanly(fresh_database: str) -> None:
    """Requests whose backend is killed mid-query answer at once with a 503 JSON that shows no
    traceback or driver text; later requests succeed and no connection stays checked out."""
    app, _ = build_app(fresh_database, DB_POOL_SIZE=4, DB_MAX_OVERFLOW=0, DB_STATEMENT_TIMEOUT=0)
    with serve(app) as server, ThreadPoolExecutor(4) as pool:
        sleepers = [pool.submit(server.get, "/sleep/20.0") for _ in range(4)]
        wait_until(lambda: len(sleeping_pids(fresh_database)) == 4, message="4 sleeping backends")
        killed_at = time.monotonic()
        for pid in sleeping_pids(fresh_database):
            admin_execute(fresh_database, "SELECT pg_terminate_backend(%s, 5000)", (pid,))

        for future in sleepers:
            reply = future.result(timeout=HOLD_LIMIT)
            body = assert_clean_error(reply, 503)
            assert body["cause"] == "connection_lost"
            assert reply.headers["retry-after"] == str(RETRY_AFTER)
            assert reply.ended - killed_at < SLACK, "the failed request was not answered at once"

        assert failures(run_requests(server, notes_traffic(100, "after"), threads=4)) == []
        wait_until(lambda: checked_out(app) == 0, message="connections back in the pool")


# -- the server goes away and comes back ----------------------------------------------------------


@pytest.mark.slow
def test_server_outage_fails_fast_and_recovers_without_restarting_the_app(
    outage_cluster: LocalPostgres,
) -> None:
    """The database server stops under load from 6 clients and starts again.

    While it is down every request fails with a 503 within DB_POOL_TIMEOUT + DB_CONNECT_TIMEOUT
    (plus slack), whether it waited for the pool or for a connect; once the server accepts
    connections again, requests succeed within 1 s, with the same app and pool, and every
    request started after that moment succeeds. Nothing stays checked out.
    """
    pool_timeout, connect_timeout = 2, 3
    bound = pool_timeout + connect_timeout + SLACK
    app, _ = build_app(
        outage_cluster.url,
        DB_POOL_SIZE=2,
        DB_MAX_OVERFLOW=1,
        DB_POOL_TIMEOUT=pool_timeout,
        DB_CONNECT_TIMEOUT=connect_timeout,
    )
    with serve(app) as server:
        with LoadLoop(server, threads=6) as load:
            wait_until(lambda: load.count(lambda r: r.ok) >= 30, 20, "traffic before the outage")
            outage_cluster.stop_server()
            down_at = time.monotonic()
            wait_until(
                lambda: load.count(lambda r: r.started >= down_at) >= 12, 30, "requests while down"
            )
            restart_at = time.monotonic()
            outage_cluster.start_server()
            up_at = wait_for_server(outage_cluster)
            wait_until(
                lambda: load.count(lambda r: r.ok and r.started >= up_at) >= 30,
                20,
                "traffic after the outage",
            )
        replies = list(load.replies)
        wait_until(lambda: checked_out(app) == 0, message="connections back in the pool")

    # No request, whenever it ran, hung or failed with anything but a clean 503.
    for reply in replies:
        if not reply.ok:
            body = assert_clean_error(reply, 503)
            assert reply.headers["retry-after"] == str(RETRY_AFTER)
            assert body["cause"] in {
                "connection_refused",
                "connection_lost",
                "pool_exhausted",
                "server_starting",
                "server_shutting_down",
            }
    slowest = max(replies, key=lambda r: r.elapsed)
    assert slowest.elapsed <= bound, f"a request took {slowest.elapsed:.2f} s (bound {bound} s)"

    while_down = [r for r in replies if r.started >= down_at and r.ended <= restart_at]
    first_success = min(r.ended for r in replies if r.ok and r.started >= down_at)
    causes = collections.Counter(r.json().get("cause", r.status) for r in while_down)
    slowest_down = max((r.elapsed for r in while_down), default=0.0)
    print(
        f"\noutage: down {restart_at - down_at:.2f} s, {len(while_down)} requests while down "
        f"{dict(causes)} (slowest {slowest_down:.2f} s), first success "
        f"{first_success - up_at:+.3f} s after the server accepted connections, slowest request "
        f"{slowest.elapsed:.2f} s of {len(replies)}"
    )
    assert len(while_down) >= 12
    assert [r.status for r in while_down] == [503] * len(while_down)
    assert first_success - up_at <= 1.0
    assert failures([r for r in replies if r.started >= up_at]) == []


# -- an exhausted pool ----------------------------------------------------------------------------


def test_exhausted_pool_answers_503_after_the_pool_timeout_and_recovers(
    fresh_database: str,
) -> None:
    """Three requests hold all 2 + 1 connections: four more wait DB_POOL_TIMEOUT (1 s, not
    less and not much more) and get 503 with Retry-After. Once the holders finish, requests
    succeed again, nothing stays checked out, the overflow connection is closed, and the
    server never saw more than pool size + overflow backends."""
    app, controls = build_app(fresh_database, DB_POOL_SIZE=2, DB_MAX_OVERFLOW=1, DB_POOL_TIMEOUT=1)
    with (
        serve(app) as server,
        BackendMonitor(fresh_database) as monitor,
        ThreadPoolExecutor(8) as pool,
    ):
        holders = [pool.submit(server.get, "/hold") for _ in range(3)]
        wait_until(lambda: controls.holding == 3, message="3 requests holding a connection")
        assert db.pool_stats(app)["status"] == "exhausted"

        waiting = [pool.submit(server.get, "/notes") for _ in range(4)]
        for future in waiting:
            reply = future.result(timeout=HOLD_LIMIT)
            body = assert_clean_error(reply, 503)
            assert body["cause"] == "pool_exhausted"
            assert reply.headers["retry-after"] == str(RETRY_AFTER)
            assert 0.9 <= reply.elapsed <= 1 + 1.5, f"answered after {reply.elapsed:.2f} s"

        controls.release.set()
        assert [f.result(timeout=HOLD_LIMIT).json() for f in holders] == [{"released": True}] * 3
        assert failures(run_requests(server, notes_traffic(40, "after"), threads=4)) == []
        wait_until(lambda: checked_out(app) == 0, message="connections back in the pool")
        # The overflow connection is closed when returned: only the pool's own stay open.
        wait_until(lambda: len(backend_pids(fresh_database)) <= 2, message="overflow closed")
    assert monitor.samples > 0
    assert monitor.maximum <= 3


# -- the server's own timeouts --------------------------------------------------------------------


def test_statement_timeout_under_load_leaves_the_connection_serving(fresh_database: str) -> None:
    """With a single pooled connection and 4 clients, a query running past DB_STATEMENT_TIMEOUT
    is cancelled by the server (500 JSON, promptly); the very same backend keeps serving every
    other request, and is never discarded."""
    app, _ = build_app(
        fresh_database,
        DB_POOL_SIZE=1,
        DB_MAX_OVERFLOW=0,
        DB_POOL_TIMEOUT=10,
        DB_STATEMENT_TIMEOUT=0.2,
    )
    with serve(app) as server:
        first_pid = server.get("/pid").json()["pid"]
        specs = notes_traffic(80, "load")
        specs.insert(20, ("GET", "/sleep/10.0", None))
        replies = run_requests(server, specs, threads=4)
        slow = replies.pop(20)
        assert_clean_error(slow, 500)
        assert 0.2 <= slow.elapsed <= 0.2 + SLACK
        assert failures(replies) == []
        assert server.get("/pid").json()["pid"] == first_pid
        assert db.pool_stats(app)["invalidations"] == 0
        wait_until(lambda: checked_out(app) == 0, message="connection back in the pool")


@pytest.mark.parametrize("then", ["query", "return"])
def test_idle_transaction_ended_by_the_server_spares_the_next_request(
    fresh_database: str, then: str
) -> None:
    """A request leaves its transaction idle past DB_IDLE_IN_TRANSACTION_TIMEOUT and the server
    ends it. A query on it then fails with a clean 503 (``query``), or the request ends without
    one and teardown meets the dead connection (``return``). Either way the next request on
    the pool's only connection succeeds, on a new backend."""
    app, controls = build_app(
        fresh_database,
        DB_POOL_SIZE=1,
        DB_MAX_OVERFLOW=0,
        DB_POOL_TIMEOUT=10,
        DB_IDLE_IN_TRANSACTION_TIMEOUT=0.3,
    )
    with serve(app) as server, ThreadPoolExecutor(1) as pool:
        idle = pool.submit(server.get, f"/idle?then={then}")
        wait_until(lambda: controls.idle_pid is not None, message="the idle transaction")
        killed = controls.idle_pid
        wait_until(
            lambda: killed not in backend_pids(fresh_database), message="the server ending it"
        )
        controls.resume.set()
        reply = idle.result(timeout=HOLD_LIMIT)
        if then == "query":
            body = assert_clean_error(reply, 503)
            assert body["cause"] in {"idle_in_transaction_timeout", "connection_lost"}
        else:
            assert reply.json() == {"pid": killed}

        after = [server.get("/pid") for _ in range(3)]
        assert failures(after) == []
        pids = {reply.json()["pid"] for reply in after}
        assert len(pids) == 1
        assert killed not in pids
        assert failures([server.get("/notes")]) == []
        wait_until(lambda: checked_out(app) == 0, message="connection back in the pool")
        assert len(backend_pids(fresh_database)) <= 1


# -- a long mixed run -----------------------------------------------------------------------------

MIXED_REQUESTS = 10_000
MIXED_WARMUP = 2_000
MIXED_THREADS = 8
MIXED_POOL_SIZE, MIXED_MAX_OVERFLOW = 4, 2
MIXED_STATEMENT_TIMEOUT = 0.25


def mixed_kind(i: int) -> str:
    """What request ``i`` of the mixed run does: 1% each timeouts and client disconnects, 4%
    failing views, the rest ordinary reads and writes of notes."""
    if i % 100 == 7:
        return "timeout"
    if i % 100 == 57:
        return "disconnect"
    if i % 25 == 3:
        return "fail"
    return "create" if i % 3 == 0 else "list"


@dataclasses.dataclass
class Tally:
    """Outcomes of the mixed run; replies are checked as they come and not kept (memory)."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    slowest: dict[str, float] = dataclasses.field(default_factory=dict)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add(self, kind: str, elapsed: float, problem: str | None) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.slowest[kind] = max(self.slowest.get(kind, 0.0), elapsed)
        if problem is not None:
            self.problem(problem)

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.unexpected) < 20:
                self.unexpected.append(text)


def mixed_request(server: LiveServer, i: int, tally: Tally) -> None:
    kind = mixed_kind(i)
    if kind == "disconnect":
        started = time.monotonic()
        server.send_and_disconnect("GET", "/sleep/0.02")
        tally.add(kind, time.monotonic() - started, None)
        return
    if kind == "timeout":
        reply, expected = server.get("/sleep/1.0"), 500
    elif kind == "fail":
        reply, expected = server.request("POST", f"/fail?tag={i}"), 500
    elif kind == "create":
        reply, expected = server.request("POST", "/notes", {"title": f"mixed-{i}"}), 201
    else:
        reply, expected = server.get("/notes?limit=5"), 200
    problem = None
    if reply.status != expected or any(marker in reply.body for marker in LEAK_MARKERS):
        problem = f"{kind} #{i}: expected {expected}, got {reply.status} {reply.text[:300]}"
    elif kind == "timeout" and reply.elapsed > MIXED_STATEMENT_TIMEOUT + SLACK:
        problem = f"timeout #{i} answered after {reply.elapsed:.2f} s"
    tally.add(kind, reply.elapsed, problem)


def run_mixed(server: LiveServer, indices: range, tally: Tally) -> None:
    """Send the mixed requests ``indices`` from ``MIXED_THREADS`` clients.

    Each client takes the next index when it is free: nothing is queued up front (8,000
    queued futures would themselves grow the memory measured).
    """
    lock = threading.Lock()
    pending = iter(indices)

    def client() -> None:
        while True:
            with lock:
                i = next(pending, None)
            if i is None:
                return
            mixed_request(server, i, tally)

    with ThreadPoolExecutor(MIXED_THREADS) as pool:
        for future in [pool.submit(client) for _ in range(MIXED_THREADS)]:
            future.result()


def test_ten_thousand_mixed_requests_leak_nothing(fresh_database: str) -> None:
    """10,000 requests from 8 clients mixing reads, writes, views that raise after writing,
    statement timeouts and clients that disconnect before the answer.

    Every answer is the expected one; nothing a failing view wrote is committed; no connection
    stays checked out; the server never holds more than pool size + overflow backends of the
    app; and resident memory after the run is within 5% of what it was after the warm-up.
    """
    app, controls = build_app(
        fresh_database,
        DB_POOL_SIZE=MIXED_POOL_SIZE,
        DB_MAX_OVERFLOW=MIXED_MAX_OVERFLOW,
        DB_POOL_TIMEOUT=10,
        DB_STATEMENT_TIMEOUT=MIXED_STATEMENT_TIMEOUT,
    )
    # Each failing view logs its traceback: kept by pytest's log capture for the whole test,
    # thousands of records would themselves look like a leak.
    app.logger.disabled = True
    tally = Tally()

    def record_exception(sender: Flask, exception: BaseException, **extra: t.Any) -> None:
        # Unexpected exceptions explain an unexpected 500 (/fail and /sleep are expected to).
        if not request.path.startswith(("/fail", "/sleep")):
            first_line = str(exception).split("\n", 1)[0][:300]
            tally.problem(f"{request.path}: {type(exception).__name__}: {first_line}")

    got_request_exception.connect(record_exception, app)
    try:
        with serve(app) as server, BackendMonitor(fresh_database) as monitor:
            started = time.monotonic()
            run_mixed(server, range(MIXED_WARMUP), tally)
            rss_warm = rss_kib()
            run_mixed(server, range(MIXED_WARMUP, MIXED_REQUESTS), tally)
            duration = time.monotonic() - started
            rss_end = rss_kib()

            kinds = [mixed_kind(i) for i in range(MIXED_REQUESTS)]
            # Disconnected clients never read their answer: wait until the app served them.
            expected_sleeps = kinds.count("timeout") + kinds.count("disconnect")
            wait_until(lambda: controls.sleeps == expected_sleeps, message="every /sleep served")
            wait_until(lambda: server.active_requests == 0, message="request threads finished")
            wait_until(lambda: checked_out(app) == 0, message="connections back in the pool")
            stats = db.pool_stats(app)
    finally:
        got_request_exception.disconnect(record_exception, app)

    slowest = {kind: round(seconds, 3) for kind, seconds in tally.slowest.items()}
    print(
        f"\nmixed run: {MIXED_REQUESTS} requests in {duration:.1f} s "
        f"({MIXED_REQUESTS / duration:.0f} requests/s); {tally.counts}; slowest {slowest}; "
        f"RSS after warm-up {rss_warm} KiB, after the run {rss_end} KiB "
        f"({(rss_end - rss_warm) / rss_warm:+.2%}); backends max {monitor.maximum}, lasting "
        f"max {monitor.lasting_maximum} over {monitor.samples} samples; pool {stats}"
    )
    assert tally.unexpected == []
    assert tally.counts == {kind: kinds.count(kind) for kind in set(kinds)}
    assert stats["checked_out"] == 0
    assert monitor.samples > 0
    assert monitor.lasting_maximum <= MIXED_POOL_SIZE + MIXED_MAX_OVERFLOW
    assert abs(rss_end - rss_warm) <= 0.05 * rss_warm, (rss_warm, rss_end)

    (failed_writes,) = admin_execute(
        fresh_database, "SELECT count(*) FROM notes WHERE title LIKE %s", (FAIL_PREFIX + "%",)
    )[0]
    assert failed_writes == 0
    (created,) = admin_execute(
        fresh_database, "SELECT count(*) FROM notes WHERE title LIKE 'mixed-%%'"
    )[0]
    assert created == kinds.count("create")
