"""Issue 15 items 2, 6 and 8 (templates) against a real ``intake serve``: a runaway rule or
template does not stop processing, and template changes are picked up at run time.

Every check waits for state a user can observe (cases, ``.eml`` files in the outbox,
``intake status``, ``intake quarantine list``), with a bound, never for a fixed time.
"""

from __future__ import annotations

import json
import smtplib
import time
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any, Callable

from mailfactory import make_mail
from smtp_fixtures import IntakeServer, smtp_config


def send(srv: IntakeServer, raw: bytes, sender: str = "taro@customer.example.org") -> None:
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
        s.sendmail(sender, ["support@example.com"], raw)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def acks(outbox: Path) -> dict[str, str]:
    """Case number → subject of the acknowledgement serve wrote for it (maildir mode)."""
    out = {}
    for f in outbox.glob("*-ack.eml") if outbox.exists() else []:
        msg = message_from_bytes(f.read_bytes(), policy=policy.default)
        out[str(msg["X-Intake-Case"])] = str(msg["Subject"])
    return out


def ack_of(srv: IntakeServer, outbox: Path, subject: str, timeout: float = 30.0) -> tuple[str, str]:
    """(case number, subject of its acknowledgement) once the mail with ``subject`` is a case with one."""
    def find() -> tuple[str, str] | None:
        case = next((c for c in srv.cases() if c["subject"] == subject), None)
        if case is None:
            return None
        got = acks(outbox).get(case["number"])
        return (case["number"], got) if got else None
    return wait_for(find, f"an acknowledgement for {subject!r}", timeout)


def status_line(srv: IntakeServer, name: str) -> dict[str, Any]:
    return srv.status(name)


# A rule whose pattern backtracks exponentially in Python's re ('a' * 40 + 'b' took hours
# inside the write transaction), and a template that loops without printing anything
# for real cases only (sample data, CASE-1042, passes the check at load).
REDOS_RULES = """\
rules:
  - name: redos
    when: {subject: {regex: '(a+)+$'}}
    then: {tags: [redos]}
    continue: true
  - name: loop me
    when: {subject: {contains: 'loop me'}}
    then: {ack: looping}
"""
LOOPING = ("Subject: [{{ case.number }}] 受付\n"
           "{% if case.number != 'CASE-1042' %}{% for a in range(100000) %}{% for b in range(100000) %}"
           "{% endfor %}{% endfor %}{% endif %}本文\n")


def test_a_runaway_rule_or_template_does_not_stop_processing(tmp_path):
    cfg = smtp_config(tmp_path, extra='[templates]\nbudget = "0.5s"\n')
    (tmp_path / "routing_rules" / "20-hostile.yaml").write_text(REDOS_RULES, "utf-8")
    for lang in ("ja", "en"):
        (tmp_path / "templates" / lang).mkdir(parents=True)
        (tmp_path / "templates" / lang / "looping.txt.j2").write_text(LOOPING, "utf-8")
    outbox = tmp_path / "outbox"
    srv = IntakeServer(cfg).start()
    try:
        # The ReDoS subject is matched in linear time: it and the mail after it are cases at once.
        send(srv, make_mail(subject="a" * 40 + "b", body="テストです。\n"))
        send(srv, make_mail(subject="プリンターが動きません", body="印刷できません。\n"))
        cases = {c["subject"]: c for c in srv.wait_for_cases(2, timeout=30)}
        assert set(cases) == {"a" * 40 + "b", "プリンターが動きません"}
        send(srv, make_mail(subject="aaaa", body="テストです。\n"))
        wait_for(lambda: any(c["subject"] == "aaaa" and "redos" in c["tags"] for c in srv.cases()), "aaaa tagged")

        # The looping acknowledgement has no good version: the message that ran it is
        # quarantined naming the template, and the next mail becomes a case within seconds.
        send(srv, make_mail(subject="please loop me", body="ループしてください。\n"))
        send(srv, make_mail(subject="請求書について", body="請求書を送ってください。\n"))
        number, subject = ack_of(srv, outbox, "請求書について")
        assert "お問い合わせを受け付けました" in subject  # the shipped acknowledgement

        def quarantined() -> list[dict[str, Any]]:
            res = srv.intake("quarantine", "list", "--json")
            return json.loads(res.stdout)

        (q,) = wait_for(quarantined, "the looping message in quarantine")
        assert "TemplateTimeout" in q["error"] and "templates/ja/looping.txt.j2:2:" in q["error"]
        assert "rendering took longer than 0.5s" in q["error"]
        shown = srv.intake("messages", "show", str(q["id"]))
        assert "templates/ja/looping.txt.j2:2:" in shown.stdout

        # The runaway version is not rendered again: the next such mail becomes a case at
        # once, its acknowledgement skipped as a template error, and intake status says so.
        send(srv, make_mail(subject="loop me again", body="もう一度。\n"))
        case = wait_for(lambda: next((c for c in srv.cases() if c["subject"] == "loop me again"), None),
                        "the second looping mail to become a case", timeout=15)
        timeline = json.loads(srv.intake("cases", "show", case["number"], "--json").stdout)["timeline"]
        skipped = [e for e in timeline if e["type"] == "mail_skipped"]
        assert skipped and skipped[0]["check"] == "template-error" and "looping.txt.j2" in skipped[0]["reason"]
        line = wait_for(lambda: (lambda s: s if s["last_error"] else None)(status_line(srv, "templates")),
                        "the template failure in intake status")
        assert line["last_error"].startswith("templates/ja/looping.txt.j2:2: rendering took longer than 0.5s")
        assert line["last_error"].endswith("(at send time: message quarantined)")
        log = srv.log_text()
        assert "TemplateTimeout" in log and "looping.txt.j2" in log
    finally:
        srv.stop()


