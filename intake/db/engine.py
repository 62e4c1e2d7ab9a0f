"""The engine intake runs on, and the schema's revision: checked cheaply, upgraded by Alembic."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from intake.db.base import db_json
from intake.db.schema import REVISION

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


_SURROGATE = re.compile("[\ud800-\udfff]")


def _json(value: Any) -> str:
    # Japanese text stays readable in the database (and half the size of \u escapes).
    text = json.dumps(value, ensure_ascii=False, default=str)
    # PostgreSQL stores "\u0000" in json but cannot read it back out (->>), and no driver
    # takes a lone surrogate: such strings are made storable (rare: the check is cheap).
    if "\\u0000" in text or (not text.isascii() and _SURROGATE.search(text)):
        text = json.dumps(db_json(value), ensure_ascii=False, default=str)
    return text


def sqlite_pragmas(dbapi_conn: Any, busy_timeout_ms: int = 30000) -> None:
    """The settings every SQLite connection of intake runs with."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns; `250` depends on that.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine with the connection settings intake relies on."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               json_serializer=_json)

        # pysqlite's own transaction handling would defer BEGIN; we issue it ourselves.
        @event.listens_for(engine, "connect", insert=True)
        def _sqlite_autocommit(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            sqlite_pragmas(dbapi_conn)

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Writers take the lock at BEGIN so that they queue (busy_timeout) instead of
            # failing on lock upgrade; readers begin deferred and never block a writer.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("writer") else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, json_serializer=_json)


def revision(engine: Engine) -> str | None:
    """The schema revision of the database, None when it has none (one query, no Alembic)."""
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    except DBAPIError as exc:
        if "alembic_version" in str(exc.orig):
            return None  # no such table: never upgraded
        raise
    return str(row[0]) if row else None


def revision_problem(found: str | None) -> str | None:
    """Why a database at revision ``found`` cannot be used by this code, or None."""
    if found == REVISION:
        return None
    if found is None or found < REVISION:
        return f"database at revision {found or 'none'}, run intake db upgrade"
    return f"database at revision {found} is newer than this intake (revision {REVISION}): upgrade intake"


def upgrade(engine: Engine) -> str:
    """Apply every Alembic migration not yet applied (``intake db upgrade``); the revision."""
    if revision(engine) == REVISION:
        # At the newest revision already: one query instead of importing Alembic (0.1 s on
        # every `intake ingest`, which an MTA may run once per message).
        return REVISION
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.connect() as conn:
        sqlite = engine.dialect.name == "sqlite"
        if sqlite:
            # A migration that rebuilds a table must not trip over the references to it;
            # SQLite takes this pragma only outside a transaction.
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        try:
            with conn.begin():
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "heads")
        finally:
            if sqlite:
                conn.connection.driver_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]
    return revision(engine) or ""
