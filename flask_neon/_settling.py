"""The ROLLBACK after a response, sent without waiting for its reply.

A request's transaction with nothing to commit ends after its response has been handed to the
WSGI server (``_request``). psycopg2's ``rollback()`` would still keep the worker thread until
the server's reply, a round trip: a keep-alive client's next request waits for it. Here the
``ROLLBACK`` is sent with libpq's ``PQsendQuery`` and the thread goes on; psycopg2's books are
kept as its own ``rollback()`` keeps them (the transaction flag, and the count of ended
transactions that makes the transaction's named cursors invalid), so the rollbacks SQLAlchemy
and the pool run next send nothing.

The connection is not given back to the pool before its reply has come: :class:`SettlingQueuePool`
keeps it aside (counted as checked out) and reads the reply when it arrives, at the next
checkout or statistics call; it hands out a connection whose reply is still due only
when waiting for it costs less than opening one, and waits for it then, bounded by the pool
timeout. A failed ``ROLLBACK``, or no reply within the pool timeout, discards the connection.

Only for the rollback of a request's sessions after its response (:func:`after_response`), and
only on a plain psycopg2 connection (no wait callback: gevent and eventlet keep psycopg2's way).
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import threading
import time
import typing as t

import psycopg2.extensions as ext  # type: ignore[import-untyped]
import sqlalchemy as sa
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from . import driver
from ._liveness import wait_readable

log = logging.getLogger("flask_neon")

#: ``record.info`` key: when the ROLLBACK without a reply yet was sent (``time.monotonic()``).
_SENT = "flask_neon.rollback_sent"
_AFTER_RESPONSE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "flask_neon_after_response", default=False
)
_PGRES_COMMAND_OK = 1
_PQTRANS_IDLE, _PQTRANS_INTRANS, _PQTRANS_INERROR = 0, 2, 3


def _libpq() -> t.Any:
    """psycopg2's own libpq (the one that made its connections), or None."""
    try:
        import psycopg2._psycopg as module  # type: ignore[import-untyped]

        # PyDLL: calls keep the GIL. Each is a few microseconds and never blocks (the wait
        # for a reply is a poll()); CDLL would release and retake the GIL per call, and
        # under load every release lets another request thread in.
        lib = ctypes.PyDLL(module.__file__)
        pointer = ctypes.c_void_p
        for name, result, arguments in (
            ("PQsendQuery", ctypes.c_int, [pointer, ctypes.c_char_p]),
            ("PQconsumeInput", ctypes.c_int, [pointer]),
            ("PQisBusy", ctypes.c_int, [pointer]),
            ("PQgetResult", pointer, [pointer]),
            ("PQresultStatus", ctypes.c_int, [pointer]),
            ("PQresultErrorMessage", ctypes.c_char_p, [pointer]),
            ("PQclear", None, [pointer]),
            ("PQtransactionStatus", ctypes.c_int, [pointer]),
            ("PQerrorMessage", ctypes.c_char_p, [pointer]),
        ):
            function = getattr(lib, name)
            function.restype, function.argtypes = result, arguments
    except (OSError, AttributeError, ImportError):
        return None
    return lib


_LIB = _libpq()
#: True when a ROLLBACK can be sent without waiting (psycopg2's flag and libpq were found).
AVAILABLE = driver.AVAILABLE and driver.CAN_END_TRANSACTIONS and _LIB is not None


class after_response:  # noqa: N801 - used as a function: ``with after_response():``
    """Inside: a rollback of a transaction sends its ROLLBACK without waiting for the reply.

    A class rather than a generator-based context manager: it runs once per request.
    """

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _AFTER_RESPONSE.set(True)

    def __exit__(self, *exc_info: object) -> None:
        _AFTER_RESPONSE.reset(self._token)


def install(engine: sa.Engine) -> None:
    """Send ``engine``'s rollbacks after a response without waiting (its pool must settle).

    Through the engine's own dialect, the one that SQLAlchemy's connections and the pool's
    reset call for every rollback, rather than a ``rollback`` event: one connection-level
    listener would put every statement of every request on SQLAlchemy's event path (seven
    dispatches a request, a tenth of its CPU on loopback).
    """
    if not (AVAILABLE and isinstance(engine.pool, SettlingQueuePool)):
        return
    dbapi_rollback = engine.dialect.do_rollback

    def do_rollback(dbapi_connection: PoolProxiedConnection) -> None:
        if _AFTER_RESPONSE.get():
            _send_rollback(dbapi_connection)
        dbapi_rollback(dbapi_connection)  # after a ROLLBACK sent: psycopg2 sends nothing

    engine.dialect.do_rollback = do_rollback  # type: ignore[method-assign]


