"""psycopg (3): how its transactions are opened with their first statement, ended without
waiting, and read -- with psycopg's public API only.

psycopg keeps no transaction flag of its own: its implicit ``BEGIN``, ``commit()`` and
``rollback()`` read libpq's transaction status (``connection.pgconn``). It sends ``BEGIN``
before a statement when the connection is not in autocommit and libpq says "idle", and waits
for its answer, also in pipeline mode (psycopg issue 309). So the first statement's ``BEGIN``
is sent here instead: the connection is switched to autocommit (allowed while idle, no I/O),
and ``BEGIN``, the setup and the statement go in one pipeline, one round trip, each a command of
its own (the extended protocol: the statement's text is its own, so its errors, positions and
notices are exactly psycopg's). An error leaves the transaction aborted, as psycopg's own path
does: nothing to replay. psycopg gets its autocommit back once the transaction has ended: at
SQLAlchemy's commit or rollback, at the next statement, or after the ROLLBACK sent without
waiting. Until then, code on the raw DBAPI connection reads ``autocommit`` as True, and a
transaction that code ends on the raw connection itself leaves psycopg in autocommit until
flask-neon sees the connection again (docs/fast-begin.md: psycopg has no public hook there).

A statement sent without parameters goes in the extended protocol here (a pipeline has no
other), where psycopg's own path uses the simple one: the only text they read differently,
``$1``-style parameters, does not open plainly (``_statements``). A session the server ends
while the pipeline runs: psycopg reads past the server's error to the closed connection (on a
direct connection it then raises the loss, documented), or stops before it and cannot leave
pipeline mode (through PgBouncer): there the server's error is raised and the connection read
until closed, as psycopg's own path leaves it.
"""

from __future__ import annotations

import re
import time
import typing as t
import weakref

import psycopg
from psycopg import pq
from psycopg.rows import tuple_row

from .._liveness import wait_readable, wait_writable
from . import _psycopg_wire as _wire
from . import begin_statement

name = "psycopg"

#: Always: psycopg's public API is enough.
FAST_BEGIN = True
NOWAIT_ROLLBACK = True
#: psycopg does not count transactions: flask-neon counts the ones SQLAlchemy ends.
COUNTS_TRANSACTIONS = False

_IDLE = pq.TransactionStatus.IDLE
_OPEN = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)
#: The connections switched to autocommit by :func:`execute_first`, until psycopg gets its own
#: setting back (:func:`_give_back_autocommit`).
_switched: weakref.WeakSet[psycopg.Connection[t.Any]] = weakref.WeakSet()
#: Transactions psycopg ended, by connection (:func:`transaction_id`).
_ended: weakref.WeakKeyDictionary[psycopg.Connection[t.Any], int] = weakref.WeakKeyDictionary()


def owns(dbapi_connection: t.Any) -> bool:
    """True for a psycopg connection (of any class)."""
    return isinstance(dbapi_connection, psycopg.Connection)


def _give_back_autocommit(connection: psycopg.Connection[t.Any]) -> None:
    # The transaction execute_first opened has ended: psycopg's autocommit is off again.
    if connection in _switched and connection.pgconn.transaction_status == _IDLE:
        _switched.discard(connection)
        connection.autocommit = False


def transaction_ended(connection: t.Any) -> None:
    """SQLAlchemy committed or rolled back ``connection``'s transaction."""
    if owns(connection) and not connection.closed:
        _ended[connection] = _ended.get(connection, 0) + 1
        _give_back_autocommit(connection)


def opens_transaction(connection: t.Any) -> bool:
    """True when psycopg would send ``BEGIN`` before the next statement."""
    if connection.closed:
        return False
    _give_back_autocommit(connection)
    if connection.autocommit or connection.pgconn.transaction_status != _IDLE:
        return False
    _ended[connection] = _ended.get(connection, 0) + 1  # whatever was open has ended
    return True


