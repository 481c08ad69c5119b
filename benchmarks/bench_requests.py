"""Per-request overhead: flask-neon against bare Flask, raw psycopg2, Flask-SQLAlchemy(-Lite).

Both drivers: flask-neon, Flask-SQLAlchemy with ``pool_pre_ping`` and a raw pool also run on
psycopg 3 (``postgresql+psycopg://``); flask-neon on psycopg 3 both with its default
idle-in-transaction timeout (psycopg 3 then opens its transactions with a ``BEGIN`` of its own,
see benchmarks/README.md) and with ``DB_IDLE_IN_TRANSACTION_TIMEOUT=0``. The ratios psycopg 3 /
psycopg2 are printed after the table.

Every variant serves the same three endpoints from one process, against the same PostgreSQL:

* ``/select1``: one ``SELECT 1`` through the session (or cursor);
* ``/get``: one row by primary key through the ORM (a plain query for raw psycopg2);
* ``/nodb``: a view that touches no database.

Requests are WSGI calls straight into each app (no HTTP server, no test client), so the
numbers are the framework's and the extension's own cost plus the database round trips.
Variants run interleaved in rounds, in a new random order each round, and the fastest round
of each is reported (as ``timeit`` does), because the machine is shared and noisy and
disturbances only ever add time: read the ratios, not the absolute microseconds.

Usage::

    python benchmarks/bench_requests.py            # starts a throwaway local PostgreSQL
    BENCH_DB_URL=postgresql://... python benchmarks/bench_requests.py --rounds 15

Exits non-zero when a request fails or a target is missed (``--no-targets`` to only report).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import sys
import time
import typing as t
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import psycopg2.pool
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import orm
from werkzeug.test import EnvironBuilder

ENDPOINTS = ("/select1", "/get", "/nodb")
WSGIApp = Callable[[dict[str, t.Any], Callable[..., t.Any]], t.Iterable[bytes]]


class Base(orm.DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "bench_notes"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str]


def _psycopg2_dsn(url: str) -> str:
    from flask_neon._url import parse_url

    sa_url = parse_url(url).to_sqlalchemy().set(drivername="postgresql")
    return sa_url.render_as_string(hide_password=False)


# -- variants --------------------------------------------------------------------------------


def bare_flask(url: str) -> Flask:
    app = Flask("bare")

    @app.get("/nodb")
    def nodb() -> str:
        return "ok"

    return app


def raw_psycopg2(url: str) -> Flask:
    app = Flask("raw")
    pool = psycopg2.pool.ThreadedConnectionPool(1, 5, _psycopg2_dsn(url))

    @app.get("/select1")
    def select1() -> str:
        connection = pool.getconn()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                value = cursor.fetchone()[0]
            connection.rollback()
        finally:
            pool.putconn(connection)
        return str(value)

    @app.get("/get")
    def get() -> str:
        connection = pool.getconn()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT id, title FROM bench_notes WHERE id = %s", (1,))
                row = cursor.fetchone()
            connection.rollback()
        finally:
            pool.putconn(connection)
        return str(row[1])

    @app.get("/nodb")
    def nodb() -> str:
        return "ok"

    return app


def raw_psycopg(url: str) -> Flask:
    """psycopg 3 on a plain queue of connections (psycopg_pool is not a dependency)."""
    import queue

    app = Flask("raw_psycopg")
    pool: queue.SimpleQueue[psycopg.Connection[tuple[t.Any, ...]]] = queue.SimpleQueue()
    for _ in range(5):
        pool.put(psycopg.connect(_psycopg2_dsn(url)))

    def one_row(sql: str, params: tuple[object, ...] = ()) -> tuple[object, ...]:
        connection = pool.get()
        try:
            row = connection.execute(sql, params).fetchone()
            connection.rollback()
        finally:
            pool.put(connection)
        assert row is not None
        return row

    @app.get("/select1")
    def select1() -> str:
        return str(one_row("SELECT 1")[0])

    @app.get("/get")
    def get() -> str:
        return str(one_row("SELECT id, title FROM bench_notes WHERE id = %s", (1,))[1])

    @app.get("/nodb")
    def nodb() -> str:
        return "ok"

    return app


def _session_views(app: Flask, session: Callable[[], orm.Session]) -> Flask:
    select_one = sa.text("SELECT 1")

    @app.get("/select1")
    def select1() -> str:
        return str(session().execute(select_one).scalar())

    @app.get("/get")
    def get() -> str:
        note = session().get(Note, 1)
        assert note is not None
        return note.title

    @app.get("/nodb")
    def nodb() -> str:
        return "ok"

    return app


def flask_sqlalchemy(url: str, pre_ping: bool, driver: str = "psycopg2") -> Flask:
    from flask_sqlalchemy import SQLAlchemy

    app = Flask(f"fsa_{pre_ping}_{driver}")
    app.config["SQLALCHEMY_DATABASE_URI"] = _sa_url(url, driver)
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_pre_ping": pre_ping}
    db = SQLAlchemy(app, model_class=Base)
    return _session_views(app, lambda: db.session)


def flask_sqlalchemy_lite(url: str) -> Flask:
    from flask_sqlalchemy_lite import SQLAlchemy

    app = Flask("fsa_lite")
    app.config["SQLALCHEMY_ENGINES"] = {"default": _sa_url(url)}
    db = SQLAlchemy(app)
    return _session_views(app, lambda: db.session)


def flask_neon(url: str, driver: str = "psycopg2", **config: t.Any) -> Flask:
    from flask_neon import NeonDB

    app = Flask(f"neon_{driver}_" + "_".join(f"{k}_{v}" for k, v in config.items()))
    app.config.update(DB_URL=_sa_url(url, driver), DB_HEALTH_ENABLED=False, **config)
    db = NeonDB(app, metadata=Base.metadata, env_file=None)
    return _session_views(app, lambda: db.session)


def _sa_url(url: str, driver: str = "psycopg2") -> str:
    """``url`` naming ``driver`` (``psycopg2`` or ``psycopg``)."""
    from flask_neon._url import parse_url

    sa_url = parse_url(url).to_sqlalchemy().set(drivername=f"postgresql+{driver}")
    return sa_url.render_as_string(hide_password=False)


def variants(url: str) -> dict[str, Flask]:
    return {
        "bare flask": bare_flask(url),
        "raw psycopg2 pool": raw_psycopg2(url),
        "flask-sqlalchemy": flask_sqlalchemy(url, pre_ping=False),
        "flask-sqlalchemy pre_ping": flask_sqlalchemy(url, pre_ping=True),
        "flask-sqlalchemy-lite": flask_sqlalchemy_lite(url),
        "flask-neon production": flask_neon(url, DB_PROFILE="production"),
        "flask-neon development": flask_neon(url, DB_PROFILE="development"),
        "flask-neon serverless": flask_neon(url, DB_PROFILE="serverless"),
        "flask-neon SET LOCAL limits": flask_neon(
            url, DB_PROFILE="production", DB_SESSION_LIMITS="transaction"
        ),
        "raw psycopg 3": raw_psycopg(url),
        "flask-sqlalchemy pre_ping, psycopg 3": flask_sqlalchemy(url, True, "psycopg"),
        "flask-neon production, psycopg 3": flask_neon(url, "psycopg", DB_PROFILE="production"),
        "flask-neon production, psycopg 3, no idle timeout": flask_neon(
            url, "psycopg", DB_PROFILE="production", DB_IDLE_IN_TRANSACTION_TIMEOUT=0
        ),
    }


# -- measurement -----------------------------------------------------------------------------


class RequestFailedError(RuntimeError):
    pass


def caller(app: Flask, path: str) -> Callable[[], None]:
    environ = EnvironBuilder(path=path, method="GET").get_environ()
    statuses: list[str] = []

    def start_response(status: str, headers: t.Any, exc_info: t.Any = None) -> None:
        statuses.append(status)

    def call() -> None:
        statuses.clear()
        body = app.wsgi_app(dict(environ), start_response)
        for _ in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
        if not statuses or not statuses[0].startswith("200"):
            raise RequestFailedError(f"{app.name} {path}: {statuses[:1]}")

    return call


def time_calls(call: Callable[[], None], count: int) -> float:
    """Microseconds per call over ``count`` calls."""
    started = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - started) / count * 1e6


def measure(apps: dict[str, Flask], rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    callers = {
        (name, path): caller(app, path)
        for name, app in apps.items()
        for path in ENDPOINTS
        if path in {rule.rule for rule in app.url_map.iter_rules()}
    }
    for call in callers.values():  # warm up: connections open, caches filled
        for _ in range(200):
            call()
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in callers}
    gc.disable()
    try:
        order = list(callers.items())
        for _ in range(rounds):
            # A new order each round, so no variant always runs right after a heavy one.
            random.shuffle(order)
            for key, call in order:
                samples[key].append(time_calls(call, per_round))
    finally:
        gc.enable()
    results: dict[str, dict[str, float]] = {}
    for (name, path), values in samples.items():
        # The fastest round, as timeit reports: on a shared machine every disturbance only
        # adds time, so the minimum is the measurement least polluted by neighbours.
        results.setdefault(name, {})[path] = min(values)
    return results


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_growth(app: Flask, total: int = 100_000) -> tuple[int, int]:
    """RSS (KiB) after 10,000 and after ``total`` requests mixing the three endpoints."""
    calls = [caller(app, path) for path in ENDPOINTS]
    at_10k = 0
    for index in range(total):
        calls[index % 3]()
        if index + 1 == 10_000:
            gc.collect()
            at_10k = rss_kib()
    gc.collect()
    return at_10k, rss_kib()


# -- report ----------------------------------------------------------------------------------

TARGETS = [
    # (variant, baseline, endpoint, max ratio)
    ("flask-neon production", "flask-sqlalchemy pre_ping", "/select1", 0.85),
    ("flask-neon production", "flask-sqlalchemy pre_ping", "/get", 0.85),
    ("flask-neon production", "flask-sqlalchemy", "/select1", 1.0),
    ("flask-neon production", "flask-sqlalchemy", "/get", 1.0),
    ("flask-neon production", "raw psycopg2 pool", "/select1", 1.25),
    ("flask-neon production", "bare flask", "/nodb", 1.05),
]


#: (psycopg 3 variant, its psycopg2 counterpart): printed as ratios, no target.
DRIVER_PAIRS = [
    ("raw psycopg 3", "raw psycopg2 pool"),
    ("flask-sqlalchemy pre_ping, psycopg 3", "flask-sqlalchemy pre_ping"),
    ("flask-neon production, psycopg 3", "flask-neon production"),
    ("flask-neon production, psycopg 3, no idle timeout", "flask-neon production"),
]


def report(results: dict[str, dict[str, float]]) -> list[str]:
    names = list(results)
    print(f"{'variant':50} " + " ".join(f"{p:>10}" for p in ENDPOINTS) + "   (us/request)")
    for name in names:
        row = " ".join(
            f"{results[name][p]:10.1f}" if p in results[name] else f"{'-':>10}" for p in ENDPOINTS
        )
        print(f"{name:50} {row}")
    print()
    for variant, baseline in DRIVER_PAIRS:
        ratios = ", ".join(
            f"{path} {results[variant][path] / results[baseline][path]:.3f}"
            for path in ("/select1", "/get")
        )
        print(f"psycopg 3 / psycopg2: {variant} / {baseline}: {ratios}")
    print()
    missed = []
    for variant, baseline, path, limit in TARGETS:
        ratio = results[variant][path] / results[baseline][path]
        ok = ratio <= limit
        print(
            f"{'ok  ' if ok else 'MISS'} {variant} / {baseline} on {path}: "
            f"{ratio:.3f} (target <= {limit})"
        )
        if not ok:
            missed.append(f"{variant} / {baseline} {path} = {ratio:.3f} > {limit}")
    return missed


@contextmanager
def database() -> Iterator[str]:
    url = os.environ.get("BENCH_DB_URL")
    if url:
        yield url
        return
    from flask_neon.local import LocalPostgres, LocalPostgresError

    try:
        cluster = LocalPostgres().start()
    except LocalPostgresError as exc:
        sys.exit(
            f"No database: set BENCH_DB_URL to a PostgreSQL URL, or install the PostgreSQL "
            f"server binaries so a throwaway cluster can start ({exc})."
        )
    try:
        _pin(cluster)
        yield cluster.url
    finally:
        cluster.stop()


def _pin(cluster: t.Any) -> None:
    """Keep the server's processes and this one on separate cores when there are two or more:
    on a shared 2-core machine that removes most of the noise between variants."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        return
    pid_file = cluster.data_dir / "postmaster.pid"
    postmaster = int(pid_file.read_text().splitlines()[0])
    # Backends are forked from the postmaster and inherit its affinity.
    os.sched_setaffinity(postmaster, cores[1:])
    os.sched_setaffinity(0, cores[:1])


