"""One small app on Flask-SQLAlchemy or on flask-neon whose views take locks and answer without
committing, views that probe those locks, and the servers, network and client that drive it over
HTTP (``tests/test_request_end_http.py``).

The app is built by :func:`create_app`, from environment variables when gunicorn serves it
(``tests.lock_probes:create_app()``), or from arguments in the test process (werkzeug's server).
Every lock kind has a row (and an advisory key) of its own in each *lane*, and each client
stream and each library works in lanes of its own, so that no two of them ever wait on each
other: a refusal can only come from the request just before on the same stream.

Holders (``/hold/<kind>/<lane>``) and their probes (``/probe/<kind>/<lane>``), which answer
``{"refused": true}`` when the lock was still held:

* ``for_update``: ``SELECT ... FOR UPDATE`` of the row; probed by ``FOR UPDATE NOWAIT``.
* ``update``: an ``UPDATE`` of the row; probed by an ``UPDATE`` under ``lock_timeout = '1ms'``.
* ``advisory``: ``pg_advisory_xact_lock(k)``; probed by ``pg_try_advisory_xact_lock(k)``.
* ``failed_write``: an ``UPDATE``, then the view raises (a 500); probed like ``update``.
* ``read``: a plain ``SELECT`` of the row (``ACCESS SHARE`` only, which on flask-neon may end
  after the response); probed by ``FOR UPDATE NOWAIT``, which such a read never blocks.

The probes lock too, without committing: the next holder on the stream waits for them (it
takes its lock without NOWAIT), so a probe that kept its lock past its response shows up as a
refusal of the probe after that holder.

Nothing here imports pytest: gunicorn imports this module in its workers. Nor does the
Flask-SQLAlchemy app import flask_neon.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import os
import pathlib
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as t
from collections.abc import Callable, Iterable, Iterator, Mapping

import sqlalchemy as sa
from flask import Flask
from sqlalchemy import orm

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

ROOT = pathlib.Path(__file__).resolve().parent.parent
TABLE = "lock_probe_rows"
KINDS = ("for_update", "update", "advisory", "failed_write", "read")
#: Lanes 0 .. LANES - 1 have rows.
LANES = 20
ADVISORY_BASE = 7_340_000
#: SQLSTATE lock_not_available: NOWAIT and lock_timeout refusals.
LOCK_NOT_AVAILABLE = "55P03"
#: The environment variables :func:`create_app` reads.
ENV_URL = "LOCK_PROBE_URL"  # a SQLAlchemy URL (postgresql+psycopg2://...)
ENV_LIBRARY = "LOCK_PROBE_LIBRARY"  # "flask_sqlalchemy" or "flask_neon"
ENV_ASYNC = "LOCK_PROBE_ASYNC"  # "1": the views are ``async def``
ENV_DROP_CLOSE = "LOCK_PROBE_DROP_CLOSE"  # "1": behind DropClose
ENV_POOL = "LOCK_PROBE_POOL"  # JSON: {"size": 2, "overflow": 0, "timeout": 5}
Library = t.Literal["flask_sqlalchemy", "flask_neon"]
LIBRARIES: tuple[Library, ...] = ("flask_sqlalchemy", "flask_neon")
#: The message of the failing view, which Flask logs with its traceback.
VIEW_FAILED = "RuntimeError: the view failed after its write"
#: Seconds a client waits for one answer: far above every bound the tests assert.
CLIENT_TIMEOUT = 30.0
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def row_id(kind: str, lane: int) -> int:
    """The row of ``kind`` in ``lane``; its advisory key is ``ADVISORY_BASE`` plus it."""
    return lane * 10 + KINDS.index(kind) + 1


def prepare_database(admin: Callable[[str], object]) -> None:
    """Create the table and its rows through ``admin`` (runs one statement, autocommit)."""
    admin(f"CREATE TABLE IF NOT EXISTS {TABLE} (id int PRIMARY KEY, n int NOT NULL)")
    rows = [row_id(kind, lane) for lane in range(LANES) for kind in KINDS]
    values = ", ".join(f"({number}, 0)" for number in rows)
    admin(f"INSERT INTO {TABLE} VALUES {values} ON CONFLICT (id) DO NOTHING")


# -- the app ---------------------------------------------------------------------------------


class DropClose:
    """A WSGI middleware that breaks PEP 3333: it reads the app's whole response and returns a
    new list, never calling the original iterable's ``close()``."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        return list(self.app(environ, start_response))  # and no close()


