"""Rule patterns are matched in linear time (RE2); what needs backtracking is refused at
load with file:line; evaluation has a time budget per message, spent before the write
transaction, and a message past it is quarantined naming the rule (issue 15 item 2)."""

from __future__ import annotations

import json
import random
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import case_detail, list_cases, open_test_app, write_config

from intake.mail.classify import classify
from intake.mail.parse import parse
from intake.rules import RuleContext, RulesError, RuleTimeout, compile_rules, evaluate
from intake.states import InboundState
from mailfactory import make_mail

NOW = datetime(2026, 11, 24, 1, tzinfo=timezone.utc)


def rules(text: str):
    return compile_rules([("routing_rules/20-rules.yaml", textwrap.dedent(text).encode())])


def context(raw: bytes) -> RuleContext:
    mail = parse(raw)
    return RuleContext(mail=mail, classification=classify(mail, own_addresses=set(), agents=set()),
                       mailbox="support@example.com", recipients=("support@example.com",), channel="email", now=NOW)


def matched(ruleset, **mail) -> list[str]:
    return evaluate(ruleset, context(make_mail(**mail))).matched


def test_a_pattern_that_backtracks_exponentially_in_python_is_matched_at_once():
    rs = rules("""
        rules:
          - name: redos
            when: {subject: {regex: '(a+)+$'}}
            then: {tags: [x]}
    """)
    start = time.monotonic()
    assert matched(rs, subject="a" * 40 + "b") == []  # Python's re: about 2^40 steps
    assert matched(rs, subject="a" * 5000 + "!") == []
    assert time.monotonic() - start < 0.5
    assert matched(rs, subject="aaaa") == ["redos"]


def test_japanese_patterns_match_normalised_japanese_subjects():
    rs = rules("""
        rules:
          - name: 至急の請求書
            when: {subject: {regex: '請求書.*(至急|緊急)'}}
            then: {priority: urgent}
          - name: 漢字だけ
            when: {subject: {regex: '^\\p{Han}+$'}}
            then: {tags: [kanji]}
          - name: urgent
            when: {subject: {regex: '\\burgent\\b|ＡＳＡＰ'}}
            then: {tags: [urgent]}
    """)
    assert matched(rs, subject="【請求書】至急ご確認ください") == ["至急の請求書"]
    assert matched(rs, subject="請求書の件（緊急）") == ["至急の請求書"]
    assert matched(rs, subject="請求書の件") == []
    assert matched(rs, subject="請求書") == ["漢字だけ"]
    # Text and patterns are NFKC-normalised and case-folded: full-width and upper case match.
    assert matched(rs, subject="ＵＲＧＥＮＴ：ログインできません") == ["urgent"]
    assert matched(rs, subject="please reply asap") == ["urgent"]
    # A body pattern over Japanese text, half-width katakana normalised to full-width.
    body = rules("""
        rules:
          - name: logs
            when: {body: {regex: '(?:^|[^ブ])ログ'}}
            then: {tags: [logs]}
    """)
    assert matched(body, body="ｴﾗｰﾛｸﾞを添付します。\n") == ["logs"]
    assert matched(body, body="ブログを読みました。\n") == []


@pytest.mark.parametrize("pattern,feature", [
    ("請求書(?=.*至急)", "lookahead (?=…) needs a backtracking engine"),
    ("(?!spam)invoice", "negative lookahead (?!…)"),
    ("(?<=請求)書", "lookbehind (?<=…)"),
    ("(?<!ブ)ログ", "for one character write (?:^|[^X]) before the text, e.g. (?:^|[^ブ])ログ"),
    ("(\\w+) \\1", "backreference (\\1, (?P=name)) needs a backtracking engine"),
    ("(?P<w>a)(?P=w)", "backreference"),
    ("a*+b", "possessive quantifier"),
    ("end\\Z", "\\Z is written \\z"),
    (".{1000}x", "the pattern is too large: 8005 instructions compiled, at most 5000"),
    ("(unclosed", "missing ), unterminated subpattern at position 0"),
])
def test_patterns_that_need_backtracking_are_refused_with_file_and_line(pattern, feature):
    text = f"rules:\n  - name: hostile\n    when:\n      subject: {{regex: '{pattern}'}}\n    then: {{tags: [x]}}\n"
    with pytest.raises(RulesError) as err:
        compile_rules([("routing_rules/20-rules.yaml", text.encode())])
    (line,) = err.value.errors
    assert line.startswith(f"routing_rules/20-rules.yaml:4: rule 'hostile': subject: bad regex {pattern!r}: ")
    assert feature in line


