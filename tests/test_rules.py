"""The rule language (DESIGN 6): every condition, combinator and action, the trace, and errors."""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone
from email.message import EmailMessage

import pytest

from intake.business_hours import BusinessHours
from intake.mail.classify import classify
from intake.mail.parse import parse
from intake.assignment import pick_least_open, pick_round_robin
from intake.rules import (
    Decision,
    RuleContext,
    RulesError,
    compile_rules,
    evaluate,
    load_rules,
)
from mailfactory import make_mail

TEAM = """
agents:
  hanako@example.com: {name: 山田 花子, language: ja}
  ken@example.com: {name: Ken Sato}
  away@example.com: {name: Away Person, away: true}
queues:
  support: {name: Support, agents: [hanako@example.com, ken@example.com], assign: round_robin}
  billing: {name: Billing, agents: [hanako@example.com], assign: least_open}
  tier2: {}
"""
# A Tuesday, 10:00 in Tokyo; the next day is a Wednesday; 2026-11-23 is 勤労感謝の日.
OPEN = datetime(2026, 11, 24, 1, 0, tzinfo=timezone.utc)
EVENING = datetime(2026, 11, 24, 11, 0, tzinfo=timezone.utc)  # 20:00 in Tokyo
HOLIDAY = datetime(2026, 11, 23, 1, 0, tzinfo=timezone.utc)
SATURDAY = datetime(2026, 11, 28, 1, 0, tzinfo=timezone.utc)


def ruleset(rules_yaml: str, team: str = TEAM):
    return compile_rules([("10-team.yaml", team.encode()), ("20-rules.yaml", textwrap.dedent(rules_yaml).encode())])


def ctx_for(raw: bytes, *, recipients=("support@example.com",), channel="email", now=OPEN, organization="auto",
            calendar=None) -> RuleContext:
    mail = parse(raw)
    if organization == "auto":
        organization = mail.from_.domain if mail.from_ else None
    return RuleContext(mail=mail, classification=classify(mail, own_addresses=set(), agents=set()),
                       mailbox=recipients[0] if recipients else "support@example.com", recipients=tuple(recipients),
                       channel=channel, now=now, organization=organization, calendar=calendar)


def route(when: str, raw: bytes | None = None, **ctx) -> Decision:
    """Evaluate one rule ``when: WHEN → queue: tier2`` against a mail."""
    rs = ruleset(f"rules:\n  - name: r\n    when: {when}\n    then: {{queue: tier2}}\n")
    return evaluate(rs, ctx_for(raw or make_mail(), **ctx))


def matches(when: str, raw: bytes | None = None, **ctx) -> bool:
    return route(when, raw, **ctx).queue == "tier2"


# -- conditions ----------------------------------------------------------------------------


def test_to_matches_addresses_case_insensitively_and_plus_addresses():
    raw = make_mail(to="Support Team <Support@Example.COM>, other@example.net")
    assert matches("{to: support@example.com}", raw)
    assert matches("{to: SUPPORT@example.com}", raw)
    assert matches("{to: support@example.com}", make_mail(to="support+urgent@example.com"))
    assert not matches("{to: billing@example.com}", raw)
    assert matches("{to: [billing@example.com, other@example.net]}", raw)
    assert matches("{to: {contains: '@example.net'}}", raw)
    assert matches("{to: {regex: '^other@'}}", raw)


def test_cc_looks_at_cc_only():
    raw = make_mail(to="support@example.com", cc="Boss <boss@customer.example.org>")
    assert matches("{cc: boss@customer.example.org}", raw)
    assert not matches("{cc: support@example.com}", raw)
    assert matches("{cc: {exists: true}}", raw)
    assert matches("{cc: {exists: false}}", make_mail())


def test_recipient_is_any_of_envelope_to_and_cc():
    raw = make_mail(to="support@example.com", cc="x@customer.example.org")
    assert matches("{recipient: x@customer.example.org}", raw)
    assert matches("{recipient: support@example.com}", raw)
    # Bcc'd to billing@: only the envelope names it.
    assert matches("{recipient: billing@example.com}", raw, recipients=("billing@example.com",))
    assert not matches("{to: billing@example.com}", raw, recipients=("billing@example.com",))