def client_in_transaction(connection: t.Any) -> bool:
    """True when a transaction is open (psycopg reads libpq's status: as the server says)."""
    return not connection.closed and connection.pgconn.transaction_status in _OPEN


server_in_transaction = client_in_transaction


def in_autocommit(connection: t.Any) -> bool:
    """True when each statement commits by itself (not while fast BEGIN's transaction runs)."""
    return bool(connection.autocommit) and connection not in _switched


def transaction_id(connection: t.Any) -> int:
    """A number that changes when a transaction ended, as far as flask-neon saw it end
    (SQLAlchemy's commits and rollbacks, an idle connection at a statement; not a ``commit()``
    on the raw DBAPI connection followed by a statement there)."""
    return _ended.get(connection, 0)


def plain_cursor(cursor: t.Any) -> bool:
    """True for psycopg's own client-side cursor class, outside a pipeline of the app's."""
    return type(cursor) is psycopg.Cursor and (
        cursor.connection.pgconn.pipeline_status == pq.PipelineStatus.OFF
    )


def green() -> bool:
    """psycopg waits through Python's selectors: gevent's patched ones serve it as well."""
    return False


# -- opening a transaction -----------------------------------------------------------------------


def _begin_sql(connection: psycopg.Connection[t.Any]) -> str:
    # The BEGIN psycopg would send, from its own session characteristics.
    level = connection.isolation_level
    isolation = level.name.replace("_", " ") if level is not None else None
    return begin_statement(isolation, connection.read_only, connection.deferrable)


def begin_then(
    connection: t.Any,
    setup: t.Sequence[str],
    cursor: t.Any = None,
    statement: t.Any = None,
    parameters: t.Any = None,
) -> None:
    """psycopg's way: let it send ``BEGIN``, then run the ``setup`` statements. (psycopg sends
    its ``BEGIN`` before it looks at a statement's parameters: the statement is not needed.)"""
    for command in setup:
        connection.execute(command, prepare=False)


def execute_first(
    cursor: t.Any, statement: str, parameters: t.Any, setup: t.Sequence[str]
) -> None:
    """Run a transaction's first statement with its ``BEGIN`` and ``setup`` in one round trip.

    The caller checked that the statement is one that may (``_statements.opens_plainly``) on a
    :func:`plain_cursor`, with psycopg about to send ``BEGIN``. Raises what psycopg raises.

    psycopg ends a pipeline with Sync then Flush, and the server arms
    ``idle_in_transaction_session_timeout`` only when it answers a Sync, and disarms it at
    the Flush: the transaction left idle after the pipeline would never time out. So the
    pipeline ends with ``SHOW idle_in_transaction_session_timeout``; where a timeout is in
    force the server is sent one more Sync, whose answer arms it (a round trip: psycopg's own
    BEGIN costs as much), and the connection's next transactions are opened psycopg's way, as
    are those whose setup sets a timeout.
    """
    connection: psycopg.Connection[t.Any] = cursor.connection
    if connection in _idle_timeout or _sets_idle_timeout(setup):
        begin_then(connection, setup)
        cursor.execute(statement, parameters)
        return
    begin = _begin_sql(connection)
    connection.autocommit = True  # psycopg sends no BEGIN of its own now
    _switched.add(connection)
    probe = psycopg.Cursor(connection, row_factory=tuple_row)
    try:
        with connection.pipeline():
            # flask-neon's own commands are never prepared (nor counted towards it), and go
            # on psycopg's own cursor class, whatever the connection's factories.
            _command(connection, begin)
            for command in setup:
                _command(connection, command)
            cursor.execute(statement, parameters)
            probe.execute(_SHOW_IDLE_TIMEOUT, prepare=False)
    except BaseException as exc:
        probe.close()
        if connection.broken:
            _wire.leave_pipeline_mode(connection)
        elif connection.pgconn.pipeline_status != pq.PipelineStatus.OFF:
            # psycopg could not leave pipeline mode: it stopped reading after an error that
            # ended the session (a FATAL one, e.g. pg_terminate_backend through PgBouncer), and
            # raised its failure to leave instead. Its own path reads on to the closed
            # connection and raises the server's error.
            fatal = _wire.ending_error(exc)
            if fatal is None:
                connection.close()  # left in pipeline mode, busy: of no use to anyone
            else:
                _wire.read_until_closed(connection)
                _wire.leave_pipeline_mode(connection)
                raise fatal.with_traceback(None) from None
        elif connection.pgconn.transaction_status in _OPEN:
            # Whether a timeout is in force is not known: as if it were.
            _wire.arm_idle_timeout(connection)
        _give_back_autocommit(connection)  # if nothing began: the connection is as it was
        raise
    row = probe.fetchone()
    probe.close()
    if row is None or row[0] != "0":
        _idle_timeout.add(connection)
        _wire.arm_idle_timeout(connection)


