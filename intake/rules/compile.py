"""Conditions compiled into closures over a message's facts: the evaluation hot path.

One implementation for every field: a :class:`Matcher` (what a condition's value matches)
becomes a Python expression over one text value, generated from a fixed set of shapes, and
that expression is wrapped for the field: read once for a single-valued field (``subject``),
``any(…)`` over the values of a multi-valued one (``to``, a header). The field name comes
from ``FIELDS`` (never from the rule file) and every value is passed as a variable, never
written into the source.

Regular expressions are compiled with Google's RE2 (``google-re2``), whose matching time is
linear in the text: ``(a+)+$`` against forty ``a`` and a ``b`` takes microseconds, where a
backtracking engine (Python's ``re``) takes hours, inside C code that neither a signal nor a
thread can interrupt. What RE2 cannot do without backtracking (backreferences, lookaround)
is refused at load (:func:`compile_regex` says which feature and how to write it instead).
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from intake.rules.facts import Facts
from intake.rules.model import FIELDS, SINGLE

#: Largest compiled program (RE2 instructions) a pattern may have. Matching costs up to
#: program size × text length when RE2's automaton cache overflows (``.{1000}x`` over
#: 100,000 characters of Japanese: about a second); at this size the worst seen is a few
#: hundred milliseconds over the longest body a condition sees. A list of about 600
#: keywords fits.
MAX_PROGRAM = 5000

# (what RE2 says, what the admin reads): features that need a backtracking engine, and
# syntax RE2 spells differently.
_UNSUPPORTED = (
    ("(?=", "lookahead (?=…) needs a backtracking engine; rewrite it without (e.g. two conditions under all:)"),
    ("(?!", "negative lookahead (?!…) needs a backtracking engine; rewrite it without (e.g. a not: condition)"),
    ("(?<=", "lookbehind (?<=…) needs a backtracking engine; match the preceding text itself"),
    ("(?<!", "negative lookbehind (?<!…) needs a backtracking engine; for one character write (?:^|[^X]) before "
             "the text, e.g. (?:^|[^ブ])ログ for (?<!ブ)ログ"),
    ("(?>", "atomic group (?>…) is not supported; a plain group (?:…) matches the same here"),
    ("(?#", "comment (?#…) is not supported; use a YAML comment (# …) after the value"),
    ("(?x", "verbose mode (?x) is not supported; write the pattern without spaces"),
    ("*+", "possessive quantifier (*+, ++, ?+) is not supported; a plain quantifier matches the same here"),
    ("++", "possessive quantifier (*+, ++, ?+) is not supported; a plain quantifier matches the same here"),
    ("?+", "possessive quantifier (*+, ++, ?+) is not supported; a plain quantifier matches the same here"),
    ("\\Z", "\\Z is written \\z (end of text)"),
    ("\\u", "\\uXXXX is written \\x{XXXX} (or the character itself)"),
    ("\\U", "\\UXXXXXXXX is written \\x{XXXXXX} (or the character itself)"),
    ("invalid repetition size", "a repetition count is at most 1000, also when nested ({n} inside {m}: n × m)"),
    ("pattern too large", f"the pattern is too large (its compiled program may have {MAX_PROGRAM} instructions)"),
)
_BACKREFERENCE = re.compile(r"invalid escape sequence: \\[1-9]")


@dataclass(frozen=True)
class Matcher:
    """A compiled condition value: exact values (and domain suffixes), a substring, a
    pattern, presence, or any of several of these."""

    exact: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    contains: str | None = None
    regex: "re2._Regexp | None" = None
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


def _value_expr(m: Matcher, x: str, ns: dict[str, Any], p: str = "m", xb: str | None = None) -> str:
    """An expression that is true when the text value ``x`` (UTF-8: ``xb``) matches ``m`` (not ``exists``)."""
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
        # RE2 matches UTF-8: a single-valued field offers its text encoded once (``xb``).
        ns[f"{p}_search"] = m.regex.search
        parts.append(f"{p}_search({xb or x + '.encode()'}) is not None")
    for i, other in enumerate(m.others):
        parts.append(f"({_value_expr(other, x, ns, f'{p}{i}', xb)})")
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
        expr = _value_expr(m, f"f.{field}_s", ns, xb=f"f.{field}_b")
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


def has_regex(m: Matcher) -> bool:
    """Whether a matcher holds a regular expression (the only part whose cost is worth timing)."""
    return m.regex is not None or any(has_regex(o) for o in m.others)


def compile_regex(pattern: str) -> "re2._Regexp":
    """Compile a (normalised) pattern with RE2; ``ValueError`` says what is wrong and how to write it.

    RE2's syntax is Python's without what needs backtracking, plus a few of its own
    (``\\p{Han}``, ``\\x{3042}``, ``[[:alpha:]]``). When RE2 refuses a pattern, Python's
    ``re`` compiles it (never to match) to tell a plain syntax error, in the words of
    Python's documentation, from a feature RE2 lacks, which is named.
    """
    ignore_case = has_upper(pattern)
    options = re2.Options()
    options.log_errors = False  # RE2 would print every refusal on standard error
    options.never_capture = True  # only whether it matches counts
    options.case_sensitive = not ignore_case
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as exc:
        raise ValueError(_refusal(pattern, exc)) from None
    if compiled.programsize > MAX_PROGRAM:
        raise ValueError(f"the pattern is too large: {compiled.programsize} instructions compiled, at most "
                         f"{MAX_PROGRAM} (shorten a counted repetition such as .{{1000}}, or split a long list of "
                         "words over several conditions under any:)")
    return compiled


def _refusal(pattern: str, exc: Exception) -> str:
    """Why RE2 refused ``pattern``: Python's syntax error, or the feature RE2 lacks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. FutureWarning for "[[" in Python's re
        try:
            re.compile(pattern)
        except re.error as syntax:
            return str(syntax)
    said = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    if _BACKREFERENCE.search(said) or ("(?P" in said and "(?P=" in pattern):
        return ("backreference (\\1, (?P=name)) needs a backtracking engine, which one mail can keep busy for "
                "hours; it is not supported")
    for needle, reason in _UNSUPPORTED:
        if needle in said:
            return reason
    return f"not supported by RE2 ({said})"


def has_upper(pattern: str) -> bool:
    """Whether a pattern needs IGNORECASE against case-folded text (escapes such as \\W and
    group names aside); matching without it is markedly faster."""
    bare = re.sub(r"\\[pPx]\{[^}]*\}|\\.|\(\?P<[^>]*>|\(\?P=[^)]*\)|\(\?[a-zA-Z-]+[:)]", "", pattern)
    return bare != bare.lower()


def normalize_pattern(pattern: str) -> str:
    """A pattern in the form text is matched in (NFKC, one wave dash)."""
    return unicodedata.normalize("NFKC", pattern).replace("\u301c", "~").replace("\uff5e", "~")
