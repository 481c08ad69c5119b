"""psycopg2: how its transactions are opened with their first statement, ended without waiting,
and read.

psycopg2 keeps one client-side fact about transactions, ``connection.status``
(``STATUS_READY`` / ``STATUS_BEGIN``): it sends ``BEGIN`` before a statement when the flag says
"ready", and ``commit()``, ``rollback()``, named cursors, ``with conn:``... all read it. It runs
every statement with libpq's ``PQexec`` (the simple-query protocol), so the only way to send
``BEGIN`` with the first statement is one message holding both:
``BEGIN [options]; <setup>;\\n<statement>``. The flag has no setter: it is a C field, written
through ``_psycopg2_c`` (:data:`FAST_BEGIN` is false when its place cannot be verified).
docs/fast-begin.md explains what is identical and why.

What the server reports about the statement must read as psycopg2's own: an error's position
counts from the start of the message, and libpq's excerpt of the failing line numbers lines
from there. The statement starts on a line of its own, so the excerpt is the statement's own
line under a number one too high: :func:`_restore_positions` puts back the number, and the
position psycopg2's ``diag`` reads (in the error's libpq result, through libpq's own
``PQresultErrorField``).
"""

from __future__ import annotations

import re
import time
import typing as t

import psycopg2  # type: ignore[import-untyped]
import psycopg2.extensions as ext  # type: ignore[import-untyped]

from .._liveness import wait_readable
from . import _psycopg2_c as c
from . import begin_statement

name = "psycopg2"

#: True when a transaction can be opened with its first statement, psycopg2's books kept and
#: the server's report of a failing statement read as psycopg2's own (``_psycopg2_c``).
FAST_BEGIN = c.FOUND
#: True when a ROLLBACK can be sent without waiting for its reply.
NOWAIT_ROLLBACK = c.FOUND
#: psycopg2 counts the transactions it ends (``mark``): :func:`transaction_id` reads it.
COUNTS_TRANSACTIONS = True

# How psycopg2 spells BEGIN's options (psycopg/pqpath.c, pq_begin_locked).
_ISOLATION = {1: "READ COMMITTED", 2: "REPEATABLE READ", 3: "SERIALIZABLE", 4: "READ UNCOMMITTED"}
# SQLSTATE classes of a message the server rejected as text, before running any of it.
_REJECTED_TEXT = ("42", "22", "54", "0A")
_PGRES_COMMAND_OK = 1
_PQTRANS_IDLE, _PQTRANS_INTRANS, _PQTRANS_INERROR = 0, 2, 3


# -- reading a connection ------------------------------------------------------------------------


def owns(dbapi_connection: t.Any) -> bool:
    """True for a psycopg2 connection (of any class)."""
    return isinstance(dbapi_connection, ext.connection)


def opens_transaction(connection: t.Any) -> bool:
    """True when psycopg2 would send ``BEGIN`` before the next statement."""
    return (
        not connection.closed
        and not connection.autocommit
        and connection.status == ext.STATUS_READY
    )


def client_in_transaction(connection: t.Any) -> bool:
    """True when psycopg2 believes a transaction is open (it sends no ``BEGIN`` now)."""
    return (
        not connection.closed
        and not connection.autocommit
        and connection.status == ext.STATUS_BEGIN
    )


def transaction_ended(connection: t.Any) -> None:
    """SQLAlchemy committed or rolled back: psycopg2 counts that itself (``mark``)."""


def in_autocommit(connection: t.Any) -> bool:
    """True when each statement commits by itself (no transaction to put anything in)."""
    return bool(connection.autocommit)


def transaction_id(connection: t.Any) -> int:
    """A number that changes whenever psycopg2 ends a transaction (its count of them)."""
    return c.mark(connection)


def server_in_transaction(connection: t.Any) -> bool:
    """True when libpq last heard the server say a transaction is open (no I/O)."""
    return connection.closed == 0 and connection.get_transaction_status() in (
        ext.TRANSACTION_STATUS_INTRANS,
        ext.TRANSACTION_STATUS_INERROR,
    )


def plain_cursor(cursor: t.Any) -> bool:
    """True for psycopg2's own unnamed cursor class.

    Another cursor class may read or rewrite the SQL it is given (a tracing tool records it):
    it must see the statement as written. A named cursor's statement psycopg2 wraps in
    ``DECLARE``. And psycopg2 must keep its notices in a list of its own, which a failed first
    statement's notices can be taken back from.
    """
    return (
        type(cursor) is ext.cursor
        and cursor.name is None
        and type(cursor.connection.notices) is list
    )


