"""One parsed, normalised database URL: driver psycopg2, Neon host facts, a masked rendering.

Neon and most tools hand out ``postgresql://`` or ``postgres://`` URLs. SQLAlchemy 2.1 maps
``postgresql://`` to psycopg 3, which flask-neon does not install, so every URL is rewritten to
``postgresql+psycopg2://`` here, once, and the rest of the package only sees :class:`DatabaseURL`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from urllib.parse import parse_qsl, quote, unquote

import sqlalchemy as sa

from .errors import NeonConfigError

DRIVER = "postgresql+psycopg2"
ACCEPTED_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: sslmodes that may end up in plaintext: prefer falls back to it silently.
PLAINTEXT_SSLMODES = (None, "disable", "allow", "prefer")
CHANNEL_BINDINGS = ("disable", "prefer", "require")
#: libpq parameters naming files that must exist ("system" is libpq's CA store).
_FILE_PARAMS = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
#: Query parameters whose values are secrets and are masked like the password.
SECRET_PARAMS = frozenset({"password", "sslpassword"})
MASK = "***"

# After the user-info '@' comes a host (or [IPv6]), an optional port, then the path, query or end.
_HOST_PART = re.compile(r"(\[[^\]/]*\]|[^/?#@:\[\]]*)(?::([^/?#@]*))?(?=[/?]|$)")
_POOLER_SUFFIX = "-pooler"
_NEON_DOMAINS = (".neon.tech", ".neon.build")


def _describe(raw: str) -> str:
    """The URL's scheme and host, for an error message that must not echo a password."""
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    shown = f"{scheme}://..." if scheme else "a value without '://'"
    return shown if len(shown) <= 40 else shown[:37] + "..."


@dataclasses.dataclass(frozen=True)
class DatabaseURL:
    """A PostgreSQL URL, normalised for psycopg2, with what flask-neon needs to know about it.

    Build one with :func:`parse_url`. ``str()`` and ``repr()`` show the masked form.
    """

    username: str | None
    password: str | None = dataclasses.field(repr=False)
    host: str | None
    port: int | None
    database: str
    query: tuple[tuple[str, str], ...] = ()
    setting: str = "DB_URL"

    # -- derived facts -------------------------------------------------------------------------

    @property
    def query_dict(self) -> dict[str, str]:
        return dict(self.query)

    @property
    def socket_dir(self) -> str | None:
        """The Unix socket directory when the URL names one (``?host=/run/postgresql``)."""
        host = self.host or self.query_dict.get("host")
        return host if host and host.startswith("/") else None

    @property
    def effective_host(self) -> str:
        """The host libpq connects to: the URL's host, ``?host=`` or a socket directory."""
        return self.host or self.query_dict.get("host", "")

    @property
    def is_local(self) -> bool:
        """True for localhost, loopback addresses and Unix sockets: no network to protect."""
        host = self.effective_host
        if not host or host.startswith("/") or host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            return False

    @property
    def is_neon(self) -> bool:
        host = self.effective_host.lower()
        return host.endswith(_NEON_DOMAINS)

    @property
    def is_neon_pooled(self) -> bool:
        """True for a Neon pooler host: ``-pooler`` ends the first DNS label."""
        first = self.effective_host.lower().split(".", 1)[0]
        return self.is_neon and first.endswith(_POOLER_SUFFIX)

    @property
    def endpoint_id(self) -> str | None:
        """Neon's endpoint id (``ep-cool-darkness-123456``), taken from the host name."""
        if not self.is_neon:
            return None
        first = self.effective_host.lower().split(".", 1)[0]
        return first.removesuffix(_POOLER_SUFFIX)

    @property
    def sslmode(self) -> str | None:
        return self.query_dict.get("sslmode")

    def direct(self) -> DatabaseURL:
        """The same URL on the direct (non-pooled) host; itself when it is not a Neon pooler."""
        if not self.is_neon_pooled or self.host is None:
            return self
        first, _, rest = self.host.partition(".")
        return dataclasses.replace(self, host=f"{first[: -len(_POOLER_SUFFIX)]}.{rest}")

    def with_query(self, **params: str) -> DatabaseURL:
        """A copy with query parameters added or replaced."""
        merged = {**self.query_dict, **params}
        return dataclasses.replace(self, query=tuple(merged.items()))

    # -- renderings ----------------------------------------------------------------------------

    def to_sqlalchemy(self) -> sa.URL:
        """The URL SQLAlchemy connects with, always on the psycopg2 driver."""
        return sa.URL.create(
            DRIVER,
            username=self.username,
            password=self.password,
            host=self.host,
            port=self.port,
            database=self.database,
            query=self.query_dict,
        )

    def masked(self) -> str:
        """The URL for logs and the CLI: ``postgresql://alex:***@host/db?sslmode=require``."""
        userinfo = ""
        if self.username is not None:
            userinfo = quote(self.username, safe="")
            if self.password is not None:
                userinfo += ":" + MASK
            userinfo += "@"
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{self.port}" if self.port is not None else ""
        query = "&".join(
            f"{key}={MASK if key in SECRET_PARAMS else quote(value, safe='/,=-._~')}"
            for key, value in self.query
        )
        return f"postgresql://{userinfo}{host}{port}/{quote(self.database, safe='')}" + (
            f"?{query}" if query else ""
        )

    def secrets(self) -> list[str]:
        """Every secret this URL carries, for masking free text that might repeat one."""
        found = [self.password] if self.password else []
        found += [value for key, value in self.query if key in SECRET_PARAMS and value]
        return found

    def __str__(self) -> str:
        return self.masked()


