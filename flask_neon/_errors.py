"""Exceptions raised by flask-neon, and the one place that names the cause of a driver error.

Every surface that reports a database failure (the startup check, ``flask db-check``, the health
log, the 503 error handler) goes through :func:`classify`, so an operator reads the same cause
and the same hint everywhere, and never the password.
"""

from __future__ import annotations

import dataclasses
import re
import typing as t
from urllib.parse import quote, quote_plus

import sqlalchemy.exc as sa_exc


class NeonError(Exception):
    """Base class of every exception flask-neon raises."""


class NeonConfigError(NeonError, ValueError):
    """A setting is missing or invalid.

    Raised by :meth:`NeonDB.init_app <flask_neon.NeonDB.init_app>`. The message names the setting,
    the value (never a password) and what is allowed.
    """


class NeonStateError(NeonError, RuntimeError):
    """The extension is used where it cannot work: before ``init_app`` or outside an app
    context."""


class DatabaseUnavailableError(NeonError):
    """The database could not be reached or answered with a failure an operator must act on.

    Attributes:
        cause: The classified cause (``cause.name`` is stable and machine-readable).
    """

    def __init__(self, cause: ErrorCause, context: str = "") -> None:
        self.cause = cause
        prefix = f"{context}: " if context else ""
        super().__init__(f"{prefix}{cause.title}. {cause.detail}\nHint: {cause.hint}")


