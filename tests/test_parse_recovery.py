"""Mail fidelity, round two: the mail that real support mailboxes hold (issue 14).

Every mail here is made by hand, byte for byte as a sending program writes it, in
Japanese, Chinese, Korean and European languages; every expected value is written by
hand. The classes: header sections that break the rules, senders found outside From,
raw 8-bit header text in legacy charsets, attachments without a name, hostile sizes
(cut, with a defect, never a hang) and synthesised Message-IDs.
"""

from __future__ import annotations

import base64
import email.quoprimime
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intake.diagnostics import parse_lines, parse_report
from intake.mail.classify import BOUNCE, classify
from intake.mail.headers import MAX_ENCODED_WORDS, MAX_FIELD_CHARS, MAX_HEADER_FIELDS, decode_words
from intake.mail.parse import MAX_BOUNDARY_LINES, MAX_PART_FIELDS, parse

MAILS = Path(__file__).resolve().parent / "mails_fidelity"


def b_word(text: str, charset: str) -> str:
    """An RFC 2047 B word, as a mail program writes it."""
    codec = {"shift_jis": "cp932", "ks_c_5601-1987": "cp949"}.get(charset.lower(), charset)
    return f"=?{charset}?B?{base64.b64encode(text.encode(codec)).decode()}?="


def q_word(text: str, charset: str) -> str:
    return email.quoprimime.header_encode(text.encode(charset), charset)


def lines(*items: str | bytes, eol: bytes = b"\r\n") -> bytes:
    """Lines joined as given (str is UTF-8, bytes as they are): the exact bytes of a mail."""
    return eol.join(i if isinstance(i, bytes) else i.encode() for i in items)


def defect_with(m, text: str) -> list[str]:
    return [d for d in m.defects if text in d]


# --- header sections that break the rules ----------------------------------------------

BROKEN_SUBJECTS = [
    # (language, the Subject as the mailer broke it, what the agent must read)
    ("English", ["Subject: Invoice 4711 for", "order 99 from March"], "Invoice 4711 for order 99 from March"),
    ("Japanese, raw UTF-8", ["Subject: 【至急】請求書の再発行について", "（再送）ご確認ください"],
     "【至急】請求書の再発行について （再送）ご確認ください"),
    ("Japanese, ISO-2022-JP words", [f"Subject: {b_word('見積書の送付', 'ISO-2022-JP')}", b_word("のお願い", "ISO-2022-JP")],
     "見積書の送付のお願い"),
    ("Chinese, GB2312 words", [f"Subject: {b_word('关于发票', 'GB2312')}", b_word("的问题", "GB2312")], "关于发票的问题"),
    ("Korean, EUC-KR words", [f"Subject: {b_word('주문 배송', 'EUC-KR')}", b_word(' 문의드립니다', "EUC-KR")],
     "주문 배송 문의드립니다"),
    ("German, Latin-1 Q words", [f"Subject: {q_word('Rückfrage zur', 'iso-8859-1')}", "Bestellung Nr. 12"],
     "Rückfrage zur Bestellung Nr. 12"),
]


@pytest.mark.parametrize(("language", "subject", "expected"), BROKEN_SUBJECTS, ids=[c[0] for c in BROKEN_SUBJECTS])
def test_a_fold_without_indentation_keeps_the_subject_and_the_fields_after_it(
    language: str, subject: list[str], expected: str
) -> None:
    raw = lines(
        "Message-ID: <fold@example.jp>",
        *subject,
        "From: 山田 太郎 <taro@example.jp>",
        "To: support@example.com",
        "Date: Fri, 20 Nov 2026 10:00:00 +0900",
        "",
        "本文です。",
    )
    m = parse(raw)
    assert m.subject == expected
    assert (m.from_.name, m.from_.address, m.sender_source) == ("山田 太郎", "taro@example.jp", "from")
    assert [a.address for a in m.to] == ["support@example.com"]
    assert m.date is not None and m.date.isoformat() == "2026-11-20T01:00:00+00:00"
    assert m.text == "本文です。"
    assert defect_with(m, "1 unindented line(s) read as a continuation of Subject")


def test_a_broken_fold_inside_a_recipient_list_keeps_every_recipient() -> None:
    raw = lines(
        "From: Ann Lee <ann@example.org>",
        "To: support@example.com,",
        "billing@example.com, 経理 <keiri@example.jp>",
        "Subject: two desks",
        "Message-ID: <to@example.org>",
        "",
        "Hello",
    )
    m = parse(raw)
    assert [(a.name, a.address) for a in m.to] == [
        ("", "support@example.com"), ("", "billing@example.com"), ("経理", "keiri@example.jp")]
    assert m.subject == "two desks"