def test_from_matches_the_sender_address():
    raw = make_mail(sender="山田 太郎 <Taro.Yamada@BigCorp.co.jp>")
    assert matches("{from: taro.yamada@bigcorp.co.jp}", raw)
    assert matches("{from: {regex: '^taro\\.'}}", raw)
    assert not matches("{from: hanako@bigcorp.co.jp}", raw)


def test_from_domain_matches_subdomains_only_when_written_with_a_dot():
    sub = make_mail(sender="a@tokyo.bigcorp.co.jp")
    top = make_mail(sender="a@BigCorp.co.jp")
    assert matches("{from_domain: bigcorp.co.jp}", top)
    assert not matches("{from_domain: bigcorp.co.jp}", sub)
    assert matches("{from_domain: .bigcorp.co.jp}", sub)
    assert matches("{from_domain: .bigcorp.co.jp}", top)
    assert not matches("{from_domain: .bigcorp.co.jp}", make_mail(sender="a@notbigcorp.co.jp"))
    assert matches("{from_domain: [example.org, .bigcorp.co.jp]}", sub)


def test_subject_sees_normalised_text():
    raw = make_mail(subject="【ＵＲＧＥＮＴ】サーバ停止〜至急")
    assert matches("{subject: {contains: urgent}}", raw)
    assert matches("{subject: {regex: 'URGENT'}}", raw)  # case never matters
    assert matches("{subject: {contains: 停止～至急}}", raw)  # 〜 and ～ alike
    assert matches("{subject: {regex: '停止〜'}}", raw)
    assert matches("{subject: {contains: ｻｰﾊﾞ}}", raw)  # half-width katakana
    assert not matches("{subject: {contains: invoice}}", raw)
    assert matches("{subject: 'Printer does not print'}", make_mail())  # exact, any case
    assert matches("{subject: 'printer DOES not print'}", make_mail())
    assert not matches("{subject: 'printer'}", make_mail())


def test_body_conditions():
    raw = make_mail(body="お世話になっております。\nＥＲＲＯＲ ０４２ が出ます。\n", charset="iso-2022-jp", cte="7bit")
    assert matches("{body: {contains: error 042}}", raw)
    assert matches("{body: {regex: 'error \\d+'}}", raw)
    assert not matches("{body: {contains: invoice}}", raw)


def test_header_conditions():
    raw = make_mail(headers={"X-Priority": "1 (Highest)", "List-Id": "<news.example.org>"})
    assert matches("{header: {List-Id: {exists: true}}}", raw)
    assert matches("{header: {list-id: {exists: true}}}", raw)  # header names: any case
    assert matches("{header: {X-Mailer: {exists: false}}}", raw)
    assert not matches("{header: {X-Mailer: {exists: true}}}", raw)
    assert matches("{header: {X-Priority: {regex: '^1'}}}", raw)
    assert matches("{header: {X-Priority: '1 (highest)'}}", raw)
    assert not matches("{header: {X-Priority: '1'}}", raw)
    assert matches("{header: {X-Priority: {regex: '^1'}, List-Id: {contains: news}}}", raw)
    assert not matches("{header: {X-Priority: {regex: '^1'}, List-Id: {contains: sales}}}", raw)


def _with_attachment(inline: bool) -> bytes:
    msg = EmailMessage()
    msg["From"] = "a@customer.example.org"
    msg["To"] = "support@example.com"
    msg["Subject"] = "log"
    msg["Message-ID"] = f"<att-{inline}@customer.example.org>"
    msg.set_content("see attached")
    if inline:
        msg.add_alternative("<p>see <img src='cid:logo'></p>", subtype="html")
        msg.get_payload()[1].add_related(b"\x89PNG....", maintype="image", subtype="png", cid="<logo>")
    else:
        msg.add_attachment("エラーログ".encode(), maintype="text", subtype="plain", filename="ログ.txt")
    return msg.as_bytes()


def test_has_attachment_ignores_inline_images():
    assert matches("{has_attachment: true}", _with_attachment(inline=False))
    assert matches("{has_attachment: false}", _with_attachment(inline=True))
    assert matches("{has_attachment: false}", make_mail())


