"""Our own charset layer: bytes → text for the charsets Japanese mail really uses.

Python's codecs alone get common Japanese mail wrong (see the README): ``iso-2022-jp``
cannot decode half-width katakana or NEC circled digits, ``shift_jis`` lacks the Windows
characters (髙, ～, ①, ㈱). Here every declared charset is mapped to the codec that
decodes what senders really wrote, and decoding never raises: the worst case is the best
decoding plus a recorded defect.
"""

from __future__ import annotations

import codecs
import re

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
    "latin1": ("cp1252", "latin-1"),
    "us-ascii": ("ascii",),
    "ascii": ("ascii",),
    "utf8": ("utf-8",),
    "unicode-1-1-utf-7": ("utf-7",),
}
_ISO2022JP = re.compile(r"^(csiso2022jp|iso-?2022-?jp(-\w+)?)$")
_JIS_ESCAPE = re.compile(rb"\x1b[\$\(][@BJI]")


def normalize_charset(name: str | None) -> str | None:
    """Lower-case, unquoted charset name, or ``None`` when there is none."""
    if not name:
        return None
    name = name.strip().strip("\"'").lower()
    return name or None


def decode(data: bytes, charset: str | None, defects: list[str] | None = None, where: str = "") -> tuple[str, str]:
    """Decode ``data`` declared as ``charset``; returns (text, codec actually used).

    Never raises. When the declared charset is unknown or wrong, the best decoding is
    returned and a defect is appended to ``defects``.
    """
    cs = normalize_charset(charset)
    # A 7-bit body full of JIS escapes is ISO-2022-JP whatever it claims to be.
    if b"\x1b" in data and _JIS_ESCAPE.search(data) and (cs is None or cs in ("us-ascii", "ascii", "utf-8") or _ISO2022JP.match(cs)):
        if cs is not None and not _ISO2022JP.match(cs) and defects is not None:
            defects.append(f"{where}declared {cs} but contains ISO-2022-JP escapes")
        return _decode_iso2022jp(data), "iso-2022-jp"
    if cs is not None and _ISO2022JP.match(cs):
        return _decode_iso2022jp(data), "iso-2022-jp"
    if cs is None:
        return _guess(data)
    candidates = _FAMILIES.get(cs)
    if candidates is None:
        try:
            candidates = (codecs.lookup(cs).name,)
        except LookupError:
            text, used = _guess(data)
            if defects is not None:
                defects.append(f"{where}unknown charset {cs!r}, decoded as {used}")
            return text, used
    for codec in candidates:
        try:
            return data.decode(codec), codec
        except UnicodeDecodeError:
            continue
    # Declared charset is wrong for these bytes (often: "us-ascii" with 8-bit UTF-8).
    text, used = _guess(data)
    if defects is not None:
        defects.append(f"{where}bytes are not valid {cs}, decoded as {used}")
    return text, used


def _guess(data: bytes) -> tuple[str, str]:
    """Best decoding of undeclared bytes: ASCII, UTF-8, ISO-2022-JP, CP932, then cp1252."""
    try:
        return data.decode("ascii"), "ascii"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp932"), "cp932"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("euc_jis_2004"), "euc_jis_2004"
    except UnicodeDecodeError:
        pass
    return data.decode("cp1252", errors="replace"), "cp1252"


def _decode_iso2022jp(data: bytes) -> str:
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
            if data[i + 1 : i + 4] == b"$(D" or data[i + 1 : i + 4] == b"$(Q" or data[i + 1 : i + 4] == b"$(O":
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


_HAS_SURROGATE = re.compile("[\udc80-\udcff]")


def repair_raw_header(value: str) -> str:
    """Header text parsed from raw 8-bit bytes (surrogate-escaped) → real text."""
    if not _HAS_SURROGATE.search(value):
        return value
    raw = value.encode("ascii", "surrogateescape")
    return _guess(raw)[0]