def parse_url(raw: str, setting: str = "DB_URL") -> DatabaseURL:
    """Parse and validate a PostgreSQL URL.

    Accepts ``postgres://``, ``postgresql://`` and ``postgresql+psycopg2://``. User name and
    password may be percent-encoded (the standard) or contain ``@``, ``:``, ``/``, ``#`` as is.

    Raises:
        NeonConfigError: naming ``setting``, never showing the password.
    """
    value = raw.strip()
    if not value:
        raise NeonConfigError(f"{setting} is empty. Set it to a URL like {_EXAMPLE}.")
    scheme, sep, rest = value.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        raise NeonConfigError(
            f"{setting} is not a URL (got {_describe(value)}). Expected a URL like {_EXAMPLE}."
        )
    if scheme.lower() not in ACCEPTED_SCHEMES:
        raise NeonConfigError(
            f"{setting} must be a PostgreSQL URL (postgresql://, postgres:// or "
            f"postgresql+psycopg2://), got '{scheme}://...'."
        )

    userinfo, host_raw, port_text, path = _split_authority(rest, setting, value)
    username: str | None = None
    password: str | None = None
    if userinfo is not None:
        user_raw, colon, password_raw = userinfo.partition(":")
        username = unquote(user_raw) or None
        password = unquote(password_raw) if colon else None

    host = unquote(host_raw.strip("[]"))
    port = _parse_port(port_text, setting, value)
    database_raw, _, query_raw = path.removeprefix("/").partition("?")
    database = unquote(database_raw)
    query = tuple(parse_qsl(query_raw, keep_blank_values=True))

    url = DatabaseURL(username, password, host or None, port, database, query, setting)
    if not url.effective_host:
        raise NeonConfigError(
            f"{setting} has no host ({url.masked()}). Put the server's host name after '@', "
            f"e.g. {_EXAMPLE}."
        )
    if not database:
        raise NeonConfigError(
            f"{setting} has no database name ({url.masked()}). Add '/<database>' after the host, "
            f"e.g. {_EXAMPLE}."
        )
    return _check_query(url)


_EXAMPLE = "postgresql://user:PW@ep-example-123456.us-east-2.aws.neon.tech/neondb"


def _split_authority(rest: str, setting: str, raw: str) -> tuple[str | None, str, str | None, str]:
    """Split ``user:pass@host:port/db?query`` into user-info, host, port text and the rest.

    The user-info ends at the last '@' that is followed by something shaped like a host, so a
    password may contain '@', '/', '?' or '#' without being escaped.
    """
    for at in reversed([m.start() for m in re.finditer("@", rest)]):
        host_match = _HOST_PART.match(rest, at + 1)
        if host_match:
            return rest[:at], host_match[1], host_match[2], rest[host_match.end() :]
    host_match = _HOST_PART.match(rest)
    if host_match is None:
        raise NeonConfigError(
            f"{setting} could not be parsed (got {_describe(raw)}). Expected a URL like "
            f"{_EXAMPLE}; percent-encode special characters in the password."
        )
    return None, host_match[1], host_match[2], rest[host_match.end() :]


def _parse_port(port_text: str | None, setting: str, raw: str) -> int | None:
    if port_text is None or port_text == "":
        return None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise NeonConfigError(
            f"{setting} has an invalid port '{port_text[:20]}' ({_describe(raw)}); "
            f"a port is a number from 1 to 65535."
        )
    return int(port_text)


