"""Quote and signature stripping: what the customer and the timeline see of a reply.

Three sets are scored with ``reply_text``: the Discourse and GitHub trimming corpora
(``tests/corpus/``, their projects' expectations) and our hand-written samples
(``tests/replies/``). Each must reach 90 % exact (after stripping white space at both
ends). Known differences we keep on purpose: ``discourse/spam_1`` is a mail that is all
quote, which Discourse empties and we keep whole (nothing the sender wrote is lost).

The focused tests below pin each header form, the inline/bottom/top-post choices, the
HTML structures and the keep-everything rule.
"""

from __future__ import annotations

import pytest

from intake.mail.parse import html_to_text
from intake.mail.quotes import reply_text, strip_reply
from reply_cases import exact, load

# Fewer scored cases than this means a manifest lost cases, not that stripping improved.
MIN_SCORED = {"discourse": 64, "github": 8, "replies": 40}


@pytest.mark.parametrize("name", sorted(MIN_SCORED))
def test_each_set_is_at_least_90_percent_exact(name: str) -> None:
    cases = [c for c in load(name) if c.scored]
    assert len(cases) >= MIN_SCORED[name]
    failures = []
    for case in cases:
        got = reply_text(case.text, case.html)
        if not exact(got, case.expected or ""):
            failures.append(f"{case.id}\n  got:      {got[:300]!r}\n  expected: {(case.expected or '')[:300]!r}")
    rate = 1 - len(failures) / len(cases)
    assert rate >= 0.9, f"{name}: {rate:.1%} exact; failures:\n" + "\n".join(failures)


def test_the_hand_written_samples_are_half_japanese_and_cover_html() -> None:
    cases = load("replies")
    japanese = [c for c in cases if c.id.startswith("replies/ja_")]
    assert len(cases) >= 40 and 0.4 <= len(japanese) / len(cases) <= 0.6
    assert sum(1 for c in cases if c.html) >= 8


def test_unscored_corpus_mails_only_lose_lines_and_are_never_emptied() -> None:
    # GitHub's fragment-level fixtures carry no exact expectation: stripping never writes
    # text of its own, and never leaves a mail empty.
    for case in load("github"):
        got = reply_text(case.text, case.html)
        lines = set(case.text.replace("\r\n", "\n").split("\n"))
        assert got.strip() and all(line in lines for line in got.split("\n")), case.id


REPLY = "Thanks, that fixed it.\n\nTaro"
REPLY_JA = "ご対応ありがとうございました。\n解決しました。\n\n山田"
QUOTE = "\n> Please restart the print spooler.\n>\n> Hanako\n"
QUOTE_JA = "\n> 山田様\n> スプーラーを再起動してください。\n"
OLD = "\nPlease restart the print spooler.\n\nHanako\n"


