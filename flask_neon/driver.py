"""Fast BEGIN: a transaction's ``BEGIN`` travels with its first statement, nothing else changes.

psycopg2 sends ``BEGIN`` and waits for its answer before a transaction's first statement: one
round trip more per transaction. docs/fast-begin.md explains the mechanism and its proof.

* The DBAPI connection stays psycopg2's own; nothing of psycopg2 is subclassed or wrapped.
  psycopg2 keeps one fact about transactions, ``connection.status``: it sends ``BEGIN`` when the
  flag says "ready", and commit, rollback, named cursors, ``with conn:``... all read it.
* :func:`install` listens to ``do_execute``, below the ``before_cursor_execute`` events that
  logging and tracing read, so they see the SQL as written. When psycopg2 would send ``BEGIN``
  before a plain cursor's single statement, it goes out as ``BEGIN [options]; [limits];
  statement`` in one message and the flag is set as psycopg2's own ``BEGIN`` sets it.
* Anything that cannot be made identical runs psycopg2's way: other cursor classes, named
  cursors, ``executemany``, text with a ``;``. A first statement the server rejected before
  running anything is replayed psycopg2's way, so the exception and the transaction's state
  are the ones psycopg2 produces.

The flag is a C field without a setter. :data:`AVAILABLE` is true only when its place could be
read from psycopg2's own attribute descriptor and checked; otherwise psycopg2 sends its
``BEGIN`` as always.
"""

from __future__ import annotations

import ctypes
import sys
import typing as t

import psycopg2  # type: ignore[import-untyped]
import psycopg2.extensions as ext  # type: ignore[import-untyped]
import sqlalchemy as sa
from sqlalchemy import event

_base_status = ext.connection.status  # psycopg2's own attribute, past any subclass

# How psycopg2 spells BEGIN's options (psycopg/pqpath.c, pq_begin_locked).
_ISOLATION = {1: "READ COMMITTED", 2: "REPEATABLE READ", 3: "SERIALIZABLE", 4: "READ UNCOMMITTED"}


# -- psycopg2's transaction flag ---------------------------------------------------------------


class _MemberDef(ctypes.Structure):
    # CPython's PyMemberDef: what a read-only C attribute such as ``status`` is made of.
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("type", ctypes.c_int),
        ("offset", ctypes.c_ssize_t),
        ("flags", ctypes.c_int),
        ("doc", ctypes.c_char_p),
    ]


_T_INT, _T_LONG = 1, 2  # structmember.h
_READONLY = 1


def _member_offset(name: str, kind: int) -> int | None:
    """Where psycopg2's connection object keeps the read-only C attribute ``name``.

    A member descriptor (``PyMemberDescrObject``) is an object header, three pointers (type,
    name, qualified name) and a pointer to the ``PyMemberDef`` psycopg2 declared. The result
    is used only when that declaration names ``name``, of C type ``kind``, read-only.
    """
    descriptor = ext.connection.__dict__.get(name)
    if sys.implementation.name != "cpython" or type(descriptor).__name__ != "member_descriptor":
        return None
    header = object.__basicsize__ + 3 * ctypes.sizeof(ctypes.c_void_p)
    member_pointer = ctypes.c_void_p.from_address(id(descriptor) + header).value
    if not member_pointer:
        return None
    member = _MemberDef.from_address(member_pointer)
    if (
        member.name != name.encode()
        or member.type != kind
        or not member.flags & _READONLY
        or not 0 < member.offset < ext.connection.__basicsize__
    ):
        return None
    return int(member.offset)


def _mark_offset(status_offset: int | None) -> int | None:
    """Where psycopg2 counts ended transactions (``mark``); None when it cannot be verified.

    ``mark`` has no attribute: psycopg2's ``connectionObject`` declares it as the one ``long``
    between ``closed`` and ``status``, which have. Used only when those two are exactly one
    ``long`` apart.
    """
    closed_offset = _member_offset("closed", _T_LONG)
    size = ctypes.sizeof(ctypes.c_long)
    if status_offset is None or closed_offset is None or closed_offset + 2 * size != status_offset:
        return None
    return closed_offset + size


