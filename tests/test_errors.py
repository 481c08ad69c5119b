"""The classifier's table. Real failures are produced in test_engine.py and test_operator.py;
here the messages the machine cannot produce (Neon's own) are checked against the table."""

from __future__ import annotations

import re

import pytest

from flask_neon._errors import _RULES, classify, mask_secrets


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


def test_detail_is_masked() -> None:
    cause = classify(Exception("failed for p@ss and p%40ss"), secrets=["p@ss"])
    assert "p@ss" not in cause.detail
    assert "p%40ss" not in cause.detail


def test_mask_secrets_ignores_empty_secrets() -> None:
    assert mask_secrets("abc", ["", "b"]) == "a***c"
