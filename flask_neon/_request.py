"""The sessions of one app context (a request, a CLI command), and how they end.

A request's sessions end after its response has been handed to the WSGI server: the
``ROLLBACK`` that ends a transaction with nothing to commit (a round trip, 2-40 ms to Neon)
runs in the response's close callback, once the client has its data, instead of before the
first byte of the response leaves, and without waiting for its reply (``_settling``). The
connection goes back to the pool only once that reply has come, so no other request ever gets a
connection with a transaction open. Only for a small body of known
size: a large or streamed one would let a slow client hold the transaction and the pooled
connection open, so it ends them before it is sent, as before. Outside a request (a CLI command,
``with app.app_context()``), and where nothing may call the response's close, the sessions end at
teardown as before: WSGI servers must call it and name themselves in ``SERVER_SOFTWARE``
(gunicorn, uWSGI, waitress, werkzeug's server...); Flask's test client does neither.
"""

from __future__ import annotations

import logging
import typing as t

import sqlalchemy as sa
from flask import Flask, Response, has_app_context, request
from sqlalchemy import orm

from ._context import app_context_values
from ._errors import classify
from ._settling import after_response
from ._state import NeonState

log = logging.getLogger("flask_neon")

_SESSIONS = "_flask_neon_sessions"
_HANDOFF = "_flask_neon_handoff"
Kind = t.Literal["write", "read"]
#: The largest body after which a transaction ends: well inside a socket's send buffer.
HANDOFF_MAX_BYTES = 64 * 1024


class _Handoff:
    """The sessions one response ends once it has been sent."""

    def __init__(self, state: NeonState) -> None:
        self.state = state
        self.sessions: list[orm.Session] = []
        self.done = False

    def close(self) -> None:
        self.done = True
        sessions, self.sessions = self.sessions, []
        with after_response():  # the ROLLBACK goes out without waiting for its reply
            close_sessions(sessions, self.state)


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
        sessions: dict[Kind, orm.Session] = (
            app_context_values().setdefault(_SESSIONS, {}) if has_app_context() else {}
        )
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
        if (
            "SERVER_SOFTWARE" not in request.environ
            or response.direct_passthrough
            or size is None
            or size > HANDOFF_MAX_BYTES
        ):
            return
        handoff = _Handoff(self._state(sender, what="teardown"))
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
        now = list(sessions.values())
        if handoff is not None and not handoff.done:
            # A session joined to an outside connection (the pytest plugin's) ends with it.
            handoff.sessions = [s for s in now if not isinstance(s.bind, sa.Connection)]
            now = [s for s in now if isinstance(s.bind, sa.Connection)]
        if now:
            close_sessions(now, self._state(what="teardown"))


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
