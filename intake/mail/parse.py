"""Raw bytes → ParsedMail: headers, charsets, text/html, attachments. Pure.

MIME structure and RFC 2231 come from the standard library (``email`` with
``policy.compat32``, the fastest and most forgiving); a broken header section is first
read leniently and RFC 2047 words are decoded in linear time (``intake.mail.headers``);
every byte-to-text step goes through our charset layer (``intake.mail.charsets``) because
the codecs alone mis-decode everyday Japanese mail. Parsing never raises on bad input:
what was wrong, and what was repaired, is listed in ``ParsedMail.defects``.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from collections.abc import Iterable
from email import errors, utils
from email.feedparser import BytesFeedParser
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses, parsedate_to_datetime
from html.parser import HTMLParser
from io import BytesIO
from urllib.parse import unquote_to_bytes

from intake.mail import charsets
from intake.mail.headers import cut_value, decode_words, recover_header


@dataclass(frozen=True)
class Address:
    """A mail address with its decoded display name; ``address`` is as written."""

    name: str
    address: str

    @property
    def key(self) -> str:
        """Lower-cased address for comparisons."""
        return self.address.lower()

    @property
    def domain(self) -> str:
        """The lower-cased domain; empty for a local part alone (``MAILER-DAEMON``)."""
        local, at, domain = self.address.rpartition("@")
        return domain.lower() if at else ""

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "address": self.address}


@dataclass(frozen=True)
class Attachment:
    """An attachment, inline image or attached message.

    ``filename`` is never empty: the name the mail gives (``name_given``), else one made
    for it: an attached message's subject + ``.eml``, a file-like Content-ID, or
    ``attachment-N`` with the extension of its type.
    """

    filename: str
    content_type: str
    size: int
    sha256: str
    inline: bool
    content_id: str | None
    payload: bytes = field(repr=False)
    name_given: bool = True

    @property
    def display_name(self) -> str:
        """A name to show and save under (the store keeps this one)."""
        return self.filename or f"attachment{_extension(self.content_type)}"


@dataclass
class ParsedMail:
    """What intake sees in one message."""

    message_id: str
    message_id_synthesised: bool
    subject: str
    from_: Address | None
    to: list[Address]
    cc: list[Address]
    reply_to: list[Address]
    date: datetime | None
    in_reply_to: list[str]
    references: list[str]
    text: str
    html: str | None
    attachments: list[Attachment]
    defects: list[str]
    charsets: list[str]
    content_type: str
    headers: list[tuple[str, str]]
    # The decoded From text when it holds no usable address (``from_`` is then None, or
    # the sender found elsewhere: see ``sender_source``).
    from_display: str = ""
    # Where ``from_`` comes from: "from", "sender", "reply-to", "return-path", "mbox"
    # (the mbox "From " line), "envelope" (the SMTP/LMTP MAIL FROM), or "" (no sender).
    sender_source: str = ""

    def header(self, name: str) -> str | None:
        """First decoded value of a header, or ``None``."""
        # Classification asks for a dozen headers per message: index them once.
        index = self.__dict__.get("_index")
        if index is None:
            index = {}
            for k, v in self.headers:
                index.setdefault(k.lower(), v)
            self.__dict__["_index"] = index
        return index.get(name.lower())

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    @property
    def language(self) -> str:
        return detect_language(self.subject + "\n" + self.text)


_MSGID = re.compile(r"<([^<>\s]+)>")


# Message-IDs we make up for mail that has none; never to be shown to other mail systems.
SYNTHESISED_DOMAIN = "synthesised.intake.invalid"


def is_synthesised_id(message_id: str) -> bool:
    """True for a Message-ID that intake synthesised (not one any mail client knows)."""
    return message_id.endswith("@" + SYNTHESISED_DOMAIN)


def parse(raw: bytes, *, envelope_from: str | None = None) -> ParsedMail:
    """Parse raw message bytes. Never raises for malformed mail.

    ``envelope_from`` is the SMTP/LMTP MAIL FROM the mail came with, the last place a
    sender is looked for when the header names none.
    """
    recovered = recover_header(raw)
    data = recovered.data
    defects: list[str] = list(recovered.defects)
    try:
        msg = _read_mime(_within_part_limit(data, defects), defects)
        defects += [f"headers: {type(d).__name__}" for d in msg.defects]
    except RecursionError:
        # Thousands of nested parts exhaust the stdlib parser: keep the header, and the
        # body as one attachment.
        msg = _header_only(data)
        defects.append("MIME parts nested too deep to read: the body is kept as one attachment")
    # Raw 8-bit header text is read in the light of the charsets the mail declares.
    hints = charsets.CharsetHints(lambda: _declared_charsets(data), sample=lambda: _raw_8bit_header(msg))
    body = _Body(defects, hints)
    body.walk(msg)

    # raw_items(): compat32 would turn raw 8-bit values into lossy Header objects.
    raw_headers = [(k, str(v)) for k, v in msg.raw_items()]
    headers = [(k, decode_header_value(v, defects, hints, where=f"{k.lower()}: ")) for k, v in raw_headers]
    lowered = [(k.lower(), v) for k, v in raw_headers]
    hdr: dict[str, str] = {}  # first raw value of each header
    decoded: dict[str, str] = {}  # and its decoded text
    for (k, v), (_, text) in zip(lowered, headers):
        if k not in hdr:
            hdr[k] = v
            decoded[k] = text
    if len(hdr) < len(lowered):
        _note_repeated_fields(lowered, defects)

    # Message-IDs may carry raw UTF-8 (RFC 6532): decoded like every other header.
    mid = _first_id(charsets.decode_raw_header(hdr.get("message-id", ""), hints))
    synthesised = False
    if mid is None:
        mid = _synthesise_message_id(raw, hdr, recovered.clean_boundary)
        synthesised = True
        defects.append("no Message-ID: synthesised from the content")

    text = body.text
    if not text.strip() and body.html:
        text = html_to_text(body.html, defects)

    sender, source, from_display = _sender(lowered, defects, hints, recovered.mbox_sender, envelope_from)
    return ParsedMail(
        message_id=mid,
        message_id_synthesised=synthesised,
        subject=_clean_subject_whitespace(decoded.get("subject", "")),
        from_=sender,
        to=_addresses(lowered, "to", defects, hints)[0],
        cc=_addresses(lowered, "cc", defects, hints)[0],
        reply_to=_addresses(lowered, "reply-to", defects, hints)[0],
        date=_date(hdr.get("date"), defects),
        in_reply_to=_ids(charsets.decode_raw_header(hdr.get("in-reply-to", ""), hints)),
        references=_ids(charsets.decode_raw_header(" ".join(v for k, v in lowered if k == "references"), hints)),
        text=text,
        html=body.html,
        attachments=_named(body.attachments),
        # The same repair can be met twice (a From value is read as a header and as an
        # address list): each is listed once.
        defects=list(dict.fromkeys(defects)),
        charsets=sorted(body.charsets),
        content_type=msg.get_content_type(),
        headers=headers,
        from_display=from_display,
        sender_source=source,
    )


# Bounded cost (issue 14): the stdlib makes a Message per part and a tuple per header
# field, ~10 µs and ~300 bytes each. A 25 MB mail can hold millions of empty parts or of
# fields in one part's header; real mail has tens of parts and fields.
MAX_BOUNDARY_LINES = 20_000  # "--…" lines: each part has one, plus the closing ones
MAX_PART_FIELDS = 1_000  # header lines of one part


def _within_part_limit(data: bytes, defects: list[str]) -> bytes:
    """The mail up to its ``MAX_BOUNDARY_LINES``-th line starting ``--`` (a part's
    boundary): more parts than that are not read (the raw message keeps them)."""
    if data.count(b"\n--") <= MAX_BOUNDARY_LINES:
        return data
    at = -1
    for _ in range(MAX_BOUNDARY_LINES + 1):
        at = data.find(b"\n--", at + 1)
    defects.append(f"more than {MAX_BOUNDARY_LINES:,} MIME boundary lines: the parts after them are not read "
                   "(the raw message keeps them)")
    return data[:at + 1]


class _BoundedFeedParser(BytesFeedParser):
    """The stdlib's parser with at most ``MAX_PART_FIELDS`` header lines kept per part."""

    cut: int = 0  # the longest part header cut

    def _parse_headers(self, lines: list[str]) -> None:  # the stdlib's own step, once per part
        # The mail's own header is bounded already (headers.MAX_HEADER_FIELDS, recover_header).
        if len(lines) > MAX_PART_FIELDS and len(self._msgstack) > 1:
            self.cut = max(self.cut, len(lines))
            del lines[MAX_PART_FIELDS:]
        super()._parse_headers(lines)


