"""Classification of sender and kind, one test per signal of shared/notes/PEERS.md."""

from __future__ import annotations

import pytest

from intake.mail.classify import AGENT, AUTOMATED, BOUNCE, CUSTOMER, MESSAGE, OWN, classify
from intake.mail.parse import parse
from mailfactory import make_mail

OWN_ADDRS = frozenset({"support@example.com", "billing@example.com"})
AGENTS = frozenset({"hanako@example.com"})


def _classify(raw: bytes):
    return classify(parse(raw), own_addresses=OWN_ADDRS, agents=AGENTS)


def test_plain_customer_mail_is_a_message():
    c = _classify(make_mail())
    assert (c.sender, c.kind) == (CUSTOMER, MESSAGE)
    assert c.opens_case


def test_agent_and_own_senders():
    assert _classify(make_mail(sender="Hanako <Hanako@Example.com>")).sender == AGENT
    own = _classify(make_mail(sender="support+c12-abc@example.com"))
    # Our own mail coming back (a CC loop, a re-import) never opens a case.
    assert (own.sender, own.kind) == (OWN, AUTOMATED)


@pytest.mark.parametrize(
    "headers",
    [
        {"Auto-Submitted": "auto-replied"},
        {"Auto-Submitted": "auto-generated"},
        {"Precedence": "bulk"},
        {"Precedence": "junk"},
        {"Precedence": "list"},
        {"Precedence": "auto_reply"},
        {"X-Autoreply": "yes"},
        {"X-Autorespond": "yes"},
        {"X-Auto-Response-Suppress": "All"},
        {"X-Loop": "helpdesk"},
        {"List-Id": "<users.lists.example.org>"},
        {"List-Unsubscribe": "<mailto:leave@lists.example.org>"},
        {"Return-Path": "<>"},
        {"X-MS-Exchange-Inbox-Rules-Loop": "someone@example.org"},
    ],
)
def test_automated_signals(headers):
    c = _classify(make_mail(headers=headers))
    assert c.kind == AUTOMATED
    assert not c.opens_case
    assert c.reasons  # the admin sees why


def test_auto_submitted_no_is_a_person():
    assert _classify(make_mail(headers={"Auto-Submitted": "no"})).kind == MESSAGE


@pytest.mark.parametrize("sender", ["noreply@shop.example.org", "no-reply@shop.example.org",
                                    "do-not-reply@shop.example.org", "donotreply@shop.example.org"])
def test_noreply_senders_are_automated(sender):
    assert _classify(make_mail(sender=sender)).kind == AUTOMATED


def test_japanese_out_of_office_is_automated():
    raw = make_mail(subject="不在通知：11月25日まで休暇をいただいております", charset="iso-2022-jp", cte="7bit",
                    body="ただいま不在にしております。\n", headers={"Auto-Submitted": "auto-replied"})
    assert _classify(raw).kind == AUTOMATED


def _dsn(original_id: str) -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.customer.example.org>\r\n"
        "To: support@example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn-1@mx.customer.example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nThe mail could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.customer.example.org\r\n\r\n"
        "Final-Recipient: rfc822; gone@customer.example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: support@example.com\r\nTo: gone@customer.example.org\r\nMessage-ID: <{original_id}>\r\n"
        "Subject: [CASE-1] Re: help\r\n"
        "--B--\r\n"
    ).encode()


def test_delivery_status_report_is_a_bounce_naming_our_message():
    c = _classify(_dsn("out-1@example.com"))
    assert c.kind == BOUNCE
    assert c.bounced_message_ids == ("out-1@example.com",)
    assert "gone@customer.example.org" in c.report.recipients and c.report.permanent
    assert not c.opens_case
