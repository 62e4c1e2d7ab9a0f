"""The header section of a mail: read leniently, decoded in time linear in its size. Pure.

``recover_header`` finds the fields that a lenient reader sees in a broken header section
(a fold that lost its indentation, junk lines or an mbox ``From `` line before the
fields, no blank line before the body) and returns bytes the standard library parser
reads the same way, with every repair listed as a defect. ``decode_words`` decodes RFC
2047 encoded words; the standard library's ``email.header.decode_header`` is quadratic
in the number of words (100,000 words took 31 s), this one is linear.
"""

from __future__ import annotations

import binascii
import quopri
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from intake.mail import charsets

# Sane limits for one mail's header. Real headers are a few KB (a long To: list some
# 100 KB); beyond these a header is hostile or broken, and is cut with a defect.
MAX_HEADER_BYTES = 4 * 1024 * 1024  # the whole top-level header section
MAX_HEADER_FIELDS = 10_000  # fields of the top-level header
MAX_FIELD_CHARS = 256 * 1024  # one field's value, as decoded
MAX_ENCODED_WORDS = 1_000  # encoded words decoded in one field
# Lines without a colon read as a broken fold only when a field follows within this many.
_MAX_FOLD_LINES = 50
# Lines before the first field that are skipped as junk ("---- Original message ----").
_MAX_JUNK_LINES = 5

_FIELD_LINE = re.compile(rb"([!-9;-~]+)([ \t]*):")
_BLANK_LINE = re.compile(rb"\n\r?\n")
# A line that is neither a field nor a continuation: the header needs the careful reading.
_ODD_LINE = re.compile(rb"\n(?![ \t]|[!-9;-~]+:(?!//)|\Z)")  # "https://…" at a line's start is odd too
_LINE = re.compile(rb"[^\n]*(?:\n|$)")
_MBOX_FROM = re.compile(rb"From (\S*)")
# Field names that make a colon line a header field rather than body text ("Regards:").
_HEADER_NAMES = frozenset(
    b"from to cc bcc subject date sender received references comments keywords importance "
    b"priority organization organisation encrypted sensitivity precedence status lines path "
    b"newsgroups xref approved expires".split()
)
# At least one of these makes lines after junk a real header section.
_KEY_FIELDS = frozenset(
    b"from to cc subject date message-id received return-path mime-version content-type sender "
    b"reply-to delivered-to".split()
)


@dataclass
class RecoveredHeader:
    """The mail as the standard library should read it, and what was repaired."""

    data: bytes
    defects: list[str] = field(default_factory=list)
    # The sender named by an mbox "From " line, if the mail starts with one.
    mbox_sender: str = ""
    # True when a blank line ends the header section: the body is what follows it.
    clean_boundary: bool = True


def recover_header(raw: bytes) -> RecoveredHeader:
    """Read the top-level header section of ``raw`` leniently. Linear; never raises.

    Mail whose header is well formed comes back unchanged (one regex scan decides).
    """
    blank = _BLANK_LINE.search(raw)
    head_end = blank.start() + 1 if blank else len(raw)
    first = _FIELD_LINE.match(raw)
    if (
        first is not None
        and not first.group(2)  # "Subject :" (later lines: _ODD_LINE)
        and not raw.startswith(b"From ")
        and head_end <= MAX_HEADER_BYTES
        and _ODD_LINE.search(raw, 0, head_end) is None
        and raw.count(b"\n", 0, head_end) <= MAX_HEADER_FIELDS
    ):
        return RecoveredHeader(raw, clean_boundary=blank is not None)
    if b"\n" not in raw:
        # Bare-CR or one-line mail: the standard library's reading stands.
        return RecoveredHeader(raw, clean_boundary=blank is not None)
    return _Recovery(raw).run()