def green() -> bool:
    """True when psycopg2 waits through a callback (gevent, eventlet), not in libpq."""
    return ext.get_wait_callback() is not None


# -- opening a transaction -----------------------------------------------------------------------


def _begin_sql(connection: t.Any) -> str:
    # The BEGIN psycopg2 would send, built from its own validated session characteristics.
    isolation = _ISOLATION.get(connection.isolation_level)
    return begin_statement(isolation, connection.readonly, connection.deferrable)


def begin_then(
    connection: t.Any,
    setup: t.Sequence[str],
    cursor: t.Any = None,
    statement: t.Any = None,
    parameters: t.Any = None,
) -> None:
    """psycopg2's way: let it send ``BEGIN``, then run the ``setup`` statements.

    psycopg2 merges a statement's parameters before it sends ``BEGIN``: a statement about to
    follow (``cursor``, ``statement``, ``parameters``) that it would refuse in the client (a
    missing parameter, a NUL) is refused here before anything is sent, as it would be.
    """
    if not setup:
        return
    if cursor is not None and parameters is not None and isinstance(statement, str):
        cursor.mogrify(statement, parameters)
    with ext.cursor(connection) as setup_cursor:
        # One message; no parameters: psycopg2 leaves every % as it is.
        setup_cursor.execute("; ".join(setup))


def execute_first(
    cursor: t.Any, statement: str, parameters: t.Any, setup: t.Sequence[str]
) -> None:
    """Run a transaction's first statement with its ``BEGIN`` and ``setup`` in one message.

    The caller checked that the statement is one that may (``_statements.opens_plainly``) on a
    :func:`plain_cursor`, with psycopg2 about to send ``BEGIN``. Raises what psycopg2 raises.
    """
    connection = cursor.connection
    prefix = "; ".join([_begin_sql(connection), *setup]) + ";\n"
    sent = prefix.replace("%", "%%") if parameters is not None else prefix
    notices: list[str] = connection.notices
    notices_before = notices[:]
    c.set_status(connection, ext.STATUS_BEGIN)
    try:
        cursor.execute(sent + statement, parameters)
    except BaseException as exc:
        if not _replay_after(connection, exc):
            _restore_positions(exc, cursor, len(notices_before), len(prefix))
            raise
    else:
        if len(notices) > len(notices_before):
            _restore_positions(None, cursor, len(notices_before), len(prefix))
        return
    # The server rejected the message's text before running any of it: psycopg2's own way
    # meets the same rejection after its BEGIN, and leaves the transaction as psycopg2 does.
    # Outside the except block, so that the exception psycopg2 raises is not chained.
    notices[:] = notices_before
    begin_then(connection, setup, cursor, statement, parameters)
    cursor.execute(statement, parameters)


def _replay_after(connection: t.Any, exc: BaseException) -> bool:
    """Put psycopg2's flag where its own ``BEGIN`` would have; True when to run it its way.

    Only when nothing of the message ran (no transaction began: ``BEGIN`` is its first
    statement) because psycopg2 refused it before sending (its parameters), or the server
    rejected its text: a syntax error, an encoding error. An error
    that arrived after the server began to run or to wait in the statement is never followed by
    a second execution; nor is one the server sent for another reason before anything ran (a
    cancel, a shutdown), which psycopg2's own ``BEGIN`` would have met.
    """
    if connection.closed:
        # Lost while the message was on its way or running: psycopg2's own BEGIN would have
        # been answered before (its connection was alive a moment ago), so its flag says a
        # transaction is open.
        return False
    status = connection.get_transaction_status()
    if status == ext.TRANSACTION_STATUS_IDLE:
        c.set_status(connection, ext.STATUS_READY)
        code = exc.pgcode if isinstance(exc, psycopg2.Error) else None
        if code is None:
            # Refused in the client (merging the parameters): nothing was sent. psycopg2 merges
            # before its BEGIN, and its message counts from the statement's start.
            return isinstance(exc, Exception)
        return code[:2] in _REJECTED_TEXT
    if status not in (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR):
        c.set_status(connection, ext.STATUS_READY)
    return False


# -- what the server reported about the statement ------------------------------------------------

# libpq's excerpt after the first line of a message: "LINE <n>: <text>\n<spaces>^\n".
_EXCERPT = re.compile(r"([^\n\d]*)(\d+)(: )([^\n]*)\n( *)\^\n")


