"""Which mails a change causes, their headers, the language of a case, and loop protection."""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest
from conftest import SIMPLE_TEAM, case_detail, case_ops, list_cases, open_test_app, set_status
from conftest import outbox_items as outbox
from conftest import write_config as _write_config


def write_config(folder, extra: str = "", **kw):
    """These tests are about who gets which mail: a team without automatic assignment."""
    return _write_config(folder, extra, team=SIMPLE_TEAM, **kw)


@pytest.fixture
def config_path(tmp_path):
    return write_config(tmp_path)
from mailfactory import agent_auth, make_mail

from intake.db.outbox import OutboxMail
from intake.edges.outbox_sender import build_mime
from intake.loops import LOOP_TAG, LoopFacts, LoopLimits, loop_protection
from intake.mail.subjects import clean_header, subject_with_token
from intake.notify import choose_language
from intake.states import Status
from intake.threads import parse_reply_address


def ingest(app, raw: bytes, mailbox: str = "support@example.com", envelope_to: list[str] | None = None):
    rid = app.store.receive(raw, channel="email", mailbox=mailbox, envelope_to=envelope_to or [mailbox])
    return app.processor.process(rid)


def outbox_row(app, outbox_id: int) -> OutboxMail:
    with app.store.read() as tx:
        return tx.outbox.get(outbox_id)


def parsed(item: OutboxMail):
    return message_from_bytes(build_mime(item), policy=policy.default)


def timeline(app, label: str) -> list[dict]:
    return case_detail(app, label)["timeline"]


def secret(app) -> str:
    return app.processor.secret


# -- language ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,expected", [
    (dict(rule="en", contact="ja", message_text="こんにちは", mailbox="ja"), ("en", "rule")),
    (dict(rule=None, contact="en", message_text="こんにちは", mailbox="ja"), ("en", "contact")),
    (dict(rule=None, contact=None, message_text="プリンターが動きません", mailbox="en"), ("ja", "message")),
    (dict(rule=None, contact=None, message_text="The printer is broken", mailbox="ja"), ("en", "message")),
    (dict(rule=None, contact=None, message_text=" 12345 \n", mailbox="en"), ("en", "mailbox")),
    (dict(rule=None, contact=None, message_text="", mailbox=None), ("ja", "default")),
])
def test_language_of_a_case(kw, expected):
    assert choose_language(default="ja", **kw) == expected


def test_the_chosen_language_is_stored_and_used_for_the_ack(app):
    ingest(app, make_mail(subject="Printer broken", body="It does not print.\n"))
    ingest(app, make_mail(subject="印刷できません", body="昨日から印刷できません。\n", sender="taro@bigcorp.co.jp"))
    assert [c.language for c in list_cases(app)] == ["en", "ja"]
    acks = outbox(app, state="queued")
    acks = [i for i in acks if i.template == "ack"]
    assert acks[0].subject == "[CASE-1] We have received your request: Printer broken"
    assert acks[1].subject == "[CASE-2] お問い合わせを受け付けました：印刷できません"


def test_the_contacts_stored_language_wins_over_detection(app):
    with case_ops(app) as ops:
        ops.set_contact_language("alice@customer.example.org", "ja")
    ingest(app, make_mail(subject="Hello", body="English text\n"))
    assert list_cases(app)[0].language == "ja"


# -- headers -----------------------------------------------------------------------------------


