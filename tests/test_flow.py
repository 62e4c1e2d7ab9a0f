"""The flow through the store: threading, reopening, bounces and quarantine."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import select, update

from intake import flow as pipeline
from intake.store import Case, CaseRec, QUARANTINED, utcnow
from mailfactory import make_mail
from test_classify import _dsn


def _receive(app, raw: bytes, mailbox: str = "support@example.com"):
    inbound_id = app.store.receive(raw, channel="email", mailbox=mailbox, envelope_to=[mailbox])
    return app.processor.process(inbound_id)


def _case(app, number: int) -> CaseRec:
    with app.store.flow(write=False) as tx:
        return tx.case_by_number(number)


def test_reply_by_references_is_a_comment_not_a_new_case(app):
    first = _receive(app, make_mail(message_id="<q1@customer.example.org>"))
    reply = _receive(app, make_mail(subject="Re: Printer does not print", message_id="<q2@customer.example.org>",
                                    headers={"In-Reply-To": "<q1@customer.example.org>",
                                             "References": "<q1@customer.example.org>"}))
    assert first.case_number == reply.case_number == "CASE-1"
    assert "references" in reply.reason
    assert len(app.store.list_cases()) == 1


def test_reply_to_our_own_sent_message_threads(app):
    _receive(app, make_mail(message_id="<q1@customer.example.org>"))
    with app.store.flow() as tx:
        tx.add_message(tx.case_by_number(1).id, direction="out", visibility="public", message_id="ack-1@example.com",
                    from_address="support@example.com", from_name="", to=["alice@customer.example.org"], cc=[],
                    subject="[CASE-1] Printer", text="We got it", html=None, sent_at=utcnow())
    # The customer's client dropped its own id from References and kept only ours.
    out = _receive(app, make_mail(subject="Re: [CASE-1] Printer", headers={"In-Reply-To": "<ack-1@example.com>"}))
    assert out.case_number == "CASE-1"


def test_subject_token_needs_a_participant(app):
    _receive(app, make_mail(sender="Alice <alice@customer.example.org>"))
    colleague = _receive(app, make_mail(subject="Re: [CASE-1] printer", sender="bob@customer.example.org"))
    assert colleague.case_number == "CASE-1"  # same organization
    stranger = _receive(app, make_mail(subject="Re: [CASE-1] printer", sender="mallory@evil.example.net"))
    assert stranger.case_number == "CASE-2"
    detail = app.store.case_detail("CASE-2")
    assert any(e["type"] == "note" and "CASE-1" in e["text"] for e in detail["timeline"])
    # Nothing of the stranger's reached the first case.
    assert all(e.get("from") != "mallory@evil.example.net" for e in app.store.case_detail("CASE-1")["timeline"])


def _set_case(app, number: int, **values) -> None:
    with app.store.session() as s:
        s.execute(update(Case).where(Case.number == number).values(**values))


def test_reply_to_resolved_case_reopens_it(app):
    _receive(app, make_mail(message_id="<r1@customer.example.org>"))
    _set_case(app, 1, status="resolved")
    out = _receive(app, make_mail(subject="Re: x", headers={"In-Reply-To": "<r1@customer.example.org>"}))
    assert out.case_number == "CASE-1"
    assert _case(app, 1).status == "open"


def test_reply_to_closed_case_reopens_within_reopen_days_and_follows_up_after(app):
    _receive(app, make_mail(message_id="<c1@customer.example.org>"))
    _set_case(app, 1, status="closed", closed_at=utcnow() - timedelta(days=3))
    out = _receive(app, make_mail(subject="Re: x", headers={"In-Reply-To": "<c1@customer.example.org>"}))
    assert out.case_number == "CASE-1" and _case(app, 1).status == "open"

    _set_case(app, 1, status="closed", closed_at=utcnow() - timedelta(days=30))
    late = _receive(app, make_mail(subject="Re: x", headers={"In-Reply-To": "<c1@customer.example.org>"}))
    assert late.case_number == "CASE-2"
    assert _case(app, 1).status == "closed"
    assert _case(app, 2).linked_case_id == _case(app, 1).id


def test_automated_reply_never_reopens(app):
    _receive(app, make_mail(message_id="<a1@customer.example.org>"))
    _set_case(app, 1, status="resolved")
    out = _receive(app, make_mail(subject="Automatic reply", headers={
        "In-Reply-To": "<a1@customer.example.org>", "Auto-Submitted": "auto-replied"}))
    assert out.case_number == "CASE-1"
    assert _case(app, 1).status == "resolved"


def test_bounce_of_our_mail_goes_on_the_case_timeline(app):
    _receive(app, make_mail())
    with app.store.flow() as tx:
        tx.add_message(tx.case_by_number(1).id, direction="out", visibility="public", message_id="out-1@example.com",
                    from_address="support@example.com", from_name="", to=["gone@customer.example.org"], cc=[],
                    subject="[CASE-1] x", text="x", html=None, sent_at=utcnow())
    out = _receive(app, _dsn("out-1@example.com"))
    assert out.case_number == "CASE-1"
    bounces = [e for e in app.store.case_detail("CASE-1")["timeline"] if e["type"] == "bounce"]
    assert bounces and bounces[0]["bounced_message_id"] == "out-1@example.com"
    assert len(app.store.list_cases()) == 1


def test_bounce_naming_nothing_of_ours_opens_no_case(app):
    out = _receive(app, _dsn("unknown@elsewhere.example"))
    assert out.state == "dropped"
    assert app.store.list_cases() == []


def test_attachments_are_stored_once_per_content(app):
    from sqlalchemy import func

    from intake.store import AttachmentRow, Blob

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
    with app.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Blob)) == 1
        assert s.scalar(select(func.count()).select_from(AttachmentRow)) == 2
    att = [e for e in app.store.case_detail("CASE-1")["timeline"] if e["type"] == "message"][0]["attachments"]
    assert att == [{"filename": "log.bin", "size": 10, "content_type": "application/octet-stream", "inline": False,
                    "sha256": att[0]["sha256"]}]


def test_failing_message_is_quarantined_with_its_error_and_retried(app, run_intake, monkeypatch):
    real_parse = pipeline.parse

    def flaky_parse(raw: bytes):
        if b"BOOM" in raw:
            raise RuntimeError("parser exploded")
        return real_parse(raw)

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

    # The retry runs in a new process where parsing works again: the message becomes a case.
    retry = run_intake("quarantine", "retry", str(ids[1]))
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "processed CASE-3" in retry.stdout
    assert json.loads(run_intake("quarantine", "list", "--json", check=True).stdout) == []
    assert sorted(c.subject for c in app.store.list_cases()) == ["BOOM", "good one", "good two"]


def _three(app, subjects=("good one", "BOOM", "good two")) -> list[int]:
    return app.store.receive_many([(make_mail(subject=s), {"channel": "email", "mailbox": "support@example.com"})
                                   for s in subjects])


def test_a_message_failing_late_in_its_savepoint_is_quarantined_not_half_stored(app, monkeypatch):
    """The failure comes when its timeline is written, after the case was made: the case is
    rolled back with it, and the record says quarantined, not processed."""
    from intake.flowstore import FlowTx

    real_flush = FlowTx.flush_events
    calls = []

    def flush(self):
        if self._events:
            calls.append(len(self._events))
            if len(calls) == 2:  # the second message's timeline, at the end of its savepoint
                raise RuntimeError("timeline write failed")
        real_flush(self)

    monkeypatch.setattr(FlowTx, "flush_events", flush)
    ids = _three(app)
    outcomes = app.processor.process_batch(ids)
    assert [o.state for o in outcomes] == ["processed", QUARANTINED, "processed"]
    detail = app.store.inbound_detail(str(ids[1]))
    assert detail["state"] == QUARANTINED and detail["case"] is None and "timeline write failed" in detail["error"]
    assert sorted(c.subject for c in app.store.list_cases()) == ["good one", "good two"]


def test_a_batch_that_fails_as_a_whole_is_applied_one_by_one(app, monkeypatch):
    from intake.flowstore import FlowTx

    real_save = FlowTx.save_inbound

    def save(self, works):
        if len(works) > 1:
            raise RuntimeError("batch write failed")
        real_save(self, works)

    monkeypatch.setattr(FlowTx, "save_inbound", save)
    ids = _three(app, ("one", "two", "three"))
    assert [o.state for o in app.processor.process_batch(ids)] == ["processed"] * 3
    assert sorted(c.subject for c in app.store.list_cases()) == ["one", "three", "two"]
