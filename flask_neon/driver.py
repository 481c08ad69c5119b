"""Fast BEGIN: a transaction's ``BEGIN`` travels with its first statement, nothing else changes.

psycopg2 opens every transaction by sending ``BEGIN`` and waiting for the answer before it sends
the first statement: a request that runs one query pays three round trips (``BEGIN``, the
query, ``ROLLBACK``). Over the network to Neon each one is a millisecond or more.

How it is done, and why it cannot change an outcome:

* The DBAPI connection is psycopg2's own (:class:`NeonConnection` subclasses it and adds no
  behaviour until a fast transaction is open). Code that uses psycopg2 directly --
  ``engine.raw_connection()``, ``psycopg2.extras``, cursor factories, tracing tools -- talks to
  psycopg2 exactly as psycopg2 made it.
* Only SQLAlchemy's execution path opens a fast transaction: :func:`install` listens to the
  dialect's ``do_execute`` events, below the ``before_cursor_execute`` events that logging,
  OpenTelemetry and Sentry read, so they still see the SQL the application wrote. When
  psycopg2 would send ``BEGIN`` before a plain cursor's statement, the statement goes out as
  ``BEGIN [options]; [limits]; statement`` in one message instead.
* While that transaction is open, psycopg2 itself believes it is in autocommit mode. The
  connection therefore answers for psycopg2 -- ``status``, ``autocommit``, ``commit()``,
  ``rollback()``, the setters that refuse to run inside a transaction -- and hands the
  transaction back to psycopg2's own handling (:meth:`NeonConnection._go_native`) before any
  call whose behaviour depends on psycopg2's private state (named cursors, large objects,
  two-phase commit).
* Anything that cannot be made identical runs psycopg2's way and pays its round trip: cursors
  of another class (a tracing tool's, ``RealDictCursor``), named cursors, ``executemany``,
  text with a ``;`` (it may hold several statements), and errors. A statement that fails as
  the first of a transaction is replayed psycopg2's way when the server rejected it before
  running it, so the exception -- type, text, ``LINE 1:`` excerpt and position -- is the one
  psycopg2 would have raised, and the transaction is left in the state psycopg2 leaves it in.
"""

from __future__ import annotations

import operator
import re
import typing as t

import psycopg2
import psycopg2.extensions as ext  # type: ignore[import-untyped]
import sqlalchemy as sa
from sqlalchemy import event

_IDLE = ext.TRANSACTION_STATUS_IDLE
_INTRANS = ext.TRANSACTION_STATUS_INTRANS
_INERROR = ext.TRANSACTION_STATUS_INERROR

# psycopg2's own attributes, read and written past the overrides below.
_base_autocommit = ext.connection.autocommit
_base_status = ext.connection.status

# How psycopg2 spells BEGIN's options (psycopg/pqpath.c, pq_begin_locked).
_ISOLATION = {1: "READ COMMITTED", 2: "REPEATABLE READ", 3: "SERIALIZABLE", 4: "READ UNCOMMITTED"}

# Silences the "there is already a transaction in progress" warning of the BEGIN that hands a
# fast transaction to psycopg2, and returns the value to put back. OFFSET 0 keeps the planner
# from merging the subquery, so the old value is read before set_config changes it.
_QUIET = (
    "SELECT old, set_config('client_min_messages', 'error', true) "
    "FROM (SELECT current_setting('client_min_messages') AS old OFFSET 0) AS s"
)
_RESTORE = "SELECT set_config('client_min_messages', %s, true)"


