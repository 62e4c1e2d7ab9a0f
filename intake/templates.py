"""Mail templates: ``templates/[BRAND/]LANG/NAME.txt.j2`` (+ ``NAME.html.j2``), rendered safely.

The only module that imports Jinja. Templates run in Jinja's immutable sandbox with
``StrictUndefined`` (a typo in a variable name is an error, not an empty string), see
only plain data (dicts, lists, strings, numbers: never ORM objects, whose public methods
the sandbox would still let a template call), and may not produce more than a configured
number of characters. HTML parts are autoescaped, text parts are not. The first line of a
text template, ``Subject: …``, is the mail's subject.

**A time budget per rendering** (``[templates] budget``). Templates are admin-supplied
code, rendered inside the transaction that stores the change they announce, so a runaway
must stop. Jinja compiles a template to Python, and every place where its time can grow
is a Python-level step this sandbox sees: each item of a ``{% for %}`` loop (the loop's
iterable is wrapped at compile time, so nested loops that print nothing are caught too),
each call (macros, recursion), filter and intercepted operator. Each step compares the
clock with the rendering's deadline; code between steps runs once per step at most. What one step can do in C is bounded by size:
repetition, concatenation, ``%``/``format`` widths, ``replace``, ``join``, ``center``,
``indent``, ``wordwrap``, ``batch``, ``slice`` and every ``{{ … }}`` output are refused
beyond ``max_output`` characters, and integer products beyond a few thousand digits.

**Versions and hot reload.** Each template file is looked at again after ``LOOKUP_TTL``
seconds: a new override (even in a templates folder made after the start), an edit and a
deletion are picked up without a restart. A new version is compiled and, when sample
data is given, rendered with it before it is used: a version that fails is *refused*
and the last good one stays in use (DESIGN 4). A version that fails at send time, or
runs past its budget, makes way for the last good version of that template for that
mail; a runaway version is not rendered again until its file changes. Without a good
version the error is raised (the caller skips the mail), and a runaway raises
:class:`TemplateTimeout` (the caller quarantines the message).

Every error names the template file and line: ``templates/ja/ack.txt.j2:3: 'case' has no
attribute 'numbr'``.
"""

from __future__ import annotations

import functools
import inspect
import operator
import os
import re
import string
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import (
    BaseLoader,
    StrictUndefined,
    Template,
    TemplateError as JinjaTemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    nodes,
    pass_context,
)
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup, escape

from intake.shipped import TEMPLATES

#: The templates intake sends (DESIGN 6 "Templates").
TEMPLATE_NAMES = (
    "ack",
    "agent_reply",
    "status_changed",
    "new_case_agent",
    "customer_reply_agent",
    "escalated",
    "auto_close_warning",
    "auto_closed",
    "internal_note",
    "agent_notice",
)

#: Seconds a template file is trusted before it is looked at again: a new, changed or
#: removed file is in use at most this long after the change (the README promises 2 s).
LOOKUP_TTL = 1.0

#: Seconds one rendering may take unless told otherwise (``[templates] budget``).
DEFAULT_BUDGET = 1.0

#: Shipped templates, used for any template the configured folder does not have.
SHIPPED = TEMPLATES

_PLAIN = (str, int, float, bool, type(None), datetime, date)

#: Digits an integer product may reach (``n * n`` squared in a loop grows without end).
_MAX_INT_BITS = 10_000


class TemplateError(Exception):
    """A template that cannot be loaded or rendered; the message reads ``file:line: reason``."""

    def __init__(self, file: str, line: int | None, reason: str) -> None:
        self.file, self.line, self.reason = file, line, reason
        super().__init__(f"{file}:{line or 1}: {reason}")


class TemplateTimeout(TemplateError):
    """A rendering ran past its budget and no good version of the template was there to
    use instead: the message that caused it is quarantined, naming the template."""


