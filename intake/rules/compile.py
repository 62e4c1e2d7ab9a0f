"""Conditions compiled into closures over a message's facts: the evaluation hot path.

One implementation for every field: a :class:`Matcher` (what a condition's value matches)
becomes a Python expression over one text value, generated from a fixed set of shapes, and
that expression is wrapped for the field: read once for a single-valued field (``subject``),
``any(…)`` over the values of a multi-valued one (``to``, a header). The field name comes
from ``FIELDS`` (never from the rule file) and every value is passed as a variable, never
written into the source.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from intake.rules.facts import Facts
from intake.rules.model import FIELDS, SINGLE


@dataclass(frozen=True)
class Matcher:
    """A compiled condition value: exact values (and domain suffixes), a substring, a
    pattern, presence, or any of several of these."""

    exact: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    contains: str | None = None
    regex: re.Pattern[str] | None = None
    exists: bool | None = None
    others: tuple["Matcher", ...] = ()

    @property
    def plain(self) -> bool:
        """Only exact values (and suffixes)."""
        return self.contains is None and self.regex is None and self.exists is None and not self.others

    @classmethod
    def any_of(cls, parts: Sequence["Matcher"]) -> "Matcher":
        """A list of values: matches when any matches (exact values merged into one set)."""
        exact: set[str] = set()
        suffixes: list[str] = []
        others = []
        for part in parts:
            if part.plain:
                exact |= part.exact
                suffixes += part.suffixes
            else:
                others.append(part)
        if not exact and not suffixes and len(others) == 1:
            return others[0]
        return cls(exact=frozenset(exact), suffixes=tuple(suffixes), others=tuple(others))


def _value_expr(m: Matcher, x: str, ns: dict[str, Any], p: str = "m") -> str:
    """An expression that is true when the text value ``x`` matches ``m`` (not ``exists``)."""
    parts = []
    if len(m.exact) == 1:
        ns[f"{p}_one"] = next(iter(m.exact))
        parts.append(f"{x} == {p}_one")
    elif m.exact:
        ns[f"{p}_exact"] = m.exact
        parts.append(f"{x} in {p}_exact")
    if m.suffixes:
        ns[f"{p}_sfx"] = m.suffixes
        parts.append(f"{x}.endswith({p}_sfx)")
    if m.contains is not None:
        ns[f"{p}_needle"] = m.contains
        parts.append(f"{p}_needle in {x}")
    if m.regex is not None:
        ns[f"{p}_search"] = m.regex.search
        parts.append(f"{p}_search({x}) is not None")
    for i, other in enumerate(m.others):
        parts.append(f"({_value_expr(other, x, ns, f'{p}{i}')})")
    return " or ".join(parts) or "False"


def _values_expr(m: Matcher, values: str, ns: dict[str, Any]) -> str:
    """An expression that is true when any of the values (an expression) matches."""
    if m.exists is not None:
        ns["want"] = m.exists
        return f"bool({values}) is want"
    if m.plain and not m.suffixes:
        ns["m_set"] = m.exact
        return f"not m_set.isdisjoint({values})"
    return f"any({_value_expr(m, 'v', ns)} for v in {values})"


def compile_field(field: str, m: Matcher) -> Callable[[Facts], bool]:
    """The test of a field condition (``subject: {regex: …}``, ``to: [a@x, b@y]``)."""
    ns: dict[str, Any] = {}
    attr = "from_" if field == "from" else field
    if m.exists is None and FIELDS.get(field) == "address" and m.exact:
        # Exact addresses also match their plus-addresses (support+urgent@ is support@).
        ns["addrs"] = m.exact
        rest = Matcher(suffixes=m.suffixes, others=m.others)
        expr = f"not addrs.isdisjoint(f.{field}_keys)"
        if rest.suffixes or rest.others:
            expr += f" or {_values_expr(rest, f'f.{attr}', ns)}"
    elif field in SINGLE and m.exists is None:
        expr = _value_expr(m, f"f.{field}_s", ns)
    else:
        expr = _values_expr(m, f"f.{attr}", ns)
    return eval(f"lambda f: {expr}", ns)  # noqa: S307 - generated from the fixed shapes above


def compile_values(m: Matcher) -> Callable[[Sequence[str]], bool]:
    """The test of a list of values (the occurrences of a header)."""
    ns: dict[str, Any] = {}
    return eval(f"lambda vals: {_values_expr(m, 'vals', ns)}", ns)  # noqa: S307


def always(_: Facts) -> bool:
    return True


def combine(op: str, tests: Sequence[Callable[[Facts], bool]]) -> Callable[[Facts], bool]:
    """``t0(f) and t1(f) …`` (or ``or``; ``not`` negates an ``and``) as one generated closure."""
    ns = {f"t{i}": t for i, t in enumerate(tests)}
    joined = (" or " if op == "or" else " and ").join(f"t{i}(f)" for i in range(len(tests)))
    return eval(f"lambda f: not ({joined})" if op == "not" else f"lambda f: {joined}", ns)  # noqa: S307


def has_upper(pattern: str) -> bool:
    """Whether a pattern needs IGNORECASE against case-folded text (escapes such as \\W and
    group names aside); matching without it is markedly faster."""
    bare = re.sub(r"\\.|\(\?P<[^>]*>|\(\?P=[^)]*\)|\(\?[a-zA-Z-]+[:)]", "", pattern)
    return bare != bare.lower()


def normalize_pattern(pattern: str) -> str:
    """A pattern in the form text is matched in (NFKC, one wave dash)."""
    return unicodedata.normalize("NFKC", pattern).replace("\u301c", "~").replace("\uff5e", "~")