@pytest.mark.parametrize(
    "reply, header, rest",
    [
        # Gmail
        (REPLY, "On Fri, Nov 20, 2026 at 10:00 AM Hanako Sato <support@example.com> wrote:", QUOTE),
        (REPLY, "On Fri, Nov 20, 2026 at 10:00 AM Example Corporation Support Team <\nsupport@example.com> wrote:", QUOTE),
        (REPLY_JA, "2026年11月20日(金) 10:00 佐藤花子 <support@example.com>:", QUOTE_JA),
        (REPLY_JA, "2026年11月20日(金) 10:00 株式会社サンプル サポート窓口 佐藤花子 <\nsupport@example.com>：", QUOTE_JA),
        (REPLY, "On Fri, 20 Nov 2026, 10:00 Hanako Sato, <support@example.com> wrote:", QUOTE),  # Android
        # Thunderbird, Becky!
        (REPLY, "On 11/20/26 10:00 AM, Hanako Sato wrote:", QUOTE),
        (REPLY, "Hanako Sato wrote on 11/20/26 10:00 AM:", QUOTE),
        (REPLY_JA, "佐藤 花子 さんは書きました:", QUOTE_JA),
        (REPLY_JA, "2026/11/20 10:00, 佐藤 花子 wrote:", QUOTE_JA),
        (REPLY_JA, "On Fri, 20 Nov 2026 10:00:00 +0900\n佐藤 花子 <support@example.com> wrote:", QUOTE_JA),
        # Apple Mail and iPhone
        (REPLY, "On Nov 20, 2026, at 10:00, Hanako Sato <support@example.com> wrote:", QUOTE),
        (REPLY_JA, "2026/11/20 10:00、佐藤花子 <support@example.com>のメール:", QUOTE_JA),
        (REPLY_JA, "2026年11月20日 10:00、佐藤花子 <support@example.com>のメール：", QUOTE_JA),
        # Outlook: header blocks, with or without a rule, bold, full-width colons
        (REPLY, "________________________________\nFrom: Hanako Sato <support@example.com>\nSent: Friday, November 20, 2026 10:00 AM\nTo: Taro Yamada <taro@bigcorp.example>\nSubject: RE: Printer", OLD),
        (REPLY, " ------------------------------\n\n*From:* Hanako Sato <support@example.com>\n*Sent:* Friday, November 20, 2026 10:00 AM\n*To:* Taro Yamada\n*Subject:* RE: Printer", OLD),
        (REPLY_JA, "________________________________\n差出人: 佐藤 花子 <support@example.com>\n送信日時: 2026年11月20日 10:00\n宛先: 山田 太郎 <taro@bigcorp.co.jp>\n件名: RE: 印刷できません", OLD),
        (REPLY_JA, "差出人：佐藤 花子 <support@example.com>\n送信日時：2026年11月20日 10:00\n宛先：山田 太郎\n件名：RE: 印刷できません", OLD),
        (REPLY_JA, "*差出人:* 佐藤 花子\n*日付:* 2026年11月20日 金曜日 10:00\n*宛先:* 山田 太郎\n*件名:* Re: 印刷できません", OLD),
        (REPLY, "-----Original Message-----\nFrom: Hanako Sato [mailto:support@example.com] \nSent: Friday, November 20, 2026 10:00 AM\nTo: Taro Yamada\nSubject: RE: Printer", OLD),
        (REPLY_JA, "-----元のメッセージ-----\n差出人: 佐藤 花子\n送信日時: 2026年11月20日 10:00\n件名: RE: 印刷", OLD),
        (REPLY_JA, "----- 元のメッセージ -----\n差出人: 佐藤 花子\n送信日時: 2026年11月20日 10:00\n件名: RE: 印刷", OLD),
        (REPLY_JA, "-------- オリジナルメッセージ --------\n送信元: 佐藤 花子\n日付: 2026/11/20 10:00 (GMT+09:00)\n件名: Re: 印刷", OLD),
        # Forwarded messages
        (REPLY, "---------- Forwarded message ---------\nFrom: Jiro <jiro@partner.example>\nDate: Fri, Nov 20, 2026 at 10:00 AM\nSubject: Portal\nTo: <taro@bigcorp.example>", OLD),
        (REPLY_JA, "---------- 転送されたメッセージ ----------\nFrom: 田中 次郎 <jiro@partner.example.jp>\nDate: 2026年11月20日(金) 10:00\nSubject: 請求書", OLD),
        (REPLY, "Begin forwarded message:\n\nFrom: Jiro <jiro@partner.example>\nSubject: Portal\nDate: November 20, 2026 at 10:00:00 GMT+9", OLD),
        (REPLY_JA, "転送されたメッセージ:\n\n差出人: 田中 次郎 <jiro@partner.example.jp>\n件名: 請求書\n日付: 2026年11月20日 10:00:00 JST", OLD),
        # Other languages of the public corpora
        (REPLY, "Am 20.11.2026 um 10:00 schrieb Hanako Sato <support@example.com>:", QUOTE),
        (REPLY, "Am 20.11.26 um 10:00 schrieb Hanako Sato:", QUOTE),
        (REPLY, "Le 20 nov. 2026 à 10:00, Hanako Sato <support@example.com> a écrit :", QUOTE),
        (REPLY, "-----Ursprüngliche Nachricht-----\nVon: Hanako Sato\nGesendet: Freitag, 20. November 2026 10:00\nAn: Taro\nBetreff: Drucker", OLD),
    ],
)
def test_each_reply_header_form_cuts_the_history_below_it(reply: str, header: str, rest: str) -> None:
    assert strip_reply(f"{reply}\n\n{header}\n{rest}") == reply


@pytest.mark.parametrize(
    "signature",
    [
        "-- \nTaro Yamada\nBigCorp IT",
        "--\nTaro Yamada",
        "Sent from my iPhone",
        "Sent from my Verizon Wireless BlackBerry",
        "Get Outlook for iOS<https://aka.ms/o0ukef>",
        "iPhoneから送信",
        "iPadより送信",
        "Galaxy スマートフォンから送信されました",
        "Von meinem iPhone gesendet",
        "━━━━━━━━━━━━━━━━\n株式会社ビッグコープ 情報システム部\n山田 太郎\nTEL: 03-1234-5678\n━━━━━━━━━━━━━━━━",
        "______________________\nbigcorp-users mailing list\nhttps://lists.bigcorp.example/users",
    ],
)
def test_signatures_go(signature: str) -> None:
    assert strip_reply(f"{REPLY}\n\n{signature}\n") == REPLY
    assert strip_reply(f"{REPLY}\n\n{signature}\n\nOn Fri, Nov 20, 2026 at 10:00 AM Hanako <support@example.com> wrote:\n{QUOTE}") == REPLY


