"""Per-request database context for row-level security: transaction-local settings and role.

Multi-tenant apps put the tenant or user in a setting that row-level security policies read
(``current_setting('app.tenant_id', true)``; Neon's ``auth.user_id()`` reads
``request.jwt.claims``). A plain ``SET`` would outlive the request on a pooled connection and,
through a transaction-mode pooler, reach another client. flask-neon applies the settings and
the role with ``SET LOCAL``: they end with their transaction. They travel in the message that
carries ``BEGIN`` and the transaction's first statement where fast BEGIN may, so they cost no
round trip, and they are applied to every transaction of the request, also the ones after a
``commit()``. A statement never runs without them (``_transactions``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import re
import typing as t
from collections.abc import Callable, Iterator, Mapping

from flask import g, has_request_context, request

from ._errors import NeonConfigError, NeonStateError

#: A custom setting: two or more identifiers joined by dots, as PostgreSQL requires.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)+")
_NAME_PART_BYTES = 63  # NAMEDATALEN - 1
_CACHE = "_flask_neon_db_context"
_COMPUTING = "_flask_neon_db_context_computing"
_explicit: contextvars.ContextVar[DatabaseContext | None] = contextvars.ContextVar(
    "flask_neon_db_context", default=None
)


@dataclasses.dataclass(frozen=True)
class DatabaseContext:
    """What one request's (or job's) transactions run with.

    Attributes:
        settings: Custom settings (``{"app.tenant_id": 42}``); values are strings, numbers,
            booleans, or dicts (sent as JSON, e.g. ``request.jwt.claims``). A setting left out
            reads as NULL with ``current_setting(name, true)``.
        role: A role to ``SET LOCAL ROLE`` to, e.g. ``"authenticated"``; None: the login role.
    """

    settings: Mapping[str, t.Any] = dataclasses.field(default_factory=dict)
    role: str | None = None
    #: The statements that apply it at the start of a transaction (none for an empty context).
    #: ``SET LOCAL`` ends with the transaction and, unlike a query, takes no snapshot (a first
    #: statement ``SET TRANSACTION ISOLATION LEVEL`` still works after it).
    statements: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = [
            f"SET LOCAL {_identifier_path(name)} = {_literal(check_setting(name, value))}"
            for name, value in self.settings.items()
        ]
        if self.role is not None:
            if not isinstance(self.role, str) or not self.role or "\x00" in self.role:
                raise NeonConfigError(
                    "the database context's role must be a role name (no NUL character), "
                    f"not {self.role!r}"
                )
            parts.append(f"SET LOCAL ROLE {_identifier(self.role)}")
        object.__setattr__(self, "statements", tuple(parts))


def reset_statements(names: t.Iterable[str], role: bool) -> tuple[str, ...]:
    """The statements that undo, in the transaction, the settings ``names`` and (``role``) a
    ``SET LOCAL ROLE``."""
    parts = [f"SET LOCAL {_identifier_path(name)} TO DEFAULT" for name in sorted(names)]
    if role:
        parts.append("SET LOCAL ROLE NONE")
    return tuple(parts)


def _identifier(name: str) -> str:
    # PostgreSQL's quoted identifier: any character but NUL, a double quote doubled.
    return '"' + name.replace('"', '""') + '"'


def _identifier_path(name: str) -> str:
    # app.tenant_id -> "app"."tenant_id": each part quoted, so that a keyword (user) is a name.
    return ".".join(_identifier(part) for part in name.split("."))


def _literal(text: str) -> str:
    # An escape string constant reads the same whatever standard_conforming_strings says.
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def app_context_values() -> dict[str, t.Any]:
    """The current app context's ``g``, as its dict: one proxy lookup for several reads and
    writes (each ``g.name`` resolves the proxy again). Needs an app context."""
    values: dict[str, t.Any] = vars(t.cast(t.Any, g)._get_current_object())
    return values


def check_setting(name: t.Any, value: t.Any) -> str:
    """The text the setting ``name`` gets for ``value``; a config error naming a bad name or
    value."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise NeonConfigError(
            f"database context setting {name!r}: a custom setting needs a prefix and a name "
            "made of letters, digits and _ joined by dots, e.g. 'app.tenant_id'."
        )
    if any(len(part.encode()) > _NAME_PART_BYTES for part in name.split(".")):
        raise NeonConfigError(
            f"database context setting {name!r}: each part of the name may have at most "
            f"{_NAME_PART_BYTES} characters (PostgreSQL cuts longer names)."
        )
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (str, int, float)):
        text = str(value)
    elif isinstance(value, dict):
        try:
            text = json.dumps(value, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise NeonConfigError(f"database context setting {name!r}: {exc}") from None
    else:
        raise NeonConfigError(
            f"database context setting {name!r}: {type(value).__name__} values are not "
            "allowed; use a string, a number, a boolean or a dict (sent as JSON), or leave "
            "the setting out."
        )
    if "\x00" in text:
        raise NeonConfigError(
            f"database context setting {name!r}: the value holds a NUL character, which "
            "PostgreSQL cannot store in a setting."
        )
    return text


ContextFunction = Callable[[], "DatabaseContext | Mapping[str, t.Any] | None"]


class ContextAPI:
    """Mixed into ``NeonDB``: ``@db.request_context`` and ``with db.context(...)``."""

    _context_function: ContextFunction | None = None
    _context_required: bool = True

    def request_context(
        self, function: ContextFunction | None = None, *, required: bool = True
    ) -> t.Any:
        """Register the function that gives each request's database context.

        It runs once per request, at its first transaction, in the request context, and
        returns a :class:`DatabaseContext` or a mapping of settings. Raise (``abort(401)``)
        for a request that must not reach the database. With ``required`` (the default), a
        request for which it returns None fails before any statement is sent, with a
        :class:`~flask_neon.NeonStateError` (a 500); return ``DatabaseContext()`` to run with
        no settings. Used as ``@db.request_context`` or ``@db.request_context(required=False)``.
        """

        def register(function: ContextFunction) -> ContextFunction:
            self._context_function = function
            self._context_required = required
            return function

        return register(function) if function is not None else register

    @contextlib.contextmanager
    def context(
        self, settings: Mapping[str, t.Any] | None = None, *, role: str | None = None
    ) -> Iterator[DatabaseContext]:
        """Run the transactions begun inside the block with these settings and role: for CLI
        commands and jobs, or to override a request's context."""
        token = _explicit.set(DatabaseContext(dict(settings or {}), role))
        try:
            yield t.cast(DatabaseContext, _explicit.get())
        finally:
            _explicit.reset(token)

    def _current_context(self) -> DatabaseContext | None:
        """The context of the transaction beginning now (None: none)."""
        explicit = _explicit.get()
        if explicit is not None or self._context_function is None or not has_request_context():
            return explicit
        values = app_context_values()
        cached: DatabaseContext | object | None = values.get(_CACHE)
        if isinstance(cached, DatabaseContext):
            return cached
        if cached is _COMPUTING:
            # A query from inside the function would begin a transaction without the
            # context, and whatever ran in that transaction afterwards would be
            # unfiltered: refused rather than run.
            raise NeonStateError(
                "the request_context function ran a query; its transaction would begin "
                "without the context. Read what the function needs from the request (a "
                "verified token, the session cookie), or query under an explicit empty "
                "context: with db.context(), db.engine.connect() as connection: ..."
            )
        values[_CACHE] = _COMPUTING
        try:
            found = self._context_function()
            if found is None:
                if self._context_required:
                    raise NeonStateError(
                        f"the request_context function returned nothing for {request.method} "
                        f"{request.path}: no statement was sent. Return DatabaseContext() to "
                        "run without settings, or raise (abort(401)) to refuse the request."
                    )
                found = DatabaseContext()
            context = found if isinstance(found, DatabaseContext) else DatabaseContext(found)
        except BaseException:
            values.pop(_CACHE, None)  # asked again by the next transaction, as the first time
            raise
        values[_CACHE] = context
        return context
