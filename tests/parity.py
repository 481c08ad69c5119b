"""The cases of the differential suite: the same steps on the driver's own transaction handling
and on fast BEGIN, for psycopg2 and for psycopg 3.

Each case is a small function ``case(engine, out)`` that does something a user of the driver or
SQLAlchemy does, and writes everything observable into ``out``: what each call returned or
raised (type and text), the connection's transaction attributes, cursor attributes, notices.
:func:`outcome` runs a case on one engine and adds what the database kept. The suite asserts
that the outcome with ``DB_FAST_BEGIN`` on equals the outcome with it off (the driver's own
``BEGIN``), driver by driver.

Raw cases take a DBAPI connection and run in two positions: on a connection fresh from the
pool (``engine.raw_connection()``), and in the middle of a SQLAlchemy transaction that
already wrote a row (where a fast transaction is open). :data:`RAW` is psycopg2's surface,
:data:`RAW3` psycopg 3's.

The transaction's first statement has families of its own (``item4_`` ... ``item11_``, named
after the differences a review found, and their neighbours ``nb_``, ``sqlstate_``): COPY,
deadlocks and lock timeouts, comment-only text, the dialect's ``do_execute`` and the listeners
after fast BEGIN's, side effects of a statement that fails with a position, notices and the
text the server keeps, serialization failures, timeouts, cancels, terminations, and an error
of each SQLSTATE class. What a session keeps afterwards (prepared statements, cursors,
advisory locks, settings) is recorded too. They and the SQLAlchemy cases run on both drivers.

On psycopg 3 one difference is documented (docs/fast-begin.md) and asserted as documented
rather than compared: inside a transaction fast BEGIN opened, the DBAPI connection reads
``autocommit`` as True (:meth:`Out.state` checks it and records what psycopg's own
transaction shows, counting it in :attr:`Out.documented`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import typing as t
import weakref
from collections.abc import Callable, Iterator

import psycopg
import psycopg.pq
import psycopg.rows
import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras
import pytest
import sqlalchemy as sa
from psycopg2 import sql
from sqlalchemy import orm

from flask_neon._drivers import psycopg as psycopg_driver

from . import concurrency
from .conftest import admin_execute

#: Every field of a server error that psycopg2's ``diag`` exposes.
DIAG_FIELDS = (
    "severity",
    "severity_nonlocalized",
    "sqlstate",
    "message_primary",
    "message_detail",
    "message_hint",
    "statement_position",
    "internal_position",
    "internal_query",
    "context",
    "schema_name",
    "table_name",
    "column_name",
    "datatype_name",
    "constraint_name",
    "source_file",
    "source_line",
    "source_function",
)


def error_facts(exc: BaseException) -> tuple[t.Any, ...]:
    """What an exception says: type and text, and the server's error behind it, field by field.

    For SQLAlchemy's wrapper: whether it invalidated the connection, and the driver's exception:
    psycopg2's type, ``pgcode``, ``pgerror`` and every ``diag`` field; psycopg 3's type,
    ``sqlstate``, every ``diag`` field and the status of the result it carries.
    """
    facts: list[t.Any] = [type(exc).__qualname__, _anonymous(str(exc))]
    driver: t.Any = exc
    if isinstance(exc, sa.exc.StatementError):
        driver = exc.orig
        if isinstance(exc, sa.exc.DBAPIError):
            facts.append(("invalidated", exc.connection_invalidated))
    if isinstance(driver, psycopg2.Error):
        diag = {name: _anonymous_value(getattr(driver.diag, name)) for name in DIAG_FIELDS}
        facts.append(
            (type(driver).__qualname__, driver.pgcode, _anonymous_value(driver.pgerror), diag)
        )
    elif isinstance(driver, psycopg.Error):
        diag = {name: _anonymous_value(getattr(driver.diag, name)) for name in DIAG_FIELDS}
        result = driver.pgresult
        facts.append(
            (
                type(driver).__module__,
                type(driver).__qualname__,
                driver.sqlstate,
                diag,
                None if result is None else psycopg.pq.ExecStatus(result.status).name,
            )
        )
    return tuple(facts)


#: psycopg 3: what each connection's notice handler received, in order (:func:`watch_notices`).
NOTICES: weakref.WeakKeyDictionary[t.Any, list[tuple[t.Any, ...]]] = weakref.WeakKeyDictionary()
#: psycopg 3: what each connection's notify handler received (:func:`watch_notifies`).
NOTIFIES: weakref.WeakKeyDictionary[t.Any, list[tuple[str, str]]] = weakref.WeakKeyDictionary()
#: What a psycopg 3 notice says, field by field.
NOTICE_FIELDS = (
    "severity",
    "severity_nonlocalized",
    "sqlstate",
    "message_primary",
    "message_detail",
    "message_hint",
    "statement_position",
    "internal_position",
    "internal_query",
    "context",
    "source_function",
)


#: What PgBouncer tells a client whose server connection the server closed (FATAL 08P01). It
#: comes after the server's own error; whether the client has read it before it stops reading
#: the closed connection is a matter of timing, on either connection.
PGBOUNCER_CRASHED = "server conn crashed?"


def watch_notices(connection: t.Any) -> None:
    """Collect a psycopg 3 connection's notices through ``add_notice_handler`` (from connect)."""
    received: list[tuple[t.Any, ...]] = []
    NOTICES[connection] = received

    def handler(diagnostic: psycopg.errors.Diagnostic) -> None:
        if diagnostic.message_primary == PGBOUNCER_CRASHED:
            return  # PgBouncer's, after a session the server ended: its arrival is timing
        received.append(
            tuple(_anonymous_value(getattr(diagnostic, name)) for name in NOTICE_FIELDS)
        )

    connection.add_notice_handler(handler)


def watch_notifies(connection: t.Any) -> None:
    """Collect a psycopg 3 connection's notifications through ``add_notify_handler``."""
    received: list[tuple[str, str]] = []
    NOTIFIES[connection] = received
    connection.add_notify_handler(lambda notify: received.append((notify.channel, notify.payload)))


def is_psycopg3(connection: t.Any) -> bool:
    return isinstance(connection, psycopg.Connection)


def notifications(connection: t.Any) -> list[tuple[str, str]]:
    """The notifications a DBAPI connection received (psycopg2's list, psycopg 3's handler)."""
    if is_psycopg3(connection):
        return list(NOTIFIES.get(connection, []))
    return [(n.channel, n.payload) for n in connection.notifies]


def clear_notices(connection: t.Any) -> None:
    """Forget the notices a DBAPI connection received so far."""
    if is_psycopg3(connection):
        NOTICES.get(connection, [])[:] = []
    else:
        del connection.notices[:]


_LOST = "server closed the connection unexpectedly"


def _driver_facts(event: tuple[t.Any, ...]) -> tuple[t.Any, ...] | None:
    if len(event) < 3 or event[1] != "raised" or not isinstance(event[-1], tuple):
        return None
    return t.cast(tuple[t.Any, ...], event[-1])


def documented_connection_loss(
    expected: list[t.Any], actual: list[t.Any]
) -> tuple[list[t.Any], int]:
    """``actual`` with psycopg 3's documented report of a connection lost while fast BEGIN's
    pipeline ran put back as psycopg's own path reports it; and how many were.

    Documented (docs/fast-begin.md): when the server ends the session while the first
    statement runs (``pg_terminate_backend``, a shutdown), psycopg's own path raises the
    server's last error (``AdminShutdown``, SQLSTATE 57P01, FATAL); in a pipeline psycopg
    reads on to the closed socket and raises ``OperationalError`` ("server closed the
    connection unexpectedly", no SQLSTATE). SQLAlchemy invalidates the connection either way.
    Only that pair, at the same place with the same label, is taken as documented.
    """
    if len(expected) != len(actual):
        return actual, 0
    result, count = list(actual), 0
    for index, (mine, theirs) in enumerate(zip(expected, actual, strict=True)):
        ours, fast = _driver_facts(mine), _driver_facts(theirs)
        if mine == theirs or ours is None or fast is None or mine[0] != theirs[0]:
            continue
        if (
            ("invalidated", True) in mine
            and ("invalidated", True) in theirs
            and len(ours) == 5
            and str(ours[2]).startswith("57P")
            and ours[3].get("severity_nonlocalized") == "FATAL"
            and fast[:3] == ("psycopg", "OperationalError", None)
            and not any(fast[3].values())
            and _LOST in theirs[3]
        ):
            result[index] = mine
            count += 1
    return result, count


class Out:
    """Everything observable that a case produced, in order.

    ``url``: the database's direct URL, for what a case asks the server from a session of its
    own (another session's locks, a schema change, a backend's state).

    ``documented``: how often a documented difference was seen and checked instead of compared
    (psycopg 3's ``autocommit`` inside a transaction fast BEGIN opened).
    """

    def __init__(self, url: str = "") -> None:
        self.events: list[tuple[t.Any, ...]] = []
        self.url = url
        self.documented = 0

    def do(self, label: str, fn: Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> t.Any:
        """Call ``fn`` and record what it returned or raised."""
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:
            self.events.append((label, "raised", *error_facts(exc)))
            return None
        self.events.append((label, "returned", plain(value)))
        return value

    def fact(self, label: str, value: t.Any) -> None:
        """Record a value the case established itself."""
        self.events.append((label, "fact", plain(value)))

    def session(self, label: str, connection: t.Any) -> None:
        """What the server keeps for the session of a DBAPI connection, read through it.

        Run outside SQLAlchemy's transactions: the driver opens one of its own and rolls it back.
        """
        self.events.append((label, "session", _read(lambda: session_facts(connection))))

    def backend(self, label: str, connection: t.Any) -> None:
        """The server's view of a DBAPI connection's backend, from another session.

        Through PgBouncer the client knows no server pid: the view is then empty on both sides.
        """
        pid = _read(lambda: connection.info.backend_pid)
        self.events.append(
            (label, "backend", _read(lambda: backend_facts(self.url, pid)) if self.url else None)
        )

    def state(self, label: str, connection: t.Any) -> None:
        """Record the transaction attributes of a DBAPI connection."""
        if is_psycopg3(connection):
            self.events.append((label, "state", self._psycopg3_state(connection)))
            return
        attributes = {}
        for name in ("closed", "status", "autocommit", "readonly", "deferrable"):
            attributes[name] = _read(lambda name=name: getattr(connection, name))
        attributes["isolation_level"] = _read(lambda: connection.isolation_level)
        attributes["transaction_status"] = _read(connection.get_transaction_status)
        attributes["encoding"] = _read(lambda: connection.encoding)
        attributes["notices"] = _read(
            lambda: [n.strip() for n in connection.notices if PGBOUNCER_CRASHED not in n]
        )
        self.events.append((label, "state", attributes))

    def _psycopg3_state(self, connection: t.Any) -> dict[str, t.Any]:
        attributes = {}
        for name in ("closed", "broken", "read_only", "deferrable", "isolation_level"):
            attributes[name] = _read(lambda name=name: getattr(connection, name))
        status = _read(lambda: psycopg.pq.TransactionStatus(connection.info.transaction_status))
        attributes["transaction_status"] = getattr(status, "name", status)
        autocommit = _read(lambda: connection.autocommit)
        if autocommit is True and connection in psycopg_driver._switched:
            # Documented: from the first statement of a transaction fast BEGIN opened until
            # flask-neon sees it end (and for ever on a connection lost meanwhile, where psycopg
            # refuses the change), autocommit reads True; psycopg's own reads False there.
            self.documented += 1
            autocommit = False
        attributes["autocommit"] = autocommit
        attributes["pipeline_status"] = _read(
            lambda: psycopg.pq.PipelineStatus(connection.pgconn.pipeline_status).name
        )
        attributes["encoding"] = _read(lambda: connection.info.encoding)
        attributes["notices"] = list(NOTICES.get(connection, ()))
        return attributes

    def cursor(self, label: str, cursor: t.Any) -> None:
        """Record what a cursor says about its last statement (psycopg2's ``query`` too: on
        psycopg 3 the text is the statement's own, never changed)."""
        self.events.append(
            (
                label,
                "cursor",
                _read(lambda: cursor.query) if isinstance(cursor, ext.cursor) else None,
                _read(lambda: cursor.statusmessage),
                _read(lambda: cursor.rowcount),
                _read(lambda: [column.name for column in cursor.description or ()]),
            )
        )


# What differs from one run to the next in the server's words: process ids, and the oids and
# transaction ids of a deadlock's report (each run starts from a re-created schema).
_RUN_SPECIFIC = [
    (re.compile(r"\b([Pp]rocess) \d+"), r"\1 <pid>"),
    (re.compile(r"\brelation \d+ of database \d+"), "relation <oid> of database <oid>"),
    (re.compile(r"\btransaction \d+"), "transaction <xid>"),
    (re.compile(r"\bvirtual transaction \d+/\d+"), "virtual transaction <vxid>"),
    (re.compile(r"\badvisory lock \[\d+,"), "advisory lock [<database>,"),
    (re.compile(r" at 0x[0-9a-f]+>"), " at 0x<address>>"),
]


def _anonymous(text: str) -> str:
    # SQLAlchemy names server-side cursors after an object's id and a counter: not part of the
    # outcome. Nor is where the server's excerpt of such a statement starts, which moves with
    # the name's length.
    text = re.sub(r"\bc_[0-9a-f]+_[0-9a-f]+\b", "c_<id>", text)
    if "c_<id>" in text or " CURSOR WITH" in text:
        text = re.sub(r"LINE (\d+): .*\n *\^", r"LINE \1: <excerpt>", text)
    for pattern, replacement in _RUN_SPECIFIC:
        text = pattern.sub(replacement, text)
    return text


def _anonymous_value(value: t.Any) -> t.Any:
    return _anonymous(value) if isinstance(value, str) else value


def _read(getter: Callable[[], t.Any]) -> t.Any:
    try:
        return plain(getter())
    except Exception as exc:
        return ("raised", type(exc).__qualname__, str(exc))


_OBJECTS = (
    ext.cursor,
    ext.lobject,
    ext.connection,
    psycopg.BaseConnection,
    psycopg.Cursor,
    psycopg.ServerCursor,
    psycopg.Copy,
    psycopg.Transaction,
    psycopg.Pipeline,
)


def plain(value: t.Any) -> t.Any:
    """A comparable form of a returned value (rows, dicts, named tuples, bytes)."""
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    if isinstance(value, psycopg.Notify):
        return ["Notify", value.channel, value.payload]  # not the sender's pid
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, sa.Row):
        return [plain(item) for item in value]
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, _OBJECTS):
        return type(value).__name__
    if type(value).__repr__ is object.__repr__:
        return type(value).__name__
    return _anonymous(repr(value))


