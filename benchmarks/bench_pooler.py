"""Behind PgBouncer (transaction mode): a small client-side pool, or none at all?

Neon's pooler already pools server connections, so a client could open a connection per
request (SQLAlchemy's NullPool) instead of keeping its own pool. This measures both through a
real PgBouncer in front of a throwaway PostgreSQL, one ``SELECT 1`` request at a time:

* flask-neon, production profile (pool 5 + 10), pooled mode (``SET LOCAL`` limits);
* flask-neon, serverless profile (pool 2, no overflow);
* no client-side pool: a new connection to PgBouncer for every request.

Usage: ``python benchmarks/bench_pooler.py`` (needs Debian's pgbouncer and the PostgreSQL
server binaries). Figures are microseconds per request; read the ratios.
"""

from __future__ import annotations

import pathlib
import random
import statistics
import sys
import time

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.pool import NullPool

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_requests import caller  # noqa: E402

from flask_neon import NeonDB  # noqa: E402
from flask_neon.local import LocalPostgres  # noqa: E402
from tests.servers import PgBouncer  # noqa: E402


def neon_app(url: str, direct: str, profile: str) -> Flask:
    app = Flask(f"neon_{profile}")
    app.config.update(
        DB_URL=url,
        DB_DIRECT_URL=direct,
        DB_POOLED=True,
        DB_PROFILE=profile,
        DB_HEALTH_ENABLED=False,
    )
    db = NeonDB(app, env_file=None)

    @app.get("/select1")
    def select1() -> str:
        return str(db.session.execute(sa.text("SELECT 1")).scalar())

    return app


def nullpool_app(url: str) -> Flask:
    app = Flask("nullpool")
    engine = sa.create_engine(url, poolclass=NullPool)

    @app.get("/select1")
    def select1() -> str:
        with engine.connect() as connection:
            connection.exec_driver_sql(
                "SET LOCAL statement_timeout = 30000; "
                "SET LOCAL idle_in_transaction_session_timeout = 60000"
            )
            return str(connection.exec_driver_sql("SELECT 1").scalar())

    return app


def main() -> int:
    with LocalPostgres() as server, PgBouncer(server) as bouncer:
        pooled_url = bouncer.url_for("postgres")
        apps = {
            "flask-neon production (pool 5+10)": neon_app(pooled_url, server.url, "production"),
            "flask-neon serverless (pool 2)": neon_app(pooled_url, server.url, "serverless"),
            "no client pool (NullPool)": nullpool_app(pooled_url),
        }
        calls = {name: caller(app, "/select1") for name, app in apps.items()}
        for call in calls.values():
            for _ in range(100):
                call()
        samples: dict[str, list[float]] = {name: [] for name in calls}
        order = list(calls.items())
        for _ in range(9):
            random.shuffle(order)
            for name, call in order:
                started = time.perf_counter()
                for _ in range(200):
                    call()
                samples[name].append((time.perf_counter() - started) / 200 * 1e6)
        results = {name: statistics.median(values) for name, values in samples.items()}
    base = results["flask-neon production (pool 5+10)"]
    for name, value in results.items():
        print(f"{name:38} {value:9.1f} us/request   x{value / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
