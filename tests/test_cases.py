"""The case operations (DESIGN 3): every change to a case names its actor on the timeline, and
moves the fields that go with it."""

from __future__ import annotations

from datetime import timedelta

from conftest import SIMPLE_TEAM, case_detail, case_ops, case_record, open_test_app, outbox_items, write_config
from intake.db import utcnow
from intake.states import Status
from mailfactory import agent_auth, make_mail


def ingest(app, raw: bytes, mailbox: str = "support@example.com", envelope_to: list[str] | None = None):
    rid = app.store.receive(raw, channel="email", mailbox=mailbox, envelope_to=envelope_to or [mailbox])
    return app.processor.process(rid)


def test_every_timeline_entry_names_who_caused_it(app):
    ingest(app, make_mail(subject="Printer", sender="Alice <alice@customer.example.org>"))
    with case_ops(app) as ops:
        case = ops.tx.cases.by_number(1)
        ops.set_status(case, Status.PENDING, actor="hanako@example.com", reason="asked for the model")
        ops.remark(case, "called the customer", actor="cli")
    timeline = case_detail(app, "CASE-1")["timeline"]
    assert all(e["actor"] for e in timeline)
    by_type = {e["type"]: e for e in timeline}
    assert by_type["created"]["actor"] == "alice@customer.example.org"
    assert [e["actor"] for e in timeline if e["type"] == "message" and e["direction"] == "in"] == [
        "alice@customer.example.org"]
    assert {e["actor"] for e in timeline if e["type"] == "message" and e["direction"] == "out"} == {"system"}
    assert by_type["status"] == {**by_type["status"], "from": "new", "to": "pending", "actor": "hanako@example.com",
                                 "reason": "asked for the model"}
    assert by_type["note"]["actor"] == "cli" and by_type["note"]["text"] == "called the customer"


def test_resolving_and_closing_stamp_their_times_and_unchanged_status_records_nothing(app):
    ingest(app, make_mail(subject="Printer"))
    at = utcnow() - timedelta(hours=2)
    with case_ops(app, at) as ops:
        case = ops.tx.cases.by_number(1)
        assert ops.set_status(case, Status.RESOLVED, actor="hanako@example.com")
        assert not ops.set_status(case, Status.RESOLVED, actor="hanako@example.com")
    case = case_record(app, 1)
    assert case.status == "resolved" and case.resolved_at == at and case.closed_at is None
    with case_ops(app) as ops:
        ops.set_status(ops.tx.cases.by_number(1), Status.CLOSED, actor="system:auto-close")
    assert case_record(app, 1).closed_at is not None
    statuses = [e for e in case_detail(app, "CASE-1")["timeline"] if e["type"] == "status"]
    assert [(e["from"], e["to"], e["actor"]) for e in statuses] == [
        ("new", "resolved", "hanako@example.com"), ("resolved", "closed", "system:auto-close")]


def test_the_first_public_agent_reply_sets_the_first_response_time_once(tmp_path):
    app = open_test_app(write_config(tmp_path, team=SIMPLE_TEAM))
    try:
        ingest(app, make_mail(subject="Printer", sender="erin@client.example.net", message_id="<p1@client.example.net>"))
        assert case_record(app, 1).first_response_at is None
        for n in (1, 2):
            ingest(app, make_mail(subject="Re: [CASE-1] Printer", sender="hanako@example.com",
                                  body=f"Answer {n}.\n", headers={**agent_auth(), "In-Reply-To": "<p1@client.example.net>"}))
            if n == 1:
                first = case_record(app, 1).first_response_at
        case = case_record(app, 1)
        assert first is not None and case.first_response_at == first
        assert [m.template for m in outbox_items(app) if m.template == "agent_reply"] == ["agent_reply"] * 2
    finally:
        app.close()


def test_assigning_records_from_and_to_and_who_did_it(app):
    ingest(app, make_mail(subject="Printer"))
    with case_ops(app) as ops:
        case = ops.tx.cases.by_number(1)
        before = case.assignee
        assert ops.assign(case, "Ken@Example.com", actor="cli", reason="on duty")
        assert not ops.assign(case, "ken@example.com", actor="cli")
    assert case_record(app, 1).assignee == "ken@example.com"
    entry = [e for e in case_detail(app, "CASE-1")["timeline"] if e["type"] == "assignee"][-1]
    assert (entry["from"], entry["to"], entry["actor"], entry["reason"]) == (before, "ken@example.com", "cli",
                                                                             "on duty")
