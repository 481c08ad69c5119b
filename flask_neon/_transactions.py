"""Every transaction of flask-neon's engines: opened with its limits and its database context,
with its first statement when that changes nothing anyone can observe (fast BEGIN), and
watched until it ends.

The hooks are SQLAlchemy's dialect events ``do_execute``, ``do_execute_no_params`` and
``do_executemany``, which see each statement below the ``before_cursor_execute`` events that
logging and tracing read. For each statement on a DBAPI connection:

* When the driver would open a transaction before it, the transaction's setup (the
  ``SET LOCAL`` limits through a pooler, the request's settings and role) goes first. With fast
  BEGIN, the driver sends ``BEGIN``, setup and statement in one message (``_drivers``), only
  for a statement of a kind that allows it (``_statements.opens_plainly``), on the driver's
  plain cursor, and while nothing else listens to the event or replaces the dialect's own
  ``do_execute``; otherwise the driver's own ``BEGIN`` goes, then the setup, then the statement
  the usual way ("stepping aside").
* Inside a transaction, the statement must run under the context the transaction began with;
  in a transaction begun behind flask-neon's back, or under another context, or in autocommit,
  a statement that wants a context fails (:class:`~flask_neon.NeonStateError`) before it is sent:
  row-level security fails closed.
* Each transaction remembers whether all its statements were plain reads
  (``_statements.plain_read``): only such a transaction may end after the response
  (``_request``).
"""

from __future__ import annotations

import dataclasses
import typing as t
import weakref
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine.default import DefaultDialect

from . import _drivers
from ._context import DatabaseContext, reset_statements
from ._errors import NeonStateError
from ._statements import first_word, opens_plainly, plain_read

ContextSource = Callable[[], "DatabaseContext | None"]

_AUTOCOMMIT = (
    "a statement in autocommit mode cannot run under the database context (the settings and "
    "role of @db.request_context or db.context()): it would commit on its own, without them. "
    "Run it in a transaction, or on purpose without settings inside `with db.context():`."
)
_UNSEEN = (
    "this transaction began where flask-neon could not apply the database context (a "
    "statement on the raw DBAPI connection opened it, or a COMMIT statement ended the one "
    "flask-neon opened): nothing runs in it without the context. Roll back, and let a "
    "statement through SQLAlchemy begin the transaction."
)
_ANOTHER_CONTEXT = (
    "this transaction began under another database context, whose settings and role would "
    "apply to this statement. Commit or roll back before entering or leaving "
    "db.context(...), or run the block on a connection or session of its own."
)


@dataclasses.dataclass(slots=True)
class Transaction:
    """What flask-neon knows of the transaction open on one DBAPI connection."""

    #: The driver's ``transaction_id`` while it is open.
    identity: int
    #: The context it was begun with (None: none).
    context: DatabaseContext | None
    #: Every statement so far was a plain read (``_statements.plain_read``).
    plain_reads: bool
    #: On a connection that switches contexts (:func:`switch_contexts`): whether it does, the
    #: settings and whether a role were applied by an earlier context, and whether a rollback
    #: to a savepoint may have undone the current one.
    switching: bool = False
    applied_before: frozenset[str] = frozenset()
    role_before: bool = False
    stale: bool = False


_transactions: weakref.WeakKeyDictionary[t.Any, Transaction] = weakref.WeakKeyDictionary()
#: Who counts the statements of every engine right now (``flask_neon.testing``'s round trips):
#: each is called with a statement about to be sent, or None for a ``BEGIN`` sent on its own.
counters: list[Callable[[str | None], None]] = []
_switching: weakref.WeakSet[t.Any] = weakref.WeakSet()
_openers: weakref.WeakKeyDictionary[sa.Dialect, TransactionOpener] = weakref.WeakKeyDictionary()