class NeonConnection(ext.connection):  # type: ignore[misc]
    """psycopg2's connection, able to open a transaction in its first statement's round trip.

    Until :func:`install`'s event opens a fast transaction, every method and attribute is
    psycopg2's own. While one is open, the connection reports what psycopg2 would report
    inside a transaction.

    Attributes:
        begin_statements: SQL run right after ``BEGIN`` in every transaction that SQLAlchemy
            opens, e.g. the ``SET LOCAL`` session limits through a pooler. Empty by default.
    """

    begin_statements = ""
    # True while a transaction opened by execute_with_begin() runs: the server has one open,
    # psycopg2 is in autocommit mode and knows nothing of it.
    _fast = False

    # -- what SQLAlchemy's execution path calls ------------------------------------------------

    def opens_transaction(self) -> bool:
        """True when psycopg2 would send ``BEGIN`` before the next statement."""
        return (
            not self._fast
            and not self.closed
            and not _base_autocommit.__get__(self)
            and _base_status.__get__(self) == ext.STATUS_READY
        )

    def begin(self) -> None:
        """Open the transaction psycopg2's way, then run :attr:`begin_statements` in it."""
        if self.begin_statements:
            with ext.cursor(self) as cursor:
                cursor.execute(self.begin_statements)

    def execute_with_begin(self, cursor: t.Any, statement: str, parameters: t.Any) -> None:
        """Run a transaction's first statement with its ``BEGIN``, in one round trip.

        Call only when :meth:`opens_transaction` is true, with a plain psycopg2 cursor and one
        statement.
        """
        prefix = f"{self._begin_sql()}; {self.begin_statements}"
        _base_autocommit.__set__(self, True)
        try:
            cursor.execute(prefix + statement, parameters)
        except psycopg2.Error as exc:
            if not self._after_failed_first(exc):
                raise
        except BaseException:
            self._settle()
            raise
        else:
            self._fast = True
            return
        # Replay psycopg2's way, outside the except block so that the exception psycopg2
        # raises is not chained to the first one.
        self.begin()
        cursor.execute(statement, parameters)

    def _after_failed_first(self, exc: psycopg2.Error) -> bool:
        """Settle the state after a failed first statement; True when it must be replayed.

        A replay is safe only where the server ran nothing of the statement: it rejected the
        whole message unparsed (no transaction is open), or the error carries a position in
        the text, which only parsing and analysis report.
        """
        if self.closed or exc.pgcode is None:
            self._settle()
            return False
        status = self.get_transaction_status()
        if status == _IDLE:
            _base_autocommit.__set__(self, False)
            return True
        if status == _INERROR and exc.diag.statement_position is not None:
            with ext.cursor(self) as cursor:
                cursor.execute("ROLLBACK")
            _base_autocommit.__set__(self, False)
            return True
        self._settle()
        return False

    def _settle(self) -> None:
        """After an interrupted first statement: fast if the server opened the transaction."""
        if self.closed:
            return
        if self.get_transaction_status() in (_INTRANS, _INERROR):
            self._fast = True
        else:
            _base_autocommit.__set__(self, False)

    def _begin_sql(self) -> str:
        # The BEGIN psycopg2 would send, built from its own validated session characteristics.
        parts = ["BEGIN"]
        level = self.isolation_level
        if level in _ISOLATION:
            parts.append(f"ISOLATION LEVEL {_ISOLATION[level]}")
        if self.readonly is not None:
            parts.append("READ ONLY" if self.readonly else "READ WRITE")
        if self.deferrable is not None:
            parts.append("DEFERRABLE" if self.deferrable else "NOT DEFERRABLE")
        return " ".join(parts)

    # -- ending a fast transaction --------------------------------------------------------------

    def _end(self, command: str) -> None:
        try:
            with ext.cursor(self) as cursor:
                cursor.execute(command)
        finally:
            # psycopg2 counts the transaction as ended even when COMMIT fails.
            self._fast = False
            if not self.closed:
                _base_autocommit.__set__(self, False)

    def commit(self) -> None:
        if self._fast:
            self._end("COMMIT")
        else:
            super().commit()

    def rollback(self) -> None:
        if self._fast:
            self._end("ROLLBACK")
        else:
            super().rollback()

    def close(self) -> None:
        # The server rolls back what is open, as it does for psycopg2.
        self._fast = False
        super().close()

    def _go_native(self) -> None:
        """Hand the open fast transaction to psycopg2's own handling.

        psycopg2 learns of a transaction only by sending ``BEGIN`` itself; inside an open one
        that BEGIN changes nothing but draws a warning, silenced here for that moment only.
        An aborted transaction accepts no statement, so it stays fast: psycopg2 then refuses
        what needs a transaction, where it would have reported the aborted transaction.
        """
        if self.get_transaction_status() != _INTRANS:
            return
        with ext.cursor(self) as cursor:
            cursor.execute(_QUIET)
            old = cursor.fetchone()[0]
            self._fast = False
            _base_autocommit.__set__(self, False)
            cursor.execute(_RESTORE, (old,))

    # -- what psycopg2 reports inside a transaction ---------------------------------------------

    @property
    def status(self) -> int:
        return ext.STATUS_BEGIN if self._fast else _base_status.__get__(self)

    @property
    def autocommit(self) -> bool:
        return False if self._fast else bool(_base_autocommit.__get__(self))

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._refuse_inside_transaction("set_session")
        _base_autocommit.__set__(self, value)

    # ext.connection's other setters are C descriptors: override them the same way.
    @property
    def readonly(self) -> bool | None:
        return t.cast("bool | None", ext.connection.readonly.__get__(self))

    @readonly.setter
    def readonly(self, value: t.Any) -> None:
        self._refuse_inside_transaction("set_session")
        ext.connection.readonly.__set__(self, value)

    @property
    def deferrable(self) -> bool | None:
        return t.cast("bool | None", ext.connection.deferrable.__get__(self))

    @deferrable.setter
    def deferrable(self, value: t.Any) -> None:
        self._refuse_inside_transaction("set_session")
        ext.connection.deferrable.__set__(self, value)

    @property
    def isolation_level(self) -> int | None:
        return t.cast("int | None", ext.connection.isolation_level.__get__(self))

    @isolation_level.setter
    def isolation_level(self, value: t.Any) -> None:
        self._refuse_inside_transaction("set_session")
        ext.connection.isolation_level.__set__(self, value)

    def _refuse_inside_transaction(self, command: str) -> None:
        # psycopg2 checks for a closed connection first; it raises that error itself.
        if self._fast and not self.closed:
            raise psycopg2.ProgrammingError(f"{command} cannot be used inside a transaction")

    def set_session(self, *args: t.Any, **kwargs: t.Any) -> None:
        self._refuse_inside_transaction("set_session")
        super().set_session(*args, **kwargs)

    def tpc_begin(self, xid: t.Any) -> None:
        self._refuse_inside_transaction("tpc_begin")
        super().tpc_begin(xid)

    def set_isolation_level(self, level: t.Any) -> None:
        # psycopg2 validates the level, then ends the transaction, then sets it.
        if self._fast and not self.closed and _valid_level(level):
            self.rollback()
        super().set_isolation_level(level)

    def set_client_encoding(self, encoding: t.Any) -> None:
        # psycopg2 ends the transaction only when the encoding actually changes.
        if self._fast and not self.closed and isinstance(encoding, str):
            if _clean_encoding(encoding) != self.encoding:
                self.rollback()
        super().set_client_encoding(encoding)

    def reset(self) -> None:
        if self._fast and not self.closed:
            self.rollback()
        super().reset()

    # -- calls whose behaviour depends on psycopg2's own transaction state ----------------------

    def cursor(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        name = args[0] if args else kwargs.get("name")
        if self._fast and name is not None:
            self._go_native()
        return super().cursor(*args, **kwargs)

    def lobject(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        if self._fast:
            self._go_native()
            if self._fast:  # aborted: report it as psycopg2 would, from the server
                with ext.cursor(self) as cursor:
                    cursor.execute("SELECT 1")
        return super().lobject(*args, **kwargs)

    def tpc_prepare(self) -> None:
        if self._fast:
            self._go_native()
        super().tpc_prepare()

    def tpc_commit(self, *args: t.Any) -> None:
        if self._fast:
            self._go_native()
        super().tpc_commit(*args)

    def tpc_rollback(self, *args: t.Any) -> None:
        if self._fast:
            self._go_native()
        super().tpc_rollback(*args)


def _valid_level(level: t.Any) -> bool:
    try:
        return 0 <= operator.index(level) <= 4
    except TypeError:
        return False


def _clean_encoding(name: str) -> str:
    # psycopg2's clear_encoding_name(): keep letters and digits, upper case.
    return re.sub(r"[^A-Za-z0-9]", "", name).upper()


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


def _on_execute(
    cursor: t.Any, statement: t.Any, parameters: t.Any, context: t.Any
) -> bool:
    connection = cursor.connection
    if not (isinstance(connection, NeonConnection) and connection.opens_transaction()):
        return False
    if _one_plain_statement(cursor, statement):
        connection.execute_with_begin(cursor, statement, parameters)
        return True
    connection.begin()
    return False


def _on_execute_no_params(cursor: t.Any, statement: t.Any, context: t.Any) -> bool:
    return _on_execute(cursor, statement, None, context)


def _on_executemany(
    cursor: t.Any, statement: t.Any, parameters: t.Any, context: t.Any
) -> bool:
    connection = cursor.connection
    if isinstance(connection, NeonConnection) and connection.opens_transaction():
        connection.begin()
    return False


def install(engine: sa.Engine) -> None:
    """Open the transactions of ``engine``'s :class:`NeonConnection` s with their first statement."""
    event.listen(engine, "do_execute", _on_execute)
    event.listen(engine, "do_execute_no_params", _on_execute_no_params)
    event.listen(engine, "do_executemany", _on_executemany)
