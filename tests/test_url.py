"""URL parsing, normalisation and masking. Pure functions: no database needed here."""

from __future__ import annotations

from urllib.parse import quote

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from flask_neon import NeonConfigError
from flask_neon._url import parse_url

NEON_POOLED = "ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech"
NEON_CELL_POOLED = "ep-cool-darkness-123456-pooler.c-2.us-east-1.aws.neon.tech"


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg2", "PostgreSQL"])
def test_every_accepted_scheme_connects_with_psycopg2(scheme: str) -> None:
    url = parse_url(f"{scheme}://alex:pw@db.example.com:6543/app")
    rendered = url.to_sqlalchemy()
    assert rendered.drivername == "postgresql+psycopg2"
    assert (rendered.host, rendered.port, rendered.database) == ("db.example.com", 6543, "app")


@pytest.mark.parametrize(
    "password", ["p@ss", "p:ss", "p/ss", "p%ss", "p#ss", "pässwörd", "@:/%#?&=", "密码"]
)
def test_special_passwords_round_trip_escaped_and_raw(password: str) -> None:
    escaped = parse_url(f"postgresql://alex:{quote(password, safe='')}@host/db")
    assert escaped.password == password
    assert escaped.host == "host"
    assert escaped.database == "db"
    if "%" not in password:  # a raw '%' followed by hex digits is ambiguous by design
        raw = parse_url(f"postgresql://alex:{password}@host/db")
        assert (raw.password, raw.host, raw.database) == (password, "host", "db")


def test_sqlalchemy_rendering_keeps_the_password_exact() -> None:
    url = parse_url("postgresql://alex:p%40ss%2Fw%23rd@host:5432/db?sslmode=require")
    assert sa.make_url(url.to_sqlalchemy().render_as_string(False)).password == "p@ss/w#rd"


def test_masked_rendering_hides_password_and_secret_params() -> None:
    url = parse_url(
        "postgresql://alex:hunter2@host/db?sslmode=require&sslpassword=keypass&password=qp"
    )
    masked = url.masked()
    assert masked == ("postgresql://alex:***@host/db?sslmode=require&sslpassword=***&password=***")
    assert str(url) == masked
    assert "hunter2" not in repr(url)
    assert set(url.secrets()) == {"hunter2", "keypass", "qp"}


@given(st.text(min_size=1, max_size=40).filter(lambda s: s.strip() == s and "\x00" not in s))
def test_masked_never_contains_the_password(password: str) -> None:
    url = parse_url(f"postgresql://alex:{quote(password, safe='')}@host.example/db")
    assert url.password == password
    # Whatever the password, the masked form is the same: nothing of it can leak through.
    assert url.masked() == "postgresql://alex:***@host.example/db"
    reparsed = parse_url(url.to_sqlalchemy().render_as_string(hide_password=False))
    assert (reparsed.password, reparsed.host, reparsed.database) == (
        password,
        "host.example",
        "db",
    )


def test_unix_socket_url_is_accepted() -> None:
    url = parse_url("postgresql://alex@/app?host=/var/run/postgresql")
    assert url.socket_dir == "/var/run/postgresql"
    assert url.is_local


def test_ipv6_host_with_port() -> None:
    url = parse_url("postgresql://u:p@[::1]:5433/db")
    assert (url.host, url.port, url.is_local) == ("::1", 5433, True)
    assert url.masked() == "postgresql://u:***@[::1]:5433/db"


@pytest.mark.parametrize("host", [NEON_POOLED, NEON_CELL_POOLED])
def test_neon_pooled_host_and_its_direct_twin(host: str) -> None:
    url = parse_url(f"postgresql://alex:pw@{host}/neondb?sslmode=require")
    assert url.is_neon
    assert url.is_neon_pooled
    assert url.endpoint_id == "ep-cool-darkness-123456"
    direct = url.direct()
    assert not direct.is_neon_pooled
    assert direct.host == host.replace("-pooler", "")
    assert direct.password == "pw"
    assert direct.query == url.query


def test_direct_neon_host_is_not_pooled() -> None:
    url = parse_url("postgresql://alex:pw@ep-cool-darkness-123456.us-east-2.aws.neon.tech/db")
    assert url.is_neon
    assert not url.is_neon_pooled
    assert url.direct() is url


