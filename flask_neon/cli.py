"""``flask db-check`` commands (placeholder; being written)."""

from __future__ import annotations

import click
from flask.cli import AppGroup

db_check = AppGroup("db-check", help="Check the database connection.", invoke_without_command=True)


@db_check.result_callback()
def _noop(*args: object, **kwargs: object) -> None:
    click.echo("not implemented")