# -- the schema every case starts from --------------------------------------------------------

# Run by psycopg2 with parameters: a % is written %%.
SETUP = """
DO $$DECLARE r record;
BEGIN
    FOR r IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
        EXECUTE format('DROP TABLE IF EXISTS %%I CASCADE', r.tablename);
    END LOOP;
END$$;
DROP SEQUENCE IF EXISTS s;
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
-- What the first-statement families use.
CREATE SEQUENCE s;
CREATE TABLE stale (id int PRIMARY KEY, a int, b int);
INSERT INTO stale VALUES (1, 10, 20);
CREATE TABLE positive (x int CHECK (x > 0));
CREATE VIEW checked AS SELECT * FROM t WHERE id > 0 WITH CHECK OPTION;
CREATE OR REPLACE FUNCTION lock_fn() RETURNS int LANGUAGE plpgsql
    AS $$BEGIN PERFORM pg_advisory_lock(42); RETURN 1; END$$;
CREATE OR REPLACE FUNCTION notice_fn() RETURNS int LANGUAGE plpgsql
    AS $$BEGIN RAISE NOTICE 'a side effect'; RETURN 1; END$$;
CREATE OR REPLACE FUNCTION raise_it(message text) RETURNS int LANGUAGE plpgsql
    AS $$BEGIN RAISE EXCEPTION '%%', message USING HINT = 'raised on purpose'; END$$;
CREATE OR REPLACE FUNCTION no_return() RETURNS int LANGUAGE plpgsql
    AS $$BEGIN PERFORM 1; END$$;
CREATE OR REPLACE FUNCTION strict_none() RETURNS int LANGUAGE plpgsql
    AS $$DECLARE x int; BEGIN SELECT id INTO STRICT x FROM t WHERE id < 0; RETURN x; END$$;
CREATE OR REPLACE FUNCTION strict_many() RETURNS int LANGUAGE plpgsql
    AS $$DECLARE x int; BEGIN SELECT g INTO STRICT x FROM generate_series(1, 2) g; RETURN x; END$$;
CREATE OR REPLACE FUNCTION assert_it() RETURNS int LANGUAGE plpgsql
    AS $$BEGIN ASSERT false, 'asserted'; RETURN 1; END$$;
CREATE OR REPLACE PROCEDURE commit_it() LANGUAGE plpgsql AS $$BEGIN COMMIT; END$$;
DO $$BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'parity_owner') THEN
            CREATE ROLE parity_owner NOLOGIN;
        END IF;
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'parity_user') THEN
            CREATE ROLE parity_user NOLOGIN;
        END IF;
        CREATE TABLE owned (x int);
        ALTER TABLE owned OWNER TO parity_owner;
    END IF;
END$$;
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
        "sequence s": admin_execute(url, "SELECT last_value, is_called FROM s"),
        "tables": admin_execute(
            url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        ),
    }


#: What :func:`session_facts` reads of a session's settings (those the cases change).
SESSION_SETTINGS = (
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "deadlock_timeout",
    "standard_conforming_strings",
    "escape_string_warning",
    "role",
    "session_authorization",
    "DateStyle",
    "work_mem",
    "temp_file_limit",
    "default_transaction_isolation",
    "extra_float_digits",
)

_SESSION_QUERIES = {
    "prepared statements": (
        "SELECT name, statement, parameter_types::text, from_sql "
        "FROM pg_prepared_statements ORDER BY name"
    ),
    "cursors": (
        "SELECT name, statement, is_holdable, is_binary, is_scrollable "
        "FROM pg_cursors ORDER BY name"
    ),
    "advisory locks": (
        "SELECT classid::int8, objid::int8, objsubid, mode, granted FROM pg_locks "
        "WHERE pid = pg_backend_pid() AND locktype = 'advisory' ORDER BY 1, 2, 3, 4"
    ),
    "listening": "SELECT pg_listening_channels() ORDER BY 1",
    "temporary tables": (
        "SELECT relname FROM pg_class WHERE relpersistence = 't' AND relkind = 'r' "
        "AND relnamespace = pg_my_temp_schema() ORDER BY 1"
    ),
    "settings": (
        "SELECT name, current_setting(name, true) FROM unnest(%s::text[]) AS name ORDER BY 1"
    ),
}


def session_facts(connection: t.Any) -> dict[str, t.Any]:
    """A session's prepared statements, cursors, advisory locks, channels, temporary tables
    and settings, read through its own DBAPI connection (in a transaction psycopg2 opens and
    this rolls back)."""
    facts = {}
    try:
        with connection.cursor() as cursor:
            for name, query in _SESSION_QUERIES.items():
                cursor.execute(query, (list(SESSION_SETTINGS),) if "%s" in query else None)
                facts[name] = plain(cursor.fetchall())
    finally:
        if not connection.closed:
            connection.rollback()
    return facts


def backend_facts(url: str, pid: int) -> list[t.Any]:
    """The server's view of backend ``pid`` from another session: its state, whether it holds
    a transaction id, and its locks (not what it waits on: an idle backend shows ClientRead a
    moment after its state reads "idle")."""
    return admin_execute(
        url,
        "SELECT a.state, a.backend_xid IS NOT NULL, "
        "ARRAY(SELECT ARRAY[l.locktype, l.mode, l.granted::text, "
        "      coalesce(l.relation::regclass::text, l.objid::text, '')] "
        "      FROM pg_locks l WHERE l.pid = a.pid AND l.locktype <> 'virtualxid' "
        "      ORDER BY 1) "
        "FROM pg_stat_activity a WHERE a.pid = %s",
        (pid,),
    )


Case = Callable[[sa.Engine, Out], None]
RawSteps = Callable[[t.Any, Out], None]
EngineFactory = Callable[..., sa.Engine]

#: How to build another engine like one under test (same DB_FAST_BEGIN, same settings) with
#: more configuration: the differential test registers its engines here.
ENGINE_FACTORIES: weakref.WeakKeyDictionary[sa.Engine, EngineFactory] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def sibling(engine: sa.Engine, **config: t.Any) -> Iterator[sa.Engine]:
    """Another engine made like ``engine`` with more settings (``DB_POOL_SIZE``...)."""
    other = ENGINE_FACTORIES[engine](**config)
    try:
        yield other
    finally:
        other.dispose()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def logged_notices() -> Iterator[list[str]]:
    """The notices SQLAlchemy's dialect logs (INFO, ``sqlalchemy.dialects.postgresql``).

    psycopg2's, after a statement that succeeded: it logs the connection's notices and empties
    the list (what a successful statement's notices are, an application reads there). psycopg
    3's, each as it arrives (its notice handler).
    """
    logger = logging.getLogger("sqlalchemy.dialects.postgresql")
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def outcome(case: Case, engine: sa.Engine, url: str, out: Out | None = None) -> list[t.Any]:
    """Run ``case`` on ``engine`` from a fresh schema; return its events and the kept data.

    ``out``: where the events go (to read :attr:`Out.documented` afterwards).
    """
    reset_database(url)
    engine.dispose()
    out = Out(url) if out is None else out
    try:
        with logged_notices() as notices:
            case(engine, out)
    finally:
        engine.dispose()
    return [*out.events, ("logged notices", notices), ("kept", kept(url))]


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


def after_sqlalchemy(steps: RawSteps) -> Case:
    """The steps on a connection whose SQLAlchemy transaction (fast BEGIN's) just committed."""

    def case(engine: sa.Engine, out: Out) -> None:
        with engine.connect() as connection:
            out.do("sa insert", connection.exec_driver_sql, "INSERT INTO t VALUES (100, 'sa')")
            out.do("sa commit", connection.commit)
            steps(connection.connection.dbapi_connection, out)
            out.do("sa rollback", connection.rollback)

    case.__name__ = f"after_sa_{steps.__name__}"
    return case


# -- raw psycopg 3 steps ----------------------------------------------------------------------

RAW3: list[RawSteps] = []


def raw3(steps: RawSteps) -> RawSteps:
    # Defined as p3_<name> beside psycopg2's <name>; a case's name is <name>.
    steps.__name__ = steps.__qualname__ = steps.__name__.removeprefix("p3_")
    RAW3.append(steps)
    return steps


def insert3(connection: t.Any, out: Out, id_: int, label: str = "insert") -> None:
    cursor = connection.cursor()
    out.do(label, cursor.execute, "INSERT INTO t VALUES (%s, %s)", (id_, f"row {id_}"))
    out.cursor(label, cursor)


@raw3
def p3_commit_and_rollback(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    out.state("in transaction", c)
    out.do("commit", c.commit)
    out.state("after commit", c)
    insert3(c, out, 2)
    out.state("in the next transaction", c)
    out.do("rollback", c.rollback)
    out.state("after rollback", c)


@raw3
def p3_commit_then_a_kept_cursor(c: t.Any, out: Out) -> None:
    # A cursor made before the commit runs the next transaction's first statement.
    cursor = c.cursor()
    out.do("insert", cursor.execute, "INSERT INTO t VALUES (1, 'a')")
    out.do("commit", c.commit)
    out.do("insert after commit", cursor.execute, "INSERT INTO t VALUES (2, 'b')")
    out.state("after the insert", c)
    out.do("rollback", c.rollback)
    out.do("insert after rollback", cursor.execute, "INSERT INTO t VALUES (3, 'c')")
    out.do("rollback again", c.rollback)
    out.state("after", c)


@raw3
def p3_commit_twice_rollback_twice(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    out.do("commit", c.commit)
    out.do("commit again", c.commit)
    insert3(c, out, 2)
    out.do("rollback", c.rollback)
    out.do("rollback again", c.rollback)
    out.state("after", c)


@raw3
def p3_commit_statement_then_more(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    out.do("COMMIT", c.execute, "COMMIT")
    out.state("after COMMIT", c)
    insert3(c, out, 2)
    out.state("after the insert", c)
    out.do("rollback", c.rollback)


@raw3
def p3_set_autocommit(c: t.Any, out: Out) -> None:
    out.do("autocommit on", setattr, c, "autocommit", True)
    out.state("after", c)
    insert3(c, out, 1)
    out.do("rollback", c.rollback)
    out.do("autocommit off", c.set_autocommit, False)
    insert3(c, out, 2)
    out.do("commit", c.commit)
    out.state("after commit", c)


@raw3
def p3_set_autocommit_in_a_transaction(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    out.do("autocommit on", setattr, c, "autocommit", True)
    out.do("autocommit off", setattr, c, "autocommit", False)
    out.do("set_autocommit on", c.set_autocommit, True)
    out.state("after", c)
    out.do("commit", c.commit)
    out.do("autocommit on after commit", setattr, c, "autocommit", True)
    insert3(c, out, 2)
    out.do("rollback", c.rollback)
    out.state("at the end", c)
    out.do("autocommit off", setattr, c, "autocommit", False)


@raw3
def p3_transaction_attributes(c: t.Any, out: Out) -> None:
    for name, value in (
        ("isolation_level", psycopg.IsolationLevel.SERIALIZABLE),
        ("read_only", True),
        ("deferrable", True),
    ):
        out.do(name, setattr, c, name, value)
    out.state("after setting", c)
    cursor = c.cursor()
    out.do(
        "show",
        cursor.execute,
        "SELECT current_setting('transaction_isolation'), "
        "current_setting('transaction_read_only'), current_setting('transaction_deferrable')",
    )
    out.do("fetch", cursor.fetchone)
    out.do("write", cursor.execute, "INSERT INTO t VALUES (1, 'ro')")
    out.do("rollback", c.rollback)
    for name in ("isolation_level", "read_only", "deferrable"):
        out.do(f"{name} back", setattr, c, name, None)
    out.state("after", c)


@raw3
def p3_transaction_attributes_in_a_transaction(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    out.do("isolation_level", setattr, c, "isolation_level", psycopg.IsolationLevel.SERIALIZABLE)
    out.do("set_isolation_level", c.set_isolation_level, psycopg.IsolationLevel.READ_COMMITTED)
    out.do("read_only", setattr, c, "read_only", True)
    out.do("set_read_only", c.set_read_only, False)
    out.do("deferrable", setattr, c, "deferrable", True)
    out.do("set_deferrable", c.set_deferrable, None)
    out.state("after", c)
    out.do("commit", c.commit)


@raw3
def p3_transaction_attributes_invalid(c: t.Any, out: Out) -> None:
    out.do("isolation level 99", setattr, c, "isolation_level", 99)
    out.do("isolation level text", setattr, c, "isolation_level", "serializable")
    out.state("after", c)
    insert3(c, out, 1)
    out.do("commit", c.commit)


@raw3
def p3_connection_execute(c: t.Any, out: Out) -> None:
    out.do(
        "execute",
        lambda: c.execute("INSERT INTO t VALUES (%s, %s) RETURNING *", (1, "x")).fetchall(),
    )
    out.do("again", lambda: c.execute("SELECT count(*) FROM t").fetchone())
    out.do("bad", c.execute, "SELECT nope FROM t")
    out.state("after the error", c)
    out.do("rollback", c.rollback)
    out.do("after rollback", lambda: c.execute("SELECT count(*) FROM t").fetchone())
    out.do("commit", c.commit)


@raw3
def p3_executemany(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    rows = [(i, f"v{i}") for i in range(10, 13)]
    out.do("executemany", cursor.executemany, "INSERT INTO t VALUES (%s, %s)", rows)
    out.cursor("executemany", cursor)
    out.do(
        "returning",
        cursor.executemany,
        "INSERT INTO t VALUES (%s, %s) RETURNING id",
        [(20, "a"), (21, "b")],
        returning=True,
    )
    out.do("results", lambda: [cursor.fetchall() for _ in cursor.results()])
    out.do("failing", cursor.executemany, "INSERT INTO t VALUES (%s, %s)", [(30, "a"), (30, "b")])
    out.state("after the failure", c)
    out.do("rollback", c.rollback)
    out.do("again", cursor.executemany, "INSERT INTO t VALUES (%s, %s)", rows)
    out.do("commit", c.commit)


@raw3
def p3_client_cursor(c: t.Any, out: Out) -> None:
    cursor = psycopg.ClientCursor(c)
    out.do("mogrify", cursor.mogrify, "SELECT %s, %s", ("it's", 1))
    out.do("insert", cursor.execute, "INSERT INTO t VALUES (%s, %s) RETURNING id", (1, "client"))
    out.do("fetch", cursor.fetchall)
    out.cursor("insert", cursor)
    out.do("two statements", cursor.execute, "SELECT 1; SELECT %s", (2,))
    out.do("next set", cursor.nextset)
    out.do("fetch", cursor.fetchall)
    out.do("missing parameter", cursor.execute, "SELECT %s, %s", (1,))
    out.state("after", c)
    out.do("commit", c.commit)


@raw3
def p3_raw_cursor(c: t.Any, out: Out) -> None:
    cursor = psycopg.RawCursor(c)
    out.do("insert", cursor.execute, "INSERT INTO t VALUES ($1, $2) RETURNING v", (1, "raw"))
    out.do("fetch", cursor.fetchall)
    out.do("percent", cursor.execute, "SELECT '100%' || $1", ("!",))
    out.do("fetch", cursor.fetchall)
    out.do("wrong count", cursor.execute, "SELECT $1, $2", (1,))
    out.state("after", c)
    out.do("rollback", c.rollback)


@raw3
def p3_row_factories(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    for name in ("dict_row", "namedtuple_row", "tuple_row", "scalar_row"):
        factory = getattr(psycopg.rows, name)
        cursor = c.cursor(row_factory=factory)
        out.do(
            name,
            lambda cursor=cursor: cursor.execute("SELECT id, v FROM t ORDER BY id").fetchall(),
        )
    out.do("connection row_factory", setattr, c, "row_factory", psycopg.rows.dict_row)
    out.do("execute", lambda: c.execute("SELECT count(*) AS n FROM t").fetchone())
    out.do("back", setattr, c, "row_factory", psycopg.rows.tuple_row)
    out.do("commit", c.commit)


@raw3
def p3_named_cursor(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    cursor = c.cursor("named")
    out.do("declare", cursor.execute, "SELECT generate_series(1, 5)")
    out.do("fetch", cursor.fetchmany, 2)
    out.do("fetch rest", cursor.fetchall)
    out.state("in transaction", c)
    out.do("close", cursor.close)
    out.do("commit", c.commit)


@raw3
def p3_named_cursor_first(c: t.Any, out: Out) -> None:
    cursor = c.cursor("named")
    out.do("declare", cursor.execute, "SELECT generate_series(1, 3)")
    out.do("fetch", cursor.fetchone)
    insert3(c, out, 1)
    out.do("commit", c.commit)
    out.do("fetch after commit", cursor.fetchall)
    out.do("close", cursor.close)


@raw3
def p3_named_cursor_with_hold(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    cursor = c.cursor("held", withhold=True)
    out.do("declare", cursor.execute, "SELECT id FROM t ORDER BY id")
    out.do("commit", c.commit)
    out.state("after commit", c)
    out.do("fetch after commit", cursor.fetchall)
    out.do("close", cursor.close)
    out.state("after close", c)


@raw3
def p3_named_cursor_scrollable(c: t.Any, out: Out) -> None:
    cursor = c.cursor("scrolling", scrollable=True)
    out.do("declare", cursor.execute, "SELECT generate_series(1, 4)")
    out.do("fetch", cursor.fetchall)
    out.do("scroll back", cursor.scroll, 0, "absolute")
    out.do("fetch again", cursor.fetchone)
    out.do("rollback", c.rollback)
    out.do("close", cursor.close)


@raw3
def p3_named_cursor_errors(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    cursor = c.cursor("named")
    out.do("client error", cursor.execute, "SELECT %s, %s", (1,))
    out.state("after the client error", c)
    other = c.cursor("other")
    out.do("server error", other.execute, "SELECT nope FROM t")
    out.state("after the server error", c)
    out.do("commit", c.commit)
    out.state("after commit", c)
    out.do("close", cursor.close)
    out.do("close the other", other.close)


@raw3
def p3_transaction_blocks(c: t.Any, out: Out) -> None:
    def nested() -> None:
        with c.transaction():
            insert3(c, out, 1)
            with c.transaction():
                insert3(c, out, 2)
            with c.transaction(savepoint_name="inner"):
                insert3(c, out, 3)
                raise psycopg.Rollback()

    out.do("nested", nested)
    out.state("after the blocks", c)

    def forced() -> None:
        with c.transaction(force_rollback=True) as tx:
            insert3(c, out, 4)
            out.fact("savepoint", tx.savepoint_name)

    out.do("forced rollback", forced)

    def failing() -> None:
        with c.transaction():
            insert3(c, out, 5)
            c.execute("SELECT 1 / 0")

    out.do("failing", failing)
    out.state("after the failing block", c)

    def commit_inside() -> None:
        with c.transaction():
            c.commit()

    out.do("commit inside a block", commit_inside)
    out.state("after", c)
    out.do("commit", c.commit)


@raw3
def p3_pipeline_by_the_app(c: t.Any, out: Out) -> None:
    def run() -> list[t.Any]:
        with c.pipeline() as pipeline:
            first = c.execute("INSERT INTO t VALUES (1, 'p') RETURNING id")
            second = c.execute("SELECT count(*) FROM t")
            pipeline.sync()
            return [first.fetchall(), second.fetchall()]

    out.do("pipeline", run)
    out.state("after the pipeline", c)

    def failing() -> None:
        with c.pipeline():
            c.execute("INSERT INTO t VALUES (2, 'p')")
            c.execute("SELECT 1 / 0")
            c.execute("INSERT INTO t VALUES (3, 'p')")

    out.do("failing pipeline", failing)
    out.state("after the failing pipeline", c)
    out.do("rollback", c.rollback)

    def commit_inside() -> None:
        with c.pipeline():
            c.execute("INSERT INTO t VALUES (4, 'p')")
            c.commit()
            c.execute("INSERT INTO t VALUES (5, 'p')")

    out.do("commit inside a pipeline", commit_inside)
    out.state("after", c)
    out.do("rollback", c.rollback)


@raw3
def p3_copy_in_and_out(c: t.Any, out: Out) -> None:
    cursor = c.cursor()

    def copy_in() -> int:
        with cursor.copy("COPY t (id, v) FROM STDIN") as copy:
            copy.write_row((5, "five"))
            copy.write_row((6, "six"))
        return int(cursor.rowcount)

    out.do("copy in", copy_in)
    out.state("after copy in", c)

    def copy_out() -> list[t.Any]:
        with cursor.copy("COPY (SELECT id, v FROM t ORDER BY id) TO STDOUT") as copy:
            return list(copy.rows())

    out.do("copy out", copy_out)
    out.do("commit", c.commit)

    def copy_failing() -> None:
        with cursor.copy("COPY t (id, v) FROM STDIN") as copy:
            copy.write_row((5, "again"))

    out.do("copy failing", copy_failing)
    out.state("after the failing copy", c)
    out.do("rollback", c.rollback)
    out.do("copy through execute", cursor.execute, "COPY t TO STDOUT")
    out.state("after copy through execute", c)
    out.do("rollback", c.rollback)


@raw3
def p3_prepared_statements(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("prepare=True", cursor.execute, "SELECT %s::int + 1", (1,), prepare=True)
    out.do("fetch", cursor.fetchone)
    out.do("threshold", lambda: c.prepare_threshold)
    out.do("threshold 0", setattr, c, "prepare_threshold", 0)
    for value in (2, 3):
        out.do("prepared by threshold", cursor.execute, "SELECT %s::int * 2", (value,))
        out.do("fetch", cursor.fetchone)
    out.do(
        "server's statements",
        lambda: c.execute(
            "SELECT statement, parameter_types::text FROM pg_prepared_statements ORDER BY 1"
        ).fetchall(),
    )
    insert3(c, out, 1)
    out.do("commit", c.commit)
    out.do("prepared after commit", cursor.execute, "SELECT %s::int * 2", (4,))
    out.do("rollback", c.rollback)
    out.do("threshold back", setattr, c, "prepare_threshold", None)
    out.do("deallocate", c.execute, "DEALLOCATE ALL")
    out.do("rollback", c.rollback)


@raw3
def p3_notices(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    out.do("notice", c.execute, "DO $$BEGIN RAISE NOTICE 'hello'; END$$")
    out.do(
        "warning then error", c.execute, "DO $$BEGIN RAISE WARNING 'careful'; PERFORM 1 / 0; END$$"
    )
    out.state("after", c)
    out.do("rollback", c.rollback)


@raw3
def p3_listen_notify(c: t.Any, out: Out) -> None:
    out.do("listen", c.execute, "LISTEN parity")
    out.do("notify", c.execute, "NOTIFY parity, 'payload'")
    out.do("commit", c.commit)
    out.do("notifies", lambda: list(c.notifies(timeout=0, stop_after=1)))
    out.do("notify in a rolled back transaction", c.execute, "NOTIFY parity, 'never'")
    out.do("rollback", c.rollback)
    out.do("none", lambda: list(c.notifies(timeout=0)))
    out.do("unlisten", c.execute, "UNLISTEN parity")
    out.do("commit", c.commit)


@raw3
def p3_two_phase(c: t.Any, out: Out) -> None:
    xid = c.xid(1, "fn-parity3", "branch")
    out.do("tpc_begin", c.tpc_begin, xid)
    insert3(c, out, 1)
    out.do("prepare", c.tpc_prepare)
    out.state("prepared", c)
    out.do("recover", lambda: sorted(x.gtrid for x in c.tpc_recover()))
    out.do("commit", c.tpc_commit)
    out.state("after", c)
    out.do("tpc_begin again", c.tpc_begin, c.xid(1, "fn-parity3-rb", "branch"))
    insert3(c, out, 2)
    out.do("rollback", c.tpc_rollback)
    out.do("prepare without begin", c.tpc_prepare)
    out.do("commit an unknown xid", c.tpc_commit, c.xid(1, "nope", "x"))
    out.state("at the end", c)


@raw3
def p3_errors_and_state(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("syntax", cursor.execute, "SELEC 1")
    out.cursor("syntax", cursor)
    out.state("after the syntax error", c)
    out.do("in the failed transaction", cursor.execute, "SELECT 1")
    out.do("rollback", c.rollback)
    out.do("position", cursor.execute, "SELECT 1 +\n  'x'::int")
    out.do("rollback", c.rollback)
    insert3(c, out, 1)
    out.do("commit", c.commit)
    insert3(c, out, 1, "duplicate")
    out.state("after the duplicate", c)
    out.do("rollback", c.rollback)


@raw3
def p3_cursor_attributes(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("insert", cursor.execute, "INSERT INTO t VALUES (1, 'x') RETURNING id AS new_id")
    out.cursor("insert", cursor)
    out.do("select", cursor.execute, "SELECT id, v FROM t")
    out.cursor("select", cursor)
    out.do("rownumber", lambda: cursor.rownumber)
    out.do("fetch", cursor.fetchall)
    out.do("update", cursor.execute, "UPDATE t SET v = 'y'")
    out.cursor("update", cursor)
    out.do("stream", lambda: list(cursor.stream("SELECT generate_series(1, 3)")))
    out.do("rollback", c.rollback)


@raw3
def p3_text_edge_cases(c: t.Any, out: Out) -> None:
    cursor = c.cursor()
    out.do("comment only", cursor.execute, "-- x")
    out.cursor("comment only", cursor)
    out.do("empty", cursor.execute, "")
    out.state("after the comment", c)
    out.do("nul in text", cursor.execute, "SELECT 'a\x00b'")
    out.do("nul in a parameter", cursor.execute, "SELECT %s", ("a\x00b",))
    out.do("percent without parameters", cursor.execute, "SELECT '100%'")
    out.do("fetch", cursor.fetchone)
    out.do("percent with parameters", cursor.execute, "SELECT '100%%' || %s", ("!",))
    out.do("fetch", cursor.fetchone)
    out.do("lone percent with parameters", cursor.execute, "SELECT '100%' || %s", ("!",))
    out.do("missing parameter", cursor.execute, "SELECT %s, %s", (1,))
    out.do("missing key", cursor.execute, "SELECT %(a)s", {"b": 1})
    out.do("unadaptable", cursor.execute, "SELECT %s", (object(),))
    out.do("two statements", cursor.execute, "INSERT INTO t VALUES (1, 'a'); SELECT 2")
    out.do("next set", cursor.nextset)
    out.do("fetch", cursor.fetchall)
    out.state("after", c)
    out.do("commit", c.commit)


@raw3
def p3_savepoints(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    out.do("savepoint", c.execute, "SAVEPOINT s1")
    out.do("bad", c.execute, "SELECT 1/0")
    out.state("failed", c)
    out.do("back", c.execute, "ROLLBACK TO SAVEPOINT s1")
    insert3(c, out, 2)
    out.do("commit", c.commit)


@raw3
def p3_explicit_transaction_statements(c: t.Any, out: Out) -> None:
    out.do("begin", c.execute, "BEGIN")
    out.state("after BEGIN", c)
    insert3(c, out, 1)
    out.do("end", c.execute, "END")
    out.state("after END", c)
    insert3(c, out, 2)
    out.do("rollback", c.rollback)
    out.state("after", c)


@raw3
def p3_deferred_constraint_at_commit(c: t.Any, out: Out) -> None:
    out.do("orphan", c.execute, "INSERT INTO child VALUES (1, 42)")
    out.do("commit", c.commit)
    out.state("after", c)
    out.do("again", c.execute, "INSERT INTO child VALUES (2, NULL)")
    out.do("commit", c.commit)


@raw3
def p3_statement_timeout(c: t.Any, out: Out) -> None:
    out.do("limit", c.execute, "SET LOCAL statement_timeout = 1")
    out.do("slow", c.execute, "SELECT pg_sleep(0.2)")
    out.state("after the timeout", c)
    out.do("rollback", c.rollback)
    out.do("show", lambda: c.execute("SHOW statement_timeout").fetchone())
    out.do("rollback", c.rollback)


@raw3
def p3_cancel_when_idle(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    out.do("cancel_safe", c.cancel_safe)
    out.do("cancel", c.cancel)
    out.do("next", lambda: c.execute("SELECT count(*) FROM t").fetchone())
    out.state("after", c)
    out.do("commit", c.commit)


@raw3
def p3_terminated(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    out.do("terminate", c.execute, "SELECT pg_terminate_backend(pg_backend_pid())")
    out.state("terminated", c)
    out.do("next", c.execute, "SELECT 1")
    out.do("commit", c.commit)
    out.do("rollback", c.rollback)
    out.state("after", c)


@raw3
def p3_closed(c: t.Any, out: Out) -> None:
    insert3(c, out, 1)
    out.do("close", c.close)
    out.state("closed", c)
    out.do("commit", c.commit)
    out.do("rollback", c.rollback)
    out.do("cursor", c.cursor)
    out.do("execute", c.execute, "SELECT 1")
    out.do("autocommit", setattr, c, "autocommit", True)
    out.do("isolation", setattr, c, "isolation_level", psycopg.IsolationLevel.SERIALIZABLE)


@raw3
def p3_connection_info(c: t.Any, out: Out) -> None:
    out.do("parameter", c.info.parameter_status, "server_encoding")
    out.do("status", lambda: c.info.status.name)
    out.do("password in dsn", lambda: "password" in c.info.dsn)
    out.do("server version", lambda: c.info.server_version > 0)
    out.do("read", lambda: c.execute("SELECT txid_current_if_assigned() IS NULL").fetchone())
    out.state("state", c)
    out.do("rollback", c.rollback)


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
        cursor = dict_cursor(raw)
        out.do("raw insert", cursor.execute, "INSERT INTO t VALUES (2, 'raw')")
    out.do("count", _count, engine)


def dict_cursor(raw: t.Any) -> t.Any:
    """A cursor of another class, whose rows are dicts: psycopg2's ``RealDictCursor``, psycopg
    3's ``dict_row``."""
    if is_psycopg3(raw):
        return raw.cursor(row_factory=psycopg.rows.dict_row)
    return raw.cursor(cursor_factory=psycopg2.extras.RealDictCursor)


def _count(engine: sa.Engine) -> t.Any:
    # The connection goes back to the pool: left to the garbage collector, its transaction
    # would hold t until then, and the next case's reset would wait for it.
    with engine.connect() as connection:
        return connection.exec_driver_sql("SELECT count(*) FROM t").scalar()


# -- the transaction's first statement ----------------------------------------------------------
#
# Fast BEGIN sends a transaction's BEGIN in the message of its first statement. Each family
# below runs first statements of one kind through SQLAlchemy (``exec_driver_sql``, ``text()``,
# the ORM: what reaches ``do_execute``) and records what follows them, so that only a fast
# BEGIN that behaves exactly like psycopg2's own gives the same outcome. ``itemN_`` names
# the difference a review found (docs/fast-begin.md); ``nb_`` and ``sqlstate_`` are their
# neighbours.

FIRST: list[Case] = []

#: Cases that rely on what PgBouncer in transaction mode does not keep from one transaction
#: to the next, and why: the differential test runs them on a direct connection only.
SESSION_STATE: dict[str, str] = {}

_PREPARED = "a prepared statement made in an earlier transaction of the session"
_HELD = "a WITH HOLD cursor that outlives its transaction"
_ADVISORY = "a session-level advisory lock held from an earlier transaction"
_SETTING = "a session-level setting made in an earlier transaction"
_STARTUP = "a startup option (PgBouncer refuses them)"

FirstStatement = Callable[[sa.Connection], t.Any]
Statement = str | sa.TextClause


def first_case(name: str, *, session_state: str | None = None) -> Callable[[Case], Case]:
    """Register a first-statement case under ``name``."""

    def register(case: Case) -> Case:
        case.__name__ = case.__qualname__ = name
        FIRST.append(case)
        if session_state:
            SESSION_STATE[name] = session_state
        return case

    return register


def dbapi(connection: sa.Connection) -> t.Any:
    """The DBAPI connection under a SQLAlchemy connection."""
    return connection.connection.dbapi_connection


def execute(
    target: sa.Connection | orm.Session, statement: Statement, params: t.Any = None
) -> tuple[t.Any, ...]:
    """Run ``statement`` as the application would; its rows (None when it returns none),
    status message and row count.

    A string goes through ``exec_driver_sql`` (with ``params`` only when given: psycopg2 reads
    ``%`` differently then), a ``text()`` through ``execute``.
    """
    result: sa.CursorResult[t.Any]
    if isinstance(statement, str):
        assert isinstance(target, sa.Connection)
        if params is None:
            result = target.exec_driver_sql(statement)
        else:
            result = target.exec_driver_sql(statement, params)
    else:
        result = t.cast(sa.CursorResult[t.Any], target.execute(statement, params))
    rows = result.all() if result.returns_rows else None
    return rows, result.context.cursor.statusmessage, result.rowcount


def statement(text: Statement, params: t.Any = None) -> FirstStatement:
    """A first statement that runs ``text`` (see :func:`execute`)."""
    return lambda connection: execute(connection, text, params)


def orm_select(connection: sa.Connection) -> t.Any:
    """A first statement the ORM sends: a query of a session bound to ``connection``."""
    with orm.Session(bind=connection) as session:
        return session.execute(sa.select(Row.id, Row.v).order_by(Row.id)).all()


def need_superuser(out: Out) -> None:
    if not admin_execute(out.url, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")[0][
        0
    ]:
        pytest.skip("needs a superuser (deadlock_timeout, temp_file_limit, roles...)")


def _label(text: Statement) -> str:
    text = str(text)
    return repr(text if len(text) <= 60 else f"{text[:57]}...")


def _commit_rows(connection: sa.Connection, out: Out, *more: str) -> None:
    """Rows the cases read, and what else they need, committed in a transaction of their own."""
    out.do("rows", execute, connection, "INSERT INTO t VALUES (1, 'row 1'), (2, 'row 2')")
    for sql_text in more:
        out.do(_label(sql_text), execute, connection, sql_text)
    out.do("commit", connection.commit)


# -- item 4: COPY through execute() as the first statement -------------------------------------

_COPY = {
    "from_stdin": "COPY t FROM STDIN",
    "from_stdin_csv": "COPY t (id, v) FROM STDIN WITH (FORMAT csv)",
    "to_stdout": "COPY t TO STDOUT",
    "query_to_stdout": "COPY (SELECT 1) TO STDOUT",
}


def _copy_then_same_connection(copy: Statement) -> Case:
    def case(engine: sa.Engine, out: Out) -> None:
        with sibling(engine, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0) as single:
            with single.connect() as connection:
                raw = dbapi(connection)
                _commit_rows(connection, out)
                out.do("copy", execute, connection, copy)
                out.state("after the copy", raw)
                out.do("rollback", connection.rollback)
                out.state("after rollback", raw)
                out.backend("server after rollback", raw)
                out.do("next statement", execute, connection, "SELECT count(*) FROM t")
                out.state("after the next statement", raw)
                out.do("rollback", connection.rollback)
            with single.connect() as connection:
                out.fact("same connection", dbapi(connection) is raw)
                out.do("next checkout", execute, connection, "INSERT INTO t VALUES (3, 'next')")
                out.do("commit", connection.commit)
                out.state("after commit", raw)

    return case


def _copy_then_pool(copy: Statement) -> Case:
    # The connection goes back to the pool right after the COPY: the pool's reset ends it.
    def case(engine: sa.Engine, out: Out) -> None:
        with sibling(engine, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0) as single:
            connection = single.connect()
            raw = dbapi(connection)
            out.do("copy", execute, connection, copy)
            # psycopg 3 leaves libpq in COPY mode: its rollback fails, and SQLAlchemy then
            # invalidates the connection (both with fast BEGIN and without).
            out.do("close", connection.close)
            out.fact("closed", connection.closed)
            out.state("back in the pool", raw)
            out.backend("server, back in the pool", raw)
            with single.connect() as connection:
                out.fact("same connection", dbapi(connection) is raw)
                out.do("next checkout", execute, connection, "SELECT count(*) FROM t")
                out.do("insert", execute, connection, "INSERT INTO t VALUES (3, 'next')")
                out.do("commit", connection.commit)
                out.state("after commit", raw)
            out.session("session", raw)

    return case


for _name, _copy in _COPY.items():
    first_case(f"item4_copy_{_name}_then_same_connection")(_copy_then_same_connection(_copy))
    first_case(f"item4_copy_{_name}_then_next_checkout")(_copy_then_pool(_copy))
first_case("item4_copy_text_construct_then_same_connection")(
    _copy_then_same_connection(sa.text("COPY t FROM STDIN"))
)


@first_case("item4_copy_then_commit")
def _copy_then_commit(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        raw = dbapi(connection)
        out.do("copy", execute, connection, "COPY t FROM STDIN")
        out.do("commit", connection.commit)
        out.state("after commit", raw)
        out.do("insert", execute, connection, "INSERT INTO t VALUES (1, 'after')")
        out.do("commit", connection.commit)
        out.state("after the second commit", raw)


@first_case("item4_copy_in_orm_session")
def _copy_in_orm_session(engine: sa.Engine, out: Out) -> None:
    with orm.Session(engine) as session:
        out.do("copy", session.execute, sa.text("COPY t TO STDOUT"))
        out.do("rollback", session.rollback)
        session.add(Row(id=1, v="after the copy"))
        out.do("commit", session.commit)
        out.do("count", lambda: session.scalar(sa.select(sa.func.count()).select_from(Row)))
        out.do("rollback", session.rollback)


# -- item 5: a deadlock on the first statement ---------------------------------------------------
#
# Our session holds a session-level advisory lock from an earlier transaction. The other session
# takes ACCESS EXCLUSIVE on t (or a row of it); our first statement waits for it (while parsing,
# so the error carries a position, or while running); once the server shows that wait, the
# other session asks for our advisory lock: a deadlock. The deadlock_timeout of each decides
# who detects it: ours is shorter, so psycopg2's own BEGIN gets DeadlockDetected once.


def _deadlock(
    first: FirstStatement,
    *,
    ours: str,
    theirs: str,
    holder: str = "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
) -> Case:
    def case(engine: sa.Engine, out: Out) -> None:
        need_superuser(out)  # deadlock_timeout is a superuser's setting
        with engine.connect() as connection:
            raw = dbapi(connection)
            _commit_rows(
                connection,
                out,
                f"SELECT set_config('deadlock_timeout', '{ours}', false), pg_advisory_lock(7)",
            )
            with concurrency.Session(out.url, deadlock_timeout=theirs) as other:
                other.execute(holder)
                counter = concurrency.LockWaitCounter(out.url, [other.pid])
                closing = concurrency.when_waiting(
                    out.url,
                    [other.pid],
                    lambda pid: other.start("SELECT pg_advisory_lock(7)"),
                    counter=counter,
                )
                try:
                    out.do("first statement", first, connection)
                finally:
                    waits = counter.stop()
                    theirs_pending = closing.value()
                out.fact("lock waits of the first statement", waits)
                out.state("after the first statement", raw)
                out.do("rollback", connection.rollback)
                out.do("unlock", execute, connection, "SELECT pg_advisory_unlock(7)")
                out.do("commit", connection.commit)
                out.fact("the other session", theirs_pending.result())
                other.connection.rollback()
            out.session("session", raw)

    return case


_DEADLOCK_FIRSTS: dict[str, FirstStatement] = {
    "select": statement("SELECT * FROM t"),
    "insert": statement("INSERT INTO t VALUES (5, 'five')"),
    "update": statement("UPDATE t SET v = 'ours'"),
    "text_with_parameters": statement(sa.text("SELECT v FROM t WHERE id = :id"), {"id": 1}),
    "orm_query": orm_select,
}
for _name, _first in _DEADLOCK_FIRSTS.items():
    # We detect it after 0.5 s, they never would (10 s): psycopg2 raises once, after one wait.
    # (The server checks once, deadlock_timeout into the wait: the other session's request
    # must be in by then, also on a loaded machine.)
    first_case(f"item5_deadlock_{_name}_detected_by_us", session_state=_ADVISORY)(
        _deadlock(_first, ours="500ms", theirs="10s")
    )
# We detect it first (0.6 s); they would after 0.9 s of their wait, which began after ours.
first_case("item5_deadlock_select_other_detects_later", session_state=_ADVISORY)(
    _deadlock(statement("SELECT * FROM t"), ours="600ms", theirs="900ms")
)
first_case("item5_deadlock_orm_query_other_detects_later", session_state=_ADVISORY)(
    _deadlock(orm_select, ours="600ms", theirs="900ms")
)
# The wait while running (a row the other session updated): an error without a position.
first_case("item5_deadlock_on_a_row_while_running", session_state=_ADVISORY)(
    _deadlock(
        statement("UPDATE t SET v = 'ours' WHERE id = 1"),
        ours="500ms",
        theirs="10s",
        holder="UPDATE t SET v = 'theirs' WHERE id = 1",
    )
)


# -- item 6: lock_timeout on the first statement -------------------------------------------------

_LOCK_TIMEOUT_OPTIONS = {"DB_ENGINE_OPTIONS": {"connect_args": {"options": "-c lock_timeout=300"}}}


def _lock_timeout(
    first: FirstStatement,
    *,
    holder: str = "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
    startup: bool = False,
) -> Case:
    def case(engine: sa.Engine, out: Out) -> None:
        with contextlib.ExitStack() as stack:
            target = (
                stack.enter_context(sibling(engine, **_LOCK_TIMEOUT_OPTIONS))
                if startup
                else engine
            )
            with target.connect() as connection:
                raw = dbapi(connection)
                _commit_rows(connection, out, *(() if startup else ("SET lock_timeout = 300",)))
                with concurrency.Session(out.url) as other:
                    other.execute(holder)
                    counter = concurrency.LockWaitCounter(out.url, [other.pid])
                    try:
                        out.do("first statement", first, connection)
                    finally:
                        out.fact("lock waits of the first statement", counter.stop())
                    out.state("after the first statement", raw)
                    out.do("next statement", execute, connection, "SELECT 1")
                    out.do("rollback", connection.rollback)
                    other.connection.rollback()
                out.session("session", raw)

    return case


_LOCK_TIMEOUT_FIRSTS: dict[str, FirstStatement] = {
    "select": statement("SELECT * FROM t"),
    "insert": statement("INSERT INTO t VALUES (5, 'five')"),
    "delete": statement("DELETE FROM t WHERE id = 1"),
    "text_with_parameters": statement(sa.text("SELECT v FROM t WHERE id = :id"), {"id": 1}),
    "orm_query": orm_select,
    "lock_table": statement("LOCK TABLE t IN SHARE MODE"),
}
for _name, _first in _LOCK_TIMEOUT_FIRSTS.items():
    first_case(f"item6_lock_timeout_{_name}", session_state=_SETTING)(_lock_timeout(_first))
first_case("item6_lock_timeout_select_startup_option", session_state=_STARTUP)(
    _lock_timeout(statement("SELECT * FROM t"), startup=True)
)
# While running, on a row: no position.
first_case("item6_lock_timeout_on_a_row_while_running", session_state=_SETTING)(
    _lock_timeout(
        statement("SELECT * FROM t WHERE id = 1 FOR UPDATE"),
        holder="UPDATE t SET v = 'theirs' WHERE id = 1",
    )
)


# -- item 7: a first statement that is only a comment or blank ----------------------------------


def _comment_only(text: Statement, params: t.Any = None) -> Case:
    def case(engine: sa.Engine, out: Out) -> None:
        with engine.connect() as connection:
            raw = dbapi(connection)
            out.do("comment only", execute, connection, text, params)
            out.state("after it", raw)
            out.do("insert", execute, connection, "INSERT INTO t VALUES (1, 'after')")
            out.do("commit", connection.commit)
            out.state("after commit", raw)
            out.do("again, then rollback", execute, connection, text, params)
            out.do("rollback", connection.rollback)
            out.state("after rollback", raw)

    return case


_COMMENTS: dict[str, tuple[Statement, t.Any]] = {
    "line_comment": ("-- x", None),
    "line_comment_with_newline": ("-- x\n", None),
    "block_comment": ("/* x */", None),
    "nested_block_comment": ("/* a /* nested */ b */", None),
    "comments_and_newlines": ("\n  -- x\n/* y */\n", None),
    "whitespace": ("  \n\t", None),
    "empty_string": ("", None),
    "percent_in_comment": ("/* 100% */", None),
    "comment_with_parameters": ("-- %(x)s", {"x": 1}),
    "comment_via_text": (sa.text("-- x"), None),
}
for _name, (_text, _params) in _COMMENTS.items():
    first_case(f"item7_{_name}")(_comment_only(_text, _params))


@first_case("item7_comment_in_orm_session")
def _comment_in_orm_session(engine: sa.Engine, out: Out) -> None:
    with orm.Session(engine) as session:
        out.do("comment only", execute, session, sa.text("/* x */"))
        session.add(Row(id=1, v="after"))
        out.do("commit", session.commit)


# -- item 9: the dialect's do_execute and the do_execute listeners after fast BEGIN's ---------

_HOOKS = ("do_execute", "do_execute_no_params", "do_executemany")


def _seen(name: str, statement_text: str, rest: tuple[t.Any, ...]) -> tuple[t.Any, ...]:
    parameters = None if name == "do_execute_no_params" else rest[0]
    return (name, statement_text, plain(parameters))


def _applications(seen: list[t.Any]) -> list[t.Any]:
    """What the hooks saw of the application's statements.

    Not flask-neon's own ``SET LOCAL`` limits through a pooler: with fast BEGIN they travel in
    BEGIN's message, without it flask-neon may run them as a statement of their own. The
    application's statements in these cases never start with ``SET LOCAL``.
    """
    return [entry for entry in seen if not entry[2].lstrip().upper().startswith("SET LOCAL ")]


@contextlib.contextmanager
def patched_dialect(engine: sa.Engine, seen: list[t.Any], *, fail: bool = False) -> Iterator[None]:
    """The dialect's ``do_execute*`` replaced as a test does (monkeypatch): each call recorded,
    and with ``fail`` answered with an OperationalError (a simulated outage)."""
    dialect = engine.dialect
    own = {name: dialect.__dict__[name] for name in _HOOKS if name in dialect.__dict__}

    def patch(name: str) -> Callable[..., t.Any]:
        original = getattr(dialect, name)

        def patched(cursor: t.Any, statement_text: str, *rest: t.Any) -> t.Any:
            seen.append(("dialect", *_seen(name, statement_text, rest)))
            if fail:
                raise engine.dialect.loaded_dbapi.OperationalError("simulated outage")
            return original(cursor, statement_text, *rest)

        return patched

    for name in _HOOKS:
        setattr(dialect, name, patch(name))
    try:
        yield
    finally:
        for name in _HOOKS:
            if name in own:
                setattr(dialect, name, own[name])
            else:
                delattr(dialect, name)


@contextlib.contextmanager
def listening(
    engine: sa.Engine, seen: list[t.Any], *, insert: bool = False, handle: bool = False
) -> Iterator[None]:
    """A library's ``do_execute*`` listeners on ``engine``, added after the engine's own (or
    before them, ``insert``); with ``handle`` they run the statement themselves and say so."""

    def listener(name: str) -> Callable[..., bool]:
        def fn(cursor: t.Any, statement_text: str, *rest: t.Any) -> bool:
            seen.append(("listener", *_seen(name, statement_text, rest)))
            if not handle:
                return False
            if name == "do_executemany":
                cursor.executemany(statement_text, rest[0])
            elif name == "do_execute_no_params":
                cursor.execute(statement_text)
            else:
                cursor.execute(statement_text, rest[0])
            return True

        return fn

    listeners = {name: listener(name) for name in _HOOKS}
    for name, fn in listeners.items():
        sa.event.listen(engine, name, fn, insert=insert)
    try:
        yield
    finally:
        for name, fn in listeners.items():
            sa.event.remove(engine, name, fn)


def _statements_under_hooks(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        out.do("first", execute, connection, "SELECT 1")
        out.do("second", execute, connection, "SELECT 2")
        out.do("commit", connection.commit)
        out.do("first with parameters", execute, connection, sa.text("SELECT :x"), {"x": 3})
        out.do(
            "insert many",
            connection.execute,
            sa.insert(table),
            [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}],
        )
        out.do("rollback", connection.rollback)
        out.do(
            "first without parameters",
            execute,
            connection.execution_options(no_parameters=True),
            "SELECT '100%'",
        )
        out.do("rollback", connection.rollback)
        out.do(
            "first executemany",
            connection.exec_driver_sql,
            "INSERT INTO t VALUES (%(id)s, %(v)s)",
            [{"id": 3, "v": "c"}, {"id": 4, "v": "d"}],
        )
        out.do("commit", connection.commit)
    with orm.Session(engine) as session:
        session.add(Row(id=5, v="orm"))
        out.do("flush", session.flush)
        out.do("query", lambda: session.scalars(sa.select(Row.v).order_by(Row.id)).all())
        out.do("commit", session.commit)


@first_case("item9_patched_dialect_do_execute_sees_every_statement")
def _patched_dialect_sees(engine: sa.Engine, out: Out) -> None:
    seen: list[t.Any] = []
    with patched_dialect(engine, seen):
        _statements_under_hooks(engine, out)
    out.fact("seen", _applications(seen))


@first_case("item9_listener_sees_every_statement")
def _listener_sees(engine: sa.Engine, out: Out) -> None:
    seen: list[t.Any] = []
    with listening(engine, seen):
        _statements_under_hooks(engine, out)
    out.fact("seen", _applications(seen))


# SQLAlchemy ignores ``insert=True`` for dialect events: a library cannot put its listener
# ahead of one added before it.
@first_case("item9_listener_asking_to_be_first_sees_every_statement")
def _inserted_listener_sees(engine: sa.Engine, out: Out) -> None:
    seen: list[t.Any] = []
    with listening(engine, seen, insert=True):
        _statements_under_hooks(engine, out)
    out.fact("seen", _applications(seen))


@first_case("item9_listener_that_executes_the_statement_itself")
def _listener_handles(engine: sa.Engine, out: Out) -> None:
    seen: list[t.Any] = []
    with listening(engine, seen, handle=True):
        _statements_under_hooks(engine, out)
    out.fact("seen", _applications(seen))


@first_case("item9_listener_and_patched_dialect_together")
def _listener_and_patch(engine: sa.Engine, out: Out) -> None:
    seen: list[t.Any] = []
    with patched_dialect(engine, seen), listening(engine, seen):
        _statements_under_hooks(engine, out)
    out.fact("seen", _applications(seen))


def _outage(first: FirstStatement) -> Case:
    def case(engine: sa.Engine, out: Out) -> None:
        seen: list[t.Any] = []
        with engine.connect() as connection:
            raw = dbapi(connection)
            with patched_dialect(engine, seen, fail=True):
                out.do("first statement in the outage", first, connection)
                out.state("in the outage", raw)
                out.do("next statement in the outage", execute, connection, "SELECT 1")
                out.do("rollback", connection.rollback)
            out.do("after the outage", execute, connection, "INSERT INTO t VALUES (2, 'after')")
            out.do("commit", connection.commit)
        out.fact("seen", _applications(seen))

    return case


first_case("item9_patched_do_execute_simulates_an_outage_insert")(
    _outage(statement("INSERT INTO t VALUES (1, 'in the outage')"))
)
first_case("item9_patched_do_execute_simulates_an_outage_text")(
    _outage(statement(sa.text("SELECT :x"), {"x": 1}))
)
first_case("item9_patched_do_execute_simulates_an_outage_orm")(_outage(orm_select))


# -- item 10: side effects of a first statement that fails with a position ---------------------
#
# ``EXECUTE p(...)`` of a statement prepared in an earlier transaction evaluates its parameters,
# then finds its plan stale (another session changed the table) and fails re-analysing it: an
# error with a position, after the parameters' side effects.


def _stale_execute(
    first: FirstStatement,
    *,
    change: str = "ALTER TABLE stale DROP COLUMN b",
    after: t.Sequence[str] = (),
) -> Case:
    def case(engine: sa.Engine, out: Out) -> None:
        with engine.connect() as connection:
            raw = dbapi(connection)
            out.do("begin", execute, connection, "SELECT 1")
            out.do(
                "prepare",
                execute,
                connection,
                "PREPARE p(int) AS SELECT b FROM stale WHERE id = $1",
            )
            out.do("commit", connection.commit)
            if change:
                admin_execute(out.url, change)
            out.do("first statement", first, connection)
            out.state("after the first statement", raw)
            out.do("rollback", connection.rollback)
            for sql_text in after:
                out.do(_label(sql_text), execute, connection, sql_text)
                out.do("commit", connection.commit)
            out.session("session", raw)
            out.backend("server", raw)

    return case


_UNLOCK_ONCE = (
    "SELECT pg_advisory_unlock(42)",
    "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'",
)
first_case("item10_stale_execute_nextval", session_state=_PREPARED)(
    _stale_execute(statement("EXECUTE p(nextval('s')::int)"))
)
first_case("item10_stale_execute_session_advisory_lock", session_state=_PREPARED)(
    _stale_execute(statement("EXECUTE p(lock_fn())"), after=_UNLOCK_ONCE)
)
first_case("item10_stale_execute_notice", session_state=_PREPARED)(
    _stale_execute(statement("EXECUTE p(notice_fn())"))
)
first_case("item10_stale_execute_text_with_parameters", session_state=_PREPARED)(
    _stale_execute(statement(sa.text("EXECUTE p(nextval(:sequence)::int)"), {"sequence": "s"}))
)
first_case("item10_stale_explain_analyze_execute", session_state=_PREPARED)(
    _stale_execute(statement("EXPLAIN ANALYZE EXECUTE p(nextval('s')::int)"))
)
first_case("item10_stale_create_table_as_execute", session_state=_PREPARED)(
    _stale_execute(statement("CREATE TABLE made AS EXECUTE p(nextval('s')::int)"))
)
first_case("item10_stale_execute_table_dropped", session_state=_PREPARED)(
    _stale_execute(statement("EXECUTE p(nextval('s')::int)"), change="DROP TABLE stale")
)
# Neighbours: a change of result type fails without a position; a plan still valid runs.
first_case("item10_stale_execute_result_type_changed", session_state=_PREPARED)(
    _stale_execute(
        statement("EXECUTE p(nextval('s')::int)"),
        change="ALTER TABLE stale ALTER COLUMN b TYPE text",
    )
)
first_case("item10_execute_valid_plan_with_side_effects", session_state=_PREPARED)(
    _stale_execute(statement("EXECUTE p(lock_fn())"), change="", after=_UNLOCK_ONCE)
)


# -- item 11: notices, and the text the server keeps ---------------------------------------------

_LONG = "a_long_identifier_" + "x" * 60  # 78 bytes: the server truncates it to 63 with a NOTICE


def _notices(
    first: FirstStatement,
    *,
    before: t.Sequence[str] = (),
    engine_config: dict[str, t.Any] | None = None,
) -> Case:
    # A failing first statement's notices stay on the connection; a successful one's go to
    # SQLAlchemy's log (outcome() records both).
    def case(engine: sa.Engine, out: Out) -> None:
        with contextlib.ExitStack() as stack:
            target = (
                stack.enter_context(sibling(engine, **engine_config)) if engine_config else engine
            )
            with target.connect() as connection:
                raw = dbapi(connection)
                _commit_rows(connection, out, *before)
                out.do("first statement", first, connection)
                out.state("after the first statement", raw)
                out.do("rollback", connection.rollback)
                out.state("after rollback", raw)

    return case


first_case("item11_notice_long_identifier_failing")(_notices(statement(f"SELECT {_LONG} FROM t")))
first_case("item11_notice_long_table_name_failing")(_notices(statement(f"SELECT 1 FROM {_LONG}")))
first_case("item11_notice_long_identifier_succeeding")(_notices(statement(f"SELECT 1 AS {_LONG}")))
first_case("item11_notice_long_identifier_text_failing")(
    _notices(statement(sa.text(f"SELECT {_LONG}, :x FROM t"), {"x": 1}))
)
_BACKSLASH = ("SET standard_conforming_strings = off", "SET escape_string_warning = on")
first_case("item11_warning_backslash_failing", session_state=_SETTING)(
    _notices(statement("SELECT 'a\\b', nope FROM t"), before=_BACKSLASH)
)
first_case("item11_warning_backslash_succeeding", session_state=_SETTING)(
    _notices(statement("SELECT 'a\\b'"), before=_BACKSLASH)
)
first_case("item11_warning_backslash_startup_option", session_state=_STARTUP)(
    _notices(
        statement("SELECT 'a\\b' FROM nope"),
        engine_config={
            "DB_ENGINE_OPTIONS": {
                "connect_args": {
                    "options": "-c standard_conforming_strings=off -c escape_string_warning=on"
                }
            }
        },
    )
)


def _kept_text(first: Statement, *, then: t.Sequence[Statement] = (), change: str = "") -> Case:
    # The first statement creates something the session keeps with its text; ``then`` runs in
    # the next transactions, after ``change`` from another session.
    def case(engine: sa.Engine, out: Out) -> None:
        with engine.connect() as connection:
            raw = dbapi(connection)
            out.do("first statement", execute, connection, first)
            out.do("commit", connection.commit)
            out.session("session", raw)
            if change:
                admin_execute(out.url, change)
            for text in then:
                out.do("begin", execute, connection, "SELECT 1")
                out.do(_label(text), execute, connection, text)
                out.do("rollback", connection.rollback)
            out.session("session at the end", raw)

    return case


first_case("item11_prepare_first_keeps_its_text", session_state=_PREPARED)(
    _kept_text("PREPARE q(int) AS SELECT $1 + 1", then=["EXECUTE q(41)"])
)
first_case("item11_prepare_text_construct_first_keeps_its_text", session_state=_PREPARED)(
    _kept_text(sa.text("PREPARE q AS SELECT 'prepared'"), then=["EXECUTE q"])
)
first_case("item11_prepare_first_then_error_position", session_state=_PREPARED)(
    _kept_text(
        "PREPARE q(int) AS SELECT b FROM stale WHERE id = $1",
        then=["EXECUTE q(1)"],
        change="ALTER TABLE stale DROP COLUMN b",
    )
)
first_case("item11_declare_with_hold_first_keeps_its_text", session_state=_HELD)(
    _kept_text(
        "DECLARE held CURSOR WITH HOLD FOR SELECT generate_series(1, 3)",
        then=["FETCH ALL FROM held", "CLOSE held"],
    )
)


@first_case("item11_declare_first_cursor_text_in_its_transaction")
def _declare_first(engine: sa.Engine, out: Out) -> None:
    with engine.connect() as connection:
        out.do("declare", execute, connection, "DECLARE c CURSOR FOR SELECT 1")
        out.do("cursors", execute, connection, "SELECT name, statement FROM pg_cursors")
        out.do("fetch", execute, connection, "FETCH ALL FROM c")
        out.do("rollback", connection.rollback)


_NUL = {
    "leading": "\x00SELECT 1",
    "alone": "\x00",
    "before_a_comment": "\x00-- x",
    "inside_a_literal": "SELECT 'a\x00b'",
    "before_a_from": "SELECT 1\x00 FROM nope",
}
for _name, _text in _NUL.items():
    first_case(f"item11_nul_{_name}")(_comment_only(_text))
first_case("item11_nul_in_a_parameter")(_comment_only("SELECT %(x)s", {"x": "a\x00b"}))


# -- neighbours: serialization failures ----------------------------------------------------------


def _serialization(isolation: str, first: Statement, writer: str) -> Case:
    # Another session changed a row and has not committed; our first statement, at
    # ``isolation``, waits for it; it commits once the server shows our wait.
    def case(engine: sa.Engine, out: Out) -> None:
        with engine.connect() as connection:
            raw = dbapi(connection)
            _commit_rows(connection, out)
            leveled = connection.execution_options(isolation_level=isolation)
            with concurrency.Session(out.url) as other:
                other.execute(writer)
                counter = concurrency.LockWaitCounter(out.url, [other.pid])
                committing = concurrency.when_waiting(
                    out.url, [other.pid], lambda pid: other.connection.commit(), counter=counter
                )
                try:
                    out.do("first statement", execute, leveled, first)
                finally:
                    out.fact("lock waits of the first statement", counter.stop())
                    committing.value()
                out.state("after the first statement", raw)
                out.do("next statement", execute, leveled, "SELECT count(*) FROM t")
                out.do("rollback", leveled.rollback)

    return case


_SERIALIZATION = {
    "repeatable_read_update": (
        "REPEATABLE READ",
        "UPDATE t SET v = 'ours' WHERE id = 1",
        "UPDATE t SET v = 'theirs' WHERE id = 1",
    ),
    "serializable_update": (
        "SERIALIZABLE",
        "UPDATE t SET v = 'ours' WHERE id = 1",
        "UPDATE t SET v = 'theirs' WHERE id = 1",
    ),
    "repeatable_read_update_of_a_deleted_row": (
        "REPEATABLE READ",
        "UPDATE t SET v = 'ours' WHERE id = 1",
        "DELETE FROM t WHERE id = 1",
    ),
    "serializable_select_for_update": (
        "SERIALIZABLE",
        "SELECT v FROM t WHERE id = 1 FOR UPDATE",
        "UPDATE t SET v = 'theirs' WHERE id = 1",
    ),
    "read_committed_update_waits_and_succeeds": (
        "READ COMMITTED",
        "UPDATE t SET v = 'ours' WHERE id = 1",
        "UPDATE t SET v = 'theirs' WHERE id = 1",
    ),
}
for _name, (_isolation, _first_sql, _writer) in _SERIALIZATION.items():
    first_case(f"nb_serialization_{_name}")(_serialization(_isolation, _first_sql, _writer))


# -- neighbours: statement timeouts, cancels, terminations ---------------------------------------


def _interrupted(
    first: Statement,
    *,
    lock_wait: bool = False,
    action: str | None = None,
    session_timeout: bool = False,
    startup_timeout: bool = False,
) -> Case:
    """``first`` waits (in ``pg_sleep`` or on a lock another session holds) until a statement
    timeout, a cancel (``pg_cancel_backend`` or the driver's own) or a termination
    (``pg_terminate_backend``) ends it."""

    def case(engine: sa.Engine, out: Out) -> None:
        with contextlib.ExitStack() as stack:
            target = (
                stack.enter_context(sibling(engine, DB_STATEMENT_TIMEOUT=0.2))
                if startup_timeout
                else engine
            )
            connection = stack.enter_context(target.connect())
            raw = dbapi(connection)
            _commit_rows(
                connection, out, *(("SET statement_timeout = 200",) if session_timeout else ())
            )
            helpers: list[int] = []
            other = None
            if lock_wait:
                other = stack.enter_context(concurrency.Session(out.url))
                other.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
                helpers.append(other.pid)
            counter = concurrency.LockWaitCounter(out.url, helpers)
            interrupting = None
            if action is not None:
                interrupting = concurrency.when_waiting(
                    out.url,
                    helpers,
                    _interrupt(action, raw, out.url),
                    event_type="Lock" if lock_wait else "Timeout",
                    event=None if lock_wait else "PgSleep",
                    counter=counter,
                )
            try:
                out.do("first statement", execute, connection, first)
            finally:
                out.fact("lock waits of the first statement", counter.stop())
                if interrupting is not None:
                    interrupting.value()
            out.state("after the first statement", raw)
            out.fact("invalidated", connection.invalidated)
            if other is not None:
                other.connection.rollback()  # the lock goes: the next statement must not wait
            out.do("rollback", connection.rollback)
            out.do("next statement", execute, connection, "SELECT count(*) FROM t")
            out.do("commit", connection.commit)

    return case


def _interrupt(action: str, raw: t.Any, url: str) -> Callable[[int], t.Any]:
    def interrupt(pid: int) -> t.Any:
        if action == "cancel":
            # The driver's own cancel request, from another thread (psycopg 3: cancel_safe()).
            return raw.cancel_safe() if is_psycopg3(raw) else raw.cancel()
        assert action in ("pg_cancel_backend", "pg_terminate_backend")
        return admin_execute(url, f"SELECT {action}(%s)", (pid,))

    return interrupt


_INTERRUPTED: dict[str, tuple[Case, str | None]] = {
    "nb_statement_timeout_session_setting_in_pg_sleep": (
        _interrupted("SELECT pg_sleep(30)", session_timeout=True),
        _SETTING,
    ),
    "nb_statement_timeout_session_setting_in_a_lock_wait": (
        _interrupted("SELECT * FROM t", lock_wait=True, session_timeout=True),
        _SETTING,
    ),
    "nb_statement_timeout_engine_setting_in_pg_sleep": (
        _interrupted("SELECT pg_sleep(30)", startup_timeout=True),
        None,
    ),
    "nb_statement_timeout_engine_setting_in_a_lock_wait": (
        _interrupted("SELECT * FROM t", lock_wait=True, startup_timeout=True),
        None,
    ),
    "nb_cancel_in_pg_sleep": (
        _interrupted("SELECT pg_sleep(30)", action="pg_cancel_backend"),
        None,
    ),
    "nb_cancel_in_a_lock_wait": (
        _interrupted("SELECT * FROM t", lock_wait=True, action="pg_cancel_backend"),
        None,
    ),
    "nb_cancel_by_the_driver_in_a_lock_wait": (
        _interrupted("SELECT * FROM t", lock_wait=True, action="cancel"),
        None,
    ),
    "nb_terminate_in_pg_sleep": (
        _interrupted("SELECT pg_sleep(30)", action="pg_terminate_backend"),
        None,
    ),
    "nb_terminate_in_a_lock_wait": (
        _interrupted(
            "INSERT INTO t VALUES (9, 'nine')", lock_wait=True, action="pg_terminate_backend"
        ),
        None,
    ),
}
for _name, (_case, _reason) in _INTERRUPTED.items():
    first_case(_name, session_state=_reason)(_case)


# -- neighbours: volatile functions in a failing first statement ---------------------------------


def _first_statements(
    statements: t.Sequence[Statement | tuple[Statement, t.Any]],
    *,
    before: t.Sequence[str] = (),
    after: t.Sequence[str] = (),
    superuser: bool = False,
    options: dict[str, t.Any] | None = None,
) -> Case:
    """Each statement as the first of a transaction of its own, then a next statement and a
    rollback; ``before`` runs in a transaction before them, ``after`` in one after them."""

    def case(engine: sa.Engine, out: Out) -> None:
        if superuser:
            need_superuser(out)
        with engine.connect() as connection:
            raw = dbapi(connection)
            _commit_rows(connection, out, "INSERT INTO parent VALUES (1)", *before)
            target = connection.execution_options(**options) if options else connection
            for item in statements:
                text, params = item if isinstance(item, tuple) else (item, None)
                out.do(_label(text), execute, target, text, params)
                out.state("after it", raw)
                out.do("next statement", execute, target, "SELECT 1")
                out.do("rollback", target.rollback)
            for text in after:
                out.do(_label(text), execute, connection, text)
                out.do("commit", connection.commit)
            out.session("session", raw)

    return case


first_case("nb_volatile_nextval_in_failing_first_statements")(
    _first_statements(
        [
            "SELECT nextval('s'), nope FROM t",
            "SELECT nextval('s'), 'x'::int",
            "SELECT nextval('s') / 0",
            "INSERT INTO t VALUES (1, nextval('s')::text)",
            "SELECT nextval('s') FROM t WHERE v::int > 0",
            (sa.text("SELECT nextval(:sequence) / 0"), {"sequence": "s"}),
            ("SELECT nextval(%(sequence)s), nope", {"sequence": "s"}),
            "SELECT setval('s', 100), 1 / 0",
        ]
    )
)
first_case("nb_volatile_session_lock_in_failing_first_statements", session_state=_ADVISORY)(
    _first_statements(
        [
            "SELECT lock_fn(), nope FROM t",
            "SELECT lock_fn() / 0",
            "SELECT pg_advisory_lock(43), 'x'::int",
            "SELECT pg_advisory_lock(44), 1 / 0",
            "SELECT pg_advisory_xact_lock(45), 1 / 0",
        ],
        after=_UNLOCK_ONCE,
    )
)
first_case("nb_volatile_notice_in_failing_first_statements")(
    _first_statements(["SELECT notice_fn(), nope FROM t", "SELECT notice_fn() / 0"])
)


# -- neighbours: an error of each SQLSTATE class a first statement can raise ---------------------
#
# Class 28 (invalid authorization specification) is raised only while logging in; what a
# session may not do later (SET ROLE, SET SESSION AUTHORIZATION, a table) is 42501.

_SQLSTATE: dict[str, tuple[Case, str | None]] = {
    "sqlstate_0A_feature_not_supported": (
        _first_statements(
            [
                "SELECT count(*) FROM t FOR UPDATE",
                "SELECT nodb.public.t.id FROM nodb.public.t",  # with a position
            ]
        ),
        None,
    ),
    "sqlstate_21_cardinality_violation": (
        _first_statements(["SELECT (SELECT generate_series(1, 2))"]),
        None,
    ),
    "sqlstate_22_data_exception": (
        _first_statements(
            [
                "SELECT 1 / 0",
                "SELECT 'x'::int",  # with a position
                "SELECT v::int FROM t",
                "SELECT '2020-13-01'::date",  # with a position
                "SELECT '99999999999'::int",  # with a position
                "SELECT 2147483647 + 1",
                "SELECT repeat('x', 3)::varchar(2), 'ok'",
                ("SELECT %(x)s::int", {"x": "x"}),
            ]
        ),
        None,
    ),
    "sqlstate_23_integrity_constraint_violation": (
        _first_statements(
            [
                "INSERT INTO t VALUES (1, 'duplicate')",
                "INSERT INTO t VALUES (NULL, 'null')",
                "INSERT INTO positive VALUES (-1)",
                "UPDATE parent SET id = 2",
                "DELETE FROM parent",
            ],
            before=["INSERT INTO child VALUES (1, 1)"],
        ),
        None,
    ),
    "sqlstate_25_invalid_transaction_state": (
        _first_statements(
            [
                "VACUUM",
                "VACUUM t",
                "CREATE DATABASE parity_never",
                "CREATE INDEX CONCURRENTLY ON t (v)",
                "ALTER SYSTEM SET work_mem = '4MB'",
                "COMMIT PREPARED 'nope'",
                "DISCARD ALL",
            ]
        ),
        None,
    ),
    "sqlstate_25_read_only_transaction": (
        _first_statements(
            ["INSERT INTO t VALUES (9, 'read only')", "SET TRANSACTION READ WRITE"],
            options={"postgresql_readonly": True},
        ),
        None,
    ),
    "sqlstate_26_invalid_sql_statement_name": (
        _first_statements(["EXECUTE nope", "EXECUTE nope(1)", "DEALLOCATE nope"]),
        None,
    ),
    "sqlstate_28_as_42501_insufficient_privilege": (
        _first_statements(
            [
                "SET ROLE parity_owner",
                "SELECT * FROM owned",
                "SET SESSION AUTHORIZATION parity_owner",
            ],
            before=["SET SESSION AUTHORIZATION parity_user"],
            after=["RESET SESSION AUTHORIZATION"],
            superuser=True,
        ),
        _SETTING,
    ),
    "sqlstate_2B_dependent_objects_still_exist": (
        _first_statements(["DROP ROLE parity_owner", "DROP TABLE parent"], superuser=True),
        None,
    ),
    "sqlstate_2D_invalid_transaction_termination": (
        _first_statements(["CALL commit_it()"]),
        None,
    ),
    "sqlstate_2F_sql_routine_exception": (_first_statements(["SELECT no_return()"]), None),
    "sqlstate_34_invalid_cursor_name": (
        _first_statements(["FETCH nope", "CLOSE nope", "MOVE nope"]),
        None,
    ),
    "sqlstate_3B_savepoint_exception": (
        _first_statements(["ROLLBACK TO SAVEPOINT nope", "RELEASE SAVEPOINT nope"]),
        None,
    ),
    "sqlstate_3F_invalid_schema_name": (
        _first_statements(["CREATE TABLE nosuch.x (a int)"]),  # with a position
        None,
    ),
    "sqlstate_42_syntax_error_or_access_rule_violation": (
        _first_statements(
            [
                "SELEC 1",
                "SELECT nope FROM t",
                "SELECT 1 FROM nope",
                "SELECT no_fn(1)",
                "SELECT id FROM t, t AS t2",
                "SELECT v, count(*) FROM t",
                "SELECT 'a' COLLATE \"nope\"",
                "SELECT " + "(" * 20000 + "1" + ")" * 20000,  # memory exhausted, at a position
                ("SELECT %(x)s FROM nope", {"x": 1}),
                (sa.text("SELECT :x FROM nope"), {"x": 1}),
            ]
        ),
        None,
    ),
    "sqlstate_44_with_check_option_violation": (
        _first_statements(["INSERT INTO checked VALUES (-1, 'hidden')"]),
        None,
    ),
    "sqlstate_53_insufficient_resources": (
        _first_statements(
            [
                "SELECT count(*) FROM "
                "(SELECT g FROM generate_series(1, 100000) g ORDER BY g DESC) AS sorted"
            ],
            before=["SET temp_file_limit = '64kB'", "SET work_mem = '64kB'"],
            superuser=True,
        ),
        _SETTING,
    ),
    "sqlstate_54_program_limit_exceeded": (
        _first_statements(
            [
                "SELECT concat(" + ", ".join(["1"] * 101) + ")",  # with a position
                "SELECT " + ", ".join(["1"] * 1700),
                "SELECT 1" + " + 1" * 100000,
                "CREATE TABLE wide (" + ", ".join(f"c{i} int" for i in range(1700)) + ")",
            ]
        ),
        None,
    ),
    "sqlstate_55_object_not_in_prerequisite_state": (
        _first_statements(["SELECT currval('s')"]),
        None,
    ),
    "sqlstate_57_operator_intervention": (
        _first_statements(
            [
                "SELECT pg_cancel_backend(pg_backend_pid())",
                "SELECT pg_terminate_backend(pg_backend_pid())",
            ]
        ),
        None,
    ),
    "sqlstate_58_system_error": (
        _first_statements(["SELECT pg_read_file('/nonexistent/parity')"], superuser=True),
        None,
    ),
    "sqlstate_P0_plpgsql_error": (
        _first_statements(
            [
                "SELECT raise_it('boom')",
                "SELECT strict_none()",
                "SELECT strict_many()",
                "SELECT assert_it()",
                ("SELECT raise_it(%(message)s)", {"message": "100% boom"}),
            ]
        ),
        None,
    ),
    "sqlstate_XX_internal_error": (_first_statements(["SELECT amvalidate(0)"]), None),
}
for _name, (_case, _reason) in _SQLSTATE.items():
    first_case(_name, session_state=_reason)(_case)


def _nowait(first: str, holder: str) -> Case:
    # 55P03 without waiting: another session holds what NOWAIT asks for.
    def case(engine: sa.Engine, out: Out) -> None:
        with engine.connect() as connection:
            raw = dbapi(connection)
            _commit_rows(connection, out)
            with concurrency.Session(out.url) as other:
                other.execute(holder)
                out.do("first statement", execute, connection, first)
                out.state("after it", raw)
                out.do("rollback", connection.rollback)
                other.connection.rollback()

    return case


first_case("sqlstate_55_lock_not_available_nowait_table")(
    _nowait("LOCK TABLE t IN ACCESS SHARE MODE NOWAIT", "LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
)
first_case("sqlstate_55_lock_not_available_nowait_row")(
    _nowait("SELECT * FROM t WHERE id = 1 FOR UPDATE NOWAIT", "UPDATE t SET v = 'x' WHERE id = 1")
)


# -- neighbours: $1-style parameters in a statement sent without parameters ----------------------
#
# psycopg 3 sends a statement without parameters in the simple protocol ("there is no parameter
# $1"); a pipeline sends every statement in the extended one, where the same text draws another
# error. Fast BEGIN steps aside for them (``_statements.opens_plainly``).

first_case("nb_positional_parameters_in_text")(
    _first_statements(
        [
            "SELECT $1",
            "SELECT $1::int",
            "SELECT 1 WHERE $1 IS NULL",
            ("SELECT %(x)s, $2", {"x": 1}),
            (sa.text("SELECT :x, $2"), {"x": 1}),
            "SELECT '$1', $$ $1 $$, 1 AS \"$1\" -- $1",
        ]
    )
)


# -- neighbours: transaction control as the first statement -------------------------------------

first_case("nb_transaction_control_first")(
    _first_statements(
        [
            "BEGIN",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "COMMIT",
            "END",
            "ROLLBACK",
            "ABORT",
            "SAVEPOINT s1",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET LOCAL statement_timeout = 1234",
            "SHOW transaction_isolation",
        ]
    )
)


#: psycopg 3, documented (docs/fast-begin.md): a transaction fast BEGIN opened and the
#: application ended on the raw DBAPI connection itself (``commit()``, ``rollback()``, a
#: ``COMMIT`` statement) leaves psycopg in the autocommit mode fast BEGIN switched it to until
#: flask-neon sees the connection again (SQLAlchemy's next statement, commit or rollback, the
#: pool): statements run on the raw connection meanwhile commit on their own, and an
#: ``autocommit = True`` the application sets meanwhile is undone then. These cases do that in
#: the ``in_sa_`` position: they must differ (``xfail(strict=True)``), and
#: ``test_psycopg_a_transaction_ended_on_the_raw_connection`` asserts how.
RAW_END_THEN_RAW_STATEMENTS = frozenset(
    f"in_sa_{name}"
    for name in (
        "commit_and_rollback",
        "commit_then_a_kept_cursor",
        "commit_twice_rollback_twice",
        "commit_statement_then_more",
        "set_autocommit_in_a_transaction",
        "pipeline_by_the_app",
        "copy_in_and_out",
        "listen_notify",
        "errors_and_state",
        "explicit_transaction_statements",
    )
)

#: The cases of each driver: its raw surface (on a fresh connection, inside a transaction fast
#: BEGIN opened, and for psycopg 3 after one committed), SQLAlchemy's paths, first statements.
CASES_BY_DRIVER: dict[str, list[Case]] = {
    "psycopg2": [
        *(pristine(steps) for steps in RAW),
        *(inside_sqlalchemy(steps) for steps in RAW),
        *SQLALCHEMY,
        *FIRST,
    ],
    "psycopg": [
        *(pristine(steps) for steps in RAW3),
        *(inside_sqlalchemy(steps) for steps in RAW3),
        *(after_sqlalchemy(steps) for steps in RAW3),
        *SQLALCHEMY,
        *FIRST,
    ],
}
CASES = CASES_BY_DRIVER["psycopg2"]