def _read_mime(data: bytes, defects: list[str] | None = None) -> Message:
    """The stdlib's reading of a mail (compat32), fed in chunks.

    ``email.message_from_bytes`` reads through a StringIO, which holds every character
    in 4 bytes: 100 MB more for a 25 MB mail. The parser itself is fed in chunks anyway.
    """
    parser = _BoundedFeedParser(policy=compat32)
    for start in range(0, len(data), _FEED_CHUNK):
        parser.feed(data[start : start + _FEED_CHUNK])
    msg = parser.close()
    if parser.cut and defects is not None:
        defects.append(f"a part's header of {parser.cut:,} lines: the first {MAX_PART_FIELDS:,} read")
    return msg


_FEED_CHUNK = 64 * 1024
_END_OF_HEADER = re.compile(rb"\n\r?\n")


def _header_only(data: bytes) -> Message:
    """The header of a mail whose MIME tree cannot be read, with the whole body as one
    opaque part (its bytes as they are)."""
    end = _END_OF_HEADER.search(data)
    head, body = (data[: end.end()], data[end.end() :]) if end else (data, b"")
    msg = BytesParser(policy=compat32).parsebytes(head, headersonly=True)
    del msg["content-type"]
    del msg["content-transfer-encoding"]
    msg["Content-Type"] = "application/octet-stream"
    msg.set_payload(body.decode("ascii", "surrogateescape"))
    return msg


_DECLARED = re.compile(
    rb"charset\s*=\s*[\"']?([A-Za-z0-9_.:+-]+)|=\?([A-Za-z0-9_.:+-]+)(?:\*[A-Za-z-]*)?\?[BbQq]\?"
    rb"|\*=\s*\"?([A-Za-z0-9_.:+-]+)'",
    re.I,
)


def _raw_8bit_header(msg: Message) -> bytes:
    """The mail's raw 8-bit header values (undecoded bytes), joined: one sample for the
    charset detector."""
    out = []
    for _, value in msg.raw_items():
        value = str(value)
        if not value.isascii():
            try:
                out.append(value.encode("ascii", "surrogateescape"))
            except UnicodeEncodeError:
                continue  # real text already
    return b" ".join(out)


def _declared_charsets(data: bytes) -> list[str]:
    """Every charset the mail names (parameters, encoded words, RFC 2231), in order."""
    return [next(g for g in m.groups() if g).decode("ascii") for m in _DECLARED.finditer(data)]