def test_rules_check_names_the_refused_pattern(run_intake, tmp_path):
    folder = tmp_path / "routing_rules"
    (folder / "30-hostile.yaml").write_text(textwrap.dedent("""\
        rules:
          - name: billing
            when: {subject: {regex: '請求'}}
            then: {queue: billing}
          - name: looks ahead
            when:
              body: {regex: '(?=.*(至急|urgent))請求'}
            then: {priority: urgent}
    """), "utf-8")
    res = run_intake("rules", "check", str(folder))
    assert res.returncode == 1
    # (the path as the admin typed it, relative to the working folder)
    assert ("routing_rules/30-hostile.yaml:7: rule 'looks ahead': body: bad regex '(?=.*(至急|urgent))請求': "
            "lookahead (?=…) needs a backtracking engine") in res.stderr
    assert "1 error(s); nothing changes until they are fixed" in res.stderr


def test_evaluation_past_its_budget_names_the_rule():
    slow = "\n".join(f"  - name: slow {i}\n    when: {{body: {{regex: 'a.{{500}}z'}}}}\n    then: {{tags: [s{i}]}}"
                     for i in range(8))
    rs = compile_rules([("routing_rules/20-slow.yaml", f"rules:\n{slow}\n".encode())])
    rnd = random.Random(5)
    body = "".join(rnd.choice("ab") for _ in range(100_000)) + "\n"
    ctx = context(make_mail(subject="log", body=body))
    with pytest.raises(RuleTimeout) as err:
        evaluate(rs, ctx, budget=0.01)
    assert err.value.rule.name.startswith("slow ")
    assert str(err.value).startswith(f"routing_rules/20-slow.yaml:{err.value.rule.line}: rule '{err.value.rule.name}': "
                                     "evaluating the rules took ")
    assert evaluate(rs, ctx).matched == []  # without a budget (intake rules explain) it runs to the end


def test_a_message_past_the_rules_budget_is_quarantined_and_the_next_goes_on(tmp_path):
    cfg = write_config(tmp_path, '[rules]\nbudget = "0.01s"\n')
    slow = "\n".join(f"  - name: slow {i}\n    when: {{body: {{regex: 'a.{{500}}z'}}}}\n    then: {{tags: [s{i}]}}"
                     for i in range(8))
    (tmp_path / "routing_rules" / "20-slow.yaml").write_text(f"rules:\n{slow}\n", "utf-8")
    app = open_test_app(cfg)
    try:
        first = app.store.receive(make_mail(subject="Printer", body="short\n", sender="a@customer.example.org"),
                                  channel="email", mailbox="support@example.com", envelope_to=["support@example.com"])
        rnd = random.Random(5)
        big = "".join(rnd.choice("ab") for _ in range(100_000)) + "\n"
        heavy = app.store.receive(make_mail(subject="Huge log", body=big, sender="b@customer.example.org"),
                                  channel="email", mailbox="support@example.com", envelope_to=["support@example.com"])
        # A reply on the first case needs no routing: its size costs nothing here.
        reply = app.store.receive(make_mail(subject="Re: [CASE-1] Printer", body=big, sender="a@customer.example.org"),
                                  channel="email", mailbox="support@example.com", envelope_to=["support@example.com"])
        outcomes = app.processor.process_batch([first, heavy, reply])
        assert [o.state for o in outcomes] == [InboundState.PROCESSED, InboundState.QUARANTINED,
                                               InboundState.PROCESSED]
        assert outcomes[2].case_number == "CASE-1"
        assert "RuleTimeout: " in outcomes[1].reason and "rule 'slow " in outcomes[1].reason
        assert "20-slow.yaml:" in outcomes[1].reason
        assert [c.subject for c in list_cases(app)] == ["Printer"]
        assert any(e["type"] == "message" and e.get("direction") == "in" for e in case_detail(app, "CASE-1")["timeline"])
    finally:
        app.close()


def test_quarantine_list_names_the_rule(run_intake, config_path):
    folder = config_path.parent
    (folder / "routing_rules" / "20-slow.yaml").write_text(
        "rules:\n" + "\n".join(f"  - name: slow {i}\n    when: {{body: {{regex: 'a.{{500}}z'}}}}\n    then: {{tags: [s]}}"
                               for i in range(8)) + "\n", "utf-8")
    text = config_path.read_text("utf-8") + '\n[rules]\nbudget = "0.01s"\n'
    config_path.write_text(text, "utf-8")
    rnd = random.Random(6)
    mail = folder / "huge.eml"
    mail.write_bytes(make_mail(subject="巨大なログ", body="".join(rnd.choice("ab") for _ in range(100_000))))
    res = run_intake("ingest", str(mail))
    assert res.returncode == 0 and "quarantined" in res.stdout
    listed = json.loads(run_intake("quarantine", "list", "--json").stdout)
    assert len(listed) == 1 and "RuleTimeout" in listed[0]["error"] and "rule 'slow " in listed[0]["error"]


def test_rules_budget_is_a_checked_config_key(tmp_path):
    from intake.config import ConfigError, load_config

    path = write_config(tmp_path, '[rules]\nbudget = "soon"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    line = Path(path).read_text("utf-8").splitlines().index('budget = "soon"') + 1
    assert str(err.value) == f"{path}:{line}: rules.budget: not a duration: 'soon' (use e.g. 30m, 4h, 3d)"
