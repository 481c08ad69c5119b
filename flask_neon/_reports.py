"""What ``flask db-check`` prints: the check report, its text lines, the settings table."""

from __future__ import annotations

import dataclasses
import typing as t

from pydantic import SecretStr

from ._errors import ErrorCause, NeonError
from ._probe import ProbeResult
from ._settings import NeonSettings, key_for
from ._state import NeonState
from ._url import MASK, parse_url

LABEL_WIDTH = 17


def report(
    state: NeonState, results: list[ProbeResult], attempts: int, timeout: float
) -> dict[str, t.Any]:
    """The check of ``state.admin`` (the direct host when DB_URL is pooled), then of each
    bind's, as JSON data; ``results`` in that order."""
    limits = state.session_limits
    result, *bind_results = results
    binds = {
        key: {
            "reachable": bind_result.healthy,
            "latency_ms": bind_result.latency_ms,
            "url": bind.primary.url.masked(),
            "checked_url": bind.admin.url.masked(),
            "cause": cause(bind_result.cause, timeout),
        }
        for (key, bind), bind_result in zip(state.binds.items(), bind_results, strict=True)
    }
    first_cause = next((r.cause for r in results if r.cause is not None), None)
    return {
        "reachable": result.healthy,
        "latency_ms": result.latency_ms,
        "server_version": result.server_version,
        "database": result.database,
        "user": result.user,
        "url": state.url.masked(),
        "host_kind": "pooled" if state.pooled else "direct",
        "checked_url": state.admin.url.masked(),
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
        "cause": cause(first_cause, timeout),
        "attempts": attempts,
        "binds": binds,
    }


def cause(cause: ErrorCause | None, timeout: float) -> dict[str, str] | None:
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


def check_lines(report: dict[str, t.Any]) -> list[str]:
    """The human rendering of a check report; the error line is printed by the caller."""
    reachable = report["reachable"]
    attempts = report["attempts"]
    tries = f" (attempt {attempts})" if reachable else f" (after {attempts} attempts)"
    lines = [
        line("reachable", ("yes" if reachable else "no") + (tries if attempts > 1 else "")),
        line("latency", f"{report['latency_ms']:.2f} ms"),
    ]
    if reachable:
        lines += [
            line("server version", report["server_version"]),
            line("database", report["database"]),
            line("user", report["user"]),
            line("in recovery", "yes (read-only standby)" if report["in_recovery"] else "no"),
        ]
    lines += [line("url", report["url"]), line("host kind", report["host_kind"])]
    if report["checked_url"] != report["url"]:
        lines.append(line("checked via", f"{report['checked_url']} (direct host)"))
    tls = report["tls"]
    if reachable:
        shown = f"on, {tls['version']}, {tls['cipher']}" if tls["enabled"] else "off"
        lines.append(line("tls", shown))
    pool = report["pool"]
    lines += [
        line("profile", report["profile"]),
        line("pool", ", ".join(f"{k}={v}" for k, v in pool.items() if k != "profile")),
    ]
    limits = report["session_limits"]
    if reachable:
        shown = (
            f"statement_timeout={limits['statement_timeout']}, idle_in_transaction_session_"
            f"timeout={limits['idle_in_transaction_session_timeout']} (mode: {limits['mode']})"
        )
    else:
        shown = configured_limits({"mode": limits["mode"], **limits["configured"]})
    lines.append(line("session limits", shown))
    for key, bind in report["binds"].items():
        state = "reachable" if bind["reachable"] else f"unreachable ({bind['cause']['name']})"
        shown = f"{bind['url']}: {state}, {bind['latency_ms']:.2f} ms"
        if bind["checked_url"] != bind["url"]:
            shown += f", checked via {bind['checked_url']} (direct host)"
        lines.append(line(f"bind {key}", shown))
    cause = report["cause"]
    if cause is not None and cause["detail"]:
        lines.append(line("detail", cause["detail"]))
    return lines


# -- config --------------------------------------------------------------------------------------


def setting_rows(state: NeonState) -> dict[str, dict[str, t.Any]]:
    """``{"DB_POOL_SIZE": {"value": 5, "source": "default"}, ...}`` with effective values."""
    rows: dict[str, dict[str, t.Any]] = {}
    for name in NeonSettings.model_fields:
        value: t.Any = getattr(state.settings, name)
        source: str = state.loaded.sources.get(name, "default")
        if name == "url":
            value = state.url.masked()
        elif isinstance(value, SecretStr):
            value = masked_url(value)
        elif name == "binds":
            value = {
                key: masked_url(SecretStr(bind))
                if isinstance(bind, str)
                else _masked_options(bind)
                for key, bind in value.items()
            }
        elif name == "engine_options":
            value = _masked_options(value)
        elif value is None:
            # Unset means "the profile decides": show what was decided, not a bare None.
            value, source = derived(state, name, value, source)
        rows[key_for(name)] = {"value": value, "source": source}
    return rows


def derived(state: NeonState, name: str, value: t.Any, source: str) -> tuple[t.Any, str]:
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


def masked_url(value: SecretStr) -> str:
    """A URL setting with its password masked; an unparsable one entirely."""
    try:
        return parse_url(value.get_secret_value()).masked()
    except NeonError:
        return MASK


def _masked_options(options: dict[str, t.Any]) -> dict[str, t.Any]:
    """``create_engine()`` options with the url masked and connect_args shown by name only
    (they may carry a password or a key)."""
    shown = dict(options)
    if "url" in shown:
        shown["url"] = masked_url(SecretStr(str(shown["url"])))
    if "connect_args" in shown:
        shown["connect_args"] = {name: MASK for name in shown["connect_args"]}
    return shown


def configured_limits(limits: dict[str, t.Any]) -> str:
    values = [f"{name}={value} ms" for name, value in limits.items() if name != "mode"]
    return f"{', '.join(values) or 'none'} (mode: {limits['mode']}, configured)"


def render(value: t.Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def line(label: str, value: t.Any) -> str:
    return f"{label + ':':<{LABEL_WIDTH}}{render(value)}"


def table(rows: dict[str, dict[str, t.Any]]) -> str:
    """``{"DB_X": {"value": v, "source": s}}`` as aligned lines: key, value, source."""
    cells = [(key, render(row["value"]), row["source"]) for key, row in rows.items()]
    widths = [max(len(cell[i]) for cell in cells) for i in range(2)]
    return "\n".join(
        f"  {key:<{widths[0]}}  {value:<{widths[1]}}  {source}" for key, value, source in cells
    )