def _command(connection: psycopg.Connection[t.Any], command: str) -> None:
    psycopg.Cursor(connection).execute(command, prepare=False)


_SHOW_IDLE_TIMEOUT = "SHOW idle_in_transaction_session_timeout"
#: Connections whose session has an idle-in-transaction timeout (:func:`execute_first`).
_idle_timeout: weakref.WeakSet[psycopg.Connection[t.Any]] = weakref.WeakSet()
_SETS_NO_IDLE_TIMEOUT = re.compile(
    r"\s*SET\s+LOCAL\s+idle_in_transaction_session_timeout\s*(=|TO)\s*'?0'?\s*$", re.IGNORECASE
)


def _sets_idle_timeout(setup: t.Sequence[str]) -> bool:
    """True when a setup statement may set an idle-in-transaction timeout."""
    return any(
        "idle_in_transaction_session_timeout" in command.lower()
        and not _SETS_NO_IDLE_TIMEOUT.match(command)
        for command in setup
    )


# -- ending a transaction without waiting --------------------------------------------------------


def send_rollback(connection: t.Any) -> bool:
    """Send ``ROLLBACK`` without waiting for its reply; True when it was sent.

    Only where psycopg's own ``rollback()`` would send nothing but ``ROLLBACK``: not with
    prepared statements (it also deallocates them after a rollback), nor in a pipeline or a
    ``transaction()`` block of the app's. psycopg reads libpq's status, so its ``rollback()``
    must not run until the reply is in (the pool keeps the connection aside until then).
    """
    if (
        connection.closed
        or connection.prepare_threshold is not None
        or connection.pgconn.transaction_status not in _OPEN
        or connection.pgconn.pipeline_status != pq.PipelineStatus.OFF
    ):
        return False
    pgconn = connection.pgconn
    try:
        pgconn.send_query(b"ROLLBACK")
        while pgconn.flush():  # psycopg runs libpq non-blocking: send it all
            wait_writable(pgconn.socket, 1.0)
    except psycopg.Error:
        return False  # psycopg's rollback() meets the same broken connection and reports it
    return True


def rollback_reply(connection: t.Any, wait: float) -> str | None:
    """Read the reply of the ROLLBACK in flight, waiting up to ``wait`` seconds for it.

    None: not there yet. "": the transaction has ended (and psycopg has its autocommit
    back). Otherwise what went wrong.
    """
    pgconn = connection.pgconn
    deadline = time.monotonic() + wait
    failure = ""
    try:
        while True:
            while pgconn.is_busy():
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    wait_readable(pgconn.socket, remaining)
                pgconn.consume_input()
                if remaining <= 0 and pgconn.is_busy():
                    return None
            result = pgconn.get_result()
            if result is None:
                break
            if result.status != pq.ExecStatus.COMMAND_OK:
                failure = (result.error_message or b"").decode(errors="replace").strip()
    except psycopg.Error as exc:
        return str(exc).strip() or "the connection failed"
    if not failure and pgconn.transaction_status != _IDLE:
        failure = "the transaction did not end"
    if not failure:
        _give_back_autocommit(connection)
    return failure
