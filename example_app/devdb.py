"""A local PostgreSQL for development, so that the app runs with no database set up.

When no ``DB_URL`` is configured, :func:`use_local_database` runs a private server (with
:class:`flask_neon.local.LocalPostgres`) whose data lives in ``instance/pgdata``, so notes
survive restarts. The process that starts the server stops it at exit; a process that finds
it already running (the child that ``flask run --debug`` reloads, a second ``flask`` command)
uses it and leaves it running.
"""

from __future__ import annotations

import os
import pathlib
import typing as t

import psycopg2  # type: ignore[import-untyped]
import sqlalchemy as sa
from dotenv import dotenv_values
from flask import Flask
from flask.cli import NoAppException

if t.TYPE_CHECKING:
    from flask_neon.local import LocalPostgres

#: The database created for the app on the local server.
DATABASE = "example_app"
#: LocalPostgres's superuser; it connects without a password (trust authentication).
USER = "postgres"


def database_url_configured(
    config: t.Mapping[str, t.Any], env_file: str | os.PathLike[str] | None
) -> bool:
    """Whether ``DB_URL`` is set where flask-neon looks: app.config, the environment, .env."""
    has_dotenv = env_file is not None and os.path.isfile(env_file)
    dotenv = dotenv_values(env_file) if has_dotenv else {}
    return any(
        isinstance(value, str) and value.strip()
        for value in (config.get("DB_URL"), os.environ.get("DB_URL"), dotenv.get("DB_URL"))
    )


def use_local_database(app: Flask) -> LocalPostgres | None:
    """Point ``app`` at the local server in ``<instance path>/pgdata``, starting it if needed.

    Sets ``app.config["DB_URL"]`` to the URL of its :data:`DATABASE` database, a
    ``postgresql://`` URL: the app's ``DB_DRIVER`` picks the driver.

    Returns:
        The server if this call started it (it is stopped at interpreter exit, or by calling
        its ``stop()``), ``None`` if it was already running.

    Raises:
        flask_neon.local.LocalPostgresError: no PostgreSQL installation was found or the
            server failed to start; the message says what to install or set.
    """
    # Imported here, when needed: an app with DB_URL set never loads the local server code.
    from flask_neon.local import LocalPostgres, LocalPostgresError, data_dir_for

    class LocalDatabaseError(LocalPostgresError, NoAppException):
        """The local server could not start: one line from ``flask``, not a traceback."""

        def __init__(self, message: str) -> None:
            NoAppException.__init__(self, message)

    # As root, a project folder the server user cannot enter keeps its data elsewhere.
    data_dir = data_dir_for(pathlib.Path(app.instance_path) / "pgdata")
    port = running_port(data_dir)
    if port is not None:
        app.config["DB_URL"] = _url(port)
        app.logger.warning(
            "DB_URL is not set: using the local throwaway PostgreSQL already running on port "
            "%d, data in %s. The process that started it stops it; if that one is gone, "
            "run `pg_ctl stop -D %s`.",
            port,
            data_dir,
            data_dir,
        )
        return None

    # LocalPostgres stops the server at interpreter exit by itself, and only in the process
    # that started it, so a reloaded child never stops its parent's server.
    try:
        cluster = LocalPostgres(data_dir, database=DATABASE).start()
    except LocalPostgresError as exc:
        # `flask run` prints a NoAppException as one line; anything else as a traceback.
        raise LocalDatabaseError(str(exc)) from None
    app.config["DB_URL"] = cluster.url_for(DATABASE, driver=None)
    app.logger.warning(
        "DB_URL is not set: started a local PostgreSQL %s (%s) on port %d, data in %s "
        "(kept for the next start; remove it with: rm -rf %s). Set DB_URL to use your own "
        "database.",
        cluster.version,
        cluster.binaries,
        cluster.port,
        data_dir,
        data_dir,
    )
    return cluster


def running_port(data_dir: pathlib.Path) -> int | None:
    """The port of a server that is running on ``data_dir`` and accepts connections, or None.

    A running server keeps ``postmaster.pid`` in its data directory; line 4 is the port
    (https://www.postgresql.org/docs/current/storage-file-layout.html). The file outlives a
    crashed server, so the answer is trusted only when a server on that port says that
    ``data_dir`` is its data directory.
    """
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        port = int(lines[3])
    except (OSError, IndexError, ValueError):
        # No file: no server. A short or garbled file: a server still starting up or gone.
        return None
    try:
        connection = psycopg2.connect(
            host="127.0.0.1", port=port, user=USER, dbname="postgres", connect_timeout=5
        )
        try:
            with connection.cursor() as cursor:
                cursor.execute("SHOW data_directory")
                (server_data_dir,) = cursor.fetchone()
        finally:
            connection.close()
        # Another server may have taken the port since: compare the directories themselves.
        same = os.path.samefile(server_data_dir, data_dir)
    except (psycopg2.Error, OSError):
        # Nothing listening, a server we may not query, or one whose directory is not here.
        return None
    return port if same else None


def _url(port: int) -> str:
    url = sa.URL.create(
        "postgresql", username=USER, host="127.0.0.1", port=port, database=DATABASE
    )
    return url.render_as_string(hide_password=False)