@pytest.mark.parametrize(
    "text",
    [
        "Here is a fix -- this is not a signature.\n\nkthxbai",
        "Sent from my desk, as the phone app cannot attach logs.\n\nTaro",
        "On 3 occasions this week the nightly job failed:\n- Monday\n- Wednesday",
        "I wrote to our vendor and they said:\n\"the driver is the cause\".",
        "On 20 Nov I wrote to you about the printer. Then:\n- it stopped",
        "From: our side, nothing changed.\nTo: be sure, we ran it by hand.",
        "2026/11/20 10:00 サーバー停止\n2026/11/20 10:30 サーバー起動\n\n以下の結果となりました：\n  正常",
        "手順は以下の通りです。\n---\n1. 再起動\n2. https://example.com/manual を参照\n---\nよろしくお願いいたします。",
        "山田です。\n\nスマートフォンから送信されたデータが届きません。",
    ],
)
def test_text_that_only_looks_like_a_header_or_signature_is_kept(text: str) -> None:
    assert strip_reply(text) == text


def test_quoted_trailing_history_without_a_header_goes() -> None:
    assert strip_reply("わかりました。\n明日試します。\n\n>山田様\n>ドライバーを更新してください。\n") == "わかりました。\n明日試します。"
    assert strip_reply("OK.\n\n＞ 再起動してください。\n＞ 佐藤\n") == "OK."


def test_inline_answers_keep_their_questions_and_lose_the_header_and_closing_quote() -> None:
    text = (
        "On Fri, Nov 20, 2026 at 10:00 AM Hanako <support@example.com> wrote:\n\n"
        "> Which OS do you use?\n\nWindows 11.\n\n> Every computer?\n\nOnly two.\n\n> Regards,\n> Hanako\n"
    )
    assert strip_reply(text) == "> Which OS do you use?\n\nWindows 11.\n\n> Every computer?\n\nOnly two."
    with_greeting = "Hi Hanako,\n\n" + text.replace("\n\n> Which", "\n> Which", 1)
    assert strip_reply(with_greeting) == "Hi Hanako,\n\n> Which OS do you use?\n\nWindows 11.\n\n> Every computer?\n\nOnly two."


def test_a_bottom_posted_reply_keeps_only_the_text_under_the_quote() -> None:
    text = "佐藤 花子 さんは書きました:\n> 再起動後の状態は?\n\n正常に動いています。\n\n-- \n山田\n"
    assert strip_reply(text) == "正常に動いています。"


def test_a_short_footer_under_a_top_posted_quote_is_not_taken_for_an_answer() -> None:
    text = (
        "Done, thanks.\n\nOn Fri, Nov 20, 2026 at 10:00 AM Hanako <support@example.com> wrote:\n"
        "> Please restart.\n\nThis message was scanned for viruses.\n"
    )
    assert strip_reply(text) == "Done, thanks."


def test_a_forward_with_nothing_above_it_keeps_the_forwarded_body() -> None:
    text = "---------- Forwarded message ---------\nFrom: Jiro <jiro@partner.example>\nSubject: Portal\n\nI cannot log in.\n"
    assert strip_reply(text) == "I cannot log in."


@pytest.mark.parametrize(
    "text",
    [
        "On Fri, Nov 20, 2026 at 10:00 AM Hanako <support@example.com> wrote:\n\n> Can we close this case?\n",
        "2026年11月20日(金) 10:00 佐藤花子 <support@example.com>:\n> 本件、解決済みとしてよろしいでしょうか。",
        "> only a quote\n> and nothing else",
        "-- \nTaro Yamada",
        "iPhoneから送信",
    ],
)
def test_a_mail_that_is_all_quote_or_signature_is_kept_whole(text: str) -> None:
    assert strip_reply(text) == text.strip()
    assert reply_text(text) == text.strip()


def test_nothing_is_lost_from_an_html_mail_that_is_all_quote() -> None:
    html = '<div class="gmail_quote"><div class="gmail_attr">On Fri, Nov 20, 2026 Hanako &lt;support@example.com&gt; wrote:</div><blockquote class="gmail_quote">Can we close this case?</blockquote></div>'
    got = reply_text("", html)
    assert "Can we close this case?" in got and "wrote:" in got