def create_app(
    library: Library | None = None,
    url: str | None = None,
    *,
    async_views: bool | None = None,
    drop_close: bool | None = None,
    pool: Mapping[str, float] | None = None,
) -> Flask:
    """The app on ``library``; each argument left out comes from its environment variable.

    The library's extension object is ``app.extensions["lock_probe"]``.
    """
    library = library or t.cast(Library, os.environ[ENV_LIBRARY])
    url = url or os.environ[ENV_URL]
    if async_views is None:
        async_views = os.environ.get(ENV_ASYNC) == "1"
    if drop_close is None:
        drop_close = os.environ.get(ENV_DROP_CLOSE) == "1"
    if pool is None and os.environ.get(ENV_POOL):
        pool = json.loads(os.environ[ENV_POOL])
    app = Flask(f"lock_probe_{library}")
    extension: t.Any
    if library == "flask_sqlalchemy":
        from flask_sqlalchemy import SQLAlchemy

        app.config["SQLALCHEMY_DATABASE_URI"] = url
        if pool:
            app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
                "pool_size": int(pool["size"]),
                "max_overflow": int(pool["overflow"]),
                "pool_timeout": pool["timeout"],
            }
        extension = SQLAlchemy(app)
    else:
        from flask_neon import NeonDB

        app.config.update(DB_URL=url)
        if pool:
            app.config.update(
                DB_POOL_SIZE=int(pool["size"]),
                DB_MAX_OVERFLOW=int(pool["overflow"]),
                DB_POOL_TIMEOUT=pool["timeout"],
            )
        extension = NeonDB(app, env_file=None)
    app.extensions["lock_probe"] = extension

    def session() -> orm.Session:
        return t.cast(orm.Session, extension.session)

    def run(sql: str, **params: t.Any) -> sa.Result[t.Any]:
        return session().execute(sa.text(sql), params)

    def ready() -> dict[str, t.Any]:
        return {"pid": run("SELECT pg_backend_pid()").scalar()}

    def state(pid: int) -> dict[str, t.Any]:
        # The request's first statement: what the backend ``pid`` was doing when it ran.
        found = run("SELECT state FROM pg_stat_activity WHERE pid = :pid", pid=pid).scalar()
        return {"state": found, "pid": run("SELECT pg_backend_pid()").scalar()}

    def hold(kind: str, lane: int) -> dict[str, t.Any]:
        row = row_id(kind, lane)
        if kind == "for_update":
            run(f"SELECT n FROM {TABLE} WHERE id = :row FOR UPDATE", row=row)
        elif kind in ("update", "failed_write"):
            run(f"UPDATE {TABLE} SET n = n + 1 WHERE id = :row", row=row)
            if kind == "failed_write":
                raise RuntimeError("the view failed after its write")
        elif kind == "advisory":
            run("SELECT pg_advisory_xact_lock(:key)", key=ADVISORY_BASE + row)
        else:
            run(f"SELECT n FROM {TABLE} WHERE id = :row", row=row)
        return {"held": kind}  # and no commit

    def probe(kind: str, lane: int) -> dict[str, t.Any]:
        row = row_id(kind, lane)
        try:
            if kind in ("for_update", "read"):
                run(f"SELECT n FROM {TABLE} WHERE id = :row FOR UPDATE NOWAIT", row=row)
            elif kind in ("update", "failed_write"):
                run("SET LOCAL lock_timeout = '1ms'")
                run(f"UPDATE {TABLE} SET n = n WHERE id = :row", row=row)
            else:
                taken = run("SELECT pg_try_advisory_xact_lock(:key)", key=ADVISORY_BASE + row)
                return {"refused": not taken.scalar()}
        except sa.exc.OperationalError as error:
            if getattr(error.orig, "pgcode", None) != LOCK_NOT_AVAILABLE:
                raise
            session().rollback()
            return {"refused": True}
        return {"refused": False}

    kind_rule = "<any({}):kind>/<int:lane>".format(", ".join(f'"{kind}"' for kind in KINDS))
    views: dict[str, Callable[..., t.Any]] = {
        "/alive": lambda: "alive",
        "/ready": ready,
        "/state/<int:pid>": state,
        f"/hold/{kind_rule}": hold,
        f"/probe/{kind_rule}": probe,
    }
    for rule, view in views.items():
        endpoint = rule.split("/")[1]
        app.add_url_rule(rule, endpoint, _async(view) if async_views else view)
    if drop_close:
        app.wsgi_app = DropClose(app.wsgi_app)  # type: ignore[method-assign]
    return app


