"""Property tests: any rule file either loads or is refused with located errors, never a traceback."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from intake.mail.classify import classify
from intake.mail.parse import parse
from intake.rules import ACTIONS, CONDITIONS, OPERATORS, RuleContext, RulesError, compile_rules, evaluate
from mailfactory import make_mail

LOCATED = re.compile(r"^[^\n]+\.yaml:\d+: \S[^\n]*$")
TEAM = (ROOT / "intake" / "shipped" / "routing_rules" / "10-team.yaml").read_bytes()
SHIPPED = (ROOT / "intake" / "shipped" / "routing_rules" / "20-routing.yaml").read_text("utf-8")
MAILS = [
    make_mail(),
    make_mail(sender="山田 <taro@bigcorp.co.jp>", subject="【ＵＲＧＥＮＴ】請求書〜", to="billing@example.com",
              headers={"X-Priority": "1"}, body="ログを添付します\n"),
    make_mail(sender="news@vendor.example.net", headers={"List-Id": "<x.example.net>"}, cc="a@b.example"),
]
CONTEXTS = [
    RuleContext(mail=(m := parse(raw)), classification=classify(m, own_addresses=set(), agents=set()),
                mailbox="support@example.com", recipients=("support@example.com",), channel="email",
                now=datetime(2026, 11, 24, 1, tzinfo=timezone.utc), organization=m.from_.domain if m.from_ else None)
    for raw in MAILS
]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(files: list[tuple[str, bytes]]) -> None:
    """The property: a rule set loads (and evaluates) or fails with only located errors."""
    try:
        rs = compile_rules(files)
    except RulesError as exc:
        assert exc.errors, "a RulesError names at least one error"
        for line in exc.errors:
            assert LOCATED.match(line), line
        return
    for ctx in CONTEXTS:
        evaluate(rs, ctx)


@SETTINGS
@given(st.text(max_size=400))
def test_any_text_loads_or_fails_located(text):
    check([("10-team.yaml", TEAM), ("20-x.yaml", text.encode("utf-8", "surrogatepass"))])


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_load_or_fail_located(data):
    check([("20-x.yaml", data)])


@SETTINGS
@given(st.data())
def test_edits_of_the_shipped_rules_load_or_fail_located(data):
    text = SHIPPED
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        how = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        piece = data.draw(st.sampled_from([":", " ", "\n", "-", "{", "}", "[", "'", '"', "a", "yes", "(", "\t",
                                           "  - name: x\n", "*a", "&a ", "!!binary ", "ルール"]))
        if how == "delete":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 20)):]
        elif how == "insert":
            text = text[:pos] + piece + text[pos:]
        else:
            text = text[:pos] + piece + text[pos + len(piece):]
    check([("10-team.yaml", TEAM), ("20-routing.yaml", text.encode())])


KEYS = st.sampled_from([*CONDITIONS, *ACTIONS, *OPERATORS, "name", "when", "then", "continue", "enabled",
                        "description", "form", "queu", "List-Id", "X-Priority", "agents", "queues", "rules"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["support", "billing", "tier2", "nope", "ken@example.com", "hanako@example.com", "x@y",
                     ".example.com", "bigcorp.co.jp", "round_robin", "least_open", "urgent", "hihg", "ja",
                     "(unclosed", "[a-", "(?i)至急|urgent", "4h", "ＵＲＧＥＮＴ", "", " "]),
    st.text(max_size=12),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=25)
RULE = st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["a", "b", "c"]), SCALARS)},
                             optional={"when": st.dictionaries(KEYS, VALUES, max_size=3),
                                       "then": st.dictionaries(KEYS, VALUES, max_size=3),
                                       "continue": SCALARS})
DOC = st.fixed_dictionaries({}, optional={"rules": st.one_of(st.lists(RULE, max_size=5), VALUES),
                                          "queues": st.one_of(st.dictionaries(st.sampled_from(
                                              ["support", "tier2", "bad name"]), VALUES, max_size=3), VALUES),
                                          "agents": st.one_of(st.dictionaries(st.sampled_from(
                                              ["ken@example.com", "a@b.example", "not-an-address"]), VALUES,
                                              max_size=3), VALUES)})


@SETTINGS
@given(DOC, st.booleans())
def test_random_rule_structures_load_or_fail_located(doc, flow):
    text = yaml.safe_dump(doc, allow_unicode=True, default_flow_style=flow, sort_keys=False)
    check([("10-team.yaml", TEAM), ("20-random.yaml", text.encode())])


def test_hostile_yaml_is_refused_with_a_location():
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    for text in [laughs, "rules: " + "[" * 5000, "a: !!python/object:os.system x\n", "rules: &r [*r]\n",
                 "a: 2024-02-30\n", "--- {}\n--- {}\n"]:
        try:
            compile_rules([("x.yaml", text.encode())])
        except RulesError as exc:
            assert all(LOCATED.match(e) for e in exc.errors), exc.errors
        else:
            raise AssertionError(f"accepted: {text[:40]!r}")


def test_an_error_about_a_name_with_a_newline_stays_one_located_line():
    """Found by the property above: a quoted name spanning lines made a two-line error."""
    check([("10-team.yaml", TEAM), ("20-random.yaml", b"rules:\n- name: '0\n\n    '\n")])
