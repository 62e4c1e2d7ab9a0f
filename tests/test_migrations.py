"""The Alembic migrations are one straight line and build exactly the schema of the models."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import intake.store as st


def test_one_head_and_the_models_match_the_migrated_schema(tmp_path: Path):
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(st.__file__).parent / "db" / "migrations"))
    heads = ScriptDirectory.from_config(cfg).get_heads()
    assert len(heads) == 1, f"migrations branch: heads {heads}; give the new one the previous head as down_revision"

    store = st.Store(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        store.upgrade()
        assert st.current_revision(store.engine) == set(heads)
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), st.Base.metadata)
        assert diff == [], f"the models and the migrations differ (write a migration): {diff}"
        store.upgrade()  # a second upgrade is a no-op
    finally:
        store.close()