def test_ack_headers(app):
    raw = make_mail(subject="請求書が届きません", sender="山田 太郎 <taro@bigcorp.co.jp>", body="請求書が届きません。\n",
                    message_id="<orig-1@bigcorp.co.jp>", headers={"References": "<older@bigcorp.co.jp>"})
    ingest(app, raw)
    ack = [i for i in outbox(app) if i.template == "ack"][0]
    m = parsed(ack)
    assert m["From"].addresses[0].addr_spec == "support@example.com"
    assert m["From"].addresses[0].display_name == "example.com"
    assert m["To"].addresses[0].addr_spec == "taro@bigcorp.co.jp"
    assert m["To"].addresses[0].display_name == "山田 太郎"
    reply_to = m["Reply-To"].addresses[0].addr_spec
    assert reply_to.startswith("support+c1-") and reply_to.endswith("@example.com")
    assert parse_reply_address(reply_to, secret(app)) == ("c", 1)
    assert ack.mail_from == reply_to  # the envelope sender: bounces name the case
    mid = m["Message-ID"].strip("<>")
    assert mid.endswith("@example.com") and mid == ack.message_id
    assert m["In-Reply-To"] == "<orig-1@bigcorp.co.jp>"
    assert m["References"].split() == ["<older@bigcorp.co.jp>", "<orig-1@bigcorp.co.jp>"]
    assert m["Subject"] == "[CASE-1] お問い合わせを受け付けました：請求書が届きません"
    assert m["Auto-Submitted"] == "auto-replied"
    assert m["X-Auto-Response-Suppress"] == "All"
    assert m["X-Intake-Loop"] == "example.com"
    # UTF-8 with a 7-bit transfer encoding: every byte is ASCII.
    data = build_mime(ack)
    assert max(data) < 128
    text = m.get_body(("plain",))
    assert text["Content-Transfer-Encoding"] in ("base64", "quoted-printable")
    assert text.get_content_charset() == "utf-8"
    assert "受付番号：CASE-1" in text.get_content()
    assert m.get_body(("html",)) is not None
    # Stored with the case as an outgoing message, so replies thread by References.
    out = [e for e in timeline(app, "CASE-1") if e["type"] == "message" and e["direction"] == "out"]
    assert any(e["message_id"] == mid and e["visibility"] == "public" for e in out)


def test_a_reply_to_our_ack_threads_to_the_case_by_references(app):
    ingest(app, make_mail(subject="Printer", sender="bob@client.example.net"))
    ack = [i for i in outbox(app) if i.template == "ack"][0]
    reply = make_mail(subject="totally new words", sender="bob@client.example.net",
                      headers={"In-Reply-To": f"<{ack.message_id}>"})
    res = ingest(app, reply)
    assert res.case_number == "CASE-1" and "references" in res.reason


def test_agent_notices_are_auto_generated_in_the_agents_language(app):
    ingest(app, make_mail(subject="Printer", body="It does not print.\n"))
    notices = {i.recipient: i for i in outbox(app) if i.template == "new_case_agent"}
    assert set(notices) == {"hanako@example.com", "ken@example.com"}
    assert notices["hanako@example.com"].subject == "[CASE-1] 新規お問い合わせ：Printer"
    assert notices["ken@example.com"].subject == "[CASE-1] New case: Printer"
    m = parsed(notices["ken@example.com"])
    assert m["Auto-Submitted"] == "auto-generated"
    assert parse_reply_address(m["Reply-To"].addresses[0].addr_spec, secret(app)) == ("c", 1)
    body = m.get_body(("plain",)).get_content()
    assert "It does not print." in body
    assert "support+n1-" in body  # the internal-note address
    internal = [e for e in timeline(app, "CASE-1") if e.get("message_id") == notices["ken@example.com"].message_id]
    assert internal[0]["visibility"] == "internal"


def test_the_case_token_appears_once_and_header_injection_is_cut(app):
    # A newline smuggled into the subject inside an encoded-word, and a name with control characters.
    ingest(app, make_mail(subject="[CASE-1] 印刷\r\nBcc: evil@example.net", sender="=?utf-8?b?44Kr44Ot44OrDQpCY2M6IHg=?= <carol@client.example.net>"))
    ingest(app, make_mail(subject="Re: [CASE-1] 印刷", sender="carol@client.example.net"))
    for item in outbox(app):
        data = build_mime(item)
        m = message_from_bytes(data, policy=policy.default)
        assert m["Subject"].count("[CASE-1]") == 1, m["Subject"]
        assert m["Bcc"] is None and b"\nBcc:" not in data
        assert all("\n" not in v and "\r" not in v for _, v in item.headers)
    assert subject_with_token("Re: [CASE-7] [case-7] x", "CASE-7") == "Re: [CASE-7] x"
    assert subject_with_token("Hello", "CASE-7") == "[CASE-7] Hello"
    assert clean_header("a\r\nBcc: x\x00\x1b y") == "a Bcc: x y"


