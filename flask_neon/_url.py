"""Database URLs. SQLAlchemy's ``make_url`` and ``URL`` parse, quote and render them; this module
adds what SQLAlchemy does not know: the driver (psycopg2 or psycopg 3), Neon's pooled and
direct hosts, the TLS policy, which values are secrets, and how the URLs of one app relate."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from urllib.parse import quote, unquote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ._errors import NeonConfigError

#: The DBAPI drivers flask-neon knows, by SQLAlchemy's name; the first is the default.
DRIVERS = ("psycopg2", "psycopg")
# SQLAlchemy 2.1 maps postgresql:// to psycopg 3, 2.0 to psycopg2: the driver is always named.
_SCHEMES = ("postgresql", "postgres", *(f"postgresql+{driver}" for driver in DRIVERS))
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_ALLOWED = {"sslmode": SSLMODES, "channel_binding": ("disable", "prefer", "require")}
_FILE_PARAMS = ("sslrootcert", "sslcert", "sslkey", "sslcrl")  # files libpq will open
SECRET_PARAMS = frozenset({"password", "sslpassword"})  # masked like the password
MASK = "***"  # the three stars SQLAlchemy hides a password with, too
_EXAMPLE = "postgresql://user:PW@ep-example-123456.us-east-2.aws.neon.tech/neondb"
# make_url ends the user-info at the first '@', which breaks a password pasted with '@' in it;
# this ends it at the last '@' that a host and then '/', '?' or the end follow.
_USERINFO = re.compile(r"(.*)@(?=[^@/?]*(?:[/?]|$))", re.S)


@dataclasses.dataclass(frozen=True)
class DatabaseURL:
    """A PostgreSQL URL, as :func:`parse_url` made it. ``str()`` and ``repr()`` are masked."""

    username: str | None
    password: str | None
    host: str | None
    port: int | None
    database: str
    query: tuple[tuple[str, str], ...] = ()
    setting: str = "DB_URL"  # named in every error about this URL
    #: The DBAPI driver: the URL's own (``postgresql+psycopg://``), else ``DB_DRIVER``'s.
    driver: str = DRIVERS[0]

    @property
    def query_dict(self) -> dict[str, str]:
        """The query's libpq parameters, in the URL's order."""
        return dict(self.query)

    @property
    def sslmode(self) -> str | None:
        """The URL's ``sslmode``; None when unset, which libpq takes as ``prefer``."""
        return self.query_dict.get("sslmode")

    @property
    def effective_host(self) -> str:
        """The host libpq connects to: the URL's host, ``?host=`` or a socket directory."""
        return self.host or self.query_dict.get("host", "")

    @property
    def socket_dir(self) -> str | None:
        """The Unix socket directory when the URL names one (``?host=/run/postgresql``)."""
        return self.effective_host if self.effective_host.startswith("/") else None

    @property
    def is_local(self) -> bool:
        """True for localhost, loopback addresses and Unix sockets: no network to protect."""
        host = self.effective_host.strip("[]")
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return not host or host.startswith("/") or host == "localhost"

    @property
    def is_neon(self) -> bool:
        """True for a Neon host: one under ``neon.tech`` or ``neon.build``."""
        return self.effective_host.lower().endswith((".neon.tech", ".neon.build"))

    @property
    def is_neon_pooled(self) -> bool:
        """True for a Neon pooler host: ``-pooler`` ends the first DNS label, not a later one."""
        return self.is_neon and self.effective_host.lower().split(".")[0].endswith("-pooler")

    @property
    def endpoint_id(self) -> str | None:
        """Neon's endpoint id (``ep-cool-darkness-123456``), taken from the host name."""
        first_label = self.effective_host.lower().split(".")[0]
        return first_label.removesuffix("-pooler") if self.is_neon else None

    def direct(self) -> DatabaseURL:
        """The same URL on the direct (non-pooled) host; itself when it is not a Neon pooler."""
        if not self.is_neon_pooled or self.host is None:
            return self
        first, _, rest = self.host.partition(".")  # sliced: '-pooler' may be in capitals
        return dataclasses.replace(self, host=f"{first[: -len('-pooler')]}.{rest}")

    def to_sqlalchemy(self) -> URL:
        """The URL SQLAlchemy connects with, naming its driver."""
        parts = (self.username, self.password, self.host, self.port, self.database)
        return URL.create(f"postgresql+{self.driver}", *parts, query=self.query_dict)

    def masked(self) -> str:
        """The URL for logs and the CLI: ``postgresql://alex:***@host/db?sslmode=require``."""
        # SQLAlchemy renders all but the query, password hidden; the query may hold secrets too.
        shown = self.to_sqlalchemy().set(drivername="postgresql", query={}).render_as_string()
        query = "&".join(
            f"{key}={MASK if key in SECRET_PARAMS else quote(value, safe='/,=-._~')}"
            for key, value in self.query
        )
        return f"{shown}?{query}" if query else shown

    def secrets(self) -> list[str]:
        """Every secret this URL carries, for masking free text that might repeat one."""
        found = [self.password] + [value for key, value in self.query if key in SECRET_PARAMS]
        return [secret for secret in found if secret]

    __str__ = __repr__ = masked


