"""CPU per request, counted rather than timed: the load test's apps, instruction by instruction.

On loopback a database app is CPU-bound, so its throughput is the inverse of its CPU per
request; but on a shared machine the throughput of one round differs from the next by more
than the difference between the apps (``load_test.py``: per-round ratios from 0.83 to 1.19).
Counts do not move: each app runs ``GET /notes/<id>`` as WSGI calls in one process (no HTTP
server, the response closed as a WSGI server closes it), once with ``--small`` requests and
once with ``--large``, under

* valgrind's callgrind: the instructions the process ran in user space (Python, SQLAlchemy,
  Flask, psycopg2, libpq); the same count each run, whatever else the machine does;
* strace: the system calls it made (each a trip into the kernel: sends, receives, polls);
* ``time.process_time()``: the CPU (user and kernel) a request takes, the cheapest of
  ``CPU_REPEATS`` runs of ``CPU_REQUESTS`` requests: what the two counts above cost together.
  Timed, so it moves with the machine's other tenants; the cheapest run is the least disturbed.

With ``PYTHONHASHSEED=0`` in every run: Python seeds string hashing per process, which moves an
instruction count by a few percent from one run to the next. And without address space
randomisation (``setarch -R``, when there): objects hashed by address (SQLAlchemy's caches,
weak dictionaries) land elsewhere each run, which moved the count by up to 2% more.

Per request: (large - small) / (large - small requests), so start-up and warm-up cancel out.
The apps are those of ``load_test.py``: the example app on flask-neon (production profile) and
``fsqla_app.py`` on Flask-SQLAlchemy, with ``pool_pre_ping`` and without.

``--nplusone``: what N+1 detection (``DB_NPLUSONE``, ``flask_neon/_nplusone.py``) costs, in
instructions per request (callgrind, as above), for three requests of ``nplusone_app.py``:
a one-query read (``GET /notes/<id>``), 50 ``SELECT`` statements of one shape with other
parameters (``GET /bench/selects``) and a listing with 50 lazy loads (``GET /bench/lazy``, 51
statements). Side by side in one run, each case under ``DB_NPLUSONE=off`` and ``warn``, and
``off`` / ``count`` with ``DB_METRICS=true`` (the Prometheus counter); with ``--before DIR``
(a checkout of the commit before detection existed: ``git worktree add /tmp/before
d5029eb~1``) also that checkout's flask_neon on the same app, and with ``--after DIR`` another
checkout than this one measured as "after". The 50-statement requests run 5 and 20 times
(after 10), the read 100 and 300 (after WARMUP); ``--keep DIR`` keeps callgrind's files for
``callgrind_annotate``; ``--case`` picks cases by name.

A change of code moves where strings land in Python's dictionaries, which alone moved a
one-query read by up to 2% (a no-op session listener cost more than the real one). So
``--seeds 0,1,2`` runs each variant under each ``PYTHONHASHSEED`` and reports the mean and the
range; the checkouts are linked at fixed paths, so a run repeats.

Usage (needs valgrind and strace: ``apt-get install valgrind strace``)::

    python benchmarks/bench_cpu.py                 # starts a throwaway local PostgreSQL
    BENCH_DB_URL=postgresql://... python benchmarks/bench_cpu.py --json out.json
    BENCH_DB_URL=postgresql://... python benchmarks/bench_cpu.py --nplusone --before /tmp/before

Only reports; exits non-zero when a tool is missing or a request fails.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import typing as t

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTES = 100
#: name -> (app module, extra environment)
PEERS: dict[str, tuple[str, dict[str, str]]] = {
    "flask-neon": ("example_app", {}),
    "Flask-SQLAlchemy, pool_pre_ping": ("benchmarks.fsqla_app", {}),
    "Flask-SQLAlchemy": ("benchmarks.fsqla_app", {"FSQLA_PRE_PING": "0"}),
}
#: Requests every run makes before the counted ones start to matter (caches, the pool).
WARMUP = 200
#: Timed CPU: runs of CPU_REQUESTS requests, the cheapest counts (the others met other tenants).
CPU_REPEATS = 7
CPU_REQUESTS = 1000
#: Environment of a child: the path it requests (``{id}``: a random note), its warm-up requests,
#: and a directory whose flask_neon it imports instead of this checkout's.
PATH_ENV, WARMUP_ENV, SOURCE_ENV = "BENCH_CPU_PATH", "BENCH_CPU_WARMUP", "BENCH_CPU_FLASK_NEON"


class Case(t.NamedTuple):
    """One request of ``--nplusone``, and how often it runs under callgrind."""

    path: str
    small: int
    large: int
    warmup: int


NPLUSONE_APP = "benchmarks.nplusone_app"
NPLUSONE_CASES: dict[str, Case] = {
    "one-query read": Case("/notes/{id}", 100, 300, WARMUP),
    "50 SELECTs, one shape": Case("/bench/selects", 5, 20, 10),
    "50 lazy loads (51 statements)": Case("/bench/lazy", 5, 20, 10),
}
#: name -> (checkout: "before", "after"; extra environment). Ratios: each to the one it names.
NPLUSONE_VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "before detection": ("before", {}),
    "off": ("after", {"DB_NPLUSONE": "off"}),
    "warn": ("after", {"DB_NPLUSONE": "warn"}),
    "off, DB_METRICS": ("after", {"DB_NPLUSONE": "off", "DB_METRICS": "true"}),
    "count, DB_METRICS": ("after", {"DB_NPLUSONE": "count", "DB_METRICS": "true"}),
}
NPLUSONE_RATIOS = (
    ("off", "before detection"),
    ("warn", "off"),
    ("count, DB_METRICS", "off, DB_METRICS"),
)


def _request_loop(module: str) -> t.Callable[[int], None]:
    """In the child: a function making N reads of random notes, each closed as a server would."""
    import importlib
    import random

    from werkzeug.test import EnvironBuilder

    app = importlib.import_module(module).create_app()
    path = os.environ.get(PATH_ENV, "/notes/{id}")
    rng = random.Random(1)  # the same notes in every run
    environs = [
        EnvironBuilder(
            path=path.format(id=rng.randint(1, NOTES)),
            # A WSGI server names itself: flask-neon then ends the transaction after the response.
            environ_base={"SERVER_SOFTWARE": "gunicorn"},
        ).get_environ()
        for _ in range(NOTES)
    ]
    failed: list[str] = []

    def start_response(status: str, headers: t.Any, exc_info: t.Any = None) -> None:
        if not status.startswith("200"):
            failed.append(status)

    def run(requests: int) -> None:
        for index in range(requests):
            body = app(dict(environs[index % NOTES]), start_response)
            try:
                for _ in body:
                    pass
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
        if failed:  # checked without a pass over every status: it runs inside the timing
            sys.exit(f"{module}: {len(failed)} requests failed, e.g. {failed[0]}")

    return run


def serve(module: str, requests: int) -> None:
    """In the child: ``requests`` + WARMUP reads (for callgrind and strace)."""
    _request_loop(module)(int(os.environ.get(WARMUP_ENV, WARMUP)) + requests)


def time_cpu(module: str, requests: int) -> None:
    """In the child: print the CPU (user + kernel) of the cheapest of CPU_REPEATS runs of
    ``requests`` reads, in microseconds a request."""
    run = _request_loop(module)
    run(WARMUP)
    best = float("inf")
    for _ in range(CPU_REPEATS):
        started = time.process_time()
        run(requests)
        best = min(best, time.process_time() - started)
    print(best / requests * 1e6)


def _child(module: str, requests: int, mode: str = "--child") -> list[str]:
    return [sys.executable, __file__, mode, module, str(requests)]


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])}... failed:\n{done.stderr[-2000:]}")
    return done


def cpu_microseconds(module: str, env: dict[str, str]) -> float:
    """CPU per request in one process, the cheapest of CPU_REPEATS x CPU_REQUESTS requests."""
    return float(_run(_child(module, CPU_REQUESTS, "--child-cpu"), env).stdout)


def instructions(
    module: str, requests: int, env: dict[str, str], workdir: str, name: str = "callgrind.out"
) -> int:
    out = os.path.join(workdir, name)
    fixed_addresses = ["setarch", "-R"] if shutil.which("setarch") else []
    command = [*fixed_addresses, "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    stderr = _run([*command, *_child(module, requests)], env).stderr
    found = re.search(r"Collected : (\d+)", stderr)
    if found is None:
        raise SystemExit(f"no instruction count in callgrind's output:\n{stderr[-2000:]}")
    return int(found[1])


def system_calls(module: str, requests: int, env: dict[str, str], workdir: str) -> int:
    out = os.path.join(workdir, "strace.out")
    _run(["strace", "-f", "-c", "-o", out, *_child(module, requests)], env)
    summary = pathlib.Path(out).read_text()
    # The last line: "100.00  seconds  usecs/call  calls  [errors]  total".
    total = re.search(r"^\s*100\.00\s+\S+\s+\S+\s+(\d+)\s+(?:\d+\s+)?total\s*$", summary, re.M)
    if total is None:
        raise SystemExit(f"no total in strace's summary:\n{summary}")
    return int(total[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--small", type=int, default=200, help="requests of the first run")
    parser.add_argument("--large", type=int, default=600, help="requests of the second run")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--nplusone", action="store_true", help="the cost of N+1 detection")
    parser.add_argument("--before", help="--nplusone: a checkout from before detection")
    parser.add_argument("--after", help="--nplusone: the checkout measured (default: this one)")
    parser.add_argument("--keep", help="--nplusone: keep callgrind's files in this directory")
    parser.add_argument("--case", action="append", help="--nplusone: only these cases")
    parser.add_argument("--seeds", default="0", help="--nplusone: PYTHONHASHSEEDs, e.g. 0,1,2")
    parser.add_argument("--child", nargs=2, metavar=("MODULE", "REQUESTS"), help=argparse.SUPPRESS)
    parser.add_argument("--child-cpu", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child or args.child_cpu:
        sys.path.insert(0, str(ROOT))
        source = os.environ.get(SOURCE_ENV)
        if source:  # a directory holding only a link to another checkout's flask_neon
            sys.path.insert(0, source)
            import flask_neon

            found, wanted = (
                pathlib.Path(flask_neon.__file__).resolve().parent,
                (pathlib.Path(source) / "flask_neon").resolve(),
            )
            if found != wanted:
                sys.exit(f"flask_neon came from {found}, not {wanted}")
        module, requests = args.child or args.child_cpu
        (serve if args.child else time_cpu)(module, int(requests))
        return 0
    missing = [tool for tool in ("valgrind", "strace") if shutil.which(tool) is None]
    if missing:
        print(
            f"missing: {', '.join(missing)} (apt-get install {' '.join(missing)})", file=sys.stderr
        )
        return 1
    if args.large <= args.small:
        parser.error("--large must be more than --small")

    sys.path.insert(0, str(ROOT))
    if args.nplusone:
        seeds = [int(seed) for seed in args.seeds.split(",")]
        cases = {n: c for n, c in NPLUSONE_CASES.items() if not args.case or n in args.case}
        return nplusone_cost(cases, seeds, args.before, args.after, args.keep, args.json)
    from benchmarks.load_test import database, prepare

    results: dict[str, dict[str, float]] = {}
    with database() as (url, _), tempfile.TemporaryDirectory(prefix="bench-cpu-") as workdir:
        prepare(url)
        base = {key: value for key, value in os.environ.items() if not key.startswith("DB_")}
        for name, (module, extra) in PEERS.items():
            # String hashing is seeded per process and moves the count by a few percent.
            env = {
                **base,
                "DB_URL": url,
                "DB_PROFILE": "production",
                "PYTHONHASHSEED": "0",
                **extra,
            }
            per_request: dict[str, float] = {}
            for label, count in (("instructions", instructions), ("system calls", system_calls)):
                small = count(module, args.small, env, workdir)
                large = count(module, args.large, env, workdir)
                per_request[label] = (large - small) / (args.large - args.small)
            per_request["CPU us"] = cpu_microseconds(module, env)
            results[name] = per_request
            print(
                f"{name:34} {per_request['instructions'] / 1000:9.0f} k instructions "
                f"{per_request['system calls']:6.1f} system calls "
                f"{per_request['CPU us']:6.0f} us CPU per request",
                flush=True,
            )
    neon = results["flask-neon"]
    for name, result in results.items():
        if name != "flask-neon":
            ratios = {key: neon[key] / result[key] for key in result}
            print(
                f"flask-neon / {name}: instructions {ratios['instructions']:.3f}, "
                f"system calls {ratios['system calls']:.3f}, CPU {ratios['CPU us']:.3f}"
            )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _checkout(directory: str) -> str:
    """The commit of a checkout, and whether its flask_neon differs from it."""
    git = ["git", "-C", directory]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "flask_neon"], capture_output=True, text=True
    )
    return head.stdout.strip() + (" + uncommitted flask_neon changes" if dirty.stdout else "")


def nplusone_cost(
    cases: dict[str, Case],
    seeds: list[int],
    before: str | None,
    after: str | None,
    keep: str | None,
    json_file: str | None,
) -> int:
    """``--nplusone``: instructions per request of each case under each variant."""
    import statistics

    from benchmarks.load_test import database, prepare
    from benchmarks.nplusone_app import seed

    sources = {"after": str(pathlib.Path(after or ROOT).resolve())}
    if before:
        sources["before"] = str(pathlib.Path(before).resolve())
    # Only flask_neon comes from a checkout: the app, the benchmark and the rest from here. It
    # is linked at a fixed path: a random one would move the counts from one run to the next.
    links = pathlib.Path(tempfile.gettempdir()) / "bench-cpu-nplusone"
    for label, directory in list(sources.items()):
        if not (pathlib.Path(directory) / "flask_neon" / "__init__.py").is_file():
            raise SystemExit(f"--{label} {directory}: no flask_neon there")
        print(f"{label}: {directory} at {_checkout(directory)}", flush=True)
        link = links / label / "flask_neon"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(pathlib.Path(directory) / "flask_neon")
        sources[label] = str(link.parent)
    variants = {n: v for n, v in NPLUSONE_VARIANTS.items() if v[0] in sources}
    if keep:
        pathlib.Path(keep).mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, float]]] = {case: {} for case in cases}
    with database() as (url, _), tempfile.TemporaryDirectory(prefix="bench-cpu-") as workdir:
        prepare(url)
        seed(url)
        base = {key: value for key, value in os.environ.items() if not key.startswith("DB_")}
        for case, (path, small, large, warmup) in cases.items():
            for name, (checkout, extra) in variants.items():
                env = {
                    **base,
                    "DB_URL": url,
                    "DB_PROFILE": "production",
                    PATH_ENV: path,
                    WARMUP_ENV: str(warmup),
                    SOURCE_ENV: sources[checkout],
                    **extra,
                }
                per_seed = []
                for hash_seed in seeds:
                    env["PYTHONHASHSEED"] = str(hash_seed)
                    counts = []
                    for requests in (small, large):
                        file = f"{case} {name} {requests} seed {hash_seed}"
                        file = re.sub(r"\W+", "-", file) + ".callgrind"
                        counts.append(
                            instructions(NPLUSONE_APP, requests, env, keep or workdir, file)
                        )
                    per_seed.append((counts[1] - counts[0]) / (large - small))
                mean = statistics.fmean(per_seed)
                results[case][name] = {"mean": mean, "min": min(per_seed), "max": max(per_seed)}
                spread = f"({min(per_seed) / 1000:.1f} - {max(per_seed) / 1000:.1f})"
                print(
                    f"{case:30} {name:20} {mean / 1000:9.1f} k instructions {spread}", flush=True
                )
            for name, reference in NPLUSONE_RATIOS:
                if name in results[case] and reference in results[case]:
                    ratio = results[case][name]["mean"] / results[case][reference]["mean"]
                    print(f"{case:30} {name} / {reference}: {ratio:.4f} ({ratio - 1:+.2%})")
    if json_file:
        pathlib.Path(json_file).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
