"""The suite does not read the developer's environment: settings in the shell or a ``.env`` in
the working folder change nothing."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
HOSTILE = {
    "DB_URL": "postgresql://nobody:secret@no-such-host.invalid/nothing",
    "DB_PROFILE": "serverless",
    "DB_POOL_SIZE": "not a number",
    "DB_FAST_BEGIN": "false",
    "DATABASE_URL": "postgresql://nobody@no-such-host.invalid/nothing",
    "SQLALCHEMY_DATABASE_URI": "sqlite://",
    "FLASK_DEBUG": "1",
}


def test_the_suite_ignores_the_shell_and_dot_env(tmp_path: pathlib.Path) -> None:
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in HOSTILE.items()))
    env = {**os.environ, **HOSTILE}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:randomly"),
            *("--rootdir", str(REPO_ROOT), "-c", str(REPO_ROOT / "setup.cfg")),
            str(REPO_ROOT / "tests" / "test_session.py"),
            str(REPO_ROOT / "tests" / "test_driver.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout
