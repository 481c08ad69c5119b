"""Request latency as the client sees it, in milliseconds and in database round trips.

    .venv/bin/python benchmarks/bench_latency.py [--delays 1,5,20] [--rounds 5] [--per-round 60]

Every peer is served by gunicorn (gthread, one worker, one thread) and reaches PostgreSQL through
a proxy that delays each direction by the given milliseconds (a network hop: 1 ms each way is an
app and a Neon compute in one region). One keep-alive HTTP client per peer sends a request,
reads the whole answer, pauses ``--pause-ms`` and sends the next; peers take turns in a new
random order each round. Reads are ``GET /notes/<id>`` (one ``SELECT`` through the request's
session), writes ``POST /notes`` (an ORM insert and ``COMMIT``).

Round trips are (peer's latency - bare Flask's latency) / the round trip through the proxy, at
p50 and p99: what the database costs the client. The targets (1 ms delay): flask-neon reads
<= 1.2 round trips at p50 and <= 2 at p99, writes <= 2.2 at p50. Exits 1 when one is missed
(``--no-targets``: report only); ``--json FILE`` writes the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import pathlib
import random
import statistics
import sys
import tempfile
import time
import typing as t

import psycopg2  # type: ignore[import-untyped]

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.delay_proxy import DelayProxy
from benchmarks.load_test import Variant, database, gunicorn, prepare

PEERS = (
    Variant("bare Flask", "benchmarks.latency_apps:bare()", "", 1, {}),
    Variant("raw psycopg2 pool", "benchmarks.latency_apps:raw()", "", 1, {}),
    Variant(
        "Flask-SQLAlchemy", "benchmarks.fsqla_app:create_app()", "", 1, {"FSQLA_PRE_PING": "0"}
    ),
    Variant("Flask-SQLAlchemy pre_ping", "benchmarks.fsqla_app:create_app()", "", 1, {}),
    Variant("flask-neon", "example_app:create_app()", "", 1, {"DB_PROFILE": "production"}),
    Variant(
        "flask-neon, RLS setting",
        "benchmarks.latency_apps:neon_rls()",
        "",
        1,
        {"DB_PROFILE": "production"},
    ),
)
NEON = "flask-neon"
BARE = "bare Flask"
TARGETS = {("read", "p50"): 1.2, ("read", "p99"): 2.0, ("write", "p50"): 2.2}
BODY = json.dumps({"title": "latency", "body": "Lorem ipsum dolor sit amet. " * 4})


@dataclasses.dataclass
class Client:
    """One keep-alive HTTP/1.1 connection to one peer."""

    port: int
    connection: http.client.HTTPConnection | None = None

    def warm(self) -> None:
        """One request not measured, on a new connection if the server closed the old one."""
        try:
            self.request("GET", "/notes/1", None)
        except (http.client.HTTPException, ConnectionError):
            self.connection = None
            self.request("GET", "/notes/1", None)

    def request(self, method: str, path: str, body: str | None) -> float:
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json"} if body else {}
        started = time.perf_counter()
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        response.read()
        elapsed = time.perf_counter() - started
        if response.status not in (200, 201):
            raise RuntimeError(f"{method} {path}: status {response.status}")
        if response.getheader("Connection", "").lower() == "close":
            self.connection.close()
            self.connection = None
        return elapsed


def round_trip_ms(url: str) -> float:
    """The median ``SELECT 1`` round trip through the proxy, in ms."""
    connection = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://"))
    connection.autocommit = True
    cursor = connection.cursor()
    times = []
    for _ in range(200):
        started = time.perf_counter()
        cursor.execute("SELECT 1")
        cursor.fetchone()
        times.append(time.perf_counter() - started)
    connection.close()
    return statistics.median(times) * 1000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    ports: dict[str, int], rounds: int, per_round: int, pause_s: float
) -> dict[str, dict[str, list[float]]]:
    """Latencies in ms per peer and kind, peers interleaved in a random order each round."""
    clients = {name: Client(port) for name, port in ports.items()}
    found: dict[str, dict[str, list[float]]] = {name: {"read": [], "write": []} for name in ports}
    for client in clients.values():  # warm: connections open, code paths run
        for _ in range(10):
            client.request("GET", f"/notes/{random.randint(1, 100)}", None)
            client.request("POST", "/notes", BODY)
    for _ in range(rounds):
        order = list(clients)
        random.shuffle(order)
        for name in order:
            clients[name].warm()  # the keep-alive connection may have timed out meanwhile
            for kind in ("read", "write"):
                for _ in range(per_round):
                    if kind == "read":
                        path, body, method = f"/notes/{random.randint(1, 100)}", None, "GET"
                    else:
                        path, body, method = "/notes", BODY, "POST"
                    found[name][kind].append(clients[name].request(method, path, body) * 1000)
                    time.sleep(pause_s)
    return found


def summarize(
    found: dict[str, dict[str, list[float]]], rtt_ms: float
) -> dict[str, dict[str, dict[str, float]]]:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name, kinds in found.items():
        summary[name] = {}
        for kind, values in kinds.items():
            row = {"p50_ms": percentile(values, 0.5), "p99_ms": percentile(values, 0.99)}
            summary[name][kind] = row
    for name in summary:
        for kind, row in summary[name].items():
            bare = summary[BARE][kind]
            row["p50_rt"] = (row["p50_ms"] - bare["p50_ms"]) / rtt_ms
            row["p99_rt"] = (row["p99_ms"] - bare["p99_ms"]) / rtt_ms
    return summary


def report(
    delay_ms: float, rtt_ms: float, summary: dict[str, dict[str, dict[str, float]]]
) -> None:
    print(f"\n## {delay_ms:g} ms each way (round trip through the proxy: {rtt_ms:.2f} ms)\n")
    print("| peer | read p50 | read p99 | write p50 | write p99 |")
    print("|---|---:|---:|---:|---:|")
    for name, kinds in summary.items():
        cells = []
        for kind in ("read", "write"):
            for q in ("p50", "p99"):
                row = kinds[kind]
                cells.append(f"{row[f'{q}_ms']:.2f} ms ({row[f'{q}_rt']:.1f} RT)")
        print(f"| {name} | " + " | ".join(cells) + " |")


def after_idle_and_restart(url: str, direct_url: str, rtt_ms: float) -> dict[str, float]:
    """What one read costs a flask-neon app (in-process WSGI calls, through the proxy) when its
    pooled connection is fresh, idle past ``DB_PING_AFTER_IDLE`` (a ping first), or was ended
    by the server (a restart or a Neon suspend: a closed socket, noticed without a round trip,
    then a new connection). Medians of 15, in round trips over the warm read."""
    from werkzeug.test import EnvironBuilder

    from example_app import create_app
    from example_app.extensions import db

    idle_s = 0.3
    app = create_app({"DB_URL": url, "DB_PROFILE": "production", "DB_PING_AFTER_IDLE": idle_s})

    def read() -> float:
        # As under a WSGI server: the response ends the transaction once sent (closed below).
        environ = EnvironBuilder(
            path="/notes/1", environ_base={"SERVER_SOFTWARE": "b"}
        ).get_environ()
        started = time.perf_counter()
        body = app(environ, lambda *_: None)
        b"".join(body)
        elapsed = time.perf_counter() - started
        body.close()  # type: ignore[attr-defined]
        settle()
        return elapsed * 1000

    def settle() -> None:
        """Wait for the ROLLBACK the closer thread sends, so each read starts alike."""
        with app.app_context():
            while db.engine.pool.checkedout():  # type: ignore[attr-defined]
                time.sleep(0.0005)

    def terminate() -> None:
        connection = psycopg2.connect(
            direct_url.replace("postgresql+psycopg2://", "postgresql://")
        )
        connection.autocommit = True
        connection.cursor().execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'flask-neon:%'"
        )
        connection.close()

    for _ in range(20):
        read()
    cases: dict[str, list[float]] = {"warm": [], "after idle": [], "after restart": []}
    for _ in range(15):
        cases["warm"].append(read())
        time.sleep(idle_s * 1.5)
        cases["after idle"].append(read())
        terminate()
        time.sleep(0.05)  # the server's goodbye reaches the pooled socket
        cases["after restart"].append(read())
    warm = statistics.median(cases["warm"])
    return {name: (statistics.median(v) - warm) / rtt_ms for name, v in cases.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", default="1,5,20", help="ms each way, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=60)
    parser.add_argument("--pause-ms", type=float, default=5.0)
    parser.add_argument("--no-targets", action="store_true")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    results: dict[str, t.Any] = {}
    missed = []
    with database() as (url, _), tempfile.TemporaryDirectory() as tmp:
        prepare(url)
        target = sa_target(url)
        for delay_ms in (float(d) for d in args.delays.split(",")):
            proxy = DelayProxy(target, delay_ms / 1000)
            proxied = proxy.url(url)
            try:
                rtt = round_trip_ms(proxied)
                ports = {}
                with Serving(proxied, pathlib.Path(tmp)) as bases:
                    ports = {name: int(base.rsplit(":", 1)[1]) for name, base in bases.items()}
                    found = measure(ports, args.rounds, args.per_round, args.pause_ms / 1000)
                extra = after_idle_and_restart(proxied, url, rtt)
            finally:
                proxy.close()
            summary = summarize(found, rtt)
            report(delay_ms, rtt, summary)
            print(
                "\nflask-neon, one read, round trips more than a warm one: "
                + ", ".join(f"{name} {value:+.1f}" for name, value in extra.items())
            )
            results[f"{delay_ms:g}"] = {"rtt_ms": rtt, "peers": summary, "flask-neon": extra}
            if delay_ms == 1:
                for (kind, q), limit in TARGETS.items():
                    value = summary[NEON][kind][f"{q}_rt"]
                    if value > limit:
                        missed.append(f"flask-neon {kind} {q}: {value:.2f} RT > {limit}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    for line in missed:
        print(f"target missed: {line}")
    return 1 if missed and not args.no_targets else 0


def sa_target(url: str) -> tuple[str, int]:
    import sqlalchemy as sa

    parsed = sa.make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


class Serving:
    """Every peer under gunicorn (one worker, one thread) at once; yields name -> base URL."""

    def __init__(self, db_url: str, workdir: pathlib.Path) -> None:
        self.db_url = db_url
        self.workdir = workdir
        self._stack: t.Any = None

    def __enter__(self) -> dict[str, str]:
        import contextlib

        self._stack = contextlib.ExitStack()
        bases = {}
        for peer in PEERS:
            context = gunicorn(peer, self.db_url, self.workdir, None, workers=1, threads=1)
            bases[peer.name], _group = self._stack.enter_context(context)
        return bases

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


if __name__ == "__main__":
    sys.exit(main())