def parse_url(raw: str, setting: str = "DB_URL", driver: str = DRIVERS[0]) -> DatabaseURL:
    """Parse and check a ``postgres://``, ``postgresql://``, ``postgresql+psycopg2://`` or
    ``postgresql+psycopg://`` URL. A URL that names no driver gets ``driver``.

    User name and password may be percent-encoded, or hold ``@``, ``:``, ``/``, ``#`` as is.
    Errors (:class:`NeonConfigError`) name ``setting`` and never show the password.
    """
    value = raw.strip()
    if not value:
        raise NeonConfigError(f"{setting} is empty. Set it to a URL like {_EXAMPLE}.")
    scheme, sep, rest = value.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        # Nothing of the value is shown: without a scheme, any part of it may be the password.
        raise NeonConfigError(f"{setting} is not a URL. Expected a URL like {_EXAMPLE}.")
    if scheme.lower() not in _SCHEMES:
        *others, last = (f"{known}://" for known in _SCHEMES)
        raise NeonConfigError(
            f"{setting} must be a PostgreSQL URL ({', '.join(others)} or {last}), "
            f"got '{scheme}://...'."
        )
    _, plus, named = scheme.lower().partition("+")
    driver = named if plus else driver
    if found := _USERINFO.match(rest):  # re-quoted, so that make_url reads what was typed raw
        user, colon, password = found[1].partition(":")
        userinfo = quote(unquote(user), safe="") + colon + quote(unquote(password), safe="")
        rest = f"{userinfo}@{rest[found.end() :]}"
    bad_port = f"{setting} has an invalid port ({scheme}://...); use a number from 1 to 65535."
    try:
        parsed = make_url(f"postgresql://{rest}")
    except (ValueError, ArgumentError):  # int() failed on the port; the message quotes the URL
        raise NeonConfigError(bad_port) from None
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise NeonConfigError(bad_port)
    # make_url makes a repeated parameter a tuple; libpq would use the last value.
    query = tuple((k, v if isinstance(v, str) else v[-1]) for k, v in parsed.query.items())
    host = unquote(parsed.host) if parsed.host else None  # libpq's '%2Frun%2Fpostgresql' form
    parts = (parsed.username or None, parsed.password, host, parsed.port, parsed.database or "")
    url = DatabaseURL(*parts, query, setting, driver)
    if not url.effective_host or not url.database:
        missing = "database name" if url.effective_host else "host"
        raise NeonConfigError(f"{setting} has no {missing} ({url.masked()}), e.g. {_EXAMPLE}.")
    # Checked now, naming the setting, rather than failing at the first connection.
    for name, allowed in _ALLOWED.items():
        if url.query_dict.get(name, allowed[0]) not in allowed:
            shown = f"{name}={url.query_dict[name]!r}"
            raise NeonConfigError(f"{setting} has {shown}; allowed: {', '.join(allowed)}.")
    for name in _FILE_PARAMS:
        path = url.query_dict.get(name, "")  # "system" is libpq's name for the system CA store
        if path not in ("", "system") and not os.path.isfile(os.path.expanduser(path)):
            hint = " (sslrootcert=system is the system CA store)" if name == "sslrootcert" else ""
            raise NeonConfigError(
                f"{setting} has {name}={path!r}, but that file does not exist{hint}."
            )
    if "options" in url.query_dict and url.is_neon_pooled:
        raise NeonConfigError(
            f"{setting} points at a Neon pooler host and sets 'options' ({url.masked()}); the "
            "pooler rejects startup options. Remove them, or use the direct host."
        )
    return url


