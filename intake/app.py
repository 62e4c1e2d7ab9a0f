"""Wiring shared by the command line and ``serve``: config → store → rules → processor."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from intake.config import Config, load_config
from intake.flow import Processor
from intake.rules import RuleSet, load_rules
from intake.store import Store


@dataclass
class App:
    """One opened installation: its config, store and current rules."""

    cfg: Config
    store: Store
    ruleset: RuleSet = field(default_factory=RuleSet)
    # True under `serve`, whose processor and outbox sender run continuously (the scheduler
    # need not sweep for them).
    processing_in_serve: bool = False
    _processor: Processor | None = field(default=None, repr=False)

    @property
    def processor(self) -> Processor:
        """The processor, made once; it reads ``ruleset`` at each message, so reloads apply."""
        if self._processor is None:
            self._processor = Processor(self.cfg, self.store, lambda: self.ruleset)
        return self._processor

    def close(self) -> None:
        self.store.close()


def open_app(config_path: str | Path | None, *, upgrade_sqlite: bool = True, load_rule_files: bool = True) -> App:
    """Load the config, open the database (upgrading SQLite) and load the rules."""
    cfg = load_config(config_path or os.environ.get("INTAKE_CONFIG") or None)
    store = Store(cfg.database_url)
    if upgrade_sqlite and store.is_sqlite:
        store.upgrade()
    ruleset = load_rules(cfg.path(cfg.rules.path)) if load_rule_files else RuleSet()
    return App(cfg=cfg, store=store, ruleset=ruleset)


def setup_logging(level: str = "INFO") -> None:
    """One line per event on standard error."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("imapclient").setLevel(logging.WARNING)  # it logs every connect/close at INFO
