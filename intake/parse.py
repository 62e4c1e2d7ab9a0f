"""Raw bytes → ParsedMail: headers, charsets, text/html, attachments. Pure.

MIME structure, RFC 2047 and RFC 2231 come from the standard library (``email`` with
``policy.compat32``, the fastest and most forgiving); every byte-to-text step goes through
our charset layer (``intake.charsets``) because the codecs alone mis-decode everyday
Japanese mail. Parsing never raises on bad input: what was wrong is listed in
``ParsedMail.defects``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email import message_from_bytes
from email.header import decode_header
from email.message import Message
from email.policy import compat32
from email.utils import getaddresses, parsedate_to_datetime
from html.parser import HTMLParser

from intake import charsets


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
        return self.address.rpartition("@")[2].lower()

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "address": self.address}


@dataclass(frozen=True)
class Attachment:
    filename: str | None
    content_type: str
    size: int
    sha256: str
    inline: bool
    content_id: str | None
    payload: bytes = field(repr=False)


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

    def header(self, name: str) -> str | None:
        """First decoded value of a header, or ``None``."""
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


def parse(raw: bytes) -> ParsedMail:
    """Parse raw message bytes. Never raises for malformed mail."""
    msg = message_from_bytes(raw, policy=compat32)
    defects: list[str] = [f"headers: {type(d).__name__}" for d in msg.defects]
    # raw_items(): compat32 would turn raw 8-bit values into lossy Header objects.
    raw_headers = [(k, str(v)) for k, v in msg.raw_items()]
    headers = [(k, decode_header_value(v, defects)) for k, v in raw_headers]
    hdr = {k.lower(): v for k, v in reversed(raw_headers)}

    body = _Body(defects)
    body.walk(msg)

    mid = _first_id(hdr.get("message-id", ""))
    synthesised = False
    if mid is None:
        mid = _synthesise_message_id(raw, hdr)
        synthesised = True
        defects.append("no Message-ID: synthesised from the content")

    text = body.text
    if not text.strip() and body.html:
        text = html_to_text(body.html)

    return ParsedMail(
        message_id=mid,
        message_id_synthesised=synthesised,
        subject=_clean_subject_whitespace(decode_header_value(hdr.get("subject", ""), defects)),
        from_=next(iter(_addresses(raw_headers, "from", defects)), None),
        to=_addresses(raw_headers, "to", defects),
        cc=_addresses(raw_headers, "cc", defects),
        reply_to=_addresses(raw_headers, "reply-to", defects),
        date=_date(hdr.get("date"), defects),
        in_reply_to=_ids(hdr.get("in-reply-to", "")),
        references=_ids(" ".join(v for k, v in raw_headers if k.lower() == "references")),
        text=text,
        html=body.html,
        attachments=body.attachments,
        defects=defects,
        charsets=sorted(body.charsets),
        content_type=msg.get_content_type(),
        headers=headers,
    )


def decode_header_value(value: str | None, defects: list[str] | None = None) -> str:
    """Decode a header value: RFC 2047 words in any charset, raw 8-bit or JIS text."""
    if value is None:
        return ""
    value = str(value)
    if "\x1b" in value:
        # Raw ISO-2022-JP in a header, as some Japanese mailers write it.
        raw = value.encode("ascii", "surrogateescape")
        value = charsets.decode(raw, "iso-2022-jp")[0]
    value = charsets.repair_raw_header(value)
    if "=?" not in value:
        return _unfold(value)
    try:
        parts = decode_header(value)
    except Exception:  # noqa: BLE001 - the stdlib raises several kinds on broken words
        if defects is not None:
            defects.append("header: undecodable encoded-word left as is")
        return _unfold(value)
    out = []
    for chunk, cs in parts:
        if isinstance(chunk, bytes):
            out.append(charsets.decode(chunk, cs or "utf-8", defects, "header: ")[0])
        else:
            out.append(chunk)
    return _unfold("".join(out))


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]*", " ", value).strip()


def _clean_subject_whitespace(value: str) -> str:
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", value).strip()


def _addresses(raw_headers: list[tuple[str, str]], name: str, defects: list[str]) -> list[Address]:
    values = [v for k, v in raw_headers if k.lower() == name]
    out: list[Address] = []
    # Parse the list first, decode names second: a decoded name may contain commas.
    raw_values = []
    for v in values:
        v = str(v)
        if "\x1b" in v:
            v = charsets.decode(v.encode("ascii", "surrogateescape"), "iso-2022-jp")[0]
        raw_values.append(charsets.repair_raw_header(v))
    for display, addr in getaddresses(raw_values):
        addr = charsets.repair_raw_header(addr).strip()
        if not addr or "@" not in addr:
            if addr and defects is not None:
                defects.append(f"{name}: not an address: {addr!r}")
            continue
        out.append(Address(name=decode_header_value(display, defects), address=addr))
    return out


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


def _synthesise_message_id(raw: bytes, hdr: dict[str, str]) -> str:
    # From the content, not the trace headers: the same mail relayed twice hashes alike.
    sep = raw.find(b"\r\n\r\n")
    body = raw[sep + 4 :] if sep >= 0 else raw[raw.find(b"\n\n") + 2 :] if b"\n\n" in raw else b""
    h = hashlib.sha256()
    for key in ("from", "to", "date", "subject"):
        h.update(str(hdr.get(key, "")).encode("utf-8", "surrogateescape") + b"\0")
    h.update(body.replace(b"\r\n", b"\n"))
    return f"{h.hexdigest()[:40]}@synthesised.intake.invalid"


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


class _Body:
    """Walks the MIME tree once: text, html, attachments and charsets."""

    def __init__(self, defects: list[str]) -> None:
        self.defects = defects
        self.texts: list[str] = []
        self.htmls: list[str] = []
        self.attachments: list[Attachment] = []
        self.charsets: set[str] = set()

    @property
    def text(self) -> str:
        return "\n".join(self.texts)

    @property
    def html(self) -> str | None:
        return "\n".join(self.htmls) if self.htmls else None

    def walk(self, part: Message, in_alternative: bool = False) -> None:
        ctype = part.get_content_type()
        if part.is_multipart():
            children = part.get_payload()
            if not isinstance(children, list):
                return
            if ctype in ("message/rfc822", "message/delivery-status"):
                self._attach(part)
                return
            if ctype == "multipart/alternative":
                self._walk_alternative(children)
                return
            for child in children:
                self.walk(child)
            return
        if ctype == "message/rfc822":
            self._attach(part)
            return
        disposition = (part.get_content_disposition() or "").lower()
        filename = self._filename(part)
        if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
            text = self._text(part)
            (self.texts if ctype == "text/plain" else self.htmls).append(text)
            return
        if part.get_content_maintype() == "multipart":
            # A multipart without a parsable boundary: keep its bytes as text.
            self.defects.append(f"{ctype}: no usable boundary, kept as text")
            self.texts.append(self._text(part))
            return
        self._attach(part)

    def _walk_alternative(self, children: list[Message]) -> None:
        plain = [c for c in children if c.get_content_type() == "text/plain"]
        html = [c for c in children if c.get_content_type() == "text/html"]
        nested = [c for c in children if c.is_multipart()]
        if plain:
            self.walk(plain[0])
        if html:
            self.walk(html[0])
        for c in nested:
            # multipart/related inside alternative: the HTML and its inline images
            if not plain or c.get_content_type() != "multipart/related":
                self.walk(c)
            else:
                for inner in c.get_payload() if isinstance(c.get_payload(), list) else []:
                    if inner.get_content_type() not in ("text/plain",):
                        if inner.get_content_type() == "text/html" and html:
                            continue
                        self.walk(inner)
        if not plain and not html and not nested:
            for c in children:
                self.walk(c)

    def _payload(self, part: Message) -> bytes:
        try:
            data = part.get_payload(decode=True)
        except Exception:  # noqa: BLE001 - broken base64/qp: keep the raw text
            data = None
        if data is None:
            raw = part.get_payload()
            if isinstance(raw, list):
                return b"".join(p.as_bytes() for p in raw)
            data = str(raw).encode("ascii", "surrogateescape")
        for d in part.defects:
            self.defects.append(f"{part.get_content_type()}: {type(d).__name__}")
        return data

    def _text(self, part: Message) -> str:
        data = self._payload(part)
        declared = charsets.normalize_charset(part.get_param("charset"))
        text, used = charsets.decode(data, declared, self.defects, f"{part.get_content_type()}: ")
        if declared:
            self.charsets.add(declared)
        self.charsets.add(used)
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def _filename(self, part: Message) -> str | None:
        try:
            name = part.get_filename()
        except Exception:  # noqa: BLE001
            name = None
        if name is None:
            name = part.get_param("name")
            if isinstance(name, tuple):  # RFC 2231 on the Content-Type
                cs, _, value = name
                name = charsets.decode(value.encode("latin-1", "replace"), cs)[0]
        if name is None:
            return None
        name = str(name)
        # RFC 2231 values are decoded by the stdlib as latin-1 when the charset is odd.
        return decode_header_value(name, self.defects) or None

    def _attach(self, part: Message) -> None:
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            inner = part.get_payload()
            if isinstance(inner, list) and inner:
                payload = inner[0].as_bytes(policy=compat32) if isinstance(inner[0], Message) else b""
            else:
                payload = self._payload(part)
        elif ctype == "message/delivery-status" and isinstance(part.get_payload(), list):
            # The stdlib splits a DSN into header blocks; keep them as the report's text.
            payload = b"\n".join(block.as_bytes(policy=compat32) for block in part.get_payload())
        else:
            payload = self._payload(part)
        filename = self._filename(part)
        if filename is None and ctype == "message/rfc822":
            inner_subject = ""
            if isinstance(part.get_payload(), list) and part.get_payload():
                inner_subject = decode_header_value(part.get_payload()[0].get("subject", ""), self.defects)
            filename = (inner_subject or "forwarded message") + ".eml"
        cid = part.get("content-id")
        cid = str(cid).strip().strip("<>") if cid else None
        disposition = (part.get_content_disposition() or "").lower()
        self.attachments.append(
            Attachment(
                filename=filename,
                content_type=ctype,
                size=len(payload),
                sha256=hashlib.sha256(payload).hexdigest(),
                inline=disposition == "inline" or (disposition == "" and cid is not None),
                content_id=cid,
                payload=payload,
            )
        )


class _HTMLText(HTMLParser):
    _BLOCK = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table", "ul", "ol", "pre", "hr"}
    _SKIP = {"script", "style", "head", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self.skip += 1
        elif tag == "pre":
            self.pre += 1
        if tag in self._BLOCK:
            self.out.append("\n")
        if tag == "li":
            self.out.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self._BLOCK and tag != "br":
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        self.out.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Readable plain text from an HTML body (paragraphs kept, scripts and styles dropped)."""
    p = _HTMLText()
    try:
        p.feed(html)
        p.close()
    except Exception:  # noqa: BLE001 - html.parser is lenient; stay safe on anything odd
        return re.sub(r"<[^>]+>", "", html)
    text = "".join(p.out)
    lines = [line.strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_JA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f\u4e00-\u9fff]")


def detect_language(text: str) -> str:
    """``ja`` when the text has Japanese script, else ``en``."""
    return "ja" if _JA.search(text) else "en"


def normalize_text(text: str) -> str:
    """NFKC, case-folded, with the wave dashes unified: the form rules match against."""
    return unicodedata.normalize("NFKC", text).replace("\u301c", "~").replace("\uff5e", "~").casefold()
