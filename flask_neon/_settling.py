"""The ROLLBACK after a response, sent without waiting for its reply.

A request's transaction with nothing to commit ends after its response has been handed to the
WSGI server (``_request``). psycopg2's ``rollback()`` would still keep the worker thread until
the server's reply, a round trip: a keep-alive client's next request waits for it. Here the
``ROLLBACK`` is sent without waiting (``_drivers``: libpq's ``PQsendQuery``) and the thread goes
on; the driver's books are kept as its own ``rollback()`` keeps them, so the rollbacks
SQLAlchemy and the pool run next send nothing.

The connection is not given back to the pool before its reply has come: :class:`SettlingQueuePool`
keeps it aside (counted as checked out) and reads the reply when it arrives, at the next
checkout or statistics call; it hands out a connection whose reply is still due only
when waiting for it costs less than opening one, and waits for it then, bounded by the pool
timeout. A failed ``ROLLBACK``, or no reply within the pool timeout, discards the connection.

Only for the rollback of a request's sessions after its response (:func:`after_response`), and
only where the driver can (``_drivers``: psycopg2 without a wait callback; under gevent and
eventlet the driver's own rollback runs).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import typing as t

import sqlalchemy as sa
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from ._drivers import Driver

log = logging.getLogger("flask_neon")

#: ``record.info`` key: when the ROLLBACK without a reply yet was sent (``time.monotonic()``).
_SENT = "flask_neon.rollback_sent"
_AFTER_RESPONSE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "flask_neon_after_response", default=False
)


class after_response:  # noqa: N801 - used as a function: ``with after_response():``
    """Inside: a rollback of a transaction sends its ROLLBACK without waiting for the reply.

    A class rather than a generator-based context manager: it runs once per request.
    """

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _AFTER_RESPONSE.set(True)

    def __exit__(self, *exc_info: object) -> None:
        _AFTER_RESPONSE.reset(self._token)


def install(engine: sa.Engine, driver: Driver) -> None:
    """Send ``engine``'s rollbacks after a response without waiting (its pool must settle).

    Through the engine's own dialect, the one that SQLAlchemy's connections and the pool's
    reset call for every rollback, rather than a ``rollback`` event: one connection-level
    listener would put every statement of every request on SQLAlchemy's event path (seven
    dispatches a request, a tenth of its CPU on loopback).
    """
    if not (driver.NOWAIT_ROLLBACK and isinstance(engine.pool, SettlingQueuePool)):
        return
    engine.pool.driver = driver
    dbapi_rollback = engine.dialect.do_rollback

    def do_rollback(dbapi_connection: PoolProxiedConnection) -> None:
        if _AFTER_RESPONSE.get():
            if _SENT in dbapi_connection.info:
                # The pool's reset after the session's own rollback: the ROLLBACK in flight
                # ends the transaction (psycopg 3 would send another while libpq awaits its
                # reply; psycopg2 would send nothing).
                return
            if driver.send_rollback(dbapi_connection.dbapi_connection):
                # The pool reads the reply before the connection is used again.
                dbapi_connection.info[_SENT] = time.monotonic()
                return
        dbapi_rollback(dbapi_connection)

    engine.dialect.do_rollback = do_rollback  # type: ignore[method-assign]


class SettlingQueuePool(QueuePool):
    """A QueuePool that takes back connections whose ROLLBACK is in flight only once it ended."""

    #: The driver that sent the ROLLBACKs (set by :func:`install`).
    driver: Driver | None = None

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

    def recreate(self) -> QueuePool:
        pool = t.cast(SettlingQueuePool, super().recreate())
        pool.driver = self.driver  # engine.dispose() and the fork hook make a new pool
        return pool

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
        driver = self.driver
        reply = (
            ""
            if dbapi_connection is None or driver is None
            else driver.rollback_reply(dbapi_connection, wait)
        )
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