def test_agent_reply_goes_to_the_customer_without_quotes_and_not_to_the_agent(app):
    ingest(app, make_mail(subject="プリンター", sender="山田 太郎 <taro@bigcorp.co.jp>", body="印刷できません。\n",
                          cc="Hanako B <hanako.b@bigcorp.co.jp>", message_id="<c1@bigcorp.co.jp>"))
    case_addr = [i for i in outbox(app) if i.template == "ack"][0].mail_from
    body = ("ドライバーを更新してください。\n\n山田 花子\n\n"
            "2026年11月20日(金) 10:00 山田太郎 <taro@bigcorp.co.jp>:\n> 印刷できません。\n")
    ingest(app, make_mail(subject="Re: [CASE-1] プリンター", sender="山田 花子 <hanako@example.com>", to=case_addr,
                          body=body, headers=agent_auth()), envelope_to=[case_addr])
    replies = [i for i in outbox(app) if i.template == "agent_reply"]
    assert len(replies) == 1
    r = replies[0]
    assert r.recipient == "taro@bigcorp.co.jp" and r.recipients == ["taro@bigcorp.co.jp", "hanako.b@bigcorp.co.jp"]
    m = parsed(r)
    assert m["Auto-Submitted"] == "auto-replied"
    assert m["Cc"].addresses[0].addr_spec == "hanako.b@bigcorp.co.jp"
    assert m["In-Reply-To"] == "<c1@bigcorp.co.jp>"
    text = m.get_body(("plain",)).get_content()
    assert "ドライバーを更新してください。" in text
    assert "> 印刷できません。" not in text and "山田太郎 <taro@bigcorp.co.jp>:" not in text
    assert m["Subject"] == "Re: [CASE-1] プリンター"
    # The agent gets no notice of their own reply.
    assert not [i for i in outbox(app) if i.recipient == "hanako@example.com" and i.template != "new_case_agent"]


def test_an_internal_note_never_reaches_the_customer(app):
    ingest(app, make_mail(subject="Printer", sender="dave@client.example.net"))
    from intake.threads import reply_address

    note = reply_address("support@example.com", 1, secret(app), "n")
    before = len(outbox(app))
    ingest(app, make_mail(subject="note", sender="ken@example.com", to=note, body="Customer is VIP.\n",
                          headers=agent_auth()),
           envelope_to=[note])
    # Only the queue's other agent hears of it: never the customer, never its author.
    new = outbox(app)[before:]
    assert [(m.template, m.recipient, m.audience) for m in new] == [("internal_note", "hanako@example.com", "agent")]
    assert "Customer is VIP." in new[0].text
    assert note in dict(new[0].headers)["Reply-To"]  # a reply to the notice stays internal
    notes = [e for e in timeline(app, "CASE-1") if e["type"] == "message" and e.get("text", "").startswith("Customer is VIP")]
    assert notes[0]["visibility"] == "internal"


def test_a_customer_reply_reopens_and_is_confirmed_to_the_customer(app):
    ingest(app, make_mail(subject="Printer", sender="erin@client.example.net", message_id="<e1@client.example.net>"))
    set_status(app, 1, Status.RESOLVED)
    ingest(app, make_mail(subject="Re: [CASE-1] Printer", sender="erin@client.example.net", body="Still broken.\n"))
    # The customer heard of the resolution, then of the reopening.
    status = [i for i in outbox(app) if i.template == "status_changed"]
    assert [i.recipient for i in status] == ["erin@client.example.net"] * 2
    bodies = [parsed(i).get_body(("plain",)).get_content() for i in status]
    assert 'from "received" to "resolved"' in bodies[0] and 'from "resolved" to "open"' in bodies[1]
    assert parsed(status[1])["Auto-Submitted"] == "auto-generated"
    agents = [i for i in outbox(app) if i.template == "customer_reply_agent"]
    assert {i.recipient for i in agents} == {"hanako@example.com", "ken@example.com"}
    assert "Still broken." in parsed(agents[0]).get_body(("plain",)).get_content()


# -- loop protection ------------------------------------------------------------------------------


LIMITS = LoopLimits(ack_per_sender_per_hour=5, ack_per_case_per_hour=2, loop_max=10)


