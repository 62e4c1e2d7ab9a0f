"""Reply stripping: exact-match rates of intake beside two libraries, and intake's speed.

Run: .venv/bin/pip install -e '.[bench]' && .venv/bin/python bench/quotes_bench.py [ROUNDS]

For each set of cases (the Discourse and GitHub trimming corpora in ``tests/corpus/`` and
the hand-written samples in ``tests/replies/``) it prints the share of cases whose result
equals the expected text after stripping white space at both ends, for intake's
``reply_text`` and for ``email-reply-parser`` and ``mail-parser-reply`` on the same cases,
and the time per message of each. The libraries read plain text only: an HTML-only case
is given to them as ``html_to_text(html)``, the text intake itself would see. A library
that is not installed is named as such, and its columns stay empty.

Times are CPU time of this process (less disturbed than wall clock by the other users of a
shared machine), the median of ROUNDS passes (default 20) over every case of the set,
scored or not, divided by the number of cases.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from intake.mail.parse import html_to_text  # noqa: E402
from intake.mail.quotes import reply_text  # noqa: E402
from reply_cases import SETS, ReplyCase, exact, load  # noqa: E402

Stripper = Callable[[ReplyCase], str]


def _plain(case: ReplyCase) -> str:
    return case.text if case.text.strip() or not case.html else html_to_text(case.html)


def _intake(case: ReplyCase) -> str:
    return reply_text(case.text, case.html)


def _libraries() -> dict[str, Stripper | str]:
    """Library name → stripper, or the reason it cannot run."""
    libs: dict[str, Stripper | str] = {}
    try:
        from email_reply_parser import EmailReplyParser as Erp
    except ImportError:
        libs["email-reply-parser"] = "not installed (pip install -e '.[bench]')"
    else:
        libs["email-reply-parser"] = lambda case: Erp.parse_reply(_plain(case))
    try:
        from mailparser_reply import EmailReplyParser as Mpr
        from mailparser_reply.constants import MAIL_LANGUAGES
    except ImportError:
        libs["mail-parser-reply"] = "not installed (pip install -e '.[bench]')"
    else:
        # Every language it knows, Japanese included, and the latest reply's ``body``
        # (without header, signature and disclaimer): its best showing on these sets,
        # better than ``parse_reply``, which keeps signatures.
        parser = Mpr(languages=list(MAIL_LANGUAGES))

        def latest_body(case: ReplyCase) -> str:
            replies = parser.read(_plain(case)).replies
            return replies[0].body if replies else ""

        libs["mail-parser-reply"] = latest_body
    return libs


def _score(strip: Stripper, cases: list[ReplyCase]) -> tuple[int, int, int]:
    """(exact, scored, errors) over the cases that carry an expectation."""
    ok = errors = 0
    scored = [c for c in cases if c.scored]
    for case in scored:
        try:
            got = strip(case)
        except Exception:  # noqa: BLE001 - a library crash is a miss, not the end of the run
            errors += 1
            continue
        ok += exact(got, case.expected or "")
    return ok, len(scored), errors


def _time_per_message(strip: Stripper, cases: list[ReplyCase], rounds: int) -> float:
    """Median CPU microseconds per message over ``rounds`` passes."""
    runs = []
    for _ in range(rounds):
        start = time.process_time()
        for case in cases:
            try:
                strip(case)
            except Exception:  # noqa: BLE001 - timed like the others
                pass
        runs.append((time.process_time() - start) / len(cases))
    return statistics.median(runs) * 1e6


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    strippers: dict[str, Stripper | str] = {"intake": _intake, **_libraries()}
    for name, why in strippers.items():
        if isinstance(why, str):
            print(f"{name}: {why}")
    print(f"\n{'set':<10} {'stripper':<20} {'exact':>14} {'errors':>7} {'CPU µs/msg':>11}")
    for set_name in SETS:
        cases = load(set_name)
        for name, strip in strippers.items():
            if isinstance(strip, str):
                print(f"{set_name:<10} {name:<20} {'not installed':>14}")
                continue
            ok, scored, errors = _score(strip, cases)
            us = _time_per_message(strip, cases, rounds)
            share = f"{ok}/{scored} {ok / scored:6.1%}"
            print(f"{set_name:<10} {name:<20} {share:>14} {errors:>7} {us:>11.0f}")
        html = [c for c in cases if c.html]
        if html:
            # The HTML path costs one html_to_text on top of the cut: shown on its own.
            us = _time_per_message(_intake, html, rounds)
            print(f"{set_name:<10} {'intake, HTML mails':<20} {len(html):>8} mails {'':>7} {us:>11.0f}")
    target = "target: intake at least 90 % exact on each set"
    print(f"\n{target}; {rounds} rounds; CPU time per message over all cases of the set")


if __name__ == "__main__":
    main()
