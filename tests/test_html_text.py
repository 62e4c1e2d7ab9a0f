"""HTML turned into text when the HTML is hostile or broken (issue 14: bounded cost).

What is checked is what a reader sees: the text before tag soup, nothing of an unfinished
tag or comment at the end (HTML5's end-of-file rules, which browsers follow), at most 20
quote marks on a line, the first 128 KiB of a huge body. Shapes that once took minutes run
in a child process whose generous timeout only guards against a hang: timing is measured
by bench/parse_bench.py, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from intake.mail.parse import MAX_HTML_CHARS, html_to_text, parse
from intake.mail.quotes import reply_text

HELLO = "<p>Hello Bob,</p><p>see below.</p>"
SHOWN = "Hello Bob,\n\nsee below."

# Each about 100 KB after a readable start, under MAX_HTML_CHARS so that all of it is read:
# name -> (HTML as a Python expression, the text). Before the fix the first ones took
# seconds to minutes at this size, and showed the soup as text.
HOSTILE: dict[str, tuple[str, str]] = {
    "unfinished tags": ("HELLO + '<a' * 50_000", SHOWN),
    "unfinished tags with spaces": ("HELLO + '<a ' * 33_000", SHOWN),
    "unclosed comments": ("HELLO + '<!--' * 25_000", SHOWN),
    "unclosed end tags": ("HELLO + '</' * 50_000", SHOWN),
    "unclosed processing instructions": ("HELLO + '<?' * 50_000", SHOWN),
    "unclosed CDATA": ("HELLO + '<![CDATA[' * 11_000", SHOWN),
    "unclosed quoted attributes": ("HELLO + '<a x=\"' * 16_000", SHOWN),
    "unclosed style": ("HELLO + '<style>' + '<a' * 50_000", SHOWN),
    "unclosed script": ("HELLO + '<script>' + '</ ' * 33_000", SHOWN),
    "white space and breaks": ("HELLO + ' <br>' * 20_000", SHOWN),
    "nested quotes": ("'<blockquote>x' * 7_500", "\n".join("> " * min(d, 20) + "x" for d in range(1, 7_501))),
    "a character reference of 5,000 digits": ("HELLO + '&#' + '9' * 5000 + ';' + '<x' * 45_000", SHOWN + "\n\n\ufffd"),
}  # fmt: skip

_CHILD = """
import json, sys
from intake.mail.parse import html_to_text
HELLO = {hello!r}
print(json.dumps(html_to_text({expr})))
"""


def _in_child(expr: str) -> str:
    """html_to_text of ``expr`` in a child process; a hang fails the test instead of the run."""
    code = _CHILD.format(hello=HELLO, expr=expr)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(res.stdout)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_html_shows_what_a_reader_sees(name: str) -> None:
    expr, shown = HOSTILE[name]
    assert _in_child(expr) == shown


def test_a_parse_that_html_parser_gives_up_on_still_ends() -> None:
    # '<![' without a keyword makes html.parser raise on some Pythons: the tags are then
    # stripped, in linear time.
    assert _in_child("'<p>x</p><![ ' + '<x' * 50_000").startswith("x")


def test_an_unfinished_tag_at_the_end_is_not_text() -> None:
    assert html_to_text('<p>Hi <a href="http://example.com') == "Hi"
    assert html_to_text("<p>Hi</p><!-- a comment never closed <p>hidden</p>") == "Hi"
    assert html_to_text("<p>Hi</p><di") == "Hi"


def test_a_lone_less_than_at_the_end_stays_text() -> None:
    assert html_to_text("1 < 2 <") == "1 < 2 <"
    assert html_to_text("a </") == "a </"


def test_complete_html_is_read_as_before() -> None:
    html = '<p>See <a href="https://example.com/x">the page</a> &amp; <b>reply</b>.</p><blockquote>old</blockquote>'
    assert html_to_text(html) == "See the page <https://example.com/x> & reply.\n>\n> old"


def test_quote_marks_stop_at_20_but_the_nesting_is_followed() -> None:
    html = "<blockquote>" * 100 + "deep" + "</blockquote>" * 100 + "<p>after</p>"
    assert html_to_text(html) == "> " * 20 + "deep\n\nafter"


def test_a_huge_decimal_reference_keeps_the_structure() -> None:
    # int() refuses more than 4,300 digits; the number is past U+10FFFF either way.
    html = "<p>caf&#233; &#" + "9" * 5000 + "; &#" + "0" * 5000 + "65;</p><style>p { color: red }</style>"
    assert html_to_text(html) == "café \ufffd A"


def test_a_reply_with_a_huge_decimal_reference_is_still_cut() -> None:
    html = '<p>Thanks</p><div class="gmail_quote">On Mon, Bob wrote:<blockquote>&#' + "9" * 5000 + ";</blockquote></div>"
    assert reply_text("", html) == "Thanks"


def test_the_text_of_a_huge_html_body_is_its_start_and_the_cut_is_noted() -> None:
    html = "<p>" + "word " * (MAX_HTML_CHARS // 5) + "</p><p>END</p>"
    raw = (
        "From: a@example.org\r\nTo: support@example.com\r\nSubject: big\r\nMessage-ID: <big@example.org>\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n" + html
    ).encode()
    m = parse(raw)
    assert m.html == html
    assert m.text.startswith("word word") and "END" not in m.text
    assert any(d.startswith("text/html:") and f"{MAX_HTML_CHARS:,}" in d for d in m.defects)


def test_a_tag_broken_by_the_cut_is_not_shown() -> None:
    assert html_to_text("<div>" * (MAX_HTML_CHARS // 5 + 1)) == ""
    assert html_to_text("x" * (MAX_HTML_CHARS - 1) + "</p>").endswith("x")


def test_a_reply_with_a_huge_div_tag_is_cut_within_bounded_memory() -> None:
    # The quote finder's regex once kept ~200 bytes per character of a tag: 10 MB in one
    # <div ...> needed about 2 GB. A child limited to 1 GiB of address space must finish.
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from intake.mail.quotes import reply_text\n"
        "html = '<p>Thanks</p><div class=\"gmail_quote\">On Mon, Bob wrote:<blockquote>x</blockquote></div>'\n"
        "print(reply_text('', html + '<div ' + 'x' * 10_000_000 + '>'))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-500:]
    assert res.stdout.strip() == "Thanks"


def test_styles_scripts_and_inline_images_do_not_use_up_the_text_budget() -> None:
    # Outlook puts tens of KiB of <style> first; an inline image can be megabytes of base64.
    bulk = "<style>" + "p{margin:0}" * (MAX_HTML_CHARS // 5) + "</style>" \
        + '<img src="data:image/png;base64,' + "A" * MAX_HTML_CHARS + '">' \
        + "<SCRIPT>var x = '<p>no</p>';</SCRIPT>"
    html = bulk + "<p>ご確認ください。Please check.</p>"
    assert html_to_text(html).strip() == "ご確認ください。Please check."
    reply = bulk + '<p>Thanks</p><div class="gmail_quote">On Mon, Bob wrote:<blockquote>x</blockquote></div>'
    assert reply_text("", reply) == "Thanks"


def test_letters_that_lowercase_longer_do_not_shift_what_is_dropped() -> None:
    # "İ".lower() is two characters: positions found in a lowered copy would drift.
    html = "<p>" + "İ" * 50 + "</p><style>.a{}</style><p>İstanbul ofisi</p>"
    assert html_to_text(html).split() == ["İ" * 50, "İstanbul", "ofisi"]
