"""The opt-in ``Server-Timing`` response header (``DB_SERVER_TIMING``): the database time,
statements and round trips of a request, as browsers' developer tools show them (Network tab,
Timing), e.g. ``db;dur=2.31;desc="1 statement, 1 round trip"``.

Round trips count each statement and each ``COMMIT`` or ``ROLLBACK`` the request waited for;
``BEGIN`` only when it was not sent with the first statement (``DB_FAST_BEGIN=false``). The
``ROLLBACK`` that ends a request after its response is not among them: the client does not
wait for it.
"""

from __future__ import annotations

import dataclasses
import time
import typing as t

import sqlalchemy as sa
from flask import Response, g, has_request_context
from sqlalchemy import event

_KEY = "_flask_neon_timing"
#: ``g`` key of N+1 detection's recorder (``_nplusone.KEY``), read without importing it.
NPLUSONE_KEY = "_flask_neon_nplusone"
_STARTED = "flask_neon.timing_started"


@dataclasses.dataclass
class _Timing:
    seconds: float = 0.0
    statements: int = 0
    round_trips: int = 0


def _current() -> _Timing | None:
    if not has_request_context():
        return None
    timing: _Timing = g.setdefault(_KEY, _Timing())
    return timing


def install(engine: sa.Engine, *, begin_is_free: bool) -> None:
    """Count ``engine``'s work per request."""

    @event.listens_for(engine, "before_cursor_execute", named=True)
    def _start(conn: sa.Connection, **_: t.Any) -> None:
        conn.info[_STARTED] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute", named=True)
    def _stop(conn: sa.Connection, **_: t.Any) -> None:
        started = conn.info.pop(_STARTED, None)
        timing = _current()
        if started is not None and timing is not None:
            timing.seconds += time.perf_counter() - started
            timing.statements += 1
            timing.round_trips += 1

    def _one_round_trip(conn: sa.Connection) -> None:
        timing = _current()
        if timing is not None:
            timing.round_trips += 1

    event.listen(engine, "commit", _one_round_trip)
    event.listen(engine, "rollback", _one_round_trip)
    if not begin_is_free:
        event.listen(engine, "begin", _one_round_trip)


def add_header(response: Response) -> Response:
    """``after_request``: the header, when the request used the database."""
    timing: _Timing | None = g.get(_KEY)
    if timing is not None:
        statements = f"{timing.statements} statement{'s' * (timing.statements != 1)}"
        trips = f"{timing.round_trips} round trip{'s' * (timing.round_trips != 1)}"
        # N+1 detection's recorder (_nplusone), when on: its findings so far, by name.
        found = g.get(NPLUSONE_KEY)
        summary = found.summary() if found is not None else ""
        words = ", ".join(filter(None, [statements, trips, summary]))
        response.headers.add("Server-Timing", f'db;dur={timing.seconds * 1000:.2f};desc="{words}"')
    return response
