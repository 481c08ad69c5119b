"""The OS user the server programs run as: PostgreSQL refuses to run as root."""

from __future__ import annotations

import os
import pathlib

__all__ = ["account_name", "data_dir_for", "reachable_by", "server_account"]

#: Tried in order when running as root: the usual server account, then the one every
#: Linux has. Neither gets a login or any file outside the cluster's folders.
_ACCOUNTS = ("postgres", "nobody")


def server_account() -> tuple[int, int] | None:
    """Return the (uid, gid) to run the server as, or None to run as the current user."""
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None or geteuid() != 0:
        return None
    import pwd

    for name in _ACCOUNTS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    from .errors import LocalPostgresError

    raise LocalPostgresError(
        "Running as root, but PostgreSQL refuses to run as root and there is neither a "
        "`postgres` nor a `nobody` OS user to run it as. Create one (useradd --system "
        "postgres), run as another user, or set DB_URL to an existing database."
    )


def account_name(uid: int) -> str:
    """The OS user name of ``uid`` (the number when it has none)."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def reachable_by(path: pathlib.Path, account: tuple[int, int]) -> pathlib.Path | None:
    """The first folder above ``path`` that ``account`` may not enter, or None."""
    uid, gid = account
    for directory in reversed(path.parents):
        if not directory.exists():
            break  # made later, by this process, with permissions that let it in
        st = directory.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return directory
    return None


#: Where root's server keeps a project's data when the project folder is closed to it.
STATE_ROOT = pathlib.Path("/var/tmp/flask-neon")


def data_dir_for(preferred: pathlib.Path) -> pathlib.Path:
    """``preferred``, or where the server user can keep the project's data when it cannot.

    As root, the project often sits in a folder only root may enter (``/root`` is 0700 in
    every container); its permissions are left alone and the data goes to a per-project
    folder under :data:`STATE_ROOT` instead, the same one on every start.
    """
    account = server_account()
    preferred = preferred.resolve()
    if account is None or reachable_by(preferred, account) is None:
        return preferred
    import hashlib

    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:8]
    project = preferred.parent.parent.name if preferred.parent.name == "instance" else ""
    return STATE_ROOT / f"{project or 'project'}-{digest}" / preferred.name
