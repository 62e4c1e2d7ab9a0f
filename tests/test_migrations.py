"""The Alembic migrations are one straight line and build exactly the schema of intake.db.schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from intake.db import NoDatabase, Store
from intake.db.engine import MIGRATIONS, revision
from intake.db.schema import REVISION, metadata


def test_one_head_the_schema_matches_and_the_code_knows_the_head(tmp_path: Path):
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    heads = ScriptDirectory.from_config(cfg).get_heads()
    assert len(heads) == 1, f"migrations branch: heads {heads}; give the new one the previous head as down_revision"
    assert heads == [REVISION], "intake.db.schema.REVISION must name the newest migration"

    store = Store(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        with pytest.raises(NoDatabase, match="no database at"):
            store.check()
        assert store.upgrade() == REVISION
        assert revision(store.engine) == REVISION
        store.check()  # at the head: no complaint
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == [], f"the schema and the migrations differ (write a migration): {diff}"
        store.upgrade()  # a second upgrade is a no-op
    finally:
        store.close()


def test_a_database_behind_the_code_is_named_with_what_to_run(tmp_path: Path):
    from alembic import command

    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0005")
            # An installation in use: rows that refer to the cases table.
            conn.exec_driver_sql("INSERT INTO cases (id, number, prefix, subject, status, priority, channel, tags, "
                                 "escalation_level, created_at, updated_at) VALUES (1, 1, 'CASE', '請求書', 'new', "
                                 "'medium', 'email', '[]', 0, '2026-11-20 01:00:00.000000', "
                                 "'2026-11-20 01:00:00.000000')")
            conn.exec_driver_sql("INSERT INTO messages (case_id, direction, visibility, message_id, \"to\", cc, "
                                 "subject, text, created_at) VALUES (1, 'in', 'public', 'm1@x', '[]', '[]', '請求書', "
                                 "'届きません', '2026-11-20 01:00:00.000000')")
        with pytest.raises(NoDatabase, match=r"database at revision 0005, run intake db upgrade"):
            store.check()
        store.upgrade()
        store.check()
        with store.read() as tx:
            case = tx.cases.by_number(1)
            assert case is not None and case.subject == "請求書" and case.merged_into_id is None
            assert [e["text"] for e in tx.cases.timeline(case.id)] == []  # no events were made
    finally:
        store.close()