@pytest.mark.parametrize("facts,check", [
    (LoopFacts("ack", "a@x.example"), ""),
    (LoopFacts("ack", "a@x.example", trigger_kind="automated"), "automated-trigger"),
    (LoopFacts("ack", "a@x.example", trigger_kind="bounce"), "automated-trigger"),
    (LoopFacts("ack", "support@example.com", own_address=True), "own-address"),
    (LoopFacts("ack", "no-reply@x.example", noreply=True), "noreply"),
    (LoopFacts("new_case_agent", "ken@example.com", actor="ken@example.com"), "own-action"),
    (LoopFacts("ack", "a@x.example", suppressed="550 no such user"), "suppressed"),
    (LoopFacts("ack", "a@x.example", acks_to_recipient_last_hour=5), "ack-rate"),
    (LoopFacts("ack", "a@x.example", acks_to_recipient_last_hour=4), ""),
    (LoopFacts("ack", "a@x.example", acks_on_case_last_hour=2), "ack-rate"),
    (LoopFacts("status_changed", "a@x.example", acks_to_recipient_last_hour=99), ""),
    (LoopFacts("status_changed", "a@x.example", case_traffic_in_window=10), "loop-threshold"),
    (LoopFacts("customer_reply_agent", "ken@example.com", case_traffic_in_window=10), "loop-threshold"),
    (LoopFacts("status_changed", "a@x.example", case_flagged=True), "flagged"),
    # A person's reply is sent even on a flagged case or to a suppressed address.
    (LoopFacts("agent_reply", "a@x.example", case_flagged=True, suppressed="550", case_traffic_in_window=99), ""),
])
def test_loop_protection_rule(facts, check):
    verdict = loop_protection(facts, LIMITS)
    assert verdict.send == (check == "")
    assert verdict.check == check
    assert verdict.flag_loop == (check == "loop-threshold")


@pytest.mark.parametrize("headers,sender", [
    ({"Auto-Submitted": "auto-replied"}, "frank@client.example.net"),
    ({"Precedence": "bulk"}, "frank@client.example.net"),
    ({"List-Id": "<news.client.example.net>"}, "frank@client.example.net"),
    ({}, "noreply@client.example.net"),
    ({}, "billing@example.com"),
])
def test_no_mail_at_all_for_automated_senders_lists_noreply_and_our_own_addresses(app, headers, sender):
    ingest(app, make_mail(sender=sender, headers=headers))
    assert outbox(app) == []


def test_our_own_ack_coming_back_causes_no_mail(app):
    ingest(app, make_mail(subject="Printer", sender="gina@client.example.net"))
    before = len(outbox(app))
    ack = [i for i in outbox(app) if i.template == "ack"][0]
    res = ingest(app, build_mime(ack))  # e.g. an alias that forwards to support@
    assert res.case_number == "CASE-1"
    assert len(outbox(app)) == before


def test_acknowledgements_per_sender_are_rate_limited(app):
    for i in range(7):
        ingest(app, make_mail(subject=f"Question {i}", sender="hank@client.example.net"))
    acks = [i for i in outbox(app) if i.template == "ack"]
    assert len(acks) == 5
    assert len(list_cases(app)) == 7  # every message still makes its case
    skipped = [e for e in timeline(app, "CASE-6") if e["type"] == "mail_skipped"]
    assert skipped[0]["check"] == "ack-rate" and skipped[0]["to"] == "hank@client.example.net"


def test_an_agent_opening_a_case_gets_no_notice_of_it(app):
    ingest(app, make_mail(subject="Customer called", sender="ken@example.com", headers=agent_auth()))
    sent = outbox(app)
    assert [i.recipient for i in sent] == ["hanako@example.com"]
    skipped = {e["template"]: e["check"] for e in timeline(app, "CASE-1") if e["type"] == "mail_skipped"}
    assert skipped == {"ack": "own-action", "new_case_agent": "own-action"}


def test_a_rule_can_turn_the_ack_off(app, config_path):
    (config_path.parent / "routing_rules" / "20-quiet.yaml").write_text(
        "rules:\n  - name: quiet\n    when: {from_domain: client.example.net}\n    then: {ack: false, language: en}\n",
        "utf-8")
    assert app.load_rules()
    ingest(app, make_mail(subject="印刷", sender="ivan@client.example.net", body="日本語\n"))
    assert [i.template for i in outbox(app)] == ["new_case_agent", "new_case_agent"]
    assert list_cases(app)[0].language == "en"  # the rule's language wins over detection


