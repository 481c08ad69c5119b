"""N+1 detection: the round trips an application's own code costs, seen per request.

Within one app context (a request, a CLI command), statements of the same shape (the same SQL
text, other parameters) run ``DB_NPLUSONE_THRESHOLD`` times or more are an N+1 candidate. An
ORM lazy load is named from SQLAlchemy's own loading context (``ORMExecuteState``: the
relationship it loads, the path it was reached by), with the eager-loading option that fixes
it; any other repeat is named by its statement (never its parameters) and the first
application frame that ran it. A request whose statements exceed ``DB_STATEMENT_BUDGET`` is a
finding too.

The statements are seen where flask-neon already sees each one (``_transactions``: no
SQLAlchemy engine event is added), the lazy loads through the session event
``do_orm_execute``; nothing is installed while detection is off. Findings are reported when the
app context ends, with the final counts: logged once per endpoint and pattern (``warn``),
counted in Prometheus (``DB_METRICS``), or raised at the statement that crosses the threshold
(``raise``, for tests).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import typing as t

import sqlalchemy as sa
from flask import current_app, has_app_context, has_request_context, request
from sqlalchemy import event, orm
from sqlalchemy.orm import RelationshipDirection

from ._context import app_context_values
from ._errors import NeonError
from ._session import RoutingSession
from ._timing import NPLUSONE_KEY
from ._transactions import observe

log = logging.getLogger("flask_neon")

Mode = t.Literal["off", "count", "warn", "raise"]
#: ``g`` key of the app context's :class:`Recorder` (``_timing`` reads its summary).
KEY = NPLUSONE_KEY
#: Modules whose frames are not the application's.
_LIBRARIES = (
    "sqlalchemy",
    "flask_neon",
    "flask",
    "werkzeug",
    "jinja2",
    "markupsafe",
    "blinker",
    "click",
    "asgiref",
    "gunicorn",
    "gevent",
    "concurrent",
    "threading",
    "contextlib",
    "_pytest",
    "pluggy",
)
_SHAPE_CHARS = 120


class NPlusOneError(NeonError):
    """An N+1 query pattern (or a statement budget exceeded) in ``DB_NPLUSONE=raise`` mode.

    Attributes:
        finding: What was found, where, and the fix.
    """

    def __init__(self, finding: Finding) -> None:
        self.finding = finding
        super().__init__(finding.message())


@dataclasses.dataclass
class Finding:
    """One pattern of one app context."""

    #: ``lazy load``, ``repeated statement`` or ``statement budget``.
    kind: str
    #: The relationship (``Post.author``), the statement's shape, or ``budget``.
    pattern: str
    #: Statements of the pattern so far (each one a round trip).
    count: int
    #: The first application frame that ran it: ``app/views.py:42 in list_posts``.
    location: str
    #: What to change.
    fix: str
    #: The endpoint (``posts.index``), or the CLI command / ``app context``.
    endpoint: str

    def message(self) -> str:
        what = {
            "lazy load": f"{self.count} lazy loads of {self.pattern}",
            "repeated statement": f"the same statement {self.count} times: {self.pattern}",
            "statement budget": f"{self.count} statements, over DB_STATEMENT_BUDGET",
        }[self.kind]
        return (
            f"N+1 in {self.endpoint}: {what} ({self.count} round trips) at {self.location}. "
            f"Fix: {self.fix}"
        )


class Recorder:
    """What one app context asked of the database."""

    __slots__ = ("endpoint", "findings", "lazy", "pending", "shapes", "statements")

    def __init__(self) -> None:
        #: Named at the first finding (most requests have none: reading it costs).
        self.endpoint: str | None = None
        self.statements = 0
        self.shapes: dict[str, int] = {}
        #: Lazy loads by relationship path.
        self.lazy: dict[str, int] = {}
        #: The lazy load whose statement comes next.
        self.pending: str | None = None
        self.findings: dict[str, Finding] = {}

    def count(self, key: str, finding: Finding) -> int:
        """How many statements ``finding`` (found under ``key``) has cost so far."""
        if finding.kind == "lazy load":
            return self.lazy.get(key, finding.count)
        if finding.kind == "repeated statement":
            return self.shapes.get(key, finding.count)
        return self.statements

    def summary(self) -> str:
        """Server-Timing's words for what was found (empty when nothing)."""
        return ", ".join(
            f"N+1: {finding.pattern} x{self.count(key, finding)}"
            for key, finding in self.findings.items()
        )


