"""Parsing of hand-made mails, built as exact bytes, for every item of issue 2 part 4.

Japanese mail is everyday input: ISO-2022-JP with the Windows (NEC/IBM) characters,
Shift_JIS/CP932, raw 8-bit headers, mislabelled charsets. Each test builds the bytes a
real mail program sends and checks what an agent would see.
"""

from __future__ import annotations

import base64
import email.quoprimime
import hashlib
from email import message_from_bytes
from email.policy import compat32

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intake.mail.parse import decode_header_value, html_to_text, normalize_text, parse

# ISO-2022-JP as Windows mail programs write it: JIS X 0208 plus Microsoft's rows.
ESC_KANJI, ESC_ASCII, ESC_KANA = b"\x1b$B", b"\x1b(B", b"\x1b(I"
JIS_MARU1 = b"-!"  # ① (NEC row 13)
JIS_KABU = b"-j"  # ㈱ (NEC row 13)
JIS_TAKA = b"|b"  # 髙 (NEC-selected IBM extension)
JIS_KANA = b"6@6E"  # ｶﾀｶﾅ as 7-bit half-width katakana


def mail(*headers: str | bytes, body: bytes = b"Hello\r\n") -> bytes:
    """A mail from header lines (str is ASCII, bytes as given) and a body, with CRLF."""
    lines = [h if isinstance(h, bytes) else h.encode("ascii") for h in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def b_word(text: str, charset: str) -> str:
    return f"=?{charset}?B?{base64.b64encode(text.encode(_codec(charset))).decode()}?="


def q_word(text: str, charset: str) -> str:
    return email.quoprimime.header_encode(text.encode(_codec(charset)), charset)


def _codec(charset: str) -> str:
    return {"shift_jis": "cp932", "ks_c_5601-1987": "cp949"}.get(charset.lower(), charset)


BASE = ("From: Alice <alice@example.org>", "To: support@example.com", "Message-ID: <m1@example.org>")


# --- RFC 2047 encoded words ---------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "encode", "text"),
    [
        ("UTF-8", b_word, "お問い合わせ ① Grüße"),
        ("ISO-2022-JP", b_word, "お問い合わせの件"),
        ("Shift_JIS", b_word, "髙橋です～ ㈱テスト"),
        ("EUC-JP", b_word, "日本語の件名"),
        ("ISO-8859-1", q_word, "Café crème"),
        ("windows-1252", q_word, "“Quotes” – 5 €"),
        ("KS_C_5601-1987", b_word, "안녕하세요"),
        ("GB2312", b_word, "你好，订单"),
        ("KOI8-R", q_word, "Привет"),
    ],
)
def test_encoded_words_in_any_charset_are_decoded(charset: str, encode, text: str) -> None:
    raw = mail(
        f"From: {encode('山田 太郎' if 'JP' in charset.upper() or 'JIS' in charset.upper() else 'Ann Lee', charset)} <a@example.jp>",
        "To: support@example.com",
        f"Subject: {encode(text, charset)}",
        "Message-ID: <m@example.jp>",
    )
    m = parse(raw)
    assert m.subject == text
    assert m.from_ is not None and m.from_.address == "a@example.jp"
    assert m.from_.name in ("山田 太郎", "Ann Lee")
    assert not [d for d in m.defects if "header" in d]


def test_adjacent_encoded_words_join_even_when_a_character_is_split() -> None:
    whole = "日本語の件名です".encode()
    # Cut inside the second character, as some mailers fold long subjects.
    first, second = base64.b64encode(whole[:4]).decode(), base64.b64encode(whole[4:]).decode()
    sjis = "髙橋～".encode("cp932")
    raw = mail(
        *BASE,
        f"Subject: Re: =?UTF-8?B?{first}?=\r\n =?UTF-8?B?{second}?= /\r\n"
        f"\t=?Shift_JIS?B?{base64.b64encode(sjis[:3]).decode()}?= =?Shift_JIS?B?{base64.b64encode(sjis[3:]).decode()}?=",
    )
    # The white space between adjacent words goes, the space before ordinary text stays.
    assert parse(raw).subject == "Re: 日本語の件名です /\t髙橋～"