def _send_rollback(proxied: PoolProxiedConnection) -> None:
    if ext.get_wait_callback() is not None:
        return
    dbapi_connection: t.Any = proxied.dbapi_connection
    if not driver.transaction_flag_is(dbapi_connection, ext.STATUS_BEGIN):
        return
    pgconn = ctypes.c_void_p(dbapi_connection.pgconn_ptr)
    if _LIB.PQtransactionStatus(pgconn) not in (_PQTRANS_INTRANS, _PQTRANS_INERROR):
        return
    if _LIB.PQsendQuery(pgconn, b"ROLLBACK") != 1:
        return  # psycopg2's rollback() meets the same broken connection and reports it
    driver.end_transaction(dbapi_connection)
    proxied.info[_SENT] = time.monotonic()


def _rollback_reply(dbapi_connection: t.Any, wait: float) -> str | None:
    """Read the reply of the ROLLBACK in flight, waiting up to ``wait`` seconds for it.

    None: not there yet. "": the transaction has ended. Otherwise what went wrong.
    """
    pgconn = ctypes.c_void_p(dbapi_connection.pgconn_ptr)
    deadline = time.monotonic() + wait
    failure = ""
    while True:
        # Read from the socket only while libpq lacks a whole message (PQgetResult would
        # block): one receive for a reply that is there, a poll() first when waiting.
        while _LIB.PQisBusy(pgconn):
            remaining = deadline - time.monotonic()
            if remaining > 0:  # returns at once when the reply is there
                wait_readable(dbapi_connection.fileno(), remaining)
            if not _LIB.PQconsumeInput(pgconn):
                return str(_LIB.PQerrorMessage(pgconn).decode(errors="replace")).strip()
            if remaining <= 0 and _LIB.PQisBusy(pgconn):
                return None
        result = _LIB.PQgetResult(pgconn)
        if not result:
            break
        if _LIB.PQresultStatus(result) != _PGRES_COMMAND_OK:
            failure = _LIB.PQresultErrorMessage(result).decode(errors="replace").strip()
        _LIB.PQclear(result)
    if not failure and _LIB.PQtransactionStatus(pgconn) != _PQTRANS_IDLE:
        failure = "the transaction did not end"
    return failure


class SettlingQueuePool(QueuePool):
    """A QueuePool that takes back connections whose ROLLBACK is in flight only once it ended."""

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._settling: list[ConnectionPoolEntry] = []
        self._settling_lock = threading.Lock()

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        # Its reply is not read here: sent a moment ago, it is rarely there yet, and the next
        # checkout reads it anyway (one read a request instead of one and a half).
        if _SENT in record.info:
            with self._settling_lock:
                # At capacity a thread may be waiting on the queue: it gets this one, once ended.
                if self._overflow < self._max_overflow or self._max_overflow < 0:
                    self._settling.append(record)
                    return
            self._settle(record, wait=self._timeout)
        super()._do_return_conn(record)

    def _do_get(self) -> ConnectionPoolEntry:
        self._reap()
        due = None
        if self._settling:
            with self._settling_lock:
                # Waiting for the rest of a round trip beats opening a connection (2-4 of
                # them), except while the pool has fewer than pool_size: a second one serves
                # one thread from then on while the other's ROLLBACK is in flight.
                if self._settling and self._pool.empty() and self._overflow >= 0:
                    due = self._settling.pop(0)
        if due is not None:
            self._settle(due, wait=self._timeout)
            return due
        return super()._do_get()

    def checkedout(self) -> int:
        """Connections in use, counting those whose ROLLBACK is in flight."""
        self._reap()
        return super().checkedout()

    def dispose(self) -> None:
        with self._settling_lock:
            settling, self._settling = self._settling, []
        for record in settling:
            record.info.pop(_SENT, None)
            record.close()
        super().dispose()

    def _reap(self) -> None:
        """Give back to the pool the connections whose reply has come."""
        if not self._settling:  # the common case, without the lock; a stale read waits a turn
            return
        with self._settling_lock:
            due: list[ConnectionPoolEntry] = []
            ended: list[ConnectionPoolEntry] = []
            for record in self._settling:
                (ended if self._settle(record, wait=0.0) else due).append(record)
            self._settling = due
        for record in ended:
            self._do_return_conn(record)

    def _settle(self, record: ConnectionPoolEntry, wait: float) -> bool:
        """True once ``record``'s ROLLBACK has ended (or failed: then it is invalidated).

        With ``wait``, always True: no reply within it is a failure.
        """
        sent = record.info[_SENT]
        dbapi_connection = record.dbapi_connection
        reply = "" if dbapi_connection is None else _rollback_reply(dbapi_connection, wait)
        if reply is None and not wait and time.monotonic() - sent < self._timeout:
            return False  # due, and not yet too late
        del record.info[_SENT]
        if reply != "":
            problem = reply or f"no reply within {self._timeout:g} s"
            log.warning(
                "flask-neon: the ROLLBACK after a response failed (%s); connection discarded",
                problem,
            )
            record.invalidate()
        return True
