"""Request latency as the client sees it, in milliseconds and in database round trips.

    .venv/bin/python benchmarks/bench_latency.py [--delays 1,5,20] [--rounds 5] [--per-round 60]
        [--rls] [--chart benchmarks/round_trips.svg] [--json FILE]
    .venv/bin/python benchmarks/bench_latency.py --redraw FILE --chart benchmarks/round_trips.svg

Every peer is served by gunicorn (gthread, one worker, one thread) and reaches PostgreSQL through
a proxy of its own that delays each direction by the given milliseconds (a network hop: 1 ms
each way is an app and a Neon compute in one region). One keep-alive HTTP client per peer sends a
request, reads the whole answer, pauses ``--pause-ms`` and sends the next; peers take turns in a
new random order each round. Reads are ``GET /notes/<id>`` (one ``SELECT`` through the request's
session), writes ``POST /notes`` (an ORM insert and ``COMMIT``).

The peers: bare Flask (the floor), raw psycopg2 and raw psycopg 3 (``latency_apps.py``),
Flask-SQLAlchemy without and with ``pool_pre_ping`` (``fsqla_app.py``, psycopg2), and the
example app on flask-neon's production profile on psycopg2, on psycopg 3, and on psycopg 3 with
``DB_IDLE_IN_TRANSACTION_TIMEOUT=0`` (where a timeout is in force psycopg 3 gets no fast
``BEGIN``: see benchmarks/README.md). ``--rls`` adds the example app with a row-level security
setting on every request.

Two measures of round trips:

* **in latency**: (peer's latency - bare Flask's latency) / the round trip through the proxy,
  at p50 and p99: what the database costs the client, Python included;
* **counted**: the proxy counts round trips (``delay_proxy.Flight``): those a request waited for
  (sent after the request came in, answered before its response was out) and those sent for
  it after the response (a ``ROLLBACK`` that nobody waits for). Connections opened meanwhile
  are counted too (their start-up is a round trip).

The targets (1 ms delay): flask-neon on psycopg2, reads <= 1.2 round trips at p50 and <= 2 at
p99, writes <= 2.2 at p50; counted, on psycopg2 and on psycopg 3 without an idle timeout, one
round trip waited per read and two per write. Exits 1 when one is missed (``--no-targets``:
report only); ``--json FILE`` writes the results; ``--chart FILE`` draws the counted round trips
as an SVG (``round_trips.svg``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import html
import http.client
import json
import os
import pathlib
import platform
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

NEON_APP = "example_app:create_app()"
BARE = "bare Flask"
NEON = "flask-neon, psycopg2"
NEON_PSYCOPG = "flask-neon, psycopg 3"
NEON_PSYCOPG_NO_IDLE = "flask-neon, psycopg 3, no idle timeout"
PEERS = (
    Variant(BARE, "benchmarks.latency_apps:bare()", "", 1, {}),
    Variant("raw psycopg2", "benchmarks.latency_apps:raw()", "", 1, {}),
    Variant("raw psycopg 3", "benchmarks.latency_apps:raw_psycopg()", "", 1, {}),
    Variant(
        "Flask-SQLAlchemy", "benchmarks.fsqla_app:create_app()", "", 1, {"FSQLA_PRE_PING": "0"}
    ),
    Variant("Flask-SQLAlchemy, pool_pre_ping", "benchmarks.fsqla_app:create_app()", "", 1, {}),
    Variant(NEON, NEON_APP, "", 1, {"DB_PROFILE": "production", "DB_DRIVER": "psycopg2"}),
    Variant(NEON_PSYCOPG, NEON_APP, "", 1, {"DB_PROFILE": "production", "DB_DRIVER": "psycopg"}),
    Variant(
        NEON_PSYCOPG_NO_IDLE,
        NEON_APP,
        "",
        1,
        {
            "DB_PROFILE": "production",
            "DB_DRIVER": "psycopg",
            "DB_IDLE_IN_TRANSACTION_TIMEOUT": "0",
        },
    ),
)
RLS = Variant(
    "flask-neon, psycopg2, RLS setting",
    "benchmarks.latency_apps:neon_rls()",
    "",
    1,
    {"DB_PROFILE": "production", "DB_DRIVER": "psycopg2"},
)
#: The chart's peers, in its order: raw psycopg 3 and RLS are in the tables only.
CHART_PEERS = (
    "raw psycopg2",
    "Flask-SQLAlchemy",
    "Flask-SQLAlchemy, pool_pre_ping",
    NEON,
    NEON_PSYCOPG,
    NEON_PSYCOPG_NO_IDLE,
)
TARGETS = {("read", "p50"): 1.2, ("read", "p99"): 2.0, ("write", "p50"): 2.2}
#: Round trips a request waits for, counted at the proxy (median over the requests).
COUNTED_TARGETS = {
    (peer, kind): limit
    for peer in (NEON, NEON_PSYCOPG_NO_IDLE)
    for kind, limit in (("read", 1), ("write", 2))
}
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

    def request(self, method: str, path: str, body: str | None) -> tuple[float, float]:
        """Send one request and read its answer: when it was sent and when it was read
        (``time.perf_counter()``)."""
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json"} if body else {}
        started = time.perf_counter()
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        response.read()
        ended = time.perf_counter()
        if response.status not in (200, 201):
            raise RuntimeError(f"{method} {path}: status {response.status}")
        if response.getheader("Connection", "").lower() == "close":
            self.connection.close()
            self.connection = None
        return started, ended


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


@dataclasses.dataclass
class Found:
    """What one peer's requests of one kind cost."""

    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    #: Round trips each request waited for, counted at the proxy.
    waited: list[int] = dataclasses.field(default_factory=list)
    #: Round trips sent in all, those after the responses included.
    sent: int = 0
    #: Connections opened to the server.
    connections: int = 0

    def add_batch(
        self, proxy: DelayProxy, windows: list[tuple[float, float]], until: float
    ) -> None:
        """Count the round trips of one batch of requests, sent and answered in ``windows``;
        the batch's last round trips were sent by ``until``."""
        start = windows[0][0]
        flights = proxy.flights_between(start, until)
        self.sent += len(flights)
        self.connections += proxy.connections_between(start, until)
        for sent, read in windows:
            self.latencies_ms.append((read - sent) * 1000)
            self.waited.append(
                sum(
                    1
                    for flight in flights
                    if sent <= flight.sent and flight.answered is not None
                    if flight.answered <= read
                )
            )


