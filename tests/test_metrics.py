"""Prometheus metrics on a real server, in one process and across forked workers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import typing as t

import pytest
import sqlalchemy as sa

from .conftest import AppFactory

prometheus_client = pytest.importorskip("prometheus_client")


def sample(name: str, **labels: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def test_pool_metrics_follow_the_pool(make_app: AppFactory) -> None:
    app, db = make_app(DB_METRICS=True, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=1)
    name = app.name

    @app.get("/q")
    def q() -> dict[str, t.Any]:
        return {"v": db.session.execute(sa.text("SELECT 1")).scalar()}

    client = app.test_client()
    for _ in range(3):
        assert client.get("/q").status_code == 200
    assert sample("flask_neon_pool_checkouts_total", app=name) == 3
    assert sample("flask_neon_pool_connections_opened_total", app=name) == 1
    assert sample("flask_neon_pool_connections", app=name, state="idle") == 1
    assert sample("flask_neon_pool_connections", app=name, state="used") == 0
    assert sample("flask_neon_pool_checkout_wait_seconds_count", app=name) == 3

    held = db.get_engine(app).connect()
    assert sample("flask_neon_pool_connections", app=name, state="used") == 1
    assert client.get("/q").status_code == 503
    held.close()
    assert sample("flask_neon_pool_checkout_timeouts_total", app=name) == 1
    # Four quick checkouts (three requests, one held) and one that waited out the timeout.
    assert sample("flask_neon_pool_checkout_wait_seconds_bucket", app=name, le="0.5") == 4
    assert sample("flask_neon_pool_checkout_wait_seconds_count", app=name) == 5


SCRIPT = """
import os, sys
from flask import Flask
import sqlalchemy as sa
from flask_neon import NeonDB

app = Flask("workers")
app.config.update(DB_URL=sys.argv[1], DB_METRICS=True)
db = NeonDB(app, env_file=None)
children = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for _ in range(5):
                with app.app_context():
                    db.session.execute(sa.text("SELECT 1"))
            code = 0
        finally:
            os._exit(code)
    children.append(pid)
assert all(os.waitpid(pid, 0)[1] == 0 for pid in children)
from prometheus_client import CollectorRegistry, multiprocess
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
print(registry.get_sample_value("flask_neon_pool_checkouts_total", {"app": "workers"}))
"""


def test_metrics_add_up_across_forked_workers(database_url: str, tmp_path: t.Any) -> None:
    """In prometheus_client's multiprocess mode (as under gunicorn), two workers' checkouts sum."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), database_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) == 10.0
