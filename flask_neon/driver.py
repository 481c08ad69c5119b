"""A psycopg2 connection that opens a transaction without a round trip of its own.

psycopg2 starts every transaction by sending ``BEGIN`` and waiting for the answer before it
sends the first statement: a request that runs one query pays three round trips (``BEGIN``,
the query, ``ROLLBACK``). Over the network to Neon each one is a millisecond or more.

:class:`NeonConnection` keeps libpq in autocommit mode and sends ``BEGIN`` in the same message
as the transaction's first statement (``BEGIN; SELECT ...``), which the server runs as one
simple query. The semantics are psycopg2's own: outside autocommit, the first statement opens a
transaction, which lasts until ``commit()`` or ``rollback()``. What the application sees does
not change; it saves one round trip per transaction, and a transaction that ran no statement
costs none at all to commit or roll back. Through a pooler, the per-transaction ``SET LOCAL``
limits travel in the same message too.

Whatever cannot ride along (``executemany``, ``COPY``, ``callproc``) first opens the
transaction with a ``BEGIN`` of its own. Server-side (named) cursors need psycopg2's own
transaction handling; a transaction that creates one switches to it until it ends.
"""

from __future__ import annotations

import typing as t

import psycopg2.extensions as ext  # type: ignore[import-untyped]

_IDLE = ext.TRANSACTION_STATUS_IDLE
_LEVELS = {
    ext.ISOLATION_LEVEL_READ_COMMITTED: "READ COMMITTED",
    ext.ISOLATION_LEVEL_REPEATABLE_READ: "REPEATABLE READ",
    ext.ISOLATION_LEVEL_SERIALIZABLE: "SERIALIZABLE",
    ext.ISOLATION_LEVEL_READ_UNCOMMITTED: "READ UNCOMMITTED",
}
_NAMES = {name: level for level, name in _LEVELS.items()}
# psycopg2's own attributes, reached through the base class while ours keep the logical state.
_driver_autocommit = ext.connection.autocommit


class NeonCursor(ext.cursor):  # type: ignore[misc]
    """Prefixes the first statement of a transaction with its ``BEGIN``."""

    def execute(self, query: t.Any, vars: t.Any = None) -> None:
        connection: NeonConnection = self.connection
        prefix = connection._begin_prefix() if self.name is None else None
        if prefix is not None:
            if not isinstance(query, (str, bytes)):
                query = query.as_string(connection)  # psycopg2.sql.Composable
            query = prefix.encode() + query if isinstance(query, bytes) else prefix + query
        super().execute(query, vars)

    def executemany(self, query: t.Any, vars_list: t.Any) -> None:
        self.connection._ensure_begun()
        super().executemany(query, vars_list)

    def callproc(self, procname: str, parameters: t.Any = None) -> t.Any:
        self.connection._ensure_begun()
        return super().callproc(procname, parameters)

    def copy_expert(self, sql: t.Any, file: t.Any, size: int = 8192) -> None:
        self.connection._ensure_begun()
        super().copy_expert(sql, file, size)

    def copy_from(self, *args: t.Any, **kwargs: t.Any) -> None:
        self.connection._ensure_begun()
        super().copy_from(*args, **kwargs)

    def copy_to(self, *args: t.Any, **kwargs: t.Any) -> None:
        self.connection._ensure_begun()
        super().copy_to(*args, **kwargs)