def _restore_positions(
    exc: BaseException | None, cursor: t.Any, seen: int, prefix_length: int
) -> None:
    """Make the error and the notices after the first ``seen`` read as if the statement had
    been sent alone."""
    notices: list[str] = cursor.connection.notices
    sent = _sent_text(cursor)
    for index in range(seen, len(notices)):
        notices[index] = _renumber(notices[index], notices[index].find("\n") + 1, sent)
    if not isinstance(exc, psycopg2.Error) or not exc.pgerror:
        return
    position = exc.diag.statement_position
    primary = exc.diag.message_primary
    if position is None or primary is None or int(position) <= prefix_length:
        return  # no position, or one in the setup flask-neon sent (not psycopg2's to show)
    pgerror = exc.pgerror
    start = pgerror.find(primary)
    if start < 0:
        return
    renumbered = _renumber(pgerror, start + len(primary) + 1, sent)
    if renumbered is pgerror or not c.set_result_position(exc, int(position) - prefix_length):
        return
    c.set_pgerror(exc, renumbered)
    if exc.args and isinstance(exc.args[0], str):
        text = exc.args[0]
        exc.args = (_renumber(text, text.find(primary) + len(primary) + 1, sent), *exc.args[1:])


def _sent_text(cursor: t.Any) -> str:
    """The message as psycopg2 sent it (parameters merged), as the server read it."""
    query = cursor.query
    if not isinstance(query, bytes):
        return ""
    encoding = ext.encodings.get(cursor.connection.encoding, "utf-8")
    return query.decode(encoding, errors="replace")


def _renumber(message: str, at: int, sent: str) -> str:
    """``message`` with libpq's excerpt at ``at`` numbered from the statement's first line.

    Only an excerpt of the statement's own text (not of a function's query, which has its own
    numbering) is renumbered; ``message`` itself is returned when there is none.
    """
    if at <= 0:
        return message
    match = _EXCERPT.match(message, at)
    if match is None:
        return message
    label, number, colon, excerpt, spaces = match.groups()
    line = int(number)
    lines = sent.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if line < 2 or line > len(lines):
        return message
    shown = excerpt.removeprefix("...").removesuffix("...")
    if shown not in lines[line - 1].replace("\t", " "):
        return message
    # The caret sits under the excerpt, after "LINE <n>: ": one column less with one digit less.
    shift = len(number) - len(str(line - 1))
    renumbered = f"{label}{line - 1}{colon}{excerpt}\n{spaces[shift:]}^\n"
    return message[: match.start()] + renumbered + message[match.end() :]


# -- ending a transaction without waiting --------------------------------------------------------


def send_rollback(connection: t.Any) -> bool:
    """Send ``ROLLBACK`` without waiting for its reply, and keep psycopg2's books as its own
    ``rollback()`` does; True when it was sent. Nothing is sent for a connection psycopg2
    would not roll back itself, nor under a wait callback."""
    if (
        green()
        or connection.closed
        or connection.autocommit
        or connection.status != ext.STATUS_BEGIN
    ):
        return False
    pgconn = c.pointer(connection.pgconn_ptr)
    if c.LIB.PQtransactionStatus(pgconn) not in (_PQTRANS_INTRANS, _PQTRANS_INERROR):
        return False
    if c.LIB.PQsendQuery(pgconn, b"ROLLBACK") != 1:
        return False  # psycopg2's rollback() meets the same broken connection and reports it
    c.end_transaction(connection)
    return True


def rollback_reply(connection: t.Any, wait: float) -> str | None:
    """Read the reply of the ROLLBACK in flight, waiting up to ``wait`` seconds for it.

    None: not there yet. "": the transaction has ended. Otherwise what went wrong.
    """
    pgconn = c.pointer(connection.pgconn_ptr)
    deadline = time.monotonic() + wait
    failure = ""
    while True:
        # Read from the socket only while libpq lacks a whole message (PQgetResult would
        # block): one receive for a reply that is there, a poll() first when waiting.
        while c.LIB.PQisBusy(pgconn):
            remaining = deadline - time.monotonic()
            if remaining > 0:  # returns at once when the reply is there
                wait_readable(connection.fileno(), remaining)
            if not c.LIB.PQconsumeInput(pgconn):
                return str(c.LIB.PQerrorMessage(pgconn).decode(errors="replace")).strip()
            if remaining <= 0 and c.LIB.PQisBusy(pgconn):
                return None
        result = c.LIB.PQgetResult(pgconn)
        if not result:
            break
        if c.LIB.PQresultStatus(result) != _PGRES_COMMAND_OK:
            failure = c.LIB.PQresultErrorMessage(result).decode(errors="replace").strip()
        c.LIB.PQclear(result)
    if not failure and c.LIB.PQtransactionStatus(pgconn) != _PQTRANS_IDLE:
        failure = "the transaction did not end"
    return failure
