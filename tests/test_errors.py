"""The classifier's table. Real failures are produced in test_engine.py and test_operator.py;
here the messages the machine cannot produce (Neon's own) are checked against the table."""

from __future__ import annotations

import pathlib
import re

import pytest

from flask_neon._errors import _RULES, classify, mask_secrets

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
