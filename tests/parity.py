"""The cases of the differential suite: the same steps on psycopg2's own connection and on ours.

Each case is a small function ``case(engine, out)`` that does something a user of psycopg2 or
SQLAlchemy does, and writes everything observable into ``out``: what each call returned or
raised (type and text), the connection's transaction attributes, cursor attributes, notices.
:func:`outcome` runs a case on one engine and adds what the database kept. The suite asserts
that the outcome with ``DB_FAST_BEGIN`` on equals the outcome with psycopg2's own connection.

Raw cases take a DBAPI connection and run in two positions: on a connection fresh from the
pool (``engine.raw_connection()``), and in the middle of a SQLAlchemy transaction that
already wrote a row (where a fast transaction is open).
"""

from __future__ import annotations

import io
import re
import typing as t
from collections.abc import Callable

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras
import sqlalchemy as sa
from psycopg2 import sql
from sqlalchemy import orm

from .conftest import admin_execute


class Out:
    """Everything observable that a case produced, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[t.Any, ...]] = []

    def do(self, label: str, fn: Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> t.Any:
        """Call ``fn`` and record what it returned or raised."""
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:
            self.events.append((label, "raised", type(exc).__qualname__, _anonymous(str(exc))))
            return None
        self.events.append((label, "returned", plain(value)))
        return value

    def state(self, label: str, connection: t.Any) -> None:
        """Record the transaction attributes of a DBAPI connection."""
        attributes = {}
        for name in ("closed", "status", "autocommit", "readonly", "deferrable"):
            attributes[name] = _read(lambda name=name: getattr(connection, name))
        attributes["isolation_level"] = _read(lambda: connection.isolation_level)
        attributes["transaction_status"] = _read(connection.get_transaction_status)
        attributes["encoding"] = _read(lambda: connection.encoding)
        attributes["notices"] = _read(lambda: [n.strip() for n in connection.notices])
        self.events.append((label, "state", attributes))

    def cursor(self, label: str, cursor: t.Any) -> None:
        """Record what a cursor says about its last statement."""
        self.events.append(
            (
                label,
                "cursor",
                _read(lambda: cursor.query),
                _read(lambda: cursor.statusmessage),
                _read(lambda: cursor.rowcount),
                _read(lambda: [column.name for column in cursor.description or ()]),
            )
        )


def _anonymous(text: str) -> str:
    # SQLAlchemy names server-side cursors after an object's id and a counter: not part of the
    # outcome. Nor is where the server's excerpt of such a statement starts, which moves with
    # the name's length.
    text = re.sub(r"\bc_[0-9a-f]+_[0-9a-f]+\b", "c_<id>", text)
    if "c_<id>" in text or " CURSOR WITH" in text:
        text = re.sub(r"LINE (\d+): .*\n *\^", r"LINE \1: <excerpt>", text)
    return text


def _read(getter: Callable[[], t.Any]) -> t.Any:
    try:
        return plain(getter())
    except Exception as exc:
        return ("raised", type(exc).__qualname__, str(exc))


def plain(value: t.Any) -> t.Any:
    """A comparable form of a returned value (rows, dicts, named tuples, bytes)."""
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, sa.Row):
        return [plain(item) for item in value]
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, (ext.cursor, ext.lobject, ext.connection)):
        return type(value).__name__
    return repr(value) if type(value).__repr__ is not object.__repr__ else type(value).__name__


# -- the schema every case starts from --------------------------------------------------------

SETUP = """
DROP TABLE IF EXISTS t, child, parent CASCADE;
DROP TYPE IF EXISTS pair CASCADE;
DROP TYPE IF EXISTS floatrange CASCADE;
CREATE TABLE t (id int PRIMARY KEY, v text);
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY,
    parent_id int REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);
