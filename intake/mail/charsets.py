"""Our own charset layer: bytes → text for the charsets Japanese mail really uses.

Python's codecs alone get common Japanese mail wrong (see the README): ``iso-2022-jp``
cannot decode half-width katakana or NEC circled digits, ``shift_jis`` lacks the Windows
characters (髙, ～, ①, ㈱). Here every declared charset is mapped to the codec that
decodes what senders really wrote, and decoding never raises: the worst case is the best
decoding plus a recorded defect. Raw 8-bit header text without a charset of its own
(``decode_header_text``) is read as UTF-8, else as charset-normalizer ranks the
charsets the mail declares, then a short list of legacy ones.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterable, Iterator

# Declared name (lower case) → codecs to try in order.
_FAMILIES: dict[str, tuple[str, ...]] = {
    "shift_jis": ("cp932",),
    "shift-jis": ("cp932",),
    "sjis": ("cp932",),
    "x-sjis": ("cp932",),
    "s-jis": ("cp932",),
    "ms_kanji": ("cp932",),
    "csshiftjis": ("cp932",),
    "windows-31j": ("cp932",),
    "cp932": ("cp932",),
    "ms932": ("cp932",),
    "x-ms-cp932": ("cp932",),
    "shift_jisx0213": ("shift_jisx0213", "cp932"),
    "shift_jis-2004": ("shift_jis_2004", "cp932"),
    "euc-jp": ("euc_jis_2004", "euc-jp", "cp932"),
    "x-euc-jp": ("euc_jis_2004", "euc-jp"),
    "eucjp": ("euc_jis_2004", "euc-jp"),
    "euc-jis-2004": ("euc_jis_2004",),
    "gb2312": ("gb18030",),
    "gbk": ("gb18030",),
    "x-gbk": ("gb18030",),
    "ks_c_5601-1987": ("cp949",),
    "euc-kr": ("cp949",),
    # Windows text labelled Latin-1 is the norm; cp1252 is a superset in practice.
    "iso-8859-1": ("cp1252", "latin-1"),
    "iso_8859-1": ("cp1252", "latin-1"),
    "iso8859-1": ("cp1252", "latin-1"),
    "latin1": ("cp1252", "latin-1"),
    "latin-1": ("cp1252", "latin-1"),
    "us-ascii": ("ascii",),
    "ascii": ("ascii",),
    "ansi_x3.4-1968": ("ascii",),
    "utf8": ("utf-8",),
    "unicode-1-1-utf-7": ("utf-7",),
    "x-mac-roman": ("mac-roman",),
    "iso-8859-8-i": ("iso8859-8",),
    "iso-8859-6-i": ("iso8859-6",),
}
_ISO2022JP = re.compile(r"^(csiso2022jp|iso-?2022-?jp(-\w+)?)$")
_JIS_ESCAPE = re.compile(rb"\x1b(?:\$[@B]|\$\([DOQ]|\([BJI])")
# CP932's user-defined area (lead bytes F0-F9) decodes to the private use area: real in
# carrier emoji of declared Shift_JIS, but in undeclared bytes a sign of a wrong guess
# (Latin-1 "ö" + a letter is a valid CP932 pair).
_PUA = re.compile("[\ue000-\uf8ff]")
_7BIT_OK = ("us-ascii", "ascii", "utf-8", "utf8", "ansi_x3.4-1968")


def normalize_charset(name: str | None) -> str | None:
    """Lower-case, unquoted charset name without an RFC 2231 language, or ``None``."""
    if not name:
        return None
    if isinstance(name, tuple):  # an RFC 2231 value the stdlib did not collapse
        name = name[2]
    name = str(name).strip().strip("\"'").lower().partition("*")[0].strip()
    return name or None


def codecs_for(charset: str | None) -> tuple[str, ...]:
    """The codecs we try for a declared charset; empty when Python knows none."""
    cs = normalize_charset(charset)
    if cs is None:
        return ()
    family = _FAMILIES.get(cs)
    if family is not None:
        return family
    try:
        name = codecs.lookup(cs).name
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        return ()
    # An alias of a family member ("csshiftjis", "x-mac-japanese") gets the family's codecs.
    return _FAMILIES.get(name, (name,))


def decode(
    data: bytes,
    charset: str | None,
    defects: list[str] | None = None,
    where: str = "",
    hints: Iterable[str] = (),
) -> tuple[str, str]:
    """Decode ``data`` declared as ``charset``; returns (text, codec actually used).

    Never raises. When the declared charset is unknown or wrong, the best decoding is
    returned and a defect is appended to ``defects``. ``hints`` are other charsets the
    same message declares: the likeliest reading of undeclared 8-bit bytes.
    """
    cs = normalize_charset(charset)
    # A 7-bit body full of JIS escapes is ISO-2022-JP whatever it claims to be.
    if b"\x1b" in data and _JIS_ESCAPE.search(data) and (cs is None or cs in _7BIT_OK or _ISO2022JP.match(cs)):
        if cs is not None and not _ISO2022JP.match(cs) and defects is not None:
            defects.append(f"{where}declared {cs} but contains ISO-2022-JP escapes")
        return decode_iso2022jp(data), "iso-2022-jp"
    if cs is not None and _ISO2022JP.match(cs):
        if not data.isascii() and not _JIS_ESCAPE.search(data):
            # 8-bit bytes cannot be ISO-2022-JP: usually Shift_JIS mislabelled.
            text, used = _guess(data, hints)
            if defects is not None:
                defects.append(f"{where}declared {cs} but has 8-bit bytes, decoded as {used}")
            return text, used
        return decode_iso2022jp(data), "iso-2022-jp"
    if cs is None:
        return _guess(data, hints)
    candidates = codecs_for(cs)
    if not candidates:
        text, used = _guess(data, hints)
        if defects is not None:
            defects.append(f"{where}unknown charset {cs!r}, decoded as {used}")
        return text, used
    for codec in candidates:
        try:
            return data.decode(codec), codec
        except Exception:  # noqa: BLE001 - not a text codec ("base64", "rot13"), or bad bytes
            continue
    # The declared charset is wrong for these bytes (often "us-ascii" with 8-bit UTF-8).
    if defects is not None:
        defects.append(f"{where}bytes are not valid {cs}")
    text, used = _guess_strict(data, hints)
    if text is not None:
        return text, used
    if candidates[0] in ("utf-8", "ascii"):
        # Mostly UTF-8 with a few stray Latin-1 bytes (a pasted signature, a broken
        # relay): keep the valid UTF-8 and read each stray byte as Windows-1252.
        return data.decode("utf-8", errors=_LATIN_FALLBACK), "utf-8"
    try:
        return data.decode(candidates[0], errors="replace"), candidates[0]
    except Exception:  # noqa: BLE001 - not a text codec after all
        return _guess(data, hints)


def _latin_fallback(err: UnicodeError) -> tuple[str, int]:
    assert isinstance(err, UnicodeDecodeError)
    bad = err.object[err.start : err.end]
    return "".join(_CP1252_OR_LATIN1[b] for b in bad), err.end


_CP1252_OR_LATIN1 = [bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in range(256)]
_LATIN_FALLBACK = "intake-latin-fallback"
codecs.register_error(_LATIN_FALLBACK, _latin_fallback)


def _guess_strict(data: bytes, hints: Iterable[str] = ()) -> tuple[str | None, str]:
    """The first decoding that fits without an error: ASCII, UTF-8, hints, CP932, EUC-JP."""
    if data.isascii():
        if b"\x1b" in data and _JIS_ESCAPE.search(data):
            return decode_iso2022jp(data), "iso-2022-jp"
        return data.decode("ascii"), "ascii"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    for hint in hints:
        if _ISO2022JP.match(hint or ""):
            continue
        for codec in codecs_for(hint):
            if codec in ("ascii", "utf-8"):
                continue
            try:
                return data.decode(codec), codec
            except Exception:  # noqa: BLE001 - as in decode()
                continue
    try:
        text = data.decode("cp932")
        if not _PUA.search(text):
            return text, "cp932"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("euc_jis_2004"), "euc_jis_2004"
    except UnicodeDecodeError:
        pass
    return None, ""


def _guess(data: bytes, hints: Iterable[str] = ()) -> tuple[str, str]:
    """Best decoding of undeclared bytes: the strict guesses, then Windows-1252."""
    text, used = _guess_strict(data, hints)
    if text is not None:
        return text, used
    return data.decode("utf-8", errors=_LATIN_FALLBACK), "cp1252"


def decode_iso2022jp(data: bytes) -> str:
    """ISO-2022-JP as Japanese mail programs write it (kana, NEC and IBM rows included)."""
    for codec in ("iso2022_jp", "iso2022_jp_ext", "iso2022_jp_2", "iso2022_jp_3"):
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            continue
    return _jis_to_cp932(data).decode("cp932", errors="replace")


def _jis_to_cp932(data: bytes) -> bytes:
    """CP50220-style conversion: ISO-2022-JP (with NEC/IBM rows and kana) → CP932 bytes.

    Mail programs on Windows write characters such as ①, ㈱ and 髙 in ISO-2022-JP using
    Microsoft's rows; no Python ISO-2022-JP codec accepts them, but CP932 does once the
    JIS code points are shifted.
    """
    out = bytearray()
    mode = "ascii"
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x1B and i + 2 < n:
            seq = data[i + 1 : i + 3]
            if seq in (b"$@", b"$B"):
                mode, i = "jis", i + 3
                continue
            if seq in (b"(B", b"(J"):
                mode, i = "ascii", i + 3
                continue
            if seq == b"(I":
                mode, i = "kana", i + 3
                continue
            if data[i + 1 : i + 4] in (b"$(D", b"$(Q", b"$(O"):
                mode, i = "jis", i + 4
                continue
        if b == 0x0E:  # SO: half-width katakana until SI
            mode, i = "kana", i + 1
            continue
        if b == 0x0F:
            mode, i = "ascii", i + 1
            continue
        if b in (0x0D, 0x0A):
            out.append(b)
            i += 1
            continue
        if mode == "jis" and i + 1 < n and 0x21 <= b <= 0x7E and 0x21 <= data[i + 1] <= 0x7E:
            j1, j2 = b, data[i + 1]
            s1 = ((j1 + 1) >> 1) + 0x70
            if s1 >= 0xA0:
                s1 += 0x40
            if j1 & 1:
                s2 = j2 + 0x1F
                if s2 >= 0x7F:
                    s2 += 1
            else:
                s2 = j2 + 0x7E
            out += bytes((s1, s2))
            i += 2
            continue
        if mode == "kana" and 0x21 <= b <= 0x5F:
            out.append(b + 0x80)
            i += 1
            continue
        out.append(b)
        i += 1
    return bytes(out)


# --- raw 8-bit header text ----------------------------------------------------------------

# Legacy charsets that raw 8-bit header text is written in, in the order that settles a
# tie: Japanese first (our users), then Chinese, Korean, the Windows code pages and the
# ISO-8859 family. Names as charset-normalizer spells them.
_LEGACY_HEADER_CHARSETS = (
    "cp932", "euc_jp", "gb18030", "big5", "cp949",
    "cp1252", "cp1250", "cp1251", "cp1253", "cp1254", "cp1255", "cp1256", "cp1257",
    "koi8_r", "iso8859_2", "iso8859_15", "latin_1",
)  # fmt: skip
# Detected name → the declared name our decode() reads it as (Japanese stays on our codecs).
_JAPANESE_DETECTED = {"cp932": "shift_jis", "shift_jis": "shift_jis", "euc_jp": "euc-jp", "euc_jis_2004": "euc-jp"}
_MULTI_BYTE = {"cp932", "euc_jp", "gb18030", "big5", "cp949"}
# A detector sample: enough for a display name, a subject or a file name; cost stays flat.
_DETECT_BYTES = 4096
# Detector runs per mail: 10,000 parts with raw 8-bit names must not run it 10,000 times.
_MAX_DETECTIONS = 16


class _GuessState:
    """What one mail declares (looked up on first use) and what was guessed so far."""

    def __init__(self, declared: Iterable[str] | Callable[[], Iterable[str]],
                 sample: Callable[[], bytes] | None = None) -> None:
        self.source = declared
        self.declared: list[str] | None = None
        self.guessed: str | None = None
        self.detections = 0
        self._sample_source = sample
        self._sample: bytes | None = None

    def sample(self) -> bytes:
        """All the raw 8-bit text of the mail's header (looked up on first use): a short
        display name alone is too little for the detector to tell GBK from Shift_JIS."""
        if self._sample is None:
            self._sample = self._sample_source() if self._sample_source is not None else b""
        return self._sample

    def charsets(self) -> list[str]:
        if self.declared is None:
            found = self.source() if callable(self.source) else self.source
            self.declared = list(dict.fromkeys(c for c in map(normalize_charset, found) if c))
        return self.declared


class CharsetHints:
    """The charsets a mail declares, for reading its raw 8-bit header text.

    Iterating yields them in order of appearance (a callable source is only called when
    a mail really has raw 8-bit header text). One object per mail: it also remembers the
    charset guessed so far, and bounds how often the detector runs.
    """

    def __init__(
        self,
        declared: Iterable[str] | Callable[[], Iterable[str]] = (),
        *,
        first: str | None = None,
        sample: Callable[[], bytes] | None = None,
        _state: _GuessState | None = None,
    ) -> None:
        self._state = _state if _state is not None else _GuessState(declared, sample)
        self._first = normalize_charset(first)

    def __iter__(self) -> Iterator[str]:
        if self._first:
            yield self._first
        yield from (c for c in self._state.charsets() if c != self._first)

    def preferring(self, charset: str | None) -> CharsetHints:
        """The same hints with ``charset`` (e.g. the part's own) tried first."""
        return CharsetHints(first=charset, _state=self._state)


def decode_header_text(
    data: bytes, hints: Iterable[str] = (), defects: list[str] | None = None, where: str = ""
) -> str:
    """Raw header bytes (no charset of their own) → text. Never raises.

    ASCII and raw ISO-2022-JP as they are; then strict UTF-8 (RFC 6532); else a guess,
    recorded in ``defects``: the charset detector (charset-normalizer) limited to the
    charsets the mail declares (``hints``), then to a short list of legacy charsets.
    Japanese is decoded by this module's codecs whichever way it was found.
    """
    if data.isascii():
        if b"\x1b" in data and _JIS_ESCAPE.search(data):
            return decode_iso2022jp(data)
        return data.decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    state = hints if isinstance(hints, CharsetHints) else CharsetHints(hints)
    text, used = _header_guess(data, state)
    if defects is not None:
        defects.append(f"{where}raw 8-bit text, charset guessed: {used}")
    return text


def decode_raw_header(
    value: str, hints: Iterable[str] = (), defects: list[str] | None = None, where: str = ""
) -> str:
    """Header text as the stdlib parsed it (8-bit bytes surrogate-escaped) → real text."""
    if value.isascii() and "\x1b" not in value:
        return value
    try:
        raw = value.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return value  # already real text
    return decode_header_text(raw, hints, defects, where)


def _header_guess(data: bytes, hints: CharsetHints) -> tuple[str, str]:
    state = hints._state
    # A mail's raw header text is mostly in one charset: a multi-byte guess that decodes
    # these bytes cleanly is taken again without asking the detector.
    if state.guessed in _MULTI_BYTE:
        text = _strict(data, state.guessed)
        if text is not None:
            return text, state.guessed
    if state.detections < _MAX_DETECTIONS:
        state.detections += 1
        declared = _detectable(hints)
        # The detector reads the mail's whole raw header text with these bytes: one guess
        # for the mail, whichever field comes first.
        sample = state.sample()
        seen = (sample if data in sample else sample + b" " + data) if sample else data
        used = _detect(seen, declared, pua_ok=True) or _detect(seen, _LEGACY_HEADER_CHARSETS, pua_ok=False)
        if used is not None and seen is not data and _strict(data, used) is None:
            # The mail's guess does not fit this field: it is judged on its own.
            used = _detect(data, declared, pua_ok=True) or _detect(data, _LEGACY_HEADER_CHARSETS, pua_ok=False)
        if used is not None:
            state.guessed = used
            return _read_as(data, used), used
    return _guess(data, hints)


def _detectable(hints: Iterable[str]) -> list[str]:
    """The declared charsets as detector candidates: 8-bit ones only (ISO-2022-JP mail
    carries raw Shift_JIS or EUC-JP), in charset-normalizer's spelling."""
    from charset_normalizer.constant import IANA_SUPPORTED

    out: list[str] = []
    for cs in hints:
        if _ISO2022JP.match(cs):
            names: tuple[str, ...] = ("cp932", "euc_jp")
        else:
            names = tuple(c.replace("-", "_").lower() for c in codecs_for(cs)[:1])
        for name in names:
            name = {"euc_jis_2004": "euc_jp", "iso8859_1": "latin_1"}.get(name, name)
            if name in IANA_SUPPORTED and name not in ("ascii", "utf_8", "utf_7") and name not in out:
                out.append(name)
    return out


def _detect(data: bytes, candidates: Iterable[str], pua_ok: bool) -> str | None:
    """The candidate charset-normalizer finds least messy; a tie goes to the earlier one."""
    order = list(candidates)
    if not order:
        return None
    from charset_normalizer import from_bytes

    sample = data[:_DETECT_BYTES]
    if len(data) > _DETECT_BYTES:
        # End the sample on an ASCII byte so that no multi-byte character is cut in two.
        cut = max(sample.rfind(b" "), sample.rfind(b"."), sample.rfind(b"_"))
        sample = sample[:cut] if cut > 0 else sample
    matches = from_bytes(sample, cp_isolation=order, preemptive_behaviour=False, enable_fallback=False)
    ranked = []
    for m in matches:
        if m.encoding not in order:
            continue
        if not pua_ok and m.encoding in _JAPANESE_DETECTED and not _plausible_japanese(str(m)):
            continue
        ranked.append((round(m.chaos, 3), -round(m.coherence, 3), order.index(m.encoding), m.encoding))
    if not ranked:
        return None
    best = min(ranked)
    # Our users' mail is Japanese first: short kanji text reads as Korean or Chinese with a
    # hair less "chaos" too. A Japanese reading that is nearly as clean is taken.
    japanese = [r for r in ranked if r[3] in _JAPANESE_DETECTED and r[0] <= best[0] + _JAPANESE_MARGIN]
    return min(japanese)[3] if japanese else best[3]


_JAPANESE_MARGIN = 0.05


_HALF_WIDTH_KANA = re.compile("[\uff61-\uff9f]")


def _plausible_japanese(text: str) -> bool:
    """Undeclared bytes read as Japanese: the user-defined area, or text made mostly of
    half-width katakana (what Chinese and Korean bytes become in CP932), mean a wrong guess."""
    if _PUA.search(text):
        return False
    wide = sum(1 for ch in text if ord(ch) > 0x7F)
    return len(_HALF_WIDTH_KANA.findall(text)) * 2 <= wide


def _strict(data: bytes, detected: str) -> str | None:
    japanese = _JAPANESE_DETECTED.get(detected)
    for codec in codecs_for(japanese) if japanese else (detected,):
        try:
            text = data.decode(codec)
        except (UnicodeDecodeError, LookupError):
            continue
        return None if japanese and _PUA.search(text) else text
    return None


def _read_as(data: bytes, detected: str) -> str:
    japanese = _JAPANESE_DETECTED.get(detected)
    if japanese is not None:
        return decode(data, japanese)[0]
    return data.decode(detected, errors="replace")