class Detector:
    """One app's N+1 detection (see the module)."""

    def __init__(
        self,
        app_name: str,
        mode: Mode,
        threshold: int,
        budget: int,
        counter: t.Any = None,
        *,
        patterns: bool = True,
    ) -> None:
        self.app_name = app_name
        self.mode = mode
        self.threshold = threshold
        self.budget = budget
        #: Whether repeated statements and lazy loads are looked for (not only the budget).
        self.patterns = patterns
        #: A Prometheus counter with labels (app, endpoint, pattern), or None.
        self.counter = counter
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    # -- what is seen ----------------------------------------------------------------------

    def recorder(self) -> Recorder | None:
        """The current app context's recorder, made at its first statement; None outside one."""
        if not has_app_context():
            return None
        values = app_context_values()
        found: Recorder | None = values.get(KEY)
        if found is None:
            found = values[KEY] = Recorder()
        return found

    def statement(self, sql: str) -> None:
        """A statement about to be sent (``_transactions``' observer)."""
        recorder = self.recorder()
        if recorder is None:
            return
        recorder.statements += 1
        if self.budget and recorder.statements == self.budget + 1:
            fix = (
                "fewer statements (eager loading, batching), or a higher DB_STATEMENT_BUDGET "
                f"than {self.budget}"
            )
            self._found(recorder, "statement budget", "budget", "budget", recorder.statements, fix)
        if not self.patterns:
            return
        if recorder.pending is not None:
            # A lazy load's statement: counted as the lazy load, not as a repeat.
            recorder.pending = None
            return
        count = recorder.shapes[sql] = recorder.shapes.get(sql, 0) + 1
        if count == self.threshold:
            shape = " ".join(sql.split())
            shape = shape if len(shape) <= _SHAPE_CHARS else shape[: _SHAPE_CHARS - 3] + "..."
            fix = (
                "run it once for all the values (WHERE id = ANY(:ids), IN, a join) instead of "
                "once per row, or keep its result for the request"
            )
            self._found(recorder, "repeated statement", sql, shape, count, fix)

    def lazy_load(self, state: orm.ORMExecuteState) -> None:
        """``do_orm_execute``: a relationship loaded lazily, for one parent object."""
        recorder = self.recorder()
        if recorder is None:
            return
        path = state.loader_strategy_path
        props = [
            element
            for element in (path.path if path is not None else ())
            if isinstance(element, orm.RelationshipProperty)
        ]
        if not props:
            return
        name = ".".join([props[0].parent.class_.__name__, *(p.key for p in props)])
        count = recorder.lazy[name] = recorder.lazy.get(name, 0) + 1
        if count == self.threshold:
            pattern = f"{props[-1].parent.class_.__name__}.{props[-1].key}"
            self._found(recorder, "lazy load", name, pattern, count, _eager_fix(props))
        recorder.pending = name  # its statement comes next (unless _found raised)

    @staticmethod
    def recorder_app() -> Detector | None:
        """The detector of the current app (sessions are shared by class, apps are not)."""
        state = current_app.extensions.get("flask-neon")
        return getattr(state, "nplusone", None)

    # -- what is told ----------------------------------------------------------------------

    def _found(
        self, recorder: Recorder, kind: str, key: str, pattern: str, count: int, fix: str
    ) -> None:
        if recorder.endpoint is None:
            recorder.endpoint = _endpoint()
        finding = Finding(kind, pattern, count, _application_frame(), fix, recorder.endpoint)
        recorder.findings[key] = finding
        if self.mode == "raise":
            raise NPlusOneError(finding)

    def finish(self, recorder: Recorder) -> None:
        """The app context ends: report its findings with their final counts."""
        for key, finding in recorder.findings.items():
            finding.count = recorder.count(key, finding)
            if self.counter is not None:
                self.counter.labels(self.app_name, finding.endpoint, finding.pattern).inc()
            if self.mode == "warn":
                with self._lock:
                    first = (finding.endpoint, key) not in self._warned
                    self._warned.add((finding.endpoint, key))
                if first:
                    log.warning("flask-neon: %s", finding.message())


def _eager_fix(props: list[orm.RelationshipProperty[t.Any]]) -> str:
    """The loader option that loads ``props`` (a path of relationships) up front."""
    chain = []
    for prop in props:
        loader = (
            "joinedload" if prop.direction is RelationshipDirection.MANYTOONE else "selectinload"
        )
        chain.append(f"{loader}({prop.parent.class_.__name__}.{prop.key})")
    root = props[0].parent.class_.__name__
    return (
        f"load it with the query that loads the {root} objects: "
        f".options({'.'.join(chain)}) (selectinload for collections, joinedload or "
        "selectinload for a single related object)"
    )


def _application_frame() -> str:
    """The innermost frame of the application's own code: ``path:line in function``."""
    frame = sys._getframe(1)
    while frame is not None:
        template = frame.f_globals.get("__jinja_template__")
        if template is not None:  # Jinja's compiled code: the template's own line
            line = template.get_corresponding_lineno(frame.f_lineno)
            return f"{template.filename or template.name or '<template>'}:{line} (a template)"
        module = frame.f_globals.get("__name__", "")
        if module.split(".", 1)[0] not in _LIBRARIES:
            code = frame.f_code
            return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "unknown"


def _endpoint() -> str:
    """How findings name the work: ``GET posts.index``, or ``app context``."""
    if has_request_context():
        return f"{request.method} {request.endpoint or request.path}"
    return "app context"


_listening = threading.Lock()
_installed: list[bool] = []


def install(engines: t.Iterable[sa.Engine], detector: Detector) -> None:
    """Watch the statements of ``engines`` and the ORM's lazy loads, for ``detector``."""
    for engine in engines:
        observe(engine, detector.statement)
    with _listening:
        if not _installed:
            # On flask-neon's session class (the test plugin's maker uses it too), not on
            # every Session: another library's sessions in the process would pay for it.
            event.listen(RoutingSession, "do_orm_execute", _lazy_load)
            _installed.append(True)


def _lazy_load(state: orm.ORMExecuteState) -> None:
    # A SELECT whose lazy_loaded_from is set is a lazy load (is_relationship_load would also
    # compile the statement's options first: dearer). Not lazy_loaded_from alone: SQLAlchemy
    # raises for it on any other statement.
    if state.is_select and state.lazy_loaded_from is not None and has_app_context():
        detector = Detector.recorder_app()
        if detector is not None and detector.patterns:
            detector.lazy_load(state)


def finish(values: dict[str, t.Any]) -> None:
    """Teardown: report the ending app context's findings."""
    recorder: Recorder | None = values.pop(KEY, None)
    if recorder is not None and recorder.findings:
        detector = Detector.recorder_app()
        if detector is not None:
            detector.finish(recorder)