@dataclass(frozen=True)
class Rendered:
    """A rendered mail: subject, text part, optional HTML part and the files used.

    ``fallbacks``: for each part whose current version failed (``file:line: reason``),
    so that the last good version was rendered instead.
    """

    subject: str
    text: str
    html: str | None
    files: tuple[str, ...]
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True)
class TemplateEvent:
    """A change :meth:`TemplateSet.refresh` noticed, for one log line: ``kind`` is
    ``added`` (a file in use where there was none, or another file in place of the one
    before), ``changed`` (a new version of the same file in use), ``refused`` (a version
    that failed; the last good one stays), or ``removed`` (the file is gone: the next
    one in the lookup, if any, is in use)."""

    kind: str
    name: str
    file: str
    detail: str = ""

    def __str__(self) -> str:
        return f"template {self.kind}: {self.file}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class TemplateProblem:
    """Why a template's current file is not what renders: ``refused`` at load, ``failed``
    or ``timeout`` at send time. ``fallback``: the file and load time of the version used
    instead, None when there is none."""

    kind: str
    name: str
    file: str
    line: int | None
    reason: str
    at: str
    fallback: str | None

    @property
    def error(self) -> str:
        return f"{self.file}:{self.line or 1}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "file": self.file, "line": self.line, "reason": self.reason,
                "error": self.error, "at": self.at, "fallback": self.fallback}


# ---------------------------------------------------------------------------------------
# The budget: a deadline per rendering, checked at every Python-level step


class _Runaway(Exception):
    """The rendering's deadline passed (raised inside the template, turned into a TemplateError)."""


@dataclass
class _Budget:
    deadline: float
    seconds: float


_BUDGET: ContextVar[_Budget | None] = ContextVar("intake_template_budget", default=None)


def _tick() -> None:
    """One step of a rendering: past the deadline, stop it."""
    b = _BUDGET.get()
    if b is not None and time.monotonic() > b.deadline:
        raise _Runaway(f"rendering took longer than {b.seconds:g}s ([templates] budget): an endless or very long "
                       "loop?")


def _size(value: Any, limit: int) -> int:
    """Characters ``value`` becomes as text, counted only until past ``limit``."""
    total = 0
    todo = [value]
    while todo and total <= limit:
        v = todo.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        elif isinstance(v, Mapping):
            total += 2 * len(v) + 2
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 * len(v) + 2
            todo.extend(v)
        else:
            total += 24  # numbers, dates, Jinja's own objects: short as text
    return total


def _refuse_size(what: str, size: int, limit: int) -> None:
    if size > limit:
        raise OverflowError(f"{what} would make more than {limit} characters ([notify] max_output)")


# printf-style conversions: %[(name)][flags][width][.precision]type
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(fmt: str, limit: int) -> None:
    """Refuse ``'%999999999s' % x``: a width or precision larger than the output limit."""
    for m in _PRINTF.finditer(fmt):
        for n in m.groups():
            if n == "*" or (n and int(n) > limit):
                raise OverflowError(f"format width {n} is larger than the limit {limit}")


def _check_format_spec(fmt: str, limit: int) -> None:
    """Refuse ``'{:>999999999}'.format(x)`` (fields parsed by the standard library)."""
    for _, _, spec, _ in string.Formatter().parse(fmt):
        for n in re.findall(r"\d+", spec or ""):
            if int(n) > limit:
                raise OverflowError(f"format width {n} is larger than the limit {limit}")


# Filters whose output can be much larger than their input: checked before they run, by
# the names of their parameters (Jinja 3.1's filters).
def _pre_replace(limit: int, a: Mapping[str, Any]) -> None:
    s, old, new, count = str(a["s"]), str(a["old"]), str(a["new"]), a.get("count")
    hits = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    _refuse_size("replace", len(s) + hits * max(0, len(new) - len(old)), limit)


def _pre_join(limit: int, a: Mapping[str, Any]) -> None:
    value = a["value"]
    if isinstance(value, (list, tuple, str)):
        _refuse_size("join", _size(value, limit) + len(value) * len(str(a.get("d", ""))), limit)


