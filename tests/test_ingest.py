"""`intake ingest` end to end: storing, new cases, duplicates, exit codes, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

from mailfactory import make_mail


def _ingest(run_intake, tmp_path: Path, raw: bytes, name: str = "m.eml", *args: str):
    f = tmp_path / name
    f.write_bytes(raw)
    return run_intake("ingest", *args, str(f))


def test_ingest_makes_a_case_with_the_design_json_keys(run_intake, tmp_path):
    raw = make_mail(subject="Re: AW: 返信: Invoice missing", sender="山田 太郎 <Taro@BigCorp.co.jp>",
                    cc="Hanako <hanako@bigcorp.co.jp>, support@example.com")
    res = _ingest(run_intake, tmp_path, raw)
    assert res.returncode == 0, res.stderr
    assert "CASE-1" in res.stdout
    cases = json.loads(run_intake("cases", "list", "--json", check=True).stdout)
    assert len(cases) == 1
    c = cases[0]
    for key in ("number", "subject", "status", "priority", "queue", "category", "assignee", "requester",
                "requester_name", "organization", "channel", "mailbox", "tags", "created_at", "updated_at"):
        assert key in c
    assert c["number"] == "CASE-1"
    assert c["subject"] == "Invoice missing"
    assert c["status"] == "new"
    assert c["queue"] == "support"
    assert c["requester"] == "taro@bigcorp.co.jp"
    assert c["requester_name"] == "山田 太郎"
    assert c["organization"] == "bigcorp.co.jp"
    assert c["channel"] == "email"
    assert c["mailbox"] == "support@example.com"

    detail = json.loads(run_intake("cases", "show", "CASE-1", "--json", check=True).stdout)
    assert set(detail["participants"]) == {"taro@bigcorp.co.jp", "hanako@bigcorp.co.jp"}
    msgs = [e for e in detail["timeline"] if e["type"] == "message" and e["direction"] == "in"]
    assert len(msgs) == 1
    # The mails it caused (ack, agent notices) are on the timeline as outgoing messages.
    assert any(e["type"] == "message" and e["direction"] == "out" for e in detail["timeline"])
    m = msgs[0]
    for key in ("at", "direction", "visibility", "from", "to", "subject", "message_id", "text", "attachments"):
        assert key in m
    assert m["direction"] == "in" and m["visibility"] == "public"
    assert "printer does not print" in m["text"]


def test_free_mail_domain_makes_no_organization(run_intake, tmp_path):
    _ingest(run_intake, tmp_path, make_mail(sender="someone@gmail.com"))
    _ingest(run_intake, tmp_path, make_mail(sender="taro@yahoo.co.jp"), "b.eml")
    cases = json.loads(run_intake("cases", "list", "--json", check=True).stdout)
    assert [c["organization"] for c in cases] == [None, None]


def test_same_message_to_support_and_billing_is_one_case(run_intake, tmp_path):
    raw = make_mail(to="support@example.com, billing@example.com", message_id="<twice@customer.example.org>")
    first = _ingest(run_intake, tmp_path, raw, "a.eml", "--mailbox", "support@example.com")
    second = _ingest(run_intake, tmp_path, raw, "a.eml", "--mailbox", "billing@example.com")
    assert first.returncode == 0 and second.returncode == 0
    assert "duplicate" in second.stdout and "CASE-1" in second.stdout
    cases = json.loads(run_intake("cases", "list", "--json", check=True).stdout)
    assert len(cases) == 1
    detail = json.loads(run_intake("cases", "show", "CASE-1", "--json", check=True).stdout)
    dup = [e for e in detail["timeline"] if e["type"] == "duplicate"]
    assert dup and dup[0]["mailbox"] == "billing@example.com"


def test_mail_without_message_id_is_deduplicated_by_content(run_intake, tmp_path):
    raw = make_mail(message_id=None)
    # The second delivery went through another relay: an extra trace header.
    again = b"Received: from relay2.example.net by mx; Fri, 20 Nov 2026 10:00:05 +0900\r\n" + raw
    _ingest(run_intake, tmp_path, raw, "a.eml")
    res = _ingest(run_intake, tmp_path, again, "b.eml")
    assert "duplicate" in res.stdout
    assert len(json.loads(run_intake("cases", "list", "--json", check=True).stdout)) == 1


def test_ingest_from_standard_input_like_an_mta_pipe(run_intake):
    res = run_intake("ingest", "-", input=make_mail(subject="piped"))
    assert res.returncode == 0, res.stderr
    cases = json.loads(run_intake("cases", "list", "--json", check=True).stdout)
    assert cases[0]["subject"] == "piped"


def test_ingest_usage_errors_exit_64(run_intake, tmp_path):
    assert run_intake("ingest").returncode == 64
    assert run_intake("ingest", str(tmp_path / "missing.eml")).returncode == 64
    assert run_intake("ingest", "--mailbox", "nobody@example.net", "-", input=b"x").returncode == 64


def test_ingest_exits_75_when_the_database_cannot_be_used(run_intake, tmp_path):
    from conftest import write_config

    folder = tmp_path / "ro"
    folder.mkdir()
    cfg = write_config(folder, database="sqlite:////nonexistent-dir/intake.db")
    res = run_intake("ingest", "-", input=make_mail(), config=cfg)
    assert res.returncode == 75, (res.stdout, res.stderr)


def test_automated_mail_opens_no_case(run_intake, tmp_path):
    raw = make_mail(subject="Out of office", headers={"Auto-Submitted": "auto-replied"})
    res = _ingest(run_intake, tmp_path, raw)
    assert res.returncode == 0
    assert "dropped" in res.stdout
    assert json.loads(run_intake("cases", "list", "--json", check=True).stdout) == []


def test_human_output_is_a_table(run_intake, tmp_path):
    _ingest(run_intake, tmp_path, make_mail(subject="至急：請求書が届きません"))
    out = run_intake("cases", "list", check=True).stdout
    assert out.splitlines()[0].split()[:3] == ["case", "status", "priority"]
    assert "CASE-1" in out and "至急：請求書が届きません" in out
    show = run_intake("cases", "show", "CASE-1", check=True).stdout
    assert show.startswith("CASE-1  至急：請求書が届きません")
    assert "timeline:" in show