def test_several_broken_lines_in_a_row_are_one_value() -> None:
    raw = lines(
        "From: alice@example.org",
        "Subject: Unable to print",
        "from the second floor",
        "since Monday",
        "X-Mailer: Old Mailer 1.0",
        "Message-ID: <three@example.org>",
        "",
        "Body",
        eol=b"\n",
    )
    m = parse(raw)
    assert m.subject == "Unable to print from the second floor since Monday"
    assert m.header("X-Mailer") == "Old Mailer 1.0"
    assert defect_with(m, "2 unindented line(s) read as a continuation of Subject")


@pytest.mark.parametrize(
    "junk",
    [
        [b"---- Original email message ----"],
        ["-------- 転送メッセージ --------".encode()],
        [b"", b""],  # blank lines a broken gateway put first
        [b"Forwarded by the web mailer", b"==========================="],
    ],
)
def test_junk_lines_before_the_header_are_skipped_and_noted(junk: list[bytes]) -> None:
    raw = lines(
        *junk,
        "From: =?UTF-8?B?6Yi05pyo?= <suzuki@example.jp>",
        "To: support@example.com",
        "Subject: ログインできません",
        "Message-ID: <junk@example.jp>",
        "",
        "パスワードを忘れました。",
    )
    m = parse(raw)
    assert (m.from_.name, m.from_.address) == ("鈴木", "suzuki@example.jp")
    assert m.subject == "ログインできません"
    assert m.message_id == "junk@example.jp"
    assert m.text == "パスワードを忘れました。"
    assert defect_with(m, "before the header skipped")


def test_text_that_only_looks_like_a_header_stays_text() -> None:
    # One field-like line after ordinary text is not a header section.
    raw = lines("Dear support team,", "Order-Id: 4711", "the parcel never came.", "Thanks")
    m = parse(raw)
    assert m.subject == "" and m.from_ is None
    assert m.text == "Dear support team,\r\nOrder-Id: 4711\r\nthe parcel never came.\r\nThanks".replace("\r\n", "\n")


def test_a_broken_fold_just_before_the_blank_line_is_the_subjects_end() -> None:
    long = "お問い合わせの件について、とても長い件名なので途中で折り返されてしまい"
    m = parse(lines("From: a@example.org", f"Subject: {long}", "折り返されました", "", "本文です。"))
    assert (m.subject, m.text.strip()) == (f"{long} 折り返されました", "本文です。")
    assert defect_with(m, "headers: 1 unindented line(s) read as a continuation of Subject")


def test_a_short_subject_then_a_greeting_is_a_body_without_a_blank_line() -> None:
    m = parse(lines("From: a@example.org", "Subject: hello", "Hi Bob,", "", "Thanks for the quick reply."))
    assert (m.subject, m.text) == ("hello", "Hi Bob,\n\nThanks for the quick reply.")
    assert defect_with(m, "headers: no blank line before the body; the body starts at line 3")


def test_a_url_wrapped_onto_its_own_line_is_no_field() -> None:
    m = parse(lines("From: a@example.org", "Subject: see the page at", "https://example.com/faq/印刷",
                    "To: support@example.com", "", "body"))
    assert m.subject == "see the page at https://example.com/faq/印刷"
    assert [a.address for a in m.to] == ["support@example.com"] and m.header("https") is None


def test_an_mbox_from_line_is_skipped_and_names_the_sender_when_nothing_else_does() -> None:
    with_from = lines(
        "From taro@example.jp Fri Nov 20 10:00:00 2026",
        "From: 山田 太郎 <taro@example.jp>",
        "Subject: 納期の件",
        "Message-ID: <mbox1@example.jp>",
        "",
        "よろしくお願いします。",
        eol=b"\n",
    )
    m = parse(with_from)
    assert (m.from_.address, m.sender_source, m.subject) == ("taro@example.jp", "from", "納期の件")
    assert defect_with(m, "mbox 'From ' line skipped")
    without_from = lines(
        "From MAILER-DAEMON Fri Nov 20 10:00:00 2026", "Subject: Undelivered Mail", "", "gone", eol=b"\n")
    m = parse(without_from)
    assert (m.from_.address, m.sender_source) == ("MAILER-DAEMON", "mbox")
    assert defect_with(m, "the sender is taken from the mbox 'From ' line")


def test_no_blank_line_before_the_body() -> None:
    raw = lines(
        "From: Ken Sato <ken@example.org>",
        "Subject: printer",
        "Message-ID: <nosep@example.org>",
        "Hello,",
        "Regards: the printer on floor 2 is broken.",
        "",
        "Ken",
        eol=b"\n",
    )
    m = parse(raw)
    assert m.subject == "printer"
    # "Regards:" is no header field name: the lines stay the body, not a longer subject.
    assert m.text == "Hello,\nRegards: the printer on floor 2 is broken.\n\nKen"
    assert defect_with(m, "no blank line before the body; the body starts at line 4")


