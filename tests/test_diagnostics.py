"""`intake parse`, `intake messages list|show|raw` and retention: answering "where is my mail?"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import intake_env

from intake import flow as pipeline
from mailfactory import make_mail
from test_classify import _dsn


def _eml(tmp_path: Path, raw: bytes, name: str) -> str:
    p = tmp_path / name
    p.write_bytes(raw)
    return str(p)


def test_parse_json_shape_for_a_japanese_mail(run_intake, tmp_path):
    body = "①の件、㈱山田商事の髙橋です。\n"
    raw = make_mail(subject="①の件について", sender="山田 <yamada@bigcorp.co.jp>", cc="hanako@bigcorp.co.jp",
                    body=body, charset="utf-8", headers={"Reply-To": "reply@bigcorp.co.jp"},
                    message_id="<ja-1@bigcorp.co.jp>")
    res = run_intake("parse", "--json", _eml(tmp_path, raw, "ja.eml"), check=True)
    out = json.loads(res.stdout)
    for key in ("message_id", "date", "from", "to", "cc", "reply_to", "subject", "text", "html", "attachments",
                "defects", "charsets", "classification", "language"):
        assert key in out, key
    assert out["message_id"] == "ja-1@bigcorp.co.jp"
    assert out["date"] == "2026-11-20T01:00:00+00:00"
    assert out["from"] == {"name": "山田", "address": "yamada@bigcorp.co.jp"}
    assert out["to"] == [{"name": "", "address": "support@example.com"}]
    assert out["cc"] == [{"name": "", "address": "hanako@bigcorp.co.jp"}]
    assert out["reply_to"] == [{"name": "", "address": "reply@bigcorp.co.jp"}]
    assert out["subject"] == "①の件について"
    assert out["text"] == body
    assert out["html"] is None
    assert out["classification"]["sender"] == "customer" and out["classification"]["kind"] == "message"
    assert out["language"] == "ja"
    # parse stores nothing
    # Nothing was stored: not even a database was made, and reading one says so.
    assert not (tmp_path / "intake.db").exists()
    listed = run_intake("messages", "list", "--json")
    assert listed.returncode == 1 and "no database at ./intake.db: run intake serve" in listed.stderr


def test_parse_human_output_and_attachment_fields(run_intake, tmp_path):
    raw = (
        "From: a@customer.example.org\r\nTo: support@example.com\r\nSubject: logo\r\nMessage-ID: <att@x.org>\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/related; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>see <img src=\"cid:logo1\"></p>\r\n"
        "--b\r\nContent-Type: image/png\r\nContent-ID: <logo1>\r\nContent-Disposition: inline; filename=logo.png\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--b--\r\n"
    ).encode()
    f = _eml(tmp_path, raw, "att.eml")
    out = json.loads(run_intake("parse", "--json", f, check=True).stdout)
    (a,) = out["attachments"]
    assert a["filename"] == "logo.png" and a["content_type"] == "image/png" and a["inline"] is True
    assert a["content_id"] == "logo1" and a["size"] == 8 and len(a["sha256"]) == 64
    assert out["text"].strip() == "see"
    human = run_intake("parse", f, check=True).stdout
    assert "Attachment  logo.png (image/png, 8 bytes, inline)" in human


def test_messages_list_filters_and_shows_case_numbers(run_intake, tmp_path):
    run_intake("ingest", _eml(tmp_path, make_mail(sender="a@one.example.org", subject="first"), "a.eml"), check=True)
    run_intake("ingest", _eml(tmp_path, make_mail(sender="b@two.example.org", subject="second",
                                                  headers={"Precedence": "bulk"}), "b.eml"), check=True)
    rows = json.loads(run_intake("messages", "list", "--json", check=True).stdout)
    assert [(r["from"], r["state"], r["case"]) for r in rows] == [
        ("a@one.example.org", "processed", "CASE-1"), ("b@two.example.org", "dropped", None)]
    assert len(json.loads(run_intake("messages", "list", "--state", "dropped", "--json", check=True).stdout)) == 1
    assert len(json.loads(run_intake("messages", "list", "--from", "A@One.example.org", "--json", check=True).stdout)) == 1
    assert json.loads(run_intake("messages", "list", "--since", "2999-01-01", "--json", check=True).stdout) == []
    table = run_intake("messages", "list", check=True).stdout
    assert "CASE-1" in table and "dropped" in table


def _show(run_intake, ref: str) -> str:
    return run_intake("messages", "show", ref, check=True).stdout


def test_processing_log_of_each_path(run_intake, tmp_path, app, monkeypatch):
    f = lambda raw, n: _eml(tmp_path, raw, n)  # noqa: E731
    run_intake("ingest", f(make_mail(message_id="<p1@customer.example.org>", subject="問い合わせ"), "1.eml"), check=True)
    run_intake("ingest", f(make_mail(message_id="<p2@customer.example.org>", subject="Re: 問い合わせ",
                                     headers={"In-Reply-To": "<p1@customer.example.org>"}), "2.eml"), check=True)
    run_intake("ingest", "--mailbox", "billing@example.com", f(make_mail(message_id="<p1@customer.example.org>"), "3.eml"),
               check=True)
    run_intake("ingest", f(make_mail(message_id="<p4@customer.example.org>",
                                     headers={"Auto-Submitted": "auto-replied"}), "4.eml"), check=True)
    run_intake("ingest", f(_dsn("p1@customer.example.org"), "5.eml"), check=True)

    new_case = _show(run_intake, "p1@customer.example.org")
    assert "classified: sender customer, kind message" in new_case
    assert "threading: new → new case" in new_case
    assert "routing: queue support (mailbox default)" in new_case
    assert "stored: new case CASE-1" in new_case
    comment = _show(run_intake, "2")
    assert "threading: references → CASE-1: In-Reply-To/References name <p1@customer.example.org>" in comment
    assert "stored: comment (public) CASE-1" in comment
    dup = _show(run_intake, "3")
    assert "duplicate of inbound #1, recorded on CASE-1" in dup and "billing@example.com" in dup
    automated = _show(run_intake, "4")
    assert "kind automated (Auto-Submitted: auto-replied)" in automated
    assert "dropped: automated mail does not open a case" in automated
    bounce = _show(run_intake, "5")
    assert "kind bounce" in bounce and "bounce of <p1@customer.example.org> recorded on CASE-1" in bounce

    # quarantined, then retried
    real = pipeline.parse
    monkeypatch.setattr(pipeline, "parse", lambda raw, **kw: (_ for _ in ()).throw(ValueError("bad mail")) if b"POISON" in raw else real(raw, **kw))
    qid = app.store.receive(make_mail(subject="POISON"), channel="email", mailbox="support@example.com")
    app.processor.process(qid)
    q = _show(run_intake, str(qid))
    assert "inbound #%d  quarantined" % qid in q
    assert "quarantined: ValueError: bad mail" in q and "Traceback" in q
    monkeypatch.undo()  # the cause is fixed
    run_intake("quarantine", "retry", str(qid), check=True)
    retried = _show(run_intake, str(qid))
    assert "quarantined: ValueError: bad mail" in retried  # the history stays
    assert "done: processed CASE-2" in retried

    detail = json.loads(run_intake("messages", "show", "1", "--json", check=True).stdout)
    assert [e["step"] for e in detail["log"]] == ["received", "parsed", "classified", "threaded", "routed",
                                                    "assigned", "stored", "notify", "done"]
    assert "assigned to " in new_case and "by round_robin" in new_case
    # The mails it caused, with their delivery state (delivered as .eml files by tick).
    assert "queued ack to alice@customer.example.org" in new_case
    assert "mails it caused:" in new_case and "ack to alice@customer.example.org: queued" in new_case
    run_intake("tick", check=True)
    assert "ack to alice@customer.example.org: sent (1 attempt(s))" in _show(run_intake, "1")


def test_messages_raw_returns_the_received_bytes_exactly(app):
    raw = make_mail(subject="生のバイト", body="行1\r\n行2 with trailing spaces   \r\n") + b"\r\n\xff\xfe raw tail"
    inbound_id = app.store.receive(raw, channel="smtp", mailbox="support@example.com")
    # run_intake decodes text; the bytes must be compared undecoded.
    proc = subprocess.run([sys.executable, "-m", "intake", "--config", str(app.cfg.source), "messages", "raw",
                           str(inbound_id)], capture_output=True, env=intake_env(), check=True)
    assert proc.stdout == raw


def test_retention_removes_old_raw_bytes_but_keeps_the_case(run_intake, tmp_path, config_path):
    run_intake("ingest", _eml(tmp_path, make_mail(subject="old"), "old.eml"), check=True)
    kept = run_intake("tick", "--at", "2027-06-01T00:00:00", check=True).stdout
    assert "retention: 0 raw message(s)" in kept  # younger than 365 days
    purged = run_intake("tick", "--at", "2028-01-01T00:00:00", check=True).stdout
    assert "retention: 1 raw message(s) older than 365 days removed" in purged
    assert "removed by retention" in run_intake("messages", "raw", "1").stderr
    assert "raw bytes removed by retention" in _show(run_intake, "1")
    assert json.loads(run_intake("cases", "list", "--json", check=True).stdout)[0]["subject"] == "old"


def test_retention_zero_keeps_forever(run_intake, tmp_path):
    from conftest import write_config

    folder = tmp_path / "forever"
    folder.mkdir()
    cfg = write_config(folder, "[cases]\nretention_days = 0\n")
    run_intake("ingest", _eml(tmp_path, make_mail(), "m.eml"), config=cfg, check=True)
    assert "retention off" in run_intake("tick", "--at", "2040-01-01T00:00:00", config=cfg, check=True).stdout
    assert run_intake("messages", "raw", "1", config=cfg).returncode == 0


def test_parse_json_on_the_corpora_agrees_with_the_foundation_measure(tmp_path):
    """`intake parse --json` meets the corpus expectations exactly as parse() does."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    from conftest import write_config
    from intake.cli import cli
    from intake.mail.parse import Address, parse
    from test_corpus import CASES, failures

    cfg = write_config(tmp_path)
    runner = CliRunner()
    disagreements = []
    for case in CASES:
        raw = case.raw.read_bytes()
        res = runner.invoke(cli, ["--log-level", "ERROR", "--config", str(cfg), "parse", "--json", str(case.raw)])
        assert res.exit_code == 0, (case.id, res.output)
        out = json.loads(res.stdout)
        # The JSON names attachments by SHA-256; find their bytes to compare MD5 sums.
        payloads = {a.sha256: a.payload for a in parse(raw).attachments}
        view = SimpleNamespace(
            subject=out["subject"], text=out["text"], html=out["html"], from_display=out["from_display"],
            from_=Address(**out["from"]) if out["from"] else None, to=[Address(**a) for a in out["to"]],
            attachments=[SimpleNamespace(filename=a["filename"], content_type=a["content_type"], size=a["size"],
                                         payload=payloads[a["sha256"]], name_given=a["name_given"])
                         for a in out["attachments"]],
        )
        if failures(case, view) != failures(case, parse(raw)):
            disagreements.append(case.id)
    assert disagreements == []
    assert len(CASES) >= 250


def test_log_shows_every_rule_and_a_drop_by_rule(run_intake, tmp_path, config_path):
    (config_path.parent / "routing_rules" / "20-test.yaml").write_text(
        "rules:\n"
        "  - name: billing address\n"
        "    when: {to: billing@example.com}\n"
        "    then: {queue: billing}\n"
        "  - name: advertising\n"
        "    when: {subject: {contains: 広告}}\n"
        "    then: {drop: true}\n", "utf-8")
    run_intake("ingest", _eml(tmp_path, make_mail(subject="【広告】新製品のお知らせ"), "ad.eml"), check=True)
    log = _show(run_intake, "1")
    assert "rule 'billing address' (routing_rules/20-test.yaml:3): not matched, failed to: \"billing@example.com\"" in log
    assert "rule 'advertising'" in log and "matched, set drop=True" in log
    assert "dropped: dropped by rule advertising" in log
