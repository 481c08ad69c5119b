"""Copied by .ci/flask_migrate_suite.py next to Flask-Migrate's own tests, at run time: points
them at PostgreSQL.

Each test gets fresh PostgreSQL databases, one per SQLite file name the apps use
(``app.db``, ``app1.db``, ``app2.db``); their URLs reach the apps (and the ``flask`` commands
the tests run) as ``FM_URL_APP``, ``FM_URL_APP1``... The tests inspect a database with
``sqlite3.connect("app1.db")`` and ``select name from sqlite_master``: that one query is
answered by the matching PostgreSQL database's ``information_schema``.
"""

from __future__ import annotations

import os
import sys
import types
import typing as t

import psycopg2
import pytest
import sqlalchemy as sa

NAMES = ("app", "app1", "app2")
BASE_URL = os.environ["FM_BASE_URL"]  # an admin URL of the test server


def url_for(name: str) -> str:
    database = f"{os.environ['FM_PREFIX']}_{name}"
    return sa.make_url(BASE_URL).set(database=database).render_as_string(hide_password=False)


def libpq(url: str) -> str:
    """``url`` as libpq reads it (no SQLAlchemy driver name): the apps' driver may be either."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def admin(statement: str) -> None:
    connection = psycopg2.connect(libpq(BASE_URL))
    connection.autocommit = True
    try:
        connection.cursor().execute(statement)
    finally:
        connection.close()


@pytest.fixture(autouse=True)
def fresh_databases() -> None:
    for name in NAMES:
        database = sa.make_url(url_for(name)).database
        admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin(f'CREATE DATABASE "{database}"')
        os.environ[f"FM_URL_{name.upper()}"] = url_for(name)


class _Cursor:
    def __init__(self, connection: t.Any) -> None:
        self._cursor = connection.cursor()

    def execute(self, query: str) -> None:
        assert query == "select name from sqlite_master", query
        self._cursor.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )

    def fetchall(self) -> list[tuple[str]]:
        return list(self._cursor.fetchall())


class _Connection:
    def __init__(self, filename: str) -> None:
        self._connection = psycopg2.connect(libpq(url_for(filename.removesuffix(".db"))))

    def cursor(self) -> _Cursor:
        return _Cursor(self._connection)

    def close(self) -> None:
        self._connection.close()


sqlite3 = types.ModuleType("sqlite3")
sqlite3.connect = _Connection  # type: ignore[attr-defined]
sys.modules["sqlite3"] = sqlite3  # imported by the test modules after this conftest
