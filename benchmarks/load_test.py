"""Load test over real HTTP: flask-neon against Flask-SQLAlchemy with pool_pre_ping, via gunicorn.

What it measures: requests/s, p50/p99/max latency and errors of the notes API served by
gunicorn (gthread, 2 workers x 4 threads) under wrk (2 threads). Each variant is its own
gunicorn, all on the same PostgreSQL and the same ``notes`` table (100 seeded notes):

* ``flask-neon``: ``example_app`` with the production profile (pool 5 + 10 overflow;
  a liveness round trip only for a connection idle more than 60 s);
* ``flask-sqlalchemy pre_ping``: ``benchmarks/fsqla_app.py``, the same app on Flask-SQLAlchemy
  3.1 with ``pool_pre_ping=True`` (a ``SELECT 1`` on every checkout), same pool sizes;
* ``flask-neon psycopg 3`` and ``flask-neon psycopg 3, no idle timeout``: ``flask-neon`` on
  psycopg 3 (``DB_DRIVER=psycopg``), with its default idle-in-transaction timeout (psycopg 3
  then sends a ``BEGIN`` of its own) and with ``DB_IDLE_IN_TRANSACTION_TIMEOUT=0``; compared
  with ``flask-neon`` on psycopg2 round by round, as the pair above (``--no-psycopg``: left out);
* ``flask-neon pool 2, 32 clients``: a pool smaller than the concurrency (DB_POOL_SIZE=2,
  DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=2) under 32 connections on ``GET /notes?limit=100``, the
  heaviest read. Requests must wait for a connection and succeed, or get a fast 503, never
  hang: any socket error (wrk's timeout is 10 s), any status but 200 and 503, or a max latency
  of DB_POOL_TIMEOUT + 3 s or more is a failure;
* ``flask-neon pool 2, 2.5 s stall``: the same server and load, with the ``notes`` table locked
  for 2.5 s a third of the way into the run (a stalled database): the 4 requests holding the
  connections block, the ones waiting for a connection must get a 503 after DB_POOL_TIMEOUT.
  Same checks.

The main variants get ``wrk -c32`` on ``GET /notes/<id>`` (ids drawn at random from 1..100) and are
compared by the median of each round's ratio (they run back to back, in an order rotated each
round):
the target is 1.15x Flask-SQLAlchemy's requests/s (``TARGET_RATIO``), with no error and memory
flat: the workers' resident memory at the end of the last round at most 5 % above the one at
the end of the first (``MEMORY_GROWTH_LIMIT``).

The scheduler places gunicorn, wrk and PostgreSQL on the machine's cores, as issue 15's set-up
has it: on loopback the database shares the machine, so the server's work per request (a ping
is a statement) counts as the app's does. wrk opens its connections once and keeps them, and
now and then gunicorn hands all of them to one worker: the other idles, a third of the machine
with it, and requests/s halve, for either peer (3 of 32 runs in two load tests). Such a run
measures gunicorn's accept, not the app: it is stopped once wrk's connections are open and run
again (``connections per worker`` and the repeats are printed). ``--pin`` puts gunicorn on half
the cores and everything else on the other half (the split then matters less): that compares
the app's CPU alone. Each run also reports the CPU gunicorn's processes used per request and
their resident memory (from ``/proc``); on a shared machine both move with its load as much as
requests/s do, so prefer several ``--rounds``: the medians are reported.

By default the database is on loopback, which understates what ``pool_pre_ping`` costs
against a remote server such as Neon, where each ``SELECT 1`` is a network round trip added to
every request. ``--delay-ms 1`` puts it behind ``delay_proxy.py`` (in this process, on the load
side's cores), 1 ms each way, as a Neon compute in the same region is.

Reproduce (needs wrk: ``apt-get install wrk``)::

    python benchmarks/load_test.py                       # starts a throwaway local PostgreSQL
    BENCH_DB_URL=postgresql://... python benchmarks/load_test.py --duration 10 --json out.json
    python benchmarks/load_test.py --rounds 4 --delay-ms 1   # the database a network hop away

``BENCH_DB_URL`` must be a scratch database: the example app's migrations are applied to it and
notes 1..100 are inserted when missing. Exit status: 1 when a variant failed (an error in a
main variant, a hang or a non-503 failure with the small pool) or no database or wrk is
available, 2 when the throughput target is missed (``--no-targets`` to only report).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import sqlalchemy as sa

from flask_neon._url import parse_url

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTES = 100
WORKERS = 2
THREADS = 4
#: flask-neon's requests/s over Flask-SQLAlchemy's with pool_pre_ping (issue 15's target).
TARGET_RATIO = 1.15
#: "Memory flat": the server's resident memory at the end of the last round may exceed the
#: one at the end of the first round (after the warm-up) by this fraction at most.
MEMORY_GROWTH_LIMIT = 0.05
WRK_THREADS = 2
#: wrk drops a request that takes longer than this from the latencies and counts a timeout.
WRK_TIMEOUT_S = 10
READY_TIMEOUT_S = 30.0
#: How long wrk may take to open its connections before the split between workers is read.
CONNECT_TIMEOUT_S = 5.0
#: Runs of a compared variant repeated at most because a worker got no connection.
UNBALANCED_RETRIES = 5
STOP_TIMEOUT_S = 15.0
#: The small pool's answers must all come within its pool timeout plus this margin.
HANG_MARGIN_S = 3.0

WRK_INSTALL_HINT = (
    "wrk is not installed. Install it with `apt-get install wrk` (Debian, Ubuntu), "
    "`brew install wrk` (macOS), or build it from https://github.com/wg/wrk."
)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    #: gunicorn's application spec; resolved with the repository root on the import path.
    app: str
    #: The request path; ``{id}`` is replaced by a random note id for every request.
    path: str
    connections: int
    env: dict[str, str]
    #: Part of the comparison, where any error fails the run.
    main: bool = True
    pool_timeout: float | None = None
    #: Seconds the ``notes`` table is locked, a third of the way into the run.
    stall_s: float | None = None

    @property
    def server_key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """Variants with the same app and settings share one gunicorn."""
        return self.app, tuple(sorted(self.env.items()))


NEON = Variant(
    "flask-neon",
    "example_app:create_app()",
    "/notes/{id}",
    32,
    {"DB_PROFILE": "production", "DB_DRIVER": "psycopg2"},
)
NEON_PSYCOPG = Variant(
    "flask-neon psycopg 3",
    "example_app:create_app()",
    "/notes/{id}",
    32,
    {"DB_PROFILE": "production", "DB_DRIVER": "psycopg"},
)
NEON_PSYCOPG_NO_IDLE = Variant(
    "flask-neon psycopg 3, no idle timeout",
    "example_app:create_app()",
    "/notes/{id}",
    32,
    {"DB_PROFILE": "production", "DB_DRIVER": "psycopg", "DB_IDLE_IN_TRANSACTION_TIMEOUT": "0"},
)
FSQLA = Variant(
    "flask-sqlalchemy pre_ping",
    "benchmarks.fsqla_app:create_app()",
    "/notes/{id}",
    32,
    {"DB_PROFILE": "production"},
)
SMALL_POOL = Variant(
    "flask-neon pool 2, 32 clients",
    "example_app:create_app()",
    f"/notes?limit={NOTES}",
    32,
    {
        "DB_PROFILE": "production",
        "DB_DRIVER": "psycopg2",
        "DB_POOL_SIZE": "2",
        "DB_MAX_OVERFLOW": "0",
        "DB_POOL_TIMEOUT": "2",
    },
    main=False,
    pool_timeout=2.0,
)
STALL = dataclasses.replace(SMALL_POOL, name="flask-neon pool 2, 2.5 s stall", stall_s=2.5)
VARIANTS = (NEON, FSQLA, SMALL_POOL, STALL)
#: psycopg 3 against psycopg2 (``--no-psycopg``: left out).
PSYCOPG_VARIANTS = (NEON_PSYCOPG, NEON_PSYCOPG_NO_IDLE)


class UnbalancedRunError(Exception):
    """gunicorn handed every connection of a run to some of its workers, leaving one idle."""


class BenchmarkError(RuntimeError):
    pass


# -- wrk -------------------------------------------------------------------------------------

# Counts the answers by status in every wrk thread and prints the totals after wrk's report.
WRK_SCRIPT = """\
local path = PATH
local threads = {}