def test_repeated_fields_first_single_field_wins_all_recipients_are_read() -> None:
    raw = lines(
        "From: a@example.org",
        "Subject: 最初の件名",
        "To: one@example.com",
        "Subject: second subject",
        "To: two@example.com",
        "Message-ID: <dup@example.org>",
        "",
        "x",
    )
    m = parse(raw)
    assert m.subject == "最初の件名"
    assert m.header_all("Subject") == ["最初の件名", "second subject"]  # kept, not lost
    assert [a.address for a in m.to] == ["one@example.com", "two@example.com"]
    assert defect_with(m, "2 Subject fields; the first is read")
    assert defect_with(m, "2 To fields; all are read")


def test_white_space_before_the_colon_is_still_a_field() -> None:
    raw = lines("From : Olga <olga@example.ru>", "Subject : Счёт", "Message-ID : <obs@example.ru>", "", "x")
    m = parse(raw)
    assert (m.from_.address, m.subject, m.message_id) == ("olga@example.ru", "Счёт", "obs@example.ru")


def test_well_formed_mail_is_read_without_repairs() -> None:
    raw = lines("From: a@example.org", "To: b@example.com", "Subject: fine", "Message-ID: <ok@example.org>", "", "x")
    assert parse(raw).defects == []


# --- who sent it ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "envelope", "address", "name", "source"),
    [
        (["Sender: 佐藤 花子 <hanako@example.jp>", "Reply-To: other@example.jp"], None,
         "hanako@example.jp", "佐藤 花子", "sender"),
        ([f"Reply-To: {b_word('王小明', 'GB2312')} <wang@example.cn>"], None, "wang@example.cn", "王小明", "reply-to"),
        (["Return-Path: <kim@example.kr>"], "env@example.kr", "kim@example.kr", "", "return-path"),
        (["Return-Path: <>"], "bounces+123@relay.example.net", "bounces+123@relay.example.net", "", "envelope"),
        ([], "<jean@example.fr>", "jean@example.fr", "", "envelope"),
        # From names the person but no address: the name stays, the address comes later.
        (["From: 山田 太郎", "Reply-To: <taro@example.jp>"], None, "taro@example.jp", "山田 太郎", "reply-to"),
        (["From: Müller, Jürgen", "Sender: j.mueller@example.de"], None,
         "j.mueller@example.de", "Müller, Jürgen", "sender"),
    ],
)
def test_sender_is_found_outside_from_and_the_source_is_named(
    header: list[str], envelope: str | None, address: str, name: str, source: str
) -> None:
    raw = lines(*header, "To: support@example.com", "Subject: x", "Message-ID: <s@example.org>", "", "x")
    m = parse(raw, envelope_from=envelope)
    assert (m.from_.address, m.from_.name, m.sender_source) == (address, name, source)
    assert defect_with(m, "the sender is taken from")


def test_from_wins_over_every_fallback() -> None:
    raw = lines("Return-Path: <r@example.net>", "Sender: s@example.net", "From: f@example.net", "", "x")
    m = parse(raw, envelope_from="e@example.net")
    assert (m.from_.address, m.sender_source) == ("f@example.net", "from")
    assert not defect_with(m, "the sender is taken from")


def test_no_sender_anywhere() -> None:
    m = parse(lines("Subject: anonymous", "", "x"), envelope_from="")
    assert (m.from_, m.sender_source) == (None, "")


@pytest.mark.parametrize(
    ("from_value", "address", "name"),
    [
        ("MAILER-DAEMON", "MAILER-DAEMON", ""),
        ("Mail Delivery System <MAILER-DAEMON>", "MAILER-DAEMON", "Mail Delivery System"),
        ("root (Cron Daemon)", "root", "Cron Daemon"),
        ("Moderator <moderator>", "moderator", "Moderator"),
    ],
)
def test_a_local_part_alone_is_an_address_as_written(from_value: str, address: str, name: str) -> None:
    m = parse(lines(f"From: {from_value}", "Subject: x", "", "x"))
    assert (m.from_.address, m.from_.name, m.sender_source) == (address, name, "from")
    assert m.from_.domain == ""


def test_a_mailer_daemon_without_domain_is_recognised_as_a_bounce() -> None:
    raw = lines("From: MAILER-DAEMON", "To: support@example.com", "Subject: Undelivered Mail Returned to Sender",
                "Message-ID: <dsn@example.net>", "", "Message-ID: <ours-1@example.com>", "could not be delivered")
    cls = classify(parse(raw), own_addresses={"support@example.com"}, agents=set())
    assert cls.kind == BOUNCE
    assert cls.bounced_message_ids == ("ours-1@example.com",)


