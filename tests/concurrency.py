"""Other sessions for the differential suite's concurrency cases, and server facts to wait on.

A case's own statement runs in the test's thread and may block (it waits on a lock, in
``pg_sleep``...). What must happen meanwhile -- another session asks for a lock that closes a
deadlock, commits, cancels or terminates -- runs in a thread of its own, and only once the
server shows the case's backend waiting: every wait here polls ``pg_stat_activity`` /
``pg_locks`` against a deadline, never a sleep that guesses how long something takes.

The case's backend is found as "a backend of this database, not one of ours", so that the
same helpers work on a direct connection and through PgBouncer (where the client cannot know
its server's pid). One case runs at a time on a database of its own.
"""

from __future__ import annotations

import threading
import time
import typing as t
from collections.abc import Callable

import psycopg2

from .conftest import _dsn

#: How long any wait of this module may take before the test fails (a bound, not a guess).
DEADLINE = 30.0
POLL = 0.005


class Session:
    """A psycopg2 connection of its own, straight to the server (never through the engine)."""

    def __init__(self, url: str, **settings: str) -> None:
        self.connection = psycopg2.connect(_dsn(url), application_name="parity-helper")
        self.connection.autocommit = True
        with self.connection.cursor() as cursor:
            for name, value in settings.items():
                cursor.execute("SELECT set_config(%s, %s, false)", (name, value))
            cursor.execute("SELECT pg_backend_pid()")
            self.pid: int = cursor.fetchone()[0]
        self.connection.autocommit = False  # its statements open a transaction, as psycopg2's do
        self._pending: Pending | None = None

    def execute(self, sql: str, params: t.Any = None) -> list[tuple[t.Any, ...]]:
        """Run ``sql`` now, in this thread; return its rows."""
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []

    def start(self, sql: str, params: t.Any = None) -> Pending:
        """Run ``sql`` in a thread of its own (it may block); :meth:`Pending.result` waits."""
        self._pending = Pending(lambda: self.execute(sql, params))
        return self._pending

    def close(self) -> None:
        """Close, cancelling a statement still running (the server then lets it go)."""
        pending = self._pending
        if pending is not None and not pending.done():
            self.connection.cancel()
            pending.join()
        self.connection.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def describe(exc: BaseException) -> tuple[t.Any, ...]:
    """What a helper's statement raised, comparable between two runs."""
    from .parity import error_facts

    return ("raised", *error_facts(exc))


class Pending:
    """A call running in a thread; :meth:`result` waits for it against a deadline."""

    def __init__(self, fn: Callable[[], t.Any]) -> None:
        self._outcome: tuple[t.Any, ...] | None = None
        self._value: t.Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], t.Any]) -> None:
        try:
            self._value = fn()
            self._outcome = ("returned", self._value)
        except BaseException as exc:
            self._error = exc
            self._outcome = describe(exc)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float = DEADLINE) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"a helper's statement still runs after {timeout:g} s")

    def result(self, timeout: float = DEADLINE) -> tuple[t.Any, ...]:
        """``("returned", rows)`` or ``("raised", ...)`` of :func:`describe`."""
        self.join(timeout)
        assert self._outcome is not None
        return self._outcome

    def value(self, timeout: float = DEADLINE) -> t.Any:
        """What the call returned; what it raised is raised here (a helper that failed)."""
        self.join(timeout)
        if self._error is not None:
            raise self._error
        return self._value


class Watch:
    """Server facts about the backends of one database, from a connection of its own.

    ``helpers``: pids of the helper sessions, which are never "the case's backend".
    """

    def __init__(self, url: str, helpers: t.Iterable[int] = ()) -> None:
        self.connection = psycopg2.connect(_dsn(url), application_name="parity-watch")
        self.connection.autocommit = True
        self.helpers = {*helpers, self.connection.info.backend_pid}

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _rows(self, sql: str, params: t.Any = None) -> list[tuple[t.Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    def waiting(self, event_type: str = "Lock", event: str | None = None) -> list[int]:
        """Backends of the database, other than the helpers, waiting on ``event_type``."""
        return [
            pid
            for (pid,) in self._rows(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = %s AND (%s IS NULL OR wait_event = %s) "
                "AND NOT pid = ANY(%s)",
                (event_type, event, event, list(self.helpers)),
            )
        ]

    def lock_waits(self) -> set[tuple[int, str]]:
        """(pid, virtual transaction) of every lock request not granted, helpers excepted."""
        return {
            (pid, vxid)
            for pid, vxid in self._rows(
                "SELECT l.pid, l.virtualtransaction FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE a.datname = current_database() AND NOT l.granted "
                "AND NOT l.pid = ANY(%s)",
                (list(self.helpers),),
            )
        }

    def wait_for(
        self, event_type: str = "Lock", event: str | None = None, timeout: float = DEADLINE
    ) -> int:
        """The pid of the backend that waits, once the server shows one waiting."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.waiting(event_type, event)
            if pids:
                return pids[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no backend waited on {event_type} within {timeout:g} s")
            time.sleep(POLL)

    def wait_for_helper(self, pid: int, timeout: float = DEADLINE) -> None:
        """Until the helper session ``pid`` waits on a lock."""
        deadline = time.monotonic() + timeout
        while not self._rows(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", (pid,)
        ):
            if time.monotonic() > deadline:
                raise AssertionError(f"helper {pid} did not wait within {timeout:g} s")
            time.sleep(POLL)


def when_waiting(
    url: str,
    helpers: t.Iterable[int],
    action: Callable[[int], t.Any],
    event_type: str = "Lock",
    event: str | None = None,
    counter: LockWaitCounter | None = None,
) -> Pending:
    """In a thread: wait until the case's backend waits, then call ``action(its pid)``.

    ``counter`` is told of the wait first: the action may end it before the counter's own
    next look.
    """
    helpers = list(helpers)

    def run() -> t.Any:
        with Watch(url, helpers) as watch:
            pid = watch.wait_for(event_type, event)
            if counter is not None:
                counter.saw(watch.lock_waits())
            return action(pid)

    return Pending(run)


class LockWaitCounter:
    """Counts the separate lock waits of the case's backend while a statement runs.

    A wait is a (pid, virtual transaction) whose request the server shows not granted: the
    same statement waiting again in a new transaction (a replay) is a second wait. Each wait
    counted here lasts at least the lock_timeout / deadlock_timeout of the case, many times
    the polling interval.
    """

    def __init__(self, url: str, helpers: t.Iterable[int] = ()) -> None:
        self._watch = Watch(url, helpers)
        self._seen: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.saw(self._watch.lock_waits())
                time.sleep(POLL)
        except BaseException as exc:
            self._error = exc

    def saw(self, waits: set[tuple[int, str]]) -> None:
        """Count these waits (seen by another watcher) too."""
        with self._lock:
            self._seen |= waits

    def stop(self) -> int:
        """Stop counting; the number of waits seen."""
        self._stop.set()
        self._thread.join(DEADLINE)
        self._watch.close()
        if self._error is not None:
            raise self._error
        return len(self._seen)