class _Recovery:
    """One pass over the header lines; continuation decisions wait for the next field."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.defects: list[str] = []
        self.fields: list[list[bytes]] = []  # each field: its lines, endings included
        self.size = 0
        self.cut = False
        self.eol = b"\r\n" if raw[: raw.find(b"\n") + 1].endswith(b"\r\n") else b"\n"

    def run(self) -> RecoveredHeader:
        raw = self.raw
        lines = _LINE.finditer(raw)
        mbox_sender = ""
        first = next(lines)
        line = first.group()
        if line.startswith(b"From ") and not _FIELD_LINE.match(line):
            m = _MBOX_FROM.match(line)
            mbox_sender = m.group(1).decode("ascii", "surrogateescape") if m else ""
            if mbox_sender == "-":  # Thunderbird's mbox files name no sender
                mbox_sender = ""
            self.defects.append(f"headers: mbox 'From ' line skipped (envelope sender {mbox_sender or 'none'})")
            first = next(lines, None)
            if first is None:
                return RecoveredHeader(b"", self.defects, mbox_sender, clean_boundary=False)
        start = first.start()
        junk = self._junk(start)
        if junk is None:
            # No header section at all: the standard library reads it all as body.
            return RecoveredHeader(raw[start:], self.defects, mbox_sender, clean_boundary=False)
        body_start, clean = self._fields(junk)
        if junk > start:
            skipped = raw[start:junk].decode("utf-8", "replace").strip().splitlines()
            self.defects.append(
                f"headers: {len(skipped)} line(s) before the header skipped: {skipped[0][:80]!r}"
                if skipped else "headers: blank line(s) before the header skipped"
            )
        if not self.fields:
            return RecoveredHeader(raw[start:], self.defects, mbox_sender, clean_boundary=False)
        head = b"".join(line for f in self.fields for line in f)
        if not head.endswith(b"\n"):
            head += self.eol
        return RecoveredHeader(head + self.eol + raw[body_start:], self.defects, mbox_sender, clean)

    def _junk(self, start: int) -> int | None:
        """Where the fields begin: ``start``, or after a few junk lines; None when no
        header section follows."""
        pos = start
        for _ in range(_MAX_JUNK_LINES + 1):
            m = _FIELD_LINE.match(self.raw, pos)
            if m is not None:
                break
            nl = self.raw.find(b"\n", pos)
            if nl < 0:
                return None
            pos = nl + 1
        else:
            return None
        if pos == start:
            return pos
        # Junk before it: only when real header fields follow (two lines, one well known).
        names = []
        for n, line in enumerate(_LINE.finditer(self.raw, pos)):
            text = line.group()
            if text.strip() == b"" or n >= 100:
                break
            fm = _FIELD_LINE.match(text)
            if fm is not None:
                names.append(fm.group(1).lower())
        return pos if len(names) >= 2 and _KEY_FIELDS.intersection(names) else None

    def _fields(self, pos: int) -> tuple[int, bool]:
        """Collect fields from ``pos``; returns (where the body starts, clean boundary)."""
        raw = self.raw
        pending: list[tuple[int, bytes]] = []  # lines of no field, waiting for a verdict
        for m in _LINE.finditer(raw, pos):
            line = m.group()
            if not line:
                break
            if line in (b"\n", b"\r\n"):
                if pending and _fold_before_blank(self.fields[-1], pending):
                    self._join(pending)
                    return m.end(), True
                if pending:
                    self._missing_separator(pending[0][0])
                    return pending[0][0], False
                return m.end(), True
            if line[0] in b" \t":
                if pending:
                    pending.append((m.start(), line))
                elif self.fields:
                    self._add(line, new=False)
                continue
            fm = _FIELD_LINE.match(line)
            if fm is not None and line[fm.end():fm.end() + 2] == b"//":
                fm = None  # "https://…": a URL wrapped onto a line of its own, not a field
            if fm is not None and (not pending or _header_like(fm.group(1))):
                if pending:
                    self._join(pending)
                    pending = []
                if len(self.fields) >= MAX_HEADER_FIELDS or self.cut:
                    return self._cut(m.start())
                if fm.group(2):
                    # RFC 5322 4.5 allows white space before the colon; the stdlib would
                    # take the line for the end of the header.
                    line = fm.group(1) + line[fm.end(2) :]
                self._add(line, new=True)
                continue
            if not self.fields:
                return m.start(), False
            pending.append((m.start(), line))
            if len(pending) > _MAX_FOLD_LINES:
                break
        if pending:
            self._missing_separator(pending[0][0])
            return pending[0][0], False
        return len(raw), False

    def _add(self, line: bytes, new: bool) -> None:
        if self.cut:
            return
        if self.size + len(line) > MAX_HEADER_BYTES:
            # The line that crosses the limit keeps its beginning: a huge Subject is cut,
            # not lost.
            self.cut = True
            self.defects.append(f"headers: longer than {MAX_HEADER_BYTES // 1024 // 1024} MB; the rest was cut")
            line = line[: MAX_HEADER_BYTES - self.size].rstrip(b"\r\n") + self.eol
        self.size += len(line)
        if new:
            self.fields.append([line])
        else:
            self.fields[-1].append(line)

    def _join(self, pending: list[tuple[int, bytes]]) -> None:
        name = self.fields[-1][0].split(b":", 1)[0].decode("ascii", "replace")
        self.defects.append(f"headers: {len(pending)} unindented line(s) read as a continuation of {name}")
        for _, line in pending:
            self._add(line if line[0] in b" \t" else b" " + line, new=False)

    def _missing_separator(self, at: int) -> None:
        line_no = self.raw.count(b"\n", 0, at) + 1
        self.defects.append(f"headers: no blank line before the body; the body starts at line {line_no}")

    def _cut(self, at: int) -> tuple[int, bool]:
        if not self.cut:
            self.defects.append(f"headers: more than {MAX_HEADER_FIELDS} fields; the rest was cut")
        blank = _BLANK_LINE.search(self.raw, at)
        return (blank.end(), True) if blank else (len(self.raw), False)


# A field a mail program wraps when it is long, breaking the fold on the way.
_WRAPPED_FIELDS = frozenset(b"subject from to cc reply-to".split())


def _fold_before_blank(field: list[bytes], pending: list[tuple[int, bytes]]) -> bool:
    """Lines of no field right before the blank line: the end of a long Subject (or address
    list) wrapped without indentation, rather than a body with no blank line before it,
    when there are at most two of them, short, after a long line of such a field."""
    name = field[0].split(b":", 1)[0].strip().lower()
    return (name in _WRAPPED_FIELDS and len(pending) <= 2 and len(field[-1].rstrip()) >= 60
            and all(len(line.strip()) <= 200 for _, line in pending))


def _header_like(name: bytes) -> bool:
    """A field name that ends a broken fold: well known, or hyphenated like most fields."""
    lower = name.lower()
    return lower in _HEADER_NAMES or (b"-" in lower and re.fullmatch(rb"[a-z0-9-]+", lower) is not None)


# RFC 2047 encoded word. The encoded text stops at the next "?" (RFC 2047 allows none
# in it): every start position then scans its own stretch of the value, so the scan is
# linear even over thousands of unterminated words.
_ENCODED_WORD = re.compile(r"=\?([^?]*)\?([bBqQ])\?([^?]*)\?=")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


def decode_words(
    value: str,
    defects: list[str] | None = None,
    where: str = "",
    hints: Iterable[str] = (),
    max_words: int = MAX_ENCODED_WORDS,
) -> str:
    """Decode the RFC 2047 encoded words of an unfolded header value (linear time).

    Adjacent words are joined before their charset is applied, so a character split
    across two words survives; white space between two encoded words goes. Text
    outside words is raw header text (``charsets.decode_raw_header``). A word that does
    not decode stays as written, and at most ``max_words`` are decoded.
    """
    # The stdlib's decode_header() is quadratic (it concatenates bytes word by word,
    # deletes from a list in a loop, and its word pattern rescans to the end of the
    # value from every unclosed "=?"): this is the same reading, built from joins.
    out: list[str] = []
    run_charset: str | None = None
    run: list[bytes] = []
    pos = 0
    count = 0

    def flush() -> None:
        nonlocal run_charset, run
        if run_charset is not None:
            out.append(charsets.decode(b"".join(run), run_charset, defects, where, hints)[0])
        run_charset, run = None, []

    for m in _ENCODED_WORD.finditer(value):
        count += 1
        if count > max_words:
            if defects is not None:
                defects.append(f"{where}more than {max_words} encoded words; the rest was cut")
            flush()
            return "".join(out)
        between = value[pos : m.start()]
        pos = m.end()
        if between and not (run_charset is not None and between.isspace()):
            flush()
            out.append(charsets.decode_raw_header(between, hints, defects, where))
        data = _word_bytes(m.group(2), m.group(3))
        charset = charsets.normalize_charset(m.group(1)) or "us-ascii"
        if data is None:
            if defects is not None:
                defects.append(f"{where}undecodable encoded word kept as written: {m.group()[:60]!r}")
            flush()
            out.append(m.group())
            continue
        if charset != run_charset:
            flush()
            run_charset = charset
        run.append(data)
    flush()
    if pos < len(value):
        out.append(charsets.decode_raw_header(value[pos:], hints, defects, where))
    return "".join(out)


def _word_bytes(encoding: str, text: str) -> bytes | None:
    """The bytes of one encoded word's text, or None when they cannot be recovered."""
    # 8-bit bytes inside a word (surrogate-escaped by the parser) are kept as they were;
    # text already decoded (a display name) goes back as UTF-8.
    data = text.encode("utf-8", "surrogateescape")
    if encoding in "qQ":
        return quopri.decodestring(data, header=True)
    data = _NOT_BASE64.sub(b"", data)
    data += b"=" * (-len(data) % 4)
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        return None


def cut_value(value: str, defects: list[str] | None, where: str) -> str:
    """A header value no longer than ``MAX_FIELD_CHARS``, with a defect when it was cut."""
    if len(value) <= MAX_FIELD_CHARS:
        return value
    if defects is not None:
        defects.append(f"{where}{len(value)} characters long; cut at {MAX_FIELD_CHARS}")
    return value[:MAX_FIELD_CHARS]
