"""Every code block of the README runs here, against a real PostgreSQL, so the docs work.

Python blocks are executed (the fragments in the namespace of the quickstart they continue),
the SQL block runs on the server, the `flask` command lines run as commands, the plugin
example runs as a pytest session of its own, and the install and test commands are the ones
.ci/run executes. ``text`` blocks are sample output and are checked against the real errors.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys
import typing as t

import pytest
import sqlalchemy as sa

from .conftest import admin_execute

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCKS if lang == language]


def block_containing(language: str, text: str) -> str:
    (found,) = [body for body in blocks(language) if text in body]
    return found


def test_every_block_is_covered_here() -> None:
    languages = {lang for lang, _ in BLOCKS}
    assert languages <= {"python", "bash", "sql", "text"}
    assert len(blocks("python")) == 6


@pytest.fixture
def env_url(fresh_database: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DB_URL", fresh_database)
    monkeypatch.chdir(ROOT)
    return fresh_database


def run_python(code: str, namespace: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
    namespace = {"__name__": "readme_example"} if namespace is None else namespace
    exec(compile(code, "README.md", "exec", dont_inherit=True), namespace)
    return namespace


def test_intro_block(env_url: str) -> None:
    from flask_neon import NeonDB

    namespace = run_python(block_containing("python", "db = NeonDB(app)  #"))
    assert isinstance(namespace["db"], NeonDB)
    with namespace["app"].app_context():
        assert namespace["db"].session.execute(sa.text("SELECT 1")).scalar() == 1


def test_quickstart_replica_and_migrate_blocks(env_url: str) -> None:
    namespace = run_python(block_containing("python", "def create_app() -> Flask:"))
    app = namespace["create_app"]()
    db = namespace["db"]
    with app.app_context():
        db.metadata.create_all(db.engine)
    client = app.test_client()
    created = client.post("/notes/hello")
    assert created.status_code == 201
    assert client.get(f"/notes/{created.json['id']}").json == {  # type: ignore[index]
        "id": created.json["id"],  # type: ignore[index]
        "title": "hello",
    }
    assert client.get("/notes/999").status_code == 404

    import sqlalchemy

    with app.app_context():
        namespace.update(sa=sqlalchemy, app=app)
        run_python(block_containing("python", "db.read_session.scalars"), namespace)
        assert [note.title for note in namespace["notes"]] == ["hello"]
        run_python(block_containing("python", "migrate = Migrate(app, db)"), namespace)
    assert app.extensions["migrate"].db is db


def test_sql_block_moves_the_limits_onto_the_role(env_url: str) -> None:
    admin_execute(env_url, "DROP ROLE IF EXISTS app_user")
    admin_execute(env_url, "CREATE ROLE app_user")
    try:
        for statement in block_containing("sql", "ALTER ROLE").strip().split(";"):
            if statement.strip():
                admin_execute(env_url, statement)
        rows = admin_execute(
            env_url,
            "SELECT unnest(setconfig) FROM pg_db_role_setting s JOIN pg_roles r "
            "ON r.oid = s.setrole WHERE r.rolname = 'app_user'",
        )
        assert sorted(row[0] for row in rows) == [
            "idle_in_transaction_session_timeout=60s",
            "statement_timeout=30s",
        ]
    finally:
        admin_execute(env_url, "DROP ROLE app_user")


def test_db_check_command_lines(env_url: str) -> None:
    lines = [
        line.split("#", 1)[0].strip()
        for line in block_containing("bash", "db-check pool").splitlines()
        if line.strip()
    ]
    assert len(lines) == 5
    env = {**os.environ, "DB_URL": env_url}
    flask = [sys.executable, "-m", "flask"]
    for line in lines:
        args = shlex.split(line)
        assert args[0] == "flask"
        result = subprocess.run(
            flask + args[1:], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, (line, result.stdout, result.stderr)


def test_install_and_test_commands_are_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (install,) = [body for body in blocks("bash") if "pip install" in body]
    (test_command,) = [body.strip() for body in blocks("bash") if "pytest" in body]
    assert test_command in ci.splitlines()
    assert ".venv/bin/pip install -e '.[test]'" in install or "pip install -e '.[test]'" in install
    assert "python3 -m venv .venv" in install
    assert "python3 -m venv .venv" in ci
    assert "-m pip install -q -e '.[test]'" in ci
    for command in ("db upgrade", "run"):
        assert f"flask --app example_app {command}" in install


def test_plugin_example_runs_as_a_test_session(
    fresh_database: str, tmp_path: pathlib.Path
) -> None:
    conftest = block_containing("python", "def neon_app(neon_database_url)")
    tests = block_containing("python", "def test_each_test_starts_empty")
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_notes.py").write_text(tests)
    (tmp_path / "example_app").symlink_to(ROOT / "example_app")
    env = {**os.environ, "FLASK_NEON_TEST_URL": fresh_database, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_sample_error_messages_are_real() -> None:
    from flask import Flask

    from flask_neon import NeonConfigError, NeonDB

    samples = [line for line in block_containing("text", "DB_POOL_SIZE").splitlines() if line]
    configs = [
        {"DB_POOL_SIZE": 0},
        {"DB_PROFILE": "staging"},
        {"DB_URL": "mysql://user:pw@host/db"},
        {"DB_URL": "postgresql://user:pw@/db"},
    ]
    assert len(samples) == len(configs)
    for sample, config in zip(samples, configs, strict=True):
        app = Flask("readme")
        app.config.update({"DB_URL": "postgresql://user:pw@127.0.0.1/db", **config})
        with pytest.raises(NeonConfigError) as info:
            NeonDB(app, env_file=None)
        assert str(info.value).startswith(sample.removesuffix("...").rstrip())
