"""Throwaway local PostgreSQL clusters for development and tests.

:class:`LocalPostgres` runs ``initdb`` and ``pg_ctl`` from a local PostgreSQL installation
to start a private server on a free port of ``127.0.0.1``, tuned for speed rather than
durability. It is meant for test suites and for running an app without any database set up::

    with LocalPostgres() as pg:
        engine = sqlalchemy.create_engine(pg.url)

:func:`ensure_database_url` returns ``$DB_URL`` when it is set and otherwise starts such a
cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import typing as t
import urllib.parse
import warnings

import psycopg2  # type: ignore[import-untyped]
import psycopg2.sql  # type: ignore[import-untyped]

if t.TYPE_CHECKING:
    import types

__all__ = [
    "LocalPostgres",
    "LocalPostgresError",
    "ensure_database_url",
    "find_pg_bin",
    "server_account",
]

_SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_DEBIAN_GLOB = "/usr/lib/postgresql/*/bin"
_CONF_NAME = "flask_neon.conf"
_INCLUDE_LINE = f"include_if_exists = '{_CONF_NAME}'"
_HBA_BEGIN = "# BEGIN flask_neon"
_HBA_END = "# END flask_neon"
_LOG_TAIL_LINES = 20
_PORT_ATTEMPTS = 3
_TIMEOUT = 60
# Leaves room for "/.s.PGSQL.65535.lock" within the ~107 byte Unix socket path limit.
_MAX_SOCKET_DIR_LEN = 80
# Durability is pointless for a throwaway cluster; these make writes and startup cheap.
_FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class LocalPostgresError(RuntimeError):
    """A local PostgreSQL cluster could not be found, started or stopped.

    The message says what went wrong and what to install or change.
    """


def _exe(directory: pathlib.Path, name: str) -> pathlib.Path:
    return directory / (name + ".exe" if os.name == "nt" else name)


def _is_executable(path: pathlib.Path) -> bool:
    # PATH may name directories this user cannot read (e.g. root's, after `su`).
    try:
        return path.is_file() and os.access(path, os.X_OK)
    except OSError:
        return False


def _has_server_programs(directory: pathlib.Path) -> bool:
    return all(_is_executable(_exe(directory, name)) for name in _SERVER_PROGRAMS)


def _version_key(path: pathlib.Path) -> tuple[int, ...]:
    # The version is the directory above ``bin``: "15", "9.6".
    try:
        return tuple(int(part) for part in path.parent.name.split("."))
    except ValueError:
        return (-1,)


def _pgserver_bin() -> pathlib.Path | None:
    # The pgserver package bundles PostgreSQL binaries; its module layout changed between
    # releases, hence the two places to look.
    for module_name in ("pgserver._commands", "pgserver.postgres_server"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        bin_path = getattr(module, "POSTGRES_BIN_PATH", None)
        if bin_path is not None and _has_server_programs(pathlib.Path(bin_path)):
            return pathlib.Path(bin_path)
    return None


def find_pg_bin() -> pathlib.Path:
    """Find the directory that holds the PostgreSQL server programs.

    The directory must contain ``initdb``, ``pg_ctl`` and ``postgres``. Places are tried in
    this order:

    1. the ``PG_BIN`` environment variable (if set, it must be valid);
    2. each ``PATH`` entry holding one of the programs, after resolving symlinks (so that a
       ``pg_ctl`` symlink leads to its real directory, and a lone wrapper script is skipped);
    3. the highest version in ``/usr/lib/postgresql/*/bin`` (Debian and Ubuntu);
    4. the binaries bundled with the ``pgserver`` package, if it is installed.

    Returns:
        The directory, resolved.

    Raises:
        LocalPostgresError: ``PG_BIN`` is set but lacks the programs, or none were found.
    """
    explicit = os.environ.get("PG_BIN")
    if explicit:
        directory = pathlib.Path(explicit).expanduser()
        if not _has_server_programs(directory):
            raise LocalPostgresError(
                f"PG_BIN is set to {explicit!r}, but that directory does not contain the "
                f"PostgreSQL server programs ({', '.join(_SERVER_PROGRAMS)}). Point PG_BIN at "
                "the directory that does (e.g. /usr/lib/postgresql/15/bin) or unset it."
            )
        return directory.resolve()

    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry:
            continue
        for name in _SERVER_PROGRAMS:
            program = _exe(pathlib.Path(entry), name)
            if not _is_executable(program):
                continue
            for candidate in (program.resolve().parent, pathlib.Path(entry)):
                if _has_server_programs(candidate):
                    return candidate.resolve()

    versions = [
        path
        for path in pathlib.Path("/").glob(_DEBIAN_GLOB.lstrip("/"))
        if _has_server_programs(path)
    ]
    if versions:
        return max(versions, key=_version_key)

    bundled = _pgserver_bin()
    if bundled is not None:
        return bundled

    raise LocalPostgresError(
        f"No PostgreSQL server binaries found (looked on PATH and in {_DEBIAN_GLOB}). "
        "Install them, e.g. `apt-get install postgresql` or `brew install postgresql` "
        "(or `pip install pgserver`), or set DB_URL to an existing database."
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def server_account() -> tuple[int, int] | None:
    """Return the (uid, gid) to run the server as, or None to run as the current user."""
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None or geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise LocalPostgresError(
            "Running as root, but PostgreSQL refuses to run as root and there is no "
            "`postgres` OS user to run it as. Create one (e.g. `useradd --system postgres`, "
            "which installing the postgresql package also does), run as a non-root user, "
            "or set DB_URL to an existing database."
        ) from None
    return entry.pw_uid, entry.pw_gid


def _quote_conf(value: str) -> str:
    # Every GUC accepts a quoted value, so always quoting keeps spaces and quotes safe.
    return "'" + value.replace("'", "''") + "'"


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class LocalPostgres:
    """A private PostgreSQL server in a (by default temporary) data directory.

    The server listens on ``127.0.0.1`` only, trusts every local connection, and runs with
    ``fsync``, ``synchronous_commit`` and ``full_page_writes`` off. As root, the server
    programs run as the ``postgres`` OS user, since PostgreSQL refuses to run as root.

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
        """
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
    def url(self) -> str:
        """SQLAlchemy URL of the default database.

        For example ``postgresql+psycopg2://postgres@127.0.0.1:54321/postgres``.
        """
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """Return the SQLAlchemy URL of ``database`` on this server.

        Args:
            database: Database name (need not exist yet).

        Returns:
            A ``postgresql+psycopg2://`` URL without a password (authentication is trust).
        """
        user = urllib.parse.quote(self.user, safe="")
        name = urllib.parse.quote(database, safe="")
        return f"postgresql+psycopg2://{user}@{self.host}:{self.port}/{name}"

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
        self._bin = find_pg_bin()
        self._account = server_account()
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
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

    # -- internals -------------------------------------------------------------------------

    def _make_temp_root(self) -> None:
        # A short prefix keeps the Unix socket path below the ~107 byte limit.
        root = pathlib.Path(tempfile.mkdtemp(prefix="fnpg-"))
        self._temp_root = root
        self.data_dir = root / "data"
        self.socket_dir = root / "sock"
        self.log_file = root / "postgres.log"

    def _chown(self, path: pathlib.Path) -> None:
        if self._account is not None:
            os.chown(path, *self._account)

    def _prepare_dirs(self) -> None:
        if self._temp_root is not None:
            # mkdtemp makes a 0700 directory, which the server user must be able to enter.
            self._chown(self._temp_root)
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._chown(self.socket_dir)
        if not self.data_dir.exists():
            self.data_dir.mkdir(mode=0o700, parents=True)
            self._chown(self.data_dir)
        if not self.log_file.exists():
            # Created here so the server user needs no write access to the parent.
            self.log_file.touch(mode=0o600)
            self._chown(self.log_file)
        self._check_reachable(self.data_dir)
        self._check_reachable(self.socket_dir)

    def _check_reachable(self, path: pathlib.Path) -> None:
        # Root may enter any directory, but the server user may not: catch that here, where
        # the message can name the culprit, rather than in a terse initdb failure.
        if self._account is None:
            return
        uid, gid = self._account
        for directory in reversed(path.parents):
            st = directory.stat()
            bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
            if not st.st_mode & bit:
                raise LocalPostgresError(
                    f"The server runs as the `postgres` OS user (PostgreSQL refuses root), "
                    f"which cannot enter {directory} to reach {path}. Use a data_dir it can "
                    f"reach (e.g. under {tempfile.gettempdir()}) or `chmod o+x {directory}`."
                )

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        assert self._bin is not None, "find_pg_bin() runs first, in start()"
        command = [str(_exe(self._bin, program)), *args]
        if program == "pg_ctl":
            command += ["-t", str(_TIMEOUT)]
        # libpq variables from the caller's environment (PGDATA, PGPORT, ...) must not
        # redirect the server programs.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        uid, gid = self._account if self._account is not None else (None, None)
        try:
            return subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=env,
                # The server user may not be allowed into the caller's working directory.
                cwd="/",
                timeout=_TIMEOUT + 30,
                user=uid,
                group=gid,
                extra_groups=[] if uid is not None else None,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LocalPostgresError(f"Running {command[0]} failed: {exc}") from exc

    def _initdb(self) -> None:
        result = self._run(
            "initdb",
            *("-D", str(self.data_dir), "-U", self.user, "-A", "trust"),
            *("-E", "UTF8", "--no-locale", "--no-sync"),
        )
        if result.returncode != 0:
            output = _tail(result.stdout + result.stderr)
            raise LocalPostgresError(f"initdb failed for {self.data_dir}:\n{output}")

    def _write_conf(self) -> None:
        conf = self.data_dir / "postgresql.conf"
        text = conf.read_text()
        if _INCLUDE_LINE not in text.splitlines():
            # Appended once; our settings live in their own file, rewritten on every start.
            with conf.open("a") as fh:
                fh.write(f"\n{_INCLUDE_LINE}\n")
        values = {
            "port": str(self.port),
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            "logging_collector": "off",
            **_FAST_SETTINGS,
            **self.settings,
        }
        ours = self.data_dir / _CONF_NAME
        ours.write_text(
            "# Written by flask_neon.localdb on every start.\n"
            + "".join(f"{name} = {_quote_conf(value)}\n" for name, value in values.items())
        )
        self._chown(ours)

    def _write_hba(self) -> None:
        hba = self.data_dir / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        if _HBA_BEGIN in lines and _HBA_END in lines:
            del lines[lines.index(_HBA_BEGIN) : lines.index(_HBA_END) + 1]
        if self.hba:
            lines = [_HBA_BEGIN, *self.hba, _HBA_END, *lines]
        hba.write_text("\n".join(lines) + "\n")

    def _pg_ctl_start(self, *, retry_if_port_taken: bool) -> bool:
        """Start the server; False means the port was taken and the caller may retry."""
        log_offset = self.log_file.stat().st_size
        self._server_may_run = True
        result = self._run(
            "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file), "-w"
        )
        if result.returncode == 0:
            self._running = True
            return True

        with self.log_file.open(errors="replace") as fh:
            fh.seek(log_offset)
            log = fh.read()
        # A server still starting up after a pg_ctl timeout must not linger.
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w")
        self._server_may_run = False
        if retry_if_port_taken and "Address already in use" in log:
            return False
        details = _tail(log) or _tail(result.stdout + result.stderr)
        raise LocalPostgresError(
            f"PostgreSQL failed to start (data directory {self.data_dir}, port {self.port}). "
            f"Last lines of the server log {self.log_file}:\n{details}"
        )


def ensure_database_url(env_var: str = "DB_URL") -> tuple[str, LocalPostgres | None]:
    """Return a database URL: ``$env_var`` if set, else that of a new local cluster.

    Args:
        env_var: Environment variable holding an existing database's URL.

    Returns:
        ``(url, None)`` when the variable is set and non-empty, otherwise ``(url, cluster)``
        for a freshly started :class:`LocalPostgres`, which the caller must :meth:`stop
        <LocalPostgres.stop>` (it is also stopped at interpreter exit).

    Raises:
        LocalPostgresError: The variable is unset and no local cluster could be started.
    """
    url = os.environ.get(env_var)
    if url:
        return url, None
    cluster = LocalPostgres()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster.url, cluster
