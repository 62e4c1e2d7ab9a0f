"""Routing end to end through the real command line: ingest, assignment, check, explain, stats."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, write_config
from mailfactory import make_mail

# 10:00 on Tuesday 2026-11-24 in Tokyo: inside business hours.
TUESDAY_MORNING = "2026-11-24T10:00:00+09:00"


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    """An installation with the shipped routing_rules/ folder."""
    rules = tmp_path / "routing_rules"
    shutil.copytree(ROOT / "intake" / "shipped" / "routing_rules", rules, dirs_exist_ok=True)
    return write_config(tmp_path)


def ingest(run_intake, folder: Path, raw: bytes, name: str, *args: str, config: Path | None = None) -> str:
    f = folder / name
    f.write_bytes(raw)
    kw = {"config": config} if config else {}
    res = run_intake("ingest", *args, str(f), **kw)
    assert res.returncode == 0, res.stderr
    return res.stdout


def cases(run_intake, config: Path | None = None) -> dict[str, dict]:
    kw = {"config": config} if config else {}
    out = json.loads(run_intake("cases", "list", "--json", check=True, **kw).stdout)
    return {c["subject"]: c for c in out}


def test_real_shaped_mails_are_routed_by_the_shipped_rules(run_intake, tmp_path, shipped):
    mails = {
        "key.eml": make_mail(subject="【至急】サーバーにログインできません", sender="山田 太郎 <Taro@BigCorp.co.jp>",
                             body="お世話になっております。\nログインできません。\n", charset="iso-2022-jp", cte="7bit"),
        "bill.eml": make_mail(subject="請求書の再発行のお願い", sender="経理部 <keiri@shop.example.jp>",
                              to="billing@example.com", body="請求書を再発行してください。\n", charset="shift_jis"),
        "emea.eml": make_mail(subject="Printer offline since update", sender="Hans Müller <hans@firma.de>"),
        "news.eml": make_mail(subject="11月のメルマガ", sender="news@vendor.example.net"),
        "plain.eml": make_mail(subject="パスワードを忘れました", sender="佐々木 <sasaki@example.co.jp>",
                               body="パスワードの再設定方法を教えてください。\n"),
    }
    outputs = {name: ingest(run_intake, tmp_path, raw, name, config=shipped) for name, raw in mails.items()}
    assert "dropped" in outputs["news.eml"] and "newsletters" in outputs["news.eml"]
    got = cases(run_intake, shipped)
    assert len(got) == 4
    key = got["【至急】サーバーにログインできません"]
    assert (key["queue"], key["priority"], key["category"], key["assignee"]) == (
        "key-accounts", "urgent", "technical", "kenji@example.com")
    assert set(key["tags"]) == {"urgent", "key-account"}
    bill = got["請求書の再発行のお願い"]
    assert (bill["queue"], bill["category"], bill["assignee"]) == ("billing", "billing", "keiko@example.com")
    emea = got["Printer offline since update"]
    assert (emea["queue"], emea["assignee"]) == ("support-emea", "jan@example.com")  # Sophie is away
    plain = got["パスワードを忘れました"]
    assert (plain["queue"], plain["assignee"]) == ("support", "hanako@example.com")  # default queue, round robin

    detail = json.loads(run_intake("cases", "show", key["number"], "--json", check=True, config=shipped).stdout)
    rules = [e for e in detail["timeline"] if e["type"] == "rule"]
    assert [e["rule"] for e in rules] == ["urgent subject", "key account tag", "key accounts"]
    assert rules[0]["set"] == {"priority": "urgent", "tags": ["urgent"]}
    assigned = [e for e in detail["timeline"] if e["type"] == "assignee"]
    assert len(assigned) == 1
    assert assigned[0]["to"] == "kenji@example.com" and assigned[0]["rule"] == "key accounts"
    assigned = [e for e in json.loads(run_intake("cases", "show", plain["number"], "--json", config=shipped).stdout)
                ["timeline"] if e["type"] == "assignee"]
    assert assigned[0]["method"] == "round_robin" and assigned[0]["rule"] is None
    assert assigned[0]["reason"] == "queue support assigns round_robin"

    stats = {r["rule"]: r for r in json.loads(run_intake("rules", "stats", "--json", check=True,
                                                         config=shipped).stdout)}
    assert stats["urgent subject"]["hits"] == 1
    assert stats["newsletters"]["hits"] == 1
    assert stats["billing"]["hits"] == 1
    assert stats["feature requests"]["hits"] == 0 and stats["feature requests"]["last_hit"] is None
    assert stats["key accounts"]["last_hit"] is not None
    text = run_intake("rules", "stats", check=True, config=shipped).stdout
    assert "urgent subject" in text and "routing_rules/20-routing.yaml:" in text


TEAM = """
agents:
  hanako@example.com: {name: 山田 花子}
  ken@example.com: {name: Ken Sato}
  yuki@example.com: {name: 佐藤 由紀, away: true}