def test_organization_condition():
    assert matches("{organization: bigcorp.co.jp}", make_mail(sender="a@bigcorp.co.jp"))
    assert matches("{organization: {exists: false}}", make_mail(sender="a@gmail.com"), organization=None)
    assert not matches("{organization: {exists: true}}", make_mail(sender="a@gmail.com"), organization=None)


def test_language_and_channel():
    ja = make_mail(subject="請求書について", body="お世話になっております。\n")
    assert matches("{language: ja}", ja)
    assert matches("{language: [en, ja]}", ja)
    assert matches("{language: en}", make_mail())
    assert matches("{channel: web}", make_mail(), channel="web")
    assert not matches("{channel: web}", make_mail())


def test_business_hours_follow_the_configured_calendar():
    cal = BusinessHours.from_settings(time_zone="Asia/Tokyo", days=["mon", "tue", "wed", "thu", "fri"],
                                      hours=["09:00-12:00", "13:00-18:00"], holidays="JP", closed=["12-29"])
    assert matches("{business_hours: true}", now=OPEN, calendar=cal)
    assert matches("{business_hours: false}", now=EVENING, calendar=cal)
    assert matches("{business_hours: false}", now=HOLIDAY, calendar=cal)  # 勤労感謝の日
    assert matches("{business_hours: false}", now=SATURDAY, calendar=cal)
    lunch = datetime(2026, 11, 24, 3, 30, tzinfo=timezone.utc)  # 12:30 JST
    assert matches("{business_hours: false}", now=lunch, calendar=cal)
    year_end = datetime(2027, 12, 29, 1, 0, tzinfo=timezone.utc)  # a Wednesday, closed every year
    assert matches("{business_hours: false}", now=year_end, calendar=cal)
    # Another zone: 10:00 in New York is open there.
    ny = BusinessHours.from_settings(time_zone="America/New_York", days=["mon", "tue", "wed", "thu", "fri"],
                                     hours=["09:00-17:00"], holidays="", closed=[])
    assert matches("{business_hours: true}", now=datetime(2026, 11, 24, 15, 0, tzinfo=timezone.utc), calendar=ny)


# -- combinators ---------------------------------------------------------------------------


def test_all_any_not_and_implicit_all():
    raw = make_mail(sender="a@bigcorp.co.jp", subject="至急: 請求書")
    assert matches("{all: [{from_domain: bigcorp.co.jp}, {subject: {contains: 至急}}]}", raw)
    assert not matches("{all: [{from_domain: bigcorp.co.jp}, {subject: {contains: urgent}}]}", raw)
    assert matches("{any: [{from_domain: example.org}, {subject: {contains: 請求}}]}", raw)
    assert not matches("{any: [{from_domain: example.org}, {subject: {contains: invoice}}]}", raw)
    assert matches("{not: {from_domain: example.org}}", raw)
    assert not matches("{not: {from_domain: bigcorp.co.jp}}", raw)
    # Several conditions in one mapping must all hold.
    assert matches("{from_domain: bigcorp.co.jp, subject: {contains: 至急}}", raw)
    assert not matches("{from_domain: bigcorp.co.jp, subject: {contains: urgent}}", raw)
    # Nesting.
    assert matches("{any: [{all: [{language: ja}, {not: {channel: web}}]}, {channel: phone}]}", raw)
    assert matches("{any: [{language: en, channel: email}, {from_domain: bigcorp.co.jp, language: ja}]}", raw)


# -- actions, order, trace -----------------------------------------------------------------


def test_every_action_lands_in_the_decision():
    rs = ruleset("""
        rules:
          - name: everything
            when: {from_domain: bigcorp.co.jp}
            then: {queue: billing, priority: high, category: billing, assign: ken@example.com,
                   tags: [vip, 請求], language: JA, ack: ack_key_account}
    """)
    d = evaluate(rs, ctx_for(make_mail(sender="a@bigcorp.co.jp")))
    assert (d.queue, d.priority, d.category, d.assign, d.tags, d.language, d.ack, d.drop) == (
        "billing", "high", "billing", "ken@example.com", ("vip", "請求"), "ja", "ack_key_account", False)
    assert d.set_by["assign"] == "everything"