def _pre_width(param: str) -> Callable[[int, Mapping[str, Any]], None]:
    def check(limit: int, a: Mapping[str, Any]) -> None:
        width = a.get(param)
        if isinstance(width, int) and width > limit:
            raise OverflowError(f"{param} {width} is larger than the limit {limit}")
        if param == "width" and isinstance(width, str):  # indent(s, "  ")
            text = str(a.get("s", ""))
            _refuse_size("indent", len(text) + (text.count("\n") + 1) * len(width), limit)
        if "wrapstring" in a and isinstance(a["wrapstring"], str) and isinstance(width, int) and width > 0:
            text = str(a.get("s", ""))
            _refuse_size("wordwrap", len(text) + (len(text) // width + 1) * len(a["wrapstring"]), limit)
    return check


def _pre_format(limit: int, a: Mapping[str, Any]) -> None:
    _check_printf(str(a["value"]), limit)


def _pre_sum(limit: int, a: Mapping[str, Any]) -> None:
    if not isinstance(a.get("start", 0), (int, float)):
        raise TypeError("sum: start must be a number (adding up lists or strings is refused)")


_PRECHECKS: dict[str, Callable[[int, Mapping[str, Any]], None]] = {
    "replace": _pre_replace, "join": _pre_join, "center": _pre_width("width"), "indent": _pre_width("width"),
    "wordwrap": _pre_width("width"), "batch": _pre_width("linecount"), "slice": _pre_width("slices"),
    "format": _pre_format, "sum": _pre_sum,
}
# Filters that turn a whole structure into text: their input must fit the output limit.
_SERIALIZERS = frozenset({"string", "e", "escape", "forceescape", "tojson", "pprint", "urlencode", "xmlattr",
                          "urlize", "striptags", "safe", "list"})
# Filters that collect what a lazy sequence (``map``, ``select``) yields: collected here
# first, counted item by item, so that a sequence of large strings is refused early.
_COLLECTORS = frozenset({"join", "list", "sort", "unique", "groupby", "reverse", "sum", "min", "max"})
_PASSED = ("eval_ctx", "environment", "context", "env")


def _collect(values: Iterator[Any], limit: int) -> list[Any]:
    out, size = [], 0
    for v in values:
        _tick()
        size += _size(v, limit)
        _refuse_size("a sequence", size, limit)
        out.append(v)
    return out


def _guard(name: str, func: Callable[..., Any], limit: int) -> Callable[..., Any]:
    """``func`` (a filter) with a step of the budget and its size checks before it runs."""
    check = _PRECHECKS.get(name)
    checked = check is not None or name in _SERIALIZERS or name in _COLLECTORS
    signature = inspect.signature(func) if checked else None
    # Jinja's async-aware filters (``list``) take their context ahead of the parameters
    # their signature shows.
    params = list(signature.parameters) if signature is not None else []
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None and params[:1] and params[0] not in _PASSED else 0

    @functools.wraps(func)  # keeps jinja_pass_arg: the filter gets its context as before
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if signature is None:
            return func(*args, **kwargs)
        try:
            bound = signature.bind(*args[skip:], **kwargs)
        except TypeError:
            return func(*args, **kwargs)  # the filter says what is wrong with its arguments
        first = next(k for k in bound.arguments if k not in _PASSED)
        value = bound.arguments[first]
        if name in _COLLECTORS and isinstance(value, Iterator):
            bound.arguments[first] = value = _collect(value, limit)
        if name in _SERIALIZERS:
            _refuse_size(name, _size(value, limit), limit)
        if check is not None:
            check(limit, {**{p.name: p.default for p in signature.parameters.values()
                             if p.default is not inspect.Parameter.empty}, **bound.arguments})
        return func(*args[:skip], *bound.args, **bound.kwargs)

    return guarded


class _Generator(CodeGenerator):
    """Jinja's code generator, with every ``{% for %}`` iterable wrapped in the budget's
    step (``_step_items``) and every ``~`` operand in the size check (``_sized``)."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in list(node.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, "_step_items", [], [], None, None, lineno=loop.iter.lineno)
        for concat in list(node.find_all(nodes.Concat)):
            concat.nodes = [nodes.Filter(n, "_sized", [], [], None, None, lineno=n.lineno) for n in concat.nodes]
        super().visit_Template(node, frame)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with a deadline checked at every step and sizes capped (see the module)."""

    code_generator_class = _Generator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, max_output: int, **kw: Any) -> None:
        super().__init__(finalize=self._finalize, **kw)
        self.max_output = max_output
        self.globals.pop("lipsum", None)  # lorem ipsum of any length: nothing a mail needs
        self.filters = {name: _guard(name, f, max_output) for name, f in self.filters.items()}
        self.filters["_step_items"] = _step_items
        self.filters["_sized"] = pass_context(lambda _ctx, value: self._sized(value))
        self.filters["nl2br"] = _guard("nl2br", _nl2br, max_output)

    def _finalize(self, value: Any) -> Any:
        """Every ``{{ … }}``: no value larger than the output may be."""
        if type(value) is not str or len(value) > self.max_output:  # the common case costs one test
            _refuse_size("output", _size(value, self.max_output), self.max_output)
        return value

    def _sized(self, value: Any) -> Any:
        _refuse_size("~ (concatenation)", _size(value, self.max_output), self.max_output)
        return value

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        _tick()
        limit = self.max_output
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limit:
                    raise OverflowError(f"repetition would make {len(seq) * n} items (limit {limit})")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > \
                    _MAX_INT_BITS:
                raise OverflowError("the product is too large a number")
        if op == "**" and isinstance(right, int) and abs(right) > 100:
            raise OverflowError(f"exponent {right} is too large")
        if op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _refuse_size("+", len(left) + len(right), limit)
        if op == "%" and isinstance(left, str):
            _check_printf(left, limit)
        return {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod}[op](left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        _tick()
        bound_to = getattr(__obj, "__self__", None)
        if isinstance(bound_to, str):
            __self._check_str_method(bound_to, getattr(__obj, "__name__", ""), args)
        return super().call(__context, __obj, *args, **kwargs)

    def _check_str_method(self, s: str, name: str, args: tuple[Any, ...]) -> None:
        """``'x'.center(10**9)``, ``.replace``, ``.join`` and friends: refused beyond the output limit."""
        limit = self.max_output
        if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
            _refuse_size(name, args[0], limit)
        elif name == "expandtabs" and args and isinstance(args[0], int):
            _refuse_size(name, len(s) + s.count("\t") * args[0], limit)
        elif name == "replace" and len(args) >= 2:
            _pre_replace(limit, {"s": s, "old": args[0], "new": args[1], "count": args[2] if len(args) > 2 else None})
        elif name == "join" and args and isinstance(args[0], (list, tuple, str)):
            _refuse_size(name, _size(args[0], limit) + len(args[0]) * len(s), limit)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, limit = value.__self__, self.max_output

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format_spec(fmt, limit)
            return wrapped(*args, **kwargs)

        return checked


@pass_context
def _step_items(_context: Any, iterable: Any) -> Iterator[Any]:
    """A ``{% for %}`` loop's items, one budget step each (so nested loops that print nothing stop too)."""
    for item in iterable:
        _tick()
        yield item


def _check_plain(value: Any, where: str = "context") -> None:
    """Refuse anything but plain data, so a template can call no object's methods."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {type(k).__name__}")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: templates get plain data only, not {type(value).__name__}")


# ---------------------------------------------------------------------------------------
# Versions of each template file


@dataclass(eq=False)
class _Version:
    """One loaded content of a template file."""

    name: str
    file: str
    template: Template
    loaded_at: str
    runaway: bool = False  # ran past its budget: not rendered again

    @property
    def label(self) -> str:
        return f"{self.file} as loaded at {self.loaded_at}"


@dataclass(eq=False)
class _Slot:
    """A template name (``ja/ack.txt.j2``): the file it is now, the version in use and the
    last good one before it."""

    name: str
    looked: float = float("-inf")  # monotonic time of the last look at the files
    stamp: tuple[Any, ...] | None = None  # (file, mtime, size, inode) last looked at; None: no file
    current: _Version | None = None
    good: _Version | None = None  # the fallback: the version in use before ``current``
    problem: TemplateProblem | None = None


class _SlotLoader(BaseLoader):
    """Jinja's view of the slots: ``{% extends %}``/``{% include %}`` get the version in use."""

    def __init__(self, tset: "TemplateSet") -> None:
        self.tset = tset

    def load(self, environment: Any, name: str, globals: Mapping[str, Any] | None = None) -> Template:
        slot = self.tset._slot(name)
        if slot.current is None:
            if slot.problem is not None:
                raise TemplateError(slot.problem.file, slot.problem.line, slot.problem.reason)
            raise TemplateNotFound(name)
        return slot.current.template


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class TemplateSet:
    """The templates of one installation: lookup with fallbacks, versions, sandboxed rendering.

    Lookup order for ``NAME`` in language ``LANG`` and brand ``BRAND``:
    ``BRAND/LANG``, ``LANG``, ``BRAND/DEFAULT``, ``DEFAULT`` — the customer's language
    matters more than the brand's look. The configured folder comes first, then the
    shipped templates. Changes are picked up without a restart (within ``LOOKUP_TTL``
    seconds); ``sample(name, language)`` gives the data a new version is tried with
    before it is used (None: compiled only). Safe to share between threads.
    """

    def __init__(self, path: str | Path, default_language: str = "ja", max_output: int = 256 * 1024,
                 *, shipped: Path | None = SHIPPED, budget: float = DEFAULT_BUDGET,
                 sample: Callable[[str, str], Mapping[str, Any]] | None = None) -> None:
        self.path = Path(path)
        self.default_language = default_language
        self.max_output = max_output
        self.budget = budget
        self.sample = sample
        # Every root, whether it exists yet or not: a templates folder made after the start counts.
        self.roots = [self.path] + ([shipped] if shipped and shipped.resolve() != self.path.resolve() else [])
        self.env = _Sandbox(
            max_output,
            loader=_SlotLoader(self),
            cache_size=0,  # the slots are the cache: Jinja asks the loader at every use
            undefined=StrictUndefined,
            autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
            keep_trailing_newline=True,
        )
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.RLock()
        self._failures: list[TemplateProblem] = []

    # -- lookup -------------------------------------------------------------------------

    def candidates(self, name: str, language: str | None, brand: str | None) -> list[str]:
        """Template names tried for ``name`` (without the ``.txt.j2``/``.html.j2`` ending)."""
        langs = [lang for lang in dict.fromkeys([language or self.default_language, self.default_language]) if lang]
        out: list[str] = []
        for lang in langs:
            if brand:
                out.append(f"{brand}/{lang}/{name}")
            out.append(f"{lang}/{name}")
        return list(dict.fromkeys(out))

    def find(self, name: str, language: str | None, brand: str | None) -> tuple[str, str | None, str]:
        """(text template, HTML template or None, language used); TemplateError when none exists."""
        for base in self.candidates(name, language, brand):
            if self._exists(base + ".txt.j2"):
                html = base + ".html.j2"
                lang = base.split("/")[-2]
                return base + ".txt.j2", html if self._exists(html) else None, lang
        tried = ", ".join(c + ".txt.j2" for c in self.candidates(name, language, brand))
        raise TemplateError(str(self.path / name), None, f"no template {name!r} (tried {tried})")

    def _exists(self, name: str) -> bool:
        """A file, or a version still in use, has this name."""
        slot = self._slot(name)
        return slot.stamp is not None or slot.current is not None

    def file_of(self, name: str) -> str:
        """The file a template name is now (the first root that has it)."""
        slot = self._slot(name)
        if slot.stamp is not None:
            return str(slot.stamp[0])
        return slot.current.file if slot.current is not None else str(self.path / name)

    def _slot(self, name: str, *, force: bool = False) -> _Slot:
        """The slot of a template name, its files looked at again after ``LOOKUP_TTL``."""
        slot = self._slots.get(name)
        if slot is None:
            with self._lock:
                slot = self._slots.setdefault(name, _Slot(name))
        now = time.monotonic()
        if force or now - slot.looked >= LOOKUP_TTL:
            with self._lock:
                if force or now - slot.looked >= LOOKUP_TTL:
                    slot.looked = now
                    self._look(slot)
        return slot

    def _locate(self, name: str) -> tuple[Any, ...] | None:
        for root in self.roots:
            path = root / name
            try:
                st = path.stat()
            except OSError:
                continue
            if path.is_file():
                return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)
        return None

    def _look(self, slot: _Slot) -> TemplateEvent | None:
        """Load the slot's file if it changed since the last look; the event, if any."""
        stamp = self._locate(slot.name)
        if stamp == slot.stamp:
            return None
        slot.stamp = stamp
        before = slot.current.file if slot.current is not None else None
        if stamp is None:
            slot.current = slot.good = None
            slot.problem = None
            return TemplateEvent("removed", slot.name, before or str(self.path / slot.name))
        file = str(stamp[0])
        try:
            version = self._load(slot.name, file)
        except TemplateError as exc:
            if slot.current is None:  # broken since it was first seen (a restart): the shipped one
                slot.current = self._shipped_version(slot.name, file)
            fallback = slot.current.label if slot.current is not None else None
            slot.problem = TemplateProblem("refused", slot.name, exc.file, exc.line, exc.reason, _utcnow(), fallback)
            kept = f"; still using {fallback}" if fallback else "; no good version to use instead"
            return TemplateEvent("refused", slot.name, file, f"{slot.problem.error}{kept}")
        if slot.current is not None and not slot.current.runaway:
            slot.good = slot.current
        slot.current = version
        slot.problem = None
        if before is None:
            return TemplateEvent("added", slot.name, file)
        if before == file:
            return TemplateEvent("changed", slot.name, file)
        if not file.startswith(str(self.path) + os.sep):
            return TemplateEvent("removed", slot.name, before, f"{file} is used again")
        return TemplateEvent("added", slot.name, file, f"in place of {before}")

    def _shipped_version(self, name: str, refused: str) -> _Version | None:
        """The same template from a root after the one whose file was refused (the shipped
        templates behind an override), when it loads."""
        later = False
        for root in self.roots:
            path = root / name
            if later and path.is_file():
                try:
                    return self._load(name, str(path))
                except TemplateError:
                    return None
            later = later or str(path) == refused
        return None

    def _load(self, name: str, file: str) -> _Version:
        """Read, compile and try a file (with sample data, within the budget); TemplateError when it fails."""
        try:
            source = Path(file).read_text("utf-8")
        except UnicodeDecodeError as exc:
            raise TemplateError(file, None, f"not UTF-8: {exc.reason}") from None
        except OSError as exc:
            raise TemplateError(file, None, f"cannot read: {exc.strerror}") from None
        try:
            code = self.env.compile(source, name, file)
        except TemplateSyntaxError as exc:
            raise TemplateError(exc.filename or file, exc.lineno, exc.message or str(exc)) from None
        template = self.env.template_class.from_code(self.env, code, self.env.make_globals(None))
        version = _Version(name, file, template, _utcnow())
        if self.sample is not None and not Path(name).name.startswith("_"):
            parts = name.split("/")
            base = parts[-1].removesuffix(".j2").rsplit(".", 1)[0]
            lang = parts[-2] if len(parts) >= 2 else self.default_language
            try:
                out = self._run(version, self.sample(base, lang))
            except _Runaway as exc:
                raise TemplateError(*_where(file), str(exc)) from None
            if name.endswith(".txt.j2"):
                self._split_subject(file, out)
        return version

    # -- rendering ----------------------------------------------------------------------

    def render(self, name: str, context: Mapping[str, Any], *, language: str | None = None,
               brand: str | None = None) -> Rendered:
        """Render template ``name`` (text, and HTML when there is one) with plain data."""
        _check_plain(context)
        txt, html, _ = self.find(name, language, brand)
        fallbacks: list[str] = []
        text_out, txt_file = self._render_name(txt, context, fallbacks, subject=True)
        subject, body = self._split_subject(txt_file, text_out)
        html_out = None
        files = [txt_file]
        if html is not None:
            html_out, html_file = self._render_name(html, context, fallbacks)
            files.append(html_file)
            if html_out.startswith("Subject:"):
                html_out = html_out.split("\n", 1)[1] if "\n" in html_out else ""
        return Rendered(subject, body, html_out, tuple(files), tuple(fallbacks))

    def render_file(self, name: str, context: Mapping[str, Any]) -> Rendered:
        """Render one given template file (relative name) as it is on disk now, for ``intake templates check``."""
        _check_plain(context)
        slot = self._slot(name, force=True)
        if slot.problem is not None and slot.problem.kind == "refused":
            raise TemplateError(slot.problem.file, slot.problem.line, slot.problem.reason)
        out, file = self._render_name(name, context, [])
        if name.endswith(".html.j2"):
            return Rendered("", "", out, (file,))
        subject, body = self._split_subject(file, out)
        return Rendered(subject, body, None, (file,))

    def _render_name(self, name: str, context: Mapping[str, Any], fallbacks: list[str],
                     subject: bool = False) -> tuple[str, str]:
        """(output, file) of the version in use, or of the last good one when it fails."""
        slot = self._slot(name)
        current = slot.current
        if current is None:
            if slot.problem is not None:
                raise TemplateError(slot.problem.file, slot.problem.line, slot.problem.reason)
            raise TemplateError(self.file_of(name), None, "template not found")
        try:
            out = self._run(current, context)
            if subject:
                self._split_subject(current.file, out)
            return out, current.file
        except _Runaway as exc:
            error = TemplateError(*_where(current.file), str(exc))
            runaway = True
        except TemplateError as exc:
            error, runaway = exc, False
        with self._lock:
            if runaway and slot.current is current:
                # Never again within budget after budget: the last good version takes its place.
                current.runaway = True
                slot.current, slot.good = slot.good, None
            fallback = slot.current if runaway else slot.good
        label = fallback.label if fallback is not None and fallback is not current else None
        problem = TemplateProblem("timeout" if runaway else "failed", name, error.file, error.line, error.reason,
                                  _utcnow(), label)
        slot.problem = problem
        with self._lock:  # kept for intake status until taken; the latest hundred at most
            self._failures = [*self._failures[-99:], problem]
        if label is None or fallback is None:
            if runaway:
                raise TemplateTimeout(error.file, error.line, error.reason)
            raise error
        try:
            out = self._run(fallback, context)
        except _Runaway as exc:
            raise TemplateTimeout(*_where(fallback.file), str(exc)) from None
        fallbacks.append(error.args[0])
        return out, fallback.file

    def _run(self, version: _Version, context: Mapping[str, Any]) -> str:
        """Render one version within the budget and the output limit. ``_Runaway`` past the
        deadline; TemplateError for anything else, naming the file and line."""
        file = version.file
        token = _BUDGET.set(_Budget(time.monotonic() + self.budget, self.budget))
        parts: list[str] = []
        size = 0
        try:
            for chunk in version.template.generate(**context):
                size += len(chunk)
                if size > self.max_output:
                    raise TemplateError(*_where(file), f"output larger than {self.max_output} characters")
                parts.append(chunk)
        except (TemplateError, _Runaway):
            raise
        except RecursionError:
            raise TemplateError(*_where(file), "recursion too deep") from None
        except (JinjaTemplateError, Exception) as exc:  # noqa: BLE001 - any render error names file:line
            raise TemplateError(*_where(file), f"{type(exc).__name__}: {exc}") from None
        finally:
            _BUDGET.reset(token)
        return "".join(parts)

    def _split_subject(self, file: str, out: str) -> tuple[str, str]:
        first, _, rest = out.partition("\n")
        if not first.startswith("Subject:"):
            raise TemplateError(file, 1, "the first line must be 'Subject: …'")
        subject = first[len("Subject:"):].strip()
        if not subject:
            raise TemplateError(file, 1, "the subject is empty")
        if rest.startswith("\n"):  # one blank line after the subject is layout, not body
            rest = rest[1:]
        return subject, rest

    # -- state: reload, problems, check -------------------------------------------------

    def files(self) -> list[str]:
        """Every template file (relative names) in the configured folder and the shipped ones."""
        names: set[str] = set()
        for r in self.roots:
            if r.is_dir():
                names.update(p.relative_to(r).as_posix() for p in r.rglob("*.j2") if p.is_file())
        return sorted(names)

    def refresh(self) -> list[TemplateEvent]:
        """Look at every template file now (and every one seen before); load what changed.

        The events say what happened, one log line each. ``serve`` calls this every second
        for ``intake status``; rendering itself looks at a file at most ``LOOKUP_TTL`` late.
        """
        names = set(self.files()) | set(self._slots)
        # Layouts and partials first: the templates that use them are tried with their new version.
        ordered = sorted(names, key=lambda n: (not Path(n).name.startswith("_"), n))
        events = []
        for name in ordered:
            with self._lock:
                slot = self._slots.setdefault(name, _Slot(name))
                slot.looked = time.monotonic()
                event = self._look(slot)
            if event is not None:
                events.append(event)
        return events

    def problems(self) -> list[TemplateProblem]:
        """Why some templates do not render as their files say (refused, failed, ran away)."""
        return [s.problem for _, s in sorted(self._slots.items()) if s.problem is not None]

    def overrides(self) -> list[str]:
        """Template names whose version in use comes from the configured folder (not the shipped ones)."""
        root = str(self.path)
        return sorted(n for n, s in self._slots.items()
                      if s.current is not None and s.current.file.startswith(root + os.sep))

    def take_failures(self) -> list[TemplateProblem]:
        """Send-time failures (and runaways) since the last call, for ``intake status``."""
        with self._lock:
            out, self._failures = self._failures, []
        return out

    def check(self, sample: Callable[[str, str], Mapping[str, Any]], languages: tuple[str, ...] = ("ja", "en"),
              brands: tuple[str, ...] = ()) -> tuple[int, list[str]]:
        """Render every template file with sample data, each within the budget; (files
        rendered, error lines).

        ``sample(name, language)`` gives the context for a template name. Also reports a
        template of :data:`TEMPLATE_NAMES` that has no file for a language.
        """
        errors: list[str] = []
        rendered = 0
        for rel in self.files():
            if Path(rel).name.startswith("_"):
                # Layouts and partials are rendered through the others; here they must compile.
                problem = self._slot(rel, force=True).problem
                if problem is not None:
                    errors.append(problem.error)
                continue
            parts = rel.split("/")
            name = parts[-1].removesuffix(".j2").rsplit(".", 1)[0]
            lang = parts[-2] if len(parts) >= 2 else self.default_language
            try:
                self.render_file(rel, sample(name, lang))
                rendered += 1
            except TemplateError as exc:
                errors.append(str(exc))
            except TypeError as exc:
                errors.append(f"{self.file_of(rel)}:1: {exc}")
        for lang in languages:
            for name in TEMPLATE_NAMES:
                for brand in (None, *brands):
                    try:
                        self.find(name, lang, brand)
                    except TemplateError as exc:
                        errors.append(str(exc))
        return rendered, list(dict.fromkeys(errors))


def _nl2br(value: Any) -> Markup:
    """Text for an HTML part: escaped, with its line breaks kept as ``<br>``."""
    return Markup("<br>\n").join(escape(line) for line in str(value).split("\n"))


def _where(file: str) -> tuple[str, int | None]:
    """(file, line) of the template code that raised the exception being handled: the
    innermost template frame (a layout's, when the error is in the layout), else ``file``
    without a line. Jinja rewrites tracebacks to show template files and lines."""
    for frame in reversed(traceback.extract_tb(sys.exc_info()[2])):
        if frame.filename.endswith(".j2"):
            return frame.filename, frame.lineno
    return file, None
