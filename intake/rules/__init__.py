"""Routing rules: ``routing_rules/*.yaml`` → a compiled, ordered rule table; ``evaluate()``. Pure.

Every ``*.yaml`` file of the rules folder, in file-name order, may hold ``agents:``,
``queues:`` and ``rules:`` (DESIGN.md 6). Loading composes the YAML into nodes (so every
error can name its file and line), checks every key, type, pattern and reference, and
compiles each rule into a row of the table: its conditions as small predicates over the
message's facts, its actions, and whether evaluation stops after it.

``evaluate(ruleset, ctx)`` walks the table for one message and returns a ``Decision``:
the actions to apply and a ``trace`` of every rule evaluated (matched or not, the first
condition that failed, what it set). It is a pure function of the parsed message, its
classification, its mailbox and the time.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from intake.business_hours import DEFAULT as DEFAULT_HOURS
from intake.business_hours import BusinessHours
from intake.mail.classify import Classification
from intake.mail.parse import ParsedMail, normalize_text

# Body conditions look at this many characters: enough for any human message, and a
# bound on the cost of a pattern over a pasted log file.
BODY_LIMIT = 100_000

PRIORITIES = ("low", "medium", "high", "urgent")
ASSIGN_METHODS = ("round_robin", "least_open", "none")
TOP_KEYS = ("agents", "queues", "rules")
AGENT_KEYS = ("name", "language", "away")
QUEUE_KEYS = ("name", "agents", "assign", "sla", "escalate_to")
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
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_LANG_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_MAX_NODES = 200_000  # bounds alias expansion ("billion laughs")
_MAX_DEPTH = 60


class RulesError(Exception):
    """A rule set that cannot be used; each line of the message reads ``file:line: reason``."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


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
class Condition:
    """One compiled condition: a predicate over a message's facts, and where it was written."""

    text: str
    file: str
    line: int
    test: Callable[["Facts"], bool]
    children: tuple["Condition", ...] = ()
    kind: str = "field"  # field | all | any | not

    @cached_property
    def at(self) -> str:
        return f"{self.file}:{self.line}"

    def why_not(self, facts: "Facts") -> str:
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
    def checks(self) -> tuple[tuple[Callable[["Facts"], bool], Condition, dict[str, Any] | None], ...]:
        """(test, condition, trace entry when it fails) per condition.

        For a combinator the entry names the whole combinator; ``Condition.why_not`` (used
        by ``intake rules explain``) narrows it to the part that failed."""
        return tuple((c.test, c, {"rule": self.name, "matched": False, "failed": c.text, "at": c.at})
                     for c in self.conditions)


