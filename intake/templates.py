"""Mail templates: ``templates/[BRAND/]LANG/NAME.txt.j2`` (+ ``NAME.html.j2``), rendered safely.

The only module that imports Jinja. Templates run in Jinja's immutable sandbox with
``StrictUndefined`` (a typo in a variable name is an error, not an empty string), see
only plain data (dicts, lists, strings, numbers: never ORM objects, whose public methods
the sandbox would still let a template call), and may not produce more than a configured
number of characters. HTML parts are autoescaped, text parts are not. The first line of a
text template, ``Subject: …``, is the mail's subject.

Every error names the template file and line: ``templates/ja/ack.txt.j2:3: 'case' has no
attribute 'numbr'``.
"""

from __future__ import annotations

import operator
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from jinja2 import (
    ChoiceLoader,
    FileSystemLoader,
    StrictUndefined,
    TemplateError as JinjaTemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
)
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

#: Seconds a template file lookup is reused: a new or removed file is noticed after this
#: (a changed file at once: Jinja checks its modification time at every render).
LOOKUP_TTL = 2.0

#: Shipped templates, used for any template the configured folder does not have.
SHIPPED = TEMPLATES

_PLAIN = (str, int, float, bool, type(None), datetime, date)


class TemplateError(Exception):
    """A template that cannot be loaded or rendered; the message reads ``file:line: reason``."""

    def __init__(self, file: str, line: int | None, reason: str) -> None:
        self.file, self.line, self.reason = file, line, reason
        super().__init__(f"{file}:{line or 1}: {reason}")


@dataclass(frozen=True)
class Rendered:
    """A rendered mail: subject, text part, optional HTML part and the files used."""

    subject: str
    text: str
    html: str | None
    files: tuple[str, ...]


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with ``*`` and ``**`` capped so ``'x' * 50_000_000`` is refused early."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, max_output: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.max_output = max_output

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.max_output:
                    raise OverflowError(f"repetition would make {len(seq) * n} items (limit {self.max_output})")
        if op == "**" and isinstance(right, int) and abs(right) > 100:
            raise OverflowError(f"exponent {right} is too large")
        return {"*": operator.mul, "**": operator.pow}[op](left, right)


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


