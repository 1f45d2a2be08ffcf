"""Alembic's environment: migrate on the connection service.migrations hands over, with the
models of service/store.py as the target (what autogenerate compares against)."""

from alembic import context

from service.store import Base

connection = context.config.attributes["connection"]
# Batch mode: SQLite alters a table by copying it, which Alembic does for us.
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
