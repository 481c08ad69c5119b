"""Ending the test run on a setup problem, with one message instead of one error per test."""

from __future__ import annotations

import typing as t

import pytest


def _stop_run(message: str) -> t.NoReturn:
    """End the whole run with ``message``: a setup problem, the same for every test.

    A failing session fixture would report the same error once per test that uses it;
    stopping says it once, without a traceback.
    """
    pytest.exit(f"flask-neon: {message}", returncode=pytest.ExitCode.USAGE_ERROR)
