"""Mail commands: ``#status resolved`` and the like at the top of an agent's mail (DESIGN 5). Pure.

One command per line, at the top of the mail's new text (blank lines between them are
fine); the first other line ends them. ``#`` and the command's name may be written
full-width (``＃``, ``ｓｔａｔｕｓ``, as Japanese input methods type them) and values have
Japanese names too (``#status 解決済み``, ``#priority 緊急``). Every command line is removed
from the text that goes on to the customer, a refused one too (a typo must not reach the
customer); a refused line comes back with its reason, and a typo with a suggestion.

A line further down that is a command by a name we know (``#note`` after the greeting,
``#status resolved`` under the text) is taken too, and never sent: an agent who put it
there meant it, and a note must not reach the customer because of where it was written.
An unknown ``#word`` there stays text (a hashtag).

What is checked here is what the text alone can tell: the command's name and the form of
its value. Whether the queue exists, or the agent, or the case to merge into, is the case
operation's business.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass

from intake.states import Priority, Status

#: Command name → what its value is (for the refusal message).
COMMANDS = {
    "status": "new, open, pending, resolved or closed",
    "priority": "low, medium, high or urgent",
    "assign": "an agent's address, me or none",
    "queue": "a queue's name",
    "category": "a category",
    "tag": "a tag",
    "untag": "a tag",
    "resolution": "the resolution notes",
    "merge": "CASE-N, the case this one duplicates",
    "note": "nothing",
    "internal": "nothing",
}
#: Japanese names agents type for the same commands.
ALIASES = {"メモ": "note", "社内メモ": "note", "ステータス": "status", "優先度": "priority", "担当": "assign",
           "担当者": "assign", "キュー": "queue", "分類": "category", "タグ": "tag", "タグ削除": "untag",
           "タグ解除": "untag", "解決内容": "resolution", "統合": "merge"}
STATUS_NAMES = {
    "未処理": Status.NEW, "新規": Status.NEW, "進行中": Status.OPEN, "対応中": Status.OPEN,
    "保留": Status.PENDING, "返信待ち": Status.PENDING, "回答待ち": Status.PENDING,
    "解決": Status.RESOLVED, "解決済み": Status.RESOLVED, "完了": Status.CLOSED, "クローズ": Status.CLOSED,
    "クローズ済み": Status.CLOSED,
}
PRIORITY_NAMES = {"低": Priority.LOW, "中": Priority.MEDIUM, "普通": Priority.MEDIUM, "通常": Priority.MEDIUM,
                  "高": Priority.HIGH, "緊急": Priority.URGENT, "至急": Priority.URGENT}

_LINE = re.compile(r"^[#＃]\s*(\S+)(?:[ \t\u3000]+(.*))?$")
_LABEL = re.compile(r"^\s*\[?\s*([A-Za-z][A-Za-z0-9]*)-(\d{1,18})\s*\]?\s*$")  # a case number fits 18 digits
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# A '#' line that is ordinary text, not a command: "#1 first question", "# heading".
_NOT_A_WORD = re.compile(r"^[#＃]([\s\d]|$)")


@dataclass(frozen=True)
class Command:
    """One command as the agent meant it: ``name`` and its checked, normalised ``value``."""

    name: str
    value: str
    line: str


@dataclass(frozen=True)
class Refusal:
    """A command line that cannot be applied, and why (said to the agent)."""

    line: str
    reason: str


@dataclass(frozen=True)
class Commands:
    """The commands at the top of a mail, those refused, and the text without them."""

    commands: tuple[Command, ...] = ()
    refused: tuple[Refusal, ...] = ()
    text: str = ""

    @property
    def internal(self) -> bool:
        """``#note`` / ``#internal``: the mail is an internal note."""
        return any(c.name == "note" for c in self.commands)

    def value(self, name: str) -> str | None:
        """The last value given for a command, None when it was not given."""
        found = [c.value for c in self.commands if c.name == name]
        return found[-1] if found else None