def _check_query(url: DatabaseURL) -> DatabaseURL:
    params = url.query_dict
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in SSLMODES:
        raise NeonConfigError(
            f"{url.setting} has sslmode={sslmode!r}; allowed: {', '.join(SSLMODES)}."
        )
    binding = params.get("channel_binding")
    if binding is not None and binding not in CHANNEL_BINDINGS:
        raise NeonConfigError(
            f"{url.setting} has channel_binding={binding!r}; allowed: "
            f"{', '.join(CHANNEL_BINDINGS)}."
        )
    for name in _FILE_PARAMS:
        path = params.get(name)
        if (
            path
            and not (name == "sslrootcert" and path == "system")
            and not os.path.isfile(os.path.expanduser(path))
        ):
            raise NeonConfigError(
                f"{url.setting} has {name}={path!r}, but that file does not exist"
                + (
                    " (use sslrootcert=system for the system CA store)."
                    if name == "sslrootcert"
                    else "."
                )
            )
    if "options" in params and url.is_neon_pooled:
        raise NeonConfigError(
            f"{url.setting} points at a Neon pooler host and sets 'options' "
            f"({url.masked()}); the pooler rejects startup options. Remove them, or use the "
            f"direct host."
        )
    return url


def apply_tls_policy(url: DatabaseURL, *, require_tls: bool) -> DatabaseURL:
    """Add ``sslmode=require`` for Neon hosts and refuse plaintext-capable remote URLs.

    Neon refuses plaintext anyway; adding ``require`` turns its cryptic refusal into a working
    connection. With ``require_tls`` (the production default), a non-local host whose sslmode
    may end in plaintext is refused: ``prefer``, libpq's default, falls back to it silently.
    """
    if url.is_neon and url.sslmode is None:
        url = url.with_query(sslmode="require")
    if require_tls and not url.is_local and url.sslmode in PLAINTEXT_SSLMODES:
        shown = "unset (libpq then uses prefer)" if url.sslmode is None else f"'{url.sslmode}'"
        raise NeonConfigError(
            f"{url.setting} connects to '{url.effective_host}' with sslmode {shown}, which can "
            "fall back to plaintext. Add sslmode=require (better: sslmode=verify-full with "
            "sslrootcert=system) to the URL, or set DB_REQUIRE_TLS=false for a trusted private "
            "network."
        )
    return url


@dataclasses.dataclass(frozen=True)
class ResolvedURLs:
    """The URLs one app connects to."""

    primary: DatabaseURL
    #: Direct host for migrations and admin work; None when the pooler's origin is unknown.
    direct: DatabaseURL | None
    read: DatabaseURL | None
    pooled: bool


def resolve_urls(
    raw: str,
    *,
    direct_raw: str | None,
    read_raw: str | None,
    pooled: bool | None,
    require_tls: bool,
) -> ResolvedURLs:
    """Parse ``DB_URL``, ``DB_DIRECT_URL`` and ``DB_READ_URL`` and check how they relate."""
    primary = apply_tls_policy(parse_url(raw, "DB_URL"), require_tls=require_tls)
    is_pooled = primary.is_neon_pooled if pooled is None else pooled
    direct: DatabaseURL | None
    if direct_raw:
        direct = apply_tls_policy(parse_url(direct_raw, "DB_DIRECT_URL"), require_tls=require_tls)
        if direct.is_neon_pooled:
            raise NeonConfigError(
                f"DB_DIRECT_URL points at a pooler host ({direct.masked()}); it must be the "
                f"direct host, without -pooler: {direct.direct().masked()}."
            )
    elif is_pooled:
        direct = primary.direct() if primary.is_neon_pooled else None
    else:
        direct = primary
    read = None
    if read_raw:
        read = apply_tls_policy(parse_url(read_raw, "DB_READ_URL"), require_tls=require_tls)
        if _same_target(read, primary) or (direct is not None and _same_target(read, direct)):
            raise NeonConfigError(
                f"DB_READ_URL is the primary database ({read.masked()}). Set it to the read "
                "replica's URL, or leave it unset to read from the primary."
            )
    return ResolvedURLs(primary, direct, read, is_pooled)


def _same_target(a: DatabaseURL, b: DatabaseURL) -> bool:
    def key(url: DatabaseURL) -> tuple[str, int, str, str | None]:
        return (url.effective_host.lower(), url.port or 5432, url.database, url.username)

    return key(a) == key(b)