def test_ack_false_drop_and_single_tag():
    rs = ruleset("""
        rules:
          - name: no ack
            when: {from_domain: example.com}
            then: {ack: false, tags: internal}
            continue: true
          - name: drop news
            when: {from: {regex: '^news@'}}
            then: {drop: true}
            continue: true
          - name: never reached after a drop
            then: {queue: tier2}
    """)
    d = evaluate(rs, ctx_for(make_mail(sender="news@example.com")))
    assert d.ack is False and d.tags == ("internal",) and d.drop is True
    assert d.queue is None
    assert [t["rule"] for t in d.trace] == ["no ack", "drop news"]


def test_first_match_stops_continue_adds_and_earlier_choices_are_kept():
    rs = ruleset("""
        rules:
          - name: urgent
            when: {subject: {regex: 'urgent|至急'}}
            then: {priority: urgent, tags: [urgent]}
            continue: true
          - name: key account
            when: {from_domain: bigcorp.co.jp}
            then: {priority: high, tags: [key-account, urgent], queue: tier2}
            continue: true
          - name: billing
            when: {subject: {contains: 請求}}
            then: {queue: billing, category: billing}
          - name: later
            then: {category: other}
    """)
    d = evaluate(rs, ctx_for(make_mail(sender="a@bigcorp.co.jp", subject="至急 請求書")))
    assert d.priority == "urgent" and d.queue == "tier2" and d.category == "billing"
    assert d.tags == ("urgent", "key-account")
    assert d.matched == ["urgent", "key account", "billing"]
    billing = d.trace[2]
    assert billing["set"] == {"category": "billing"} and billing["kept"] == ["queue"] and billing["continue"] is False
    assert d.trace[1]["kept"] == ["priority"]
    assert "later" not in [t["rule"] for t in d.trace]  # not evaluated after the stop


def test_trace_records_each_evaluated_rule_with_the_first_failing_condition():
    rs = ruleset("""
        rules:
          - name: billing address
            when:
              from_domain: bigcorp.co.jp
              to: billing@example.com
            then: {queue: billing}
          - name: disabled
            enabled: false
            then: {queue: tier2}
          - name: nested
            when:
              all:
                - language: en
                - subject: {contains: invoice}
            then: {queue: tier2}
          - name: catch all
            then: {category: general}
    """)
    d = evaluate(rs, ctx_for(make_mail(sender="a@bigcorp.co.jp", subject="Printer")))
    assert [t["rule"] for t in d.trace] == ["billing address", "nested", "catch all"]
    first, nested, last = d.trace
    assert first["matched"] is False and first["failed"] == 'to: "billing@example.com"'
    assert first["at"] == "20-rules.yaml:6"
    assert nested["failed"].startswith("all: [") and nested["at"] == "20-rules.yaml:13"
    from intake.rules.facts import Facts
    from intake.rules.explain import rule_results

    ctx = ctx_for(make_mail(sender="a@bigcorp.co.jp", subject="Printer"))
    explained = {r["rule"]: r for r in rule_results(rs, d, ctx)}
    assert explained["nested"]["failed"] == 'all → subject: {"contains": "invoice"}'
    assert explained["disabled"]["result"] == "disabled"
    assert Facts(ctx).subject_s == "printer"
    assert last == {"rule": "catch all", "matched": True, "at": "20-rules.yaml:17", "set": {"category": "general"},
                    "continue": False}


def test_assignment_pickers_skip_unavailable_agents():
    order = ["a", "b", "c"]
    assert pick_round_robin(order, order, None) == "a"
    assert pick_round_robin(order, order, "a") == "b"
    assert pick_round_robin(order, order, "c") == "a"
    assert pick_round_robin(order, ["a", "c"], "a") == "c"  # b is away
    assert pick_round_robin(order, ["a", "c"], "b") == "c"  # last was b, now away
    assert pick_round_robin(order, [], "a") is None
    assert pick_least_open(order, order, {"a": 3, "b": 1, "c": 1}) == "b"
    assert pick_least_open(order, ["a", "c"], {"a": 3, "b": 0, "c": 1}) == "c"


