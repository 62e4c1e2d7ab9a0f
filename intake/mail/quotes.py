"""The new text of a reply: quoted history and signature removed, English and Japanese. Pure.

Agent replies go to the customer, and customer text goes on the timeline, without what the
mail client quoted below them (DESIGN 5). The libraries tried on real corpora match badly
and none knows the Japanese quote headers (shared/notes/LIBRARIES.md), so the cut is made
here, from the forms real clients write:

- reply headers: ``On Fri, 20 Nov 2026 at 10:00, Taro <taro@example.jp> wrote:`` (also
  wrapped over several lines, and in the languages the public corpora use), Gmail (ja)
  ``2026年11月20日(金) 10:00 山田太郎 <taro@example.jp>:``, Thunderbird (ja)
  ``山田 太郎 さんは書きました:``, Apple Mail / iPhone (ja)
  ``2026/11/20 10:00、山田太郎 <taro@example.jp>のメール:``;
- Outlook header blocks (``From:``/``Sent:``/``To:``/``Subject:``,
  ``差出人:``/``送信日時:``/``宛先:``/``件名:``, bold ``*From:*``), often after a line of
  underscores; ``-----Original Message-----``, ``----- 元のメッセージ -----`` and the
  forwarded-message separators (``---------- Forwarded message ---------``,
  ``転送されたメッセージ:``, ``Begin forwarded message:``);
- ``>`` (and ``＞``) quoting; signatures after ``-- ``, mailing-list footers and signature
  blocks after a rule line, "Sent from my iPhone" / ``iPhoneから送信`` lines.

Full-width colons are accepted everywhere. Which quote is cut, and which is kept:

- top-posted reply (text, then a header): everything from the header on is cut;
- bottom-posted reply (a header, a ``>`` quote, then text): the text after the quote;
- interleaved reply (a header, then quote and answers in turn): the answers *and* the
  quoted lines they answer are kept, only the header line and the last quote go, because
  an answer such as "Yes, Tuesday" means nothing without its question;
- a mail that starts with a forwarded (or unquoted) message: its body, without the header;
- if stripping would leave nothing (a mail that is all quote), the whole text is kept.

HTML replies are cut on their structure first (Gmail's ``gmail_quote``, Apple's and
Thunderbird's ``<blockquote type="cite">``, Outlook's ``divRplyFwdMsg`` and the
``border-top`` header box, Yahoo's ``yahoo_quoted``), then turned into text and stripped
like plain text. Every pattern looks at most ``_MAX_LINE`` characters of a line, so the
work stays linear in the size of the mail, whatever it holds.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Collection
from dataclasses import dataclass
from html import unescape

from intake.mail.parse import MAX_HTML_CHARS, html_to_text, without_bulk

__all__ = ["reply_text", "signature_only", "strip_reply"]

# No pattern sees more of a line than this: real header lines are far shorter, and hostile
# megabyte lines then cost no more than ordinary ones.
_MAX_LINE = 400
# How many lines one reply header may be wrapped over (Gmail and Outlook wrap long names).
_HEADER_SPAN = 5
# A mail that starts with a header is looked at again after it this many times (nested
# forwards); then what is left is kept as it is.
_MAX_LEADING = 8

# -- lines ---------------------------------------------------------------------------------

# ">" quoting, full-width "＞" from Japanese mailers, and supercite initials ("JS> ").
_QUOTE = re.compile(r"[ \t]*(?:[>＞]|[A-Za-z]{1,3}>(?=\s|$))")
_RULE_CHARS = "-_=~*+#─━═―‐ー－＿＝～※ᐧ"
_RULE = re.compile(r"[ \t\u3000]*[-_=~*+#─━═―‐ー－＿＝～※]{3,}[ \t\u3000]*$")
# Rules that may open a signature block: long ones (a Markdown "---" is no signature).
_SIG_RULE = re.compile(r"[ \t\u3000]*[-_=~*+#─━═―‐ー－＿＝～※]{8,}[ \t\u3000]*$")
_UNDERSCORE_RULE = re.compile(r"[ \t\u3000]*[_＿]{5,}[ \t\u3000]*$")
_JUNK = re.compile(r"[\s" + re.escape(_RULE_CHARS) + r"]*$")


def _cut(line: str) -> str:
    return line[:_MAX_LINE].strip()


def _blank(line: str) -> bool:
    return not line.strip()


def _quoted(line: str) -> bool:
    return _QUOTE.match(line[:_MAX_LINE]) is not None


# -- reply headers ---------------------------------------------------------------------------

_VERB = (
    r"(?:wrote|writes|schrieb|a\s+écrit|escribió|escreveu|ha\s+scritto|scrisse|schreef|"
    r"het\s+volgende\s+geschreven|geschreven|skrev(?:\s+følgende)?|napisał\(a\)|napisał|"
    r"napisała|написал\(а\)|написала|написал|пише|kirjoitti|napsal|写道|寫道)"
)
_HAS_VERB = re.compile(r"(?i)(?<!\w)" + _VERB + r"(?!\w)")
# The word a reply header starts with in each language, then a date somewhere after it.
_OPENER = re.compile(
    r"(?i)(?:on|le|am|el|em|il|op|den|dnia|w\s+dniu|at|pada|dne|στις)\s"
    r"|\d{4}[-/.年]\s*\d{1,2}"  # 2016-10-24, 2026/11/20, 2026年11月20日
    r"|\d{1,2}[-/.]\s*\d{1,2}[-/.]\s*\d{2,4}\b"  # 20.11.2026, 11/20/26
    r"|\d{1,2}\.?\s+\S{2,12}\s+\d{4}"  # 20 окт. 2016, 23 mar 2017
    r"|[^\W\d_]{2,15},\s*\d"  # понедельник, 6 октября
)
_DIGIT = re.compile(r"\d")
_WROTE_ON = re.compile(r"(?i)\s*(?:on|am|le|el|em|il|op|den)\s+\S*\d")
_SENTENCE = re.compile(r"[.!?。！？]\s|\b(?:to|the|about|that|this|and)\b", re.I)
_EMAIL = re.compile(r"[^\s<>()\[\]]@[^\s<>()\[\]]")
_ENDS_COLON = re.compile(r"[:：]\s*$")
# "On <date>, <name> wrote:" and its translations; the verb may also stand before the
# name ("Am ... schrieb Max <max@example.de>:", "... schrieb am Fr., 28. Apr. 2017 um 11:53 Uhr:").
_ATTRIB_VERB_END = re.compile(r"(?i)(?<!\w)" + _VERB + r"\s*(?:[:：]|-{2,})?\s*$")
# Gmail, and the old Gmail format: the date first, the sender's address last.
_ATTRIB_EMAIL_END = re.compile(r"[^\s<>]@[^\s<>]*\s*>?\s*[:：]\s*$")
_GMAIL_OLD = re.compile(r"\d{4}-\d{2}-\d{2} \d{1,2}:\d{2} GMT[+-]\d{1,2}:\d{2} \S")
_DATE_NAME_EMAIL = re.compile(r"\d{4}/\d{1,2}/\d{1,2} .{1,120}<[^<>\s]+@[^<>\s]+>$")
# Japanese clients: Thunderbird "山田 太郎 さんは書きました:", Apple Mail and iPhone
# "2026/11/20 10:00、山田太郎 <taro@example.jp>のメール:".
_JA_WROTE = re.compile(r"(?:さん|様)(?:は|が)書きました\s*[:：]\s*$")
_JA_MAIL = re.compile(r"の(?:メール|メッセージ)\s*[:：]\s*$")

_SEPARATOR = re.compile(
    r"(?i)[-=]{2,}\s*(?:original\s+message|forwarded\s+message|forwarded\s+e-?mail|"
    r"ursprüngliche\s+nachricht|weitergeleitete\s+nachricht|mensaje\s+original|"
    r"mensaje\s+reenviado|message\s+d'origine|message\s+original|message\s+transféré|"
    r"messaggio\s+originale|messaggio\s+inoltrato|oorspronkelijk\s+bericht|"
    r"doorgestuurd\s+bericht|originalmeddelande|vidarebefordrat\s+meddelande|"
    r"opprinnelig\s+melding|videresendt\s+melding|исходное\s+сообщение|"
    r"пересылаемое\s+сообщение|wiadomość\s+oryginalna|元のメッセージ|元のメール|"
    r"転送されたメッセージ|転送メッセージ|転送メール|オリジナルメッセージ|原始邮件|转发的邮件)\s*[-=]{2,}\s*$"
)
_BEGIN_FORWARD = re.compile(
    r"(?i)(?:begin\s+forwarded\s+message|転送されたメッセージ|転送メッセージ|"
    r"anfang\s+der\s+weitergeleiteten\s+nachricht|début\s+du\s+message\s+réexpédié|"
    r"inicio\s+del\s+mensaje\s+reenviado)\s*[:：]\s*$"
)

_FROM_NAMES = r"from|von|de|da|från|fra|van|от|od|lähettäjä|差出人|送信者|送信元|発信者"
_FIELD_NAMES = (
    r"sent|date|to|cc|bcc|subject|reply-to|gesendet|datum|an|betreff|envoyé|à|objet|"
    r"enviado|fecha|para|asunto|inviato|data|a|oggetto|risposta|skickat|till|ämne|kopia|"
    r"sendt|til|emne|verzonden|aan|onderwerp|отправлено|кому|тема|дата|wysłano|do|temat|"
    r"送信日時|送信日|日時|日付|宛先|件名|返信先"
)
_FIELD_TAIL = r")[ \t\u3000]*\**[ \t\u3000]*[:：]"
_FROM_FIELD = re.compile(r"(?i)[ \t]*\**[ \t]*(?:" + _FROM_NAMES + _FIELD_TAIL)
_ANY_FIELD = re.compile(r"(?i)[ \t]*\**[ \t]*(?:" + _FROM_NAMES + "|" + _FIELD_NAMES + _FIELD_TAIL)


def _attribution_end(lines: list[str], i: int) -> int | None:
    """The last line of a reply header ("On … wrote:") that starts at line ``i``, or None."""
    first = _cut(lines[i]).strip("-*_ \t")
    if not first:
        return None
    opener = _OPENER.match(first) is not None
    verb = _HAS_VERB.search(first) is not None
    japanese = "書きました" in first or "のメ" in first
    email = _EMAIL.search(first) is not None
    if not (opener or verb or japanese or email):
        return None
    # Zoho: "---- On Tue, 22 Dec 2015 14:17:36 +0530 Sam <sam@example.com> wrote ----"
    dashed = _cut(lines[i]).startswith("--")
    if not _ENDS_COLON.search(first) and not dashed:
        # Headers without a final colon: the old Gmail and Android forms.
        if _GMAIL_OLD.match(first) or _DATE_NAME_EMAIL.match(first):
            return i
    joined = first
    for j in range(i, min(i + _HEADER_SPAN, len(lines))):
        if j > i:
            nxt = _cut(lines[j])
            if not nxt:
                continue
            # A header wraps over a few short pieces; a second sentence, or a line that
            # starts a header itself, is not one of them.
            if not (opener or verb or email) or _OPENER.match(nxt):
                return None
            joined = f"{joined} {nxt}"
        if not (_ENDS_COLON.search(joined) or (dashed and j == i)):
            continue
        if _is_attribution(joined, opener, single=j == i):
            return j
        return None
    return None


def _is_attribution(text: str, opener: bool, single: bool) -> bool:
    text = re.sub(r"\s+", " ", text)
    if len(text) > 2 * _MAX_LINE:
        return False
    has_date = _DIGIT.search(text) is not None
    has_email = _EMAIL.search(text) is not None
    if _JA_WROTE.search(text):
        return len(text) <= 200
    if _JA_MAIL.search(text):
        return len(text) <= 200 and (has_email or (opener and has_date))
    if _ATTRIB_VERB_END.search(text):
        if (opener and has_date) or has_email:
            return True
        # "Richard wrote:" — a bare name; only as one short line.
        head = _ATTRIB_VERB_END.sub("", text)
        return single and len(head.split()) <= 6 and len(text) <= 120
    verbs = list(_HAS_VERB.finditer(text))
    if verbs:
        # The verb inside: "X <x@example.de> schrieb am Fr., 28. Apr. 2017 um 11:53 Uhr:",
        # "Am 20.11.26 um 10:00 schrieb Hanako Sato:", Thunderbird's "X wrote on 11/20/26
        # 10:00:". After the verb only a date or the sender's name, never a sentence.
        tail = text[verbs[-1].end():]
        if len(tail) > 80:
            return False
        if _WROTE_ON.match(tail) and has_date:
            return len(text) <= 150
        named = len(tail.split()) <= 6 and not _SENTENCE.search(tail)
        return bool(_DIGIT.search(tail) or _EMAIL.search(tail) or named) and (has_email or (opener and has_date))
    if _ATTRIB_EMAIL_END.search(text) and opener and has_date:
        return True  # Gmail: "2026年11月20日(金) 10:00 山田太郎 <taro@example.jp>:"
    return False


def _fields_end(lines: list[str], i: int) -> int | None:
    """Index of the last line of a header-field block starting at ``i`` (From:/Sent:/…)."""
    last = None
    fields = 0
    for j in range(i, min(i + 12, len(lines))):
        line = lines[j][:_MAX_LINE]
        if _blank(line):
            break
        if _ANY_FIELD.match(line):
            fields += 1
            last = j
        elif last is None:
            return None
        else:
            last = j  # a field wrapped onto the next line (long To: or Subject:)
    return last if fields else None


def _outlook_block(lines: list[str], i: int) -> int | None:
    """End of an Outlook-style header block that starts at line ``i`` with ``From:``."""
    if not _FROM_FIELD.match(lines[i][:_MAX_LINE]):
        return None
    others = 0
    for j in range(i + 1, min(i + 8, len(lines))):
        line = lines[j][:_MAX_LINE]
        if _blank(line):
            break
        if _ANY_FIELD.match(line):
            others += 1
    if others < 2:
        return None
    return _fields_end(lines, i)


def _after_separator(lines: list[str], i: int) -> int:
    """A separator line, and the From:/Date:/… block that usually follows it."""
    j = i + 1
    while j < len(lines) and j <= i + 3 and _blank(lines[j]):
        j += 1
    if j < len(lines):
        end = _fields_end(lines, j)
        if end is not None:
            return end
    return i


def _find_header(lines: list[str], start: int) -> tuple[int, int] | None:
    """First reply or forward header at or after ``start``, outside ``>`` quotes:
    (first line, last line)."""
    for i in range(start, len(lines)):
        line = lines[i]
        if _blank(line) or _quoted(line):
            continue
        text = _cut(line).strip("*")
        if _SEPARATOR.match(text) or _BEGIN_FORWARD.match(text):
            return i, _after_separator(lines, i)
        end = _outlook_block(lines, i)
        if end is not None:
            return _with_rule_above(lines, i, start), end
        end = _attribution_end(lines, i)
        if end is not None:
            return i, end
    return None


def _with_rule_above(lines: list[str], i: int, start: int) -> int:
    """Outlook draws a line of underscores (or dashes) above its header block."""
    j = i - 1
    while j >= start and _blank(lines[j]) and j > i - 4:
        j -= 1
    if j >= start and _RULE.match(lines[j][:_MAX_LINE]):
        return j
    return i


# -- signatures ------------------------------------------------------------------------------

_SIG_DELIMITER = re.compile(r"--[ \t]?$")
_MOBILE = re.compile(
    r"(?i)(?:"
    r"[(<\[]{0,2}\s*sent\s+(?:from|via|with|using)\s+(?:my\s+)?[^,;:!?()<>\[\]]{1,50}?[.!]?"
    r"\s*(?:<[^<>\s]{0,300}>|\(\S{0,300}\)|\[\S{0,300}\])?\s*[)>\]]{0,2}"
    r"|get\s+outlook\s+for\s+(?:ios|android)\S{0,300}"
    r"|(?:ios|android)\s*版\s*outlook\s*(?:<[^<>\s]{0,300}>)?\s*を入手"
    r"|von\s+meinem\s+.{1,40}\s+gesendet"
    r"|envoyé\s+(?:de|depuis)\s+(?:mon|ma)\s+.{1,40}"
    r"|enviado\s+(?:desde|de|do)\s+(?:mi|meu)\s+.{1,40}"
    r"|inviato\s+da(?:l\s+mio)?\s+.{1,40}"
    r"|(?:sendt\s+fra|skickat\s+från)\s+min\s+.{1,40}"
    r"|verzonden\s+(?:vanaf|met|van)\s+.{1,40}"
    r"|(?:從我的|从我的|发自我的).{1,30}"
    r"|[^。、！？!?]{0,20}(?:iphone|ipad|android|galaxy|xperia|aquos|arrows|pixel|"
    r"ドコモ|docomo|au|softbank|ソフトバンク|携帯|スマートフォン|スマホ|モバイル|outlook|yahoo!?|gmail)"
    r"[^。、！？!?]{0,20}(?:から|より)送信(?:されました|しました)?"
    r")\s*$"
)
# What a signature block below a rule line holds: an address, a phone, a company.
_CONTACT = re.compile(
    r"(?i)@|https?://|www\.|\b(?:tel|fax|phone|mobile|mail)\b|電話|携帯|〒|株式会社|有限会社|"
    r"合同会社|㈱|\b(?:inc|ltd|llc|gmbh|corp)\b|\d{2,4}-\d{2,4}-\d{3,4}"
)
_SIG_BLOCK_LINES = 12


def _signature_start(lines: list[str]) -> int | None:
    """Where a signature starts: a ``-- `` line, a "Sent from my …" line, or a rule line
    with a short signature block below it; only below some text of the reply."""
    nonblank = [k for k, line in enumerate(lines) if not _blank(line)]
    if not nonblank:
        return None
    # A signature block below a rule is short: only rules among the last lines count.
    tail_from = nonblank[-_SIG_BLOCK_LINES - 1] if len(nonblank) > _SIG_BLOCK_LINES else 0
    seen_text = False
    for k, line in enumerate(lines):
        if _blank(line):
            continue
        if seen_text and not _quoted(line):
            text = line[:_MAX_LINE]
            if _SIG_DELIMITER.match(text) or _MOBILE.match(text.strip()):
                return k
            if k >= tail_from and (_SIG_RULE.match(text) or _UNDERSCORE_RULE.match(text)) and _signature_block(lines, k):
                return k
        seen_text = True
    return None


def _signature_block(lines: list[str], k: int) -> bool:
    block = [line[:_MAX_LINE] for line in lines[k + 1:] if not _blank(line)]
    if not block or any(_quoted(line) for line in block):
        return False
    if any(len(line.strip()) > 100 for line in block):
        return False
    if _UNDERSCORE_RULE.match(lines[k][:_MAX_LINE]):
        return True  # underscores: Outlook, mailing-list footers, signatures
    return any(_CONTACT.search(line) for line in block)


_SENTENCE_END = re.compile(r"[。．.!?！？]\s*$")


def signature_only(text: str, names: Collection[str]) -> bool:
    """Whether ``text`` holds nothing but its writer's signature (``names``: how the writer
    is called, e.g. ``山田 花子``): what is left of an agent's mail of commands once they are
    taken out. A short block starting with the name, a rule line or contact details, of
    rule lines, contact lines, the name and short lines that end no sentence."""
    lines = [line.strip() for line in text.split("\n") if not _blank(line)]
    if not lines:
        return True
    if len(lines) > _SIG_BLOCK_LINES:
        return False
    tokens = {t for n in names for t in [n.replace(" ", "").replace("\u3000", ""), *n.split()] if len(t) >= 2}

    def kind(line: str) -> str:
        flat = line.replace(" ", "").replace("\u3000", "")
        if _SIG_RULE.match(line) or _UNDERSCORE_RULE.match(line) or _SIG_DELIMITER.match(line):
            return "rule"
        if _CONTACT.search(line) or _MOBILE.match(line):
            return "contact"
        if any(t in flat or t in line for t in tokens) and len(line) <= 40:
            return "name"
        return "short" if len(line) <= 30 and not _SENTENCE_END.search(line) else "text"

    kinds = [kind(line) for line in lines]
    return kinds[0] != "short" and "text" not in kinds


# -- the cut ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    quoted: bool
    start: int
    end: int  # exclusive
    count: int  # non-blank lines


def _runs(lines: list[str], start: int, stop: int, limit: int = 0) -> list[_Run]:
    """Alternating runs of quoted and unquoted lines in ``lines[start:stop]``; blank lines
    belong to no run. With ``limit``, stops once that many runs are complete."""
    runs: list[_Run] = []
    for k in range(start, stop):
        line = lines[k]
        if _blank(line):
            continue
        q = _quoted(line)
        if runs and runs[-1].quoted == q:
            last = runs[-1]
            runs[-1] = _Run(q, last.start, k + 1, last.count + 1)
        else:
            if limit and len(runs) == limit:
                break
            runs.append(_Run(q, k, k + 1, 1))
    return runs


def _interleaved(runs: list[_Run], above: int) -> bool:
    """After a header, a quote and then answers: inline replies, not a quote to cut.

    True when an answer is followed by more quote (question, answer, question …), or when
    the text below the quote is longer than the text above the header (at least 3 lines):
    a short tail under a top-posted reply is a footer, not an answer.
    """
    if not runs or not runs[0].quoted:
        return False
    texts = [r for r in runs if not r.quoted]
    if not texts:
        return False
    if any(r.quoted for r in runs[runs.index(texts[0]) + 1:]):
        return True
    tail = texts[-1].count
    return tail >= 3 and tail >= above


def _finish(lines: list[str]) -> list[str]:
    """Drop the trailing quote, the signature and trailing rule lines, and blank ends."""
    out = list(lines)
    for _ in range(4):
        size = len(out)
        while out and (_blank(out[-1]) or _quoted(out[-1])):
            out.pop()
        cut = _signature_start(out)
        if cut is not None:
            del out[cut:]
        while out and _JUNK.match(out[-1][:_MAX_LINE]):
            out.pop()
        if len(out) == size:
            break
    while out and _blank(out[0]):
        out.pop(0)
    return out


def _new_lines(lines: list[str]) -> list[str]:
    """The lines the sender wrote, or none when all is quote (the caller keeps all then)."""
    start = 0
    for _ in range(_MAX_LEADING):
        found = _find_header(lines, start)
        if found is None:
            return _finish(lines[start:])
        first, last = found
        above = sum(1 for line in lines[start:first] if not _blank(line))
        rest = last + 1
        if above:
            # A signature or list footer below the quote is no answer to it.
            sig = _signature_start(lines[rest:])
            runs = _runs(lines, rest, len(lines) if sig is None else rest + sig)
            if _interleaved(runs, above):
                # Keep the answers and what they answer; only the header line goes.
                return _finish(lines[start:first] + lines[rest:])
            return _finish(lines[start:first])
        # The mail starts with a header: the first three runs tell what follows it.
        runs = _runs(lines, rest, len(lines), limit=3)
        if not runs:
            return []
        if runs[0].quoted:
            if len(runs) == 1:
                return []  # all quote: nothing new
            if len(runs) == 3:
                return _finish(lines[rest:])  # quote, answer, quote: inline answers
            start = runs[1].start  # bottom-posted: the reply is under the quote
        else:
            start = rest  # a forwarded (or unquoted) message: its body is the content
    return _finish(lines[start:])


def _lines(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _join(lines: list[str]) -> str:
    return "\n".join(lines).strip("\n").rstrip()


def strip_reply(text: str) -> str:
    """The new part of a plain-text reply: quoted history and signature removed.

    When nothing would be left (a mail that is all quote), the whole text is returned
    (line ends normalised, blank lines at both ends removed), so that nothing the sender
    wrote is lost.
    """
    lines = _lines(text)
    out = _join(_new_lines(lines))
    return out if out.strip() else _join(lines).strip()


# -- HTML ------------------------------------------------------------------------------------

# Containers whose content is the quoted mail (cut when nothing the sender wrote follows).
_QUOTE_CLASSES = frozenset({
    "gmail_quote", "gmail_quote_container", "yahoo_quoted", "moz-cite-prefix",
    "protonmail_quote", "zmail_extra", "outlookmessageheader",
})  # fmt: skip
# Markers after which everything is quoted (Outlook puts the quoted mail beside them).
_CUT_IDS = ("divrplyfwdmsg", "appendonsend", "mail-editor-reference-message-container", "stopspelling")
_CUT_CLASSES = frozenset({"ms-outlook-mobile-reference-message"})
# Signatures written by the client, before the quote: dropped wherever they are.
_SIGNATURE_CLASSES = frozenset({"gmail_signature", "moz-signature"})
# Cheap test before any parsing: HTML without these words has no structure we know.
_HTML_MARKERS = (
    "gmail_", "yahoo_quoted", "moz-", "protonmail_quote", "zmail_extra", "outlookmessageheader",
    "divrplyfwdmsg", "appendonsend", "reference-message", "stopspelling", "cite", "border-top",
    "signature",
)  # fmt: skip
_OUTLOOK_BOX = re.compile(r"(?i)border-top\s*:\s*solid")
_FIELD_START = re.compile(r"(?i)\s*(?:" + _FROM_NAMES + r")\s*[:：]")
# Only these elements can be marks (or hide text); other tags are skipped as text markup.
# The alternatives start differently and none crosses a "<" it did not open, so a failed
# match costs no more than the text up to the next "<": the scan stays linear. The
# attributes' repeat is possessive (*+): each of its steps starts with a different
# character, so giving one back never finds the ">", and the regex engine kept a record
# of every step for nothing (about 200 bytes a character: 4 MB in one <div ...> took
# 886 MB).
_TOKEN = re.compile(
    r"<!--.*?(?:-->|\Z)"
    r"|<(script|style|head|title)\b[^<>]*>.*?(?:</\1\s*>|\Z)"
    r"|<(/?)(div|blockquote|hr|pre)\b((?:[^<>\"']|\"[^<\"]*\"|'[^<']*')*+)>",
    re.S | re.I,
)
_ANY_TAG = re.compile(r"<[^<>]*>")
_ATTR = re.compile(r"""([a-zA-Z_:][-a-zA-Z0-9_:.]*)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""")


@dataclass
class _Mark:
    kind: str  # "quote" (a container), "cut" (everything after), "sig", "box" (Outlook)
    start: int
    end: int


def _attrs(raw: str) -> dict[str, str]:
    return {m[1].lower(): unescape(m[2] or m[3] or m[4] or "") for m in _ATTR.finditer(raw)}


# Attribute text that may make a tag one of the marks: most tags are looked at no further.
_MARK_HINT = re.compile(r"(?i)quot|cite|rplyfwd|appendonsend|reference-message|signature|border-top|moz-|zmail")


def _mark_kind(tag: str, raw: str) -> str | None:
    if not _MARK_HINT.search(raw):
        return None
    a = _attrs(raw)
    classes = set(a.get("class", "").lower().split())
    ident = a.get("id", "").lower()
    if any(marker in ident for marker in _CUT_IDS) or classes & _CUT_CLASSES:
        return "cut"
    if classes & _SIGNATURE_CLASSES or a.get("data-smartmail") == "gmail_signature" or ident == "signature":
        return "sig"
    if (
        classes & _QUOTE_CLASSES
        or any("yahoo_quoted" in c for c in classes)  # Yahoo prefixes it: "ydp4f…yahoo_quoted"
        or (tag == "blockquote" and a.get("type", "").lower() == "cite")
    ):
        return "quote"
    if tag == "div" and _OUTLOOK_BOX.search(a.get("style", "")):
        return "box"  # Outlook's header box, if a From: line follows (checked later)
    return None


def _scan(html: str) -> tuple[list[_Mark], list[tuple[int, str]]]:
    """One pass over the tags that matter: the marked elements (with where they end) and
    every piece of visible text with its offset."""
    marks: list[_Mark] = []
    texts: list[tuple[int, str]] = []
    depth: dict[str, int] = {}  # how many elements of each tag are open
    waiting: dict[str, list[tuple[int, _Mark]]] = {}  # tag → (its depth, mark) not yet closed

    def text(start: int, end: int) -> None:
        piece = _ANY_TAG.sub("", html[start:end])
        if "&" in piece:
            piece = unescape(piece)
        if piece.strip():
            texts.append((start, piece))

    pos = 0
    for m in _TOKEN.finditer(html):
        if m.start() > pos:
            text(pos, m.start())
        pos = m.end()
        tag = m[3]
        if tag is None:
            continue  # a comment, a script, a style: nothing shown
        tag = tag.lower()
        if m[2] != "/":
            if tag == "hr":
                if "stopspelling" in m[4].lower():
                    marks.append(_Mark("cut", m.start(), len(html)))
                continue
            level = depth[tag] = depth.get(tag, 0) + 1
            kind = _mark_kind(tag, m[4])
            if kind:
                mark = _Mark(kind, m.start(), len(html))
                marks.append(mark)
                waiting.setdefault(tag, []).append((level, mark))
            continue
        level = depth.get(tag, 0)
        if not level:
            continue  # a stray end tag
        stack = waiting.get(tag)
        if stack and stack[-1][0] == level:
            stack.pop()[1].end = m.end()
        depth[tag] = level - 1
    if pos < len(html):
        text(pos, len(html))
    return marks, texts


# Marks put into the HTML where the quote starts and around client signatures, so that one
# html_to_text pass gives both the whole text (to compare with the plain part) and the
# reply. Characters of plane 16's private use area: no mail client writes them (Japanese
# carriers' emoji live in the BMP's private use area, U+E001 onwards).
_CUT_MARK, _SIG_OPEN, _SIG_CLOSE = "\U0010fffb", "\U0010fffc", "\U0010fffd"
_SIG_SPAN = re.compile(_SIG_OPEN + "[^" + _SIG_CLOSE + "]*(?:" + _SIG_CLOSE + "|$)")
_MARKS = re.compile("[" + _CUT_MARK + _SIG_OPEN + _SIG_CLOSE + "]")


def _marked_html(html: str) -> str | None:
    """The HTML with the quote's start and the client signatures marked, or None when it
    holds no quote structure we know."""
    lowered = html.lower()
    if not any(marker in lowered for marker in _HTML_MARKERS) or _MARKS.search(html):
        return None
    marks, texts = _scan(html)
    offsets = [off for off, _ in texts]

    def text_after(pos: int, limit: int) -> str:
        out = ""
        for i in range(bisect_left(offsets, pos), len(texts)):
            out += texts[i][1]
            if len(out.strip()) >= limit:
                break
        return out

    cut = None
    for mark in marks:
        if mark.kind == "cut":
            cut = mark.start
        elif mark.kind == "box" and _FIELD_START.match(text_after(mark.start, 40)):
            cut = mark.start
        elif mark.kind == "quote" and not text_after(mark.end, 1).strip():
            cut = mark.start  # the quote ends the mail; a quote with answers below is kept
        if cut is not None:
            break
    inserts = [(m.start, _SIG_OPEN) for m in marks if m.kind == "sig" and (cut is None or m.start < cut)]
    inserts += [(m.end, _SIG_CLOSE) for m in marks if m.kind == "sig" and (cut is None or m.end <= cut)]
    if cut is not None:
        inserts.append((cut, _CUT_MARK))
    if not inserts:
        return None
    out, pos = [], 0
    for at, mark_char in sorted(inserts):
        out.append(html[pos:at])
        out.append(mark_char)
        pos = at
    out.append(html[pos:])
    return "".join(out)


def _same_text(a: str, b: str) -> bool:
    return a.split() == b.split()


def reply_text(text: str, html: str | None = None) -> str:
    """The new text of a reply, for the timeline and for mail sent on.

    When the mail has HTML and its plain text is missing or is only that HTML turned into
    text, the quote is cut on the HTML structure and the rest turned into text; otherwise
    the plain text is stripped (``strip_reply``). Nothing is ever lost: when stripping
    would leave nothing, the whole text is returned.
    """
    if not html or not html.strip():
        return strip_reply(text)
    # The text is made from the first MAX_HTML_CHARS only (parse.html_to_text): the quote
    # structure is looked for in no more, so a huge HTML body costs no more here either.
    html = without_bulk(html)[:MAX_HTML_CHARS]
    try:
        marked = _marked_html(html)
    except ValueError:
        # html.unescape raises on a decimal character reference of more than 4,300
        # digits (int()'s limit): such HTML is read without its structure.
        marked = None
    if marked is None:
        # No structure: cutting the HTML's text or the plain text is the same work.
        return strip_reply(text if text.strip() else html_to_text(html))
    rendered = html_to_text(marked)
    full = _MARKS.sub("", rendered)
    if text.strip() and not _same_text(text, full):
        return strip_reply(text)  # a plain-text part of its own: the sender's client wrote it
    reply = _MARKS.sub("", _SIG_SPAN.sub("", rendered.partition(_CUT_MARK)[0]))
    out = _join(_new_lines(_lines(reply)))
    return out if out.strip() else strip_reply(full)