@dataclasses.dataclass(frozen=True)
class ErrorCause:
    """A driver error translated for people.

    Attributes:
        name: Stable identifier, e.g. ``"auth_failed"`` or ``"pool_exhausted"``.
        title: One line saying what went wrong.
        hint: What to do about it.
        detail: The driver's own message with secrets masked (may be empty).
        transient: True when retrying later can succeed without anyone changing anything. The
            one switch for every policy: connects are retried, ``flask db-check --wait``
            waits, and a request that fails with it is answered ``503`` with ``Retry-After``.
        sqlstate: The server's SQLSTATE when it sent one.
    """

    name: str
    title: str
    hint: str
    detail: str = ""
    transient: bool = False
    sqlstate: str | None = None

    def as_dict(self) -> dict[str, t.Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Rule:
    name: str
    title: str
    hint: str
    # Said by every rule: whether waiting and trying again can succeed (see ErrorCause).
    transient: bool
    sqlstates: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()


# Order matters: the first rule that matches wins, so specific messages come before broad ones
# (a TLS failure also mentions the server closing the connection, for example). Patterns are
# matched against the lowered message; the server's messages are assumed untranslated
# (lc_messages C); neither driver gives a SQLSTATE for a failed connect, only the text.
_RULES: tuple[_Rule, ...] = (
    _Rule(
        "pool_exhausted",
        "Connection pool exhausted",
        "Every pooled connection stayed checked out for DB_POOL_TIMEOUT seconds. Look for "
        "slow requests or connection leaks, or raise DB_POOL_SIZE / DB_MAX_OVERFLOW (staying "
        "under the server's max_connections).",
        transient=True,
        patterns=(r"queuepool limit of size",),
    ),
    _Rule(
        "compute_waking",
        "The Neon compute is waking up",
        "The compute was suspended and is starting; retry in a moment. Keep DB_CONNECT_TIMEOUT "
        "at 10-15 s so the first connection after a suspend can wait for it.",
        transient=True,
        patterns=(r"couldn't connect to compute node",),
    ),
    _Rule(
        "endpoint_id_missing",
        "Neon could not tell which endpoint to connect to",
        "The client library does not send SNI. Upgrade psycopg2-binary (>= 2.9.10), or add "
        "options=endpoint%3D<endpoint-id> to DB_URL.",
        transient=False,
        patterns=(r"endpoint id is not specified", r"inconsistent project name"),
    ),
    _Rule(
        "pooler_rejected_parameter",
        "The connection pooler rejected a startup parameter",
        "PgBouncer only accepts a few startup parameters. Remove 'options' from DB_URL, or set "
        "DB_POOLED=true so flask-neon sends the session limits per transaction instead.",
        transient=False,
        patterns=(r"unsupported startup parameter",),
    ),
    _Rule(
        "auth_failed",
        "Password authentication failed",
        "Check the user name and password in DB_URL (on Neon: reset the role's password in the "
        "console and copy the new connection string).",
        transient=False,
        sqlstates=("28P01",),
        patterns=(r"password authentication failed", r"no password supplied"),
    ),
    _Rule(
        "role_missing",
        "The role does not exist",
        "Check the user name in DB_URL, or create the role.",
        transient=False,
        patterns=(r'role "[^"]*" does not exist',),
    ),
    _Rule(
        "database_missing",
        "The database does not exist",
        "Check the database name at the end of DB_URL, or create the database.",
        transient=False,
        sqlstates=("3D000",),
        patterns=(r'database "[^"]*" does not exist',),
    ),
    _Rule(
        "cert_verify_failed",
        "The server certificate does not verify",
        "With sslmode=verify-full or verify-ca the server certificate must be signed by the CA "
        "in sslrootcert (or the system store with sslrootcert=system) and match the host name.",
        transient=False,
        patterns=(
            r"certificate verify failed",
            r"server certificate for .* does not match host name",
            r"root certificate file .* does not exist",
            r"could not read root certificate",
        ),
    ),
    _Rule(
        "tls_required",
        "TLS is required but not in use",
        "Neon refuses plaintext: add sslmode=require (better: verify-full) to DB_URL. If the "
        "server has no TLS at all, it cannot serve a client that requires it.",
        transient=False,
        patterns=(
            r"connection is insecure",
            r"server does not support ssl, but ssl was required",
            r"pg_hba\.conf (rejects connection|entry) .*no encryption",
            r"ssl off",
        ),
    ),
    _Rule(
        "tls_failed",
        "The TLS handshake failed",
        "Check sslmode, sslrootcert and the server's TLS configuration.",
        transient=True,
        patterns=(r"ssl error", r"could not establish ssl", r"tlsv1 alert", r"ssl handshake"),
    ),
    _Rule(
        "too_many_connections",
        "The server has no connection slots left",
        "Workers x (DB_POOL_SIZE + DB_MAX_OVERFLOW) must stay under max_connections (Neon: 104 "
        "at 0.25 CU, 419 at 1 CU), and under the role's or the database's CONNECTION LIMIT if "
        "the message names one. Lower the pool, use the -pooler host, or a larger compute.",
        transient=True,
        sqlstates=("53300",),
        patterns=(
            r"remaining connection slots are reserved",
            r"too many clients already",
            r"too many connections for (role|database)",
        ),
    ),
    _Rule(
        "statement_timeout",
        "The statement was cancelled by statement_timeout",
        "The query ran longer than DB_STATEMENT_TIMEOUT. Make it faster (an index?), or raise "
        "the limit for this work.",
        transient=False,
        sqlstates=("57014",),
        patterns=(r"canceling statement due to statement timeout",),
    ),
    _Rule(
        "idle_in_transaction_timeout",
        "The server ended a transaction left idle",
        "A transaction stayed open without a query for DB_IDLE_IN_TRANSACTION_TIMEOUT. Commit "
        "or roll back promptly; do not hold a transaction open across slow work.",
        transient=True,
        sqlstates=("25P03",),
        patterns=(r"idle-in-transaction timeout",),
    ),
    _Rule(
        "read_only",
        "A write was sent to a read-only server",
        "Send writes to the primary (db.session), not to the read replica.",
        transient=False,
        sqlstates=("25006",),
        patterns=(r"read-only transaction",),
    ),
    _Rule(
        "unknown_host",
        "The host name does not resolve",
        "Check the host in DB_URL (copy it again from the Neon console) and this machine's DNS.",
        # A resolver hiccup, or a service that is not up yet (compose, CI): worth a retry.
        transient=True,
        # libpq's words, then psycopg 3's (it resolves the name itself, in Python).
        patterns=(r"could not translate host name", r"failed to resolve", r"service not known"),
    ),
    _Rule(
        "connection_refused",
        "The server refused the connection",
        "Nothing listens at that host and port: check the port in DB_URL and that the server "
        "is running.",
        transient=True,
        patterns=(r"connection refused",),
    ),
    _Rule(
        "connect_timeout",
        "Connecting timed out",
        "The server did not answer within DB_CONNECT_TIMEOUT. Check the network path and "
        "firewall; a waking Neon compute may need 10-15 s.",
        transient=True,
        patterns=(r"timeout expired", r"timed out"),
    ),
    # What the server answers a connect while it is not serving (SQLSTATE 57P03,
    # cannot_connect_now): one rule for starting and recovering, one for shutting down.
    _Rule(
        "server_starting",
        "The database server is starting up or recovering",
        "It accepts connections once it is ready. After a crash or an immediate shutdown it "
        "first replays the write-ahead log written since its last checkpoint, which takes "
        "longer the larger max_wal_size and checkpoint_timeout are. Connects are retried and "
        "requests answered 503 with Retry-After meanwhile. If it lasts on a standby (read "
        "replica), the standby has not reached a consistent state yet, or its hot_standby "
        "setting is off.",
        transient=True,
        sqlstates=("57P03",),
        patterns=(
            r"the database system is starting up",
            r"the database system is not yet accepting connections",
            r"the database system is not accepting connections",
            r"the database system is in recovery mode",
        ),
    ),
    _Rule(
        "server_shutting_down",
        "The database server is shutting down",
        "It accepts no new connection while it stops (a restart, a failover, maintenance). "
        "Connects are retried and requests answered 503 with Retry-After meanwhile; if it does "
        "not come back, start it again.",
        transient=True,
        sqlstates=("57P03",),
        patterns=(r"the database system is shutting down",),
    ),
    _Rule(
        "recovery_conflict",
        "The standby cancelled the query to go on replaying the primary's changes",
        "On a hot standby (read replica), a query or a session held something the replay "
        "had to remove (row versions, a lock, a dropped database) longer than "
        "max_standby_streaming_delay allows. Retry; for long reads on the replica raise "
        "max_standby_streaming_delay or turn hot_standby_feedback on.",
        transient=True,
        sqlstates=("57P04",),
        patterns=(r"due to conflict with recovery",),
    ),
    _Rule(
        "connection_lost",
        "The connection to the server was lost",
        "The server closed the connection: a restart or an immediate shutdown, a crash (the "
        "server then ends every session and recovers), a Neon suspend, a terminated backend, "
        "idle_session_timeout. flask-neon discards such connections; retry the request.",
        transient=True,
        sqlstates=("57P01", "57P02", "57P05", "08006", "08003", "08001", "08000"),
        patterns=(
            r"server closed the connection unexpectedly",
            r"terminating connection due to administrator command",
            r"terminating connection due to immediate shutdown command",
            r"terminating connection because of crash of another server process",
            r"terminating connection because of unexpected sigquit signal",
            r"terminating connection due to unexpected postmaster exit",
            r"postmaster exited during a parallel transaction",
            r"terminating connection due to idle-session timeout",
            r"ssl syscall error",
            r"connection already closed",
            r"could not receive data from server",
            r"could not send data to server",
            r"connection reset by peer",
            r"broken pipe",
        ),
    ),
)

_UNKNOWN = _Rule(
    "unknown",
    "The database reported an error",
    "See the detail above; flask-neon does not recognise this failure.",
    transient=False,
)


def classify(exc: BaseException, secrets: t.Iterable[str] = ()) -> ErrorCause:
    """Name the cause of a database error and say what to do about it.

    Args:
        exc: A psycopg2, psycopg or SQLAlchemy exception (any exception is accepted).
        secrets: Strings to mask in the detail, typically the database password.
    """
    driver = exc
    if isinstance(exc, sa_exc.StatementError) and exc.orig is not None:
        driver = exc.orig  # the driver's exception behind SQLAlchemy's wrapper
    # A wrapper's own text carries the SQL; the driver's message is what names the cause.
    text = str(driver).split("\n[SQL:", 1)[0]
    sqlstate = getattr(driver, "pgcode", None) or getattr(driver, "sqlstate", None)
    lowered = text.lower()
    by_code = [r for r in _RULES if sqlstate and sqlstate in r.sqlstates]
    by_text = [r for r in _RULES if any(re.search(p, lowered) for p in r.patterns)]
    # The SQLSTATE decides, and the text tells apart the causes that share one (57P03 is
    # "starting up" and "shutting down" alike); a message without a known code goes by its text.
    rule = next(iter([r for r in by_code if r in by_text] or by_code or by_text), _UNKNOWN)
    detail = mask_secrets(" ".join(text.split()), secrets)
    sqlstate = sqlstate if isinstance(sqlstate, str) else None
    return ErrorCause(rule.name, rule.title, rule.hint, detail, rule.transient, sqlstate)


def mask_secrets(text: str, secrets: t.Iterable[str]) -> str:
    """Replace every secret in ``text``, also in its URL-escaped spellings, with ``***``."""
    for secret in secrets:
        for spelling in {secret, quote(secret, safe=""), quote_plus(secret, safe="")} - {""}:
            text = text.replace(spelling, "***")
    return text
