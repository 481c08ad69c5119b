"""Throwaway local PostgreSQL clusters for development and tests.

:class:`LocalPostgres` runs ``initdb`` and ``pg_ctl`` from a local PostgreSQL installation
to start a private server on a free port of ``127.0.0.1``, tuned for speed rather than
durability. It is meant for test suites and for running an app without any database set up::

    with LocalPostgres() as pg:
        engine = sqlalchemy.create_engine(pg.url)

:func:`ensure_database_url` returns ``$DB_URL`` when it is set and otherwise starts such a
cluster.

Nothing in flask-neon imports this package on an app's normal start: import it where a local
server is wanted.

Modules:
    ``errors``: :class:`LocalPostgresError`.
    ``binaries``: :func:`find_pg_bin`, finding the server programs.
    ``account``: :func:`server_account`, the OS user the server runs as under root.
    ``server``: ``initdb``, the configuration files and ``pg_ctl`` on a data directory.
    ``cluster``: :class:`LocalPostgres`, a cluster's lifecycle and SQL.
    ``database_url``: :func:`ensure_database_url`.
"""

from __future__ import annotations

from .account import data_dir_for, server_account
from .binaries import find_pg_bin
from .cluster import LocalPostgres
from .database_url import ensure_database_url
from .errors import LocalPostgresError
from .server import _free_port as _free_port

__all__ = [
    "LocalPostgres",
    "LocalPostgresError",
    "data_dir_for",
    "ensure_database_url",
    "find_pg_bin",
    "server_account",
]