function setup(thread)
  thread:set("seed", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() * 100 + seed)
  statuses = {}
end

function request()
  return wrk.format("GET", (string.gsub(path, "{id}", tostring(math.random(1, NOTES)))))
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(total) do
    table.insert(parts, string.format('"%d": %d', status, count))
  end
  io.write("statuses: {" .. table.concat(parts, ", ") .. "}\\n")
end
"""


@dataclasses.dataclass
class WrkResult:
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: dict[str, int]
    statuses: dict[str, int]
    #: CPU seconds gunicorn's processes (master and workers) used during the run.
    cpu_s: float = 0.0
    #: Resident memory of gunicorn's processes at the end of the run, in MiB.
    rss_mib: float = 0.0
    #: wrk's connections held by each gunicorn worker (read when they were all open).
    connections_per_worker: list[int] = dataclasses.field(default_factory=list)
    #: Runs discarded before this one because a worker had no connection.
    unbalanced_runs: int = 0

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / max(self.requests, 1) * 1e6

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


_TO_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise BenchmarkError(f"unexpected duration in wrk's output: {text!r}")
    return float(match[1]) * _TO_MS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    """Read wrk's ``--latency`` report (and the status totals our script prints)."""

    def find(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, output, re.MULTILINE)

    rate = find(r"^Requests/sec:\s+([\d.]+)")
    latency = find(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)")
    p50 = find(r"^\s+50%\s+(\S+)\s*$")
    p99 = find(r"^\s+99%\s+(\S+)\s*$")
    total = find(r"^\s+(\d+) requests in ")
    if not (rate and latency and p50 and p99 and total):
        raise BenchmarkError(f"cannot read wrk's output:\n{output}")
    non_2xx = find(r"Non-2xx or 3xx responses: (\d+)")
    sockets = find(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    statuses = find(r"^statuses: (\{.*\})$")
    return WrkResult(
        requests=int(total[1]),
        requests_per_s=float(rate[1]),
        p50_ms=_ms(p50[1]),
        p99_ms=_ms(p99[1]),
        max_ms=_ms(latency[3]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors={
            kind: int(sockets[index]) if sockets else 0
            for index, kind in enumerate(("connect", "read", "write", "timeout"), start=1)
        },
        statuses=json.loads(statuses[1]) if statuses else {},
    )


def _group_stats(group: int) -> Iterator[tuple[list[str], pathlib.Path]]:
    """For each live process of process group ``group``: its ``/proc/PID/stat`` fields after
    the command name (state, ppid, pgrp, ...) and its ``/proc/PID`` folder."""
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == group:
            yield fields, stat.parent


def cpu_seconds(group: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of process group ``group``."""
    ticks = sum(int(fields[11]) + int(fields[12]) for fields, _ in _group_stats(group))
    return ticks / os.sysconf("SC_CLK_TCK")


def resident_mib(group: int) -> float:
    """Resident memory (MiB) of the live processes of process group ``group``."""
    pages = 0
    for _, folder in _group_stats(group):
        with contextlib.suppress(OSError):  # gone meanwhile
            pages += int((folder / "statm").read_text().split()[1])  # size, resident, ...
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def connections_per_worker(group: int, port: int) -> list[int]:
    """Established TCP connections to ``port`` held by each worker of gunicorn's process
    group ``group`` (its leader is the master, which holds none)."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines)  # header
            for line in lines:
                fields = line.split()
                # local address "HEXIP:HEXPORT", state 01 = ESTABLISHED, inode is field 9
                if fields[3] == "01" and int(fields[1].rpartition(":")[2], 16) == port:
                    established.add(f"socket:[{fields[9]}]")
    counts = []
    for _, folder in _group_stats(group):
        if int(folder.name) == group:
            continue
        held = 0
        with contextlib.suppress(OSError):  # gone meanwhile
            for fd in (folder / "fd").iterdir():
                with contextlib.suppress(OSError):
                    held += os.readlink(fd) in established
        counts.append(held)
    return sorted(counts)


def run_wrk(
    base_url: str,
    variant: Variant,
    duration: int,
    script_dir: pathlib.Path,
    during: Callable[[], None] | None = None,
    server_group: int | None = None,
    balanced: bool = False,
) -> WrkResult:
    """Run wrk against ``variant``; ``during`` is called once wrk has started. With
    ``server_group`` (gunicorn's process group), the result has the CPU and memory the server
    used, and how wrk's connections were split between its workers. With ``balanced``, a run
    that leaves a worker without a connection is stopped at once: :class:`UnbalancedRunError`."""
    script = script_dir / f"{re.sub(r'[^a-z0-9]+', '_', variant.name)}.lua"
    script.write_text(
        WRK_SCRIPT.replace("PATH", json.dumps(variant.path)).replace("NOTES", str(NOTES))
    )
    command = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{variant.connections}",
        f"-d{duration}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "--latency",
        f"--script={script}",
        base_url + "/",
    ]
    cpu_before = cpu_seconds(server_group) if server_group else 0.0
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    split: list[int] = []
    try:
        if server_group:
            split = _opened_split(server_group, base_url, variant.connections)
            if balanced and 0 in split:
                raise UnbalancedRunError(split)
        if during is not None:
            during()
        stdout, stderr = process.communicate(timeout=duration + WRK_TIMEOUT_S + 30)
    except BaseException:
        process.kill()
        process.wait()
        raise
    if process.returncode != 0:
        raise BenchmarkError(f"wrk failed ({process.returncode}): {stderr or stdout}")
    result = parse_wrk(stdout)
    if server_group:
        result.cpu_s = cpu_seconds(server_group) - cpu_before
        result.rss_mib = resident_mib(server_group)
        result.connections_per_worker = split
    return result


def _opened_split(group: int, base_url: str, connections: int) -> list[int]:
    """:func:`connections_per_worker` once wrk has opened its ``connections`` (or after
    ``CONNECT_TIMEOUT_S``, as far as they are open then)."""
    port = int(base_url.rpartition(":")[2])
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        split = connections_per_worker(group, port)
        if sum(split) >= connections or time.monotonic() > deadline:
            return split
        time.sleep(0.02)


def measured_run(
    base_url: str,
    variant: Variant,
    duration: int,
    workdir: pathlib.Path,
    during: Callable[[], None] | None,
    group: int,
) -> WrkResult:
    """One run of ``variant``; a compared one is run again while gunicorn leaves a worker
    without a connection (see the module's docstring), the repeats counted in
    ``unbalanced_runs``."""
    for unbalanced in range(UNBALANCED_RETRIES + 1):
        try:
            result = run_wrk(
                base_url, variant, duration, workdir, during, group, balanced=variant.main
            )
        except UnbalancedRunError:
            continue
        result.unbalanced_runs = unbalanced
        return result
    raise BenchmarkError(
        f"{variant.name}: in {UNBALANCED_RETRIES + 1} runs a gunicorn worker got none of "
        "wrk's connections"
    )


def stall(db_url: str, after_s: float, seconds: float) -> None:
    """Lock the ``notes`` table for ``seconds``: every query on it waits, as on a stalled
    database, so the requests holding the pool's connections block and the others must
    time out waiting for one."""
    time.sleep(after_s)
    engine = sa.create_engine(parse_url(db_url).to_sqlalchemy(), poolclass=sa.NullPool)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
            connection.exec_driver_sql("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")
            time.sleep(seconds)
    finally:
        engine.dispose()


# -- processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: pathlib.Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: pathlib.Path) -> None:
    """Poll ``url`` until it answers 200; fail if gunicorn exits or the deadline passes."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    deadline = time.monotonic() + READY_TIMEOUT_S
    last_error = "no answer"
    while True:
        if process.poll() is not None:
            raise BenchmarkError(f"gunicorn exited with {process.returncode}:\n{_tail(log)}")
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
                last_error = f"status {response.status}"
        except urllib.error.HTTPError as exc:
            last_error = f"status {exc.code}"
        except OSError as exc:  # URLError, refused, reset
            last_error = str(exc)
        if time.monotonic() > deadline:
            raise BenchmarkError(
                f"gunicorn did not answer {url} within {READY_TIMEOUT_S:.0f} s "
                f"({last_error}):\n{_tail(log)}"
            )
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (graceful), a deadline, then SIGKILL; the workers share the master's group."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
    # Workers left behind by a master that died: the group outlives its leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 0)
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def gunicorn(
    variant: Variant,
    db_url: str,
    workdir: pathlib.Path,
    cores: list[int] | None,
    workers: int = WORKERS,
    threads: int = THREADS,
) -> Iterator[tuple[str, int]]:
    """Serve ``variant`` on a free port of 127.0.0.1; yields its base URL and process group."""
    port = _free_port()
    # The variant's settings only: no DB_* from this shell; and an empty working directory,
    # so that no stray .env is read.
    env = {key: value for key, value in os.environ.items() if not key.startswith("DB_")}
    env.update(DB_URL=db_url, **variant.env)
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class=gthread",
        f"--workers={workers}",
        f"--threads={threads}",
        f"--bind=127.0.0.1:{port}",
        f"--pythonpath={ROOT}",
        f"--chdir={workdir}",
        "--graceful-timeout=10",
        "--log-level=warning",  # and no access log (gunicorn's default)
        variant.app,
    ]
    log = workdir / f"gunicorn-{port}.log"
    preexec: Callable[[], None] | None = None
    if cores:
        preexec = lambda: os.sched_setaffinity(0, cores)  # noqa: E731
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            # Its own group: Ctrl-C reaches this script, which stops gunicorn in order.
            start_new_session=True,
            preexec_fn=preexec,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_ready(process, base_url + "/notes/1", log)
        yield base_url, process.pid  # the leader of its own session and group
    finally:
        _stop(process)
    if process.returncode not in (0, -signal.SIGTERM):
        message = f"warning: {variant.name}: gunicorn exited with {process.returncode}"
        print(message, file=sys.stderr)


def delayed(url: str, delay_ms: float, stack: contextlib.ExitStack) -> str:
    """``url`` through a :class:`~benchmarks.delay_proxy.DelayProxy` in this process (on the load
    side's cores), closed with ``stack``."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.delay_proxy import DelayProxy

    target = sa.make_url(url)
    proxy = DelayProxy((target.host or "127.0.0.1", target.port or 5432), delay_ms / 1000)
    stack.callback(proxy.close)
    return proxy.url(url)


def split_cores(pin: bool) -> tuple[list[int] | None, list[int] | None]:
    """(gunicorn's cores, the load side's cores), or (None, None) when not pinning."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None, None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    half = len(cores) // 2
    return cores[:half], cores[half:]


@contextlib.contextmanager
def database() -> Iterator[tuple[str, bool]]:
    """Yields (URL, whether it is a throwaway cluster started here). The URL names no driver
    (``postgresql://``): each variant picks its own (flask-neon's ``DB_DRIVER``, psycopg2
    for the others); a driver named in ``BENCH_DB_URL`` is dropped."""
    url = os.environ.get("BENCH_DB_URL")
    if url:
        yield re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url.strip()), False
        return
    from flask_neon.local import LocalPostgres, LocalPostgresError

    cluster = LocalPostgres()
    try:
        cluster.start()
    except LocalPostgresError as exc:
        cluster.stop()
        sys.exit(
            "No database: set BENCH_DB_URL to a PostgreSQL URL, or install the PostgreSQL "
            f"server binaries so a throwaway cluster can start ({exc})."
        )
    try:
        yield cluster.url_for(cluster.database, driver=None), True
    finally:
        cluster.stop()


def prepare(url: str) -> str:
    """Check the database, apply the example app's migrations, seed the notes.

    Returns the server version.
    """
    try:
        parsed = parse_url(url, "BENCH_DB_URL")
    except ValueError as exc:  # NeonConfigError, which names the problem, never the password
        sys.exit(f"BENCH_DB_URL is not a usable PostgreSQL URL: {exc}")
    engine = sa.create_engine(parsed.to_sqlalchemy(), connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as connection:
            version = str(connection.exec_driver_sql("SHOW server_version").scalar())
    except sa.exc.OperationalError as exc:
        engine.dispose()
        sys.exit(f"Cannot reach the benchmark database {parsed.masked()}: {exc.orig}")

    sys.path.insert(0, str(ROOT))
    from flask_migrate import upgrade  # type: ignore[import-untyped]

    from example_app import create_app
    from example_app.extensions import db

    app = create_app({"DB_URL": url, "DB_HEALTH_ENABLED": False})
    with app.app_context():
        upgrade()
        db.engine.dispose()
    try:
        with engine.begin() as connection:
            # Non-destructive: a scratch database's own notes are kept.
            connection.execute(
                sa.text(
                    "INSERT INTO notes (id, title, body) "
                    "SELECT n, 'note ' || n, repeat('Lorem ipsum dolor sit amet. ', 4) "
                    "FROM generate_series(1, :count) AS n ON CONFLICT (id) DO NOTHING"
                ),
                {"count": NOTES},
            )
            connection.exec_driver_sql(
                "SELECT setval(pg_get_serial_sequence('notes', 'id'), (SELECT max(id) FROM notes))"
            )
    finally:
        engine.dispose()
    return version


# -- measurement and report ------------------------------------------------------------------


def summarize(runs: list[WrkResult]) -> dict[str, t.Any]:
    rates = [run.requests_per_s for run in runs]
    statuses: dict[str, int] = {}
    for run in runs:
        for status, count in run.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    return {
        "requests_per_s": statistics.median(rates),
        "requests_per_s_min": min(rates),
        "requests_per_s_max": max(rates),
        "cpu_us_per_request": statistics.median(run.cpu_us_per_request for run in runs),
        "rss_mib_first": runs[0].rss_mib,
        "rss_mib_last": runs[-1].rss_mib,
        "p50_ms": statistics.median(run.p50_ms for run in runs),
        "p99_ms": statistics.median(run.p99_ms for run in runs),
        "max_ms": max(run.max_ms for run in runs),
        "requests": sum(run.requests for run in runs),
        "non_2xx": sum(run.non_2xx for run in runs),
        "socket_errors": sum(sum(run.socket_errors.values()) for run in runs),
        "errors": sum(run.errors for run in runs),
        "statuses": dict(sorted(statuses.items())),
    }


def round_ratios(
    runs: dict[str, list[WrkResult]], variant: Variant = NEON, baseline: Variant = FSQLA
) -> list[float]:
    """``variant``'s requests/s over ``baseline``'s (by default flask-neon's over
    Flask-SQLAlchemy's), per round (run back to back)."""
    pairs = zip(runs[variant.name], runs[baseline.name], strict=True)
    return [ours.requests_per_s / theirs.requests_per_s for ours, theirs in pairs]


def cpu_ratios(runs: dict[str, list[WrkResult]]) -> list[float]:
    """Flask-SQLAlchemy's server CPU per request over flask-neon's, per round: the ratio of
    the requests/s each sustains on the same saturated cores, without the time the machine's
    other tenants take from a round."""
    pairs = zip(runs[NEON.name], runs[FSQLA.name], strict=True)
    return [fsqla.cpu_us_per_request / neon.cpu_us_per_request for neon, fsqla in pairs]


def check(
    summary: dict[str, dict[str, t.Any]], ratio: float, variants: t.Sequence[Variant] = VARIANTS
) -> tuple[list[str], list[str]]:
    """(failures, missed targets) for the runs and the median round ratio."""
    failures = []
    for variant in variants:
        result = summary[variant.name]
        if variant.main and result["errors"]:
            failures.append(
                f"{variant.name}: {result['errors']} errors ({result['non_2xx']} non-2xx, "
                f"{result['socket_errors']} socket errors)"
            )
        if variant.pool_timeout is not None:
            limit_ms = (variant.pool_timeout + HANG_MARGIN_S) * 1000
            if result["max_ms"] >= limit_ms:
                failures.append(
                    f"{variant.name}: max latency {result['max_ms']:.0f} ms >= {limit_ms:.0f} ms"
                )
            if result["socket_errors"]:
                failures.append(f"{variant.name}: {result['socket_errors']} socket errors")
            others = {s: n for s, n in result["statuses"].items() if s not in ("200", "503")}
            if others:
                failures.append(f"{variant.name}: answers other than 200 and 503: {others}")
    missed = []
    for variant in (NEON, FSQLA):
        first, last = summary[variant.name]["rss_mib_first"], summary[variant.name]["rss_mib_last"]
        if last > first * (1 + MEMORY_GROWTH_LIMIT):
            missed.append(
                f"{variant.name}: resident memory grew from {first:.1f} to {last:.1f} MiB "
                f"(more than {MEMORY_GROWTH_LIMIT:.0%})"
            )
    if ratio < TARGET_RATIO:
        missed.append(f"flask-neon / Flask-SQLAlchemy throughput {ratio:.3f} < {TARGET_RATIO}")
    return failures, missed


def report(
    summary: dict[str, dict[str, t.Any]],
    rounds: int,
    ratios: list[float],
    cpu: list[float],
    driver_ratios: dict[str, list[float]] | None = None,
) -> None:
    spread = rounds > 1
    print(
        f"\n{'variant':40} {'req/s':>9}{'  (min-max)' if spread else ''} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'errors':>7} {'503':>6} {'CPU us/req':>10} "
        f"{'RSS MiB':>15}"
    )
    for name, result in summary.items():
        rate_range = (
            f"  ({result['requests_per_s_min']:.0f}-{result['requests_per_s_max']:.0f})"
            if spread
            else ""
        )
        print(
            f"{name:40} {result['requests_per_s']:9.1f}{rate_range} {result['p50_ms']:8.2f} "
            f"{result['p99_ms']:8.2f} {result['max_ms']:8.1f} {result['errors']:7d} "
            f"{result['statuses'].get('503', 0):6d} {result['cpu_us_per_request']:10.0f} "
            f"{result['rss_mib_first']:7.1f}->{result['rss_mib_last']:5.1f}"
        )
    print(
        f"\nthroughput flask-neon / Flask-SQLAlchemy pre_ping, median of the rounds: "
        f"{statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"target >= {TARGET_RATIO})"
    )
    print(
        f"server CPU per request, Flask-SQLAlchemy pre_ping / flask-neon, median of the rounds: "
        f"{statistics.median(cpu):.3f} (rounds: {', '.join(f'{r:.2f}' for r in cpu)})"
    )
    for label, values in (driver_ratios or {}).items():
        print(
            f"throughput {label}, median of the rounds: {statistics.median(values):.3f} "
            f"(rounds: {', '.join(f'{r:.2f}' for r in values)})"
        )
    for variant in (SMALL_POOL, STALL):
        result = summary[variant.name]
        assert variant.pool_timeout is not None
        print(
            f"{variant.name}: {result['requests']} requests, statuses {result['statuses']}, "
            f"max latency {result['max_ms']:.0f} ms "
            f"(limit {(variant.pool_timeout + HANG_MARGIN_S) * 1000:.0f} ms)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load")
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs; medians")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="gunicorn on half the cores, wrk, PostgreSQL and this script on the other half: "
        "the app's CPU alone decides (default: the scheduler places everything, as issue 15's "
        "set-up)",
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="put the database behind a proxy delaying each direction by this much, as a "
        "network hop (1: a Neon compute in the same region); 0: loopback (issue 15's set-up)",
    )
    parser.add_argument(
        "--workers", type=int, default=WORKERS, help="gunicorn workers (issue 15's set-up: 2)"
    )
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="threads a worker (issue 15's set-up: 4)"
    )
    parser.add_argument(
        "--psycopg",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run flask-neon on psycopg 3, with and without an idle-in-transaction timeout",
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--no-targets", action="store_true", help="report only")
    args = parser.parse_args(argv)
    mains = [NEON, FSQLA, *(PSYCOPG_VARIANTS if args.psycopg else ())]
    variants = (*mains, SMALL_POOL, STALL)
    if args.duration < 5:
        parser.error("--duration must be at least 5 s (the stall variant locks for 2.5 s)")

    if shutil.which("wrk") is None:
        print(WRK_INSTALL_HINT, file=sys.stderr)
        return 1
    # A SIGTERM unwinds like Ctrl-C, through the cleanup below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    server_cores, load_cores = split_cores(args.pin)
    if load_cores:
        # Inherited by everything started from here on but gunicorn: wrk and PostgreSQL.
        os.sched_setaffinity(0, load_cores)

    runs: dict[str, list[WrkResult]] = {variant.name: [] for variant in variants}
    with database() as (url, local), tempfile.TemporaryDirectory(prefix="load-test-") as tmp:
        workdir = pathlib.Path(tmp)
        server_version = prepare(url)
        print(
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, PostgreSQL "
            f"{server_version}{' (throwaway cluster)' if local else ''}, gunicorn "
            f"{args.workers} x {args.threads} on cores {server_cores or 'any'}, wrk and this "
            f"script on {load_cores or 'any'}"
            + (f", database {args.delay_ms:g} ms away each way" if args.delay_ms else ""),
            flush=True,
        )
        with contextlib.ExitStack() as stack:
            if args.delay_ms:
                url = delayed(url, args.delay_ms, stack)
            servers: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[str, int]] = {}
            for variant in variants:
                if variant.server_key not in servers:
                    servers[variant.server_key] = stack.enter_context(
                        gunicorn(variant, url, workdir, server_cores, args.workers, args.threads)
                    )
                    base_url = servers[variant.server_key][0]
                    if args.warmup:
                        run_wrk(base_url, variant, args.warmup, workdir)
            for index in range(args.rounds):
                # Rotate the main variants' order, so none always runs after the same one.
                shift = index % len(mains)
                for variant in [*mains[shift:], *mains[:shift], SMALL_POOL, STALL]:
                    during = None
                    if variant.stall_s is not None:
                        during = functools.partial(stall, url, args.duration / 3, variant.stall_s)
                    base_url, group = servers[variant.server_key]
                    result = measured_run(base_url, variant, args.duration, workdir, during, group)
                    runs[variant.name].append(result)
                    print(
                        f"round {index + 1}/{args.rounds} {variant.name}: "
                        f"{result.requests_per_s:.1f} req/s, p50 {result.p50_ms:.2f} ms, "
                        f"p99 {result.p99_ms:.2f} ms, errors {result.errors}, "
                        f"server CPU {result.cpu_us_per_request:.0f} us/request, "
                        f"resident {result.rss_mib:.1f} MiB, connections per worker "
                        f"{result.connections_per_worker}"
                        + (
                            f" ({result.unbalanced_runs} unbalanced runs repeated)"
                            if result.unbalanced_runs
                            else ""
                        ),
                        flush=True,
                    )

    summary = {name: summarize(results) for name, results in runs.items()}
    ratios = round_ratios(runs)
    ratio = statistics.median(ratios)
    cpu = cpu_ratios(runs)
    driver_ratios = {}
    if args.psycopg:
        for variant in PSYCOPG_VARIANTS:
            driver_ratios[f"{variant.name} / flask-neon (psycopg2)"] = round_ratios(
                runs, variant, NEON
            )
            driver_ratios[f"{variant.name} / Flask-SQLAlchemy pre_ping"] = round_ratios(
                runs, variant, FSQLA
            )
    failures, missed = check(summary, ratio, variants)
    report(summary, args.rounds, ratios, cpu, driver_ratios)
    if args.json:
        machine = {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "postgresql": server_version,
            "throwaway_cluster": local,
            "gunicorn_cores": server_cores,
            "load_cores": load_cores,
        }
        settings = {
            "duration_s": args.duration,
            "delay_ms": args.delay_ms,
            "rounds": args.rounds,
            "workers": args.workers,
            "threads": args.threads,
            "wrk_threads": WRK_THREADS,
            "variants": [dataclasses.asdict(variant) for variant in variants],
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(
                {
                    "machine": machine,
                    "settings": settings,
                    "summary": summary,
                    "runs": {n: [dataclasses.asdict(r) for r in rs] for n, rs in runs.items()},
                    "ratio": ratio,
                    "round_ratios": ratios,
                    "cpu_ratio": statistics.median(cpu),
                    "round_cpu_ratios": cpu,
                    "driver_ratios": driver_ratios,
                    "failures": failures,
                    "missed": missed,
                },
                out,
                indent=2,
            )
    if failures:
        print("\nfailures:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    if missed and not args.no_targets:
        print("\nmissed targets:\n  " + "\n  ".join(missed), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        sys.exit(f"load test failed: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
