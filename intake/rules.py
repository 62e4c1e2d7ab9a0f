"""Routing rules: ``routing_rules/*.yaml`` → a compiled table; ``evaluate()``. Pure.

This is the foundation's seam: it loads ``agents:`` and ``queues:`` (which classification
needs) and returns the routing decision for a new case. The full rule language of
DESIGN.md 6 is built on this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from intake.classify import Classification
from intake.parse import ParsedMail


class RulesError(Exception):
    """A rule file that cannot be used; the message reads ``file:line: reason``."""


@dataclass(frozen=True)
class Agent:
    address: str
    name: str = ""
    language: str = ""
    away: bool = False


@dataclass(frozen=True)
class Queue:
    key: str
    name: str = ""
    agents: tuple[str, ...] = ()
    assign: str = "none"
    sla: dict[str, Any] = field(default_factory=dict)
    escalate_to: str | None = None


@dataclass(frozen=True)
class RuleSet:
    agents: dict[str, Agent] = field(default_factory=dict)
    queues: dict[str, Queue] = field(default_factory=dict)
    rules: tuple[Any, ...] = ()
    files: tuple[str, ...] = ()

    @property
    def agent_addresses(self) -> frozenset[str]:
        return frozenset(self.agents)


@dataclass(frozen=True)
class RuleContext:
    """Everything a rule may look at: the message, its class, its mailbox and the time."""

    mail: ParsedMail
    classification: Classification
    mailbox: str
    recipients: tuple[str, ...]
    channel: str
    now: datetime
    organization: str | None = None


@dataclass(frozen=True)
class Decision:
    queue: str | None = None
    priority: str | None = None
    category: str | None = None
    assign: str | None = None
    tags: tuple[str, ...] = ()
    language: str | None = None
    ack: str | bool | None = None
    drop: bool = False
    trace: tuple[dict[str, Any], ...] = ()


def load_rules(path: str | Path) -> RuleSet:
    """Load every ``*.yaml`` in ``path`` in file-name order; a missing folder is empty."""
    folder = Path(path)
    if not folder.is_dir():
        return RuleSet()
    agents: dict[str, Agent] = {}
    queues: dict[str, Queue] = {}
    files = sorted(folder.glob("*.yaml"))
    for f in files:
        try:
            data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark else 1
            raise RulesError(f"{f}:{line}: {getattr(exc, 'problem', exc)}") from None
        for addr, spec in (data.get("agents") or {}).items():
            spec = spec or {}
            agents[str(addr).lower()] = Agent(str(addr).lower(), spec.get("name", ""), spec.get("language", ""), bool(spec.get("away", False)))
        for key, spec in (data.get("queues") or {}).items():
            spec = spec or {}
            queues[str(key)] = Queue(str(key), spec.get("name", ""), tuple(a.lower() for a in spec.get("agents", [])),
                                     spec.get("assign", "none"), spec.get("sla") or {}, spec.get("escalate_to"))
    return RuleSet(agents=agents, queues=queues, files=tuple(str(f) for f in files))


def evaluate(ruleset: RuleSet, ctx: RuleContext) -> Decision:
    """The routing decision for a new case (the mailbox's default queue applies later)."""
    return Decision()
