"""The routing rule model: conditions, rules, the rule set and what evaluation decides. Pure."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from intake.business_hours import BusinessHours
from intake.mail.classify import Classification
from intake.mail.parse import ParsedMail
from intake.states import Priority, Status
from intake.team import Team

#: A compiled condition: a predicate over a message's facts (``intake.rules.facts.Facts``;
#: named loosely here so that the model does not depend on how facts are computed).
Test = Callable[[Any], bool]

# Body conditions look at this many characters: enough for any human message, and a
# bound on the cost of a pattern over a pasted log file.
BODY_LIMIT = 100_000

PRIORITIES = tuple(p.value for p in Priority)
ASSIGN_METHODS = ("round_robin", "least_open", "none")
TOP_KEYS = ("agents", "queues", "rules")
AGENT_KEYS = ("name", "language", "away")
QUEUE_KEYS = ("name", "agents", "assign", "sla", "escalate_to", "supervisors", "reply_status", "resolved_notice",
              "on_reply_to_closed", "reopen_days")
REPLY_STATUSES = (Status.PENDING.value, Status.OPEN.value)
REOPEN_POLICIES = ("reopen", "new_case")
SLA_KEYS = ("first_response", "resolution")
RULE_KEYS = ("name", "description", "when", "then", "continue", "enabled")
ACTIONS = ("queue", "priority", "category", "assign", "tags", "language", "ack", "drop")
OPERATORS = ("regex", "contains", "exists")
COMBINATORS = ("all", "any", "not")
# Condition name → kind of value it takes.
FIELDS = {
    "to": "address", "cc": "address", "recipient": "address", "from": "address",
    "from_domain": "domain", "organization": "domain",
    "subject": "text", "body": "text", "language": "word", "channel": "word",
    "header": "header", "has_attachment": "bool", "business_hours": "bool",
}
CONDITIONS = (*FIELDS, *COMBINATORS)
#: Fields with one value per message (the others, such as ``to``, have several).
SINGLE = ("from", "from_domain", "organization", "subject", "body", "language", "channel")


class RuleTimeout(Exception):
    """Evaluating the rules for one message took longer than its budget (``[rules] budget``).

    Names the rule being evaluated when the budget ran out; the message is quarantined
    with this error (``intake quarantine list``) and processing goes on with the next.
    """

    def __init__(self, rule: "Rule", elapsed: float, budget: float) -> None:
        self.rule, self.elapsed, self.budget = rule, elapsed, budget
        super().__init__(f"{rule.at}: rule '{rule.name}': evaluating the rules took {elapsed:.2f}s, longer than "
                         f"the budget of {budget:g}s ([rules] budget); stopped at this rule, whose regular "
                         "expressions are the slow part")


class RulesError(Exception):
    """A rule set that cannot be used; each line of the message reads ``file:line: reason``."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class Condition:
    """One compiled condition: a predicate over a message's facts, and where it was written."""

    text: str
    file: str
    line: int
    test: Test
    children: tuple["Condition", ...] = ()
    kind: str = "field"  # field | all | any | not
    # Holds a regular expression: the one kind of test whose cost grows with the pattern,
    # so evaluation looks at the clock after it (``evaluate``'s budget).
    slow: bool = False

    @cached_property
    def at(self) -> str:
        return f"{self.file}:{self.line}"

    def why_not(self, facts: Any) -> str:
        """The condition text, narrowed to the part that failed for a combinator."""
        if self.kind == "all":
            for c in self.children:
                if not c.test(facts):
                    return f"all → {c.why_not(facts)}"
        if self.kind == "not":
            return f"not → matched: {', '.join(c.text for c in self.children)}"
        return self.text


@dataclass(frozen=True)
class Rule:
    """A row of the rule table: conditions (all must hold) → actions, then stop or continue."""

    name: str
    file: str
    line: int
    conditions: tuple[Condition, ...]
    actions: dict[str, Any]
    stop: bool = True
    enabled: bool = True
    description: str = ""

    @cached_property
    def at(self) -> str:
        return f"{self.file}:{self.line}"

    @cached_property
    def timed(self) -> bool:
        """Whether a condition holds a regular expression (evaluation checks its budget after it)."""
        return any(c.slow for c in self.conditions)

    @cached_property
    def checks(self) -> tuple[tuple[Test, Condition, dict[str, Any] | None], ...]:
        """(test, condition, trace entry when it fails) per condition.

        For a combinator the entry names the whole combinator; ``Condition.why_not`` (used
        by ``intake rules explain``) narrows it to the part that failed."""
        return tuple((c.test, c, {"rule": self.name, "matched": False, "failed": c.text, "at": c.at})
                     for c in self.conditions)


#: A row of the compiled rule table: (test, trace entry when it fails, rule).
Row = tuple[Test, "dict[str, Any] | None", Rule]


@dataclass(frozen=True)
class RuleSet:
    """A loaded rule set: the team directory and the compiled rule table.

    ``table`` has one row per enabled rule: a rule of one plain condition has that
    condition's test and a ready-made trace entry; any other rule has the conjunction of
    its conditions and no entry (when it fails, its first failing condition is looked up,
    the slower, rarer path).
    """

    team: Team = field(default_factory=Team)
    rules: tuple[Rule, ...] = ()
    table: tuple[Row, ...] = ()
    files: tuple[str, ...] = ()
    fingerprint: str = ""
    # The files it was compiled from, (name, bytes): another process compiles the same set.
    sources: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def summary(self) -> str:
        return (f"{len(self.files)} file(s), {len(self.team.agents)} agent(s), {len(self.team.queues)} queue(s), "
                f"{len(self.rules)} rule(s)")


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
    calendar: BusinessHours | None = None


@dataclass(frozen=True)
class Decision:
    """What the rules decided for a new case; ``None`` fields were set by no rule.

    ``trace`` lists every rule evaluated, in order: ``{"rule", "matched", "at"}`` plus
    ``"failed"`` (the first condition that did not hold) or ``"set"`` (the actions it
    applied), ``"kept"`` (actions an earlier rule had already set) and ``"continue"``.
    """

    queue: str | None = None
    priority: str | None = None
    category: str | None = None
    assign: str | None = None
    tags: tuple[str, ...] = ()
    language: str | None = None
    ack: str | bool | None = None
    drop: bool = False
    trace: tuple[dict[str, Any], ...] = ()
    set_by: dict[str, str] = field(default_factory=dict)

    @property
    def matched(self) -> list[str]:
        """Names of the rules that matched, in order."""
        return [t["rule"] for t in self.trace if t.get("matched")]


