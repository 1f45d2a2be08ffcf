"""The job store's schema, versioned with Alembic (revisions in versions/).

``upgrade(engine)`` brings any store to the newest revision, the one the models in
service/store.py describe, keeping every row: an empty database gets every table; a store
made by release 0.1.0, which created its tables without versioning them, is recognised as
revision 0001 (exactly those tables) and upgraded from there. The controller upgrades its
store when it starts; one upgrade runs at a time per store (a PostgreSQL advisory lock, a
file lock beside a SQLite file), so controllers starting together do not race.

A change to the models comes with a revision: tests/test_store_migrations.py fails when the
upgraded schema and the models differ. Write one with Alembic's autogenerate against a store
at head, e.g.

    .venv/bin/python -m service.migrations "what changed" sqlite:///jobs.db
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import Engine

SCRIPTS = Path(__file__).parent
BASELINE = "0001"  # release 0.1.0's tables
_ADVISORY_LOCK = 0x5E1F5  # the key of the PostgreSQL lock that serialises upgrades


def config_on(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.attributes["connection"] = connection  # env.py migrates on this connection
    return config


def head() -> str:
    return ScriptDirectory(str(SCRIPTS)).get_current_head() or ""


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


@contextlib.contextmanager
def _one_upgrade_at_a_time(engine: Engine) -> Iterator[None]:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.upgrade-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def upgrade(engine: Engine) -> None:
    """Bring the store behind ``engine`` to the newest revision (nothing to do if it is)."""
    with _one_upgrade_at_a_time(engine), engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK})
        revision = current(connection)
        if revision == head():
            return
        config = config_on(connection)
        if revision is None and "jobs" in inspect(connection).get_table_names():
            command.stamp(config, BASELINE)  # made by release 0.1.0, before versioning
        command.upgrade(config, "head")