@pytest.mark.parametrize(("from_value", "display"), [("John Smith", "John Smith"), ("山田 太郎", "山田 太郎")])
def test_a_name_alone_is_not_cut_to_its_first_word(from_value: str, display: str) -> None:
    m = parse(lines(f"From: {from_value}", "Subject: x", "", "x"))
    assert (m.from_, m.from_display) == (None, display)


# --- raw 8-bit header text in legacy charsets ------------------------------------------

LEGACY = [
    # (language, charset the mail declares, codec, subject, display name, file name)
    ("Chinese GBK", "gb2312", "gbk", "关于发票的问题", "王小明", "发票.pdf"),
    ("Chinese Big5", "big5", "big5", "請問訂單何時出貨", "陳大文", "報價單.xlsx"),
    ("Korean EUC-KR", "euc-kr", "cp949", "주문 배송 문의", "김철수", "견적서.pdf"),
    ("Russian windows-1251", "windows-1251", "cp1251", "Заказ не пришёл", "Иван Петров", "счёт.pdf"),
    ("German Latin-1", "iso-8859-1", "latin-1", "Rückfrage zur Bestellung", "Jürgen Müller", "Übersicht.pdf"),
    ("Polish windows-1250", "windows-1250", "cp1250", "Zamówienie – pytanie", "Łukasz Wiśniewski", "źródło.pdf"),
    ("Greek ISO-8859-7", "iso-8859-7", "iso8859-7", "Παραγγελία", "Γιώργος", "τιμολόγιο.pdf"),
    ("Japanese Shift_JIS in a JIS mail", "iso-2022-jp", "cp932", "請求書の件～ ㈱テスト", "髙橋 一郎", "見積書①.pdf"),
]


def _legacy_mail(charset: str, codec: str, subject: str, name: str, filename: str) -> bytes:
    body_codec = "iso-2022-jp" if charset == "iso-2022-jp" else codec
    return lines(
        b"From: " + name.encode(codec) + b" <sender@example.org>",
        "To: support@example.com",
        b"Subject: " + subject.encode(codec),
        "Message-ID: <legacy@example.org>",
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="L"',
        "",
        "--L",
        f"Content-Type: text/plain; charset={charset}",
        "",
        "本文".encode(body_codec) if body_codec in ("gbk", "big5", "cp949", "cp932", "iso-2022-jp") else b"Text",
        "--L",
        b'Content-Type: application/octet-stream; name="' + filename.encode(codec) + b'"',
        b'Content-Disposition: attachment; filename="' + filename.encode(codec) + b'"',
        "Content-Transfer-Encoding: base64",
        "",
        "JVBERi0xLjQK",
        "--L--",
        "",
    )


@pytest.mark.parametrize(("language", "charset", "codec", "subject", "name", "filename"), LEGACY,
                         ids=[c[0] for c in LEGACY])
def test_raw_8bit_subject_name_and_file_name_in_the_charset_the_mail_declares(
    language: str, charset: str, codec: str, subject: str, name: str, filename: str
) -> None:
    m = parse(_legacy_mail(charset, codec, subject, name, filename))
    assert m.subject == subject
    assert (m.from_.name, m.from_.address) == (name, "sender@example.org")
    [att] = m.attachments
    assert (att.filename, att.name_given) == (filename, True)
    assert defect_with(m, "subject: raw 8-bit text, charset guessed")
    assert defect_with(m, "attachment name: raw 8-bit text, charset guessed")


@pytest.mark.parametrize(
    ("codec", "subject", "guess"),
    [
        ("gbk", "请问我的订单什么时候发货", "gb18030"),
        ("big5", "請問我的訂單什麼時候出貨", "big5"),
        ("cp1251", "Привет, заказ не пришёл", "cp1251"),
        ("cp1253", "Καλημέρα σας", "cp1253"),
        ("cp932", "請求書の件について ㈱テスト", "cp932"),
        ("euc-jp", "請求書の件についてお問い合わせ", "euc_jp"),
    ],
)
def test_undeclared_8bit_subject_is_read_by_the_detector_and_the_guess_noted(
    codec: str, subject: str, guess: str
) -> None:
    raw = lines(b"Subject: " + subject.encode(codec), "From: a@example.org",
                "Content-Type: text/plain; charset=us-ascii", "", "plain ASCII body")
    m = parse(raw)
    assert m.subject == subject
    assert f"subject: raw 8-bit text, charset guessed: {guess}" in m.defects