# Fields a mail has once (RFC 5322 3.6); of two, the first is read. To, Cc and
# References are read from all their fields.
_SINGLE_FIELDS = {
    "from": "From", "sender": "Sender", "reply-to": "Reply-To", "subject": "Subject", "date": "Date",
    "message-id": "Message-ID", "in-reply-to": "In-Reply-To", "content-type": "Content-Type",
    "content-transfer-encoding": "Content-Transfer-Encoding", "mime-version": "MIME-Version",
}  # fmt: skip
_MERGED_FIELDS = {"to": "To", "cc": "Cc", "references": "References"}


def _note_repeated_fields(lowered: list[tuple[str, str]], defects: list[str]) -> None:
    for name, n in Counter(k for k, _ in lowered).items():
        if n < 2:
            continue
        if name in _SINGLE_FIELDS:
            defects.append(f"headers: {n} {_SINGLE_FIELDS[name]} fields; the first is read")
        elif name in _MERGED_FIELDS:
            defects.append(f"headers: {n} {_MERGED_FIELDS[name]} fields; all are read")


# Where a sender is looked for when From names none, in order (ParsedMail.sender_source).
_SENDER_HEADERS = ("sender", "reply-to", "return-path")
_SENDER_LABELS = {"sender": "Sender", "reply-to": "Reply-To", "return-path": "Return-Path",
                  "mbox": "the mbox 'From ' line", "envelope": "the SMTP envelope"}


def _sender(
    lowered: list[tuple[str, str]],
    defects: list[str],
    hints: Iterable[str],
    mbox_sender: str,
    envelope_from: str | None,
) -> tuple[Address | None, str, str]:
    """(sender, where it was found, the From text when it holds no address)."""
    found, display = _addresses(lowered, "from", defects, hints, with_display=True)
    if found:
        return found[0], "from", display
    sender: Address | None = None
    source = ""
    for name in _SENDER_HEADERS:
        candidates = _addresses(lowered, name, defects, hints)[0]
        if candidates:
            sender, source = candidates[0], name
            break
    else:
        for source, value in (("mbox", mbox_sender), ("envelope", envelope_from)):
            address = (value or "").strip().strip("<>").strip()
            if address:
                sender = Address(name="", address=address)
                break
    if sender is None:
        return None, "", display
    if not sender.name and display:
        # From named the person without an address: the name stays theirs.
        sender = Address(name=display, address=sender.address)
    has_from = any(k == "from" for k, _ in lowered)
    defects.append(
        f"from: {'no usable address' if has_from else 'missing'}; the sender is taken from {_SENDER_LABELS[source]}"
    )
    return sender, source, display


def decode_header_value(
    value: str | None, defects: list[str] | None = None, hints: Iterable[str] = (), where: str = "header: "
) -> str:
    """Decode a header value: RFC 2047 words in any charset, raw 8-bit or JIS text.

    ``hints`` are the charsets the message declares, used for raw 8-bit text that is
    not UTF-8; ``where`` starts each defect recorded. A value longer than
    ``headers.MAX_FIELD_CHARS`` is cut (with a defect).
    """
    if value is None:
        return ""
    value = cut_value(_unfold(str(value)), defects, where)
    if "=?" not in value:
        return charsets.decode_raw_header(value, hints, defects, where).strip()
    return decode_words(value, defects, where, hints).strip()


def _unfold(value: str) -> str:
    # RFC 5322 unfolding removes the line breaks and keeps the white space after them.
    if "\n" not in value and "\r" not in value:
        return value
    return value.replace("\r", "").replace("\n", "")


def _clean_subject_whitespace(value: str) -> str:
    """A one-line header value: line breaks an encoded word smuggled in become spaces."""
    return _CONTROL.sub("", _BREAKS.sub(" ", value)).strip()


_BREAKS = re.compile(r"[\r\n]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _addresses(
    lowered: list[tuple[str, str]],
    name: str,
    defects: list[str],
    hints: Iterable[str],
    with_display: bool = False,
) -> tuple[list[Address], str]:
    """The addresses of one header kind, and (when asked) the text of a header that held none.

    A local part alone (``MAILER-DAEMON``, ``<moderator>``) is an address as written; a
    phrase without an address (``From: Taro Yamada``) is display text.
    """
    where = f"{name}: "
    values = []
    for k, v in lowered:
        if k == name:
            # Raw 8-bit and JIS text is decoded first: its bytes may look like the
            # address syntax (ESC ( B opens a comment, a Shift_JIS byte is a backslash).
            values.append(charsets.decode_raw_header(cut_value(_unfold(v), defects, where), hints, defects, where))
    out: list[Address] = []
    display = ""
    for text, addr in getaddresses(values):
        addr = addr.strip()
        if addr and "@" not in addr and not _written_alone(addr, values):
            # getaddresses() took the first word of a name for an address: the whole
            # value is the name ("山田 太郎" must not become "山田").
            if defects is not None:
                defects.append(f"{name}: a name without an address: {', '.join(values)[:80]!r}")
            text = next((v for v in values if addr in v), text)
            addr = ""
        if not addr:
            if with_display and not display:
                display = _clean_subject_whitespace(decode_header_value(text, defects, hints, where))
            continue
        display_name = _clean_subject_whitespace(decode_header_value(text, defects, hints, where))
        out.append(Address(name=display_name, address=addr))
    if out:
        display = ""
    return out, display


