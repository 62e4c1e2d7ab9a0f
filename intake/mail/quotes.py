"""Reply text without quoted history and signature, for English and Japanese mail. Pure.

An agent's reply goes to the customer without what the agent's mail client quoted below
it (DESIGN 5). The libraries tried on real corpora match badly and none knows the
Japanese quote headers (shared/notes/LIBRARIES.md), so the cut is made here, at the first
line that starts a quote in the forms real clients write:

- ``On Fri, 20 Nov 2026 at 10:00, Taro <taro@example.jp> wrote:`` (also over two lines)
- Gmail (ja) ``2026年11月20日(金) 10:00 山田太郎 <taro@example.jp>:``
- Thunderbird (ja) ``山田 太郎 さんは書きました:``
- Apple Mail (ja) ``2026/11/20 10:00、山田太郎 <taro@example.jp>のメール:``
- Outlook: ``-----Original Message-----`` / ``----- 元のメッセージ -----``, or a block of
  ``From:``/``差出人:`` followed by ``Sent:``/``送信日時:`` lines, often after a line of underscores

Full-width colons are accepted everywhere. Then a trailing block of ``>`` lines, the
signature (after the ``-- `` delimiter) and "Sent from my iPhone" lines are removed.
"""

from __future__ import annotations

import re

_C = r"\s*[:：]\s*$"
_HEADERS = [
    re.compile(r"^\s*on\b.{0,200}\bwrote" + _C, re.I),
    re.compile(r"^.{0,200}\b(wrote|schrieb|a écrit|escribió|scrisse)" + _C, re.I),
    re.compile(r"^\s*\d{4}年\s*\d{1,2}月\s*\d{1,2}日.{0,200}" + r"[:：]\s*$"),
    re.compile(r"^.{0,120}さんは書きました" + _C),
    re.compile(r"^.{0,120}(が|は)書きました" + _C),
    re.compile(r"^\s*\d{4}/\d{1,2}/\d{1,2}.{0,200}のメール" + _C),
    re.compile(r"^\s*-{2,}\s*(original message|元のメッセージ|forwarded message|転送されたメッセージ)\s*-{2,}\s*$", re.I),
]
_OUTLOOK_FROM = re.compile(r"^\s*\*?(from|差出人|送信者)\*?\s*[:：]", re.I)
_OUTLOOK_NEXT = re.compile(r"^\s*\*?(sent|date|to|subject|cc|送信日時|日時|宛先|件名)\*?\s*[:：]", re.I)
_RULE = re.compile(r"^\s*_{5,}\s*$")
_SIGNATURE = re.compile(r"^--\s?$")
_MOBILE = re.compile(r"^\s*(sent from my \w+.*|iphoneから送信|android.*から送信)\s*$", re.I)


def _quote_start(lines: list[str]) -> int | None:
    for i, line in enumerate(lines):
        if any(p.match(line) for p in _HEADERS):
            return i
        # "On Fri, 20 Nov 2026 at 10:00, Taro Yamada\n<taro@example.jp> wrote:" (wrapped)
        if i + 1 < len(lines) and line.lstrip().lower().startswith("on ") and _HEADERS[0].match(
                line.rstrip() + " " + lines[i + 1].strip()):
            return i
        if _OUTLOOK_FROM.match(line) and any(_OUTLOOK_NEXT.match(n) for n in lines[i + 1:i + 5]):
            return i - 1 if i > 0 and _RULE.match(lines[i - 1]) else i
    return None


def strip_reply(text: str) -> str:
    """The new part of a reply: quoted history and signature removed.

    When nothing would be left (a mail that is all quote), the text is returned as it
    was, so that nothing the sender wrote is lost.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    cut = _quote_start(lines)
    if cut is not None:
        lines = lines[:cut]
    while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith(">")):
        lines.pop()
    for i, line in enumerate(lines):
        if _SIGNATURE.match(line):
            lines = lines[:i]
            break
    lines = [line for line in lines if not _MOBILE.match(line)]
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    out = "\n".join(line.rstrip() for line in lines)
    return out if out.strip() else text.strip()