@pytest.mark.parametrize(("codec", "name", "subject"), [
    ("gbk", "王伟", "关于发票的问题"),
    ("euc-kr", "박지민", "환불 요청드립니다"),
    ("cp1251", "Иван", "Заказ"),
    ("cp932", "山田太郎", "見積依頼"),
    ("cp932", "伊藤美咲", "領収書再発行依頼"),
    ("euc-jp", "佐藤", "納期確認"),
    ("euc-jp", "高橋 健", "【重要】契約更新について"),
])
def test_one_guess_for_the_mails_header_whichever_field_comes_first(codec: str, name: str, subject: str) -> None:
    # A short display name before the subject: alone it reads as Japanese, Korean or
    # Chinese alike; the mail's raw header text as a whole settles it. Japanese kanji-only
    # text stays Japanese.
    raw = lines(b"From: " + name.encode(codec) + b" <a@example.org>", b"Subject: " + subject.encode(codec), "",
                "plain ASCII body")
    m = parse(raw)
    assert (m.from_.name, m.subject) == (name, subject)


def test_a_charset_declared_only_in_another_header_settles_a_short_name() -> None:
    # Three GBK characters alone could be Big5 or EUC-KR: the mail's own encoded words say GB2312.
    raw = lines(
        b"From: " + "王小明".encode("gbk") + b" <wang@example.cn>",
        f"To: {b_word('客服中心', 'GB2312')} <support@example.com>",
        "Subject: =?GB2312?B?" + base64.b64encode("订单".encode("gbk")).decode() + "?=",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: base64",
        "",
        base64.b64encode("你好".encode()).decode(),
    )
    m = parse(raw)
    assert (m.from_.name, [a.name for a in m.to], m.subject, m.text) == ("王小明", ["客服中心"], "订单", "你好")


def test_a_part_declares_the_charset_of_its_own_raw_name() -> None:
    raw = lines(
        "From: a@example.tw",
        'Content-Type: multipart/mixed; boundary="P"',
        "",
        "--P",
        "Content-Type: text/plain; charset=gb2312",
        "",
        "你好".encode("gbk"),
        "--P",
        b'Content-Type: text/plain; charset=big5; name="' + "報價單.txt".encode("big5") + b'"',
        "",
        "報價".encode("big5"),
        "--P--",
    )
    assert [a.filename for a in parse(raw).attachments] == ["報價單.txt"]


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        # RFC 2231 with a charset: declared, read as declared.
        ("attachment; filename*=gb2312''%B7%A2%C6%B1.pdf", "发票.pdf"),
        ("attachment; filename*=big5''%B3%F8%BB%F9%B3%E6.xlsx", "報價單.xlsx"),
        ("attachment; filename*=euc-kr''%B0%DF%C0%FB%BC%AD.pdf", "견적서.pdf"),
        ("attachment; filename*=windows-1251''%F1%F7%B8%F2.pdf", "счёт.pdf"),
        # RFC 2231 without a charset: the mail's declared charset (EUC-KR) reads it.
        ("attachment; filename*=''%B0%DF%C0%FB%BC%AD.pdf", "견적서.pdf"),
        # RFC 2047 words in a quoted parameter, as Outlook writes them.
        (f'attachment; filename="{b_word("報價單.xlsx", "big5")}"', "報價單.xlsx"),
        (f'attachment; filename="{b_word("견적서.pdf", "ks_c_5601-1987")}"', "견적서.pdf"),
        (f'attachment; filename="{q_word("Übersicht März.pdf", "iso-8859-1")}"', "Übersicht März.pdf"),
    ],
)
def test_declared_file_names_in_any_charset(disposition: str, expected: str) -> None:
    raw = lines(
        "From: a@example.org",
        'Content-Type: multipart/mixed; boundary="P"',
        "",
        "--P",
        "Content-Type: text/plain; charset=euc-kr",
        "",
        "안녕".encode("euc-kr"),
        "--P",
        "Content-Type: application/octet-stream",
        f"Content-Disposition: {disposition}",
        "",
        "data",
        "--P--",
    )
    [att] = parse(raw).attachments
    assert (att.filename, att.name_given, att.display_name) == (expected, True, expected)


# --- every attachment has a name ---------------------------------------------------------


def _mixed(*parts: bytes) -> bytes:
    body = b"".join(b"--M\r\n" + p + b"\r\n" for p in parts) + b"--M--\r\n"
    return lines("From: a@example.org", "Subject: files", "Message-ID: <n@example.org>",
                 'Content-Type: multipart/mixed; boundary="M"', "", "") + body


TEXT_PART = b"Content-Type: text/plain\r\n\r\nsee attached"