def read_commands(text: str) -> Commands:
    """The command lines at the top of ``text`` and those by a known name further down,
    checked, and the rest of the text."""
    lines = text.split("\n")
    commands: list[Command] = []
    refused: list[Refusal] = []
    kept: list[str] = []
    at_top = True
    for raw in lines:
        line = raw.strip().lstrip(_INVISIBLE)
        m = _LINE.match(line) if line else None
        word = _word(m.group(1)) if m is not None and not _NOT_A_WORD.match(line) else None
        if at_top and not line:
            continue
        if word is None or (not at_top and word not in COMMANDS and word not in ALIASES):
            at_top = False
            kept.append(raw)
            continue
        assert m is not None
        value = (m.group(2) or "").strip()
        outcome = _check(word, value, line)
        (commands if isinstance(outcome, Command) else refused).append(outcome)
        if isinstance(outcome, Command) and outcome.name == "note" and value:
            at_top = False
            kept.append(value)  # "#note the text": the note's first line
    if not commands and not refused:
        return Commands(text=text)
    return Commands(_resolution_first(commands), tuple(refused), "\n".join(kept).strip("\n"))


# Invisible characters a mail client may put before the first character of a line.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"


def _word(word: str) -> str:
    """A command's name as typed, in the form it is looked up in (full-width letters made plain)."""
    return unicodedata.normalize("NFKC", word)


def _resolution_first(commands: list[Command]) -> tuple[Command, ...]:
    """The commands in the agent's order, but each ``#resolution`` before a ``#status`` given
    above it: resolving tells the customer, and that mail shows the resolution notes."""
    out: list[Command] = []
    for c in commands:
        if c.name == "resolution":
            since_merge = max((i + 1 for i, d in enumerate(out) if d.name == "merge"), default=0)
            status = next((i for i in range(since_merge, len(out)) if out[i].name == "status"), None)
            if status is not None:
                out.insert(status, c)
                continue
        out.append(c)
    return tuple(out)


def _check(word: str, value: str, line: str) -> Command | Refusal:
    name = ALIASES.get(word, word.lower())
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.6)
        hint = f" (did you mean #{close[0]}?)" if close else f" (commands: {', '.join('#' + c for c in COMMANDS)})"
        return Refusal(line, f"unknown command #{word}{hint}")
    if name == "internal":
        name = "note"
    if name == "note":
        return Command(name, "", line)
    if not value:
        return Refusal(line, f"#{name} needs a value: {COMMANDS[name]}")
    if name in ("status", "priority", "assign", "merge"):
        value = unicodedata.normalize("NFKC", value)  # ｒｅｓｏｌｖｅｄ, ＣＡＳＥ－１２
    if name == "status":
        status = STATUS_NAMES.get(value) or _enum(Status, value)
        if status is None:
            return Refusal(line, f"#status: {_shown(value)} is not a status; use {COMMANDS['status']}"
                                 f"{_suggest(value, [s.value for s in Status])}")
        return Command(name, status.value, line)
    if name == "priority":
        priority = PRIORITY_NAMES.get(value) or _enum(Priority, value)
        if priority is None:
            return Refusal(line, f"#priority: {_shown(value)} is not a priority; use {COMMANDS['priority']}"
                                 f"{_suggest(value, [p.value for p in Priority])}")
        return Command(name, priority.value, line)
    if name == "assign":
        v = value.lower()
        if v in ("me", "none", "自分", "なし") or _ADDRESS.match(v):
            return Command(name, {"自分": "me", "なし": "none"}.get(v, v), line)
        return Refusal(line, f"#assign: {_shown(value)} is not {COMMANDS['assign']}")
    if name == "merge":
        m = _LABEL.match(value)
        if m is None:
            return Refusal(line, f"#merge: {_shown(value)} is not a case number such as CASE-12")
        return Command(name, f"{m.group(1).upper()}-{int(m.group(2))}", line)
    if name in ("tag", "untag", "queue", "category") and any(c.isspace() for c in value):
        return Refusal(line, f"#{name}: one word, without spaces ({_shown(value)})")
    return Command(name, value, line)


def _shown(value: str) -> str:
    """A value quoted in a refusal, cut short: the agent sees the line anyway."""
    return repr(value if len(value) <= 60 else value[:60] + "…")


def _enum(kind: type[Status] | type[Priority], value: str) -> Status | Priority | None:
    try:
        return kind(value.lower())
    except ValueError:
        return None


def _suggest(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
