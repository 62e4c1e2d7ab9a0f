"""The flow through the store: threading, reopening, bounces and quarantine."""

from __future__ import annotations

import json
from datetime import timedelta

from conftest import case_detail, case_record, inbound_detail, list_cases, outbox_items, set_status
from intake import flow as pipeline
from intake.db import utcnow
from intake.db.cases import CaseRec
from intake.states import InboundState, Status
from mailfactory import make_mail
from test_classify import _dsn

QUARANTINED = InboundState.QUARANTINED


def _receive(app, raw: bytes, mailbox: str = "support@example.com"):
    inbound_id = app.store.receive(raw, channel="email", mailbox=mailbox, envelope_to=[mailbox])
    return app.processor.process(inbound_id)


def _case(app, number: int) -> CaseRec:
    return case_record(app, number)


def test_reply_by_references_is_a_comment_not_a_new_case(app):
    first = _receive(app, make_mail(message_id="<q1@customer.example.org>"))
    reply = _receive(app, make_mail(subject="Re: Printer does not print", message_id="<q2@customer.example.org>",
                                    headers={"In-Reply-To": "<q1@customer.example.org>",
                                             "References": "<q1@customer.example.org>"}))
    assert first.case_number == reply.case_number == "CASE-1"
    assert "references" in reply.reason
    assert len(list_cases(app)) == 1


def test_reply_to_our_own_sent_message_threads(app):
    _receive(app, make_mail(message_id="<q1@customer.example.org>", sender="alice@other.example.net"))
    (ack,) = [m for m in outbox_items(app) if m.template == "ack"]
    # The customer's client dropped its own id from References, kept only ours, and the
    # subject lost its token: only our acknowledgement's Message-ID names the case.
    out = _receive(app, make_mail(subject="Re: Printer", sender="alice@other.example.net",
                                  headers={"In-Reply-To": f"<{ack.message_id}>"}))
    assert out.case_number == "CASE-1" and "references" in out.reason


def test_subject_token_needs_a_participant(app):
    _receive(app, make_mail(sender="Alice <alice@customer.example.org>"))
    colleague = _receive(app, make_mail(subject="Re: [CASE-1] printer", sender="bob@customer.example.org"))
    assert colleague.case_number == "CASE-1"  # same organization
    stranger = _receive(app, make_mail(subject="Re: [CASE-1] printer", sender="mallory@evil.example.net"))
    assert stranger.case_number == "CASE-2"
    detail = case_detail(app, "CASE-2")
    assert any(e["type"] == "note" and "CASE-1" in e["text"] for e in detail["timeline"])
    # Nothing of the stranger's reached the first case.
    assert all(e.get("from") != "mallory@evil.example.net" for e in case_detail(app, "CASE-1")["timeline"])


def test_reply_to_resolved_case_reopens_it(app):
    _receive(app, make_mail(message_id="<r1@customer.example.org>"))
    set_status(app, 1, Status.RESOLVED)
    assert _case(app, 1).resolved_at is not None
    out = _receive(app, make_mail(subject="Re: x", headers={"In-Reply-To": "<r1@customer.example.org>"}))
    assert out.case_number == "CASE-1"
    assert _case(app, 1).status == "open"


def test_reply_to_closed_case_reopens_within_reopen_days_and_follows_up_after(app):
    _receive(app, make_mail(message_id="<c1@customer.example.org>"))
    set_status(app, 1, Status.CLOSED, at=utcnow() - timedelta(days=3))
    out = _receive(app, make_mail(subject="Re: x", headers={"In-Reply-To": "<c1@customer.example.org>"}))
    assert out.case_number == "CASE-1" and _case(app, 1).status == "open"

    set_status(app, 1, Status.CLOSED, at=utcnow() - timedelta(days=30))
    late = _receive(app, make_mail(subject="Re: x", headers={"In-Reply-To": "<c1@customer.example.org>"}))
    assert late.case_number == "CASE-2"
    assert _case(app, 1).status == "closed"
    assert _case(app, 2).linked_case_id == _case(app, 1).id


def test_automated_reply_never_reopens(app):
    _receive(app, make_mail(message_id="<a1@customer.example.org>"))
    set_status(app, 1, Status.RESOLVED)
    out = _receive(app, make_mail(subject="Automatic reply", headers={
        "In-Reply-To": "<a1@customer.example.org>", "Auto-Submitted": "auto-replied"}))
    assert out.case_number == "CASE-1"
    assert _case(app, 1).status == "resolved"


def test_bounce_of_our_mail_goes_on_the_case_timeline(app):
    _receive(app, make_mail(sender="gone@customer.example.org"))
    (ack,) = [m for m in outbox_items(app) if m.template == "ack"]
    out = _receive(app, _dsn(ack.message_id))
    assert out.case_number == "CASE-1"
    bounces = [e for e in case_detail(app, "CASE-1")["timeline"] if e["type"] == "bounce"]
    assert bounces and bounces[0]["bounced_message_id"] == ack.message_id
    assert bounces[0]["actor"] == "system:bounce"
    assert len(list_cases(app)) == 1