def apply_tls_policy(url: DatabaseURL, *, require_tls: bool) -> DatabaseURL:
    """Add ``sslmode=require`` for Neon hosts and refuse plaintext-capable remote URLs.

    Neon refuses plaintext anyway; ``require`` turns its cryptic refusal into a connection.
    With ``require_tls`` (the production default), a remote host whose sslmode may end in
    plaintext is refused: ``prefer``, libpq's default, falls back to it silently.
    """
    if url.is_neon and url.sslmode is None:
        url = dataclasses.replace(url, query=(*url.query, ("sslmode", "require")))
    if require_tls and not url.is_local and url.sslmode in (None, "disable", "allow", "prefer"):
        shown = "unset (libpq then uses prefer)" if url.sslmode is None else f"'{url.sslmode}'"
        raise NeonConfigError(
            f"{url.setting} connects to '{url.effective_host}' with sslmode {shown}, which can "
            "fall back to plaintext. Add sslmode=require (better: sslmode=verify-full with "
            "sslrootcert=system), or set DB_REQUIRE_TLS=false for a trusted private network."
        )
    return url


@dataclasses.dataclass(frozen=True)
class ResolvedURLs:
    """The URLs one app connects to, resolved once from its settings."""

    primary: DatabaseURL
    direct: DatabaseURL | None  # for migrations and admin work; None: the pooler's origin unknown
    read: DatabaseURL | None
    pooled: bool


def resolve_urls(
    raw: str,
    *,
    direct_raw: str | None,
    read_raw: str | None,
    pooled: bool | None,
    require_tls: bool,
    driver: str = DRIVERS[0],
) -> ResolvedURLs:
    """Parse ``DB_URL``, ``DB_DIRECT_URL`` and ``DB_READ_URL`` and check how they relate; a URL
    that names no driver gets ``driver``."""

    def load(value: str, setting: str) -> DatabaseURL:
        return apply_tls_policy(parse_url(value, setting, driver), require_tls=require_tls)

    def target(url: DatabaseURL) -> tuple[str, int, str, str | None]:
        return (url.effective_host.lower(), url.port or 5432, url.database, url.username)

    primary = load(raw, "DB_URL")
    is_pooled = primary.is_neon_pooled if pooled is None else pooled
    direct: DatabaseURL | None = primary
    if is_pooled:  # a Neon pooler's direct host is known; another pooler's origin is not
        direct = primary.direct() if primary.is_neon_pooled else None
    if direct_raw:
        direct = load(direct_raw, "DB_DIRECT_URL")
        if direct.is_neon_pooled:
            raise NeonConfigError(
                f"DB_DIRECT_URL points at a pooler host ({direct.masked()}); it must be the "
                f"direct host, without -pooler: {direct.direct().masked()}."
            )
    read = load(read_raw, "DB_READ_URL") if read_raw else None
    if read and target(read) in {target(url) for url in (primary, direct) if url}:
        raise NeonConfigError(
            f"DB_READ_URL is the primary database ({read.masked()}). Set it to the read "
            "replica's URL, or leave it unset to read from the primary."
        )
    return ResolvedURLs(primary, direct, read, is_pooled)