def test_pooler_in_a_later_label_is_not_a_pooler() -> None:
    url = parse_url("postgresql://alex:pw@ep-x-123.my-pooler.aws.neon.tech/db")
    assert not url.is_neon_pooled


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("mysql://alex:s3cretpw@host/db", "must be a PostgreSQL URL"),
        ("sqlite:///s3cretpw.db", "must be a PostgreSQL URL"),
        ("not a url", "is not a URL"),
        ("", "is empty"),
        ("   ", "is empty"),
        ("postgresql://alex:s3cretpw@/db", "has no host"),
        ("postgresql://alex:s3cretpw@host/", "has no database"),
        ("postgresql://alex:s3cretpw@host", "has no database"),
        ("postgresql://alex:s3cretpw@host:99999/db", "invalid port"),
        ("postgresql://alex:s3cretpw@host:port/db", "invalid port"),
        ("postgresql://alex:s3cretpw@host/db?sslmode=bogus", "sslmode='bogus'"),
        ("://alex:s3cretpw@host/db", "is not a URL"),
        ("postgresql:/alex:s3cretpw@host/db", "is not a URL"),
        ("postgresql:/alex:s3cretpw@host/db?x=https://y", "is not a URL"),
    ],
)
def test_bad_urls_name_the_setting_and_hide_the_password(raw: str, fragment: str) -> None:
    with pytest.raises(NeonConfigError) as info:
        parse_url(raw, "DB_URL")
    message = str(info.value)
    assert message.startswith("DB_URL")
    assert fragment in message
    assert "s3cretpw" not in message


def test_a_repeated_query_parameter_keeps_its_last_value() -> None:
    url = parse_url("postgresql://a:pw@host/db?sslmode=disable&application_name=x&sslmode=require")
    assert url.sslmode == "require"
    assert url.to_sqlalchemy().query == {"sslmode": "require", "application_name": "x"}


def test_percent_encoded_socket_directory_as_host() -> None:
    url = parse_url("postgresql://alex@%2Fvar%2Frun%2Fpostgresql/app")
    assert (url.host, url.socket_dir, url.is_local) == (
        "/var/run/postgresql",
        "/var/run/postgresql",
        True,
    )


def test_repr_is_the_masked_url() -> None:
    url = parse_url("postgresql://alex:hunter2@host/db?sslpassword=keypass")
    assert repr(url) == str(url) == "postgresql://alex:***@host/db?sslpassword=***"


def test_pooler_host_with_startup_options_is_refused() -> None:
    with pytest.raises(NeonConfigError, match="rejects startup options") as info:
        parse_url(f"postgresql://alex:s3cretpw@{NEON_POOLED}/db?options=-c%20search_path%3Dx")
    assert "s3cretpw" not in str(info.value)


# -- TLS policy and how the URLs of one app relate --------------------------------------------

from flask_neon._url import apply_tls_policy, resolve_urls  # noqa: E402


def test_neon_hosts_get_sslmode_require() -> None:
    url = apply_tls_policy(parse_url(f"postgresql://a:pw@{NEON_POOLED}/db"), require_tls=True)
    assert url.sslmode == "require"
    kept = apply_tls_policy(
        parse_url(f"postgresql://a:pw@{NEON_POOLED}/db?sslmode=verify-full&sslrootcert=system"),
        require_tls=True,
    )
    assert kept.query_dict == {"sslmode": "verify-full", "sslrootcert": "system"}


@pytest.mark.parametrize("sslmode", [None, "disable", "allow", "prefer"])
def test_plaintext_capable_remote_hosts_are_refused(sslmode: str | None) -> None:
    query = f"?sslmode={sslmode}" if sslmode else ""
    url = parse_url(f"postgresql://a:s3cretpw@db.example.com/db{query}")
    with pytest.raises(NeonConfigError, match="sslmode=require") as info:
        apply_tls_policy(url, require_tls=True)
    assert "DB_REQUIRE_TLS=false" in str(info.value)
    assert "s3cretpw" not in str(info.value)
    assert apply_tls_policy(url, require_tls=False) is url


