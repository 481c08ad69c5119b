"""N+1 tools side by side, on one app: what each reports for the same views, measured.

The app is the Flask-SQLAlchemy blog of the compatibility tests (``blog_app`` in
``tests/test_flask_sqlalchemy_compat.py``: users, posts, tags many-to-many), with the views
``tests/test_nplusone.py`` adds to it (its ``add_views``, for either library) and its data
(6 users, 4 posts each, one tag):

* ``/n1/posts``: 24 posts, each post's author and tags loaded lazily (1 + 6 + 24 statements);
* ``/fixed/posts``: the same with ``joinedload(author)`` and ``selectinload(tags)`` (2);
* ``/n1/users``: 6 users, each user's posts loaded lazily (1 + 6);
* ``/fixed/users``: the same with ``selectinload(posts)`` (2);
* ``/n1/template``: a template's ``{{ p.author.name }}`` for 24 posts (1 + 6);
* ``/loop``: one ``SELECT name ... WHERE id = :id`` per user id, no relationship (1 + 6).

Tools (each in a process of its own, on a database of its own; a tool that is not installed is
skipped and said so):

* ``nplusone``, its Flask extension ``nplusone.ext.flask_sqlalchemy.NPlusOne``, on
  Flask-SQLAlchemy; as released, and once more with ``strategies.LazyLoader`` aliased to
  SQLAlchemy 2's ``_LazyLoader`` before the import (a patch no release has: does the rest work?);
* flask-debugtoolbar's SQLAlchemy panel (``SQLALCHEMY_RECORD_QUERIES=True``), on
  Flask-SQLAlchemy and on flask-neon's ``NeonDB``: the panel's title and rows as it renders
  them for the request, whether the toolbar reached the response, and its SELECT button;
* ``sqltap`` (``sqltap.start()``: every Engine), on Flask-SQLAlchemy and on ``NeonDB``: its
  report's query groups;
* flask-neon, ``DB_NPLUSONE=warn``: its warnings.

Run it from a virtualenv that has the tools, never the project's own::

    python3 -m venv /tmp/compare-venv
    /tmp/compare-venv/bin/pip install -e . flask-sqlalchemy nplusone flask-debugtoolbar \\
        sqltap pytest prometheus-client  # the tests it imports views from need these
    BENCH_DB_URL=postgresql://postgres@127.0.0.1:5432/test \\
        /tmp/compare-venv/bin/python benchmarks/compare_nplusone_tools.py --json out.json

``BENCH_DB_URL`` is a database whose server lets it ``CREATE DATABASE``: each tool gets a new
database, dropped afterwards (without it, a throwaway local PostgreSQL is started). Only
reports (a tool that breaks a request is a finding); exit 1 when flask-neon's own run fails.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import importlib.metadata
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import typing as t
import uuid
import warnings
from collections.abc import Callable, Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent
VIEWS = ("/n1/posts", "/fixed/posts", "/n1/users", "/fixed/users", "/n1/template", "/loop")

#: name -> (the distributions it needs, the library it runs on)
TOOLS: dict[str, tuple[tuple[str, ...], str]] = {
    "nplusone": (("nplusone", "Flask-SQLAlchemy"), "Flask-SQLAlchemy"),
    "nplusone, LazyLoader aliased": (("nplusone", "Flask-SQLAlchemy"), "Flask-SQLAlchemy"),
    "flask-debugtoolbar": (("Flask-DebugToolbar", "Flask-SQLAlchemy"), "Flask-SQLAlchemy"),
    "flask-debugtoolbar on NeonDB": (("Flask-DebugToolbar", "Flask-SQLAlchemy"), "flask-neon"),
    "sqltap": (("sqltap", "Flask-SQLAlchemy"), "Flask-SQLAlchemy"),
    "sqltap on NeonDB": (("sqltap",), "flask-neon"),
    "flask-neon": ((), "flask-neon"),
}
VERSIONS = (
    "Flask",
    "SQLAlchemy",
    "Flask-SQLAlchemy",
    "psycopg2-binary",
    "nplusone",
    "Flask-DebugToolbar",
    "sqltap",
    "flask-neon",
)

Report = dict[str, t.Any]


# -- the app ---------------------------------------------------------------------------------


def make_db(library: str, config: dict[str, t.Any]) -> t.Any:
    """``SQLAlchemy()`` or ``NeonDB()``, applying ``config`` to the app before its
    ``init_app`` (``blog_app`` sets only the URLs), as an app's own configuration would."""
    base: type
    if library == "flask-neon":
        from flask_neon import NeonDB

        base = NeonDB
        arguments: dict[str, t.Any] = {"env_file": None}
    else:
        from flask_sqlalchemy import SQLAlchemy

        base = SQLAlchemy
        arguments = {}

    class Configured(base):  # type: ignore[misc, valid-type]
        def init_app(self, app: t.Any) -> None:
            app.config.update(config)
            super().init_app(app)

    return Configured(**arguments)


