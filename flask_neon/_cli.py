"""``flask db-check``: can this app reach its database, and how is it configured to?

No output ever carries the database password: the URL is shown masked and driver messages go
through :func:`~flask_neon._errors.classify`, which masks the secrets of every URL.
"""

from __future__ import annotations

import json
import math
import time
import typing as t

import click
from click.core import ParameterSource
from flask.cli import AppGroup, NoAppException, with_appcontext

from . import _reports as reports
from ._errors import NeonConfigError, NeonStateError
from ._retry import Backoff
from ._settings import key_for
from ._state import NeonState, current_state


class CLIConfigError(NeonConfigError, NoAppException):
    """A :class:`NeonConfigError` raised while ``flask`` loads the app for a command.

    Flask's CLI prints a ``NoAppException`` as one ``Error:`` line and any other exception
    as a traceback; this one carries the same message as the plain error.
    """

    def __init__(self, message: str) -> None:
        NoAppException.__init__(self, message)


_JSON_META = "flask_neon.db_check.json"


class _Seconds(click.FloatRange):
    """A finite number of seconds in a range (``nan`` and ``inf`` pass a plain FloatRange)."""

    name = "number"

    def convert(
        self, value: t.Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        number = float(super().convert(value, param, ctx))
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds.", param, ctx)
        return number


@click.group(
    "db-check",
    cls=AppGroup,
    invoke_without_command=True,
    short_help="Check the database connection.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--timeout",
    type=_Seconds(min=0, min_open=True, max=3600),
    default=None,
    metavar="SECONDS",
    help="Give up on one attempt (connect and round trip) after this long. Default: "
    "DB_CONNECT_TIMEOUT. The connect itself never waits longer than DB_CONNECT_TIMEOUT.",
)
@click.option(
    "--wait",
    type=_Seconds(min=0, max=86400),
    default=0.0,
    metavar="SECONDS",
    help="Retry with exponential backoff and jitter (0.2 s doubling up to 2 s) until the "
    "database answers or SECONDS have passed; the whole run takes at most SECONDS plus one "
    "--timeout. Errors waiting cannot fix (wrong password, missing role or database, TLS "
    "configuration) end it at once. Default: 0, one attempt.",
)
@with_appcontext
@click.pass_context
def db_check(ctx: click.Context, as_json: bool, timeout: float | None, wait: float) -> None:
    """Check that the database answers, and show how flask-neon reaches it.

    Without a subcommand: connect, run one query and print whether the database is
    reachable, the latency, the server version, database and user, the URL (password
    masked), the host kind (pooled or direct), TLS, the pool profile and settings, and the
    session limits the server reports. Exit status 0 when the database answered, 1 when
    not; the last line then names the cause and what to do about it.

    \b
    Examples:
      flask db-check
      flask db-check --wait 60          # container entrypoint: wait for the database
      flask db-check --json --timeout 5
      flask db-check config             # every DB_* setting and where it came from
    """
    ctx.meta[_JSON_META] = as_json
    if ctx.invoked_subcommand is not None:
        for name in ("timeout", "wait"):
            if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
                raise click.UsageError(
                    f"--{name} applies to the connection check, not to "
                    f"'db-check {ctx.invoked_subcommand}'.",
                    ctx,
                )
        return
    state = _state()
    bound = float(state.settings.connect_timeout) if timeout is None else timeout
    report = _run_check(state, timeout=bound, wait=wait, as_json=as_json)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in reports.check_lines(report):
            click.echo(line)
        cause = report["cause"]
        if cause is not None:
            click.echo(
                f"error: {cause['name']}: {cause['title']}. Hint: {cause['hint']}", err=True
            )
    every = [report["reachable"], *(bind["reachable"] for bind in report["binds"].values())]
    ctx.exit(0 if all(every) else 1)


@db_check.command("pool")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def pool_command(as_json: bool) -> None:
    """Show the pool statistics of this process's engine.

    Status (ok, busy when overflow connections are in use, exhausted), size, connections
    checked in and out, overflow, capacity, and counters since start (connections opened,
    checkouts, invalidations, checkout timeouts, time spent waiting for a connection). A
    fresh CLI process has opened no connection yet: this mostly shows the pool's capacity.
    Does not connect to the database.
    """
    state = _state()
    stats = state.monitor.stats(state.engine)
    if _want_json(as_json):
        click.echo(json.dumps(stats, indent=2))
        return
    for key, value in stats.items():
        click.echo(reports.line(key.replace("_", " "), reports.render(value)))


@db_check.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def config_command(as_json: bool) -> None:
    """Show every DB_* setting, its effective value and where it came from.

    Sources: app.config, environment, .env or default; profile for a value the pool profile
    supplies, app.debug for the profile chosen by debug mode, derived for one computed from
    other settings. URLs are shown with their passwords masked. Below the settings: the
    pool profile in use, the pool it yields and the session limits. Does not connect to the
    database.
    """
    state = _state()
    settings = reports.setting_rows(state)
    profile = settings[key_for("profile")]
    pool = {
        name: {"value": value, "source": state.pool.sources.get(name, "derived")}
        for name, value in state.pool.as_dict().items()
        if name != "profile"
    }
    if _want_json(as_json):
        body = {
            "settings": settings,
            "profile": profile,
            "pool": pool,
            "session_limits": state.session_limits,
        }
        click.echo(json.dumps(body, indent=2))
        return
    click.echo("Settings:")
    click.echo(reports.table(settings))
    click.echo(f"Pool (profile {profile['value']}, from {profile['source']}):")
    click.echo(reports.table(pool))
    click.echo(reports.line("Session limits", reports.configured_limits(state.session_limits)))


# -- the check -----------------------------------------------------------------------------------


def _run_check(
    state: NeonState, *, timeout: float, wait: float, as_json: bool
) -> dict[str, t.Any]:
    """Probe until the database answers, ``wait`` has passed or a cause is final."""
    # The direct host when DB_URL is pooled: the pooler can answer while the compute behind
    # it cannot (and vice versa). Its checker's single flight matters for --wait: after an
    # attempt times out, the next one waits for the probe still running instead of starting
    # another thread beside it.
    # Each bind is checked the same way, side by side under the same deadline.
    checkers = [state.admin.health, *(bind.admin.health for bind in state.binds.values())]
    backoff = Backoff(time.monotonic() + wait)
    while True:
        deadline = time.monotonic() + timeout
        pending = [checker.start(use_cache=False) for checker in checkers]
        results = [
            checker.wait(p, deadline)[0] for checker, p in zip(checkers, pending, strict=True)
        ]
        causes = [result.cause for result in results if result.cause is not None]
        # Only what waiting can fix is waited for (a wrong password is reported at once).
        if not causes or not all(cause.transient for cause in causes):
            break
        cause = causes[0]
        delay = backoff.next_delay()
        if delay is None:
            break
        if not as_json:
            click.echo(
                f"attempt {backoff.attempts - 1}: {cause.name} ({cause.title}); "
                f"retrying in {delay:.2f} s",
                err=True,
            )
        time.sleep(delay)
    return reports.report(state, results, backoff.attempts, timeout)


# -- helpers -------------------------------------------------------------------------------------


def _state() -> NeonState:
    try:
        return current_state()
    except NeonStateError as exc:
        raise click.ClickException(str(exc)) from None


def _want_json(as_json: bool) -> bool:
    """``--json`` given to the subcommand or to the group (``flask db-check --json pool``)."""
    return as_json or bool(click.get_current_context().meta.get(_JSON_META))


__all__ = ["db_check"]
