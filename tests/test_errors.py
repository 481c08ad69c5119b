"""The classifier's table. Real failures are produced in test_engine.py and test_operator.py;
here the messages the machine cannot produce (Neon's own) are checked against the table."""

from __future__ import annotations

import importlib
import pathlib
import re
import typing as t

import pytest

from flask_neon._errors import _RULES, classify, mask_secrets
from flask_neon._url import parse_url

from .conftest import admin_execute, closed_port

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_patterns_are_lowercase_because_messages_are_lowered() -> None:
    for rule in _RULES:
        for pattern in rule.patterns:
            assert pattern == pattern.lower(), (rule.name, pattern)
            re.compile(pattern)


@pytest.mark.parametrize(
    ("message", "cause"),
    [
        ("ERROR:  Couldn't connect to compute node", "compute_waking"),
        (
            "ERROR: Endpoint ID is not specified. Either please upgrade the postgres client",
            "endpoint_id_missing",
        ),
        (
            "unsupported startup parameter in options: statement_timeout",
            "pooler_rejected_parameter",
        ),
        ("FATAL: connection is insecure (try using `sslmode=require`)", "tls_required"),
        (
            "FATAL: remaining connection slots are reserved for roles with SUPERUSER",
            "too_many_connections",
        ),
        ("SSL SYSCALL error: EOF detected", "connection_lost"),
        ("terminating connection due to administrator command", "connection_lost"),
        ("ERROR: cannot execute INSERT in a read-only transaction", "read_only"),
        (
            "QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00",
            "pool_exhausted",
        ),
        ("something nobody has seen", "unknown"),
    ],
)
def test_neon_messages_are_classified(message: str, cause: str) -> None:
    assert classify(Exception(message)).name == cause


class CodedError(Exception):
    """A driver error with a SQLSTATE, as psycopg2 raises after a query (never after a connect)."""

    def __init__(self, message: str, pgcode: str) -> None:
        super().__init__(message)
        self.pgcode = pgcode


@pytest.mark.parametrize(
    ("message", "pgcode", "cause"),
    [
        # 57P03 (cannot_connect_now) is two causes: the text tells them apart.
        ("FATAL: the database system is shutting down", "57P03", "server_shutting_down"),
        ("FATAL: the database system is starting up", "57P03", "server_starting"),
        # A code decides over a text that names another cause, and alone.
        ("canceling statement due to statement timeout", "25006", "read_only"),
        (
            "FATAL: terminating connection due to conflict with recovery",
            "57P04",
            "recovery_conflict",
        ),
    ],
)
def test_sqlstate_then_text(message: str, pgcode: str, cause: str) -> None:
    classified = classify(CodedError(message, pgcode))
    assert (classified.name, classified.sqlstate) == (cause, pgcode)


def test_every_rule_says_whether_it_is_transient() -> None:
    for rule in _RULES:
        assert isinstance(rule.transient, bool), rule.name
    assert [rule.name for rule in _RULES] == list(dict.fromkeys(rule.name for rule in _RULES))


@pytest.mark.parametrize("doc", ["README.md", "docs/operations.md"])
def test_every_cause_is_documented(doc: str) -> None:
    """The troubleshooting sections name every cause the table can give."""
    text = (ROOT / doc).read_text()
    section = text[text.index("## Troubleshooting") :]
    missing = [rule.name for rule in _RULES if f"`{rule.name}`" not in section]
    assert missing == [], f"{doc} does not name {missing}"


def test_the_transient_causes_are_documented() -> None:
    text = (ROOT / "docs/operations.md").read_text()
    paragraph = text[text.index("Transient causes, ") :].split("\n\n", 1)[0]
    named = re.findall(r"`([a-z_]+)`", paragraph.split(":", 1)[1])
    assert named == [rule.name for rule in _RULES if rule.transient]


def test_detail_is_masked() -> None:
    cause = classify(Exception("failed for p@ss and p%40ss"), secrets=["p@ss"])
    assert "p@ss" not in cause.detail
    assert "p%40ss" not in cause.detail


def test_mask_secrets_ignores_empty_secrets() -> None:
    assert mask_secrets("abc", ["", "b"]) == "a***c"


# -- real errors of both drivers ------------------------------------------------------------------


def _dbapi(driver: str) -> t.Any:
    return importlib.import_module(driver)


def _connect(driver: str, url: str, **libpq: str) -> t.Any:
    """A raw DBAPI connection of ``driver`` to ``url``'s server, with more libpq keywords."""
    parsed = parse_url(url)
    keywords = {"connect_timeout": "5", **libpq}
    return _dbapi(driver).connect(
        host=parsed.host,
        port=parsed.port,
        user=parsed.username,
        dbname=parsed.database,
        **keywords,
    )


def _error_of(call: t.Callable[[], object]) -> BaseException:
    try:
        call()
    except Exception as error:  # the driver's own exception, unwrapped
        return error
    raise AssertionError("no error")


def _execute(connection: t.Any, sql: str) -> None:
    try:
        connection.cursor().execute(sql)
    finally:
        connection.close()


def _terminated(driver: str, url: str) -> None:
    connection = _connect(driver, url)
    connection.autocommit = True
    cursor = connection.cursor()
    cursor.execute("SELECT pg_backend_pid()")
    (pid,) = cursor.fetchone()
    admin_execute(url, "SELECT pg_terminate_backend(%s, 5000)", (pid,))
    _execute(connection, "SELECT 1")


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
@pytest.mark.parametrize(
    ("case", "cause"),
    [
        ("refused", "connection_refused"),
        ("unknown_database", "database_missing"),
        ("unknown_role", "role_missing"),
        ("unknown_host", "unknown_host"),
        ("terminated", "connection_lost"),
        ("statement_timeout", "statement_timeout"),
        ("read_only", "read_only"),
    ],
)
def test_real_driver_errors_are_classified(
    driver: str, case: str, cause: str, database_url: str
) -> None:
    """What each driver raises, from a real server (or a port nobody listens on): psycopg 3's
    connect errors carry no SQLSTATE either, its words differ ("connection failed: ...",
    "failed to resolve host ..."), and it reads a terminated backend's FATAL error (57P01)
    where psycopg2 finds the connection closed."""
    url = parse_url(database_url)
    cases: dict[str, t.Callable[[], object]] = {
        "refused": lambda: _connect(driver, f"postgresql://u@127.0.0.1:{closed_port()}/db"),
        "unknown_database": lambda: _connect(
            driver, url.to_sqlalchemy().set(database="no_such_db").render_as_string(False)
        ),
        "unknown_role": lambda: _connect(
            driver, url.to_sqlalchemy().set(username="no_such_role").render_as_string(False)
        ),
        "unknown_host": lambda: _connect(driver, "postgresql://u@no-such-host.invalid/db"),
        "terminated": lambda: _terminated(driver, database_url),
        "statement_timeout": lambda: _execute(
            _connect(driver, database_url, options="-c statement_timeout=50"),
            "SELECT pg_sleep(5)",
        ),
        "read_only": lambda: _execute(
            _connect(driver, database_url, options="-c default_transaction_read_only=on"),
            "CREATE TABLE never_made (id int)",
        ),
    }
    error = _error_of(cases[case])
    assert type(error).__module__.split(".")[0] == driver
    assert classify(error).name == cause