CREATE TYPE pair AS (a int, b text);
CREATE TYPE floatrange AS RANGE (subtype = float8);
CREATE EXTENSION IF NOT EXISTS hstore;
SELECT lo_unlink(oid) FROM pg_largeobject_metadata;
"""


def reset_database(url: str) -> None:
    """Bring the database back to :data:`SETUP`, leftover prepared transactions included."""
    for (gid,) in admin_execute(
        url, "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
    ):
        admin_execute(url, f"ROLLBACK PREPARED '{gid}'")
    admin_execute(url, SETUP)


def kept(url: str) -> dict[str, t.Any]:
    """What the database holds after a case."""
    return {
        "t": admin_execute(url, "SELECT id, v FROM t ORDER BY id"),
        "child": admin_execute(url, "SELECT id, parent_id FROM child ORDER BY id"),
        "large objects": [
            bytes(row[0])
            for row in admin_execute(
                url, "SELECT lo_get(oid) FROM pg_largeobject_metadata ORDER BY oid"
            )
        ],
        "prepared": admin_execute(
            url, "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
        ),
        "pwned": admin_execute(url, "SELECT to_regclass('pwned') IS NOT NULL"),
    }


Case = Callable[[sa.Engine, Out], None]
RawSteps = Callable[[t.Any, Out], None]


def outcome(case: Case, engine: sa.Engine, url: str) -> list[t.Any]:
    """Run ``case`` on ``engine`` from a fresh schema; return its events and the kept data."""
    reset_database(url)
    engine.dispose()
    out = Out()
    try:
        case(engine, out)
    finally:
        engine.dispose()
    return [*out.events, ("kept", kept(url))]


# -- raw psycopg2 steps -----------------------------------------------------------------------

RAW: list[RawSteps] = []


def raw(steps: RawSteps) -> RawSteps:
    RAW.append(steps)
    return steps


def insert(connection: t.Any, out: Out, id_: int, label: str = "insert") -> None:
    cursor = connection.cursor()
    out.do(label, cursor.execute, "INSERT INTO t VALUES (%s, %s)", (id_, f"row {id_}"))


@raw
def insert_commit(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.state("in transaction", c)
    out.do("commit", c.commit)
    out.state("after commit", c)


@raw
def insert_rollback(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("rollback", c.rollback)
    out.state("after rollback", c)


@raw
def commit_twice_rollback_twice(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("commit", c.commit)
    out.do("commit again", c.commit)
    insert(c, out, 2)
    out.do("rollback", c.rollback)
    out.do("rollback again", c.rollback)
    out.state("after", c)


@raw
def autocommit_on_then_rollback(c: t.Any, out: Out) -> None:
    out.do("autocommit on", setattr, c, "autocommit", True)
    insert(c, out, 1)
    out.do("rollback", c.rollback)
    out.state("after", c)


@raw
def autocommit_off_again(c: t.Any, out: Out) -> None:
    out.do("autocommit off", setattr, c, "autocommit", False)
    insert(c, out, 1)
    out.do("commit", c.commit)


@raw
def real_dict_cursor(c: t.Any, out: Out) -> None:
    cursor = c.cursor(cursor_factory=psycopg2.extras.RealDictCursor)
    out.do("insert", cursor.execute, "INSERT INTO t VALUES (1, 'a') RETURNING *")
    out.do("fetch", cursor.fetchall)
    out.cursor("cursor", cursor)
    out.do("rollback", c.rollback)


@raw
def dict_cursor_commit(c: t.Any, out: Out) -> None:
    cursor = c.cursor(cursor_factory=psycopg2.extras.DictCursor)
    out.do("insert", cursor.execute, "INSERT INTO t VALUES (2, 'b') RETURNING id, v")
    out.do("fetch", lambda: [dict(row) for row in cursor.fetchall()])
    out.do("commit", c.commit)


@raw
def named_tuple_cursor(c: t.Any, out: Out) -> None:
    cursor = c.cursor(cursor_factory=psycopg2.extras.NamedTupleCursor)
    out.do("insert", cursor.execute, "INSERT INTO t VALUES (3, 'c') RETURNING id, v")
    out.do("fetch", lambda: [tuple(row) for row in cursor.fetchall()])
    out.do("close", c.close)


@raw
def recording_cursor(c: t.Any, out: Out) -> None:
    # A cursor class of the kind tracing tools install: it must see the SQL as written.
    seen: list[str] = []

    class Recording(ext.cursor):  # type: ignore[misc]
        def execute(self, query: t.Any, vars: t.Any = None) -> t.Any:
            seen.append(query)
            return super().execute(query, vars)

    cursor = c.cursor(cursor_factory=Recording)
    out.do("insert", cursor.execute, "INSERT INTO t VALUES (4, 'd')")
    out.cursor("cursor", cursor)
    out.do("rollback", c.rollback)
    out.events.append(("seen", seen))


@raw
def named_cursor_after_insert(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    cursor = c.cursor("named")
    out.do("declare", cursor.execute, "SELECT id FROM t ORDER BY id")
    out.do("fetch", cursor.fetchall)
    out.state("in transaction", c)
    out.do("commit", c.commit)


@raw
def named_cursor_client_error(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    cursor = c.cursor("named")
    out.do("declare", cursor.execute, "SELECT %s, %s", (1,))
    out.state("after the error", c)
    out.do("commit", c.commit)
    out.state("after commit", c)


@raw
def named_cursor_server_error(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    cursor = c.cursor("named")
    out.do("declare", cursor.execute, "SELECT nope FROM t")
    out.do("commit", c.commit)


@raw
def named_cursor_first(c: t.Any, out: Out) -> None:
    cursor = c.cursor("named")
    out.do("declare", cursor.execute, "SELECT generate_series(1, 5)")
    out.do("fetch", cursor.fetchmany, 2)
    out.do("scroll", cursor.scroll, 1)
    out.do("fetch rest", cursor.fetchall)
    insert(c, out, 1)
    out.do("commit", c.commit)
    out.do("fetch after commit", cursor.fetchall)


@raw
def named_cursor_with_hold(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    cursor = c.cursor("held", withhold=True)
    out.do("declare", cursor.execute, "SELECT id FROM t")
    out.do("commit", c.commit)
    out.do("fetch after commit", cursor.fetchall)
    out.do("close", cursor.close)


@raw
def named_cursor_scrollable(c: t.Any, out: Out) -> None:
    cursor = c.cursor("scrolling", scrollable=True)
    out.do("declare", cursor.execute, "SELECT generate_series(1, 4)")
    out.do("fetch", cursor.fetchall)
    out.do("scroll back", cursor.scroll, 0, "absolute")
    out.do("fetch again", cursor.fetchone)
    out.do("rollback", c.rollback)


@raw
def register_composite(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("register", lambda: psycopg2.extras.register_composite("pair", c).name)
    cursor = c.cursor()
    out.do("select", cursor.execute, "SELECT (1, 'x')::pair")
    out.do("fetch", lambda: tuple(cursor.fetchone()[0]))
    out.state("after register", c)
    out.do("commit", c.commit)


@raw
def register_hstore(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("register", psycopg2.extras.register_hstore, c)
    cursor = c.cursor()
    out.do("select", cursor.execute, "SELECT 'a=>1'::hstore")
    out.do("fetch", cursor.fetchone)
    out.do("commit", c.commit)


@raw
def register_range(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("register", lambda: psycopg2.extras.register_range("floatrange", "FloatRange", c).name)
    out.do("commit", c.commit)


@raw
def register_json(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("register", lambda: psycopg2.extras.register_default_jsonb(c) and None)
    cursor = c.cursor()
    out.do("select", cursor.execute, """SELECT '{"a": 1}'::jsonb""")
    out.do("fetch", cursor.fetchone)
    out.do("rollback", c.rollback)


@raw
def execute_values(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    rows = [(i, f"v{i}") for i in range(10, 15)]
    out.do(
        "insert",
        psycopg2.extras.execute_values,
        cursor,
        "INSERT INTO t VALUES %s RETURNING id",
        rows,
        fetch=True,
    )
    out.do("commit", c.commit)


@raw
def execute_batch(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    rows = [(i, f"v{i}") for i in range(20, 25)]
    out.do("insert", psycopg2.extras.execute_batch, cursor, "INSERT INTO t VALUES (%s, %s)", rows)
    out.do("rollback", c.rollback)


@raw
def isolation_autocommit_inside(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("set autocommit level", c.set_isolation_level, ext.ISOLATION_LEVEL_AUTOCOMMIT)
    out.state("after", c)
    insert(c, out, 2)
    out.do("close", c.close)


@raw
def isolation_serializable_inside(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("set serializable", c.set_isolation_level, ext.ISOLATION_LEVEL_SERIALIZABLE)
    cursor = c.cursor()
    out.do("show", cursor.execute, "SHOW transaction_isolation")
    out.do("fetch", cursor.fetchone)
    insert(c, out, 2)
    out.do("commit", c.commit)


@raw
def isolation_invalid_inside(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("level 99", c.set_isolation_level, 99)
    out.do("level text", c.set_isolation_level, "serializable")
    out.state("after", c)
    out.do("commit", c.commit)


@raw
def set_session_injection(c: t.Any, out: Out) -> None:
    evil = "serializable; CREATE TABLE pwned (x int); COMMIT"
    out.do("set_session", c.set_session, isolation_level=evil)
    out.do("isolation_level", setattr, c, "isolation_level", evil)
    insert(c, out, 1)
    out.do("commit", c.commit)


@raw
def set_session_inside(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("set_session", c.set_session, readonly=True)
    out.do("readonly", setattr, c, "readonly", True)
    out.do("deferrable", setattr, c, "deferrable", True)
    out.do("isolation_level", setattr, c, "isolation_level", 3)
    out.do("autocommit", setattr, c, "autocommit", True)
    out.state("after", c)
    out.do("commit", c.commit)


@raw
def set_session_options(c: t.Any, out: Out) -> None:
    out.do("set_session", c.set_session, "REPEATABLE READ", readonly=True, deferrable=False)
    cursor = c.cursor()
    out.do(
        "show",
        cursor.execute,
        "SELECT current_setting('transaction_isolation'), "
        "current_setting('transaction_read_only')",
    )
    out.do("fetch", cursor.fetchone)
    insert(c, out, 1)
    out.do("rollback", c.rollback)
    out.do("defaults", c.set_session, "DEFAULT", readonly="DEFAULT", deferrable="DEFAULT")


@raw
def readonly_attribute(c: t.Any, out: Out) -> None:
    out.do("readonly", setattr, c, "readonly", True)
    insert(c, out, 1)
    out.do("rollback", c.rollback)
    out.do("readonly off", setattr, c, "readonly", None)


@raw
def with_block_then_named_cursor(c: t.Any, out: Out) -> None:
    def block() -> None:
        with c:
            insert(c, out, 1)

    out.do("with", block)
    cursor = c.cursor("after_with")
    out.do("declare", cursor.execute, "SELECT id FROM t")
    out.do("fetch", cursor.fetchall)
    out.do("commit", c.commit)


@raw
def with_block_error(c: t.Any, out: Out) -> None:
    def block() -> None:
        with c:
            insert(c, out, 1)
            raise KeyError("boom")

    out.do("with", block)
    out.state("after", c)


@raw
def client_encoding_change_inside(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("encoding", c.set_client_encoding, "LATIN1")
    out.state("after", c)
    insert(c, out, 2)
    out.do("commit", c.commit)
    out.do("back", c.set_client_encoding, "UTF8")


@raw
def client_encoding_same_inside(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("encoding", c.set_client_encoding, "utf-8")
    out.do("bad encoding", c.set_client_encoding, "no-such-encoding")
    out.state("after", c)
    out.do("commit", c.commit)


@raw
def reset_inside(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("reset", c.reset)
    out.state("after", c)
    insert(c, out, 2)
    out.do("commit", c.commit)


@raw
def large_object_commit(c: t.Any, out: Out) -> None:
    insert(c, out, 1)

    def write() -> int:
        lo = c.lobject(0, "wb")
        written = lo.write(b"payload")
        lo.close()
        return int(written)

    out.do("lobject", write)
    out.do("commit", c.commit)


@raw
def large_object_rollback(c: t.Any, out: Out) -> None:
    def write() -> None:
        lo = c.lobject(0, "wb")
        lo.write(b"gone")

    out.do("lobject", write)
    out.do("rollback", c.rollback)


@raw
def two_phase(c: t.Any, out: Out) -> None:
    xid = c.xid(1, "fn-parity", "branch")
    out.do("tpc_begin", c.tpc_begin, xid)
    insert(c, out, 1)
    out.do("prepare", c.tpc_prepare)
    out.state("prepared", c)
    out.do("recover", lambda: [x.gtrid for x in c.tpc_recover()])
    out.do("commit", c.tpc_commit)
    out.state("after", c)


@raw
def two_phase_rollback(c: t.Any, out: Out) -> None:
    xid = c.xid(1, "fn-parity-rb", "branch")
    out.do("tpc_begin", c.tpc_begin, xid)
    insert(c, out, 1)
    out.do("rollback", c.tpc_rollback)
    out.do("prepare without begin", c.tpc_prepare)
    out.do("commit an unknown xid", c.tpc_commit, c.xid(1, "nope", "x"))


@raw
def notices(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    cursor = c.cursor()
    out.do("notice", cursor.execute, "DO $$BEGIN RAISE NOTICE 'hello'; END$$")
    out.state("after", c)
    out.do("commit", c.commit)


@raw
def listen_notify(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("listen", cursor.execute, "LISTEN parity")
    out.do("notify", cursor.execute, "NOTIFY parity, 'payload'")
    out.do("commit", c.commit)
    out.do("poll", c.poll)
    out.do("notifies", lambda: [(n.channel, n.payload) for n in c.notifies])
    out.do("unlisten", cursor.execute, "UNLISTEN parity")
    out.do("rollback", c.rollback)


@raw
def copy(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("copy from", cursor.copy_from, io.StringIO("5\tfive\n6\tsix\n"), "t")
    buffer = io.StringIO()
    out.do("copy to", cursor.copy_to, buffer, "t")
    out.do("copied", buffer.getvalue)
    out.do("commit", c.commit)
    out.do("copy expert", cursor.copy_expert, "COPY t (id, v) FROM STDIN", io.StringIO("7\ts\n"))
    out.do("rollback", c.rollback)


@raw
def callproc(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("callproc", cursor.callproc, "lower", ["ABC"])
    out.do("fetch", cursor.fetchall)
    out.state("after", c)
    out.do("rollback", c.rollback)


@raw
def executemany(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do(
        "executemany", cursor.executemany, "INSERT INTO t VALUES (%s, %s)", [(8, "a"), (9, "b")]
    )
    out.cursor("cursor", cursor)
    out.do("commit", c.commit)


@raw
def mogrify(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("mogrify", cursor.mogrify, "SELECT %s, %s", ("it's", 1))
    out.state("after", c)


@raw
def cursor_attributes(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("insert", cursor.execute, "INSERT INTO t VALUES (1, 'x') RETURNING id AS new_id")
    out.cursor("insert", cursor)
    out.do("select", cursor.execute, "SELECT id, v FROM t")
    out.cursor("select", cursor)
    out.do("fetch", cursor.fetchall)
    out.do("rollback", c.rollback)


@raw
def syntax_error(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("bad", cursor.execute, "SELEC 1")
    out.cursor("bad", cursor)
    out.state("after the error", c)
    insert(c, out, 1, "insert after the error")
    out.do("commit", c.commit)
    insert(c, out, 2)
    out.do("commit again", c.commit)


@raw
def undefined_column(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("bad", cursor.execute, "SELECT nope FROM t WHERE id = %s", (1,))
    out.state("after the error", c)
    out.do("diag", lambda: (cursor.connection.get_transaction_status(),))
    out.do("rollback", c.rollback)
    insert(c, out, 1)
    out.do("commit", c.commit)


@raw
def error_position_diag(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    try:
        cursor.execute("SELECT 1 +\n  'x'::int")
    except psycopg2.Error as exc:
        out.events.append(("diag", exc.pgcode, exc.pgerror, exc.diag.statement_position))
    out.do("rollback", c.rollback)


@raw
def unique_violation(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("commit", c.commit)
    insert(c, out, 1, "duplicate")
    out.state("after the error", c)
    insert(c, out, 2, "insert after the error")
    out.do("commit", c.commit)


@raw
def empty_query(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("empty", cursor.execute, "")
    out.do("blank", cursor.execute, "   ")
    out.state("after", c)
    insert(c, out, 1)
    out.do("commit", c.commit)


@raw
def percent_signs(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("with params", cursor.execute, "SELECT '100%%' || %s", ("!",))
    out.do("fetch", cursor.fetchone)
    out.do("without params", cursor.execute, "SELECT '100%'")
    out.do("fetch", cursor.fetchone)
    out.do("missing param", cursor.execute, "SELECT %s, %s", (1,))
    out.do("rollback", c.rollback)


@raw
def composable(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    query = sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(sql.Identifier("t"))
    out.do("insert", cursor.execute, query, (1, "composed"))
    out.cursor("insert", cursor)
    out.do("commit", c.commit)


@raw
def closed_connection(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    out.do("close", c.close)
    out.state("closed", c)
    out.do("commit", c.commit)
    out.do("rollback", c.rollback)
    out.do("cursor", c.cursor)
    out.do("autocommit", setattr, c, "autocommit", True)
    out.do("set_session", c.set_session, readonly=True)
    out.do("isolation", c.set_isolation_level, 1)


@raw
def deferred_constraint_at_commit(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("orphan", cursor.execute, "INSERT INTO child VALUES (1, 42)")
    insert(c, out, 1)
    out.do("commit", c.commit)
    out.state("after", c)
    out.do("again", cursor.execute, "INSERT INTO child VALUES (2, NULL)")
    out.do("commit", c.commit)


@raw
def savepoints(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    cursor = c.cursor()
    out.do("savepoint", cursor.execute, "SAVEPOINT s1")
    out.do("bad", cursor.execute, "SELECT 1/0")
    out.state("failed", c)
    out.do("back", cursor.execute, "ROLLBACK TO SAVEPOINT s1")
    insert(c, out, 2)
    out.do("commit", c.commit)


@raw
def aborted_then_named_cursor_and_lobject(c: t.Any, out: Out) -> None:
    insert(c, out, 1)
    cursor = c.cursor()
    out.do("savepoint", cursor.execute, "SAVEPOINT s1")
    out.do("bad", cursor.execute, "SELECT 1/0")
    out.do("lobject", c.lobject)
    out.do("back", cursor.execute, "ROLLBACK TO SAVEPOINT s1")
    insert(c, out, 2)
    out.do("commit", c.commit)


@raw
def several_statements(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("two", cursor.execute, "INSERT INTO t VALUES (1, 'a'); INSERT INTO t VALUES (2, 'b')")
    out.cursor("two", cursor)
    out.do("rollback", c.rollback)
    out.do("second fails", cursor.execute, "INSERT INTO t VALUES (3, 'c'); SELECT nope")
    out.do("commit", c.commit)


@raw
def explicit_transaction_statements(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("begin", cursor.execute, "BEGIN")
    out.state("after BEGIN", c)
    insert(c, out, 1)
    out.do("commit statement", cursor.execute, "COMMIT")
    insert(c, out, 2)
    out.do("rollback", c.rollback)
    out.state("after", c)


@raw
def statement_timeout(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("limit", cursor.execute, "SET LOCAL statement_timeout = 1")
    out.do("slow", cursor.execute, "SELECT pg_sleep(0.2)")
    out.do("rollback", c.rollback)
    out.do("show", cursor.execute, "SHOW statement_timeout")
    out.do("fetch", cursor.fetchone)
    out.do("rollback", c.rollback)


@raw
def connection_info(c: t.Any, out: Out) -> None:
    out.do("parameter", c.get_parameter_status, "server_encoding")
    out.do("cancel", c.cancel)
    out.do("dsn has no password", lambda: "password" in c.dsn)
    out.do("isexecuting", c.isexecuting)
    out.state("state", c)


@raw
def read_in_transaction(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do(
        "select",
        cursor.execute,
        "SELECT txid_current_if_assigned() IS NULL, now() = statement_timestamp()",
    )
    out.do("fetch", cursor.fetchone)
    out.do("again", cursor.execute, "SELECT count(*) FROM t")
    out.do("fetch", cursor.fetchone)
    out.state("state", c)
    out.do("rollback", c.rollback)


def pristine(steps: RawSteps) -> Case:
    """The steps on a connection fresh from the pool, as ``engine.raw_connection()`` gives it."""

    def case(engine: sa.Engine, out: Out) -> None:
        proxy = engine.raw_connection()
        try:
            steps(proxy.dbapi_connection, out)
        finally:
            proxy.close()

    case.__name__ = f"raw_{steps.__name__}"
    return case


def inside_sqlalchemy(steps: RawSteps) -> Case:
    """The steps in the middle of a SQLAlchemy transaction that already wrote a row."""

    def case(engine: sa.Engine, out: Out) -> None:
        with engine.connect() as connection:
            out.do("sa insert", connection.exec_driver_sql, "INSERT INTO t VALUES (100, 'sa')")
            dbapi_connection = connection.connection.dbapi_connection
            steps(dbapi_connection, out)
            out.do("sa commit", connection.commit)

    case.__name__ = f"in_sa_{steps.__name__}"
    return case


# -- SQLAlchemy paths that reach the driver ---------------------------------------------------

SQLALCHEMY: list[Case] = []


def sqlalchemy_case(case: Case) -> Case:
    SQLALCHEMY.append(case)
    return case


class Base(orm.DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "t"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=False)
    v: orm.Mapped[str | None]


table = Row.__table__


@sqlalchemy_case
def orm_flush_then_yield_per(engine: sa.Engine, out: Out) -> None:
    with orm.Session(engine) as session:
        session.add_all([Row(id=i, v=str(i)) for i in range(5)])
        out.do("flush", session.flush)
        rows = session.scalars(sa.select(Row.id).order_by(Row.id).execution_options(yield_per=2))
        out.do("stream", list, rows)
        out.do("commit", session.commit)


@sqlalchemy_case
def orm_flush_then_failing_stream(engine: sa.Engine, out: Out) -> None:
    with orm.Session(engine) as session:
        session.add(Row(id=1, v="kept?"))
        out.do("flush", session.flush)
        failing = sa.text("SELECT :value").execution_options(stream_results=True)
        out.do("stream", session.execute, failing, {"value": object()})
        out.do("commit", session.commit)


@sqlalchemy_case
def orm_flush_then_failing_stream_on_the_server(engine: sa.Engine, out: Out) -> None:
    with orm.Session(engine) as session:
        session.add(Row(id=1, v="kept?"))
        out.do("flush", session.flush)
        failing = sa.text("SELECT nope FROM t").execution_options(stream_results=True)
        out.do("stream", session.execute, failing)
        out.do("commit", session.commit)


@sqlalchemy_case
def stream_results_first(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        streaming = connection.execution_options(stream_results=True, max_row_buffer=2)
        out.do("stream", lambda: list(streaming.execute(sa.text("SELECT generate_series(1, 5)"))))
        out.do("show", connection.exec_driver_sql, "SHOW statement_timeout")
        out.do("insert", connection.execute, sa.insert(table).values(id=1, v="a"))
        out.do("commit", connection.commit)


@sqlalchemy_case
def autocommit_isolation(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        auto = connection.execution_options(isolation_level="AUTOCOMMIT")
        out.do("insert", auto.execute, sa.insert(table).values(id=1, v="auto"))
        out.do("txid", lambda: auto.exec_driver_sql("SELECT txid_current_if_assigned()").scalar())
        out.do("rollback", auto.rollback)
    with engine.connect() as connection:
        out.do("insert after", connection.execute, sa.insert(table).values(id=2, v="b"))
        out.do("rollback", connection.rollback)


@sqlalchemy_case
def isolation_levels(engine: sa.Engine, out: Out) -> None:
    for level in ("SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED"):
        with engine.connect() as connection:
            leveled = connection.execution_options(isolation_level=level)
            out.do(
                level, lambda c=leveled: c.exec_driver_sql("SHOW transaction_isolation").scalar()
            )
            out.do("get", leveled.get_isolation_level)


@sqlalchemy_case
def readonly_and_deferrable(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        options = connection.execution_options(
            isolation_level="SERIALIZABLE", postgresql_readonly=True, postgresql_deferrable=True
        )
        out.do(
            "show",
            lambda: options.exec_driver_sql(
                "SELECT current_setting('transaction_read_only'), "
                "current_setting('transaction_deferrable')"
            ).one(),
        )
        out.do("write", options.execute, sa.insert(table).values(id=1, v="ro"))
        out.do("rollback", options.rollback)


@sqlalchemy_case
def nested_transactions(engine: sa.Engine, out: Out) -> None:
    with orm.Session(engine) as session:
        session.add(Row(id=1, v="outer"))
        out.do("flush", session.flush)
        nested = session.begin_nested()
        session.add(Row(id=2, v="inner"))
        out.do("flush inner", session.flush)
        out.do("rollback inner", nested.rollback)
        out.do("commit", session.commit)


@sqlalchemy_case
def nested_transaction_first(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        savepoint = connection.begin_nested()
        out.do("insert", connection.execute, sa.insert(table).values(id=1, v="sp"))
        out.do("bad", connection.exec_driver_sql, "SELECT 1/0")
        out.do("rollback savepoint", savepoint.rollback)
        out.do("insert", connection.execute, sa.insert(table).values(id=2, v="after"))
        out.do("commit", connection.commit)


@sqlalchemy_case
def sa_two_phase_commit(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        transaction = connection.begin_twophase("fn-sa-2pc")
        out.do("insert", connection.execute, sa.insert(table).values(id=1, v="2pc"))
        out.do("prepare", transaction.prepare)
        out.do("recover", lambda: sorted(connection.recover_twophase()))
        out.do("commit", transaction.commit)
        out.do("after", connection.exec_driver_sql, "SELECT 1")
        out.do("rollback", connection.rollback)


@sqlalchemy_case
def sa_two_phase_rollback(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        transaction = connection.begin_twophase("fn-sa-2pc-rb")
        out.do("insert", connection.execute, sa.insert(table).values(id=1, v="2pc"))
        out.do("prepare", transaction.prepare)
        out.do("rollback", transaction.rollback)
        transaction = connection.begin_twophase("fn-sa-2pc-unprepared")
        out.do("insert", connection.execute, sa.insert(table).values(id=2, v="2pc"))
        out.do("commit unprepared", transaction.commit)


@sqlalchemy_case
def first_statement_syntax_error(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        out.do("bad", connection.exec_driver_sql, "SELEC 1")
        out.do("insert after the error", connection.execute, sa.insert(table).values(id=1))
        out.do("commit", connection.commit)
        out.do("insert", connection.execute, sa.insert(table).values(id=2))
        out.do("commit", connection.commit)


@sqlalchemy_case
def first_statement_errors_with_positions(engine: sa.Engine, out: Out) -> None:
    statements = [
        "SELECT nope FROM t",
        "SELECT 1 FROM no_such_table",
        "SELECT 'x'::int",
        "SELECT (",
        "SELECT 1 +\n  'y'::int -- a comment",
        "INSERT INTO t VALUES ('x', 1)",
    ]
    for statement in statements:
        with engine.connect() as connection:
            out.do(statement, connection.exec_driver_sql, statement)
            out.do("next", connection.exec_driver_sql, "SELECT 1")
            out.do("rollback", connection.rollback)


@sqlalchemy_case
def first_statement_runtime_errors(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        out.do("insert", connection.execute, sa.insert(table).values(id=1))
        out.do("commit", connection.commit)
        out.do("duplicate", connection.execute, sa.insert(table).values(id=1))
        out.do("next", connection.exec_driver_sql, "SELECT 1")
        out.do("rollback", connection.rollback)
        out.do("divide", connection.exec_driver_sql, "SELECT 1/0")
        out.do("rollback", connection.rollback)
        out.do("orphan", connection.exec_driver_sql, "INSERT INTO child VALUES (1, 7)")
        out.do("commit fails", connection.commit)


@sqlalchemy_case
def executemany_first(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        out.do(
            "insert many",
            connection.execute,
            sa.insert(table),
            [{"id": i, "v": str(i)} for i in range(5)],
        )
        out.do(
            "update many",
            connection.execute,
            sa.update(table).where(table.c.id == sa.bindparam("key")).values(v="u"),
            [{"key": 1}, {"key": 2}],
        )
        out.do("rollback", connection.rollback)
        out.do(
            "update many first",
            connection.execute,
            sa.update(table).where(table.c.id == sa.bindparam("key")).values(v="u"),
            [{"key": 1}, {"key": 2}],
        )
        out.do("show", lambda: connection.exec_driver_sql("SHOW statement_timeout").scalar())
        out.do(
            "insert many",
            connection.execute,
            sa.insert(table),
            [{"id": i, "v": "x"} for i in range(3)],
        )
        out.do("commit", connection.commit)


@sqlalchemy_case
def several_statements_in_text(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        out.do(
            "two",
            connection.exec_driver_sql,
            "INSERT INTO t VALUES (1, 'a;b'); INSERT INTO t VALUES (2, 'c')",
        )
        out.do("show", lambda: connection.exec_driver_sql("SHOW statement_timeout").scalar())
        out.do("commit", connection.commit)
        out.do("literal", lambda: connection.execute(sa.text("SELECT 'a;b'")).scalar())
        out.do("rollback", connection.rollback)


@sqlalchemy_case
def percent_and_params(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        out.do("percent", lambda: connection.exec_driver_sql("SELECT '100%'").scalar())
        out.do("rollback", connection.rollback)
        out.do(
            "params",
            lambda: connection.execute(sa.text("SELECT '50%' || :x"), {"x": "!"}).scalar(),
        )
        out.do("rollback", connection.rollback)


@sqlalchemy_case
def session_lifecycle(engine: sa.Engine, out: Out) -> None:
    with orm.Session(engine) as session:
        session.add(Row(id=1, v="a"))
        out.do("commit", session.commit)
        out.do("read", lambda: session.get(Row, 1).v)  # type: ignore[union-attr]
        session.add(Row(id=2, v="b"))
        out.do("flush", session.flush)
        out.do("rollback", session.rollback)
        out.do("count", lambda: session.scalar(sa.select(sa.func.count()).select_from(Row)))
        out.do("timeout", lambda: session.scalar(sa.text("SHOW statement_timeout")))
        out.do("close", session.close)


@sqlalchemy_case
def transaction_limits_after_commit(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        for _ in range(2):
            out.do(
                "show",
                lambda: connection.exec_driver_sql(
                    "SELECT current_setting('statement_timeout'), "
                    "current_setting('idle_in_transaction_session_timeout')"
                ).one(),
            )
            out.do("commit", connection.commit)


@sqlalchemy_case
def core_on_raw_after_sqlalchemy(engine: sa.Engine, out: Out) -> None:
    with engine.begin() as connection:
        out.do("insert", connection.execute, sa.insert(table).values(id=1, v="a"))
        raw = connection.connection.dbapi_connection
        out.state("raw", raw)
        cursor = raw.cursor(cursor_factory=psycopg2.extras.RealDictCursor)
        out.do("raw insert", cursor.execute, "INSERT INTO t VALUES (2, 'raw')")
    out.do("count", lambda: engine.connect().exec_driver_sql("SELECT count(*) FROM t").scalar())


CASES: list[Case] = [
    *(pristine(steps) for steps in RAW),
    *(inside_sqlalchemy(steps) for steps in RAW),
    *SQLALCHEMY,
]