class TransactionOpener:
    """The dialect events of one engine (see the module).

    Args:
        driver: The module of the engine's DBAPI (``flask_neon._drivers``).
        limits: Statements that open every transaction, e.g. ``SET LOCAL`` session limits
            through a pooler. None by default.
        context: Gives the database context of the transaction beginning now (it may raise:
            then nothing is sent). None: no context ever.
        fast: Open transactions with their first statement where that is identical.
    """

    def __init__(
        self,
        driver: _drivers.Driver,
        limits: t.Sequence[str] = (),
        context: ContextSource | None = None,
        *,
        fast: bool = True,
    ) -> None:
        self.driver = driver
        self.limits = tuple(limits)
        self.context = context
        self.fast = fast and driver.FAST_BEGIN
        #: Called with each statement before it is sent (N+1 detection, ``_nplusone``); it may
        #: raise, and then nothing is sent.
        self.observer: Callable[[str], None] | None = None

    def install(self, engine: sa.Engine | type[sa.Engine]) -> None:
        """Listen to ``engine``'s statements (``engine`` may be the ``Engine`` class: every
        engine then)."""
        if isinstance(engine, sa.Engine):
            _openers[engine.dialect] = self
            if not self.driver.COUNTS_TRANSACTIONS:
                self._watch_ends(engine.dialect)
        # SQLAlchemy calls dialect listeners in the order they came (``insert`` is ignored for
        # them): flask-neon's come first, added as it builds the engine.
        event.listen(engine, "do_execute", self.execute)
        event.listen(engine, "do_execute_no_params", self.execute_no_params)
        event.listen(engine, "do_executemany", self.executemany)

    def _watch_ends(self, dialect: sa.Dialect) -> None:
        """Tell the driver when SQLAlchemy ends a transaction (through the engine's own dialect,
        which every commit and rollback calls, rather than events that would put every statement
        on SQLAlchemy's event path)."""
        driver = self.driver
        commit, rollback = dialect.do_commit, dialect.do_rollback

        def do_commit(dbapi_connection: t.Any) -> None:
            try:
                commit(dbapi_connection)
            finally:
                driver.transaction_ended(dbapi_connection.dbapi_connection)

        def do_rollback(dbapi_connection: t.Any) -> None:
            try:
                rollback(dbapi_connection)
            finally:
                driver.transaction_ended(dbapi_connection.dbapi_connection)

        dialect.do_commit = do_commit  # type: ignore[method-assign]
        dialect.do_rollback = do_rollback  # type: ignore[method-assign]

    # -- the events --------------------------------------------------------------------------

    def execute(self, cursor: t.Any, statement: t.Any, parameters: t.Any, context: t.Any) -> bool:
        """``do_execute``: True when the statement was run here, with its ``BEGIN``."""
        return self._statement(cursor, statement, parameters, context, "do_execute")

    def execute_no_params(self, cursor: t.Any, statement: t.Any, context: t.Any) -> bool:
        """``do_execute_no_params``: as :meth:`execute`."""
        return self._statement(cursor, statement, None, context, "do_execute_no_params")

    def executemany(
        self, cursor: t.Any, statement: t.Any, parameters: t.Any, context: t.Any
    ) -> bool:
        """``do_executemany``: the driver's own ``BEGIN``, then the setup."""
        return self._statement(cursor, statement, parameters, context, None)

    def _statement(
        self,
        cursor: t.Any,
        statement: t.Any,
        parameters: t.Any,
        context: t.Any,
        event_name: str | None,
    ) -> bool:
        """Any statement (``event_name`` None: an ``executemany``); True when run here."""
        if self.observer is not None or counters:
            self._observe(statement)
        connection = cursor.connection
        if not self.driver.owns(connection):
            return False
        if self.driver.opens_transaction(connection):
            return self._open(cursor, statement, parameters, context, event_name)
        self._within(connection, statement, context)
        return False

    def _observe(self, statement: t.Any) -> None:
        if isinstance(statement, str):
            if self.observer is not None:
                self.observer(statement)
            for count in counters:
                count(statement)

    # -- opening and watching --------------------------------------------------------------

    def _wanted(self, context: t.Any) -> DatabaseContext | None:
        # SQLAlchemy checks a new connection (dialect.initialize) in no transaction of its own,
        # from inside the pool's lock: that is nobody's request, so no context is asked for (a
        # context function that queries would wait on that lock for ever).
        if self.context is None or context is None or not context.root_connection.in_transaction():
            return None
        found = self.context()
        return found if found is not None and found.statements else None

    def _open(
        self,
        cursor: t.Any,
        statement: t.Any,
        parameters: t.Any,
        context: t.Any,
        event_name: str | None,
    ) -> bool:
        connection = cursor.connection
        wanted = self._wanted(context)  # may raise: nothing was sent
        setup = self.limits + (wanted.statements if wanted is not None else ())
        reads = isinstance(statement, str) and plain_read(statement) is not False
        _transactions[connection] = Transaction(
            self.driver.transaction_id(connection),
            wanted,
            reads,
            switching=bool(_switching) and connection in _switching,
        )
        if (
            event_name is not None
            and context is not None
            and self.fast
            and isinstance(statement, str)
            and self.driver.plain_cursor(cursor)
            and opens_plainly(statement)
            and _alone(context.dialect, event_name)
        ):
            self.driver.execute_first(cursor, statement, parameters, setup)
            return True
        for count in counters:
            count(None)  # the driver's own BEGIN, a round trip of its own
        # executemany: psycopg2 merges the first set of parameters before its BEGIN.
        first = parameters if event_name is not None or not parameters else parameters[0]
        self.driver.begin_then(connection, setup, cursor, statement, first)
        return False

    def _within(self, connection: t.Any, statement: t.Any, context: t.Any) -> None:
        """A statement inside a transaction (or in autocommit): fail closed, or note it."""
        driver = self.driver
        if driver.in_autocommit(connection):
            if self._wanted(context) is not None:
                raise NeonStateError(_AUTOCOMMIT)
            return
        if not driver.client_in_transaction(connection):
            return  # e.g. a prepared two-phase transaction: the driver refuses it itself
        record = _transactions.get(connection)
        if (
            record is None
            or record.identity != driver.transaction_id(connection)
            or not driver.server_in_transaction(connection)
        ):
            if self._wanted(context) is not None:
                raise NeonStateError(_UNSEEN)
            record = Transaction(driver.transaction_id(connection), None, plain_reads=False)
            _transactions[connection] = record
        elif self.context is not None and context is not None:
            wanted = self._wanted(context)
            if wanted != record.context or record.stale:
                if not record.switching:
                    raise NeonStateError(_ANOTHER_CONTEXT)
                self._switch(connection, record, wanted)
        if record.plain_reads and isinstance(statement, str) and plain_read(statement) is False:
            record.plain_reads = False
        if record.switching and isinstance(statement, str):
            # ROLLBACK TO SAVEPOINT undoes what was set after the savepoint: set it again.
            record.stale = record.stale or first_word(statement) == "ROLLBACK"

    def _switch(
        self, connection: t.Any, record: Transaction, wanted: DatabaseContext | None
    ) -> None:
        """Put ``wanted`` in place of the transaction's context (:func:`switch_contexts`)."""
        previous = record.context
        names = set(previous.settings) if previous is not None else set()
        names |= record.applied_before
        role = record.role_before or (previous is not None and previous.role is not None)
        keep = set(wanted.settings) if wanted is not None else set()
        undo = reset_statements(names - keep, role and (wanted is None or wanted.role is None))
        self.driver.begin_then(connection, undo + (wanted.statements if wanted else ()))
        record.context, record.stale = wanted, False
        record.applied_before, record.role_before = frozenset(names), role


