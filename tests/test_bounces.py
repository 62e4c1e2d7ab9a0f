"""Bounces act only on what they prove (issue 15, item 1).

A forged bounce used to silence any address for seven days, agents included: every
``X-Failed-Recipients`` entry of a DSN sent to one of our signed return-path addresses was
suppressed. Now a suppression needs a recipient of the outbox row the bounce names: by our
Message-ID, or by the signed address's case and a matching recipient of the mail sent to the
customer side. Everything else is recorded on the timeline as ``not_acted_on``.

Everything runs through the real command line (``intake ingest``, ``tick``, ``outbox list``,
``cases show``), with outbound mail written as files (maildir mode).
"""

from __future__ import annotations

import json
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from conftest import SIMPLE_TEAM, write_config
from mailfactory import make_mail

AGENT = "hanako@example.com"
OTHER_AGENT = "ken@example.com"
STRANGER = "victim@elsewhere.example.net"


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """Two agents on every queue (each gets the new-case notice), nobody assigned."""
    return write_config(tmp_path, team=SIMPLE_TEAM)


@pytest.fixture(autouse=True)
def database(run_intake) -> None:
    run_intake("db", "upgrade", check=True)


def dsn(*, to: str, final: list[str], failed_header: list[str] | None = None, original_id: str | None = None,
        action: str = "failed") -> bytes:
    """A delivery-status report (RFC 3464) as a mail system writes it: a human part in
    English and Japanese, one per-recipient block per ``final`` address, and the returned
    headers when ``original_id`` is given."""
    blocks = "".join(f"Final-Recipient: rfc822; {a}\r\nAction: {action}\r\nStatus: 5.1.1\r\n"
                     f"Diagnostic-Code: smtp; 550 5.1.1 <{a}>: user unknown\r\n\r\n" for a in final)
    headers = f"X-Failed-Recipients: {', '.join(failed_header)}\r\n" if failed_header else ""
    returned = (f"--B\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <{original_id}>\r\n"
                f"Subject: [CASE-1] お問い合わせを受け付けました\r\n\r\n") if original_id else ""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.bigcorp.co.jp>\r\n"
        f"To: {to}\r\nSubject: Undelivered Mail Returned to Sender / 配信不能のお知らせ\r\n"
        f"Message-ID: <dsn-{abs(hash((to, tuple(final), original_id)))}@mx.bigcorp.co.jp>\r\n{headers}"
        "Date: Fri, 20 Nov 2026 10:05:00 +0900\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "Your message could not be delivered.\r\nメッセージを配信できませんでした。\r\n\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.bigcorp.co.jp\r\n\r\n{blocks}"
        f"{returned}--B--\r\n"
    ).encode("utf-8")


def ingest(run_intake, tmp_path: Path, raw: bytes, mailbox: str | None = None) -> str:
    path = tmp_path / f"in-{abs(hash(raw))}.eml"
    path.write_bytes(raw)
    res = run_intake("ingest", *(["--mailbox", mailbox] if mailbox else []), str(path), check=True)
    return res.stdout


def outbox(run_intake) -> list[dict]:
    return json.loads(run_intake("outbox", "list", "--json", check=True).stdout)


def timeline(run_intake, case: str) -> list[dict]:
    return json.loads(run_intake("cases", "show", case, "--json", check=True).stdout)["timeline"]


def ack_of(run_intake, case: str) -> dict:
    [ack] = [m for m in outbox(run_intake) if m["case"] == case and m["template"] == "ack"]
    return ack


def signed_address(tmp_path: Path, ack: dict) -> str:
    """The case's signed address, as its customer sees it: Reply-To of the delivered ack
    (it is also the envelope sender, where bounces go)."""
    [path] = [p for p in (tmp_path / "outbox").glob("*-ack.eml") if f"-{ack['id']:08d}-" in p.name]
    reply_to = message_from_bytes(path.read_bytes(), policy=policy.default)["Reply-To"]
    return reply_to.addresses[0].addr_spec


def open_case(run_intake, tmp_path: Path, sender: str, subject: str, body: str) -> dict:
    """A new case from ``sender``, its mails delivered; its acknowledgement's outbox row."""
    before = {m["case"] for m in outbox(run_intake)}
    ingest(run_intake, tmp_path, make_mail(subject=subject, sender=sender, body=body))
    assert "outbox-delivery:" in run_intake("tick", check=True).stdout
    [case] = {m["case"] for m in outbox(run_intake)} - before
    return ack_of(run_intake, case)


def bounce_entry(run_intake, case: str) -> dict:
    [entry] = [e for e in timeline(run_intake, case) if e["type"] == "bounce"]
    return entry


def mails_to(run_intake, case: str, address: str) -> list[dict]:
    return [m for m in outbox(run_intake) if m["case"] == case and address in m["recipients"]]


def skipped(run_intake, case: str) -> list[dict]:
    return [e for e in timeline(run_intake, case) if e["type"] == "mail_skipped"]


