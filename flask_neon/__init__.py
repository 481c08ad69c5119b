"""flask-neon: a correct, fast and safe PostgreSQL connection for Flask, Neon first of all."""

from .errors import (
    DatabaseUnavailableError,
    ErrorCause,
    NeonConfigError,
    NeonError,
    NeonStateError,
    classify,
)
from .extension import NeonDB
from .settings import NeonSettings
from .url import DatabaseURL, parse_url

__version__ = "0.1.0"

__all__ = [
    "DatabaseURL",
    "DatabaseUnavailableError",
    "ErrorCause",
    "NeonConfigError",
    "NeonDB",
    "NeonError",
    "NeonSettings",
    "NeonStateError",
    "classify",
    "parse_url",
]