class TemplateSet:
    """The templates of one installation: lookup with fallbacks, sandboxed rendering.

    Lookup order for ``NAME`` in language ``LANG`` and brand ``BRAND``:
    ``BRAND/LANG``, ``LANG``, ``BRAND/DEFAULT``, ``DEFAULT`` — the customer's language
    matters more than the brand's look. The configured folder comes first, then the
    shipped templates. Changed files are picked up without a restart (new or removed
    files within ``LOOKUP_TTL`` seconds).
    """

    def __init__(self, path: str | Path, default_language: str = "ja", max_output: int = 256 * 1024,
                 *, shipped: Path | None = SHIPPED) -> None:
        self.path = Path(path)
        self.default_language = default_language
        self.max_output = max_output
        self.roots = [self.path] + ([shipped] if shipped and shipped.resolve() != self.path.resolve() else [])
        loaders = [FileSystemLoader(str(r), encoding="utf-8") for r in self.roots if r.is_dir()]
        self.env = _Sandbox(
            max_output,
            loader=ChoiceLoader(loaders),
            undefined=StrictUndefined,
            autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
            keep_trailing_newline=True,
            auto_reload=True,
        )
        self.env.filters["nl2br"] = _nl2br
        self._located: dict[str, tuple[float, str | None]] = {}

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

    def _locate(self, name: str) -> str | None:
        """The file of a template name, first root first; looked up again after ``LOOKUP_TTL``."""
        now = time.monotonic()
        hit = self._located.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = next((str(r / name) for r in self.roots if (r / name).is_file()), None)
        self._located[name] = (now + LOOKUP_TTL, found)
        return found

    def _exists(self, name: str) -> bool:
        return self._locate(name) is not None

    def file_of(self, name: str) -> str:
        return self._locate(name) or str(self.path / name)

    # -- rendering ----------------------------------------------------------------------

    def render(self, name: str, context: Mapping[str, Any], *, language: str | None = None,
               brand: str | None = None) -> Rendered:
        """Render template ``name`` (text, and HTML when there is one) with plain data."""
        _check_plain(context)
        txt, html, _ = self.find(name, language, brand)
        text_out = self._render_file(txt, context)
        subject, body = self._split_subject(txt, text_out)
        html_out = None
        if html is not None:
            html_out = self._render_file(html, context)
            if html_out.startswith("Subject:"):
                html_out = html_out.split("\n", 1)[1] if "\n" in html_out else ""
        return Rendered(subject, body, html_out, tuple(self.file_of(f) for f in (txt, html) if f))

    def render_file(self, name: str, context: Mapping[str, Any]) -> Rendered:
        """Render one given text template file (relative name), for ``intake templates check``."""
        _check_plain(context)
        out = self._render_file(name, context)
        if name.endswith(".html.j2"):
            return Rendered("", "", out, (self.file_of(name),))
        subject, body = self._split_subject(name, out)
        return Rendered(subject, body, None, (self.file_of(name),))

    def _render_file(self, name: str, context: Mapping[str, Any]) -> str:
        file = self.file_of(name)
        try:
            template = self.env.get_template(name)
        except TemplateSyntaxError as exc:
            raise TemplateError(exc.filename or file, exc.lineno, exc.message or str(exc)) from None
        except TemplateNotFound:
            raise TemplateError(file, None, "template not found") from None
        except UnicodeDecodeError as exc:
            raise TemplateError(file, None, f"not UTF-8: {exc.reason}") from None
        parts: list[str] = []
        size = 0
        try:
            for chunk in template.generate(**context):
                size += len(chunk)
                if size > self.max_output:
                    raise TemplateError(file, _template_line(file), f"output larger than {self.max_output} characters")
                parts.append(chunk)
        except TemplateError:
            raise
        except (JinjaTemplateError, Exception) as exc:  # noqa: BLE001 - any render error names file:line
            raise TemplateError(file, _template_line(file), f"{type(exc).__name__}: {exc}") from None
        return "".join(parts)

    def _split_subject(self, name: str, out: str) -> tuple[str, str]:
        first, _, rest = out.partition("\n")
        if not first.startswith("Subject:"):
            raise TemplateError(self.file_of(name), 1, "the first line must be 'Subject: …'")
        subject = first[len("Subject:"):].strip()
        if not subject:
            raise TemplateError(self.file_of(name), 1, "the subject is empty")
        if rest.startswith("\n"):  # one blank line after the subject is layout, not body
            rest = rest[1:]
        return subject, rest

    # -- check --------------------------------------------------------------------------

    def files(self) -> list[str]:
        """Every template file (relative names) in the configured folder and the shipped ones."""
        names: set[str] = set()
        for r in self.roots:
            if r.is_dir():
                # Files starting with "_" are layouts and partials, rendered through the others.
                names.update(str(p.relative_to(r)) for p in r.rglob("*.j2")
                             if p.is_file() and not p.name.startswith("_"))
        return sorted(names)

    def check(self, sample: Callable[[str, str], Mapping[str, Any]], languages: tuple[str, ...] = ("ja", "en"),
              brands: tuple[str, ...] = ()) -> tuple[int, list[str]]:
        """Render every template file with sample data; (files rendered, error lines).

        ``sample(name, language)`` gives the context for a template name. Also reports a
        template of :data:`TEMPLATE_NAMES` that has no file for a language.
        """
        errors: list[str] = []
        rendered = 0
        for rel in self.files():
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


def _template_line(file: str) -> int | None:
    """The template line of the exception being handled (Jinja rewrites its traceback)."""
    import sys

    tb = sys.exc_info()[2]
    line = None
    for frame in traceback.extract_tb(tb):
        if frame.filename == file:
            line = frame.lineno
    return line