_STATUS_OFFSET = _member_offset("status", _T_INT)
_MARK_OFFSET = _mark_offset(_STATUS_OFFSET)
#: True when psycopg2's transaction flag could be located: fast BEGIN is possible.
AVAILABLE = _STATUS_OFFSET is not None
#: True when a transaction can also be recorded as ended the way psycopg2 records it.
CAN_END_TRANSACTIONS = _MARK_OFFSET is not None


def _set_status(connection: t.Any, status: int) -> None:
    """Set psycopg2's own transaction flag, as its ``BEGIN`` / ``ROLLBACK`` set it."""
    assert _STATUS_OFFSET is not None
    field = ctypes.c_int.from_address(id(connection) + _STATUS_OFFSET)
    if field.value != _base_status.__get__(connection):  # not the layout checked at import
        raise RuntimeError("psycopg2's connection status field moved; disable DB_FAST_BEGIN")
    field.value = status


def end_transaction(connection: t.Any) -> None:
    """Record a transaction as ended, as psycopg2's ``rollback()`` does once it sent ``ROLLBACK``:
    one more ended transaction (which makes its named cursors invalid) and status "ready"."""
    assert _MARK_OFFSET is not None
    _set_status(connection, ext.STATUS_READY)  # first: it checks the layout it writes to
    ctypes.c_long.from_address(id(connection) + _MARK_OFFSET).value += 1


# -- the transaction's first statement ----------------------------------------------------------


def transaction_flag_is(connection: t.Any, status: int) -> bool:
    """True for an open psycopg2 connection, not in autocommit, whose flag reads ``status``."""
    return (
        isinstance(connection, ext.connection)
        and not connection.closed
        and not connection.autocommit
        and connection.status == status
    )


def _opens_transaction(connection: t.Any) -> bool:
    """True when psycopg2 would send ``BEGIN`` before the next statement."""
    return transaction_flag_is(connection, ext.STATUS_READY)


