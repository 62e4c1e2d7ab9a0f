"""Operations state: settings, component status (``intake status``), IMAP folder positions,
rule statistics and round-robin positions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy import bindparam, select

from intake.db import schema as s
from intake.db.sql import Sql, Statement


RULES_STATE_KEY = "rules.state"
TEMPLATES_STATE_KEY = "templates.state"  # serve's last look at the template files (TemplatesWatcher)
TEMPLATES_RENDER_KEY = "templates.render"  # the last template that failed at send time, in any process
DATABASE_ID_KEY = "database.id"
SECRET_KEY = "secret"


@dataclass(frozen=True)
class StatusView:
    """One line of ``intake status``."""

    name: str
    state: str
    updated_at: datetime
    last_success_at: datetime | None
    backlog: int | None
    last_error: str | None
    last_error_at: datetime | None
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class ImapMark:
    """An IMAP folder position committed together with the messages that reach it."""

    account: str
    folder: str
    uidvalidity: int
    last_uid: int


_SETTING = Statement(lambda k: select(s.settings.c.value).where(s.settings.c.key == bindparam("key")))


def _set_setting(replace: bool) -> Statement:
    def build(k: Any) -> Any:
        ins = k.insert(s.settings).values(key=bindparam("key"), value=bindparam("value"))
        if replace:
            return ins.on_conflict_do_update(index_elements=["key"], set_={"value": ins.excluded.value})
        return ins.on_conflict_do_nothing()
    return Statement(build)


_SET_SETTING, _ADD_SETTING = _set_setting(True), _set_setting(False)


def _rule_hit(k: Any) -> Any:
    t = s.rule_stats
    ins = k.insert(t).values(name=bindparam("name"), hits=1, first_hit_at=bindparam("at"), last_hit_at=bindparam("at"))
    return ins.on_conflict_do_update(index_elements=["name"],
                                     set_={"hits": t.c.hits + 1, "last_hit_at": ins.excluded.last_hit_at})


_RULE_HIT = Statement(_rule_hit)
_ROTATION_ROW = Statement(lambda k: k.insert(s.queue_rotation).values(queue=bindparam("queue")).on_conflict_do_nothing())
_ROTATION = Statement(lambda k: (lambda q: q.with_for_update() if k.pg else q)(
    select(s.queue_rotation.c.last_agent).where(s.queue_rotation.c.queue == bindparam("queue"))))
_ROTATION_SET = Statement(lambda k: s.queue_rotation.update().where(s.queue_rotation.c.queue == bindparam("queue"))
                          .values(last_agent=bindparam("agent"), updated_at=bindparam("at")))


def _imap_set(k: Any) -> Any:
    t = s.imap_state
    ins = k.insert(t).values(account=bindparam("account"), folder=bindparam("folder"),
                             uidvalidity=bindparam("uidvalidity"), last_uid=bindparam("last_uid"),
                             updated_at=bindparam("at"))
    return ins.on_conflict_do_update(index_elements=["account", "folder"],
                                     set_={"uidvalidity": ins.excluded.uidvalidity, "last_uid": ins.excluded.last_uid,
                                           "updated_at": ins.excluded.updated_at})


_IMAP_SET = Statement(_imap_set)


class OpsRepo:
    """Operations state inside one transaction."""

    def __init__(self, sql: Sql, conn: Connection) -> None:
        self.sql = sql
        self.conn = conn

    # -- settings ------------------------------------------------------------------------

    def setting(self, key: str) -> str | None:
        """A value of the settings table, None when unset."""
        return self.sql.scalar(_SETTING, {"key": key})

    def set_setting(self, key: str, value: str, *, replace: bool = True) -> None:
        """Store a setting; with ``replace=False`` an existing value stays."""
        self.sql.run(_SET_SETTING if replace else _ADD_SETTING, {"key": key, "value": value})

    def json_setting(self, key: str) -> Any:
        value = self.setting(key)
        return json.loads(value) if value is not None else None

    def set_json_setting(self, key: str, value: Any) -> None:
        self.set_setting(key, json.dumps(value, ensure_ascii=False, default=str))

    # -- component status ----------------------------------------------------------------

    def report_status(self, name: str, state: str, now: datetime, *, backlog: int | None = None,
                      error: str | None = None, success: bool = False, details: dict[str, Any] | None = None) -> None:
        """Record what a running component is doing; None leaves a value as it was."""
        t = s.component_status
        values: dict[str, Any] = {"state": state, "updated_at": now}
        if backlog is not None:
            values["backlog"] = backlog
        if error is not None:
            values["last_error"], values["last_error_at"] = error[:2000], now
        if success:
            values["last_success_at"] = now
        if details is not None:
            values["details"] = details
        ins = self.sql.kit.insert(t).values(name=name, **values)
        self.conn.execute(ins.on_conflict_do_update(index_elements=["name"], set_=values))

    def statuses(self) -> list[StatusView]:
        """Every component's last report, by name."""
        t = s.component_status
        q = select(t.c.name, t.c.state, t.c.updated_at, t.c.last_success_at, t.c.backlog, t.c.last_error,
                   t.c.last_error_at, t.c.details).order_by(t.c.name)
        return [StatusView(*r) for r in self.conn.execute(q)]

    # -- IMAP folder positions -----------------------------------------------------------

    def imap_state(self, account: str, folder: str) -> ImapMark | None:
        t = s.imap_state
        r = self.conn.execute(select(t.c.uidvalidity, t.c.last_uid)
                                 .where(t.c.account == account, t.c.folder == folder)).first()
        return ImapMark(account, folder, r.uidvalidity, r.last_uid) if r else None

    def set_imap_state(self, mark: ImapMark, now: datetime) -> None:
        """Where a poller stands in a folder: every UID up to ``last_uid`` is stored."""
        self.sql.run(_IMAP_SET, {"account": mark.account, "folder": mark.folder, "uidvalidity": mark.uidvalidity,
                                 "last_uid": mark.last_uid, "at": now})

    # -- routing records -----------------------------------------------------------------

    def record_rule_hits(self, names: Sequence[str], at: datetime) -> None:
        """Count one hit for each rule name."""
        for name in dict.fromkeys(names):
            self.sql.run(_RULE_HIT, {"name": name, "at": at})

    def rule_stats(self) -> dict[str, tuple[int, datetime | None]]:
        """Hit count and last hit of every rule that ever matched, by rule name."""
        t = s.rule_stats
        return {r.name: (int(r.hits), r.last_hit_at) for r in self.conn.execute(select(t.c.name, t.c.hits,
                                                                                          t.c.last_hit_at))}

    def rotation_last(self, queue: str) -> str | None:
        """The agent a queue's round robin assigned last; the row is locked on PostgreSQL."""
        self.sql.run(_ROTATION_ROW, {"queue": queue})
        return self.sql.scalar(_ROTATION, {"queue": queue})

    def set_rotation_last(self, queue: str, agent: str, at: datetime) -> None:
        self.sql.run(_ROTATION_SET, {"queue": queue, "agent": agent, "at": at})