class NeonConnection(ext.connection):  # type: ignore[misc]
    """A psycopg2 connection whose ``BEGIN`` shares a round trip with the first statement.

    Attributes:
        begin_statements: SQL sent right after ``BEGIN`` in every transaction, e.g. the
            ``SET LOCAL`` session limits through a pooler. Empty by default.
    """

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = NeonCursor
        self.begin_statements = ""
        self._autocommit = False
        self._isolation: str | None = None
        self._readonly: bool | None = None
        self._deferrable: bool | None = None
        # True while a transaction runs under psycopg2's own handling (named cursors).
        self._native = False
        _driver_autocommit.__set__(self, True)

    # -- the logical session characteristics ---------------------------------------------------

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._autocommit = bool(value)

    @property
    def readonly(self) -> bool | None:
        return self._readonly

    @readonly.setter
    def readonly(self, value: bool | None) -> None:
        self._readonly = value

    @property
    def deferrable(self) -> bool | None:
        return self._deferrable

    @deferrable.setter
    def deferrable(self, value: bool | None) -> None:
        self._deferrable = value

    @property
    def isolation_level(self) -> int | None:
        return None if self._isolation is None else _NAMES[self._isolation]

    @isolation_level.setter
    def isolation_level(self, value: int | str | None) -> None:
        self.set_session(isolation_level=value)

    def set_isolation_level(self, level: int) -> None:
        if level == ext.ISOLATION_LEVEL_AUTOCOMMIT:
            self._autocommit = True
        else:
            self.rollback()  # psycopg2 ends the current transaction here too
            self._autocommit = False
            self._isolation = _LEVELS.get(level)

    def set_session(
        self,
        isolation_level: int | str | None = None,
        readonly: bool | None = None,
        deferrable: bool | None = None,
        autocommit: bool | None = None,
    ) -> None:
        if isolation_level is not None:
            if isinstance(isolation_level, str):
                name = isolation_level.upper()
                self._isolation = None if name == "DEFAULT" else name
            else:
                self._isolation = _LEVELS.get(isolation_level)
        if readonly is not None:
            self._readonly = readonly
        if deferrable is not None:
            self._deferrable = deferrable
        if autocommit is not None:
            self._autocommit = autocommit

    # -- transactions --------------------------------------------------------------------------

    def _begin_sql(self) -> str:
        options = []
        if self._isolation is not None:
            options.append(f"ISOLATION LEVEL {self._isolation}")
        if self._readonly is not None:
            options.append("READ ONLY" if self._readonly else "READ WRITE")
        if self._deferrable is not None:
            options.append("DEFERRABLE" if self._deferrable else "NOT DEFERRABLE")
        begin = "BEGIN " + " ".join(options) if options else "BEGIN"
        return f"{begin}; {self.begin_statements}" if self.begin_statements else f"{begin}; "

    def _begin_prefix(self) -> str | None:
        """The text to put before a statement, or None when no transaction must open."""
        if self._autocommit or self._native or self.get_transaction_status() != _IDLE:
            return None
        return self._begin_sql()

    def _ensure_begun(self) -> None:
        prefix = self._begin_prefix()
        if prefix is not None:
            with ext.cursor(self) as cursor:
                cursor.execute(prefix.rstrip().rstrip(";"))

    def cursor(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        named = bool(args and args[0]) or bool(kwargs.get("name"))
        if named and not self._autocommit and not self._native:
            self._go_native()
        return super().cursor(*args, **kwargs)

    def _go_native(self) -> None:
        # psycopg2 refuses named cursors in autocommit mode, so this transaction is handed to
        # psycopg2's own handling. If it already began, psycopg2's extra BEGIN only draws a
        # warning from the server.
        ext.connection.set_session(
            self,
            isolation_level=self._isolation or "DEFAULT",
            readonly=self._readonly,
            deferrable=self._deferrable,
            autocommit=False,
        )
        self._native = True

    def _leave_native(self) -> None:
        self._native = False
        _driver_autocommit.__set__(self, True)

    def commit(self) -> None:
        if self._native:
            try:
                super().commit()
            finally:
                self._leave_native()
        elif self.get_transaction_status() != _IDLE:
            with ext.cursor(self) as cursor:
                cursor.execute("COMMIT")

    def rollback(self) -> None:
        if self._native:
            try:
                super().rollback()
            finally:
                self._leave_native()
        elif self.get_transaction_status() != _IDLE:
            with ext.cursor(self) as cursor:
                cursor.execute("ROLLBACK")
