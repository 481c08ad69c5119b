"""The sessions of one app context (a request, a CLI command), and how they end.

A request whose transactions only read ends them after its response has been handed to the WSGI
server: the ``ROLLBACK`` that ends a transaction with nothing to commit (a round trip, 2-40 ms to
Neon) runs in the response's close callback, once the client has its data, instead of before
the first byte of the response leaves, and without waiting for its reply (``_settling``). The
connection goes back to the pool only once that reply has come, so no other request ever gets a
connection with a transaction open.

Everything else ends before the response, as with Flask-SQLAlchemy, so that no request can
observe what another one held after it answered: a transaction that wrote, locked rows
(``FOR UPDATE``), called a function that might lock (``pg_advisory_xact_lock``), or ran a
statement flask-neon did not see (``_transactions.ends_unobserved``); a large or streamed body,
which would let a slow client hold the transaction open; a CLI command or
``with app.app_context()``; and a request whose response nothing may close: WSGI servers must
call the response's ``close()`` and name themselves in ``SERVER_SOFTWARE`` (gunicorn, uWSGI,
waitress, werkzeug's server...); Flask's test client does neither. A response whose ``close()``
does not come within :data:`CLOSE_GRACE_SECONDS` (a middleware that drops it, against PEP 3333)
has its sessions ended by a watchdog, or by its thread's next request if that comes first; the
app is told once, and ends its sessions before the response from then on.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import typing as t

import sqlalchemy as sa
from flask import Flask, Response, has_app_context, request
from sqlalchemy import orm

from . import _nplusone
from ._context import app_context_values
from ._errors import classify
from ._settling import after_response
from ._state import NeonState
from ._transactions import ends_unobserved

log = logging.getLogger("flask_neon")

_SESSIONS = "_flask_neon_sessions"
_HANDOFF = "_flask_neon_handoff"
Kind = t.Literal["write", "read"]
#: The largest body after which a transaction ends: well inside a socket's send buffer.
HANDOFF_MAX_BYTES = 64 * 1024
#: How long after its request a response's ``close()`` may come before its sessions are ended
#: without it.
CLOSE_GRACE_SECONDS = 1.0


class _Handoff:
    """The sessions one response ends once it has been sent."""

    def __init__(self, state: NeonState) -> None:
        self.state = state
        self.sessions: list[orm.Session] = []
        self.done = False
        self.expired = False
        self._lock = threading.Lock()

    def close(self) -> None:
        """The response's close callback: end the sessions without waiting for the reply."""
        if self.expired and not self.state.hand_over:
            # Late, not missing (a slow client held the server's write): the server does call
            # close(), so the app's reading sessions may end after the response again.
            self.state.hand_over = True
            log.info("flask-neon: a late response close() came; sessions end after it again")
        sessions = self._take()
        if sessions:
            with after_response():  # the ROLLBACK goes out without waiting for its reply
                close_sessions(sessions, self.state)

    def expire(self) -> None:
        """The response's ``close()`` has not come: end the sessions now, and until a close()
        comes, end the app's sessions before the response."""
        sessions = self._take()
        if not sessions:
            return
        self.expired = True
        close_sessions(sessions, self.state)
        with _warning_lock:
            if not self.state.hand_over:
                return
            self.state.hand_over = False
            log.warning(
                "flask-neon: a response of app %r was not closed within %g s (a WSGI "
                "middleware that does not pass the response's close() on, as PEP 3333 asks?); "
                "its database sessions were ended without it, and the app's sessions now end "
                "before each response.",
                self.state.app_name,
                CLOSE_GRACE_SECONDS,
            )

    def _take(self) -> list[orm.Session]:
        with self._lock:  # close() and expire() may race: one of them ends the sessions
            self.done = True
            sessions, self.sessions = self.sessions, []
        return sessions


class _Watchdog:
    """One thread per process that expires the handoffs whose ``close()`` did not come.

    Each handoff is queued with its deadline; the thread sleeps until the oldest one's, skips
    those closed meanwhile (nearly all) and expires the rest. Made in the process that uses it,
    so that a fork (gunicorn) and a monkey-patched ``threading`` (gevent) get their own.
    """

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[float, _Handoff]] = collections.deque()
        self._condition = threading.Condition()
        self._pid = os.getpid()
        threading.Thread(target=self._run, name="flask-neon close watchdog", daemon=True).start()

    def watch(self, handoff: _Handoff) -> None:
        with self._condition:
            self._queue.append((time.monotonic() + CLOSE_GRACE_SECONDS, handoff))
            if len(self._queue) == 1:
                self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue:
                    self._condition.wait()
                deadline, handoff = self._queue[0]
                remaining = deadline - time.monotonic()
                if not handoff.done and remaining > 0:
                    self._condition.wait(remaining)
                    continue
                self._queue.popleft()
            if not handoff.done:
                try:
                    handoff.expire()
                except Exception:  # never let the thread die: the next one may still end
                    log.exception("flask-neon: ending sessions whose response was not closed")


_watchdog: _Watchdog | None = None
_watchdog_lock = threading.Lock()
_warning_lock = threading.Lock()
_thread_state = threading.local()