def test_iso_2022_jp_words_side_by_side() -> None:
    raw = mail(*BASE, f"Subject: {b_word('お見積り', 'iso-2022-jp')} {b_word('のお願い', 'iso-2022-jp')} (2)")
    assert parse(raw).subject == "お見積りのお願い (2)"


def test_a_broken_encoded_word_never_raises() -> None:
    raw = mail(*BASE, "Subject: =?utf-8?B?5pel5pys!!!?= =?x-unknown?Q?abc?= =?utf-8?Q?ok?=")
    m = parse(raw)
    assert "ok" in m.subject or "5pel" in m.subject
    assert decode_header_value("=?utf-8?B?====?=") is not None


# --- raw 8-bit header text -----------------------------------------------------------


def test_raw_utf8_headers() -> None:
    raw = mail(
        "From: 山田 太郎 <taro@example.jp>".encode(),
        "To: サポート <support@example.com>".encode(),
        "Subject: ログインできません ①".encode(),
        "Message-ID: <r1@example.jp>",
        "Content-Type: text/plain; charset=utf-8",
        body="本文です\r\n".encode(),
    )
    m = parse(raw)
    assert m.subject == "ログインできません ①"
    assert (m.from_.name, m.from_.address) == ("山田 太郎", "taro@example.jp")
    assert [(a.name, a.address) for a in m.to] == [("サポート", "support@example.com")]
    assert m.text == "本文です\n"


def test_raw_shift_jis_headers_including_bytes_that_look_like_a_backslash() -> None:
    # 表 and ソ end in 0x5C: read as ASCII that is an escaping backslash in a display name.
    raw = mail(
        "From: 表示ソフト 髙橋 <takahashi@example.jp>".encode("cp932"),
        "To: support@example.com",
        "Subject: 請求書の件～ ㈱テスト".encode("cp932"),
        "Message-ID: <r2@example.jp>",
        "Content-Type: text/plain; charset=Shift_JIS",
        body="よろしくお願いします\r\n".encode("cp932"),
    )
    m = parse(raw)
    assert m.subject == "請求書の件～ ㈱テスト"
    assert (m.from_.name, m.from_.address) == ("表示ソフト 髙橋", "takahashi@example.jp")
    assert m.text == "よろしくお願いします\n"


def test_raw_latin1_header_is_read_with_the_charset_the_body_declares() -> None:
    raw = mail(
        *BASE,
        "Subject: Grüße aus Köln".encode("latin-1"),
        "Content-Type: text/plain; charset=iso-8859-1",
        body="Schöne Grüße\r\n".encode("latin-1"),
    )
    m = parse(raw)
    assert m.subject == "Grüße aus Köln"
    assert m.text == "Schöne Grüße\n"


# --- ISO-2022-JP ---------------------------------------------------------------------


def test_iso_2022_jp_with_nec_ibm_characters_and_half_width_kana() -> None:
    body = (
        "お世話になっております。\r\n".encode("iso-2022-jp")
        + ESC_KANJI + JIS_MARU1 + JIS_KABU + JIS_TAKA + b"66" + ESC_ASCII + b"\r\n"  # ①㈱髙橋
        + ESC_KANA + JIS_KANA + ESC_ASCII + b" OK\r\n"
    )
    subject = base64.b64encode(ESC_KANJI + JIS_MARU1 + JIS_TAKA + b"66" + ESC_ASCII).decode()
    raw = mail(
        *BASE,
        f"Subject: =?ISO-2022-JP?B?{subject}?=",
        "Content-Type: text/plain; charset=ISO-2022-JP",
        "Content-Transfer-Encoding: 7bit",
        body=body,
    )
    m = parse(raw)
    assert m.subject == "①髙橋"
    assert m.text == "お世話になっております。\n①㈱髙橋\nｶﾀｶﾅ OK\n"
    assert "\ufffd" not in m.text
    assert "iso-2022-jp" in m.charsets


def test_iso_2022_jp_body_without_a_charset_parameter() -> None:
    body = ESC_KANJI + b"K\\J8$G$9" + ESC_ASCII + b"\r\n"  # 本文です
    for content_type in ("Content-Type: text/plain", None):
        headers = (*BASE, "Subject: test") + ((content_type,) if content_type else ())
        assert parse(mail(*headers, body=body)).text == "本文です\n"


