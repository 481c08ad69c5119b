"""The liveness check of a pooled connection at checkout: a round trip only when it is needed.

A server that terminates a backend (restart, ``pg_terminate_backend``, a suspended compute)
sends an error and closes the socket, so the socket of a dead idle connection is readable:
``poll()`` with no timeout finds it for the price of a system call. Only a connection idle
longer than ``DB_PING_AFTER_IDLE`` (when the peer may have vanished without a word) or one with
unexpected input is pinged. A connection that fails is invalidated before it is handed out, and
the pool's caller opens a fresh one in its place (as after a ``DisconnectionError`` raised
from a checkout listener, without putting every checkout on SQLAlchemy's event path). One that
SQLAlchemy replaces at this checkout anyway (older than ``pool_recycle``) is not checked: a
check would cost a round trip, or wait on a peer that vanished, for nothing.
"""

from __future__ import annotations

import dataclasses
import math
import select
import time
import typing as t

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy import event
from sqlalchemy.pool import ConnectionPoolEntry

_CONNECTED = "flask_neon.connected"
_LAST_CHECKIN = "flask_neon.last_checkin"
_POLLER = "flask_neon.poller"
_READABLE = select.POLLIN | select.POLLERR | select.POLLHUP if hasattr(select, "poll") else 0


@dataclasses.dataclass(frozen=True)
class LivenessCheck:
    """Called by the pool (:class:`~flask_neon._monitoring.MeasuredQueuePool`) for each
    connection it takes back and hands out."""

    dialect: sa.Dialect
    #: Seconds after which an idle connection is pinged (``DB_PING_AFTER_IDLE``).
    ping_after_idle: float
    #: The engine's ``pool_recycle`` (-1: never).
    recycle: float = -1

    def install(self, engine: sa.Engine) -> None:
        """Note when each connection of ``engine`` was opened (its age decides recycling)."""
        event.listen(engine, "connect", self._connected)

    def _connected(self, dbapi_connection: t.Any, record: ConnectionPoolEntry) -> None:
        # time.time(), as SQLAlchemy's pool measures a connection's age for pool_recycle.
        record.info[_CONNECTED] = time.time()

    def returned(self, record: ConnectionPoolEntry) -> None:
        record.info[_LAST_CHECKIN] = time.monotonic()

    def handing_out(self, record: ConnectionPoolEntry) -> None:
        """Invalidate ``record`` if its connection is dead; the caller then reconnects it."""
        last_checkin = record.info.get(_LAST_CHECKIN)
        dbapi_connection = record.dbapi_connection
        if last_checkin is None or dbapi_connection is None:
            return  # opened just now for this checkout, or to be opened
        connected = record.info.get(_CONNECTED)
        if connected is not None and 0 <= self.recycle < time.time() - connected:
            return  # replaced by SQLAlchemy right after this, unchecked
        if dbapi_connection.closed:
            problem = "connection was closed while idle in the pool"
        elif not _has_input(dbapi_connection, record) and (
            time.monotonic() - last_checkin < self.ping_after_idle
        ):
            return
        else:
            try:
                self.dialect.do_ping(dbapi_connection)
                return
            except Exception as exc:
                problem = f"connection failed its liveness check: {exc}"
        record.invalidate(sa_exc.DisconnectionError(problem))


def _has_input(dbapi_connection: t.Any, record: ConnectionPoolEntry) -> bool:
    """True when the server sent something to an idle connection, or closed it."""
    if not hasattr(select, "poll"):  # pragma: no cover - Windows
        return wait_readable(dbapi_connection.fileno(), 0)
    # One poller per connection, registered once: the pool clears record.info when the
    # connection is replaced, so a new socket gets a new poller.
    poller = record.info.get(_POLLER)
    if poller is None:
        poller = select.poll()
        poller.register(dbapi_connection.fileno(), _READABLE)
        record.info[_POLLER] = poller
    return bool(poller.poll(0))


def wait_writable(fd: int, timeout: float) -> bool:
    """True once ``fd`` can be written to (or failed) within ``timeout`` seconds."""
    if not hasattr(select, "poll"):  # pragma: no cover - Windows
        _, writable, errored = select.select([], [fd], [fd], timeout)
        return bool(writable or errored)
    poller = select.poll()
    poller.register(fd, select.POLLOUT | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(max(0, math.ceil(timeout * 1000))))


def wait_readable(fd: int, timeout: float) -> bool:
    """True once ``fd`` can be read (or is closed, or failed) within ``timeout`` seconds.

    With ``poll()`` where there is one: ``select()`` refuses descriptors above 1023, which a
    process with many open files or sockets hands out.
    """
    if not hasattr(select, "poll"):  # pragma: no cover - Windows
        readable, _, errored = select.select([fd], [], [fd], timeout)
        return bool(readable or errored)
    poller = select.poll()
    poller.register(fd, _READABLE)
    return bool(poller.poll(max(0, math.ceil(timeout * 1000))))