queues:
  support: {agents: [hanako@example.com, ken@example.com, yuki@example.com], assign: round_robin}
  billing: {agents: [hanako@example.com, ken@example.com, yuki@example.com], assign: least_open}
"""


def test_round_robin_takes_turns_and_skips_agents_who_are_away(run_intake, tmp_path, config_path):
    (tmp_path / "routing_rules" / "10-team.yaml").write_text(TEAM, "utf-8")
    for i in range(5):
        ingest(run_intake, tmp_path, make_mail(subject=f"support question {i}"), f"s{i}.eml")
    got = cases(run_intake)
    assert [got[f"support question {i}"]["assignee"] for i in range(5)] == [
        "hanako@example.com", "ken@example.com", "hanako@example.com", "ken@example.com", "hanako@example.com"]


def test_least_open_goes_to_the_agent_with_fewest_open_cases(run_intake, tmp_path, config_path):
    (tmp_path / "routing_rules" / "10-team.yaml").write_text(TEAM, "utf-8")
    # Hanako already holds one open support case (round robin gives her the first).
    ingest(run_intake, tmp_path, make_mail(subject="support question"), "s.eml")
    for i in range(3):
        ingest(run_intake, tmp_path, make_mail(subject=f"billing question {i}", to="billing@example.com"), f"b{i}.eml")
    got = cases(run_intake)
    assert got["support question"]["assignee"] == "hanako@example.com"
    # ken 0 < hanako 1 → ken; tie 1:1 → hanako (earlier in the queue); ken 1 < hanako 2 → ken.
    assert [got[f"billing question {i}"]["assignee"] for i in range(3)] == [
        "ken@example.com", "hanako@example.com", "ken@example.com"]


def test_rule_assign_and_nobody_available(run_intake, tmp_path, config_path):
    (tmp_path / "routing_rules" / "10-team.yaml").write_text(textwrap.dedent("""
        agents:
          ken@example.com: {name: Ken, away: true}
        queues:
          support: {agents: [ken@example.com], assign: round_robin}
          billing: {}
        rules:
          - name: vip to ken
            when: {from_domain: .bigcorp.co.jp}
            then: {assign: ken@example.com}
    """), "utf-8")
    ingest(run_intake, tmp_path, make_mail(subject="vip", sender="a@tokyo.bigcorp.co.jp"), "v.eml")
    ingest(run_intake, tmp_path, make_mail(subject="nobody"), "n.eml")
    got = cases(run_intake)
    assert got["vip"]["assignee"] == "ken@example.com"  # explicitly assigned, even while away
    assert got["nobody"]["assignee"] is None
    detail = json.loads(run_intake("cases", "show", got["nobody"]["number"], "--json", check=True).stdout)
    notes = [e["text"] for e in detail["timeline"] if e["type"] == "note"]
    assert notes == ["not assigned: no agent of queue support is available (all away or none listed)"]


def test_rules_check_reports_every_error_with_file_and_line(run_intake, tmp_path, shipped):
    ok = run_intake("rules", "check", config=shipped)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "12 rule(s)" in ok.stdout
    bad = tmp_path / "routing_rules" / "30-new.yaml"
    bad.write_text(textwrap.dedent("""
        rules:
          - name: 至急の請求
            when:
              subjcet: {regex: '至急'}
            then: {queue: biling}
          - name: billing
            then: {}
    """), "utf-8")
    res = run_intake("rules", "check", config=shipped)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert "routing_rules/30-new.yaml:5: rule '至急の請求': unknown condition 'subjcet' (did you mean 'subject'?)" in lines
    assert "routing_rules/30-new.yaml:6: rule '至急の請求': queue: unknown queue 'biling' (did you mean 'billing'?)" in lines
    assert any(line.startswith("routing_rules/30-new.yaml:7: duplicate rule name 'billing' (first at "
                               "routing_rules/20-routing.yaml:") for line in lines)
    # One file, checked with the folder around it; a folder given as PATH.
    assert run_intake("rules", "check", str(bad), config=shipped).returncode == 1
    bad.unlink()
    assert run_intake("rules", "check", str(tmp_path / "routing_rules" / "20-routing.yaml"),
                      config=shipped).returncode == 0
    assert run_intake("rules", "check", str(tmp_path / "nowhere"), config=shipped).returncode == 1


def test_explain_a_japanese_mail_writes_nothing(run_intake, tmp_path, shipped):
    raw = make_mail(subject="【ＵＲＧＥＮＴ】請求書が届きません〜", sender="山田 太郎 <Taro@BigCorp.co.jp>",
                    body="いつもお世話になっております。\n先月分の請求書が届いておりません。\n",
                    charset="iso-2022-jp", cte="7bit")
    f = tmp_path / "ja.eml"
    f.write_bytes(raw)
    res = run_intake("rules", "explain", str(f), "--at", TUESDAY_MORNING, config=shipped)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "【ＵＲＧＥＮＴ】請求書が届きません〜" in out
    assert "→ 【urgent】請求書が届きません~" in out  # the normalised subject the rules see
    assert "from_domain     bigcorp.co.jp" in out
    assert "language        ja" in out
    assert "business_hours  true: open (2026-11-24 Tue 10:00 Asia/Tokyo)" in out
    assert "sender     customer, kind message" in out
    assert "✗  1. newsletters" in out
    assert "✓  2. urgent subject" in out and "matched: set priority=urgent, tags=[urgent]; continue" in out
    assert "kept from earlier rules: priority" in out
    assert 'not matched: from_domain: ".example.com"  (at routing_rules/20-routing.yaml:' in out
    assert "✓  6. billing" in out
    assert "·  7. key accounts" in out and "not evaluated (stopped by 'billing')" in out
    assert "queue     billing  (rule billing)" in out
    assert "priority  urgent  (rule urgent subject)" in out
    assert "assign    least_open  (queue billing): keiko@example.com, hanako@example.com" in out
    assert "Nothing was written." in out
    assert not (tmp_path / "intake.db").exists()

    # On a holiday evening the English follow-the-sun rule would apply to English mail.
    en = tmp_path / "en.eml"
    en.write_bytes(make_mail(subject="Cannot log in", sender="bob@acme-corp.com"))
    data = json.loads(run_intake("rules", "explain", str(en), "--at", "2026-11-23T20:00:00+09:00", "--json",
                                 check=True, config=shipped).stdout)
    assert data["facts"]["business_hours"] is False
    assert "勤労感謝の日" in data["facts"]["business_hours_detail"]
    assert data["decision"]["queue"] == "support-us"
    assert {r["rule"]: r["result"] for r in data["rules"]}["English mail outside Tokyo hours"] == "matched"
    assert data["threading"]["method"] is None and "no database at" in data["threading"]["reason"]


def test_explain_shows_the_threading_decision_of_a_reply(run_intake, tmp_path, shipped):
    first = make_mail(subject="質問", sender="a@shop.example.jp", message_id="<q1@shop.example.jp>")
    ingest(run_intake, tmp_path, first, "q.eml", config=shipped)
    reply = make_mail(subject="Re: 質問", sender="a@shop.example.jp", headers={"In-Reply-To": "<q1@shop.example.jp>"})
    f = tmp_path / "r.eml"
    f.write_bytes(reply)
    out = run_intake("rules", "explain", str(f), check=True, config=shipped).stdout
    assert "comment on CASE-1" in out and "rules route new cases only" in out
    assert len(cases(run_intake, shipped)) == 1
    # As processing would: a case merged away answers for the one it went into, and a
    # late reply to a closed case opens a follow-up.
    second = make_mail(subject="別件", sender="a@shop.example.jp", message_id="<q2@shop.example.jp>")
    ingest(run_intake, tmp_path, second, "q2.eml", config=shipped)
    run_intake("cases", "merge", "CASE-1", "--into", "CASE-2", check=True, config=shipped)
    out = run_intake("rules", "explain", str(f), check=True, config=shipped).stdout
    assert "comment on CASE-2" in out
    run_intake("cases", "update", "CASE-2", "--status", "closed", check=True, config=shipped)
    late = run_intake("rules", "explain", str(f), "--at", "2099-01-01T00:00:00+00:00", config=shipped).stdout
    assert "new follow-up case of CASE-2" in late, late


def test_ingest_with_broken_rules_stores_and_defers(run_intake, tmp_path, config_path):
    (tmp_path / "routing_rules" / "20-bad.yaml").write_text("rules:\n  - name: x\n    then: {queue: nope}\n", "utf-8")
    f = tmp_path / "m.eml"
    f.write_bytes(make_mail())
    res = run_intake("ingest", str(f))
    assert res.returncode == 0
    assert "processing deferred" in res.stdout
    assert "20-bad.yaml:3: rule 'x': queue: unknown queue 'nope'" in res.stderr
    assert cases(run_intake) == {}
    (tmp_path / "routing_rules" / "20-bad.yaml").unlink()
    res = run_intake("tick", check=True)
    assert "1 received message(s) processed" in res.stdout
    assert len(cases(run_intake)) == 1