def _forwarded(subject_line: str | bytes) -> bytes:
    inner = lines("From: b@example.org", subject_line, "Message-ID: <inner@example.org>", "", "inner body")
    return b"Content-Type: message/rfc822\r\n\r\n" + inner


@pytest.mark.parametrize(
    ("subject_line", "expected"),
    [
        (f"Subject: {b_word('見積依頼の件', 'ISO-2022-JP')}", "見積依頼の件.eml"),
        (f"Subject: {b_word('回复: 关于发票', 'GB2312')}", "回复_ 关于发票.eml"),
        ("Subject: Re: Angebot/Rechnung <dringend>?", "Re_ Angebot_Rechnung _dringend__.eml"),
        ('Subject: a\\b:c*d?e"f|g', "a_b_c_d_e_f_g.eml"),
        ("Subject: CON", "_CON.eml"),
        ("Subject: ...  ", "attachment-1.eml"),  # nothing left of the subject: numbered
        ("X-No-Subject: 1", "attachment-1.eml"),
    ],
)
def test_an_unnamed_forwarded_message_is_named_after_its_subject(subject_line: str, expected: str) -> None:
    m = parse(_mixed(TEXT_PART, _forwarded(subject_line)))
    [att] = m.attachments
    assert (att.filename, att.name_given, att.display_name, att.content_type) == (
        expected, False, expected, "message/rfc822")


def test_a_long_subject_makes_a_name_a_file_system_takes() -> None:
    m = parse(_mixed(TEXT_PART, _forwarded("Subject: " + "あ" * 150)))
    # 200 bytes of UTF-8 at most before ".eml": 66 characters of 3 bytes.
    assert m.attachments[0].filename == "あ" * 66 + ".eml"


@pytest.mark.parametrize(
    ("headers", "expected", "inline"),
    [
        # Outlook's inline image, known only by a Content-ID that is a file name.
        ("Content-Type: image/png\r\nContent-ID: <image001.png@01DA1B2C.3D4E5F60>", "image001.png", True),
        ("Content-Type: image/jpeg\r\nContent-ID: <写真 1.jpg@example.jp>", "写真 1.jpg", True),
        # Gmail's and Thunderbird's Content-IDs are no file names: numbered, typed.
        ("Content-Type: image/png\r\nContent-ID: <ii_lmn0p1q20>", "attachment-1.png", True),
        ("Content-Type: image/jpeg\r\nContent-ID: <part1.A1B2C3D4.E5F6A7B8@example.com>", "attachment-1.jpg", True),
        ("Content-Type: application/pdf\r\nContent-Disposition: attachment", "attachment-1.pdf", False),
        ("Content-Type: message/delivery-status", "attachment-1.txt", False),
        ("Content-Type: application/x-unknown-thing", "attachment-1.bin", False),
        # Office files and invitations are named by their own extension, whatever the machine's table.
        ("Content-Type: application/vnd.openxmlformats-officedocument.spreadsheetml.sheet\r\n"
         "Content-Disposition: attachment", "attachment-1.xlsx", False),
        ("Content-Type: text/calendar; method=REQUEST\r\nContent-Disposition: attachment", "attachment-1.ics", False),
        ('Content-Type: application/pdf; name=""', "attachment-1.pdf", False),
    ],
)
def test_an_attachment_without_a_name_gets_one_made(headers: str, expected: str, inline: bool) -> None:
    m = parse(_mixed(TEXT_PART, headers.encode() + b"\r\n\r\nxyz"))
    [att] = m.attachments
    assert (att.filename, att.name_given, att.inline) == (expected, False, inline)


def test_numbers_follow_the_attachments_place_in_the_mail() -> None:
    m = parse(_mixed(TEXT_PART, b"Content-Type: image/gif\r\n\r\nGIF89a",
                     b"Content-Type: application/pdf; name=given.pdf\r\n\r\n%PDF",
                     b"Content-Type: image/gif\r\n\r\nGIF89a"))
    assert [(a.filename, a.name_given) for a in m.attachments] == [
        ("attachment-1.gif", False), ("given.pdf", True), ("attachment-3.gif", False)]


# --- bounded cost: cut with a defect, never a hang --------------------------------------


def test_encoded_words_beyond_the_limit_are_cut() -> None:
    words = " ".join([b_word("日", "UTF-8")] * (MAX_ENCODED_WORDS + 1500))
    m = parse(lines("From: a@example.org", f"Subject: {words}", "", "x"))
    assert m.subject == "日" * MAX_ENCODED_WORDS
    assert defect_with(m, f"subject: more than {MAX_ENCODED_WORDS} encoded words; the rest was cut")