def measure(
    clients: dict[str, Client],
    proxies: dict[str, DelayProxy],
    rounds: int,
    per_round: int,
    pause_s: float,
    settle_s: float,
) -> dict[str, dict[str, Found]]:
    """Latencies and round trips per peer and kind, peers in a random order each round.

    After each batch the peer gets ``settle_s`` to send what it sends after its last response
    (a ``ROLLBACK``), so that each batch's round trips are counted with it."""
    found = {name: {"read": Found(), "write": Found()} for name in clients}
    for client in clients.values():  # warm: connections open, code paths run
        for _ in range(10):
            client.request("GET", f"/notes/{random.randint(1, 100)}", None)
            client.request("POST", "/notes", BODY)
    time.sleep(settle_s)
    for _ in range(rounds):
        order = list(clients)
        random.shuffle(order)
        for name in order:
            clients[name].warm()  # the keep-alive connection may have timed out meanwhile
            time.sleep(settle_s)
            for kind in ("read", "write"):
                windows = []
                for _ in range(per_round):
                    if kind == "read":
                        path, body, method = f"/notes/{random.randint(1, 100)}", None, "GET"
                    else:
                        path, body, method = "/notes", BODY, "POST"
                    windows.append(clients[name].request(method, path, body))
                    time.sleep(pause_s)
                time.sleep(settle_s)
                found[name][kind].add_batch(proxies[name], windows, time.perf_counter())
    return found