def test_iso_2022_jp_labelled_us_ascii_is_still_read_and_noted() -> None:
    raw = mail(*BASE, "Subject: x", "Content-Type: text/plain; charset=us-ascii", body=ESC_KANJI + b"K\\J8" + ESC_ASCII)
    m = parse(raw)
    assert m.text == "本文"
    assert any("ISO-2022-JP" in d for d in m.defects)


# --- Shift_JIS / CP932 ---------------------------------------------------------------


def test_shift_jis_with_windows_characters() -> None:
    text = "髙橋様\r\n納期は10日～15日です。①②③ ㈱サンプル ｶﾀｶﾅ\r\n"
    raw = mail(
        *BASE,
        f"Subject: {b_word('納期～', 'shift_jis')}",
        "Content-Type: text/plain; charset=Shift_JIS",
        "Content-Transfer-Encoding: 8bit",
        body=text.encode("cp932"),
    )
    m = parse(raw)
    assert m.text == text.replace("\r\n", "\n")
    assert m.subject == "納期～"
    # Rules match the wave dash and the full-width tilde alike.
    assert normalize_text("10日〜15日") == normalize_text("10日～15日")


def test_shift_jis_body_quoted_printable_and_base64() -> None:
    text = "髙島屋の件です\n"
    for cte, encoded in (
        ("base64", base64.encodebytes(text.encode("cp932"))),
        ("quoted-printable", email.quoprimime.body_encode(text.encode("cp932").decode("latin-1")).encode("latin-1")),
    ):
        raw = mail(*BASE, "Subject: x", "Content-Type: text/plain; charset=shift_jis", f"Content-Transfer-Encoding: {cte}", body=encoded)
        assert parse(raw).text == text


# --- wrong and unknown charsets --------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "body", "expected", "defect"),
    [
        ("us-ascii", "Grüße, 日本語".encode(), "Grüße, 日本語", "not valid us-ascii"),
        ("x-unknown-charset", "日本語のテキスト".encode(), "日本語のテキスト", "unknown charset 'x-unknown-charset'"),
        ("iso-2022-jp", "髙橋です".encode("cp932"), "髙橋です", "declared iso-2022-jp but has 8-bit bytes"),
        ("utf-8", "Schöne Grüße".encode("latin-1"), "Schöne Grüße", "not valid utf-8"),
        ("utf-8", "Grüße ".encode() + "Müller".encode("latin-1"), "Grüße Müller", "not valid utf-8"),
        ("shift_jis", "日本語".encode("euc-jp") + b"\xff\xfe", None, "not valid shift_jis"),
    ],
)
def test_wrong_or_unknown_charset_gives_the_best_decoding_and_a_defect(
    declared: str, body: bytes, expected: str | None, defect: str
) -> None:
    raw = mail(*BASE, "Subject: x", f"Content-Type: text/plain; charset={declared}", body=body)
    m = parse(raw)
    if expected is not None:
        assert m.text == expected
    assert isinstance(m.text, str) and m.text
    assert any(defect in d for d in m.defects), m.defects


def test_unknown_charset_in_an_encoded_word() -> None:
    raw = mail(*BASE, f"Subject: =?x-unknown-jp?B?{base64.b64encode('件名'.encode()).decode()}?=")
    m = parse(raw)
    assert m.subject == "件名"
    assert any("unknown charset" in d for d in m.defects)


# --- HTML-only mail ---------------------------------------------------------------------

HTML = """<html><head><title>Newsletter title</title>
<style>p { color: red }</style><script>alert("x")</script></head>
<body><div>Hello&nbsp;Taro,</div><div><br></div><div>Thanks &amp; regards &lt;Support&gt; &#x2460;</div>
<p>Your order <b>#1234</b> is <a href="https://shop.example.com/o/1234">here</a>.</p>
<ul><li>First item</li><li>Second item</li></ul>
<ol><li>one</li><li>two</li></ol>
<blockquote>quoted line<br>second line</blockquote>
<p>日本語の段落です。</p>
</body></html>"""