def test_a_huge_header_value_is_cut() -> None:
    m = parse(lines("From: a@example.org", "Subject: " + "x" * (MAX_FIELD_CHARS + 5000), "", "body"))
    assert m.subject == "x" * MAX_FIELD_CHARS
    assert defect_with(m, f"subject: {MAX_FIELD_CHARS + 5000} characters long; cut at {MAX_FIELD_CHARS}")
    assert m.text == "body"


def test_parts_beyond_the_limit_are_not_read_and_the_first_ones_are() -> None:
    part = "--b\r\nContent-Type: text/plain; name=\"請求書.txt\"\r\nContent-Disposition: attachment\r\n\r\nx\r\n"
    raw = (lines("From: a@example.org", "Subject: 添付が多すぎます", "Content-Type: multipart/mixed; boundary=b", "", "")
           + "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n本文です。\r\n".encode()
           + (part * (MAX_BOUNDARY_LINES + 5000)).encode() + b"--b--\r\n")
    m = parse(raw)
    assert m.text.strip() == "本文です。"
    assert len(m.attachments) == MAX_BOUNDARY_LINES - 1 and m.attachments[0].filename == "請求書.txt"
    assert defect_with(m, f"more than {MAX_BOUNDARY_LINES:,} MIME boundary lines")


def test_a_part_header_beyond_the_limit_is_cut_and_its_type_still_read() -> None:
    raw = (lines("From: a@example.org", "Subject: fields", "Content-Type: multipart/mixed; boundary=b", "", "")
           + b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n" + b"X-Pad: y\r\n" * (MAX_PART_FIELDS * 3)
           + "\r\nご確認ください。\r\n--b--\r\n".encode())
    m = parse(raw)
    assert m.text.strip() == "ご確認ください。"
    assert defect_with(m, f"a part's header of {MAX_PART_FIELDS * 3 + 1:,} lines: the first {MAX_PART_FIELDS:,} read")


def test_unclosed_encoded_words_stay_text() -> None:
    m = parse(lines("From: a@example.org", "Subject: " + "=?utf-8?q?x " * 2000 + b_word("end", "UTF-8"), "", "x"))
    assert m.subject == ("=?utf-8?q?x " * 2000 + "end").strip()


def test_fields_beyond_the_limit_are_cut_and_the_body_still_read() -> None:
    fields = [f"X-Field-{i}: {i}" for i in range(MAX_HEADER_FIELDS + 500)]
    m = parse(lines("From: first@example.org", "Subject: many fields", *fields, "", "the body"))
    assert (m.from_.address, m.subject, m.text) == ("first@example.org", "many fields", "the body")
    assert m.header(f"X-Field-{MAX_HEADER_FIELDS - 3}") == str(MAX_HEADER_FIELDS - 3)
    assert m.header(f"X-Field-{MAX_HEADER_FIELDS}") is None
    assert defect_with(m, f"headers: more than {MAX_HEADER_FIELDS} fields; the rest was cut")


def test_thousands_of_parts_are_all_kept_with_their_names() -> None:
    parts = [b"Content-Type: text/csv; name=r%d.csv\r\n\r\n%d" % (i, i) for i in range(2000)]
    m = parse(_mixed(TEXT_PART, *parts))
    assert [a.filename for a in m.attachments] == [f"r{i}.csv" for i in range(2000)]


# --- synthesised Message-IDs --------------------------------------------------------------


def _web_form(name: str, message: str) -> bytes:
    # A web form's mail: no blank line, every line "Name: value".
    return lines("From: form@shop.example.com", "To: support@example.com", "Subject: Contact form",
                 "Date: Fri, 20 Nov 2026 10:00:00 +0900", f"Name: {name}", f"Message: {message}", eol=b"\n")


def test_mails_without_a_blank_line_are_never_taken_for_each_other() -> None:
    mails = [_web_form("山田", "注文1の件"), _web_form("佐藤", "注文2の件"), _web_form("山田", "注文3の件")]
    ids = [parse(raw).message_id for raw in mails]
    assert len(set(ids)) == 3
    assert all(parse(raw).message_id_synthesised for raw in mails)
    # The same bytes again (an SMTP retry) are the same mail.
    assert parse(mails[0]).message_id == ids[0]


def test_body_text_right_after_the_header_counts_for_the_id() -> None:
    first = lines("From: a@example.org", "Subject: x", "Order 1 please", "", "Thanks")
    second = lines("From: a@example.org", "Subject: x", "Order 2 please", "", "Thanks")
    assert parse(first).message_id != parse(second).message_id


# --- intake parse shows it ------------------------------------------------------------------