def prepare(url: str) -> None:
    engine = sa.create_engine(_sa_url(url))
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("SELECT 1")
            Base.metadata.drop_all(connection)
            Base.metadata.create_all(connection)
            connection.execute(sa.insert(Note), [{"id": 1, "title": "hello"}])
    except sa.exc.OperationalError as exc:
        sys.exit(f"Cannot reach the benchmark database: {exc.orig}")
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--per-round", type=int, default=500)
    parser.add_argument("--memory", action="store_true", help="also run the 100k memory check")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--no-targets", action="store_true", help="report only")
    args = parser.parse_args(argv)

    with database() as url:
        prepare(url)
        apps = variants(url)
        try:
            results = measure(apps, args.rounds, args.per_round)
        except RequestFailedError as exc:
            print(f"request failed during the measurement: {exc}", file=sys.stderr)
            return 1
        missed = report(results)
        memory = None
        if args.memory:
            at_10k, at_100k = memory_growth(apps["flask-neon production"])
            growth = (at_100k - at_10k) / at_10k
            memory = {"rss_kib_10k": at_10k, "rss_kib_100k": at_100k, "growth": growth}
            ok = growth <= 0.05
            print(
                f"\n{'ok  ' if ok else 'MISS'} memory: RSS {at_10k} KiB after 10k requests, "
                f"{at_100k} KiB after 100k ({growth:+.2%}, target <= +5%)"
            )
            if not ok:
                missed.append(f"memory growth {growth:.2%}")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump({"results": results, "memory": memory, "missed": missed}, out, indent=2)
    if missed and not args.no_targets:
        print("\nmissed targets:\n  " + "\n  ".join(missed), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
