"""pytest fixtures for apps built on flask-neon: a real PostgreSQL, and a rollback per test.

Every test that asks for :func:`neon_transaction` (or :func:`neon_db_session`,
:func:`neon_client`) runs inside one database transaction on one connection, rolled back when
the test ends, whether it passed or failed. Code under test may call ``db.session.commit()``
as often as it likes, in as many requests as it likes: each ``db.session`` joins the test's
connection through a SAVEPOINT, so a commit releases the savepoint and the final rollback
still undoes everything. Nothing is mocked: the SQL runs on PostgreSQL.

The plugin is opt-in: installing flask-neon registers it with pytest (the ``pytest11`` entry
point ``flask_neon.testing``), but it does nothing until a test asks for one of its fixtures,
and none is ``autouse``. ``-p no:flask_neon.testing`` turns it off; where plugin autoloading is
disabled, ``-p flask_neon.testing`` turns it on.

Fixtures:
    ``neon_database_url`` (session): the URL of the test database. ``$FLASK_NEON_TEST_URL``
        when set (checked once; a database the tests may fill and empty, never one with
        data you need), else a throwaway local PostgreSQL started for the test session, with
        a fresh ``flask_neon_test`` database, stopped at the end.
    ``neon_app`` (session): **yours to define** in ``conftest.py``: the Flask app, with
        flask-neon initialised on ``neon_database_url``.
    ``neon_migrations_dir`` (session): define it to return your migrations directory, and
        the schema is built by Flask-Migrate's ``upgrade`` instead of ``create_all()``.
    ``neon_schema`` (session): creates the tables once per test session with
        ``db.metadata.create_all()`` (and drops the ones it created at the end), or runs the
        migrations. Override it with a fixture that does nothing to manage the schema
        yourself.
    ``neon_transaction`` (function): the test's transaction, a :class:`NeonTransaction`
        with ``.connection`` and ``.session``.
    ``neon_db_session`` (function): ``neon_transaction.session``, an ORM session on the
        test's connection, for arranging data and checking results.
    ``neon_client`` (function): ``neon_app.test_client()``, inside the test's transaction.
    ``db_round_trips`` (function): :func:`round_trips`, which counts the round trips of a
        block and fails it over a maximum: ``with db_round_trips(max=2): client.get("/")``.

Marker ``@pytest.mark.no_nplusone``: an N+1 that flask-neon finds in ``neon_app`` during the
test fails it (``NPlusOneError``), as ``DB_NPLUSONE=raise`` does for every test.

Example ``conftest.py``::

    import pathlib

    import pytest

    from myapp import create_app


    @pytest.fixture(scope="session")
    def neon_app(neon_database_url):
        return create_app({"TESTING": True, "DB_URL": neon_database_url})


    # Optional: build the schema with your migrations rather than db.metadata.create_all().
    @pytest.fixture(scope="session")
    def neon_migrations_dir():
        return pathlib.Path(__file__).parent / "migrations"

and a test module::

    import sqlalchemy as sa

    from myapp.models import Note


    def test_create_note(neon_client, neon_db_session):
        response = neon_client.post("/notes", json={"title": "Buy milk"})
        assert response.status_code == 201
        assert neon_db_session.scalar(sa.select(sa.func.count()).select_from(Note)) == 1


    def test_each_test_starts_empty(neon_db_session):
        assert neon_db_session.scalar(sa.select(sa.func.count()).select_from(Note)) == 0

Run ``pytest``: without ``FLASK_NEON_TEST_URL`` the plugin needs the PostgreSQL server
programs (``pip install 'flask-neon[local]'``, ``apt-get install postgresql`` or
``brew install postgresql``); with neither, the run stops with one message saying so.

Limits:
    * Only ``db.session`` and ``db.read_session`` join the test's transaction. Code that opens
      its own connections (``db.engine.connect()``, ``db.get_engine()``) works outside it and
      its writes stay, and it waits on rows the test has locked.
    * All sessions share the test's connection, whose savepoints form one stack: a session
      must not commit while one opened after it is still open. Requests never break this
      (their session ends with the request), but an app context held open in a test while
      ``neon_db_session`` is used and committed can.
    * For the same reason, ``db.read_session`` is ``db.session`` during a test: neither
      read-only nor on the replica (which could not see the test's rows anyway).
    * Do not push an app context of ``neon_app`` for the whole session (e.g. in a fixture
      around ``yield``): requests would reuse it, and its ``db.session``, across tests.
      Push app contexts inside tests; ``neon_transaction`` refuses to start otherwise.
    * With ``FLASK_NEON_TEST_URL`` set, parallel runs (pytest-xdist) share one database and
      race on the schema; leave it unset so that each worker starts its own server.
"""

from __future__ import annotations

# pytest registers this module as the plugin (the ``pytest11`` entry point): the fixtures
# must be names of this module, wherever they are defined.
from .database import CONNECT_TIMEOUT as CONNECT_TIMEOUT
from .database import TEST_DATABASE, TEST_URL_ENV, neon_database_url
from .nplusone import (
    RoundTrips,
    db_round_trips,
    neon_forbid_nplusone,
    pytest_collection_modifyitems,
    pytest_configure,
    round_trips,
)
from .schema import DROP_LOCK_TIMEOUT as DROP_LOCK_TIMEOUT
from .schema import neon_app, neon_migrations_dir, neon_schema
from .transaction import NeonTransaction, neon_client, neon_db_session, neon_transaction

__all__ = [
    "TEST_DATABASE",
    "TEST_URL_ENV",
    "NeonTransaction",
    "RoundTrips",
    "db_round_trips",
    "neon_app",
    "neon_client",
    "neon_database_url",
    "neon_db_session",
    "neon_forbid_nplusone",
    "neon_migrations_dir",
    "neon_schema",
    "neon_transaction",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "round_trips",
]
