"""Run SQLAlchemy's own tests on fast BEGIN and on the driver's own BEGIN; compare the failures.

    .venv/bin/python .ci/foreign_suites.py [psycopg2] [psycopg]

Downloads the source distribution of the installed SQLAlchemy version (its tests are not in
the wheel; nothing is copied into this repository) and, for each driver (psycopg2, then
psycopg 3; both when none is named), starts two throwaway PostgreSQL clusters and runs
SQLAlchemy's PostgreSQL dialect tests and its engine and ORM transaction tests twice, side by
side: once as they are, once with every engine's transactions opened by flask-neon's
``TransactionOpener`` with that driver's module (``fast_begin_plugin.py``). Fails when fast
BEGIN fails a test that the driver's own handling passes, when the two runs did not run the
same tests, or when fast BEGIN never opened a transaction. Tests that fail in both runs
(environment differences, such as a missing collation) are reported and not counted.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time

import sqlalchemy
from sdist import download, failures  # .ci/, the script's own folder

from flask_neon.local import LocalPostgres

HERE = pathlib.Path(__file__).resolve().parent
DRIVERS = ("psycopg2", "psycopg")
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
SETTINGS = {"max_prepared_transactions": "10", "max_connections": "200"}
#: Tests that fail only with fast BEGIN because they read a difference docs/fast-begin.md
#: documents ("What remains different, and why"), by driver: the test's name, and why.
#: Anything else failing only with fast BEGIN fails the run.
DOCUMENTED = {
    "psycopg": {
        "test_autocommit_pre_ping[False]": (
            "reads the raw connection's autocommit inside a transaction fast BEGIN opened: True "
            "on psycopg 3, which offers no public way to set it back while a transaction runs"
        ),
    },
}


def run_driver(driver: str, source: pathlib.Path, workdir: pathlib.Path) -> bool:
    """Both runs of ``driver``; print the comparison; True when fast BEGIN failed nothing new."""
    started = time.monotonic()
    # A cluster per run: prepared transactions' ids (the two-phase tests use fixed ones) are
    # cluster-wide, and the runs go side by side.
    with LocalPostgres(settings=SETTINGS) as plain, LocalPostgres(settings=SETTINGS) as fast:
        runs = {}
        count_file = workdir / f"fast-begin-count-{driver}"
        for mode, cluster in (("plain", plain), ("fast", fast)):
            database = f"sa_{mode}"
            cluster.execute(f'CREATE DATABASE "{database}"')
            for statement in SETUP:
                cluster.execute(statement, database=database)
            dburi = (
                f"postgresql+{driver}://{cluster.user}@{cluster.host}:{cluster.port}/{database}"
            )
            report = workdir / f"{driver}-{mode}.xml"
            plugin = ["-p", "fast_begin_plugin"] if mode == "fast" else []
            env = {
                **os.environ,
                "PYTHONPATH": str(HERE),
                "FAST_BEGIN_DRIVER": driver,
                "FAST_BEGIN_COUNT_FILE": str(count_file),
            }
            command = [sys.executable, "-m", "pytest", *SUITES, "--dburi", dburi]
            command += ["-q", "-p", "no:cacheprovider", "--junitxml", str(report), *plugin]
            log = (workdir / f"{driver}-{mode}.log").open("w")
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
        opened = int(count_file.read_text()) if count_file.exists() else 0
    documented = DOCUMENTED.get(driver, {})
    known = sorted(t for t in fast_failed - plain_failed if t.split("::")[-1] in documented)
    new = sorted(fast_failed - plain_failed - set(known))
    print(f"SQLAlchemy {sqlalchemy.__version__} on {driver}: {', '.join(SUITES)}")
    print(f"  {driver}'s own BEGIN: {plain_ran} run, {len(plain_failed)} failed")
    print(f"  fast BEGIN:{' ' * (len(driver) + 2)} {fast_ran} run, {len(fast_failed)} failed")
    print(f"  transactions fast BEGIN opened: {opened}")
    print(f"  failing only with fast BEGIN: {len(new)}")
    for test in new:
        print(f"    {test}")
    for test in known:
        print(
            f"  fails only with fast BEGIN, documented: {test}: {documented[test.split('::')[-1]]}"
        )
    for test in sorted(plain_failed & fast_failed):
        print(f"  fails in both (not counted): {test}")
    print(f"  {time.monotonic() - started:.0f} s")
    if new:
        print((workdir / f"{driver}-fast.log").read_text()[-20000:])
    return not new and fast_ran == plain_ran and opened > 0


def main(argv: list[str]) -> int:
    drivers = argv or list(DRIVERS)
    unknown = sorted(set(drivers) - set(DRIVERS))
    if unknown:
        print(f"unknown driver(s): {', '.join(unknown)}; choose from {', '.join(DRIVERS)}")
        return 2
    with tempfile.TemporaryDirectory(prefix="flask-neon-foreign-") as tmp:
        workdir = pathlib.Path(tmp)
        source = download("sqlalchemy", sqlalchemy.__version__, workdir)
        results = [run_driver(driver, source, workdir) for driver in drivers]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