@dataclass(frozen=True)
class RuleSet:
    agents: dict[str, Agent] = field(default_factory=dict)
    queues: dict[str, Queue] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()
    fingerprint: str = ""
    # The files it was compiled from, (name, bytes): another process compiles the same set.
    sources: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)

    @property
    def agent_addresses(self) -> frozenset[str]:
        return frozenset(self.agents)

    @cached_property
    def table(self) -> tuple[tuple[Callable[["Facts"], bool], dict[str, Any] | None, Rule], ...]:
        """The rule table: one row (test, trace entry when it fails, rule) per enabled rule.

        A rule of one plain condition has that condition's test and a ready-made trace
        entry; any other rule has the conjunction of its conditions and no entry: when it
        fails, its first failing condition is looked up (the slow, rarer path).
        """
        rows = []
        for r in self.rules:
            if not r.enabled:
                continue
            checks = r.checks
            if len(checks) == 1:
                rows.append((checks[0][0], checks[0][2], r))
            elif not checks:
                rows.append((_always, None, r))
            else:
                rows.append((_combine("and", [c[0] for c in checks]), None, r))
        return tuple(rows)

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def summary(self) -> str:
        return (f"{len(self.files)} file(s), {len(self.agents)} agent(s), {len(self.queues)} queue(s), "
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


# =======================================================================================
# Facts: what conditions look at, computed once per message and only when asked for


def _base(address: str) -> str:
    local, at, domain = address.partition("@")
    return local.split("+", 1)[0] + at + domain if "+" in local else address


def _keys(addresses: Iterable[str]) -> frozenset[str]:
    """Lower-cased addresses plus their forms without a ``+tag``."""
    return frozenset([*addresses, *(_base(a) for a in addresses if "+" in a)])


class _lazy:  # noqa: N801 - used as a decorator
    """``cached_property`` without its lock (Python 3.11 takes an RLock on every first
    access, which doubles the cost of evaluating a small rule table)."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func
        self.name = func.__name__

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


class Facts:
    """The message as the rules see it. Each value is computed on first use and kept.

    Multi-valued fields are tuples; single-valued ones also come as one string (``*_s``,
    "" when absent), the form compiled conditions read.
    """

    def __init__(self, ctx: RuleContext) -> None:
        self.ctx = ctx
        self._headers: dict[str, tuple[str, ...]] = {}

    @_lazy
    def from_s(self) -> str:
        f = self.ctx.mail.from_
        return f.address.lower() if f and f.address else ""

    @_lazy
    def from_(self) -> tuple[str, ...]:
        return (self.from_s,) if self.from_s else ()

    @_lazy
    def to(self) -> tuple[str, ...]:
        return tuple(a.address.lower() for a in self.ctx.mail.to if a.address)

    @_lazy
    def cc(self) -> tuple[str, ...]:
        return tuple(a.address.lower() for a in self.ctx.mail.cc if a.address)

    @_lazy
    def recipient(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*(r.lower() for r in self.ctx.recipients if r), *self.to, *self.cc]))

    @_lazy
    def from_keys(self) -> frozenset[str]:
        return _keys(self.from_)

    @_lazy
    def to_keys(self) -> frozenset[str]:
        return _keys(self.to)

    @_lazy
    def cc_keys(self) -> frozenset[str]:
        return _keys(self.cc)

    @_lazy
    def recipient_keys(self) -> frozenset[str]:
        return _keys(self.recipient)

    @_lazy
    def from_domain_s(self) -> str:
        return self.from_s.rpartition("@")[2] if "@" in self.from_s else ""

    @_lazy
    def from_domain(self) -> tuple[str, ...]:
        return (self.from_domain_s,) if self.from_domain_s else ()

    @_lazy
    def organization_s(self) -> str:
        return (self.ctx.organization or "").lower()

    @_lazy
    def organization(self) -> tuple[str, ...]:
        return (self.organization_s,) if self.organization_s else ()

    @_lazy
    def subject_s(self) -> str:
        return normalize_text(self.ctx.mail.subject or "").strip()

    @_lazy
    def subject(self) -> tuple[str, ...]:
        return (self.subject_s,) if self.subject_s else ()

    @_lazy
    def body_s(self) -> str:
        b = normalize_text((self.ctx.mail.text or "")[:BODY_LIMIT])
        return b if b.strip() else ""

    @_lazy
    def body(self) -> tuple[str, ...]:
        return (self.body_s,) if self.body_s else ()

    @_lazy
    def language_s(self) -> str:
        return self.ctx.mail.language

    @_lazy
    def language(self) -> tuple[str, ...]:
        return (self.language_s,)

    @_lazy
    def channel_s(self) -> str:
        return (self.ctx.channel or "").lower()

    @_lazy
    def channel(self) -> tuple[str, ...]:
        return (self.channel_s,)

    @_lazy
    def has_attachment(self) -> bool:
        # Inline parts (signature logos, pasted screenshots in HTML) are not what people
        # mean by "has an attachment".
        return any(not a.inline for a in self.ctx.mail.attachments)

    @_lazy
    def business_hours(self) -> bool:
        return (self.ctx.calendar or DEFAULT_HOURS).is_open(self.ctx.now)

    def header(self, name: str) -> tuple[str, ...]:
        """Decoded, normalised values of every occurrence of header ``name`` (lower-case)."""
        v = self._headers.get(name)
        if v is None:
            v = self._headers[name] = tuple(normalize_text(x).strip() for x in self.ctx.mail.header_all(name))
        return v


# =======================================================================================
# Loading: YAML nodes → located plain values → checked, compiled rule set


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers the line of each key."""

    line: int = 1
    lines: dict[Any, int]


class _Seq(list[Any]):
    """A YAML sequence that remembers the line of each item."""

    line: int = 1
    lines: list[int]


# libyaml's parser when PyYAML has it (several times faster), the pure-Python one otherwise.
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Located(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Plain:
    """Turns a composed YAML node tree into ``_Map``/``_Seq``/scalars with line numbers."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.count = 0

    def value(self, node: Node, depth: int = 0) -> Any:
        line = node.start_mark.line + 1
        self.count += 1
        if depth > _MAX_DEPTH:
            raise _Located(line, "nesting too deep (or a recursive alias)")
        if self.count > _MAX_NODES:
            raise _Located(line, "too many values (aliases expand beyond the limit)")
        if isinstance(node, MappingNode):
            try:
                self.loader.flatten_mapping(node)  # YAML merge keys (<<: *defaults)
            except yaml.YAMLError as exc:
                raise _Located(line, _yaml_problem(exc)) from None
            m = _Map()
            m.line, m.lines = line, {}
            for knode, vnode in node.value:
                kline = knode.start_mark.line + 1
                if not isinstance(knode, ScalarNode):
                    raise _Located(kline, "a key must be a plain name, not a list or mapping")
                key = self.scalar(knode)
                if isinstance(key, (bytes, bytearray)) or not _hashable(key):
                    raise _Located(kline, "a key must be a plain name")
                if key in m:
                    raise _Located(kline, f"duplicate key '{key}' (first at line {m.lines[key]})")
                m[key] = self.value(vnode, depth + 1)
                m.lines[key] = kline
            return m
        if isinstance(node, SequenceNode):
            s = _Seq()
            s.line, s.lines = line, []
            for item in node.value:
                s.append(self.value(item, depth + 1))
                s.lines.append(item.start_mark.line + 1)
            return s
        return self.scalar(node)

    def scalar(self, node: Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise _Located(node.start_mark.line + 1, f"bad value: {_yaml_problem(exc)}") from None


def _hashable(v: Any) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def _yaml_problem(exc: BaseException) -> str:
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if problem:
        return f"{context}, {problem}" if context else str(problem)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _did_you_mean(word: Any, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if v is None:
        return "nothing (null)"
    return {"_Map": "a mapping", "_Seq": "a list", "str": "text", "int": "a number", "float": "a number"}.get(
        type(v).__name__, f"a {type(v).__name__}")


def _show(v: Any) -> str:
    """A value as the admin wrote it, compactly (for traces and explain)."""
    return json.dumps(_plain(v), ensure_ascii=False, default=str)


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@dataclass
class _Ref:
    """A reference checked once every file is read (queues and agents may be anywhere)."""

    kind: str  # queue | agent
    name: str
    file: str
    line: int
    what: str


class _Loader:
    """Reads the files of one rule set, collecting every error with its location."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, int, str]] = []
        self.agents: dict[str, Agent] = {}
        self.agent_at: dict[str, str] = {}
        self.queues: dict[str, Queue] = {}
        self.queue_at: dict[str, str] = {}
        self.rules: list[Rule] = []
        self.rule_at: dict[str, str] = {}
        self.refs: list[_Ref] = []
        self.file = ""

    def error(self, line: int, message: str) -> None:
        """Record ``file:line: message``; control characters of quoted YAML text (a name with
        a newline) are shown escaped, so that every error stays one line."""
        self.errors.append((self.file, line, _CONTROL.sub(lambda m: repr(m.group())[1:-1], message)))

    # -- files ---------------------------------------------------------------------------

    def load_file(self, path: Path, data: bytes) -> None:
        self.file = str(path)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            self.error(line, "not UTF-8 text (save the file as UTF-8)")
            return
        try:
            loader = _YamlLoader(text)
            try:
                node = loader.get_single_node()
                doc = _Plain(loader).value(node) if node is not None else None
            finally:
                loader.dispose()
        except _Located as exc:
            self.error(exc.line, exc.message)
            return
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            self.error(mark.line + 1 if mark else 1, _yaml_problem(exc))
            return
        except RecursionError:
            self.error(1, "nesting too deep")
            return
        if doc is None:
            return
        if not isinstance(doc, _Map):
            self.error(1, f"expected a mapping with agents:, queues: and rules:, got {_type_name(doc)}")
            return
        for key, value in doc.items():
            line = doc.lines[key]
            if isinstance(key, str) and key.startswith("x-"):
                continue  # a place for YAML anchors to reuse (x-urgent: &urgent {…})
            if key not in TOP_KEYS:
                self.error(line, f"unknown section '{key}'{_did_you_mean(key, TOP_KEYS)}; "
                                 "a rule file holds agents:, queues: and rules:")
            elif value is None:
                continue
            elif key == "agents":
                self.load_agents(value, line)
            elif key == "queues":
                self.load_queues(value, line)
            else:
                self.load_rules(value, line)

    # -- agents and queues ---------------------------------------------------------------

    def load_agents(self, value: Any, line: int) -> None:
        if not isinstance(value, _Map):
            self.error(line, f"agents: expected a mapping of address → details, got {_type_name(value)}")
            return
        for addr, spec in value.items():
            at = value.lines[addr]
            if not isinstance(addr, str) or "@" not in addr or any(c.isspace() for c in addr):
                self.error(at, f"agent {addr!r} is not a mail address")
                continue
            key = addr.lower()
            if key in self.agent_at:
                self.error(at, f"agent {addr} is already defined at {self.agent_at[key]}")
                continue
            self.agent_at[key] = f"{self.file}:{at}"
            if spec is None:
                spec = _Map()
            if not isinstance(spec, _Map):
                self.error(at, f"agent {addr}: expected a mapping such as {{name: Ken Sato}}, got {_type_name(spec)}")
                continue
            ok = self.check_keys(spec, AGENT_KEYS, f"agent {addr}")
            name = self.text(spec, "name", "", f"agent {addr}")
            lang = self.text(spec, "language", "", f"agent {addr}")
            if lang and not _LANG_RE.match(lang):
                self.error(spec.lines["language"], f"agent {addr}: language {lang!r} is not a language code such as ja or en")
                ok = False
            away = self.flag(spec, "away", False, f"agent {addr}")
            if ok and name is not None and lang is not None and away is not None:
                self.agents[key] = Agent(key, name, lang, away)

    def load_queues(self, value: Any, line: int) -> None:
        if not isinstance(value, _Map):
            self.error(line, f"queues: expected a mapping of queue name → details, got {_type_name(value)}")
            return
        for key, spec in value.items():
            at = value.lines[key]
            if not isinstance(key, str) or not _NAME_RE.match(key):
                self.error(at, f"queue name {key!r}: use letters, digits, '-', '_' or '.' (put a display name in name:)")
                continue
            if key in self.queue_at:
                self.error(at, f"queue '{key}' is already defined at {self.queue_at[key]}")
                continue
            self.queue_at[key] = f"{self.file}:{at}"
            if spec is None:
                spec = _Map()
            if not isinstance(spec, _Map):
                self.error(at, f"queue {key}: expected a mapping such as {{name: Billing}}, got {_type_name(spec)}")
                continue
            where = f"queue {key}"
            ok = self.check_keys(spec, QUEUE_KEYS, where)
            name = self.text(spec, "name", "", where)
            assign = self.text(spec, "assign", "none", where)
            if assign is not None and assign not in ASSIGN_METHODS:
                self.error(spec.lines["assign"], f"{where}: assign must be one of {', '.join(ASSIGN_METHODS)}, "
                                                 f"not {assign!r}{_did_you_mean(assign, ASSIGN_METHODS)}")
                ok = False
            agents: list[str] = []
            raw_agents = spec.get("agents")
            if raw_agents is not None:
                if not isinstance(raw_agents, _Seq):
                    self.error(spec.lines["agents"], f"{where}: agents: expected a list of addresses, got {_type_name(raw_agents)}")
                    ok = False
                else:
                    for a, aline in zip(raw_agents, raw_agents.lines):
                        if not isinstance(a, str):
                            self.error(aline, f"{where}: agent {a!r} is not a mail address")
                            ok = False
                            continue
                        agents.append(a.lower())
                        self.refs.append(_Ref("agent", a.lower(), self.file, aline, where))
            sla: dict[str, Any] = {}
            raw_sla = spec.get("sla")
            if raw_sla is not None:
                if not isinstance(raw_sla, _Map):
                    self.error(spec.lines["sla"], f"{where}: sla: expected a mapping such as {{first_response: 4h}}")
                    ok = False
                else:
                    ok &= self.check_keys(raw_sla, SLA_KEYS, f"{where} sla")
                    from intake.config import parse_duration

                    for k, v in raw_sla.items():
                        if k not in SLA_KEYS:
                            continue
                        try:
                            if isinstance(v, bool):
                                raise ValueError(f"not a duration: {v!r}")
                            parse_duration(v)
                            sla[k] = v
                        except (ValueError, TypeError) as exc:
                            self.error(raw_sla.lines[k], f"{where}: sla {k}: {exc}")
                            ok = False
            escalate = spec.get("escalate_to")
            if escalate is not None:
                if not isinstance(escalate, str):
                    self.error(spec.lines["escalate_to"], f"{where}: escalate_to: expected a queue name")
                    ok = False
                else:
                    self.refs.append(_Ref("queue", escalate, self.file, spec.lines["escalate_to"], f"{where}: escalate_to"))
            if ok and name is not None and assign is not None:
                self.queues[key] = Queue(key, name, tuple(agents), assign, sla, escalate)

    # -- rules -----------------------------------------------------------------------------

    def load_rules(self, value: Any, line: int) -> None:
        if not isinstance(value, _Seq):
            self.error(line, f"rules: expected a list of rules (each starting with '- name:'), got {_type_name(value)}")
            return
        for spec, at in zip(value, value.lines):
            if not isinstance(spec, _Map):
                self.error(at, f"a rule must be a mapping with name:, when: and then:, got {_type_name(spec)}")
                continue
            self.load_rule(spec, at)

    def load_rule(self, spec: _Map, at: int) -> None:
        name = spec.get("name")
        if not isinstance(name, str) or not name.strip():
            self.error(at, "a rule needs a name: (text that says what it is for)")
            return
        where = f"rule '{name}'"
        errors_before = len(self.errors)
        self.check_keys(spec, RULE_KEYS, where)
        if name in self.rule_at:
            self.error(spec.lines["name"], f"duplicate rule name '{name}' (first at {self.rule_at[name]})")
        description = self.text(spec, "description", "", where) or ""
        stop = not self.flag(spec, "continue", False, where)
        enabled = self.flag(spec, "enabled", True, where)
        conditions: tuple[Condition, ...] = ()
        if "when" in spec:
            when = spec["when"]
            if not isinstance(when, _Map) or not when:
                self.error(spec.lines["when"], f"{where}: when: expected a mapping of conditions such as "
                                               f"{{from_domain: example.org}}, got {_type_name(when)}")
            else:
                conditions = tuple(self.conditions(when, where))
        if "then" not in spec:
            self.error(at, f"{where}: needs then: (the actions, e.g. then: {{queue: billing}})")
            actions: dict[str, Any] = {}
        else:
            actions = self.actions(spec["then"], spec.lines["then"], where)
        if len(self.errors) == errors_before:
            self.rules.append(Rule(name, self.file, at, conditions, actions, stop, bool(enabled), description))
        self.rule_at.setdefault(name, f"{self.file}:{at}")

    def conditions(self, when: _Map, where: str) -> list[Condition]:
        out = []
        for key, value in when.items():
            line = when.lines[key]
            c = self.condition(key, value, line, where)
            if c is not None:
                out.append(c)
        return out

    def condition(self, key: Any, value: Any, line: int, where: str) -> Condition | None:
        if key not in CONDITIONS:
            self.error(line, f"{where}: unknown condition '{key}'{_did_you_mean(key, CONDITIONS)}")
            return None
        if key in COMBINATORS:
            return self.combinator(key, value, line, where)
        kind = FIELDS[key]
        text = f"{key}: {_show(value)}"
        if kind == "bool":
            if not isinstance(value, bool):
                self.error(line, f"{where}: {key}: expected true or false, got {_type_name(value)}")
                return None
            attr = key
            want = value
            return Condition(text, self.file, line, lambda f: getattr(f, attr) is want)
        if kind == "header":
            return self.header(value, line, where, text)
        match = self.matcher(kind, value, line, f"{where}: {key}")
        if match is None:
            return None
        return Condition(text, self.file, line, _compile_test(key, match))

    def combinator(self, key: str, value: Any, line: int, where: str) -> Condition | None:
        if key == "not":
            if not isinstance(value, _Map) or not value:
                self.error(line, f"{where}: not: expected a mapping of conditions, got {_type_name(value)}")
                return None
            inner = self.conditions(value, where)
            if len(inner) != len(value):
                return None
            return Condition(f"not: {_show(value)}", self.file, line, _combine("not", [c.test for c in inner]),
                             tuple(inner), "not")
        if not isinstance(value, _Seq) or not value:
            self.error(line, f"{where}: {key}: expected a list of conditions (- from: …), got {_type_name(value)}")
            return None
        items: list[Condition] = []
        ok = True
        for item, iline in zip(value, value.lines):
            if not isinstance(item, _Map) or not item:
                self.error(iline, f"{where}: {key}: each item must be a mapping of conditions, got {_type_name(item)}")
                ok = False
                continue
            inner = self.conditions(item, where)
            if len(inner) != len(item):
                ok = False
                continue
            if len(inner) == 1:
                items.append(inner[0])
            else:
                items.append(Condition(_show(item), self.file, iline, _combine("and", [c.test for c in inner]),
                                       tuple(inner), "all"))
        if not ok:
            return None
        tests = [c.test for c in items]
        text_of = f"{key}: {_show(value)}"
        if key == "all":
            return Condition(text_of, self.file, line, _combine("and", tests), tuple(items), "all")
        return Condition(text_of, self.file, line, _combine("or", tests), tuple(items), "any")

    def header(self, value: Any, line: int, where: str, text: str) -> Condition | None:
        if not isinstance(value, _Map) or not value:
            self.error(line, f"{where}: header: expected a mapping of header name → value, "
                             f"e.g. {{List-Id: {{exists: true}}}}, got {_type_name(value)}")
            return None
        checks = []
        for name, v in value.items():
            hline = value.lines[name]
            if not isinstance(name, str) or not re.match(r"^[!-9;-~]+$", name):
                self.error(hline, f"{where}: header: {name!r} is not a header name")
                return None
            m = self.matcher("text", v, hline, f"{where}: header {name}")
            if m is None:
                return None
            checks.append((name.lower(), m.test))
        if len(checks) == 1:
            (hname, test), = checks
            return Condition(text, self.file, line, lambda f: test(f.header(hname)))
        return Condition(text, self.file, line, lambda f: all(t(f.header(n)) for n, t in checks))

    def matcher(self, kind: str, value: Any, line: int, where: str) -> "_Matcher | None":
        """A value: exact, a list meaning any, {regex}, {contains} or {exists}."""
        if isinstance(value, _Seq):
            if not value:
                self.error(line, f"{where}: an empty list matches nothing; give at least one value")
                return None
            parts = [self.matcher(kind, v, vl, where) for v, vl in zip(value, value.lines)]
            if any(p is None for p in parts):
                return None
            return _Matcher.any_of(parts)  # type: ignore[arg-type]
        if isinstance(value, _Map):
            if len(value) != 1:
                self.error(line, f"{where}: use one of {', '.join(OPERATORS)} per value (a list means any of them)")
                return None
            (op, arg), = value.items()
            oline = value.lines[op]
            if op not in OPERATORS:
                self.error(oline, f"{where}: unknown operator '{op}'{_did_you_mean(op, OPERATORS)}; "
                                  f"use regex, contains or exists")
                return None
            if op == "exists":
                if not isinstance(arg, bool):
                    self.error(oline, f"{where}: exists: expected true or false, got {_type_name(arg)}")
                    return None
                return _Matcher(exists=arg)
            arg_text = self.scalar_text(arg, oline, f"{where}: {op}")
            if arg_text is None:
                return None
            if op == "contains":
                if not arg_text:
                    self.error(oline, f"{where}: contains: empty text matches everything")
                    return None
                return _Matcher(contains=normalize_text(arg_text))
            try:
                # Text is matched in its normalised form (NFKC, one wave dash), so the
                # pattern is normalised alike; case never matters.
                normalized = _normalize_pattern(arg_text)
                pattern = re.compile(normalized, re.IGNORECASE if _has_upper(normalized) else 0)
            except re.error as exc:
                self.error(oline, f"{where}: bad regex {arg_text!r}: {exc}")
                return None
            return _Matcher(regex=pattern)
        text = self.scalar_text(value, line, where)
        if text is None:
            return None
        if kind == "address":
            if "@" not in text or any(c.isspace() for c in text):
                self.error(line, f"{where}: {text!r} is not a mail address (for part of an address use "
                                 f"{{contains: {text}}})")
                return None
            return _Matcher(exact=frozenset([text.lower()]))
        if kind == "domain":
            d = text.lower().strip()
            if not d or "@" in d or any(c.isspace() for c in d) or d.strip(".") == "":
                self.error(line, f"{where}: {text!r} is not a domain (write example.com, or .example.com to "
                                 "include subdomains)")
                return None
            if d.startswith("."):
                return _Matcher(exact=frozenset([d[1:]]), suffixes=(d,))
            return _Matcher(exact=frozenset([d]))
        if kind == "word":
            return _Matcher(exact=frozenset([text.strip().lower()]))
        return _Matcher(exact=frozenset([normalize_text(text).strip()]))

    def scalar_text(self, value: Any, line: int, where: str) -> str | None:
        if isinstance(value, bool):
            self.error(line, f"{where}: expected text, got a boolean (YAML reads yes/no/on/off as booleans: "
                             f"quote it, e.g. \"{'yes' if value else 'no'}\")")
            return None
        if isinstance(value, (int, float)):
            return str(value)
        if not isinstance(value, str):
            self.error(line, f"{where}: expected text, got {_type_name(value)}")
            return None
        return value

    # -- actions ---------------------------------------------------------------------------

    def actions(self, then: Any, line: int, where: str) -> dict[str, Any]:
        if not isinstance(then, _Map):
            self.error(line, f"{where}: then: expected a mapping of actions such as {{queue: billing}}, "
                             f"got {_type_name(then)}")
            return {}
        out: dict[str, Any] = {}
        for key, value in then.items():
            at = then.lines[key]
            w = f"{where}: {key}"
            if key not in ACTIONS:
                self.error(at, f"{where}: unknown action '{key}'{_did_you_mean(key, ACTIONS)}")
                continue
            if key == "drop":
                if not isinstance(value, bool):
                    self.error(at, f"{w}: expected true or false, got {_type_name(value)}")
                    continue
                out[key] = value
                continue
            if key == "ack":
                if value is False:
                    out[key] = False
                    continue
                if value is True:
                    out[key] = "ack"
                    continue
                if not isinstance(value, str) or not _NAME_RE.match(value):
                    self.error(at, f"{w}: expected a template name (e.g. ack) or false, got {_show(value)}")
                    continue
                out[key] = value
                continue
            if key == "tags":
                items = value if isinstance(value, _Seq) else [value]
                tags = []
                for t in items:
                    if isinstance(t, bool) or not isinstance(t, (str, int)) or not str(t).strip():
                        self.error(at, f"{w}: expected a tag or a list of tags, got {_show(t)}")
                        tags = []
                        break
                    tags.append(str(t).strip())
                if tags:
                    out[key] = tuple(dict.fromkeys(tags))
                continue
            text = self.scalar_text(value, at, w)
            if text is None:
                continue
            text = text.strip()
            if key == "queue":
                self.refs.append(_Ref("queue", text, self.file, at, w))
            elif key == "priority":
                if text not in PRIORITIES:
                    self.error(at, f"{w}: must be one of {', '.join(PRIORITIES)}, not {text!r}"
                                   f"{_did_you_mean(text, PRIORITIES)}")
                    continue
            elif key == "assign":
                if text not in ASSIGN_METHODS:
                    if "@" not in text:
                        self.error(at, f"{w}: must be round_robin, least_open, none or an agent's address, "
                                       f"not {text!r}{_did_you_mean(text, ASSIGN_METHODS)}")
                        continue
                    text = text.lower()
                    self.refs.append(_Ref("agent", text, self.file, at, w))
            elif key == "language":
                text = text.lower()
                if not _LANG_RE.match(text):
                    self.error(at, f"{w}: {text!r} is not a language code such as ja or en")
                    continue
            elif not text:
                self.error(at, f"{w}: expected text")
                continue
            out[key] = text
        return out

    # -- helpers ---------------------------------------------------------------------------

    def check_keys(self, spec: _Map, allowed: Sequence[str], where: str) -> bool:
        ok = True
        for key in spec:
            if key not in allowed:
                extra = ""
                if where.startswith("rule") and (key in CONDITIONS or key in ACTIONS):
                    extra = f" ('{key}' goes under {'when:' if key in CONDITIONS else 'then:'})"
                self.error(spec.lines[key], f"{where}: unknown key '{key}'{_did_you_mean(key, allowed)}{extra}")
                ok = False
        return ok

    def text(self, spec: _Map, key: str, default: str, where: str) -> str | None:
        v = spec.get(key, default)
        if v is None:
            return default
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        if not isinstance(v, str):
            self.error(spec.lines.get(key, spec.line), f"{where}: {key}: expected text, got {_type_name(v)}")
            return None
        return v

    def flag(self, spec: _Map, key: str, default: bool, where: str) -> bool | None:
        v = spec.get(key, default)
        if not isinstance(v, bool):
            self.error(spec.lines.get(key, spec.line), f"{where}: {key}: expected true or false, got {_type_name(v)}")
            return None
        return v

    # -- references ------------------------------------------------------------------------

    def check_refs(self) -> None:
        for ref in self.refs:
            self.file = ref.file
            if ref.kind == "queue" and ref.name not in self.queues and ref.name not in self.queue_at:
                known = sorted(self.queue_at)
                hint = _did_you_mean(ref.name, known) or (f" (queues: {', '.join(known)})" if known else
                                                          " (no queues are defined)")
                self.error(ref.line, f"{ref.what}: unknown queue '{ref.name}'{hint}")
            elif ref.kind == "agent" and ref.name not in self.agents and ref.name not in self.agent_at:
                self.error(ref.line, f"{ref.what}: unknown agent '{ref.name}'"
                                     f"{_did_you_mean(ref.name, sorted(self.agent_at), 0.8)}; list agents under agents:")


def _has_upper(pattern: str) -> bool:
    """Whether a pattern needs IGNORECASE against case-folded text (escapes such as \\W and
    group names aside); matching without it is markedly faster."""
    bare = re.sub(r"\\.|\(\?P<[^>]*>|\(\?P=[^)]*\)|\(\?[a-zA-Z-]+[:)]", "", pattern)
    return bare != bare.lower()


def _normalize_pattern(pattern: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFKC", pattern).replace("\u301c", "~").replace("\uff5e", "~")


class _Matcher:
    """A compiled value: does any of a field's values match?"""

    __slots__ = ("exact", "suffixes", "contains", "regex", "exists", "others", "test")

    def __init__(self, *, exact: frozenset[str] = frozenset(), suffixes: tuple[str, ...] = (), contains: str | None = None,
                 regex: re.Pattern[str] | None = None, exists: bool | None = None,
                 others: tuple["_Matcher", ...] = ()) -> None:
        self.exact, self.suffixes, self.contains, self.regex, self.exists, self.others = (
            exact, suffixes, contains, regex, exists, others)
        self.test = self._compile()

    @classmethod
    def any_of(cls, parts: list["_Matcher"]) -> "_Matcher":
        exact: set[str] = set()
        suffixes: list[str] = []
        others = []
        for p in parts:
            if p.contains is None and p.regex is None and p.exists is None and not p.others:
                exact |= p.exact
                suffixes += p.suffixes
            else:
                others.append(p)
        if not others:
            return cls(exact=frozenset(exact), suffixes=tuple(suffixes))
        if not exact and not suffixes and len(others) == 1:
            return others[0]
        return cls(exact=frozenset(exact), suffixes=tuple(suffixes), others=tuple(others))

    def _compile(self) -> Callable[[Sequence[str]], bool]:
        # Specialised closures: evaluation cost is dominated by these calls.
        if self.exists is not None:
            want = self.exists
            return lambda vals: bool(vals) is want
        if self.contains is not None:
            needle = self.contains
            return lambda vals: any(needle in v for v in vals)
        if self.regex is not None:
            search = self.regex.search
            return lambda vals: any(search(v) is not None for v in vals)
        exact, suffixes, others = self.exact, self.suffixes, tuple(o.test for o in self.others)
        if others:
            return lambda vals: (any(v in exact or (suffixes and v.endswith(suffixes)) for v in vals)
                                 or any(t(vals) for t in others))
        if suffixes:
            return lambda vals: any(v in exact or v.endswith(suffixes) for v in vals)
        if len(exact) == 1:
            (one,) = exact
            return lambda vals: one in vals
        return lambda vals: not exact.isdisjoint(vals)


def _always(_: Facts) -> bool:
    return True


def _combine(op: str, tests: Sequence[Callable[[Facts], bool]]) -> Callable[[Facts], bool]:
    """``t0(f) and t1(f) …`` (or ``or``; ``not`` negates an ``and``) as one generated closure."""
    ns = {f"t{i}": t for i, t in enumerate(tests)}
    joined = (" or " if op == "or" else " and ").join(f"t{i}(f)" for i in range(len(tests)))
    return eval(f"lambda f: not ({joined})" if op == "not" else f"lambda f: {joined}", ns)  # noqa: S307


SINGLE = ("from", "from_domain", "organization", "subject", "body", "language", "channel")


def _compile_test(key: str, m: _Matcher) -> Callable[[Facts], bool]:
    """One closure per condition, with the fact read inline: the evaluation hot path.

    The expression is generated from a fixed set of shapes; the field name comes from
    ``FIELDS`` (never from the rule file) and every value is passed as a variable.
    """
    attr = "from_" if key == "from" else key
    ns: dict[str, Any] = {"exact": m.exact, "sfx": m.suffixes, "needle": m.contains, "want": m.exists,
                          "search": m.regex.search if m.regex else None, "test": m.test}
    plain = m.contains is None and m.regex is None and m.exists is None and not m.others
    if plain and FIELDS.get(key) == "address":
        # Exact addresses also match their plus-addresses (support+urgent@ is support@).
        expr = f"not exact.isdisjoint(f.{key}_keys)"
    elif key in SINGLE and not m.others:
        x = f"f.{key}_s"
        if m.exists is not None:
            expr = f"bool({x}) is want"
        elif m.contains is not None:
            expr = f"needle in {x}"
        elif m.regex is not None:
            expr = f"search({x}) is not None"
        elif m.suffixes:
            expr = f"({x} in exact or {x}.endswith(sfx))"
        elif len(m.exact) == 1:
            ns["one"] = next(iter(m.exact))
            expr = f"{x} == one"
        else:
            expr = f"{x} in exact"
    else:
        expr = f"test(f.{attr})"
    return eval(f"lambda f: {expr}", ns)  # noqa: S307 - generated from the fixed shapes above


# =======================================================================================
# Public API


def rule_files(path: str | Path) -> list[Path]:
    """The files of a rule set: ``*.yaml`` of a folder in name order (or one file with its folder)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(f for f in p.glob("*.yaml") if f.is_file())
    elif p.is_file():
        found = sorted({*(f for f in p.parent.glob("*.yaml") if f.is_file()), p})
    else:
        return []
    return [_display(f) for f in found]


def _display(p: Path) -> Path:
    """A path as an admin reads it in errors: relative to the working folder when inside it."""
    try:
        return p.resolve().relative_to(Path.cwd().resolve())
    except (ValueError, OSError):
        return p


def load_rules(path: str | Path) -> RuleSet:
    """Load and compile a rule set; raises ``RulesError`` listing every ``file:line: reason``.

    ``path`` is the rules folder (every ``*.yaml`` in file-name order; a missing folder is
    an empty set) or one file, checked together with the ``*.yaml`` files beside it.
    """
    files = rule_files(path)
    contents: list[tuple[Path, bytes]] = []
    errors: list[str] = []
    for f in files:
        try:
            contents.append((f, f.read_bytes()))
        except OSError as exc:
            errors.append(f"{f}:1: cannot read: {exc.strerror}")
    if errors:
        raise RulesError(errors)
    return compile_rules(contents)


def compile_rules(contents: Sequence[tuple[str | Path, bytes]]) -> RuleSet:
    """Compile rule files given as (name, bytes) pairs, in order."""
    loader = _Loader()
    digest = hashlib.sha256()
    for name, data in contents:
        digest.update(str(Path(name).name).encode() + b"\0" + data + b"\0")
        try:
            loader.load_file(Path(name), data)
        except RecursionError:
            loader.error(1, "nesting too deep")
    loader.check_refs()
    if loader.errors:
        order = {str(Path(n)): i for i, (n, _) in enumerate(contents)}
        ordered = sorted(loader.errors, key=lambda e: (order.get(e[0], len(order)), e[1]))
        raise RulesError([f"{f}:{line}: {msg}" for f, line, msg in ordered])
    return RuleSet(agents=dict(loader.agents), queues=dict(loader.queues), rules=tuple(loader.rules),
                   files=tuple(str(n) for n, _ in contents), fingerprint=digest.hexdigest()[:16],
                   sources=tuple((str(n), bytes(d)) for n, d in contents))


def evaluate(ruleset: RuleSet, ctx: RuleContext) -> Decision:
    """Walk the rule table for one new case; the mailbox's default queue applies later.

    The first matching rule stops evaluation unless it says ``continue: true``; a later
    matching rule then adds tags and sets only what no earlier rule set. ``drop: true``
    always stops.
    """
    facts = Facts(ctx)
    trace: list[dict[str, Any]] = []
    append = trace.append
    decided: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    tags: list[str] = []
    for test, failed, rule in ruleset.table:
        if not test(facts):
            # A fresh dict per entry: callers may keep or change their trace.
            if failed is not None:
                append(failed.copy())
            else:
                append(next(entry for t, _, entry in rule.checks if not t(facts)).copy())
        else:
            applied: dict[str, Any] = {}
            kept: list[str] = []
            for key, value in rule.actions.items():
                if key == "tags":
                    new = [t for t in value if t not in tags]
                    tags.extend(new)
                    applied["tags"] = list(value)
                elif key in decided:
                    kept.append(key)
                else:
                    decided[key] = value
                    set_by[key] = rule.name
                    applied[key] = value
            stop = rule.stop or bool(decided.get("drop"))
            entry = {"rule": rule.name, "matched": True, "at": rule.at, "set": applied, "continue": not stop}
            if kept:
                entry["kept"] = kept
            trace.append(entry)
            if stop:
                break
    if tags:
        set_by.setdefault("tags", next(t["rule"] for t in trace if t.get("matched") and "tags" in t["set"]))
    return Decision(
        queue=decided.get("queue"), priority=decided.get("priority"), category=decided.get("category"),
        assign=decided.get("assign"), tags=tuple(tags), language=decided.get("language"), ack=decided.get("ack"),
        drop=bool(decided.get("drop")), trace=tuple(trace), set_by=set_by,
    )


def facts_of(ctx: RuleContext) -> dict[str, Any]:
    """The values conditions see for a message (for ``intake rules explain``)."""
    f = Facts(ctx)
    calendar = ctx.calendar or DEFAULT_HOURS
    body = f.body[0] if f.body else ""
    return {
        "from": list(f.from_), "from_domain": f.from_domain[0] if f.from_domain else None,
        "organization": f.organization[0] if f.organization else None,
        "to": list(f.to), "cc": list(f.cc), "recipient": list(f.recipient),
        "subject": ctx.mail.subject, "subject_normalised": f.subject[0] if f.subject else "",
        "body_normalised": body[:200] + ("…" if len(body) > 200 else ""),
        "language": f.language[0], "channel": f.channel[0], "mailbox": ctx.mailbox,
        "has_attachment": f.has_attachment, "business_hours": f.business_hours,
        "business_hours_detail": calendar.describe(ctx.now),
        "headers": sorted({k for k, _ in ctx.mail.headers}, key=str.lower),
    }


def pick_round_robin(order: Sequence[str], available: Iterable[str], last: str | None) -> str | None:
    """The next available agent after ``last`` in the queue's order (wrapping around)."""
    avail = set(available)
    if not avail:
        return None
    start = order.index(last) + 1 if last in order else 0
    for i in range(len(order)):
        candidate = order[(start + i) % len(order)]
        if candidate in avail:
            return candidate
    return None


def pick_least_open(order: Sequence[str], available: Iterable[str], open_counts: dict[str, int]) -> str | None:
    """The available agent with the fewest open cases; ties go to the earlier in the queue."""
    avail = [a for a in order if a in set(available)]
    if not avail:
        return None
    return min(avail, key=lambda a: (open_counts.get(a, 0), avail.index(a)))
