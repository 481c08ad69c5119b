"""``flask db-check``: can this app reach its database, and how is it configured to?

``flask db-check`` runs one bounded round trip and says what it found; ``--wait`` retries until
the database answers (container entrypoints, CI); ``flask db-check pool`` and ``flask db-check
config`` show pool statistics and the effective settings without touching the database.

No output ever carries the database password: the URL is shown masked and driver messages go
through :func:`~flask_neon.errors.classify`, which masks the secrets of every URL.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import typing as t

import click
from click.core import ParameterSource
from flask.cli import AppGroup, NoAppException, with_appcontext
from pydantic import SecretStr

from .errors import ErrorCause, NeonConfigError, NeonError, NeonStateError
from .health import ProbeResult
from .settings import NeonSettings, key_for
from .url import MASK, DatabaseURL, parse_url

if t.TYPE_CHECKING:
    from .extension import NeonState


class CLIConfigError(NeonConfigError, NoAppException):
    """A :class:`NeonConfigError` raised while ``flask`` loads the app for a command.

    Flask's CLI prints a ``NoAppException`` as one ``Error:`` line and any other exception
    as a traceback; this one carries the same message as the plain error.
    """

    def __init__(self, message: str) -> None:
        NoAppException.__init__(self, message)


#: Backoff of ``--wait``: the first pause is at most this long, each one doubles, up to the cap.
BACKOFF_START = 0.2
BACKOFF_CAP = 2.0
#: Causes that waiting cannot fix: ``--wait`` reports them at once instead of retrying.
FINAL_CAUSES = frozenset(
    {
        "auth_failed",
        "role_missing",
        "database_missing",
        "cert_verify_failed",
        "tls_required",
        "endpoint_id_missing",
        "pooler_rejected_parameter",
    }
)
_JSON_META = "flask_neon.db_check.json"
_LABEL_WIDTH = 17


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
        for line in _check_lines(report):
            click.echo(line)
        cause = report["cause"]
        if cause is not None:
            click.echo(
                f"error: {cause['name']}: {cause['title']}. Hint: {cause['hint']}", err=True
            )
    ctx.exit(0 if report["reachable"] else 1)


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
        click.echo(_line(key.replace("_", " "), _render(value)))


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
    settings = _setting_rows(state)
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
    click.echo(
        _table([(key, _render(row["value"]), row["source"]) for key, row in settings.items()])
    )
    click.echo(f"Pool (profile {profile['value']}, from {profile['source']}):")
    click.echo(
        _table([(name, _render(row["value"]), row["source"]) for name, row in pool.items()])
    )
    click.echo(_line("Session limits", _configured_limits(state.session_limits)))


# -- the check -----------------------------------------------------------------------------------


def _run_check(
    state: NeonState, *, timeout: float, wait: float, as_json: bool
) -> dict[str, t.Any]:
    """Probe until the database answers, ``wait`` has passed or a cause is final."""
    # The direct host when DB_URL is pooled: the pooler can answer while the compute behind
    # it cannot (and vice versa). Its checker's single flight matters for --wait: after an
    # attempt times out, the next one waits for the probe still running instead of starting
    # another thread beside it.
    checker = state.admin.health
    checked_url = state.admin.url
    deadline = time.monotonic() + wait
    attempts = 0
    while True:
        attempts += 1
        result, _ = checker.check(use_cache=False, timeout=timeout)
        cause = result.cause
        now = time.monotonic()
        if result.healthy or cause is None or now >= deadline or cause.name in FINAL_CAUSES:
            break
        ceiling = min(BACKOFF_CAP, BACKOFF_START * 2 ** (attempts - 1))
        # Jitter in the upper half: many containers started together spread out, yet each
        # one still backs off.
        delay = min(random.uniform(ceiling / 2, ceiling), deadline - now)
        if not as_json:
            click.echo(
                f"attempt {attempts}: {cause.name} ({cause.title}); retrying in {delay:.2f} s",
                err=True,
            )
        time.sleep(delay)
    return _report(state, result, attempts, checked_url, timeout)


def _report(
    state: NeonState,
    result: ProbeResult,
    attempts: int,
    checked_url: DatabaseURL,
    timeout: float,
) -> dict[str, t.Any]:
    limits = state.session_limits
    return {
        "reachable": result.healthy,
        "latency_ms": result.latency_ms,
        "server_version": result.server_version,
        "database": result.database,
        "user": result.user,
        "url": state.url.masked(),
        "host_kind": "pooled" if state.pooled else "direct",
        "checked_url": checked_url.masked(),
        "tls": {"enabled": result.tls, "version": result.tls_version, "cipher": result.tls_cipher},
        "in_recovery": result.in_recovery,
        "profile": state.pool.profile,
        "pool": state.pool.as_dict(),
        "session_limits": {
            "mode": limits["mode"],
            "statement_timeout": result.statement_timeout,
            "idle_in_transaction_session_timeout": result.idle_in_transaction_session_timeout,
            "configured": {name: value for name, value in limits.items() if name != "mode"},
        },
        "cause": _cause(result.cause, timeout),
        "attempts": attempts,
    }


def _cause(cause: ErrorCause | None, timeout: float) -> dict[str, str] | None:
    if cause is None:
        return None
    if cause.name == "health_timeout":
        # The health checker words it for the /health route; here --timeout set the bound.
        cause = dataclasses.replace(
            cause,
            title=f"The database did not answer within {timeout:g} s (--timeout)",
            hint=f"{cause.hint} A waking Neon compute may need 10-15 s: raise --timeout.",
        )
    # The detail was masked by classify() with every secret of the app's URLs.
    return {name: getattr(cause, name) for name in ("name", "title", "hint", "detail")}


def _check_lines(report: dict[str, t.Any]) -> list[str]:
    """The human rendering of a check report; the error line is printed by the caller."""
    reachable = report["reachable"]
    attempts = report["attempts"]
    tries = f" (attempt {attempts})" if reachable else f" (after {attempts} attempts)"
    lines = [
        _line("reachable", ("yes" if reachable else "no") + (tries if attempts > 1 else "")),
        _line("latency", f"{report['latency_ms']:.2f} ms"),
    ]
    if reachable:
        lines += [
            _line("server version", report["server_version"]),
            _line("database", report["database"]),
            _line("user", report["user"]),
            _line("in recovery", "yes (read-only standby)" if report["in_recovery"] else "no"),
        ]
    lines += [_line("url", report["url"]), _line("host kind", report["host_kind"])]
    if report["checked_url"] != report["url"]:
        lines.append(_line("checked via", f"{report['checked_url']} (direct host)"))
    tls = report["tls"]
    if reachable:
        shown = f"on, {tls['version']}, {tls['cipher']}" if tls["enabled"] else "off"
        lines.append(_line("tls", shown))
    pool = report["pool"]
    lines += [
        _line("profile", report["profile"]),
        _line("pool", ", ".join(f"{k}={v}" for k, v in pool.items() if k != "profile")),
    ]
    limits = report["session_limits"]
    if reachable:
        shown = (
            f"statement_timeout={limits['statement_timeout']}, idle_in_transaction_session_"
            f"timeout={limits['idle_in_transaction_session_timeout']} (mode: {limits['mode']})"
        )
    else:
        shown = _configured_limits({"mode": limits["mode"], **limits["configured"]})
    lines.append(_line("session limits", shown))
    cause = report["cause"]
    if cause is not None and cause["detail"]:
        lines.append(_line("detail", cause["detail"]))
    return lines


# -- config --------------------------------------------------------------------------------------


def _setting_rows(state: NeonState) -> dict[str, dict[str, t.Any]]:
    """``{"DB_POOL_SIZE": {"value": 5, "source": "default"}, ...}`` with effective values."""
    rows: dict[str, dict[str, t.Any]] = {}
    for name in NeonSettings.model_fields:
        value: t.Any = getattr(state.settings, name)
        source: str = state.loaded.sources.get(name, "default")
        if name == "url":
            value = state.url.masked()
        elif isinstance(value, SecretStr):
            value = _masked_url(value)
        elif value is None:
            # Unset means "the profile decides": show what was decided, not a bare None.
            value, source = _derived(state, name, value, source)
        rows[key_for(name)] = {"value": value, "source": source}
    return rows


def _derived(state: NeonState, name: str, value: t.Any, source: str) -> tuple[t.Any, str]:
    if name == "profile":
        # init_app picks development for an app in debug mode, else production.
        profile = state.pool.profile
        return profile, "app.debug" if profile == "development" else "default"
    if name == "health_details":
        return state.health_details, "profile"
    if name == "leak_threshold":
        return state.monitor.leak_threshold or 0.0, "profile"
    if name == "require_tls":
        return state.require_tls, "profile"
    if name == "pooled":
        # Unset: decided by the DB_URL host (a Neon -pooler host is pooled).
        return state.pooled, "derived"
    return value, source


def _masked_url(value: SecretStr) -> str:
    """A URL setting with its password masked; an unparsable one entirely."""
    try:
        return parse_url(value.get_secret_value()).masked()
    except NeonError:
        return MASK


def _configured_limits(limits: dict[str, t.Any]) -> str:
    values = [f"{name}={value} ms" for name, value in limits.items() if name != "mode"]
    return f"{', '.join(values) or 'none'} (mode: {limits['mode']}, configured)"


# -- helpers -------------------------------------------------------------------------------------


def _state() -> NeonState:
    # Imported here: extension.py imports this module to register the command.
    from .extension import current_state

    try:
        return current_state()
    except NeonStateError as exc:
        raise click.ClickException(str(exc)) from None


def _want_json(as_json: bool) -> bool:
    """``--json`` given to the subcommand or to the group (``flask db-check --json pool``)."""
    return as_json or bool(click.get_current_context().meta.get(_JSON_META))


def _render(value: t.Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _line(label: str, value: t.Any) -> str:
    return f"{label + ':':<{_LABEL_WIDTH}}{_render(value)}"


def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(
        f"  {key:<{widths[0]}}  {value:<{widths[1]}}  {source}" for key, value, source in rows
    )


__all__ = ["db_check"]
