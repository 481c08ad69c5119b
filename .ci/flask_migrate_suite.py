"""Run Flask-Migrate's own test suite on Flask-SQLAlchemy and on flask-neon, against PostgreSQL.

    .venv/bin/python .ci/flask_migrate_suite.py

Downloads the source distribution of the installed Flask-Migrate (nothing is copied into this
repository) and runs its tests side by side in three copies: once as they are, twice with the
two-line change a Flask-SQLAlchemy user makes (``from flask_neon import NeonDB``,
``NeonDB(app)``), on psycopg2 and on psycopg 3. In all, the apps' SQLite files become
PostgreSQL databases of a throwaway cluster (``flask_migrate_conftest.py``). Fails when
flask-neon fails a test that Flask-SQLAlchemy passes, or when the runs ran different numbers
of tests.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version

from sdist import download, failures  # .ci/, the script's own folder

from flask_neon.local import LocalPostgres

HERE = pathlib.Path(__file__).resolve().parent
#: Each run and the driver its apps' URLs name: Flask-SQLAlchemy is the oracle.
PEERS = {"flask-sqlalchemy": "psycopg2", "flask-neon": "psycopg2", "flask-neon-psycopg": "psycopg"}
#: ``'sqlite:///' + os.path.join(basedir, 'app1.db')``, over one or two lines, either quotes.
SQLITE_URL = re.compile(
    r"""['"]sqlite:///['"]\s*\+\s*os\.path\.join\(\s*basedir,\s*['"](\w+)\.db['"]\)"""
)


def point_at_postgresql(tests: pathlib.Path, neon: bool) -> None:
    """Rewrite the apps' SQLite URLs, and for ``neon`` make the two-line change."""
    for app in tests.glob("app*.py"):
        text = SQLITE_URL.sub(lambda m: f"os.environ['FM_URL_{m[1].upper()}']", app.read_text())
        if neon:
            text = text.replace(
                "from flask_sqlalchemy import SQLAlchemy", "from flask_neon import NeonDB"
            )
            text = text.replace("SQLAlchemy(app)", "NeonDB(app)")
        app.write_text(text)
    shutil.copy(HERE / "flask_migrate_conftest.py", tests / "conftest.py")


def main() -> int:
    flask_migrate_version = version("flask-migrate")
    with tempfile.TemporaryDirectory(prefix="flask-neon-migrate-") as tmp:
        workdir = pathlib.Path(tmp)
        source = download("flask-migrate", flask_migrate_version, workdir / "sdist")
        with LocalPostgres() as cluster:
            runs = {}
            for peer, driver in PEERS.items():
                base = (
                    f"postgresql+{driver}://{cluster.user}@{cluster.host}:{cluster.port}/postgres"
                )
                copy = workdir / peer
                shutil.copytree(source, copy)
                point_at_postgresql(copy / "tests", neon=peer.startswith("flask-neon"))
                report = workdir / f"{peer}.xml"
                # The apps' environment: no DB_* of this shell, no .env (flask-neon reads both).
                env = {
                    k: v
                    for k, v in os.environ.items()
                    if not k.startswith(("DB_", "DATABASE_URL"))
                }
                env.update(FM_BASE_URL=base, FM_PREFIX=peer.replace("-", "_"))
                # The tests run `flask ...`: this interpreter's, not another on the PATH.
                env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
                command = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"]
                command += ["-p", "no:flask_neon.testing", "--junitxml", str(report)]
                log = (workdir / f"{peer}.log").open("w")
                process = subprocess.Popen(command, cwd=copy, env=env, stdout=log, stderr=log)
                runs[peer] = (process, report, log)
            for process, _, log in runs.values():
                process.wait()
                log.close()
            results = {peer: failures(report) for peer, (_, report, _) in runs.items()}
        theirs_ran, theirs_failed = results.pop("flask-sqlalchemy")
        print(f"Flask-Migrate {flask_migrate_version}'s own tests, on PostgreSQL")
        passed = theirs_ran - len(theirs_failed)
        print(f"  Flask-SQLAlchemy (psycopg2): {theirs_ran} run, {passed} passed")
        for test in sorted(theirs_failed):
            print(f"  fails on Flask-SQLAlchemy too (not counted): {test}")
        ok = True
        for peer, (ours_ran, ours_failed) in results.items():
            new = sorted(ours_failed - theirs_failed)
            print(
                f"  {peer} ({PEERS[peer]}): {ours_ran} run, {ours_ran - len(ours_failed)} passed"
            )
            for test in new:
                print(f"  failing only on {peer}: {test}")
            if new or theirs_failed:
                print((workdir / f"{peer}.log").read_text()[-20000:])
            ok = ok and not new and ours_ran == theirs_ran and ours_ran > 0
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
