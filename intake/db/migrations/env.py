"""Alembic environment: runs on the connection that ``intake.db.engine.upgrade`` passes in."""

from alembic import context
from sqlalchemy import create_engine

from intake.db.schema import metadata

target_metadata = metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.config.get_main_option("sqlalchemy.url")
    with create_engine(url).begin() as conn:
        _run(conn)
