"""The server programs on a cluster's data directory: ``initdb``, config files, ``pg_ctl``.

:class:`ServerControl` holds the internals of :class:`~flask_neon.local.LocalPostgres`, which
derives from it and adds the public lifecycle and SQL methods.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import tempfile

from .account import account_name, reachable_by
from .binaries import _exe
from .errors import LocalPostgresError

__all__ = ["ServerControl"]

_CONF_NAME = "flask_neon.conf"
_INCLUDE_LINE = f"include_if_exists = '{_CONF_NAME}'"
_HBA_BEGIN = "# BEGIN flask_neon"
_HBA_END = "# END flask_neon"
_LOG_TAIL_LINES = 20
_TIMEOUT = 60
# Durability is pointless for a throwaway cluster; these make writes and startup cheap.
_FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _quote_conf(value: str) -> str:
    # Every GUC accepts a quoted value, so always quoting keeps spaces and quotes safe.
    return "'" + value.replace("'", "''") + "'"


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class ServerControl:
    """Initialises, configures, starts and stops the server of one data directory."""

    host: str
    port: int
    data_dir: pathlib.Path
    socket_dir: pathlib.Path
    log_file: pathlib.Path
    settings: dict[str, str]
    hba: list[str]
    user: str
    _bin: pathlib.Path | None
    _account: tuple[int, int] | None
    _running: bool
    _server_may_run: bool
    _temp_root: pathlib.Path | None
    version: str

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
        try:
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
        except OSError as exc:
            # A read-only or full disk, a folder of another user: one line naming the path.
            raise LocalPostgresError(
                f"Cannot prepare the local PostgreSQL's folders: {exc.strerror}: "
                f"{exc.filename or self.data_dir}"
            ) from None
        self._check_owner()
        self._check_reachable(self.data_dir)
        self._check_reachable(self.socket_dir)

    def _check_owner(self) -> None:
        # PostgreSQL runs only on a data folder owned by the user it runs as.
        if not hasattr(os, "geteuid"):
            return
        owner = self.data_dir.stat().st_uid
        expected = self._account[0] if self._account is not None else os.geteuid()
        if owner != expected:
            owner_name = account_name(owner)
            raise LocalPostgresError(
                f"The data folder {self.data_dir} belongs to the user {owner_name}, but the "
                f"server would run as {account_name(expected)}. Start it as {owner_name}, or "
                f"remove the folder to start afresh (rm -rf {self.data_dir}: its data is lost)."
            )

    def _check_reachable(self, path: pathlib.Path) -> None:
        # Root may enter any directory, but the server user may not: catch that here, where
        # the message can name the culprit, rather than in a terse initdb failure.
        if self._account is None:
            return
        directory = reachable_by(path, self._account)
        if directory is not None:
            raise LocalPostgresError(
                f"The server runs as the `{account_name(self._account[0])}` OS user (PostgreSQL "
                f"refuses root), which cannot enter {directory} to reach {path}. Use a data "
                f"folder it can reach (e.g. under {tempfile.gettempdir()})."
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
            "# Written by flask_neon.local on every start.\n"
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

    def _check_major_version(self) -> None:
        # A data folder is readable only by the major version that made it.
        made_by = (self.data_dir / "PG_VERSION").read_text().strip()
        if made_by != self.version.split(".")[0]:
            raise LocalPostgresError(
                f"The data folder {self.data_dir} was made by PostgreSQL {made_by}; the server "
                f"binaries found are PostgreSQL {self.version} ({self._bin}). Remove the folder "
                f"to start afresh (rm -rf {self.data_dir}: its data is lost), or set PG_BIN to "
                f"PostgreSQL {made_by}'s binaries."
            )

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
