"""Finding the PostgreSQL server programs (``initdb``, ``pg_ctl``, ``postgres``)."""

from __future__ import annotations

import importlib
import os
import pathlib

from .errors import LocalPostgresError

__all__ = ["find_pg_bin"]

_SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_DEBIAN_GLOB = "/usr/lib/postgresql/*/bin"


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