def test_a_forged_bounce_to_the_signed_address_silences_neither_an_agent_nor_a_stranger(run_intake, tmp_path):
    ack = open_case(run_intake, tmp_path, "山田 太郎 <taro@bigcorp.co.jp>", "請求書が届きません",
                    "先月の請求書がまだ届いていません。\n")
    case = ack["case"]
    signed = signed_address(tmp_path, ack)
    # The customer (who knows the signed address from Reply-To) forges a DSN naming an agent,
    # who got this case's new-case notice, and a stranger, in both places a DSN names them.
    forged = dsn(to=signed, final=[AGENT, STRANGER], failed_header=[AGENT, STRANGER])
    assert "bounce" in ingest(run_intake, tmp_path, forged, mailbox=signed)

    entry = bounce_entry(run_intake, case)
    assert entry["suppressed"] == [] and entry["outbox"] == []
    assert entry["not_acted_on"] == sorted([AGENT, STRANGER])
    assert {m["state"] for m in outbox(run_intake)} == {"sent"}  # nothing marked bounced

    # Both still get mail: the stranger's own inquiry is acknowledged, the agent notified.
    later = open_case(run_intake, tmp_path, f"Victim <{STRANGER}>", "Where is my order?",
                      "My order has not arrived.\n")
    assert later["state"] == "sent" and later["to"] == STRANGER
    assert [m["state"] for m in mails_to(run_intake, later["case"], AGENT)] == ["sent"]
    assert skipped(run_intake, later["case"]) == []


def test_a_forged_bounce_naming_a_customers_message_id_silences_no_agent(run_intake, tmp_path):
    """The customer's own Message-ID is known to everyone on the mail: naming it proves no
    mail of ours bounced, so the agents listed are not suppressed either."""
    ack = open_case(run_intake, tmp_path, "Alice <alice@client.example.net>", "Printer does not print",
                    "Hello, my printer does not print.\n")
    case = ack["case"]
    customer_mid = next(e["message_id"] for e in timeline(run_intake, case)
                        if e["type"] == "message" and e["direction"] == "in")
    forged = dsn(to=signed_address(tmp_path, ack), final=[AGENT, OTHER_AGENT], original_id=customer_mid)
    ingest(run_intake, tmp_path, forged, mailbox=signed_address(tmp_path, ack))

    entry = bounce_entry(run_intake, case)
    assert entry["suppressed"] == [] and entry["not_acted_on"] == sorted([AGENT, OTHER_AGENT])
    later = open_case(run_intake, tmp_path, "Bob <bob@client.example.net>", "印刷できません", "印刷できません。\n")
    assert sorted(m["to"] for m in outbox(run_intake) if m["case"] == later["case"]
                  and m["template"] == "new_case_agent" and m["state"] == "sent") == sorted([AGENT, OTHER_AGENT])


def test_a_genuine_bounce_naming_our_message_id_suppresses_that_recipient_only(run_intake, tmp_path):
    ack = open_case(run_intake, tmp_path, "Kim <kim@client.example.net>", "返品について", "返品したいです。\n")
    case = ack["case"]
    signed = signed_address(tmp_path, ack)
    # The mail system of kim's domain returns our acknowledgement; an agent listed beside
    # kim (a forger's addition, or a confused report) is no recipient of that mail.
    genuine = dsn(to=signed, final=["kim@client.example.net"], failed_header=["kim@client.example.net", AGENT],
                  original_id=ack["message_id"])
    ingest(run_intake, tmp_path, genuine, mailbox=signed)

    entry = bounce_entry(run_intake, case)
    assert entry["bounced_message_id"] == ack["message_id"] and entry["outbox"] == [ack["id"]]
    assert entry["suppressed"] == ["kim@client.example.net"] and entry["not_acted_on"] == [AGENT]
    assert ack_of(run_intake, case)["state"] == "bounced"

    # kim gets no automated mail for a while; the agent still does.
    ingest(run_intake, tmp_path, make_mail(subject="Return, again", sender="Kim <kim@client.example.net>"))
    run_intake("tick", check=True)
    [second] = [c for c in {m["case"] for m in outbox(run_intake)} if c != case]
    assert [e["check"] for e in skipped(run_intake, second)] == ["suppressed"]
    assert mails_to(run_intake, second, "kim@client.example.net") == []
    assert [m["state"] for m in mails_to(run_intake, second, AGENT)] == ["sent"]


def test_a_bounce_to_the_signed_address_with_the_customers_address_suppresses_the_customer(run_intake, tmp_path):
    """No Message-ID we know (the mail system returned nothing of our mail): the signed
    address names the case, and the failed recipient is the one our acknowledgement went to."""
    ack = open_case(run_intake, tmp_path, "Max <max@client.example.net>", "Invoice missing", "No invoice yet.\n")
    case = ack["case"]
    signed = signed_address(tmp_path, ack)
    ingest(run_intake, tmp_path, dsn(to=signed, final=["max@client.example.net"]), mailbox=signed)

    entry = bounce_entry(run_intake, case)
    assert entry["suppressed"] == ["max@client.example.net"] and entry["outbox"] == [ack["id"]]
    assert "not_acted_on" not in entry
    assert ack_of(run_intake, case)["state"] == "bounced"
    assert [m["state"] for m in mails_to(run_intake, case, AGENT)] == ["sent"]  # the agents' notices stay sent

    ingest(run_intake, tmp_path, make_mail(subject="請求書の再送", sender="Max <max@client.example.net>"))
    run_intake("tick", check=True)
    [second] = [c for c in {m["case"] for m in outbox(run_intake)} if c != case]
    assert [e["check"] for e in skipped(run_intake, second)] == ["suppressed"]
    assert [m["state"] for m in mails_to(run_intake, second, AGENT)] == ["sent"]