def _written_alone(local: str, values: list[str]) -> bool:
    """True when ``local`` (plain ASCII, as system senders write) is an address of its own:
    in angle brackets, or the whole value but for a comment. Not when getaddresses() cut
    it from a name ("Taro Yamada" gives "Taro", "Smith, John" gives "Smith" and "John")."""
    if not _LOCAL_PART.fullmatch(local):
        return False
    return any(f"<{local}>" in v.replace(" ", "") or _COMMENT.sub("", v).strip() == local for v in values)


_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
_COMMENT = re.compile(r"\([^()]*\)")


def _ids(value: str) -> list[str]:
    return [m.group(1) for m in _MSGID.finditer(value or "")]


def _first_id(value: str) -> str | None:
    value = str(value or "").strip()
    ids = _ids(value)
    if ids:
        return ids[0]
    # A bare id without angle brackets is still an id.
    bare = value.split()[0] if value.split() else ""
    return bare if "@" in bare else None


def _synthesise_message_id(raw: bytes, hdr: dict[str, str], clean_boundary: bool) -> str:
    if not clean_boundary:
        # No blank line ends the header: which lines are header and which are body is a
        # guess, so every byte counts (web-form mail is all "Name: value" lines).
        whole = hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest()
        return f"{whole[:40]}@{SYNTHESISED_DOMAIN}"
    # From the content, not the trace headers: the same mail relayed twice hashes alike.
    sep = raw.find(b"\r\n\r\n")
    body = raw[sep + 4 :] if sep >= 0 else raw[raw.find(b"\n\n") + 2 :] if b"\n\n" in raw else b""
    h = hashlib.sha256()
    for key in ("from", "to", "date", "subject"):
        h.update(str(hdr.get(key, "")).encode("utf-8", "surrogateescape") + b"\0")
    h.update(body.replace(b"\r\n", b"\n"))
    return f"{h.hexdigest()[:40]}@{SYNTHESISED_DOMAIN}"


def _date(value: str | None, defects: list[str]) -> datetime | None:
    if not value:
        return None
    try:
        dt = parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        defects.append(f"date: unreadable {str(value)[:60]!r}")
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


_ENCODING_DEFECTS = (
    errors.InvalidBase64CharactersDefect,
    errors.InvalidBase64PaddingDefect,
    errors.InvalidBase64LengthDefect,
)
_MAX_DEPTH = 40
_EXACT_ENCODINGS = {"base64", "x-uuencode", "uuencode", "x-uue", "uue"}
_BOUNDARY = re.compile(r"""boundary\s*=\s*(?:"([^"]*)"|([^\s;"]+))""", re.I)