def test_bounce_naming_nothing_of_ours_opens_no_case(app):
    out = _receive(app, _dsn("unknown@elsewhere.example"))
    assert out.state == "dropped"
    assert list_cases(app) == []


def test_attachments_are_stored_once_per_content(app):
    from sqlalchemy import func, select

    from intake.db import schema

    def with_attachment(mid: str) -> bytes:
        return (
            f"From: a@customer.example.org\r\nTo: support@example.com\r\nSubject: logs\r\nMessage-ID: <{mid}>\r\n"
            'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            "--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            '--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="log.bin"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--b--\r\n"
        ).encode()

    _receive(app, with_attachment("x1@customer.example.org"))
    _receive(app, with_attachment("x2@customer.example.org"))
    with app.store.read() as tx:
        assert tx.conn.scalar(select(func.count()).select_from(schema.blobs)) == 1
        assert tx.conn.scalar(select(func.count()).select_from(schema.attachments)) == 2
    att = [e for e in case_detail(app, "CASE-1")["timeline"] if e["type"] == "message"][0]["attachments"]
    assert att == [{"id": att[0]["id"], "filename": "log.bin", "size": 10, "content_type": "application/octet-stream",
                    "inline": False, "sha256": att[0]["sha256"]}]


def test_failing_message_is_quarantined_with_its_error_and_retried(app, run_intake, monkeypatch):
    real_parse = pipeline.parse

    def flaky_parse(raw: bytes, **kw):
        if b"BOOM" in raw:
            raise RuntimeError("parser exploded")
        return real_parse(raw, **kw)

    monkeypatch.setattr(pipeline, "parse", flaky_parse)
    ids = app.store.receive_many([
        (make_mail(subject="good one"), {"channel": "email", "mailbox": "support@example.com"}),
        (make_mail(subject="BOOM"), {"channel": "email", "mailbox": "support@example.com"}),
        (make_mail(subject="good two"), {"channel": "email", "mailbox": "support@example.com"}),
    ])
    outcomes = app.processor.process_batch(ids)
    assert [o.state for o in outcomes] == ["processed", QUARANTINED, "processed"]
    assert "parser exploded" in outcomes[1].reason

    listed = run_intake("quarantine", "list", "--json", check=True)
    (q,) = json.loads(listed.stdout)
    assert q["id"] == ids[1] and "parser exploded" in q["error"]
    assert "parser exploded" in run_intake("quarantine", "list", check=True).stdout

    # Parsing works again (the cause was fixed): the retry makes the message a case.
    monkeypatch.undo()
    retry = run_intake("quarantine", "retry", str(ids[1]))
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "processed CASE-3" in retry.stdout
    assert json.loads(run_intake("quarantine", "list", "--json", check=True).stdout) == []
    assert sorted(c.subject for c in list_cases(app)) == ["BOOM", "good one", "good two"]


def _three(app, subjects=("good one", "BOOM", "good two")) -> list[int]:
    return app.store.receive_many([(make_mail(subject=s), {"channel": "email", "mailbox": "support@example.com"})
                                   for s in subjects])


def test_a_message_failing_late_in_its_savepoint_is_quarantined_not_half_stored(app, monkeypatch):
    """The failure comes when its timeline is written, after the case was made: the case is
    rolled back with it, and the record says quarantined, not processed."""
    from intake.db.cases import CaseRepo

    real_flush = CaseRepo.flush_events
    calls = []

    def flush(self):
        if self._events:
            calls.append(len(self._events))
            if len(calls) == 2:  # the second message's timeline, at the end of its savepoint
                raise RuntimeError("timeline write failed")
        real_flush(self)

    monkeypatch.setattr(CaseRepo, "flush_events", flush)
    ids = _three(app)
    outcomes = app.processor.process_batch(ids)
    assert [o.state for o in outcomes] == ["processed", QUARANTINED, "processed"]
    detail = inbound_detail(app, str(ids[1]))
    assert detail["state"] == QUARANTINED and detail["case"] is None and "timeline write failed" in detail["error"]
    assert sorted(c.subject for c in list_cases(app)) == ["good one", "good two"]
    # The quarantine list says which mail it is: what parsing read stays.
    with app.store.read() as tx:
        (q,) = tx.inbound.quarantined()
    assert (q.subject, q.from_address) == ("BOOM", "alice@customer.example.org")


def test_a_batch_that_fails_as_a_whole_is_applied_one_by_one(app, monkeypatch):
    from intake.db.inbound import InboundRepo

    real_save = InboundRepo.save

    def save(self, works):
        if len(works) > 1:
            raise RuntimeError("batch write failed")
        real_save(self, works)

    monkeypatch.setattr(InboundRepo, "save", save)
    ids = _three(app, ("one", "two", "three"))
    assert [o.state for o in app.processor.process_batch(ids)] == ["processed"] * 3
    assert sorted(c.subject for c in list_cases(app)) == ["one", "three", "two"]
