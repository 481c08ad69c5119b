"""One transaction per test: ``neon_transaction``, ``neon_db_session`` and ``neon_client``."""

from __future__ import annotations

import dataclasses
import typing as t
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask, current_app, has_app_context
from flask.testing import FlaskClient
from sqlalchemy import orm

from .._extension import NeonDB
from .._transactions import switch_contexts
from .schema import _neon_state

__all__ = ["NeonTransaction", "neon_client", "neon_db_session", "neon_transaction"]


@dataclasses.dataclass(frozen=True)
class NeonTransaction:
    """The transaction a test runs in, as the ``neon_transaction`` fixture yields it.

    Attributes:
        app: The ``neon_app``.
        db: Its :class:`~flask_neon.NeonDB`.
        connection: The test's connection. Its transaction is rolled back after the test;
            do not commit it yourself.
        session: An ORM session on ``connection``; its ``commit()`` releases a savepoint.

    Example::

        def test_note_count(neon_transaction):
            neon_transaction.session.add(Note(title="a"))
            neon_transaction.session.commit()
            count = neon_transaction.connection.exec_driver_sql("SELECT count(*) FROM notes")
            assert count.scalar() == 1
    """

    app: Flask
    db: NeonDB
    connection: sa.Connection
    session: orm.Session


def _joined_maker(
    maker: orm.sessionmaker[orm.Session], connection: sa.Connection
) -> orm.sessionmaker[orm.Session]:
    # SQLAlchemy 2.0's recipe for "joining a session into an external transaction": bound to
    # a connection already in a transaction, the session runs in a SAVEPOINT, and its
    # commit() and rollback() end the savepoint, never the test's transaction.
    options = {**maker.kw, "bind": connection, "join_transaction_mode": "create_savepoint"}
    # Per-mapper binds would route statements to the engine, outside the test's transaction.
    options.pop("binds", None)
    return orm.sessionmaker(class_=maker.class_, **options)


class _WriteSessionMaker(orm.sessionmaker[orm.Session]):
    """Makes ``db.read_session`` return the app context's ``db.session`` during a test.

    A second session on the test's connection would take savepoints of its own, and two
    sessions committing in turn release each other's savepoints (SQLAlchemy tracks one stack
    per connection). Sharing the session keeps one stack.
    """

    def __init__(self, db: NeonDB) -> None:
        super().__init__()
        self._db = db

    def __call__(self, **local_kw: t.Any) -> orm.Session:
        return self._db.session


def _end(connection: sa.Connection, transaction: sa.RootTransaction) -> None:
    """Roll back the test's transaction and give the connection back."""
    if not connection.invalidated:
        switch_contexts(connection.connection.dbapi_connection, switching=False)
    try:
        if transaction.is_active:
            transaction.rollback()
    except sa.exc.DBAPIError as error:
        # A lost connection took its transaction with it (the server rolls back the open
        # transaction of a connection that goes away); any other failure is worth reporting.
        connection.invalidate()
        if not error.connection_invalidated:
            raise
    finally:
        connection.close()


@pytest.fixture
def neon_transaction(neon_app: Flask, neon_schema: None) -> Iterator[NeonTransaction]:
    """Run the test in one transaction on one connection, rolled back at the end.

    For the test's duration, every ``db.session`` of ``neon_app`` (one per request or app
    context) joins this connection through a savepoint: ``db.session.commit()`` releases the
    savepoint, ``rollback()`` and the teardown after a failed request roll back to it, and the
    test's own session sees what requests wrote. After the test, passed or failed, the
    transaction is rolled back and the app's sessions use its engine again.

    Example::

        def test_create(neon_transaction, neon_client):
            assert neon_client.post("/notes", json={"title": "a"}).status_code == 201
            assert neon_transaction.session.scalar(sa.select(sa.func.count(Note.id))) == 1
    """
    state = _neon_state(neon_app)
    db = t.cast(NeonDB, state.db)
    if has_app_context() and current_app._get_current_object() is neon_app:  # type: ignore[attr-defined]
        pytest.fail(
            f"an app context of {neon_app.name!r} is already active when the test's transaction "
            "starts (pushed by a session- or module-scoped fixture?). Requests would reuse it, "
            "and its db.session, outside the test's transaction. Push app contexts inside "
            "tests, or in fixtures that depend on neon_transaction.",
            pytrace=False,
        )
    connection = state.engine.connect()
    # Requests and the test's own session take turns in the one transaction: each statement
    # runs under its own database context (row-level security), set in the transaction.
    switch_contexts(connection.connection.dbapi_connection)
    transaction = connection.begin()
    saved = state.sessionmaker, state.read_sessionmaker
    try:
        state.sessionmaker = _joined_maker(saved[0], connection)
        state.read_sessionmaker = _WriteSessionMaker(db)
        session = state.sessionmaker()
        try:
            yield NeonTransaction(neon_app, db, connection, session)
        finally:
            session.close()
    finally:
        # Restored first, so that nothing after the test can reach the closed connection.
        state.sessionmaker, state.read_sessionmaker = saved
        _end(connection, transaction)


@pytest.fixture
def neon_db_session(neon_transaction: NeonTransaction) -> orm.Session:
    """An ORM session inside the test's transaction, to arrange data and check results.

    It shares the connection with every request's ``db.session``: rows a request committed
    are visible here, and rows added here are visible to requests once flushed. Objects it
    loaded before a request changed them keep their old state until
    ``neon_db_session.expire_all()`` (ordinary ORM identity-map behaviour).

    Example::

        def test_list(neon_db_session, neon_client):
            neon_db_session.add(Note(title="a"))
            neon_db_session.commit()
            assert neon_client.get("/notes").json["total"] == 1
    """
    return neon_transaction.session


@pytest.fixture
def neon_client(neon_app: Flask, neon_transaction: NeonTransaction) -> FlaskClient:
    """``neon_app.test_client()``, with every request inside the test's transaction.

    Example::

        def test_delete(neon_client):
            created = neon_client.post("/notes", json={"title": "a"}).json
            assert neon_client.delete(f"/notes/{created['id']}").status_code == 204
    """
    return neon_app.test_client()