def summarize(
    found: dict[str, dict[str, Found]], rtt_ms: float
) -> dict[str, dict[str, dict[str, float]]]:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name, kinds in found.items():
        summary[name] = {}
        for kind, batch in kinds.items():
            requests = len(batch.latencies_ms)
            summary[name][kind] = {
                "p50_ms": percentile(batch.latencies_ms, 0.5),
                "p99_ms": percentile(batch.latencies_ms, 0.99),
                "waited": statistics.median(batch.waited),
                "waited_mean": statistics.fmean(batch.waited),
                "waited_max": max(batch.waited),
                "sent": batch.sent / requests,
                "connections": batch.connections,
                "requests": requests,
            }
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
    print(
        "| peer | read p50 | read p99 | write p50 | write p99 "
        "| read: waited + after | write: waited + after |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, kinds in summary.items():
        cells = []
        for kind in ("read", "write"):
            for q in ("p50", "p99"):
                row = kinds[kind]
                cells.append(f"{row[f'{q}_ms']:.2f} ms ({row[f'{q}_rt']:.1f} RT)")
        for kind in ("read", "write"):
            cells.append(counted(kinds[kind]))
        print(f"| {name} | " + " | ".join(cells) + " |")


def counted(row: dict[str, float]) -> str:
    """``1 + 1``: round trips waited for (mean) + sent after the response, per request; with
    the connections opened, if any."""
    after = row["sent"] - row["waited_mean"]
    text = f"{row['waited_mean']:.2f} + {after:.2f}"
    if row["connections"]:
        text += f" ({row['connections']:g} connections opened)"
    return text


def after_idle_and_restart(url: str, direct_url: str, rtt_ms: float) -> dict[str, float]:
    """What one read costs a flask-neon app (in-process WSGI calls, through the proxy) when its
    pooled connection is fresh, idle past ``DB_PING_AFTER_IDLE`` (a ping first), or was ended
    by the server (a restart or a Neon suspend: a closed socket, noticed without a round trip,
    then a new connection). Medians of 15, in round trips over the warm read."""
    from werkzeug.test import EnvironBuilder

    from example_app import create_app
    from example_app.extensions import db

    idle_s = 0.3
    app = create_app(
        {
            "DB_URL": url,
            "DB_DRIVER": "psycopg2",
            "DB_PROFILE": "production",
            "DB_PING_AFTER_IDLE": idle_s,
        }
    )

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
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--delays", default="1,5,20", help="ms each way, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=60)
    parser.add_argument("--pause-ms", type=float, default=5.0)
    parser.add_argument("--rls", action="store_true", help="add the row-level security peer")
    parser.add_argument(
        "--no-idle-check",
        action="store_true",
        help="skip flask-neon's read after idle and after a restart (in-process, psycopg2)",
    )
    parser.add_argument("--no-targets", action="store_true")
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument(
        "--chart", type=pathlib.Path, help="draw the counted round trips as an SVG here"
    )
    parser.add_argument(
        "--redraw",
        type=pathlib.Path,
        metavar="JSON",
        help="measure nothing: draw --chart from the results of an earlier --json",
    )
    args = parser.parse_args(argv)
    if args.redraw:
        if not args.chart:
            parser.error("--redraw needs --chart")
        args.chart.write_text(chart(json.loads(args.redraw.read_text())))
        return 0
    peers = (*PEERS, RLS) if args.rls else PEERS
    settings = {key: str(value) for key, value in vars(args).items()}
    results: dict[str, t.Any] = {"machine": machine(), "settings": settings, "delays": {}}
    missed = []
    with database() as (url, _), tempfile.TemporaryDirectory() as tmp:
        results["machine"]["postgresql"] = prepare(url)
        print(json.dumps(results["machine"]))
        target = sa_target(url)
        for delay_ms in (float(d) for d in args.delays.split(",")):
            with contextlib.ExitStack() as stack:
                proxies = {}
                for peer in (*peers, Variant("probe", "", "", 1, {})):
                    proxies[peer.name] = DelayProxy(target, delay_ms / 1000)
                    stack.callback(proxies[peer.name].close)
                rtt = round_trip_ms(proxies["probe"].url(url))
                urls = {peer.name: proxies[peer.name].url(url) for peer in peers}
                with Serving(peers, urls, pathlib.Path(tmp)) as bases:
                    clients = {
                        name: Client(int(base.rsplit(":", 1)[1])) for name, base in bases.items()
                    }
                    settle_s = 4 * delay_ms / 1000 + 0.05
                    found = measure(
                        clients,
                        proxies,
                        args.rounds,
                        args.per_round,
                        args.pause_ms / 1000,
                        settle_s,
                    )
                extra = {}
                if not args.no_idle_check:
                    extra = after_idle_and_restart(proxies["probe"].url(url), url, rtt)
            summary = summarize(found, rtt)
            report(delay_ms, rtt, summary)
            if extra:
                print(
                    "\nflask-neon (psycopg2), one read, round trips more than a warm one: "
                    + ", ".join(f"{name} {value:+.1f}" for name, value in extra.items())
                )
            results["delays"][f"{delay_ms:g}"] = {
                "rtt_ms": rtt,
                "peers": summary,
                "flask-neon after idle": extra,
            }
            if delay_ms == 1:
                for (kind, q), limit in TARGETS.items():
                    value = summary[NEON][kind][f"{q}_rt"]
                    if value > limit:
                        missed.append(f"{NEON} {kind} {q}: {value:.2f} RT > {limit}")
            for (peer, kind), limit in COUNTED_TARGETS.items():
                waited = summary[peer][kind]["waited"]
                if waited > limit:
                    missed.append(
                        f"{peer} {kind} at {delay_ms:g} ms: waits for {waited:g} round trips "
                        f"(counted) > {limit}"
                    )
    report_all(results["delays"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.chart:
        args.chart.write_text(chart(results))
        print(f"\nchart: {args.chart}")
    for line in missed:
        print(f"target missed: {line}")
    return 1 if missed and not args.no_targets else 0


def machine() -> dict[str, t.Any]:
    """Where and with what the figures were measured."""
    from importlib.metadata import version

    found: dict[str, t.Any] = {
        "date": datetime.date.today().isoformat(),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for package in ("flask", "sqlalchemy", "psycopg", "psycopg2-binary", "flask-sqlalchemy"):
        with contextlib.suppress(Exception):
            found[package] = version(package)
    return found


def report_all(delays: dict[str, t.Any]) -> None:
    """One table of every delay, in round trips: p50 / p99 in latency, then counted."""
    if not delays:
        return
    names = list(next(iter(delays.values()))["peers"])
    header = " | ".join(f"{d} ms: read | write" for d in delays)
    print(
        f"\n## In round trips: (peer - bare Flask) / round trip, p50 / p99\n\n| peer | {header} |"
    )
    print("|---|" + "---:|---:|" * len(delays))
    for name in names:
        if name == BARE:
            continue
        cells = []
        for delay in delays.values():
            for kind in ("read", "write"):
                row = delay["peers"][name][kind]
                cells.append(f"{row['p50_rt']:.1f} / {row['p99_rt']:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n## Counted at the proxy: round trips waited for + sent after the response\n")
    print(f"| peer | {header} |")
    print("|---|" + "---:|---:|" * len(delays))
    for name in names:
        if name == BARE:
            continue
        cells = [
            counted(delay["peers"][name][kind])
            for delay in delays.values()
            for kind in ("read", "write")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


def chart(results: dict[str, t.Any]) -> str:
    """An SVG of the round trips counted per read and per write: solid, those the request waited
    for; pale, those sent after its response. Labels give the p50 at the largest delay."""
    delays = results["delays"]
    delay = max(delays, key=float)
    peers = delays[delay]["peers"]
    names = [name for name in CHART_PEERS if name in peers]
    colours = {"read": "#2b6cb0", "write": "#c05621"}
    left, bar, gap, group_gap, unit = 300, 16, 4, 22, 100
    top = 92
    most = max(
        max(peers[name][kind]["sent"], peers[name][kind]["waited_mean"])
        for name in names
        for kind in ("read", "write")
    )
    steps = int(most + 0.999)
    width = left + steps * unit + 340
    height = top + len(names) * (2 * bar + gap + group_gap) + 62
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="system-ui, -apple-system, Segoe UI, '
        'Helvetica, Arial, sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        '<text x="16" y="26" font-size="16" font-weight="600" fill="#1a202c">'
        "Database round trips per request</text>",
        f'<text x="16" y="46" fill="#4a5568">Counted at a proxy {float(delay):g} ms away each '
        "way; solid: the request waits for them, pale: sent after the response.</text>",
    ]
    legend_y = 68
    for index, kind in enumerate(("read", "write")):
        x = left + index * 200
        label = "read: GET /notes/&lt;id&gt;" if kind == "read" else "write: POST /notes"
        out.append(
            f'<rect x="{x}" y="{legend_y - 11}" width="14" height="14" '
            f'fill="{colours[kind]}"/><text x="{x + 20}" y="{legend_y}" '
            f'fill="#1a202c">{label}</text>'
        )
    plot_bottom = height - 52
    versions = results["machine"]
    out.append(
        f'<text x="16" y="{height - 12}" font-size="11" fill="#718096">'
        f"{versions['date']} · flask-neon production profile · psycopg "
        f"{versions.get('psycopg', '?')}, psycopg2 {versions.get('psycopg2-binary', '?')}, "
        f"SQLAlchemy {versions.get('sqlalchemy', '?')}, PostgreSQL "
        f"{str(versions.get('postgresql', '?')).split()[0]} · benchmarks/bench_latency.py</text>"
    )
    for step in range(steps + 1):
        x = left + step * unit
        out.append(
            f'<line x1="{x}" y1="{top - 6}" x2="{x}" y2="{plot_bottom}" '
            f'stroke="#e2e8f0" stroke-width="1"/><text x="{x}" y="{plot_bottom + 16}" '
            f'text-anchor="middle" fill="#4a5568">{step}</text>'
        )
    y = top
    for name in names:
        group_height = 2 * bar + gap
        weight = "600" if name.startswith("flask-neon") else "400"
        out.append(
            f'<text x="{left - 10}" y="{y + group_height / 2 + 4}" text-anchor="end" '
            f'font-weight="{weight}" fill="#1a202c">{html.escape(name)}</text>'
        )
        for kind in ("read", "write"):
            row = peers[name][kind]
            waited = row["waited_mean"]
            after = max(row["sent"] - waited, 0.0)
            colour = colours[kind]
            out.append(
                f'<rect x="{left}" y="{y}" width="{waited * unit:.1f}" height="{bar}" '
                f'fill="{colour}"/>'
            )
            if after >= 0.005:
                out.append(
                    f'<rect x="{left + waited * unit:.1f}" y="{y + 0.5}" '
                    f'width="{after * unit:.1f}" height="{bar - 1}" fill="{colour}" '
                    f'fill-opacity="0.25" stroke="{colour}" stroke-dasharray="3 2"/>'
                )
            label = f"{waited:.3g}" + (f" + {after:.2g} after" if after >= 0.005 else "")
            label += f" · p50 {row['p50_ms']:.1f} ms"
            if row["connections"] / row["requests"] >= 0.05:
                label += f" · {row['connections'] / row['requests']:.1f} new connections"
            out.append(
                f'<text x="{left + (waited + after) * unit + 6:.1f}" y="{y + bar - 3}" '
                f'fill="#2d3748">{label}</text>'
            )
            y += bar + gap
        y += group_gap - gap
    out.append("</svg>")
    return "\n".join(out) + "\n"


def sa_target(url: str) -> tuple[str, int]:
    import sqlalchemy as sa

    parsed = sa.make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


class Serving:
    """Every peer under gunicorn (one worker, one thread) at once, each on its own database
    URL; yields name -> base URL."""

    def __init__(
        self, peers: t.Sequence[Variant], urls: dict[str, str], workdir: pathlib.Path
    ) -> None:
        self.peers = peers
        self.urls = urls
        self.workdir = workdir
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> dict[str, str]:
        bases = {}
        for peer in self.peers:
            context = gunicorn(peer, self.urls[peer.name], self.workdir, None, 1, 1)
            bases[peer.name], _group = self._stack.enter_context(context)
        return bases

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


if __name__ == "__main__":
    sys.exit(main())