@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1", "127.8.9.10", "[::1]", "/var/run/postgresql"]
)
def test_local_hosts_are_exempt(host: str) -> None:
    raw = (
        f"postgresql://a:pw@/db?host={host}&sslmode=disable"
        if host.startswith("/")
        else f"postgresql://a:pw@{host}/db?sslmode=disable"
    )
    url = parse_url(raw)
    assert url.is_local
    assert apply_tls_policy(url, require_tls=True) is url


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("sslrootcert=/no/such/ca.pem", "sslrootcert='/no/such/ca.pem'"),
        ("sslcert=/no/such/cert.pem", "does not exist"),
        ("channel_binding=maybe", "channel_binding='maybe'"),
    ],
)
def test_tls_parameters_are_checked(query: str, fragment: str) -> None:
    with pytest.raises(NeonConfigError, match="DB_URL") as info:
        parse_url(f"postgresql://a:pw@host/db?sslmode=require&{query}")
    assert fragment in str(info.value)


def test_sslrootcert_system_and_channel_binding_pass_through() -> None:
    url = parse_url(
        f"postgresql://a:pw@{NEON_POOLED}/db?sslmode=verify-full&sslrootcert=system"
        "&channel_binding=require"
    )
    assert url.to_sqlalchemy().query == {
        "sslmode": "verify-full",
        "sslrootcert": "system",
        "channel_binding": "require",
    }


def test_resolve_derives_the_direct_url_from_a_neon_pooler() -> None:
    urls = resolve_urls(
        f"postgresql://a:pw@{NEON_CELL_POOLED}/db",
        direct_raw=None,
        read_raw=None,
        pooled=None,
        require_tls=True,
    )
    assert urls.pooled
    assert urls.direct is not None
    assert urls.direct.host == NEON_CELL_POOLED.replace("-pooler", "")
    assert urls.direct.sslmode == "require"


def test_resolve_direct_override_and_declared_pooler() -> None:
    urls = resolve_urls(
        "postgresql://a:pw@127.0.0.1:6432/db",
        direct_raw="postgresql://a:pw@127.0.0.1:5432/db",
        read_raw=None,
        pooled=True,
        require_tls=True,
    )
    assert urls.pooled
    assert urls.direct is not None
    assert urls.direct.port == 5432
    unknown = resolve_urls(
        "postgresql://a:pw@127.0.0.1:6432/db",
        direct_raw=None,
        read_raw=None,
        pooled=True,
        require_tls=True,
    )
    assert unknown.direct is None


def test_direct_url_on_a_pooler_host_is_refused() -> None:
    with pytest.raises(NeonConfigError, match="DB_DIRECT_URL points at a pooler host"):
        resolve_urls(
            f"postgresql://a:pw@{NEON_POOLED}/db",
            direct_raw=f"postgresql://a:s3cretpw@{NEON_POOLED}/db",
            read_raw=None,
            pooled=None,
            require_tls=True,
        )


def test_read_url_equal_to_the_primary_is_refused() -> None:
    with pytest.raises(NeonConfigError, match="DB_READ_URL is the primary") as info:
        resolve_urls(
            "postgresql://a:s3cretpw@127.0.0.1/db",
            direct_raw=None,
            read_raw="postgres://a:s3cretpw@127.0.0.1:5432/db",
            pooled=None,
            require_tls=True,
        )
    assert "s3cretpw" not in str(info.value)


_names = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() == s and "\x00" not in s)


@given(user=_names, password=_names, database=_names, port=st.integers(1, 65535))
def test_any_url_round_trips_through_sqlalchemy_and_masks(
    user: str, password: str, database: str, port: int
) -> None:
    raw = (
        f"postgres://{quote(user, safe='')}:{quote(password, safe='')}@db.example.com:{port}/"
        f"{quote(database, safe='')}?sslmode=require"
    )
    url = parse_url(raw)
    rendered = url.to_sqlalchemy()
    assert (rendered.username, rendered.password, rendered.database) == (user, password, database)
    again = parse_url(rendered.render_as_string(hide_password=False))
    assert again == url
    # The masked form is fully determined without the password: nothing of it can show.
    # SQLAlchemy quotes it, leaving ' ' and '+' (and '/' in the database name) as they are.
    assert url.masked() == (
        f"postgresql://{quote(user, safe=' +')}:***@db.example.com:{port}/"
        f"{quote(database, safe=' +/')}?sslmode=require"
    )