def _async(view: Callable[..., t.Any]) -> Callable[..., t.Any]:
    """``view`` as an ``async def`` view (Flask runs it through asgiref)."""

    async def async_view(**kwargs: t.Any) -> t.Any:
        return view(**kwargs)

    return async_view


# -- gunicorn --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gunicorn:
    """gunicorn serving :func:`create_app` on a free port of 127.0.0.1, started at once in its
    own process group; its output goes to :attr:`log`. A context manager that waits until it
    answers and always stops it (SIGTERM to the group, SIGKILL after :data:`STOP_TIMEOUT`).

    Its ``PYTHONPATH`` is this process's, then the repository root: pointing ``PYTHONPATH`` at
    another copy of ``flask_neon`` serves the app on that copy.
    """

    def __init__(
        self,
        worker_class: str,
        env: dict[str, str],
        workdir: pathlib.Path,
        *,
        workers: int = 1,
        threads: int = 1,
        preload: bool = False,
    ) -> None:
        self.port = free_port()
        self.log = workdir / f"gunicorn-{worker_class}-{self.port}.log"
        # No DB_*, SQLALCHEMY_* or FLASK_* from this shell: the app's settings come from env.
        environ = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("DB_", "SQLALCHEMY_", "FLASK_", "LOCK_PROBE_"))
        }
        paths = [*filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), str(ROOT)]
        environ["PYTHONPATH"] = os.pathsep.join(paths)
        environ.update(env)
        command = [
            sys.executable, "-m", "gunicorn",
            f"--worker-class={worker_class}", f"--workers={workers}", f"--threads={threads}",
            f"--bind=127.0.0.1:{self.port}", f"--chdir={workdir}",
            "--keep-alive=30", "--graceful-timeout=5", "--log-level=warning",
            *(["--preload"] if preload else []),
            "tests.lock_probes:create_app()",
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=workdir,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Poll ``/alive`` (which touches no database) until it answers 200."""
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer"
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"gunicorn exited with {self.process.returncode}:\n{self.log_text()}"
                )
            try:
                status = get(self.port, "/alive", timeout=5)[0]
                if status == 200:
                    return
                last = f"status {status}"
            except OSError as error:
                last = str(error)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"gunicorn did not answer within {READY_TIMEOUT:g} s ({last}):\n"
                    f"{self.log_text()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        process = self.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # workers a dead master left behind
            os.killpg(process.pid, signal.SIGKILL)

    def __enter__(self) -> Gunicorn:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def gunicorns(*servers: Callable[[], Gunicorn]) -> Iterator[list[Gunicorn]]:
    """Start every server at once, wait until all answer, stop them all at the end."""
    with contextlib.ExitStack() as stack:
        started: list[Gunicorn] = []
        for make in servers:
            started.append(make())
            stack.callback(started[-1].stop)
        for server in started:
            server.wait_ready()
        yield started


# -- the network between the app and PostgreSQL -----------------------------------------------


class JitterProxy:
    """A TCP proxy in front of PostgreSQL that delays each chunk the app sends by a random
    time from 0 to ``jitter_s``, in order on each connection; the server's answers pass at once.

    It stands for a real network (Neon's proxy, another host): messages keep their order on one
    connection, but nothing orders two connections. A ``ROLLBACK`` sent on one connection just
    before the response may reach the server after the next request's statement on another
    one; a ``ROLLBACK`` whose reply came before the response cannot.
    """

    def __init__(
        self, target: tuple[str, int], jitter_s: float, odds: float = 0.1, seed: int = 15
    ) -> None:
        self.target = target
        self.jitter_s = jitter_s
        self.odds = odds
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="jitter-proxy", daemon=True).start()

    def url(self, template: str) -> str:
        """``template`` (a URL of the real server) rewritten to go through the proxy."""
        from flask_neon._url import parse_url

        rewritten = parse_url(template).to_sqlalchemy().set(host="127.0.0.1", port=self.port)
        return rewritten.render_as_string(hide_password=False)

    def _delay(self) -> float:
        with self._random_lock:
            return self.jitter_s if self._random.random() < self.odds else 0.0

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(sock)
            pending: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
            for target, args in (
                (self._read, (client, pending)),
                (self._write, (server, pending)),
                (self._pump, (server, client)),
            ):
                threading.Thread(target=target, args=args, daemon=True).start()

    def _read(
        self, source: socket.socket, pending: queue.SimpleQueue[tuple[float, bytes]]
    ) -> None:
        due = 0.0
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                due = max(due, time.monotonic() + self._delay())  # in order
                pending.put((due, data))
        pending.put((0.0, b""))  # end of stream

    def _write(self, sink: socket.socket, pending: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = pending.get()
                if not data:
                    break
                left = due - time.monotonic()
                if left > 0:
                    time.sleep(left)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


# -- the client ------------------------------------------------------------------------------


Answer = tuple[int, t.Any, float]  # status, JSON body (None if not JSON), monotonic end


def exchange(connection: http.client.HTTPConnection, path: str) -> Answer:
    """One GET on ``connection`` (http.client reconnects when the server closed it)."""
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    ended = time.monotonic()
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    return response.status, data, ended


def get(port: int, path: str, timeout: float = CLIENT_TIMEOUT) -> Answer:
    """One GET on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        return exchange(connection, path)
    finally:
        connection.close()


Name = t.TypeVar("Name", bound=str)


@dataclasses.dataclass
class Tally:
    """What the probes of one stream (or several, added up) found, per lock kind."""

    tries: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    refused: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: Answers other than the expected status with a JSON body: each a failure.
    unexpected: list[str] = dataclasses.field(default_factory=list)

    def __iadd__(self, other: Tally) -> Tally:
        self.tries.update(other.tries)
        self.refused.update(other.refused)
        self.unexpected.extend(other.unexpected)
        return self


def hold_then_probe(port: int, lane: int, tries: int, kinds: Iterable[str] = KINDS) -> Tally:
    """``tries`` rounds of: for each kind, a holder request, then at once its probe, on the
    holder's keep-alive connection (even rounds) or on a new one (odd rounds).

    A server that closes each connection (gunicorn's sync workers) makes the keep-alive
    connection a new one each time too (``http.client`` reconnects).
    """
    tally = Tally()
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        for number in range(tries):
            for kind in kinds:
                expected = 500 if kind == "failed_write" else 200
                status, body, _ = exchange(kept, f"/hold/{kind}/{lane}")
                if status != expected:
                    tally.unexpected.append(f"hold {kind}: {status} {body}")
                    continue
                if number % 2 == 0:
                    status, body, _ = exchange(kept, f"/probe/{kind}/{lane}")
                else:
                    status, body, _ = get(port, f"/probe/{kind}/{lane}")
                if status != 200 or not isinstance(body, dict) or "refused" not in body:
                    tally.unexpected.append(f"probe {kind}: {status} {body}")
                    continue
                tally.tries[kind] += 1
                tally.refused[kind] += bool(body["refused"])
    finally:
        kept.close()
    return tally


def in_streams(jobs: Mapping[Name, tuple[int, int]], tries: int) -> dict[Name, Tally]:
    """Run :func:`hold_then_probe` for each job ``name: (port, streams)``, all at once: each
    job's ``tries`` rounds split over its streams, each stream in a lane of its own."""
    futures: dict[Name, list[concurrent.futures.Future[Tally]]] = {}
    lane = 0
    with concurrent.futures.ThreadPoolExecutor(sum(n for _, n in jobs.values())) as pool:
        for name, (port, streams) in jobs.items():
            futures[name] = []
            for stream in range(streams):
                rounds = tries // streams + (stream < tries % streams)
                futures[name].append(pool.submit(hold_then_probe, port, lane, rounds))
                lane += 1
    tallies: dict[Name, Tally] = {}
    for name, done in futures.items():
        tallies[name] = Tally()
        for future in done:
            tallies[name] += future.result()
    return tallies