def test_shipped_example_loads_and_routes(tmp_path):
    from conftest import ROOT

    rs = load_rules(ROOT / "intake" / "shipped" / "routing_rules")
    assert {"support", "support-us", "support-emea", "tier2", "billing", "key-accounts"} <= set(rs.team.queues)
    assert rs.team.agents["sophie@example.com"].away
    d = evaluate(rs, ctx_for(make_mail(sender="山田 <taro@bigcorp.co.jp>", subject="【至急】サーバーが停止しています")))
    assert d.priority == "urgent" and d.queue == "key-accounts" and d.assign == "kenji@example.com"
    assert set(d.tags) == {"urgent", "key-account"}
    d = evaluate(rs, ctx_for(make_mail(sender="hans@firma.de", subject="Printer broken"), now=OPEN))
    assert d.queue == "support-emea"
    d = evaluate(rs, ctx_for(make_mail(sender="bob@acme-corp.com", subject="Printer broken"), now=EVENING))
    assert d.queue == "support-us"
    d = evaluate(rs, ctx_for(make_mail(sender="bob@acme-corp.com", subject="Printer broken"), now=OPEN))
    assert d.queue is None  # the mailbox default applies
    d = evaluate(rs, ctx_for(make_mail(sender="a@shop.example.jp", subject="請求書の再発行"),
                             recipients=("support@example.com",)))
    assert (d.queue, d.category) == ("billing", "billing")
    d = evaluate(rs, ctx_for(make_mail(sender="news@vendor.example.net", subject="11月のメルマガ")))
    assert d.drop


# -- errors ----------------------------------------------------------------------------------


def errors_of(rules_yaml: str, team: str = TEAM) -> list[str]:
    with pytest.raises(RulesError) as exc:
        ruleset(rules_yaml, team)
    return exc.value.errors


@pytest.mark.parametrize("rules_yaml, expected", [
    ("rules:\n  - name: a\n    when: {form: x@example.com}\n    then: {queue: support}\n",
     "20-rules.yaml:3: rule 'a': unknown condition 'form' (did you mean 'from'?)"),
    ("rules:\n  - name: a\n    when: {from: x@example.com}\n    then: {queue: suport}\n",
     "20-rules.yaml:4: rule 'a': queue: unknown queue 'suport' (did you mean 'support'?)"),
    ("rules:\n  - name: a\n    then: {priorty: high}\n",
     "20-rules.yaml:3: rule 'a': unknown action 'priorty' (did you mean 'priority'?)"),
    ("rules:\n  - name: a\n    then: {priority: hihg}\n",
     "20-rules.yaml:3: rule 'a': priority: must be one of low, medium, high, urgent, not 'hihg' (did you mean 'high'?)"),
    ("rules:\n  - name: a\n    then: {assign: kenn@example.com}\n",
     "20-rules.yaml:3: rule 'a': assign: unknown agent 'kenn@example.com' (did you mean 'ken@example.com'?)"),
    ("rules:\n  - name: a\n    when:\n      subject: {regex: '(unclosed'}\n    then: {}\n",
     "20-rules.yaml:4: rule 'a': subject: bad regex '(unclosed'"),
    ("rules:\n  - name: a\n    then: {}\n  - name: a\n    then: {}\n",
     "20-rules.yaml:4: duplicate rule name 'a' (first at 20-rules.yaml:2)"),
    ("rules:\n  - name: a\n    when: {has_attachment: 'yes'}\n    then: {}\n",
     "20-rules.yaml:3: rule 'a': has_attachment: expected true or false, got text"),
    ("rules:\n  - name: a\n    when: {language: no}\n    then: {}\n",
     "20-rules.yaml:3: rule 'a': language: expected text, got a boolean"),
    ("rules:\n  - name: a\n    when: {subject: {contians: x}}\n    then: {}\n",
     "20-rules.yaml:3: rule 'a': subject: unknown operator 'contians' (did you mean 'contains'?)"),
    ("rules:\n  - name: a\n    when: {to: support}\n    then: {}\n",
     "20-rules.yaml:3: rule 'a': to: 'support' is not a mail address"),
    ("rules:\n  - name: a\n    queue: billing\n    then: {}\n",
     "20-rules.yaml:3: rule 'a': unknown key 'queue' ('queue' goes under then:)"),
    ("rules:\n  - name: a\n    continue: maybe\n    then: {}\n",
     "20-rules.yaml:3: rule 'a': continue: expected true or false, got text"),
    ("rules:\n  - name: a\n    when: {from: a@b.c}\n    when: {from: a@b.c}\n    then: {}\n",
     "20-rules.yaml:4: duplicate key 'when' (first at line 3)"),
    ("rules:\n  - name: a\n    when: {any: {from: a@b.c}}\n    then: {}\n",
     "20-rules.yaml:3: rule 'a': any: expected a list of conditions"),
    ("rules:\n  - name: a\n    when: {from: a@b.c\n    then: {}\n", "20-rules.yaml:4: "),
    ("rulez: []\n", "20-rules.yaml:1: unknown section 'rulez' (did you mean 'rules'?)"),
    ("rules:\n  - when: {from: a@b.c}\n    then: {}\n", "20-rules.yaml:2: a rule needs a name:"),
    ("rules:\n  - name: a\n    when: {from: a@b.c}\n", "20-rules.yaml:2: rule 'a': needs then:"),
])
def test_errors_are_located_and_suggest(rules_yaml, expected):
    errors = errors_of(rules_yaml)
    assert any(e.startswith(expected) for e in errors), errors