def _watch(handoff: _Handoff) -> None:
    """Expire ``handoff`` unless its ``close()`` comes in time (see :class:`_Watchdog`)."""
    global _watchdog
    watchdog = _watchdog
    if watchdog is None or watchdog._pid != os.getpid():
        with _watchdog_lock:
            if _watchdog is None or _watchdog._pid != os.getpid():
                _watchdog = _Watchdog()
            watchdog = _watchdog
    watchdog.watch(handoff)
    _thread_state.handoff = handoff


def _expire_this_threads_last_handoff() -> None:
    # A WSGI server calls a response's close() before its thread serves the next request: if it
    # has not come by now, it will not.
    handoff: _Handoff | None = getattr(_thread_state, "handoff", None)
    if handoff is not None:
        _thread_state.handoff = None
        if not handoff.done:
            handoff.expire()


class RequestSessions:
    """Mixed into ``NeonDB``: ``db.session``, ``db.read_session`` and their end."""

    if t.TYPE_CHECKING:

        def _state(self, app: Flask | None = None, what: str = "db.engine") -> NeonState: ...

    @property
    def session(self) -> orm.Session:
        """The session of the current app context, created on first use.

        Each app context (each request, each CLI command) gets its own session. It connects
        only when it first runs a query, and at the end of the request it is rolled back and
        closed: nothing is committed unless you call ``db.session.commit()``.
        """
        return self._session("write", "db.session")

    @property
    def read_session(self) -> orm.Session:
        """A session for read-only work, on the replica when ``DB_READ_URL`` is set.

        Its transactions are read-only (a write fails with the ``read_only`` cause), also when
        it falls back to the primary. The replica lags behind the primary: reads that must see
        this request's own writes belong on :attr:`session`. Ended like it.
        """
        return self._session("read", "db.read_session")

    def _session(self, kind: Kind, what: str) -> orm.Session:
        # The dict is in g before a maker runs: the test plugin's read maker asks for
        # db.session, which must land in the same dict.
        if not has_app_context():
            sessions: dict[Kind, orm.Session] = {}
        else:
            values = app_context_values()
            sessions = values.get(_SESSIONS)  # type: ignore[assignment]
            if sessions is None:
                sessions = values[_SESSIONS] = {}
                _expire_this_threads_last_handoff()
        session = sessions.get(kind)
        if session is None:
            state = self._state(what=what)  # names the problem outside an app context
            session = (state.sessionmaker if kind == "write" else state.read_sessionmaker)()
            sessions[kind] = session
        return session

    def _hand_over(self, sender: Flask, response: Response, **_: t.Any) -> None:
        """``request_finished``: let the final response end the request's sessions once sent.

        Only under a WSGI server (``SERVER_SOFTWARE``), and only for a body of known, small size:
        one the server hands to the socket at once, so a slow client cannot hold the
        transaction and the pooled connection open. Not for a ``direct_passthrough`` response
        (a file), whose close the server calls without the response's callbacks.
        """
        values = app_context_values()
        if _SESSIONS not in values:
            return  # no session so far; one opened later (in teardown) ends at teardown
        size = response.content_length
        state = self._state(sender, what="teardown")
        if (
            not state.hand_over
            or "SERVER_SOFTWARE" not in request.environ
            or response.direct_passthrough
            or size is None
            or size > HANDOFF_MAX_BYTES
        ):
            return
        handoff = _Handoff(state)
        response.call_on_close(handoff.close)
        values[_HANDOFF] = handoff

    def _teardown(self, exc: BaseException | None) -> None:
        """End this app context's sessions: now, or through the response (see the module).

        Anything not committed is rolled back. A broken connection is logged and discarded;
        teardown never raises into Flask.
        """
        values = app_context_values()
        sessions: dict[Kind, orm.Session] = values.pop(_SESSIONS, None) or {}
        handoff: _Handoff | None = values.pop(_HANDOFF, None)
        if _nplusone.KEY in values:
            _nplusone.finish(values)
        now = list(sessions.values())
        if handoff is not None and not handoff.done:
            later = [session for session in now if _ends_unobserved(session)]
            if later:
                handoff.sessions = later
                now = [session for session in now if session not in later]
                _watch(handoff)
        if now:
            close_sessions(now, self._state(what="teardown"))


def _ends_unobserved(session: orm.Session) -> bool:
    """True when ``session`` may end after the response: no other request could tell."""
    if isinstance(session.bind, sa.Connection):
        return False  # joined to an outside connection (the pytest plugin's): ends with it
    transaction = session.get_transaction()
    if transaction is None:
        return True
    # The connections of the session's transaction, one per engine it used; SQLAlchemy has no
    # public accessor that would not open one.
    connections = transaction._connections.values()
    return all(ends_unobserved(entry[0]) for entry in connections)


def close_sessions(sessions: t.Iterable[orm.Session], state: NeonState) -> None:
    """Close each session; one that fails is logged (the app's secrets masked) and
    invalidated."""
    for session in sessions:
        try:
            session.close()
        except Exception as error:
            cause = classify(error, state.secrets())
            log.warning(
                "flask-neon: closing the session failed (%s: %s); connection discarded",
                cause.title,
                cause.detail,
            )
            try:
                session.invalidate()
            except Exception:
                log.debug("flask-neon: invalidate after a failed close also failed", exc_info=True)