def test_parse_report_and_lines_show_sender_source_and_made_names() -> None:
    raw = (MAILS / "reply_to_only_gbk.eml").read_bytes()
    report = parse_report(raw, own_addresses={"support@example.com"}, agents=set())
    assert report["sender_source"] == "reply-to"
    assert report["from"] == {"name": "王小明", "address": "wang@example.cn"}
    assert report["subject"] == "关于发票的问题"
    assert [(a["filename"], a["name_given"]) for a in report["attachments"]] == [
        ("发票.pdf", True), ("image001.png", False), ("回复_ 订单.eml", False)]
    text = "\n".join(parse_lines(report))
    assert "From        王小明 <wang@example.cn>" in text
    assert "Sender via  Reply-To (no usable From)" in text
    assert "Attachment  发票.pdf (application/pdf, 4 bytes)" in text
    assert "Attachment  image001.png (image/png, 8 bytes, inline, name made by intake)" in text
    assert "Defect      from: missing; the sender is taken from Reply-To" in text


def test_intake_parse_command_prints_the_new_fields(run_intake) -> None:
    f = str(MAILS / "reply_to_only_gbk.eml")
    out = json.loads(run_intake("parse", "--json", f, check=True).stdout)
    assert out["sender_source"] == "reply-to"
    assert [a["name_given"] for a in out["attachments"]] == [True, False, False]
    human = run_intake("parse", f, check=True).stdout
    assert "Sender via  Reply-To (no usable From)" in human
    assert "Attachment  回复_ 订单.eml (message/rfc822," in human and "name made by intake" in human


# --- properties: fields survive a broken fold -----------------------------------------------

# Header text without what would make a line something else: no colon (a field), no
# line break, no "=?" (an encoded word); Japanese, Chinese, Korean and accented letters.
_WORD = st.text(
    alphabet=st.sampled_from("abcxyzABC019-_.!()[]" "日本語の件名請求書" "关于发票问题" "주문배송문의" "äöüßéèñçłś"),
    min_size=1,
    max_size=12,
)
_SEGMENT = st.lists(_WORD, min_size=1, max_size=4).map(" ".join)
# A display name without the address specials (which would need quoting).
_NAME = st.lists(
    st.text(alphabet=st.sampled_from("abcxyzABC019-_" "山田太郎" "王小明" "김철수" "Jürgenł"), min_size=1, max_size=8),
    min_size=1,
    max_size=3,
).map(" ".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    segments=st.lists(_SEGMENT, min_size=2, max_size=4),
    name=_NAME,
    local=st.from_regex(r"[a-z][a-z0-9.]{0,10}", fullmatch=True),
    position=st.integers(min_value=0, max_value=2),
    crlf=st.booleans(),
)
def test_fields_survive_a_broken_fold(segments: list[str], name: str, local: str, position: int, crlf: bool) -> None:
    subject = ["Subject: " + segments[0], *segments[1:]]  # continuation lines lost their indentation
    others = [f"From: {name} <{local}@example.jp>", "To: support@example.com", "Message-ID: <prop@example.jp>"]
    fields = others[:position] + subject + others[position:]
    raw = lines(*fields, "Date: Fri, 20 Nov 2026 10:00:00 +0900", "", "body", eol=b"\r\n" if crlf else b"\n")
    m = parse(raw)
    assert m.subject == " ".join(segments)
    assert (m.from_.name, m.from_.address) == (name, f"{local}@example.jp")
    assert [a.address for a in m.to] == ["support@example.com"]
    assert m.message_id == "prop@example.jp"
    assert m.date is not None
    assert m.text == "body"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1,
                            max_size=8), min_size=1, max_size=6),
    charset=st.sampled_from(["UTF-8", "GB18030"]),
    broken=st.booleans(),
)
def test_encoded_subject_split_over_broken_lines_is_whole(chunks: list[str], charset: str, broken: bool) -> None:
    words = [b_word(c, charset) for c in chunks]
    fold = "\r\n" if broken else "\r\n "
    raw = lines("From: a@example.org", "Subject: " + fold.join(words), "To: b@example.com", "", "x")
    m = parse(raw)
    assert m.subject == "".join(chunks).strip()
    assert [a.address for a in m.to] == ["b@example.com"]


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(
        st.tuples(
            st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=10),
            st.sampled_from(["UTF-8", "GB18030"]),
            st.sampled_from(["B", "Q"]),
        ),
        min_size=1,
        max_size=8,
    ),
    gap=st.sampled_from([" ", "  ", "\t", ""]),
)
def test_adjacent_encoded_words_decode_to_their_text(pieces: list[tuple[str, str, str]], gap: str) -> None:
    """White space between encoded words goes, whatever their charsets and encodings."""
    value = gap.join(b_word(t, cs) if enc == "B" else q_word(t, cs) for t, cs, enc in pieces)
    defects: list[str] = []
    assert decode_words(value, defects) == "".join(t for t, _, _ in pieces)
    assert defects == []
