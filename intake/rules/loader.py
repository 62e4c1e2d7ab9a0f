"""Loading rule files: YAML nodes → located plain values → a checked, compiled rule set.

Every ``*.yaml`` file of the rules folder, in file-name order, may hold ``agents:``,
``queues:`` and ``rules:`` (DESIGN.md 6). Loading composes the YAML into nodes (so every
error can name its file and line), checks every key, type, pattern and reference, and
compiles each rule into a row of the table (``intake.rules.compile``). Every error reads
``file:line: reason``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from intake.config import parse_duration
from intake.mail.parse import normalize_text
from intake.rules.compile import (
    Matcher,
    always,
    combine,
    compile_field,
    compile_regex,
    compile_values,
    has_regex,
    normalize_pattern,
)
from intake.rules.model import (
    ACTIONS,
    AGENT_KEYS,
    ASSIGN_METHODS,
    COMBINATORS,
    CONDITIONS,
    FIELDS,
    OPERATORS,
    PRIORITIES,
    QUEUE_KEYS,
    REOPEN_POLICIES,
    REPLY_STATUSES,
    RULE_KEYS,
    SLA_KEYS,
    TOP_KEYS,
    Condition,
    Row,
    Rule,
    RuleSet,
    RulesError,
)
from intake.states import Status
from intake.team import Agent, Queue, Team

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_LANG_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_MAX_NODES = 200_000  # bounds alias expansion ("billion laughs")
_MAX_DEPTH = 60


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
            agents = self.agent_list(spec, "agents", where)
            supervisors = self.agent_list(spec, "supervisors", where)
            ok &= agents is not None and supervisors is not None
            sla: dict[str, Any] = {}
            raw_sla = spec.get("sla")
            if raw_sla is not None:
                if not isinstance(raw_sla, _Map):
                    self.error(spec.lines["sla"], f"{where}: sla: expected a mapping such as {{first_response: 4h}}")
                    ok = False
                else:
                    ok &= self.check_keys(raw_sla, SLA_KEYS, f"{where} sla")
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
            reply_status = self.choice(spec, "reply_status", REPLY_STATUSES, where)
            on_closed = self.choice(spec, "on_reply_to_closed", REOPEN_POLICIES, where)
            resolved_notice = self.flag(spec, "resolved_notice", True, where)
            reopen_days = spec.get("reopen_days")
            if reopen_days is not None and (isinstance(reopen_days, bool) or not isinstance(reopen_days, int)
                                            or reopen_days < 0):
                self.error(spec.lines["reopen_days"], f"{where}: reopen_days: expected a number of days (0 or more)")
                ok = False
            ok &= None not in (reply_status, on_closed, resolved_notice)
            if ok and name is not None and assign is not None:
                self.queues[key] = Queue(key, name, tuple(agents or ()), assign, sla, escalate, tuple(supervisors or ()),
                                         reply_status or Status.PENDING.value, bool(resolved_notice), on_closed or "reopen",
                                         reopen_days)

    def choice(self, spec: _Map, key: str, allowed: Sequence[str], where: str) -> str | None:
        """A text value that must be one of ``allowed`` (its first is the default)."""
        value = self.text(spec, key, allowed[0], where)
        if value is not None and value not in allowed:
            self.error(spec.lines[key], f"{where}: {key} must be one of {', '.join(allowed)}, not {value!r}"
                                        f"{_did_you_mean(value, allowed)}")
            return None
        return value

    def agent_list(self, spec: _Map, key: str, where: str) -> list[str] | None:
        """A queue's list of agent addresses (``agents:``, ``supervisors:``); None when wrong."""
        raw = spec.get(key)
        if raw is None:
            return []
        if not isinstance(raw, _Seq):
            self.error(spec.lines[key], f"{where}: {key}: expected a list of addresses, got {_type_name(raw)}")
            return None
        out: list[str] | None = []
        for a, aline in zip(raw, raw.lines):
            if not isinstance(a, str):
                self.error(aline, f"{where}: agent {a!r} is not a mail address")
                out = None
                continue
            if out is not None:
                out.append(a.lower())
            self.refs.append(_Ref("agent", a.lower(), self.file, aline, where))
        return out

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
        return Condition(text, self.file, line, compile_field(key, match), slow=has_regex(match))

    def combinator(self, key: str, value: Any, line: int, where: str) -> Condition | None:
        if key == "not":
            if not isinstance(value, _Map) or not value:
                self.error(line, f"{where}: not: expected a mapping of conditions, got {_type_name(value)}")
                return None
            inner = self.conditions(value, where)
            if len(inner) != len(value):
                return None
            return Condition(f"not: {_show(value)}", self.file, line, combine("not", [c.test for c in inner]),
                             tuple(inner), "not", any(c.slow for c in inner))
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
                items.append(Condition(_show(item), self.file, iline, combine("and", [c.test for c in inner]),
                                       tuple(inner), "all", any(c.slow for c in inner)))
        if not ok:
            return None
        tests = [c.test for c in items]
        text_of = f"{key}: {_show(value)}"
        slow = any(c.slow for c in items)
        if key == "all":
            return Condition(text_of, self.file, line, combine("and", tests), tuple(items), "all", slow)
        return Condition(text_of, self.file, line, combine("or", tests), tuple(items), "any", slow)

    def header(self, value: Any, line: int, where: str, text: str) -> Condition | None:
        if not isinstance(value, _Map) or not value:
            self.error(line, f"{where}: header: expected a mapping of header name → value, "
                             f"e.g. {{List-Id: {{exists: true}}}}, got {_type_name(value)}")
            return None
        checks = []
        slow = False
        for name, v in value.items():
            hline = value.lines[name]
            if not isinstance(name, str) or not re.match(r"^[!-9;-~]+$", name):
                self.error(hline, f"{where}: header: {name!r} is not a header name")
                return None
            m = self.matcher("text", v, hline, f"{where}: header {name}")
            if m is None:
                return None
            checks.append((name.lower(), compile_values(m)))
            slow = slow or has_regex(m)
        if len(checks) == 1:
            (hname, test), = checks
            return Condition(text, self.file, line, lambda f: test(f.header(hname)), slow=slow)
        return Condition(text, self.file, line, lambda f: all(t(f.header(n)) for n, t in checks), slow=slow)

    def matcher(self, kind: str, value: Any, line: int, where: str) -> "Matcher | None":
        """A value: exact, a list meaning any, {regex}, {contains} or {exists}."""
        if isinstance(value, _Seq):
            if not value:
                self.error(line, f"{where}: an empty list matches nothing; give at least one value")
                return None
            parts = [self.matcher(kind, v, vl, where) for v, vl in zip(value, value.lines)]
            if any(p is None for p in parts):
                return None
            return Matcher.any_of(parts)  # type: ignore[arg-type]
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
                return Matcher(exists=arg)
            arg_text = self.scalar_text(arg, oline, f"{where}: {op}")
            if arg_text is None:
                return None
            if op == "contains":
                if not arg_text:
                    self.error(oline, f"{where}: contains: empty text matches everything")
                    return None
                return Matcher(contains=normalize_text(arg_text))
            try:
                # Text is matched in its normalised form (NFKC, one wave dash), so the
                # pattern is normalised alike; case never matters. RE2 matches in linear
                # time: what it cannot match so is refused here, never met at mail time.
                pattern = compile_regex(normalize_pattern(arg_text))
            except ValueError as exc:
                self.error(oline, f"{where}: bad regex {arg_text!r}: {exc}")
                return None
            return Matcher(regex=pattern)
        text = self.scalar_text(value, line, where)
        if text is None:
            return None
        if kind == "address":
            if "@" not in text or any(c.isspace() for c in text):
                self.error(line, f"{where}: {text!r} is not a mail address (for part of an address use "
                                 f"{{contains: {text}}})")
                return None
            return Matcher(exact=frozenset([text.lower()]))
        if kind == "domain":
            d = text.lower().strip()
            if not d or "@" in d or any(c.isspace() for c in d) or d.strip(".") == "":
                self.error(line, f"{where}: {text!r} is not a domain (write example.com, or .example.com to "
                                 "include subdomains)")
                return None
            if d.startswith("."):
                return Matcher(exact=frozenset([d[1:]]), suffixes=(d,))
            return Matcher(exact=frozenset([d]))
        if kind == "word":
            return Matcher(exact=frozenset([text.strip().lower()]))
        return Matcher(exact=frozenset([normalize_text(text).strip()]))

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
    rules = tuple(loader.rules)
    return RuleSet(team=Team(dict(loader.agents), dict(loader.queues)), rules=rules, table=_table(rules),
                   files=tuple(str(n) for n, _ in contents), fingerprint=digest.hexdigest()[:16],
                   sources=tuple((str(n), bytes(d)) for n, d in contents))


def _table(rules: Sequence[Rule]) -> tuple[Row, ...]:
    """The rule table: one row (test, trace entry when it fails, rule) per enabled rule."""
    rows: list[Row] = []
    for r in rules:
        if not r.enabled:
            continue
        checks = r.checks
        if len(checks) == 1:
            rows.append((checks[0][0], checks[0][2], r))
        elif not checks:
            rows.append((always, None, r))
        else:
            rows.append((combine("and", [c[0] for c in checks]), None, r))
    return tuple(rows)
