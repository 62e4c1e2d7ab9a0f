"""Wiring shared by the command line and ``serve``: config → store → rules → processor."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from intake.config import Config, rules_changed_since
from intake.db import Store
from intake.rules import RuleSet, RulesError, load_rules

if TYPE_CHECKING:
    from intake.flow import Processor


@dataclass
class App:
    """One opened installation: its config, store and current rules.

    ``rules_error`` says why the rule files on disk are refused (``file:line: reason``);
    ``ruleset`` then stays the last good set (empty when none ever loaded).
    """

    cfg: Config
    store: Store
    ruleset: RuleSet = field(default_factory=RuleSet)
    rules_error: str | None = None
    # True under `serve`, whose processor and outbox sender run continuously (the scheduler
    # need not sweep for them).
    processing_in_serve: bool = False
    _processor: "Processor | None" = field(default=None, repr=False)

    @property
    def processor(self) -> "Processor":
        """The processor, made once; it reads ``ruleset`` at each message, so reloads apply."""
        if self._processor is None:
            from intake.flow import Processor

            self._processor = Processor(self.cfg, self.store, lambda: self.ruleset)
        return self._processor

    def load_rules(self) -> bool:
        """Load the rule files; False (and ``rules_error`` set) when they are refused."""
        try:
            self.ruleset = load_rules(self.cfg.rules_path)
        except RulesError as exc:
            self.rules_error = str(exc)
            return False
        self.rules_error = None
        return True

    def record_rules_state(self) -> None:
        """Record whether the rule files load, for ``intake status`` and the read commands'
        warning, as ``serve`` does (what serve recorded of the set it runs is kept). Written
        only when it differs or the files changed since (an MTA may run ingest per message)."""
        from intake.db.ops import RULES_STATE_KEY

        verdict = "refused" if self.rules_error else "ok"
        with self.store.read() as tx:
            before = tx.ops.json_setting(RULES_STATE_KEY) or {}
        if (before.get("state"), before.get("error")) == (verdict, self.rules_error) and \
                not rules_changed_since(self.cfg, before.get("at")):
            return
        state = {k: v for k, v in before.items() if k != "error"}
        state.update(state=verdict, at=datetime.now(UTC).isoformat(), folder=str(self.cfg.rules_path))
        if self.rules_error:
            state["error"] = self.rules_error
        with self.store.transaction() as tx:
            tx.ops.set_json_setting(RULES_STATE_KEY, state)

    def close(self) -> None:
        self.store.close()


def open_app(cfg: Config, *, create: bool = False, rules: bool = True) -> App:
    """Open the installation of ``cfg``.

    ``create``: make or upgrade a SQLite database (``serve``, ``ingest``); otherwise the
    database must exist at this code's revision (``NoDatabase`` says what to run).
    ``rules``: load the rule files (a refusal is kept in ``rules_error``, not raised).
    """
    cfg.check_calendar()
    store = Store(cfg.database_url)
    try:
        if create and store.is_sqlite:
            store.upgrade()
        else:
            store.check()
    except BaseException:
        store.close()
        raise
    app = App(cfg=cfg, store=store)
    if rules:
        app.load_rules()
    return app
