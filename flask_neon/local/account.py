"""The OS user the server programs run as: PostgreSQL refuses to run as root."""

from __future__ import annotations

import os

from .errors import LocalPostgresError

__all__ = ["server_account"]


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
