"""Notes: a small JSON API that shows how to use flask-neon.

Run it with no setup at all (a local PostgreSQL is started for you, see :mod:`.devdb`)::

    flask --app example_app db upgrade
    flask --app example_app run --debug

or against your own database, e.g. a Neon branch::

    export DB_URL='postgresql://alex:PW@ep-xyz-pooler.eu-central-1.aws.neon.tech/neondb?sslmode=require'
    flask --app example_app db upgrade
    flask --app example_app run
"""

from __future__ import annotations

import pathlib
import typing as t
from collections.abc import Mapping

from flask import Flask

from . import models  # noqa: F401 - registers the models on db.metadata for migrations
from .devdb import database_url_configured, use_local_database
from .errors import register_error_handlers
from .extensions import db, migrate
from .private import bp as private_notes_blueprint
from .tags import bp as tags_blueprint
from .views import bp as notes_blueprint

#: Absolute, so ``flask db ...`` finds the migrations whatever the working directory.
MIGRATIONS_DIR = pathlib.Path(__file__).resolve().parent / "migrations"


def create_app(config: Mapping[str, t.Any] | None = None) -> Flask:
    """Build the app. ``flask --app example_app`` finds and calls this factory.

    Args:
        config: Settings applied over the defaults, e.g. ``{"DB_URL": ..., "TESTING": True}``.
            flask-neon reads ``DB_URL`` and the other ``DB_*`` settings from here first,
            then from the environment and ``.env``.
    """
    app = Flask(__name__)
    if config is not None:
        app.config.from_mapping(config)

    # Tests must name their database: silently getting a local one would hide a broken fixture.
    if not app.testing and not database_url_configured(app.config, db.env_file):
        use_local_database(app)

    db.init_app(app)
    migrate.init_app(app, db, directory=str(MIGRATIONS_DIR))
    app.register_blueprint(notes_blueprint)
    app.register_blueprint(private_notes_blueprint)
    app.register_blueprint(tags_blueprint)
    register_error_handlers(app)
    return app
