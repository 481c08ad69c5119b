"""A seeded differential fuzzer of transactions' first statements (generator: first_statements.py).

Each generated statement runs as a transaction's first through SQLAlchemy's ``exec_driver_sql``
(with or without parameters) on an engine with ``DB_FAST_BEGIN=false`` (the driver's own BEGIN,
the oracle) and on one with fast BEGIN, each time in a new session of a freshly re-created
schema; then the transaction's next statement, then its commit or rollback; on psycopg2 and on
psycopg 3. Everything observable is recorded and must be equal, statement by statement: rows,
column names, status message and row count, or the exception (type, text, ``pgcode`` /
``sqlstate``, ``pgerror``, every ``diag`` field); notices and notifications; the driver's
transaction attributes and libpq's transaction status; what the session keeps (prepared
statements with their text, cursors with theirs, advisory and other locks, listened channels,
temporary tables, settings); what the database keeps (tables, rows, indexes, sequence values,
prepared transactions).

Left out, as docs/fast-begin.md documents them for psycopg2: ``cursor.query``'s text, and what
the server records of the message (``current_query()``, ``pg_stat_activity.query``, ``now()``
against ``statement_timestamp()``): nothing generated reads them. On psycopg 3,
``autocommit`` inside the transaction fast BEGIN opened is checked as documented
(:meth:`parity.Out.state`).

``FLASK_NEON_FUZZ_SEED`` replays a seed (a failure names it); ``FLASK_NEON_FUZZ_CASES`` sets how
many statements (default 300).
"""

from __future__ import annotations

import difflib
import os
import pprint
import secrets
import time
import typing as t
import uuid
from collections.abc import Iterator

import psycopg2
import pytest
import sqlalchemy as sa

from . import first_statements, parity
from .conftest import _dsn, admin_execute, wait_until
from .first_statements import FirstStatement
from .test_driver_parity import DRIVERS, engine_of, opened_fast, with_driver

DEFAULT_CASES = 300
#: How many differing statements a failure describes in full (all are counted).
SHOWN = 12