class _Body:
    """Walks the MIME tree once: text, html, attachments and charsets.

    Which parts are the body follows JMAP's rules (RFC 8621 4.1.4), the standard way
    for a program to read a MIME tree: the text/plain and text/html parts that are not
    marked as attachments, in a multipart/related only its first part; of a
    multipart/alternative the plain and the HTML version; every other leaf, and every
    message/* part, is an attachment (a forwarded mail never mixes into the text).
    """

    def __init__(self, defects: list[str], hints: charsets.CharsetHints) -> None:
        self.defects = defects
        self.hints = hints  # the whole mail's declared charsets, for raw 8-bit names
        self.texts: list[str] = []
        self.htmls: list[str] = []
        self.attachments: list[Attachment] = []
        self.charsets: set[str] = set()
        self.declared: list[str] = []

    @property
    def text(self) -> str:
        return "\n".join(self.texts)

    @property
    def html(self) -> str | None:
        return "\n".join(self.htmls) if self.htmls else None

    def walk(self, part: Message, parent: str = "", first: bool = True, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            self.defects.append(f"MIME parts nested deeper than {_MAX_DEPTH}: the rest kept as one attachment")
            self._attach(part)
            return
        ctype = part.get_content_type()
        maintype = part.get_content_maintype()
        if maintype == "message":
            self._attach(part)
            return
        if part.is_multipart():
            children = part.get_payload()
            if not isinstance(children, list):
                return
            if ctype == "multipart/alternative":
                self._walk_alternative(children, depth)
                return
            for i, child in enumerate(children):
                self.walk(child, ctype, i == 0, depth + 1)
            return
        if maintype == "multipart":
            recovered = self._recover_multipart(part)
            if recovered is not None:
                self.walk(recovered, parent, first, depth + 1)
                return
            # A multipart without a parsable boundary: keep its bytes as text.
            self.defects.append(f"{ctype}: no usable boundary, kept as text")
            text, _ = self._text(part)
            if text.strip():
                self.texts.append(text)
            return
        if ctype in ("text/plain", "text/html") and self._is_body(part, parent, first):
            text, clean = self._text(part)
            if clean:
                (self.texts if ctype == "text/plain" else self.htmls).append(text)
                return
            # Broken transfer encoding and bytes no charset reads: garbage, not text.
            self.defects.append(f"{ctype}: undecodable, kept as an attachment")
        self._attach(part)

    def _is_body(self, part: Message, parent: str, first: bool) -> bool:
        if (part.get_content_disposition() or "").lower() == "attachment":
            return False
        if first:
            return True
        return parent != "multipart/related" and self._filename(part) is None

    def _walk_alternative(self, children: list[Message], depth: int) -> None:
        # Each alternative is read on its own; the body takes the first plain version
        # and the first HTML version, attachments come from all of them.
        versions = []
        for child in children:
            sub = _Body(self.defects, self.hints)
            if child.get_content_type() in ("text/plain", "text/html"):
                sub.walk(child, "multipart/alternative", True, depth + 1)
            else:
                sub.walk(child, "multipart/alternative", False, depth + 1)
            versions.append(sub)
            self.attachments.extend(sub.attachments)
            self.charsets |= sub.charsets
            self.declared.extend(c for c in sub.declared if c not in self.declared)
        plain = next((v for v in versions if v.texts), None)
        html = next((v for v in versions if v.htmls), None)
        if plain is not None:
            self.texts.extend(plain.texts)
        if html is not None:
            self.htmls.extend(html.htmls)

    def _recover_multipart(self, part: Message) -> Message | None:
        """Re-read a multipart whose boundary the stdlib missed (folded, or no ``;``)."""
        header = part.get("content-type")
        if header is None or part.is_multipart():
            return None
        try:
            # decode=True gives the original bytes; without it the stdlib would replace
            # every 8-bit byte it cannot read in the declared charset.
            body = part.get_payload(decode=True)
        except Exception:  # noqa: BLE001
            return None
        if not body:
            return None
        payload = body.decode("ascii", "surrogateescape")
        m = _BOUNDARY.search(_unfold(str(header)))
        if m is None:
            return None
        boundary = m.group(1) if m.group(1) is not None else m.group(2)
        if not boundary or boundary == part.get_boundary() or f"--{boundary}" not in payload:
            return None
        self.defects.append(f"{part.get_content_type()}: malformed boundary parameter, read as {boundary!r}")
        rebuilt = f'Content-Type: {part.get_content_type()}; boundary="{boundary}"\n\n'
        return _read_mime(rebuilt.encode("ascii", "replace") + body)

    def _payload(self, part: Message) -> bytes:
        try:
            data = part.get_payload(decode=True)
        except Exception:  # noqa: BLE001 - broken base64/qp: keep the raw text
            data = None
        if data is None:
            raw = part.get_payload()
            if isinstance(raw, list):
                return b"".join(_as_bytes(p) for p in raw if isinstance(p, Message))
            data = str(raw).encode("utf-8", "surrogateescape")
        for d in part.defects:
            self.defects.append(f"{part.get_content_type()}: {type(d).__name__}")
        if str(part.get("content-transfer-encoding", "")).strip().lower() not in _EXACT_ENCODINGS:
            # Line ends of unencoded content belong to the transport (CRLF over SMTP, LF
            # in a file): the same attachment must hash alike whichever way it came.
            data = data.replace(b"\r\n", b"\n")
        return data

    def _message_payload(self, part: Message) -> bytes:
        """The body of a message/* part as bytes (the attached mail, the report...)."""
        if not isinstance(part.get_payload(), list):
            return self._payload(part)
        buf = BytesIO()
        try:
            BytesGenerator(buf, mangle_from_=False, policy=compat32).flatten(part)
        except Exception:  # noqa: BLE001 - a broken inner message: keep what the stdlib has
            return self._payload(part)
        data = buf.getvalue()
        if not part.keys():
            return data[1:]
        return data.split(b"\n\n", 1)[1] if b"\n\n" in data else b""

    def _text(self, part: Message) -> tuple[str, bool]:
        """The decoded text of a part, and False when it is unreadable (bad encoding and charset)."""
        data = self._payload(part)
        declared = charsets.normalize_charset(part.get_param("charset"))
        before = len(self.defects)
        text, used = charsets.decode(data, declared, self.defects, f"{part.get_content_type()}: ", self.declared)
        charset_trouble = len(self.defects) > before
        if declared:
            self.charsets.add(declared)
            if declared not in self.declared:
                self.declared.append(declared)
        self.charsets.add(used)
        clean = not (charset_trouble and any(isinstance(d, _ENCODING_DEFECTS) for d in part.defects))
        return text.replace("\r\n", "\n").replace("\r", "\n"), clean

    def _filename(self, part: Message) -> str | None:
        hints = self.hints
        if any(k.lower() in _NAMING_FIELDS and not str(v).isascii() for k, v in part.raw_items()):
            # Raw 8-bit in a name is read first in the part's own charset, if it has one.
            hints = hints.preferring(part.get_param("charset"))
        name = _rfc2231_param(part, "filename", "content-disposition", self.defects, hints)
        if name is None:
            name = _rfc2231_param(part, "name", "content-type", self.defects, hints)
        if name is None:
            return None
        # Outlook and many Japanese mailers put RFC 2047 words in quoted parameters.
        return decode_header_value(name, self.defects, hints, where="attachment name: ") or None

    def _attach(self, part: Message) -> None:
        ctype = part.get_content_type()
        payload = self._message_payload(part) if part.get_content_maintype() == "message" else self._payload(part)
        cid = _raw_header(part, "content-id")
        cid = charsets.decode_raw_header(cid, self.hints).strip().strip("<>") if cid else None
        disposition = (part.get_content_disposition() or "").lower()
        given = self._filename(part)
        self.attachments.append(
            Attachment(
                # "" until _named() numbers it among all the mail's attachments.
                filename=given or self._made_name(part, ctype, payload, cid),
                content_type=ctype,
                size=len(payload),
                sha256=hashlib.sha256(payload).hexdigest(),
                inline=disposition == "inline" or (disposition == "" and cid is not None),
                content_id=cid,
                payload=payload,
                name_given=given is not None,
            )
        )

    def _made_name(self, part: Message, ctype: str, payload: bytes, cid: str | None) -> str:
        """A name for an attachment the mail leaves unnamed; "" when only a number fits."""
        if ctype in _MESSAGE_TYPES:
            subject = decode_header_value(_inner_subject(part, payload), self.defects, self.hints, "attached message: ")
            stem = _file_stem(_clean_subject_whitespace(subject))
            if stem:
                return stem + ".eml"
        if cid:
            local = cid.rpartition("@")[0] or cid
            m = _CID_FILE_NAME.fullmatch(local)
            if m is not None and _TYPES.guess_type("x." + m.group(1))[0] is not None:
                return _file_stem(local)
        return ""


def _as_bytes(part: Message) -> bytes:
    try:
        return part.as_bytes(policy=compat32)
    except Exception:  # noqa: BLE001 - text the stdlib decoded on its own cannot go back to ASCII
        try:
            return part.as_string(policy=compat32).encode("utf-8", "surrogateescape")
        except Exception:  # noqa: BLE001 - e.g. nested too deep to serialise
            return b""


def _rfc2231_param(
    part: Message, param: str, header: str, defects: list[str] | None = None, hints: Iterable[str] = ()
) -> str | None:
    """A parameter value with RFC 2231 continuations and charset decoded by our layer.

    Raw 8-bit bytes in a value come back surrogate-escaped, as in every raw header value.
    """
    raw = _raw_header(part, header)
    eight_bit = raw is not None and not raw.isascii()
    if eight_bit:
        # The stdlib turns a value with 8-bit bytes into replacement characters: let it
        # read the parameters of a copy that holds each byte as one Latin-1 character.
        probe = Message()
        probe[header] = raw.encode("ascii", "surrogateescape").decode("latin-1")
        part = probe
    try:
        value = part.get_param(param, header=header)
    except Exception:  # noqa: BLE001 - a broken parameter list is no parameter
        return None
    if value is None:
        return None
    if eight_bit and not isinstance(value, tuple):
        value = value.encode("latin-1", "replace").decode("ascii", "surrogateescape")
    if isinstance(value, tuple):
        cs, _lang, text = value
        # The stdlib unquotes %XX to Latin-1 code points: those are the original bytes.
        data = text.encode("latin-1", "surrogateescape")
        data = unquote_to_bytes(data) if b"%" in data else data
        if not cs:
            return charsets.decode_header_text(data, hints, defects, "attachment name: ")
        return charsets.decode(data, cs, defects, "attachment name: ", hints)[0]
    return utils.collapse_rfc2231_value(value)


_NAMING_FIELDS = ("content-type", "content-disposition")
_MESSAGE_TYPES = ("message/rfc822", "message/global")
# Only the built-in table, not the machine's /etc/mime.types: the same names everywhere;
# with the types support mail carries that the table lacks (Office files, invitations, and
# the names mail programs use besides the registered ones).
_TYPES = mimetypes.MimeTypes()
for _type, _ext in (("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", ".xlsx"),
                    ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", ".docx"),
                    ("application/vnd.openxmlformats-officedocument.presentationml.presentation", ".pptx"),
                    ("text/calendar", ".ics"), ("application/x-7z-compressed", ".7z"), ("application/vnd.rar", ".rar"),
                    ("application/x-zip-compressed", ".zip"), ("image/jpg", ".jpg"), ("image/pjpeg", ".jpg"),
                    ("application/x-pdf", ".pdf")):
    _TYPES.add_type(_type, _ext)
# A Content-ID local part that is a file name: Outlook's "image001.png@01D9...".
_CID_FILE_NAME = re.compile(r"\w[\w .()+-]{0,150}\.([A-Za-z0-9]{1,8})")
# Characters no file system takes in a name (Windows' set, which covers the others).
_UNSAFE_IN_NAME = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
_RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_MAX_STEM_BYTES = 200  # file systems take 255 bytes; room for ".eml" and a "(2)"


def _extension(content_type: str) -> str:
    """The file extension for a MIME type: .eml for mail, .txt for text, else .bin."""
    if content_type in _MESSAGE_TYPES:
        return ".eml"
    ext = _TYPES.guess_extension(content_type)
    if ext:
        return ext
    return ".txt" if content_type.startswith(("text/", "message/")) else ".bin"


def _file_stem(text: str) -> str:
    """``text`` made safe as a file name on any file system; "" when nothing is left."""
    stem = " ".join(_UNSAFE_IN_NAME.sub("_", text).split()).strip(" .")
    if len(stem.encode("utf-8")) > _MAX_STEM_BYTES:
        stem = stem.encode("utf-8")[:_MAX_STEM_BYTES].decode("utf-8", "ignore").rstrip(" .")
    if stem.partition(".")[0].upper() in _RESERVED_NAMES:
        stem = "_" + stem
    return stem


def _inner_subject(part: Message, payload: bytes) -> str:
    """The raw Subject of an attached message."""
    inner = part.get_payload()
    if isinstance(inner, list) and inner and isinstance(inner[0], Message):
        return _raw_header(inner[0], "subject") or ""
    # Not parsed by the stdlib (an encoded message/rfc822): read its header only.
    end = payload.find(b"\n\n")
    head = payload[: end if 0 <= end < 256 * 1024 else 256 * 1024]
    try:
        return _raw_header(BytesParser(policy=compat32).parsebytes(head, headersonly=True), "subject") or ""
    except Exception:  # noqa: BLE001 - a broken inner header has no subject
        return ""


def _raw_header(part: Message, name: str) -> str | None:
    """The first value of a header as parsed, 8-bit bytes surrogate-escaped (``get()``
    would turn them into replacement characters)."""
    lname = name.lower()
    return next((str(v) for k, v in part.raw_items() if k.lower() == lname), None)


def _named(attachments: list[Attachment]) -> list[Attachment]:
    """Every attachment with a file name: the unnamed get ``attachment-N.ext``, N their
    place among the mail's attachments."""
    return [
        a if a.filename else replace(a, filename=f"attachment-{n}{_extension(a.content_type)}")
        for n, a in enumerate(attachments, 1)
    ]


# Quote marks shown at most on a line. Every line of a quote carries its depth in "> ", so
# without a bound 1 MB of nested <blockquote> (77,000 levels) would make 6 GB of text. 20
# levels is deeper than a reader can count and than reply threads nest in practice.
_MAX_QUOTE_MARKS = 20


def _quote_prefix(depth: int) -> str:
    return "> " * min(depth, _MAX_QUOTE_MARKS)


# Runs of white space, shown as one space outside <pre>; compiled once, not at every
# piece of text (re.sub's cache lookup was a fifth of the time on tag-dense HTML).
_SPACES = re.compile(r"\s+")


class _HTMLText(HTMLParser):
    """Walks HTML once and writes lines: blocks break lines, paragraphs leave a blank
    line, lists get markers, quotes get "> ", links keep their address."""

    _PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6"}
    _BLOCK = {
        "div", "li", "tr", "table", "ul", "ol", "dl", "dt", "dd", "pre", "hr", "form",
        "section", "article", "header", "footer", "address", "center", "caption",
    }  # fmt: skip
    _SKIP = {"script", "style", "head", "title", "template"}

    def __init__(self, cut: bool = False) -> None:
        super().__init__(convert_charrefs=True)
        self.cut = cut  # the HTML given is the start of a longer one: its end is no end
        self.lines: list[str] = []
        self.cur: list[str] = []
        # Whether ``cur`` holds more than white space: asked at every <br>, so kept as we
        # go (joining ``cur`` each time made " <br>" * n quadratic).
        self.cur_has_text = False
        self.cur_depth = 0
        self.depth = 0  # blockquote nesting
        self.pending = 0  # 1: end the line before the next text; 2: and leave a blank line
        self.skip = 0
        self.pre = 0
        self.lists: list[int] = []  # per open list: next number, or 0 for bullets
        self.first_cell = True
        self.link: tuple[str, int] | None = None  # (href, length of the text before it)
        self.link_text: list[str] = []

    def _finish(self, force: bool = False) -> None:
        text = "".join(self.cur)
        text = text.rstrip() if self.pre else text.strip()
        if text or force:
            self.lines.append((_quote_prefix(self.cur_depth) + text).rstrip())
        self.cur = []
        self.cur_has_text = False

    def _break(self, n: int) -> None:
        self.pending = max(self.pending, n)

    def _emit(self, text: str) -> None:
        if self.pending:
            self._finish()
            if self.pending == 2 and self.lines and self.lines[-1].strip("> "):
                self.lines.append(_quote_prefix(self.depth).rstrip())
            self.pending = 0
        if not self.cur:
            self.cur_depth = self.depth
        self.cur.append(text)
        if not self.cur_has_text and text and not text.isspace():
            self.cur_has_text = True
        if self.link is not None:
            self.link_text.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self.skip = 0  # an unclosed <head> must not hide the body
        if tag in self._SKIP:
            self.skip += 1
            return
        if self.skip:
            return
        if tag == "br":
            if self.pending:  # the line has ended already: this break makes a blank line
                self._finish()
                self.pending = 2
            elif self.cur_has_text:
                self._finish()
                self.pending = 1
            return
        if tag in self._PARAGRAPH:
            self._break(2)
        elif tag in self._BLOCK:
            self._break(1)
        if tag == "blockquote":
            self._break(1)
            self._finish()
            self.depth += 1
        elif tag == "pre":
            self.pre += 1
        elif tag in ("ul", "ol"):
            self.lists.append(1 if tag == "ol" else 0)
        elif tag == "li":
            if self.lists and self.lists[-1]:
                self._emit(f"{self.lists[-1]}. ")
                self.lists[-1] += 1
            else:
                self._emit("- ")
        elif tag == "tr":
            self.first_cell = True
        elif tag in ("td", "th"):
            if not self.first_cell:
                self._emit("\t")
            self.first_cell = False
        elif tag == "a":
            href = dict(attrs).get("href") or ""
            self.link = (href, 0) if href.startswith(("http://", "https://")) else None
            self.link_text = []

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if tag in self._PARAGRAPH:
            self._break(2)
        elif tag in self._BLOCK:
            self._break(1)
        if tag == "blockquote" and self.depth:
            self._break(1)
            self._finish()
            self.depth -= 1
        elif tag == "pre":
            self._finish()  # while the pre is open, so its indentation stays
            self.pre = max(0, self.pre - 1)
        elif tag in ("ul", "ol") and self.lists:
            self.lists.pop()
        elif tag == "a" and self.link is not None:
            href = self.link[0]
            shown = "".join(self.link_text).strip()
            self.link = None
            if shown and shown != href and shown not in href:
                self._emit(f" <{href}>")

    def handle_data(self, data: str) -> None:
        if self.skip or not data:
            return
        if not self.pre:
            self._emit(_SPACES.sub(" ", data))
            return
        for i, piece in enumerate(data.replace("\r\n", "\n").split("\n")):
            if i:
                self._finish(force=True)
                self.cur_depth = self.depth
            if piece:
                self._emit(piece)

    def text(self) -> str:
        self._finish()
        return "\n".join(self.lines).strip("\n")

    def close(self) -> None:
        """End of input: a tag, comment or declaration still open there is not text.

        ``feed()`` stops at the first construct it cannot finish and keeps the rest in
        ``rawdata``. Python's ``close()`` before 3.11.13 / 3.12.11 / 3.13.4 then showed
        it as text a piece at a time, parsing again from each next "<" to the end:
        quadratic (``"<a" * 20_000`` took 0.2 s, twice that 0.7 s, 1 MB minutes).
        HTML5's end-of-file rules, which browsers follow and html.parser follows since
        that fix (CVE-2025-6069), drop an unfinished tag and close a comment or
        declaration at the end; none of them is shown, so the rest is dropped here, the
        same text on every Python. A lone "<" or "</" at the very end stays text, as in
        both, unless the HTML was cut there.
        """
        rest = self.rawdata
        if self.cdata_elem is None and rest.startswith("<") and (self.cut or rest not in ("<", "</")):
            self.rawdata = ""
        super().close()


# The characters of HTML read into text. html.parser is linear but costs up to about 1.3
# µs a character on the worst markup ("<" repeated), so a 25 MB HTML body would hold a
# worker for half a minute; and its start-tag regex keeps up to 250 bytes a character of
# one tag with many attributes (1 MB of '<a x x x ...' takes 250 MB). At 128 KiB the
# worst is 0.17 s and 32 MB, and a 25 MB HTML mail peaks no higher than any 25 MB mail
# (256 KiB: 208 MB, over issue 14's 200). Mail readers bound it too: Gmail shows the first
# 102 KB of a mail's HTML. The HTML itself stays whole in ParsedMail.html and in the raw
# mail, and a mail with a plain-text part is read from that part.
MAX_HTML_CHARS = 128 * 1024


def html_to_text(html: str, defects: list[str] | None = None) -> str:
    """Readable plain text from an HTML body: paragraphs and line breaks kept, lists
    marked, quotes prefixed with "> ", link addresses kept, scripts and styles dropped.

    Linear in the size of the HTML, whatever its shape, and only the first
    ``MAX_HTML_CHARS`` are read (issue 14: bounded cost); the cut is recorded in
    ``defects`` when given.
    """
    html = without_bulk(html)
    cut = len(html) > MAX_HTML_CHARS
    if cut:
        if defects is not None:
            defects.append(f"text/html: {len(html):,} characters; the text is made from the first {MAX_HTML_CHARS:,}")
        html = html[:MAX_HTML_CHARS]
    p = _HTMLText(cut)
    try:
        # One feed: html.parser keeps what it cannot finish and parses it again at each
        # feed, so feeding in pieces would rescan an unfinished tag once per piece.
        p.feed(_LONG_DECIMAL_REF.sub(_shorter_decimal_ref, html))
        p.close()
        text = p.text()
    except Exception:  # noqa: BLE001 - html.parser is lenient; stay safe on anything odd
        return _strip_tags(html)
    return re.sub(r"\n{3,}", "\n\n", text)


_BULK_START = re.compile(r"<(style|script)\b", re.IGNORECASE)
_BULK_END = {"style": re.compile(r"</style", re.IGNORECASE), "script": re.compile(r"</script", re.IGNORECASE)}
# An inline image (src="data:image/png;base64,…") holds no text but could fill the budget.
_DATA_URI = re.compile(r"data:[^\s\"'>]{256,}", re.IGNORECASE)


def without_bulk(html: str) -> str:
    """The HTML without what is never text and may be large (style and script contents,
    inline data: images), so that MAX_HTML_CHARS is spent on text. Linear: each element's
    end is searched once, from where it starts. (Searched case-blind in the text itself:
    ``str.lower`` may change the length, and so the positions.)"""
    if "<" not in html:
        return html
    out: list[str] = []
    at = 0
    for m in _BULK_START.finditer(html):
        if m.start() < at:  # inside content already dropped
            continue
        opened = html.find(">", m.end())
        if opened == -1:
            break
        out.append(html[at:opened + 1])
        closing = _BULK_END[m.group(1).lower()].search(html, opened)
        if closing is None:  # never closed: the rest is its content, as html.parser reads it
            at = len(html)
            break
        at = closing.start()
    out.append(html[at:])
    return _DATA_URI.sub("data:", "".join(out))


# html.unescape reads a decimal character reference with int(), which refuses more than
# 4,300 digits (Python's guard against its quadratic conversion): html.parser raises and
# the whole body would be read by _strip_tags, entities and styles left as they are.
_LONG_DECIMAL_REF = re.compile(r"&#([0-9]{8,})")


def _shorter_decimal_ref(m: re.Match[str]) -> str:
    """The same reference in at most 7 digits: past U+10FFFF (8 digits and more,
    leading zeros aside) unescape gives U+FFFD whatever the number, as for 1114112."""
    digits = m[1].lstrip("0") or "0"
    return "&#" + (digits if len(digits) <= 7 else "1114112")


_TAG = re.compile(r"<[^>]+>")


def _strip_tags(html: str) -> str:
    """The HTML without its tags: the text when html.parser gives up (it raises on
    ``<![`` not followed by a keyword it knows, for one).

    No tag can start after the last ">", and looking for one there from every "<" was
    quadratic (``"<![ " + "<x" * 20_000``: 0.06 s, twice that: 0.25 s): that end is
    kept as it is.
    """
    end = html.rfind(">") + 1
    return _TAG.sub("", html[:end]) + html[end:]


_JA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f\u4e00-\u9fff]")


def detect_language(text: str) -> str:
    """``ja`` when the text has Japanese script, else ``en``."""
    return "ja" if _JA.search(text) else "en"


def normalize_text(text: str) -> str:
    """NFKC, case-folded, with the wave dashes unified: the form rules match against."""
    return unicodedata.normalize("NFKC", text).replace("\u301c", "~").replace("\uff5e", "~").casefold()