def observe(engine: sa.Engine, observer: Callable[[str], None] | None) -> None:
    """Call ``observer`` with each statement of ``engine`` before it is sent (None: stop)."""
    opener = _openers.get(engine.dialect)
    if opener is not None:
        opener.observer = observer


def switch_contexts(dbapi_connection: t.Any, switching: bool = True) -> None:
    """Let the transactions of ``dbapi_connection`` change their database context between
    statements (or stop that): for a test harness that runs one request after another in one
    transaction (``flask_neon.testing``), which is rolled back at the end. Each statement then
    runs under its own context; nowhere else may a transaction change it."""
    if switching:
        _switching.add(dbapi_connection)
    else:
        _switching.discard(dbapi_connection)


def _alone(dialect: sa.Dialect, event_name: str) -> bool:
    """True when nothing but flask-neon listens to ``event_name`` and the dialect's own method
    runs the statement: a listener added later, or a replaced method, must see it."""
    return (
        len(getattr(dialect.dispatch, event_name)) == 1
        and event_name not in vars(dialect)
        and getattr(type(dialect), event_name) is getattr(DefaultDialect, event_name)
    )


def ends_unobserved(connection: sa.Connection) -> bool:
    """True when ending ``connection``'s transaction after the response cannot be observed:
    none is open on its DBAPI connection, or one whose every statement flask-neon saw and
    found a plain read (it holds no lock but ``ACCESS SHARE`` on what it read)."""
    if connection.closed or connection.invalidated:
        return True
    dbapi_connection = connection.connection.dbapi_connection
    opener = _openers.get(connection.dialect)
    if opener is None or dbapi_connection is None:
        return False
    driver = opener.driver
    if not driver.client_in_transaction(dbapi_connection):
        return not driver.server_in_transaction(dbapi_connection)
    record = _transactions.get(dbapi_connection)
    return (
        record is not None
        and record.plain_reads
        and record.identity == driver.transaction_id(dbapi_connection)
    )