def test_empty_and_line_end_variants() -> None:
    assert strip_reply("") == ""
    assert strip_reply("\r\n\r\n") == ""
    assert strip_reply("Line one\r\nLine two\r\n\r\nOn Fri, Nov 20, 2026 at 10:00 AM Hanako <s@example.com> wrote:\r\n> x\r\n") == "Line one\nLine two"


def test_a_megabyte_line_comes_back_whole() -> None:
    text = "x" * 1_000_000
    assert strip_reply(text) == text


# -- HTML -----------------------------------------------------------------------------------


GMAIL = (
    '<div dir="ltr">承知しました。<div><br></div><div>山田</div><br><span class="gmail_signature_prefix">-- </span><br>'
    '<div class="gmail_signature" data-smartmail="gmail_signature">株式会社ビッグコープ<br>山田 太郎</div></div>'
    '<div class="gmail_quote"><div class="gmail_attr">2026年11月20日(金) 10:00 佐藤花子 &lt;support@example.com&gt;:<br></div>'
    '<blockquote class="gmail_quote">再起動をお願いします。</blockquote></div>'
)
OUTLOOK_BOX = (
    "<div class=WordSection1><p class=MsoNormal>Done, thanks.</p><div style='border:none;border-top:solid #E1E1E1 1.0pt;"
    "padding:3.0pt 0in 0in 0in'><p class=MsoNormal><b>From:</b> Hanako Sato<br><b>Sent:</b> Friday<br><b>To:</b> Taro<br>"
    "<b>Subject:</b> RE: Printer</p></div><p class=MsoNormal>Please restart the spooler.</p></div>"
)
OUTLOOK_WEB = (
    '<div>Done, thanks.</div><div id="appendonsend"></div><hr style="display:inline-block;width:98%">'
    '<div id="divRplyFwdMsg"><b>From:</b> Hanako Sato<br><b>Sent:</b> Friday</div><div>Please restart the spooler.</div>'
)
APPLE = (
    '<div dir="ltr">Done, thanks.</div><div dir="ltr"><br><blockquote type="cite">On Nov 20, 2026, at 10:00, Hanako '
    '&lt;support@example.com&gt; wrote:<br><br></blockquote></div><blockquote type="cite"><div>Please restart the spooler.</div></blockquote>'
)
YAHOO = '<div>Done, thanks.</div><div class="ydp1a2byahoo_quoted"><div>Please restart the spooler.</div></div>'
THUNDERBIRD = (
    '<p>Done, thanks.</p><div class="moz-cite-prefix">On 11/20/26 10:00 AM, Hanako wrote:<br></div>'
    '<blockquote type="cite">Please restart the spooler.</blockquote>'
)


@pytest.mark.parametrize(
    "html, expected",
    [
        (GMAIL, "承知しました。\n\n山田"),
        (OUTLOOK_BOX, "Done, thanks."),
        (OUTLOOK_WEB, "Done, thanks."),
        (APPLE, "Done, thanks."),
        (YAHOO, "Done, thanks."),
        (THUNDERBIRD, "Done, thanks."),
    ],
)
def test_html_replies_are_cut_on_their_structure(html: str, expected: str) -> None:
    assert reply_text("", html) == expected
    # The same when the text part is only the HTML turned into text.
    assert reply_text(html_to_text(html), html) == expected


def test_the_structure_is_used_when_the_plain_text_is_only_the_html_as_text() -> None:
    # Yahoo's quote has no header and no ">": only the HTML structure shows where it starts.
    assert strip_reply(html_to_text(YAHOO)) != "Done, thanks."
    assert reply_text(html_to_text(YAHOO), YAHOO) == "Done, thanks."


def test_a_real_plain_text_part_is_preferred_to_the_html() -> None:
    text = "Plain reply.\n\nOn Fri, Nov 20, 2026 at 10:00 AM Hanako <support@example.com> wrote:\n> Please restart.\n"
    assert reply_text(text, YAHOO) == "Plain reply."


def test_an_outlook_box_without_a_from_line_is_not_a_quote() -> None:
    html = "<p>Results:</p><div style='border:none;border-top:solid #E1E1E1 1.0pt'><p>Page 1 printed.</p></div>"
    assert reply_text("", html) == "Results:\n\nPage 1 printed."


def test_html_inline_answers_keep_their_questions() -> None:
    html = (
        '<div class="moz-cite-prefix">On 11/20/26 10:00 AM, Hanako wrote:<br></div>'
        '<blockquote type="cite">Which version?</blockquote><p>4.1.9</p><blockquote type="cite">Which OS?</blockquote>'
        '<p>Windows 11</p><blockquote type="cite">Regards, Hanako</blockquote>'
    )
    assert reply_text("", html) == "> Which version?\n\n4.1.9\n>\n> Which OS?\n\nWindows 11"