def build(library: str, url: str, config: dict[str, t.Any]) -> tuple[t.Any, t.Any]:
    sys.path.insert(0, str(ROOT))
    from tests.test_flask_sqlalchemy_compat import blog_app

    db = make_db(library, config)
    app = blog_app(db, url)
    from tests.test_nplusone import add_views

    add_views(app, db)
    return app, db


class Captured(logging.Handler):
    """The records of one logger, as the tool's user would read them."""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        target = logging.getLogger(logger)
        target.setLevel(logging.DEBUG)
        target.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def take(self) -> list[str]:
        taken, self.messages = self.messages, []
        return taken


def error_of(exc: BaseException) -> str:
    """``Type: message`` with the innermost frame that raised it."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f" (at {_short(last.filename)}:{last.lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def _short(path: str) -> str:
    found = re.search(r"site-packages/(.+)$", path)
    return found[1] if found else os.path.relpath(path, ROOT)


def request_all(
    app: t.Any, each: Callable[[str, t.Any], Report], views: t.Sequence[str] = VIEWS
) -> dict[str, Report]:
    """Each view once; ``each(view, response)`` says what the tool reported for it, and the
    warnings the request raised are counted."""
    client = app.test_client()
    reports: dict[str, Report] = {}
    for view in views:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            try:
                response = client.get(view)
            except Exception as exc:  # the tool broke the request
                reports[view] = {"status": None, "error": error_of(exc)}
                continue
        reports[view] = {"status": response.status_code, **each(view, response)}
        # The first sentence of each, and how many times the request raised it.
        texts = [f"{w.category.__name__}: {str(w.message).split('. ')[0][:100]}" for w in warned]
        reports[view]["warnings"] = dict(collections.Counter(texts))
    return reports


# -- the tools (each in a child process) -------------------------------------------------------


def run_nplusone(url: str, alias: bool) -> Report:
    if alias:
        from sqlalchemy.orm import strategies

        strategies.LazyLoader = strategies._LazyLoader  # type: ignore[attr-defined]
    try:
        nplusone = importlib.import_module("nplusone.ext.flask_sqlalchemy").NPlusOne
    except Exception as exc:
        return {"runs": False, "error": error_of(exc)}
    app, db = build("Flask-SQLAlchemy", url, {})
    views = list(VIEWS)
    if alias:
        # Not in the table: /n1/posts through the legacy Query API, which nplusone hooks
        # (Query.__iter__) to learn which objects a listing loaded: with .all(), and iterated.
        post = next(m.class_ for m in db.Model.registry.mappers if m.class_.__name__ == "BlogPost")

        def show(posts: t.Iterable[t.Any]) -> dict[str, t.Any]:
            return {"posts": [[p.title, p.author.name, [t.name for t in p.tags]] for p in posts]}

        app.add_url_rule(
            "/n1/posts-query-all",
            "posts_query_all",
            lambda: show(post.query.order_by(post.id).all()),
        )
        app.add_url_rule(
            "/n1/posts-query-iter", "posts_query_iter", lambda: show(post.query.order_by(post.id))
        )
        views += ["/n1/posts-query-all", "/n1/posts-query-iter"]
    log = Captured("nplusone")
    nplusone(app)
    app.testing = True  # an exception in a view reaches the report
    each: Callable[[str, t.Any], Report] = lambda view, response: {"logged": log.take()}  # noqa: E731
    return {"runs": True, "views": request_all(app, each, views)}


def run_debugtoolbar(url: str, library: str) -> Report:
    from flask import g, request

    # Imported by name: none of the tools has type hints, nor is installed in the project's venv.
    toolbar_extension = importlib.import_module("flask_debugtoolbar").DebugToolbarExtension
    panel_module = importlib.import_module("flask_debugtoolbar.panels.sqlalchemy")

    config = {"SQLALCHEMY_RECORD_QUERIES": True, "DEBUG_TB_ENABLED": True, "SECRET_KEY": "x"}
    app, _ = build(library, url, config)
    toolbar_extension(app)
    app.testing = True
    seen: dict[str, t.Any] = {}

    @app.after_request
    def read_the_panel(response: t.Any) -> t.Any:
        # Runs before the toolbar's own after_request (registered first, run last).
        toolbars = g.debug_toolbar.debug_toolbars_var.get({})
        toolbar = toolbars.get(request._get_current_object())  # type: ignore[attr-defined]
        (panel,) = [p for p in toolbar.panels if p.name == "SQLAlchemy"]
        queries = panel_module.get_queries()
        seen["title"] = f"{panel.nav_title()}: {panel.nav_subtitle()}"
        seen["available"] = panel_module.is_available()
        content = panel.content()
        seen["rows"] = content.count("<tr class=")
        seen["unavailable"] = "Queries Unavailable" in content
        # The panel lists one row per statement, in order; here they are counted by shape.
        shapes = collections.Counter(" ".join(str(q.statement).split())[:70] for q in queries)
        seen["rows by shape"] = [[count, shape] for shape, count in shapes.items()]
        seen["locations"] = sorted({str(q.location).rsplit("/", 1)[-1] for q in queries})
        signed = [panel_module.dump_query(q.statement, q.parameters) for q in queries]
        seen["signed"] = next((s for s in signed if s), None)
        seen["words"] = sorted(
            word for word in ("N+1", "duplicate", "similar", "repeated") if word in content
        )
        return response

    def each(view: str, response: t.Any) -> Report:
        report = dict(seen)
        seen.clear()
        report["toolbar in response"] = b"flDebug" in response.data
        report["content type"] = response.content_type
        return report

    reports = request_all(app, each)
    # The panel's SELECT button on a recorded query of the last request.
    signed = next((r.get("signed") for r in reports.values() if r.get("signed")), None)
    button: str | None = None
    if signed:
        try:
            answer = app.test_client().get(
                "/_debug_toolbar/views/sqlalchemy/sql_select",
                query_string={"query": signed, "duration": "0.001"},
            )
            button = f"{answer.status_code}"
        except Exception as exc:
            button = error_of(exc)
    for report in reports.values():
        report.pop("signed", None)
    return {"runs": True, "views": reports, "SELECT button": button}


def run_sqltap(url: str, library: str) -> Report:
    sqltap = importlib.import_module("sqltap")

    app, _ = build(library, url, {})
    app.testing = True
    profiler = sqltap.start()
    try:

        def each(view: str, response: t.Any) -> Report:
            stats = profiler.collect()
            text = sqltap.report(stats, report_format="text")
            text = "\n".join(line.rstrip() for line in text.splitlines())
            counts = [int(n) for n in re.findall(r"^Query count: (\d+)$", text, re.M)]
            # The formatted SQL of each group, between its heading and the next one.
            sql = re.findall(r"QueryGroup \d+ SQL pattern\s+-+\n(.*?)\n\n-", text, re.S)
            callers = re.findall(r"^\s+(\d+) call\(s\) from (\S+) @(\S+)$", text, re.M)
            return {
                "queries": len(stats),
                "groups": [
                    [n, " ".join(s.split())[:70]] for n, s in zip(counts, sql, strict=True)
                ],
                "callers": sorted({f"{name} @{_short(where)}" for _, name, where in callers}),
                "words": sorted(w for w in ("N+1", "duplicate", "repeated") if w in text),
            }

        reports = request_all(app, each)
    finally:
        profiler.stop()
    return {"runs": True, "views": reports}


def run_flask_neon(url: str) -> Report:
    os.environ["DB_NPLUSONE"] = "warn"
    app, _ = build("flask-neon", url, {})
    log = Captured("flask_neon")
    app.testing = True
    return {
        "runs": True,
        "views": request_all(
            app,
            lambda view, response: {"logged": [m for m in log.take() if "N+1" in m]},
        ),
    }


def child(tool: str, url: str) -> Report:
    if tool.startswith("nplusone"):
        return run_nplusone(url, alias="aliased" in tool)
    library = TOOLS[tool][1]
    if tool.startswith("flask-debugtoolbar"):
        return run_debugtoolbar(url, library)
    if tool.startswith("sqltap"):
        return run_sqltap(url, library)
    return run_flask_neon(url)


# -- the parent ------------------------------------------------------------------------------


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def scratch_database(url: str) -> Iterator[str]:
    """A new database on ``url``'s server, dropped afterwards."""
    import sqlalchemy as sa

    name = f"compare_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield admin.url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@contextlib.contextmanager