def test_html_only_mail_becomes_readable_text() -> None:
    raw = mail(*BASE, "Subject: x", "Content-Type: text/html; charset=utf-8", body=HTML.encode())
    m = parse(raw)
    assert m.html is not None and "<ul>" in m.html
    assert m.text == (
        "Hello Taro,\n"
        "\n"
        "Thanks & regards <Support> ①\n"
        "\n"
        "Your order #1234 is here <https://shop.example.com/o/1234>.\n"
        "\n"
        "- First item\n"
        "- Second item\n"
        "1. one\n"
        "2. two\n"
        "> quoted line\n"
        "> second line\n"
        "\n"
        "日本語の段落です。"
    )
    for hidden in ("alert", "color: red", "Newsletter title"):
        assert hidden not in m.text


def test_html_only_mail_in_shift_jis() -> None:
    html = "<html><body><p>髙橋です。</p><p>納期～</p></body></html>"
    raw = mail(*BASE, "Subject: x", "Content-Type: text/html; charset=Shift_JIS", body=html.encode("cp932"))
    assert parse(raw).text == "髙橋です。\n\n納期～"


def test_html_with_an_unclosed_head_still_shows_the_body() -> None:
    assert html_to_text("<html><head><title>t</title><body><p>visible</p>") == "visible"


def test_alternative_mail_keeps_plain_text_and_html() -> None:
    raw = mail(
        *BASE,
        "Subject: x",
        'Content-Type: multipart/alternative; boundary="A"',
        body=b"--A\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain version\r\n"
        b"--A\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html version</p>\r\n--A--\r\n",
    )
    m = parse(raw)
    assert m.text == "plain version"
    assert m.html == "<p>html version</p>"
    assert m.attachments == []


# --- attachments ----------------------------------------------------------------------

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4
XLSX = b"PK\x03\x04" + b"\x00" * 100