def test_a_case_exchanging_too_many_mails_is_flagged_and_stops_automated_mail(tmp_path):
    cfg = write_config(tmp_path, "[notify]\nloop_max = 4\n")
    app = open_test_app(cfg)
    try:
        ingest(app, make_mail(subject="Printer", sender="judy@client.example.net"))
        for i in range(4):
            set_status(app, 1, Status.RESOLVED)
            ingest(app, make_mail(subject="Re: [CASE-1] Printer", sender="judy@client.example.net", body=f"again {i}\n"))
        case = list_cases(app)[0]
        assert LOOP_TAG in case.tags
        events = timeline(app, "CASE-1")
        assert len([e for e in events if e["type"] == "loop"]) == 1
        checks = [e["check"] for e in events if e["type"] == "mail_skipped"]
        assert "loop-threshold" in checks and "flagged" in checks
        customer_mails = [i for i in outbox(app) if i.audience == "customer"]
        assert len(customer_mails) <= 4
    finally:
        app.close()


# -- bounces -----------------------------------------------------------------------------------------


def _dsn(message_id: str, rcpt: str, action: str = "failed", to: str = "support@example.com") -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.client.example.net>\r\n"
        f"To: {to}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn-%s@mx.client.example.net>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour mail could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.client.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: {action}\r\nStatus: 5.1.1\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: <{message_id}>\r\nSubject: x\r\n"
        "--B--\r\n" % abs(hash((message_id, action)))
    ).encode()


def test_a_bounce_marks_the_row_bounced_and_suppresses_the_address(app):
    ingest(app, make_mail(subject="Printer", sender="kim@client.example.net"))
    ack = [i for i in outbox(app) if i.template == "ack"][0]
    res = ingest(app, _dsn(ack.message_id, "kim@client.example.net"))
    assert res.case_number == "CASE-1"
    assert outbox_row(app, ack.id).state == "bounced"
    bounce = [e for e in timeline(app, "CASE-1") if e["type"] == "bounce"][0]
    assert bounce["permanent"] is True and bounce["outbox"] == [ack.id]
    # The address gets no further automated mail for the suppression period.
    ingest(app, make_mail(subject="Another", sender="kim@client.example.net"))
    skipped = [e for e in timeline(app, "CASE-2") if e["type"] == "mail_skipped"]
    assert skipped[0]["check"] == "suppressed"


def test_a_delayed_notice_is_not_a_bounce(app):
    ingest(app, make_mail(subject="Printer", sender="lee@client.example.net"))
    ack = [i for i in outbox(app) if i.template == "ack"][0]
    ingest(app, _dsn(ack.message_id, "lee@client.example.net", action="delayed"))
    assert outbox_row(app, ack.id).state == "queued"
    ingest(app, make_mail(subject="Another", sender="lee@client.example.net"))
    assert len([i for i in outbox(app) if i.template == "ack"]) == 2


def test_a_bounce_to_the_signed_return_path_names_the_case(app):
    ingest(app, make_mail(subject="Printer", sender="max@client.example.net"))
    ack = [i for i in outbox(app) if i.template == "ack"][0]
    raw = _dsn("unknown-id@elsewhere.example", "max@client.example.net", to=ack.mail_from)
    res = ingest(app, raw, envelope_to=[ack.mail_from])
    assert res.case_number == "CASE-1"
    assert outbox_row(app, ack.id).state == "bounced"


def test_a_broken_template_does_not_block_intake(tmp_path):
    # An override that never loaded: the shipped template answers instead, and the
    # problem is kept for intake status.
    (tmp_path / "templates" / "en").mkdir(parents=True)
    (tmp_path / "templates" / "en" / "ack.txt.j2").write_text("Subject: x\n{{ nope.nope }}\n", "utf-8")
    app = open_test_app(write_config(tmp_path))
    try:
        res = ingest(app, make_mail(subject="Printer", body="English\n"))
        assert res.state == "processed" and res.case_number == "CASE-1"
        assert not [e for e in timeline(app, "CASE-1") if e["type"] == "mail_skipped"]
        (ack,) = [i for i in outbox(app) if i.template == "ack"]
        assert "[CASE-1]" in ack.subject and ack.subject != "x"
        (problem,) = app.processor.notifier.templates.problems()
        assert problem.kind == "refused" and "ack.txt.j2:2" in problem.error and "shipped" in problem.fallback
    finally:
        app.close()


def test_a_mail_without_message_id_gets_no_reference_to_the_synthesised_one(app):
    ingest(app, make_mail(message_id=None, subject="no id"))
    ack = [i for i in outbox(app) if i.template == "ack"][0]
    m = parsed(ack)
    assert m["In-Reply-To"] is None and m["References"] is None
    assert "synthesised" not in build_mime(ack).decode("ascii", "replace")