def server() -> Iterator[str]:
    """``BENCH_DB_URL``, or a throwaway local PostgreSQL."""
    from flask_neon._url import parse_url

    url = os.environ.get("BENCH_DB_URL")
    if url:
        yield parse_url(url, "BENCH_DB_URL").to_sqlalchemy().render_as_string(hide_password=False)
        return
    from flask_neon.local import LocalPostgres

    cluster = LocalPostgres()
    cluster.start()
    try:
        yield parse_url(cluster.url).to_sqlalchemy().render_as_string(hide_password=False)
    finally:
        cluster.stop()


def summary(report: Report) -> Iterator[str]:
    """Lines a reader can check against the table in docs/round-trips.md."""
    if not report.get("runs"):
        yield f"  cannot run: {report.get('error') or report.get('skipped')}"
        return
    if report.get("SELECT button"):
        yield f"  SELECT button: {report['SELECT button']}"
    for view, seen in report["views"].items():
        shown = {k: v for k, v in seen.items() if v not in (None, [], "")}
        yield f"  {view}: {json.dumps(shown)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", help="write every report to this file")
    parser.add_argument("--tool", action="append", choices=sorted(TOOLS), help="only these")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    versions = {name: version(name) for name in VERSIONS}
    print("versions:", ", ".join(f"{k} {v or '(not installed)'}" for k, v in versions.items()))
    results: dict[str, Report] = {}
    failed = False
    with server() as url:
        for tool in args.tool or TOOLS:
            needs = [name for name in TOOLS[tool][0] if versions.get(name) is None]
            if needs:
                results[tool] = {"runs": False, "skipped": f"not installed: {', '.join(needs)}"}
            else:
                with scratch_database(url) as database:
                    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", tool, database],
                        capture_output=True,
                        text=True,
                        cwd=ROOT,
                        env={**env, "PYTHONWARNINGS": "default"},
                    )
                if done.returncode != 0:
                    results[tool] = {"runs": False, "error": done.stderr.strip()[-1500:]}
                else:
                    results[tool] = json.loads(done.stdout.strip().splitlines()[-1])
            if tool == "flask-neon":
                views = results[tool].get("views", {})
                failed = not views or any(seen.get("status") != 200 for seen in views.values())
            print(f"{tool}:")
            for line in summary(results[tool]):
                print(line)
            sys.stdout.flush()
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps({"versions": versions, "tools": results}, indent=2)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