def test_team_errors_unknown_agent_in_queue_bad_assign_and_duplicates():
    team = """
    agents:
      ken@example.com: {name: Ken, awya: true}
    queues:
      support: {agents: [ken@example.com, hanako@example.com], assign: robin}
      tier2: {sla: {first_response: 4 hours}, escalate_to: tier3}
    """
    errors = errors_of("rules: []\n", textwrap.dedent(team))
    text = "\n".join(errors)
    assert "10-team.yaml:3: agent ken@example.com: unknown key 'awya' (did you mean 'away'?)" in text
    assert "10-team.yaml:5: queue support: assign must be one of round_robin, least_open, none, not 'robin'" in text
    assert "10-team.yaml:5: queue support: unknown agent 'hanako@example.com'" in text
    assert "10-team.yaml:6: queue tier2: sla first_response: not a duration: '4 hours'" in text
    assert "10-team.yaml:6: queue tier2: escalate_to: unknown queue 'tier3' (did you mean 'tier2'?)" in text
    # Errors come in file and line order.
    assert errors == sorted(errors, key=lambda e: int(e.split(":")[1]))


def test_a_queue_or_agent_defined_twice_across_files():
    with pytest.raises(RulesError) as exc:
        compile_rules([("10-a.yaml", b"queues:\n  support: {}\n"), ("20-b.yaml", b"\nqueues:\n  support: {}\n")])
    assert str(exc.value) == "20-b.yaml:3: queue 'support' is already defined at 10-a.yaml:2"


def test_not_utf8_and_not_a_mapping():
    with pytest.raises(RulesError) as exc:
        compile_rules([("a.yaml", "rules: []\n# 日本語\n".encode("cp932"))])
    assert str(exc.value).startswith("a.yaml:2: not UTF-8 text")
    with pytest.raises(RulesError) as exc:
        compile_rules([("a.yaml", b"- just\n- a list\n")])
    assert str(exc.value).startswith("a.yaml:1: expected a mapping")


def test_missing_folder_is_an_empty_set_and_files_load_in_name_order(tmp_path):
    assert load_rules(tmp_path / "nothing").rules == ()
    (tmp_path / "20-b.yaml").write_text("rules:\n  - name: second\n    then: {queue: support}\n", "utf-8")
    (tmp_path / "10-a.yaml").write_text("queues: {support: {}}\nrules:\n  - name: first\n    then: {}\n", "utf-8")
    (tmp_path / "notes.txt").write_text("not a rule file", "utf-8")
    rs = load_rules(tmp_path)
    assert [r.name for r in rs.rules] == ["first", "second"]
    assert len(rs.files) == 2


def test_yaml_anchors_in_x_keys_can_be_reused():
    rs = ruleset("""
        x-urgent: &urgent {priority: urgent, tags: [urgent]}
        rules:
          - name: outage
            when: {subject: {contains: down}}
            then: {<<: *urgent, queue: tier2}
    """)
    d = evaluate(rs, ctx_for(make_mail(subject="Server down")))
    assert (d.priority, d.tags, d.queue) == ("urgent", ("urgent",), "tier2")
