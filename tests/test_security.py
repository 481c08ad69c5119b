"""Security defaults that a reader cannot check at a glance."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SQL_CALLS = {"execute", "executemany", "exec_driver_sql", "text", "mogrify"}


def sql_built_by_formatting(path: pathlib.Path) -> list[str]:
    """Calls that pass SQL built with an f-string, ``%`` or ``.format()`` straight to the
    database. Parameters must travel separately, so user input can never become SQL."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        if name not in SQL_CALLS:
            continue
        first = node.args[0]
        formatted = (
            isinstance(first, ast.JoinedStr)
            or (isinstance(first, ast.BinOp) and isinstance(first.op, ast.Mod))
            or (isinstance(first, ast.Call) and getattr(first.func, "attr", "") == "format")
        )
        if formatted:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def _is_sql_composition(func: ast.expr) -> bool:
    target = getattr(func, "value", None)
    return (
        isinstance(target, ast.Call)
        and getattr(target.func, "attr", getattr(target.func, "id", "")) == "SQL"
    )


@pytest.mark.parametrize("package", ["flask_neon", "example_app"])
def test_no_sql_is_built_by_string_formatting(package: str) -> None:
    offenders = [
        hit
        for path in sorted((ROOT / package).rglob("*.py"))
        for hit in sql_built_by_formatting(path)
    ]
    assert offenders == []


def test_health_body_in_production_names_no_host_user_or_version() -> None:
    from flask import Flask

    from flask_neon import NeonDB

    app = Flask("prod")
    app.config.update(DB_URL="postgresql://alex:pw@127.0.0.1:1/appdb", DB_CONNECT_RETRY_SECONDS=0)
    NeonDB(app, env_file=None)
    text = app.test_client().get("/health/db").get_data(as_text=True)
    for private in ("127.0.0.1", "alex", "appdb", "version", "refused", "details"):
        assert private not in text.replace("connection_refused", "")