def _begin_sql(connection: t.Any) -> str:
    # The BEGIN psycopg2 would send, built from its own validated session characteristics.
    parts = ["BEGIN"]
    level = connection.isolation_level
    if level in _ISOLATION:
        parts.append(f"ISOLATION LEVEL {_ISOLATION[level]}")
    if connection.readonly is not None:
        parts.append("READ ONLY" if connection.readonly else "READ WRITE")
    if connection.deferrable is not None:
        parts.append("DEFERRABLE" if connection.deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


def _one_plain_statement(cursor: t.Any, statement: t.Any) -> bool:
    # Another cursor class may read or rewrite the SQL it is given (a tracing tool records it):
    # it must see the statement as written, so it gets psycopg2's own BEGIN. So does a named
    # cursor, whose statement psycopg2 wraps in DECLARE.
    return (
        type(cursor) is ext.cursor
        and cursor.name is None
        and isinstance(statement, str)
        and ";" not in statement
        and bool(statement.strip())
    )


class FastBegin:
    """The dialect events of one engine: open its transactions with their first statement.

    Attributes:
        begin_statements: SQL run right after ``BEGIN`` in every transaction SQLAlchemy opens,
            e.g. the ``SET LOCAL`` session limits through a pooler. Empty by default.
        context: Called with the DBAPI connection as each transaction begins: more SQL for
            that transaction (flask-neon's per-request settings and role), or "". It may
            raise: then nothing is sent.
    """

    def __init__(
        self, begin_statements: str = "", context: t.Callable[[t.Any], str] | None = None
    ) -> None:
        self.begin_statements = begin_statements
        self.context = context

    def statements(self, connection: t.Any, with_context: bool = True) -> str:
        """What follows ``BEGIN`` in the transaction beginning now on ``connection``."""
        per_request = self.context(connection) if self.context and with_context else ""
        return self.begin_statements + per_request

    def begin(self, connection: t.Any, with_context: bool = True) -> None:
        """psycopg2's way: let it send ``BEGIN``, then run :meth:`statements`."""
        statements = self.statements(connection, with_context)
        if statements:
            with ext.cursor(connection) as cursor:
                cursor.execute(statements)

    def execute(self, cursor: t.Any, statement: t.Any, parameters: t.Any, context: t.Any) -> bool:
        """``do_execute``: True when the statement was run here, with its ``BEGIN``."""
        connection = cursor.connection
        if not _opens_transaction(connection):
            return False
        # SQLAlchemy checks a new connection (dialect.initialize) in no transaction of its
        # own, from inside the pool's lock: that is nobody's request, so no context is
        # asked for (a context function that queries would wait on that lock for ever).
        with_context = context is None or context.root_connection.in_transaction()
        if not _one_plain_statement(cursor, statement):
            self.begin(connection, with_context)
            return False
        prefix = f"{_begin_sql(connection)}; {self.statements(connection, with_context)}"
        if parameters is not None:
            prefix = prefix.replace("%", "%%")
        _set_status(connection, ext.STATUS_BEGIN)
        try:
            cursor.execute(prefix + statement, parameters)
        except BaseException as exc:
            if not self._after_failed_first(connection, exc):
                raise
        else:
            return True
        # Replay psycopg2's way, outside the except block so that the exception psycopg2
        # raises is not chained to the first one.
        self.begin(connection, with_context)
        cursor.execute(statement, parameters)
        return True

    def execute_no_params(self, cursor: t.Any, statement: t.Any, context: t.Any) -> bool:
        """``do_execute_no_params``: as :meth:`execute`."""
        return self.execute(cursor, statement, None, context)

    def executemany(
        self, cursor: t.Any, statement: t.Any, parameters: t.Any, context: t.Any
    ) -> bool:
        """``do_executemany``: psycopg2's own ``BEGIN``, then the limits."""
        if _opens_transaction(cursor.connection):
            self.begin(cursor.connection)
        return False

    @staticmethod
    def _after_failed_first(connection: t.Any, exc: BaseException) -> bool:
        """Put psycopg2's flag where its own ``BEGIN`` would have; True when to replay.

        A replay is safe only where the server ran nothing of the statement: it received
        nothing or rejected the whole message unparsed (no transaction is open), or the error
        carries a position in the text, which only parsing and analysis report.
        """
        if connection.closed:
            _set_status(connection, ext.STATUS_READY)
            return False
        status = connection.get_transaction_status()
        if status == ext.TRANSACTION_STATUS_IDLE:
            _set_status(connection, ext.STATUS_READY)
            return isinstance(exc, Exception)
        if (
            status == ext.TRANSACTION_STATUS_INERROR
            and isinstance(exc, psycopg2.Error)
            and exc.diag.statement_position is not None
        ):
            # psycopg2's own rollback() of the transaction it believes it opened.
            ext.connection.rollback(connection)
            return True
        if status not in (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR):
            _set_status(connection, ext.STATUS_READY)
        return False


def install(
    engine: sa.Engine | type[sa.Engine],
    begin_statements: str = "",
    context: t.Callable[[t.Any], str] | None = None,
) -> FastBegin:
    """Open ``engine``'s transactions with their first statement; return the events' owner.

    ``engine`` may be the :class:`~sqlalchemy.engine.Engine` class itself: every engine then.
    Does nothing (and returns an inert owner) when :data:`AVAILABLE` is false. ``context``:
    see :class:`FastBegin`.
    """
    fast = FastBegin(begin_statements, context)
    if AVAILABLE:
        event.listen(engine, "do_execute", fast.execute)
        event.listen(engine, "do_execute_no_params", fast.execute_no_params)
        event.listen(engine, "do_executemany", fast.executemany)
    return fast
