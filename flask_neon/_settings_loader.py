"""Reading the settings once: ``app.config`` over the environment over ``.env`` over defaults,
where each value came from, and refused values explained in words (never showing a secret)."""

from __future__ import annotations

import dataclasses
import os
import typing as t

import annotated_types
from pydantic import SecretStr, ValidationError

from ._errors import NeonConfigError
from ._settings import NeonSettings, Source, key_for


@dataclasses.dataclass(frozen=True)
class LoadedSettings:
    """The settings and where each value came from."""

    settings: NeonSettings
    sources: dict[str, Source]


def load_settings(
    config: t.Mapping[str, t.Any], env_file: str | os.PathLike[str] | None = ".env"
) -> LoadedSettings:
    """Read the settings with ``config`` (usually ``app.config``) taking precedence.

    Raises:
        NeonConfigError: naming the first invalid settings, never showing a secret.
    """
    fields = NeonSettings.model_fields
    overrides = {
        name: config[key_for(name)] for name in fields if config.get(key_for(name)) is not None
    }
    dotenv = _read_dotenv(env_file)
    overrides.update(_aliases(config, overrides, dotenv))
    try:
        settings = NeonSettings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        # ``from None``: pydantic's own text repeats the input, which may be the password.
        raise NeonConfigError(_explain(exc)) from None
    return LoadedSettings(settings, _sources(overrides, dotenv))


#: Flask-SQLAlchemy's config keys, read where the DB_* key is not set.
ALIASES = {
    "url": "SQLALCHEMY_DATABASE_URI",
    "echo": "SQLALCHEMY_ECHO",
    "engine_options": "SQLALCHEMY_ENGINE_OPTIONS",
    "binds": "SQLALCHEMY_BINDS",
}


def _aliases(
    config: t.Mapping[str, t.Any],
    overrides: t.Mapping[str, t.Any],
    dotenv: t.Mapping[str, str],
) -> dict[str, t.Any]:
    """Values given under Flask-SQLAlchemy's names; the same setting under two names must agree."""
    found = {}
    for name, alias in ALIASES.items():
        value = config.get(alias)
        if value is None:
            continue
        if name in overrides and overrides[name] != value:
            raise NeonConfigError(
                f"{key_for(name)} and {alias} are both set, to different values; "
                f"they name one setting: keep one of them."
            )
        found[name] = value
    if "url" not in overrides and "url" not in found:
        # What Neon's integrations, Heroku and Render set, read when no DB_URL is given.
        url = os.environ.get("DATABASE_URL")
        if url and not os.environ.get(key_for("url")) and key_for("url") not in dotenv:
            found["url"] = url
    return found


def _read_dotenv(env_file: str | os.PathLike[str] | None) -> dict[str, str]:
    """The non-empty values of the ``.env`` file, keys upper-cased (read once per init_app)."""
    if env_file is None or not os.path.isfile(env_file):
        return {}
    from dotenv import dotenv_values

    return {key.upper(): value for key, value in dotenv_values(env_file).items() if value}


def _sources(overrides: t.Mapping[str, t.Any], dotenv: t.Mapping[str, str]) -> dict[str, Source]:
    environ = {key.upper(): value for key, value in os.environ.items()}
    sources: dict[str, Source] = {}
    for name in NeonSettings.model_fields:
        key = key_for(name)
        if name in overrides:
            sources[name] = "app.config"
        elif key in dotenv and environ.get(key, dotenv[key]) == dotenv[key]:
            # The ``flask`` command loads .env into the environment before the app starts:
            # a value equal to the file's came from the file.
            sources[name] = ".env"
        elif key in environ:
            sources[name] = "environment"
        else:
            sources[name] = "default"
    return sources


_SECRET_FIELDS = frozenset({"url", "direct_url", "read_url", "binds"})


def _explain(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        key = key_for(field)
        if error["type"] == "missing":
            if field == "url":
                lines.append(
                    f"{key} is not set. Set it in the environment, in .env or in "
                    f"app.config['{key}'], e.g. {key}=postgresql://user:password@host/dbname."
                )
            else:
                lines.append(f"{key} is required.")
            continue
        if field == "binds":
            lines.append(
                f"{key} must map bind keys to URLs or to create_engine() options with a url "
                f"({error['msg'].lower()})."
            )
            continue
        if field in _SECRET_FIELDS:
            lines.append(f"{key} must be a string URL ({error['msg'].lower()}).")
            continue
        shown = repr(error.get("input"))
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"{key} must be {_allowed(field)}, got {shown}.")
    return "Invalid flask-neon settings: " + " ".join(lines) if len(lines) > 1 else lines[0]


def _allowed(field: str) -> str:
    """Say in words what ``field`` accepts, from the model's own constraints."""
    info = NeonSettings.model_fields[field]
    annotation = info.annotation
    # Unwrap ``X | None``: the None only means "unset, use the profile's choice".
    args = [a for a in t.get_args(annotation) if a is not type(None)]
    if type(None) in t.get_args(annotation) and len(args) == 1:
        annotation = args[0]
    if t.get_origin(annotation) is t.Literal:
        return "one of " + ", ".join(str(c) for c in t.get_args(annotation))
    if annotation is SecretStr:
        return "a PostgreSQL URL"
    if annotation is str:
        return "a URL path starting with '/'"
    if annotation is bool:
        return "a boolean (true/false, 1/0, yes/no, on/off)"
    if field == "binds":
        return "a mapping of bind keys to URLs"
    if t.get_origin(annotation) is dict:
        return "a mapping of create_engine() options"
    low = next((item.ge for item in info.metadata if isinstance(item, annotated_types.Ge)), None)
    high = next((item.le for item in info.metadata if isinstance(item, annotated_types.Le)), None)
    kind = "an integer" if annotation is int else "a number"
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}"
    if low is not None:
        return f"{kind} >= {low}"
    return kind


def describe_settings() -> list[dict[str, str]]:
    """One row per setting: key, default, allowed values, description (for docs and the CLI)."""
    rows = []
    for name, info in NeonSettings.model_fields.items():
        default = (
            "required"
            if info.is_required()
            else _show_default(info.get_default(call_default_factory=True))
        )
        rows.append(
            {
                "key": key_for(name),
                "default": default,
                "allowed": _allowed(name),
                "description": info.description or "",
            }
        )
    return rows


def _show_default(value: t.Any) -> str:
    if value is None:
        return "unset"
    if value == {}:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