def _mixed(*parts: bytes) -> bytes:
    body = b"".join(b"--M\r\n" + p + b"\r\n" for p in parts) + b"--M--\r\n"
    return mail(*BASE, "Subject: files", "MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="M"', body=body)


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def test_attachment_names_rfc2231_and_rfc2047() -> None:
    jis_name = base64.b64encode("請求書.xlsx".encode("iso-2022-jp")).decode()
    raw = _mixed(
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nSee attached.",
        # RFC 2231 with charset, language and continuations, split inside a character.
        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment;\r\n filename*0*=UTF-8'ja'%E8%A6%8B%E7%A9;\r\n filename*1*=%8D%E6%9B%B8%20%E2%91%A0.pdf\r\n\r\n"
        + _b64(PDF),
        # RFC 2047 inside a quoted parameter, as Outlook and Japanese mailers write it.
        f'Content-Type: application/vnd.ms-excel; name="=?ISO-2022-JP?B?{jis_name}?="\r\n'.encode()
        + f'Content-Disposition: attachment; filename="=?ISO-2022-JP?B?{jis_name}?="\r\n'.encode()
        + b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(XLSX),
        # RFC 2231 in ISO-2022-JP on the Content-Type name only.
        b"Content-Type: text/csv; name*=iso-2022-jp'ja'%1B%24B%3BYJ'%1B%28B.csv\r\n"
        b"Content-Disposition: attachment\r\n\r\na,b\r\n1,2",
    )
    m = parse(raw)
    assert m.text == "See attached."
    got = [(a.filename, a.content_type, a.size, a.inline) for a in m.attachments]
    assert got == [
        ("見積書 ①.pdf", "application/pdf", len(PDF), False),
        ("請求書.xlsx", "application/vnd.ms-excel", len(XLSX), False),
        ("支払.csv", "text/csv", len(b"a,b\n1,2"), False),
    ]
    assert m.attachments[0].payload == PDF
    assert m.attachments[0].sha256 == hashlib.sha256(PDF).hexdigest()


def test_text_attachment_is_not_mixed_into_the_body() -> None:
    raw = _mixed(
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nBody text.",
        b"Content-Type: text/plain; charset=utf-8; name=log.txt\r\nContent-Disposition: attachment; filename=log.txt\r\n\r\nERROR 42",
    )
    m = parse(raw)
    assert m.text == "Body text."
    assert [(a.filename, a.payload) for a in m.attachments] == [("log.txt", b"ERROR 42")]


def test_inline_images_are_attachments_with_content_id() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 60
    related = (
        b'Content-Type: multipart/related; boundary="R"\r\n\r\n'
        b'--R\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Logo: <img src="cid:logo@example.org"></p>\r\n'
        b"--R\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\nContent-ID: <logo@example.org>\r\n"
        b"Content-Disposition: inline; filename=logo.png\r\n\r\n" + _b64(png) + b"\r\n"
        b"--R\r\nContent-Type: image/gif\r\nContent-Transfer-Encoding: base64\r\nContent-ID: <spacer@example.org>\r\n\r\n"
        + _b64(b"GIF89a") + b"\r\n--R--"
    )
    raw = mail(
        *BASE,
        "Subject: logo",
        'Content-Type: multipart/alternative; boundary="A"',
        body=b"--A\r\nContent-Type: text/plain\r\n\r\nLogo: [logo]\r\n--A\r\n" + related + b"\r\n--A--\r\n",
    )
    m = parse(raw)
    assert m.text == "Logo: [logo]"
    assert "cid:logo@example.org" in (m.html or "")
    # The spacer has no name and its Content-ID is no file name: it is numbered.
    assert [(a.filename, a.name_given, a.content_type, a.inline, a.content_id, a.size) for a in m.attachments] == [
        ("logo.png", True, "image/png", True, "logo@example.org", len(png)),
        ("attachment-2.gif", False, "image/gif", True, "spacer@example.org", 6),
    ]


def test_forwarded_message_is_an_attachment_not_text() -> None:
    inner = mail(
        "From: =?ISO-2022-JP?B?GyRCOzNFRBsoQg==?= <yamada@example.jp>",
        "To: sales@example.com",
        f"Subject: {b_word('見積依頼', 'iso-2022-jp')}",
        "Message-ID: <inner@example.jp>",
        "Content-Type: text/plain; charset=ISO-2022-JP",
        body=ESC_KANJI + b"K\\J8" + ESC_ASCII + b" secret forwarded body\r\n",
    )
    raw = _mixed(
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nPlease see the forwarded mail below.",
        b"Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n" + inner,
    )
    m = parse(raw)
    assert m.text == "Please see the forwarded mail below."
    assert "secret" not in m.text
    [att] = m.attachments
    assert att.content_type == "message/rfc822"
    # Unnamed: called after its subject, and marked as a made name.
    assert (att.filename, att.name_given, att.display_name) == ("見積依頼.eml", False, "見積依頼.eml")
    again = parse(att.payload)
    assert again.message_id == "inner@example.jp"
    assert again.subject == "見積依頼"
    assert again.text == "本文 secret forwarded body\n"


def test_delivery_report_parts_are_kept_as_attachments() -> None:
    raw = mail(
        "From: MAILER-DAEMON@example.net",
        "To: support@example.com",
        "Subject: Undelivered Mail",
        "Message-ID: <dsn@example.net>",
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"',
        body=b"--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        b"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n\r\n"
        b"Final-Recipient: rfc822; gone@example.org\r\nAction: failed\r\n\r\n"
        b"--B\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <ours@example.com>\r\nSubject: hi\r\n"
        b"--B--\r\n",
    )
    m = parse(raw)
    assert m.text == "Your message could not be delivered."
    kinds = {a.content_type: a.payload for a in m.attachments}
    assert b"Final-Recipient: rfc822; gone@example.org" in kinds["message/delivery-status"]
    assert b"Message-ID: <ours@example.com>" in kinds["text/rfc822-headers"]


def test_same_attachment_hashes_alike_over_smtp_and_from_a_file() -> None:
    crlf = _mixed(b"Content-Type: text/plain\r\n\r\nx", b"Content-Type: text/csv; name=a.csv\r\n\r\na,b\r\n1,2")
    lf = crlf.replace(b"\r\n", b"\n")
    assert parse(crlf).attachments[0].sha256 == parse(lf).attachments[0].sha256


# --- Message-ID ----------------------------------------------------------------------


def _no_id(received: str, crlf: bool = True) -> bytes:
    raw = mail(
        f"Received: from {received} by mx.example.com; Fri, 20 Nov 2026 10:00:0{len(received) % 10} +0900",
        "From: 山田 <yamada@example.jp>".encode(),
        "To: support@example.com",
        f"Subject: {b_word('至急', 'iso-2022-jp')}",
        "Date: Fri, 20 Nov 2026 09:59:00 +0900",
        "Content-Type: text/plain; charset=ISO-2022-JP",
        body=ESC_KANJI + b"K\\J8" + ESC_ASCII + b"\r\n",
    )
    return raw if crlf else raw.replace(b"\r\n", b"\n")


def test_missing_message_id_is_synthesised_from_the_content() -> None:
    first = parse(_no_id("relay-a.example.net"))
    assert first.message_id_synthesised
    assert first.message_id.endswith("@synthesised.intake.invalid")
    assert any("Message-ID" in d for d in first.defects)
    # The same mail through another relay (other trace headers, LF line ends) → same id.
    assert parse(_no_id("other-relay.example.org", crlf=False)).message_id == first.message_id
    # Another mail → another id.
    other = _no_id("relay-a.example.net").replace(b"K\\J8", b"JV?.")
    assert parse(other).message_id != first.message_id


def test_message_id_present_is_kept() -> None:
    m = parse(mail(*BASE, "Subject: x"))
    assert (m.message_id, m.message_id_synthesised) == ("m1@example.org", False)


def test_raw_utf8_message_ids_are_text() -> None:
    """RFC 6532 lets Message-ID, In-Reply-To and References carry raw UTF-8."""
    m = parse(mail("From: 山田 <yamada@example.jp>".encode(), "To: support@example.com",
                   "Message-ID: <西-2@例え.jp>".encode(), "In-Reply-To: <西-1@例え.jp>".encode(),
                   "References: <東-0@例え.jp> <西-1@例え.jp>".encode(), "Subject: x"))
    assert m.message_id == "西-2@例え.jp"
    assert m.in_reply_to == ["西-1@例え.jp"]
    assert m.references == ["東-0@例え.jp", "西-1@例え.jp"]


# --- Japanese quoting ----------------------------------------------------------------


def test_japanese_quote_styles_stay_intact() -> None:
    text = (
        "山田様\r\n\r\nご連絡ありがとうございます。\r\n\r\n"
        "2026年11月20日(金) 10:00 山田太郎 <taro@example.jp>:\r\n"
        "> 前回のメールの件です。\r\n"
        ">> さらに前の引用\r\n"
        "＞ 全角の引用記号\r\n"
        "| 縦棒の引用\r\n"
        "-----Original Message-----\r\n"
        "差出人: 山田 太郎\r\n件名：Re: 見積\r\n"
    )
    raw = mail(
        *BASE,
        "Subject: Re: quote",
        "Content-Type: text/plain; charset=ISO-2022-JP",
        body=text.encode("iso-2022-jp"),
    )
    assert parse(raw).text == text.replace("\r\n", "\n")


# --- robustness ----------------------------------------------------------------------

SEED = _mixed(
    b"Content-Type: text/plain; charset=ISO-2022-JP\r\n\r\n" + ESC_KANJI + b"K\\J8" + ESC_ASCII,
    b"Content-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n" + _b64(PDF[:60]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1500))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    m = parse(data)
    assert m.message_id


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=len(SEED)), st.binary(min_size=1, max_size=40), st.booleans())
def test_damaged_mail_never_raises(at: int, junk: bytes, cut: bool) -> None:
    data = SEED[:at] if cut else SEED[:at] + junk + SEED[at:]
    m = parse(data)
    assert isinstance(m.text, str)
    message_from_bytes(data, policy=compat32)  # the stdlib agrees it is a message at all


@pytest.mark.parametrize("depth", [100, 3000])
def test_absurdly_nested_mail_is_kept_not_raised(depth: int) -> None:
    nested = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))
    m = parse(b"From: a@example.org\r\nSubject: deep\r\n" + nested + b"Content-Type: text/plain\r\n\r\nhi\r\n")
    assert m.subject == "deep"
    assert any("nested" in d for d in m.defects)
    assert len(m.attachments) == 1
