"""Routing rule evaluation cost per message with 10, 100 and 1,000 rules.

A typical mix of conditions: exact sender addresses, domain lists (with subdomain forms),
recipient addresses, subject keywords, subject and body regexes, some combined with
all/any/not, a few `continue: true` tagging rules on top. The messages are real-shaped
English and Japanese mails; most match no rule or a late one, so each evaluation walks
(nearly) the whole table and records a trace entry per rule — the expensive case.

A second table times body patterns over long bodies (the 100,000 characters a body
condition sees at most): RE2, which intake matches with since issue 15, against the
backtracking ``re`` of earlier trees. ``--tree DIR`` imports intake from another source
tree (e.g. a worktree of an earlier commit), so that both run with the same interpreter:

    .venv/bin/python bench/rules_bench.py [--tree ../main]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

_args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_args.add_argument("--tree", type=Path, help="import intake from this source tree instead of this checkout")
ARGS = _args.parse_args()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str((ARGS.tree or Path(__file__).resolve().parent.parent).resolve()))

from intake.mail.classify import classify  # noqa: E402
from intake.mail.parse import parse  # noqa: E402
from intake.rules import RuleContext, compile_rules, evaluate  # noqa: E402
from mailfactory import make_mail  # noqa: E402

WORDS = ["invoice", "refund", "password", "login", "printer", "outage", "contract", "renewal", "upgrade", "license",
         "請求", "返金", "パスワード", "ログイン", "障害", "契約", "更新", "見積", "解約", "至急"]


def rule_file(n: int, seed: int = 1) -> str:
    rnd = random.Random(seed)
    lines = ["queues:"] + [f"  q{i}: {{}}" for i in range(20)] + ["rules:"]
    for i in range(3):
        lines += [f"  - name: tag {i}", f"    when: {{subject: {{regex: '\\b{WORDS[i]}\\b|{WORDS[10 + i]}'}}}}",
                  f"    then: {{tags: [t{i}]}}", "    continue: true"]
    for i in range(n - 3):
        kind = i % 6
        q = f"q{rnd.randrange(20)}"
        if kind == 0:
            when = f"{{from: user{i}@customer{i}.example.com}}"
        elif kind == 1:
            when = f"{{from_domain: [customer{i}.co.jp, .group{i}.example.org, partner{i}.example.net]}}"
        elif kind == 2:
            when = f"{{recipient: sales{i}@example.com}}"
        elif kind == 3:
            when = f"{{subject: {{contains: '{rnd.choice(WORDS)}-{i}'}}}}"
        elif kind == 4:
            when = f"{{subject: {{regex: '(?:case|ticket)[- ]?{i}\\b|{rnd.choice(WORDS)}{i}'}}}}"
        else:
            when = (f"{{all: [{{from_domain: .region{i}.example.com}}, {{not: {{body: {{regex: 'unsubscribe{i}'}}}}}}]}}")
        lines += [f"  - name: rule {i}", f"    when: {when}", f"    then: {{queue: {q}}}"]
    return "\n".join(lines) + "\n"


def contexts() -> list[RuleContext]:
    mails = [
        make_mail(subject="Invoice for October is missing", sender="Alice <alice@customer.example.org>"),
        make_mail(subject="【至急】ログインできません", sender="山田 太郎 <taro@bigcorp.co.jp>",
                  body="いつもお世話になっております。\nログインできません。\n" * 10, charset="iso-2022-jp", cte="7bit"),
        make_mail(subject="Re: printer problem", sender="bob@shop.example.net", cc="carol@shop.example.net",
                  body="Hello,\n" + "the printer still does not print.\n" * 30),
        make_mail(subject="契約更新のお見積りについて", sender="佐藤 <sato@tokyo.group7.example.org>",
                  body="お見積りをお願いします。\n" * 5),
    ]
    now = datetime(2026, 11, 24, 1, tzinfo=timezone.utc)
    out = []
    for raw in mails:
        m = parse(raw)
        out.append(RuleContext(mail=m, classification=classify(m, own_addresses=set(), agents=set()),
                               mailbox="support@example.com", recipients=("support@example.com",), channel="email",
                               now=now, organization=m.from_.domain if m.from_ else None))
    return out


def main() -> None:
    ctxs = contexts()
    print(f"{'rules':>6} {'compile ms':>11} {'µs/msg wall':>12} {'µs/msg CPU':>11} {'rules walked':>13} "
          f"{'matched':>8}")
    for n in (10, 100, 1000):
        text = rule_file(n).encode()
        t0 = time.perf_counter()
        rs = compile_rules([("bench.yaml", text)])
        compile_ms = (time.perf_counter() - t0) * 1000
        # Warm up, then time enough evaluations for a stable figure (bounded in count).
        for c in ctxs:
            evaluate(rs, c)
        rounds = max(20, 20_000 // n)
        best_wall = best_cpu = float("inf")
        for _ in range(7):
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(rounds):
                for c in ctxs:
                    evaluate(rs, c)
            count = rounds * len(ctxs)
            best_wall = min(best_wall, (time.perf_counter() - w0) / count)
            best_cpu = min(best_cpu, (time.process_time() - c0) / count)
        walked = sum(len(evaluate(rs, c).trace) for c in ctxs) / len(ctxs)
        matched = sum(len(evaluate(rs, c).matched) for c in ctxs) / len(ctxs)
        print(f"{n:>6} {compile_ms:>11.1f} {best_wall * 1e6:>12.1f} {best_cpu * 1e6:>11.1f} {walked:>13.0f} "
              f"{matched:>8.1f}")
    print("(best of 7 runs, wall clock and process CPU time; µs/message includes building the Facts of the message and the trace;")
    print(" measured on a 2-core machine shared with other engineers' work)")
    long_bodies()


BODY_RULES = ["(?:error|failure|エラー)\\s*(?:code)?\\s*\\d{3,}", "\\b(?:invoice|請求書)\\b.*(?:overdue|至急|期限)",
              "unsubscribe|配信停止", "(?:^|[^ブ])ログ|\\blogs?\\b", "[a-z0-9._%+-]+@[a-z0-9.-]+\\.[a-z]{2,}",
              "(?:password|パスワード).{0,40}(?:reset|リセット)", "https?://[^\\s]+/(?:tickets?|cases?)/\\d+",
              "\\d{3}-\\d{4}-\\d{4}", "(?:注文|ご注文)番号[:：]?\\s*[a-z0-9-]{6,20}", "\\b(?:vpn|sso|saml)\\b"]


def long_bodies() -> None:
    """Ten body patterns over bodies of 10,000 and 100,000 characters (English log lines,
    Japanese prose), none of which matches: every pattern scans the whole body."""
    lines = ["rules:"] + [f"  - name: body {i}\n    when: {{body: {{regex: '{p}'}}}}\n    then: {{tags: [b{i}]}}"
                         for i, p in enumerate(BODY_RULES)]
    rs = compile_rules([("bench.yaml", ("\n".join(lines) + "\n").encode())])
    now = datetime(2026, 11, 24, 1, tzinfo=timezone.utc)
    print()
    print(f"{'body':>26} {'ms/msg wall':>12} {'ms/msg CPU':>11}   (10 body regexes, no match)")
    for label, unit in (("English log lines", "2026-11-20 10:00:01 worker 7 handled job 12345 in 42 ms\n"),
                        ("Japanese prose", "いつもお世話になっております。先日の件について確認いたしました。\n")):
        for size in (10_000, 100_000):
            body = (unit * (size // len(unit) + 1))[:size]
            m = parse(make_mail(subject="long body", body=body))
            ctx = RuleContext(mail=m, classification=classify(m, own_addresses=set(), agents=set()),
                              mailbox="support@example.com", recipients=("support@example.com",), channel="email",
                              now=now)
            evaluate(rs, ctx)
            best_wall = best_cpu = float("inf")
            for _ in range(5):
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(5):
                    evaluate(rs, ctx)
                best_wall = min(best_wall, (time.perf_counter() - w0) / 5)
                best_cpu = min(best_cpu, (time.process_time() - c0) / 5)
            print(f"{label + f' {size:,}':>26} {best_wall * 1e3:>12.2f} {best_cpu * 1e3:>11.2f}")
    print("(best of 5 runs of 5 evaluations; the body is normalised once per evaluation, as in processing)")


if __name__ == "__main__":
    main()
