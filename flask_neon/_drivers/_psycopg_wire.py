"""psycopg 3's libpq connection (``connection.pgconn``, public API) driven by hand where
psycopg itself has no call for it: a Sync on its own, reading on to a connection the server
closes, leaving pipeline mode on a lost connection (``psycopg.execute_first``)."""

from __future__ import annotations

import time
import typing as t

import psycopg
from psycopg import pq

from .._liveness import wait_readable, wait_writable


def arm_idle_timeout(connection: psycopg.Connection[t.Any]) -> None:
    """Send a Sync and wait for its answer, after which the server's idle-in-transaction
    timer runs (it answers with ReadyForQuery, which arms it). libpq sends a Sync alone only
    in pipeline mode."""
    pgconn = connection.pgconn
    try:
        pgconn.enter_pipeline_mode()
        try:
            pgconn.pipeline_sync()
            while pgconn.flush():
                wait_writable(pgconn.socket, 1.0)
            while True:
                while pgconn.is_busy():
                    wait_readable(pgconn.socket, CLOSE_WAIT)
                    pgconn.consume_input()
                result = pgconn.get_result()
                if result is not None and result.status == pq.ExecStatus.PIPELINE_SYNC:
                    break
        finally:
            pgconn.exit_pipeline_mode()
    except psycopg.Error:
        # A connection lost meanwhile: psycopg reports it at its next use, as it would.
        if connection.broken:
            leave_pipeline_mode(connection)


def ending_error(exc: BaseException) -> psycopg.Error | None:
    """The server's error that ended the session, behind the exception psycopg raised."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, psycopg.Error) and seen.diag.severity_nonlocalized == "FATAL":
            return seen
        seen = seen.__context__
    return None


def read_until_closed(connection: psycopg.Connection[t.Any]) -> None:
    """Read until the server (or the pooler) has closed the connection, as psycopg's own path
    does after a FATAL error; close it ourselves if it does not within the connect timeout."""
    pgconn = connection.pgconn
    deadline = time.monotonic() + CLOSE_WAIT
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait_readable(pgconn.socket, remaining)
            pgconn.consume_input()
    except psycopg.Error:
        return  # the connection is closed: psycopg's own state after the server's goodbye
    connection.close()


#: How long a session the server ended may take to close its connection.
CLOSE_WAIT = 10.0


def leave_pipeline_mode(connection: psycopg.Connection[t.Any]) -> None:
    """Take libpq out of pipeline mode on a connection lost inside the pipeline, as psycopg's
    own path leaves it (``pipeline_status`` OFF): psycopg does not on a broken connection.

    libpq refuses while the pipeline has results to collect: on a lost connection they are
    its own error results, which come at once (no I/O on a closed socket).
    """
    pgconn = connection.pgconn
    for _ in range(_PIPELINE_LIMIT):
        try:
            pgconn.exit_pipeline_mode()
            return
        except psycopg.Error:
            pass
        try:
            pgconn.get_result()
        except psycopg.Error:
            return


#: More than the results a transaction's first pipeline can leave (BEGIN, setup, statement).
_PIPELINE_LIMIT = 64