def test_a_backtracking_only_rule_is_refused_and_the_last_good_set_keeps_routing(tmp_path):
    cfg = smtp_config(tmp_path)
    rules = tmp_path / "routing_rules" / "20-billing.yaml"
    rules.write_text("rules:\n  - name: invoices\n    when: {subject: {regex: '請求書.*(至急|緊急)'}}\n"
                     "    then: {queue: billing}\n", "utf-8")
    srv = IntakeServer(cfg).start()
    try:
        srv.wait_for_log("serving")
        # A lookahead needs backtracking: refused with file:line, and the set before keeps routing.
        rules.write_text("rules:\n  - name: invoices\n    when: {subject: {regex: '請求書(?=.*至急)'}}\n"
                         "    then: {queue: billing}\n", "utf-8")
        log = srv.wait_for_log("rules refused")
        assert "routing_rules/20-billing.yaml:3: rule 'invoices': subject: bad regex '請求書(?=.*至急)': lookahead" in log
        check = srv.intake("rules", "check")
        assert check.returncode == 1
        assert "20-billing.yaml:3: rule 'invoices': subject: bad regex '請求書(?=.*至急)': lookahead" in check.stderr
        send(srv, make_mail(subject="【請求書】至急ご確認ください", body="お願いします。\n"))
        (case,) = srv.wait_for_cases(1)
        assert case["queue"] == "billing"
        assert status_line(srv, "rules")["state"].startswith("refused")
    finally:
        srv.stop()


def test_template_overrides_are_picked_up_at_run_time(tmp_path):
    """Added (in a templates folder made after the start), edited, broken, deleted: each
    seen in the acknowledgements serve writes and in intake status."""
    cfg = smtp_config(tmp_path)
    outbox = tmp_path / "outbox"
    override = tmp_path / "templates" / "ja" / "ack.txt.j2"
    assert not override.parent.parent.exists()
    srv = IntakeServer(cfg).start()
    try:
        srv.wait_for_log("templates:")
        send(srv, make_mail(subject="一通目", body="よろしくお願いします。\n"))
        _, subject = ack_of(srv, outbox, "一通目")
        assert "お問い合わせを受け付けました" in subject  # shipped

        override.parent.mkdir(parents=True)
        override.write_text("Subject: 受付番号 {{ case.number }}（版1）\n\n{{ recipient.name }} 様、受け付けました。\n",
                            "utf-8")
        line = wait_for(lambda: (lambda s: s if "1 override" in s["state"] else None)(status_line(srv, "templates")),
                        "serve to use the override (intake status)")
        assert line["details"]["overrides"] == ["ja/ack.txt.j2"]
        send(srv, make_mail(subject="二通目", body="よろしくお願いします。\n"))
        number, subject = ack_of(srv, outbox, "二通目")
        assert subject == f"[{number}] 受付番号 {number}（版1）"

        override.write_text("Subject: 受付番号 {{ case.number }}（版2）\n\n{{ recipient.name }} 様、確かに受け付けました。\n",
                            "utf-8")
        wait_for(lambda: "template changed:" in srv.log_text(), "serve to see the edit")
        send(srv, make_mail(subject="三通目", body="よろしくお願いします。\n"))
        number, subject = ack_of(srv, outbox, "三通目")
        assert subject == f"[{number}] 受付番号 {number}（版2）"

        # Broken: refused with file:line; serve keeps sending the last good version (版2).
        override.write_text("Subject: 受付番号 {{ case.number }（版3）\n", "utf-8")
        line = wait_for(lambda: (lambda s: s if "serve uses" in s["state"] else None)(
            status_line(srv, "templates")), "the refusal in intake status")
        assert line["last_error"].startswith("templates/ja/ack.txt.j2:1: ")
        assert line["details"]["problems"][0]["fallback"].startswith(f"{override} as loaded at ")
        assert f"template refused: {override}" in srv.log_text()
        table = srv.intake("status")
        assert table.returncode == 0, table.stderr
        (row,) = [r for r in table.stdout.splitlines() if r.startswith("templates ")]
        assert "refused: 1 file(s); serve uses the last good version" in row
        assert "templates/ja/ack.txt.j2:1: unexpected '}'" in row
        send(srv, make_mail(subject="四通目", body="よろしくお願いします。\n"))
        number, subject = ack_of(srv, outbox, "四通目")
        assert subject == f"[{number}] 受付番号 {number}（版2）"

        # Deleted: the shipped acknowledgement again.
        override.unlink()
        wait_for(lambda: "0 override" in status_line(srv, "templates")["state"], "the override gone from status")
        send(srv, make_mail(subject="五通目", body="よろしくお願いします。\n"))
        _, subject = ack_of(srv, outbox, "五通目")
        assert "お問い合わせを受け付けました" in subject
        assert "template removed:" in srv.log_text()
    finally:
        srv.stop()