@pytest.fixture(scope="module")
def fuzz_url(database_url: str) -> Iterator[str]:
    name = f"fuzz_{uuid.uuid4().hex[:8]}"
    admin_execute(database_url, f'CREATE DATABASE "{name}"')
    url = sa.make_url(database_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        admin_execute(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Runner:
    """Runs a generated statement on one engine, in a new session of a fresh schema."""

    def __init__(self, url: str, driver: str = "psycopg2") -> None:
        self.url = url
        self.admin = psycopg2.connect(_dsn(url), application_name="fuzz-admin")
        self.admin.autocommit = True
        # psycopg 3: without an idle-in-transaction timeout, where fast BEGIN opens every
        # transaction (with one, only a connection's first: test_driver_parity).
        config = {"DB_IDLE_IN_TRANSACTION_TIMEOUT": 0} if driver == "psycopg" else {}
        self.engines = {
            fast: engine_of(with_driver(url, driver), DB_FAST_BEGIN=fast, **config)[0]
            for fast in (False, True)
        }
        if driver == "psycopg":
            for engine in self.engines.values():
                sa.event.listen(
                    engine, "connect", lambda dbapi, record: parity.watch_notifies(dbapi)
                )
        assert opened_fast(self.engines[True])  # fast BEGIN engaged
        assert not opened_fast(self.engines[False])

    def close(self) -> None:
        for engine in self.engines.values():
            engine.dispose()
        self.admin.close()

    def rows(self, sql: str, params: t.Any = None) -> list[tuple[t.Any, ...]]:
        with self.admin.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []

    def reset(self) -> None:
        for (gid,) in self.rows(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
        ):
            self.rows(f"ROLLBACK PREPARED '{gid}'")
        with self.admin.cursor() as cursor:
            cursor.execute(first_statements.SCHEMA)

    def kept(self, pid: int | None) -> dict[str, t.Any]:
        """What the server keeps after the run: the backend's locks, the database's data."""
        facts: dict[str, t.Any] = {
            # Not what it waits on: an idle backend shows ClientRead a moment after "idle".
            "backend": self.rows("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)),
            "locks": self.rows(
                "SELECT locktype, mode, granted, classid::int8, objid::int8, objsubid, "
                "relation::regclass::text FROM pg_locks WHERE pid = %s AND locktype <> "
                "'virtualxid' ORDER BY 1, 2, 3, 4, 5, 6, 7",
                (pid,),
            ),
            "tables": self.rows(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            ),
            "indexes": self.rows(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
            ),
            "prepared transactions": self.rows(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            ),
            "sequences": [
                self.rows(f"SELECT last_value, is_called FROM {name}")
                for name in first_statements.SEQUENCES
            ],
        }
        if self.rows("SELECT to_regclass('f') IS NOT NULL")[0][0]:
            facts["f"] = self.rows("SELECT id, v, n::text FROM f ORDER BY id")
            facts["f comment"] = self.rows("SELECT obj_description('f'::regclass, 'pg_class')")
        return facts

    def run(self, fast: bool, item: FirstStatement) -> list[t.Any]:
        """The statement on one engine; everything observable, in order."""
        self.reset()
        engine = self.engines[fast]
        out = parity.Out(self.url)
        pid: int | None = None
        try:
            with parity.logged_notices() as notices, engine.connect() as connection:
                raw = parity.dbapi(connection)
                pid = raw.info.backend_pid
                if item.setup:
                    out.do("begin", parity.execute, connection, "SELECT 1")
                    for text in item.setup:
                        out.do("setup", parity.execute, connection, text)
                    out.do("commit", connection.commit)
                if item.change:
                    self.rows(item.change)
                parity.clear_notices(raw)
                out.do("first statement", first, connection, item)
                out.state("after the first statement", raw)
                out.do("next statement", parity.execute, connection, item.follow_up)
                out.do(item.end, getattr(connection, item.end))
                out.state(f"after {item.end}", raw)
                out.fact("notifications", parity.notifications(raw))
                out.session("session", raw)
            out.fact("logged notices", notices)
            if raw.closed:  # discarded by the pool: its backend goes, at its own pace
                self.gone(pid)
            out.fact("kept", self.kept(pid))
        finally:
            engine.dispose()
            if pid is not None:
                # Its session-level locks go with the backend: the next run must not meet them.
                self.gone(pid)
        return out.events

    def gone(self, pid: int) -> None:
        """Wait until backend ``pid`` and its locks are gone."""
        wait_until(
            lambda: (
                not self.rows(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s "
                    "UNION ALL SELECT 1 FROM pg_locks WHERE pid = %s",
                    (pid, pid),
                )
            ),
            message=f"backend {pid} gone",
        )


def first(connection: sa.Connection, item: FirstStatement) -> tuple[t.Any, ...]:
    """The first statement: its rows and column names (or None), status message, row count."""
    if item.params is None:
        result = connection.exec_driver_sql(item.sql)
    else:
        result = connection.exec_driver_sql(item.sql, item.params)
    rows = result.all() if result.returns_rows else None
    keys = list(result.keys()) if result.returns_rows else None
    return rows, keys, result.context.cursor.statusmessage, result.rowcount


def setting(name: str) -> str | None:
    """The fuzzer's own environment variable.

    tests/conftest.py removes every ``FLASK_*`` variable when pytest starts, so that nothing of
    a developer's shell changes the suite; these two are read from the environment the process
    started with (Linux keeps it in /proc/self/environ).
    """
    if name in os.environ:
        return os.environ[name]
    try:
        with open("/proc/self/environ", "rb") as environ:
            initial = environ.read().split(b"\0")
    except OSError:
        return None
    for entry in initial:
        key, _, value = entry.partition(b"=")
        if key.decode(errors="replace") == name:
            return value.decode()
    return None


def seed_and_count() -> tuple[int, int]:
    seed = setting("FLASK_NEON_FUZZ_SEED")
    count = int(setting("FLASK_NEON_FUZZ_CASES") or DEFAULT_CASES)
    return (int(seed) if seed else secrets.randbits(32)), count


def difference(expected: list[t.Any], actual: list[t.Any]) -> str:
    lines = difflib.unified_diff(
        pprint.pformat(expected, width=110).splitlines(),
        pprint.pformat(actual, width=110).splitlines(),
        "the driver's BEGIN",
        "fast BEGIN",
        n=1,
        lineterm="",
    )
    return "\n".join(lines)


@pytest.mark.parametrize("driver", DRIVERS)
def test_first_statements_behave_as_with_the_drivers_begin(fuzz_url: str, driver: str) -> None:
    seed, count = seed_and_count()
    print(f"{driver}: FLASK_NEON_FUZZ_SEED={seed} FLASK_NEON_FUZZ_CASES={count}")
    runner = Runner(fuzz_url, driver)
    started = time.monotonic()
    differing: list[tuple[FirstStatement, str]] = []
    try:
        for item in first_statements.generate(seed, count):
            expected = runner.run(False, item)
            actual = runner.run(True, item)
            if actual != expected:
                differing.append((item, difference(expected, actual)))
    finally:
        runner.close()
    elapsed = time.monotonic() - started
    print(f"{count} statements in {elapsed:.1f} s")
    if differing:
        kinds: dict[str, int] = {}
        for item, _ in differing:
            kinds[item.kind] = kinds.get(item.kind, 0) + 1
        shown = "\n\n".join(f"{item.describe()}\n{diff}" for item, diff in differing[:SHOWN])
        pytest.fail(
            f"{len(differing)} of {count} first statements differ from {driver}'s own BEGIN "
            f"(by kind: {kinds}); replay with FLASK_NEON_FUZZ_SEED={seed} "
            f"FLASK_NEON_FUZZ_CASES={count}\n\n{shown}",
            pytrace=False,
        )


def test_the_generator_repeats_itself_for_a_seed() -> None:
    assert first_statements.generate(7, 200) == first_statements.generate(7, 200)
    assert first_statements.generate(7, 50) != first_statements.generate(8, 50)
    made = first_statements.generate(11, DEFAULT_CASES)
    kinds = {item.kind for item in made}
    assert kinds >= {
        "select",
        "select_table",
        "write",
        "invalid",
        "comment_only",
        "prepared",
        "session",
        "utility",
        "transaction_control",
        "several",
        "long",
    }
    assert any(item.params is not None for item in made)
    assert any(item.params is None for item in made)
    assert any("\x00" in item.sql for item in made)
