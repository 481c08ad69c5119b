"""What differs between DBAPI drivers, behind one small interface: one module per driver.

Nothing else in flask-neon imports a driver. A module of this package is a :class:`Driver`;
:func:`for_dialect` finds the one of an engine.
"""

from __future__ import annotations

import importlib
import importlib.util
import typing as t

from .._errors import NeonConfigError


class Driver(t.Protocol):
    """A driver module (``flask_neon.drivers.psycopg2``): its facts and a few operations."""

    #: The DBAPI's name, as SQLAlchemy's dialects name it.
    name: str
    #: True when a transaction can be opened with its first statement on this interpreter.
    FAST_BEGIN: bool
    #: True when a ROLLBACK can be sent without waiting for its reply.
    NOWAIT_ROLLBACK: bool
    #: True when the DBAPI counts ended transactions itself; else ``transaction_ended`` must be
    #: called for each commit and rollback.
    COUNTS_TRANSACTIONS: bool

    def owns(self, dbapi_connection: t.Any) -> bool: ...
    def opens_transaction(self, connection: t.Any) -> bool: ...
    def in_autocommit(self, connection: t.Any) -> bool: ...
    def client_in_transaction(self, connection: t.Any) -> bool: ...
    def server_in_transaction(self, connection: t.Any) -> bool: ...
    def transaction_id(self, connection: t.Any) -> int: ...
    def transaction_ended(self, connection: t.Any) -> None: ...
    def plain_cursor(self, cursor: t.Any) -> bool: ...
    def begin_then(
        self,
        connection: t.Any,
        setup: t.Sequence[str],
        cursor: t.Any = None,
        statement: t.Any = None,
        parameters: t.Any = None,
    ) -> None: ...
    def execute_first(
        self, cursor: t.Any, statement: str, parameters: t.Any, setup: t.Sequence[str]
    ) -> None: ...
    def send_rollback(self, connection: t.Any) -> bool: ...
    def rollback_reply(self, connection: t.Any, wait: float) -> str | None: ...
    def green(self) -> bool: ...


def begin_statement(isolation: str | None, read_only: bool | None, deferrable: bool | None) -> str:
    """The ``BEGIN`` a driver sends for its session characteristics (None: the server's)."""
    parts = ["BEGIN"]
    if isolation is not None:
        parts.append(f"ISOLATION LEVEL {isolation}")
    if read_only is not None:
        parts.append("READ ONLY" if read_only else "READ WRITE")
    if deferrable is not None:
        parts.append("DEFERRABLE" if deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


_MODULES = {"psycopg2": "psycopg2", "psycopg": "psycopg"}
#: What to install for each driver.
_EXTRAS = {"psycopg2": "flask-neon[psycopg2]", "psycopg": "flask-neon[psycopg]"}


def require(name: str, setting: str) -> None:
    """Raise a config error naming ``setting`` and the extra to install when the DBAPI ``name``
    is not installed."""
    if importlib.util.find_spec(name) is None:
        raise NeonConfigError(
            f"{setting} uses the {name} driver, which is not installed: "
            f"pip install '{_EXTRAS[name]}' (or set DB_DRIVER to the other driver)."
        )


def for_dialect(dialect: t.Any) -> Driver | None:
    """The driver module of a SQLAlchemy dialect, or None for a DBAPI flask-neon does not know."""
    module = _MODULES.get(getattr(dialect, "driver", ""))
    if module is None:
        return None
    return t.cast(Driver, importlib.import_module(f"{__name__}.{module}"))
