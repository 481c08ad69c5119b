"""Run SQLAlchemy's own tests on fast BEGIN and on psycopg2's own BEGIN; compare the failures.

    .venv/bin/python .ci/foreign_suites.py

Downloads the source distribution of the installed SQLAlchemy version (its tests are not in
the wheel; nothing is copied into this repository), starts two throwaway PostgreSQL clusters,
and runs SQLAlchemy's PostgreSQL dialect tests and its engine and ORM transaction tests twice,
side by side: once as they are, once with every engine's transactions opened by
:func:`flask_neon.driver.install`. Fails when fast BEGIN fails a test that psycopg2's own
handling passes. Tests that fail in both runs (environment differences, such as a missing
collation) are reported and not counted.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

import sqlalchemy
from sdist import download, failures  # .ci/, the script's own folder

from flask_neon.local import LocalPostgres

HERE = pathlib.Path(__file__).resolve().parent
SUITES = [
    "test/dialect/postgresql",
    "test/engine/test_transaction.py",
    "test/engine/test_execute.py",
    "test/orm/test_transaction.py",
]
SETUP = [
    "CREATE SCHEMA test_schema",
    "CREATE SCHEMA test_schema_2",
    "CREATE EXTENSION hstore",
    "CREATE EXTENSION citext",
]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="flask-neon-foreign-") as tmp:
        workdir = pathlib.Path(tmp)
        source = download("sqlalchemy", sqlalchemy.__version__, workdir)
        settings = {"max_prepared_transactions": "10", "max_connections": "200"}
        # A cluster per run: prepared transactions' ids (the two-phase tests use fixed ones)
        # are cluster-wide, and the runs go side by side.
        with LocalPostgres(settings=settings) as plain, LocalPostgres(settings=settings) as fast:
            runs = {}
            for mode, cluster in (("plain", plain), ("fast", fast)):
                cluster.execute(f'CREATE DATABASE "sa_{mode}"')
                for statement in SETUP:
                    cluster.execute(statement, database=f"sa_{mode}")
                dburi = (
                    f"postgresql+psycopg2://{cluster.user}@{cluster.host}:{cluster.port}/sa_{mode}"
                )
                report = workdir / f"{mode}.xml"
                plugin = ["-p", "fast_begin_plugin"] if mode == "fast" else []
                count_file = workdir / "fast-begin-count"
                env = {
                    **os.environ,
                    "PYTHONPATH": str(HERE),
                    "FAST_BEGIN_COUNT_FILE": str(count_file),
                }
                command = [sys.executable, "-m", "pytest", *SUITES, "--dburi", dburi]
                command += ["-q", "-p", "no:cacheprovider", "--junitxml", str(report), *plugin]
                log = (workdir / f"{mode}.log").open("w")
                runs[mode] = (
                    subprocess.Popen(command, cwd=source, env=env, stdout=log, stderr=log),
                    report,
                    log,
                )
            for process, _, log in runs.values():
                process.wait()
                log.close()
            (plain_ran, plain_failed), (fast_ran, fast_failed) = (
                failures(report) for _, report, _ in runs.values()
            )
            opened = int(count_file.read_text())
        new = sorted(fast_failed - plain_failed)
        print(f"SQLAlchemy {sqlalchemy.__version__}: {', '.join(SUITES)}")
        print(f"  psycopg2's own BEGIN: {plain_ran} run, {len(plain_failed)} failed")
        print(f"  fast BEGIN:           {fast_ran} run, {len(fast_failed)} failed")
        print(f"  transactions fast BEGIN opened: {opened}")
        print(f"  failing only with fast BEGIN: {len(new)}")
        for test in new:
            print(f"    {test}")
        for test in sorted(plain_failed & fast_failed):
            print(f"  fails in both (not counted): {test}")
        if new:
            print((workdir / "fast.log").read_text()[-20000:])
        return 1 if new or fast_ran != plain_ran or not opened else 0


if __name__ == "__main__":
    sys.exit(main())
