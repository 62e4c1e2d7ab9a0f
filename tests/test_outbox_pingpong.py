"""Two systems answering each other: intake and an autoresponder, through `intake ingest` and `tick`.

The autoresponder answers every mail intake delivers to it. Each scenario must end by
itself after a bounded number of mails.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from conftest import SIMPLE_TEAM
from conftest import write_config as _write_config

from conftest import intake_env
from mailfactory import make_mail


@pytest.fixture
def config_path(tmp_path):
    """These tests are about who gets which mail: a team without automatic assignment."""
    return _write_config(tmp_path, team=SIMPLE_TEAM)

ROBOT = "robot@autoresponder.example"
MAX_ROUNDS = 12


def _robot_reply(eml: bytes, n: int, mode: str) -> bytes:
    m = message_from_bytes(eml, policy=policy.default)
    if mode == "threaded":
        # A naive out-of-office: answers in the thread (signed Reply-To, In-Reply-To), no RFC 3834 headers.
        to = m["Reply-To"].addresses[0].addr_spec
        return make_mail(subject=f"Re: {m['Subject']}", sender=f"Robot <{ROBOT}>", to=to,
                         body="I am out of the office until Monday.\n",
                         headers={"In-Reply-To": m["Message-ID"], "References": m["Message-ID"]})
    # A badly written bot: a new thread every time, written to support@ directly.
    return make_mail(subject=f"Automatic notice {n}", sender=f"Robot <{ROBOT}>", to="support@example.com",
                     body="Your message was received by our robot.\n")


def _new_mail_to(folder: Path, seen: set[str], address: str) -> list[Path]:
    out = []
    for p in sorted(folder.glob("*.eml")):
        if p.name in seen:
            continue
        seen.add(p.name)
        m = message_from_bytes(p.read_bytes(), policy=policy.default)
        if address in [a.addr_spec for a in m["To"].addresses]:
            out.append(p)
    return out


@pytest.mark.parametrize("mode,bound", [("threaded", 2), ("fresh", 5)])
def test_autoresponder_ping_pong_ends_after_a_bounded_number_of_mails(run_intake, tmp_path, mode, bound):
    first = tmp_path / "first.eml"
    first.write_bytes(make_mail(subject="Invoice question", sender=f"Robot Owner <{ROBOT}>",
                                body="Please send the invoice again.\n"))
    assert run_intake("ingest", str(first)).returncode == 0
    outbox, seen, to_robot = tmp_path / "outbox", set(), 0
    for round_ in range(1, MAX_ROUNDS + 1):
        run_intake("tick", check=True)
        new = _new_mail_to(outbox, seen, ROBOT)
        if not new:
            break
        to_robot += len(new)
        replies = []
        for i, p in enumerate(new):
            f = tmp_path / f"robot-{round_}-{i}.eml"
            f.write_bytes(_robot_reply(p.read_bytes(), round_, mode))
            replies.append(str(f))
        res = run_intake("ingest", *replies)
        assert res.returncode == 0, res.stderr
    else:
        pytest.fail(f"the mail loop did not end within {MAX_ROUNDS} rounds ({to_robot} mails to the robot)")
    assert 1 <= to_robot <= bound
    if mode == "fresh":
        # Every robot mail still became a case (nothing lost); the acknowledgements were limited.
        import json

        cases = json.loads(run_intake("cases", "list", "--json", check=True).stdout)
        assert len(cases) == to_robot + 1
        last = json.loads(run_intake("cases", "show", cases[-1]["number"], "--json", check=True).stdout)
        assert any(e["type"] == "mail_skipped" and e["check"] == "ack-rate" for e in last["timeline"])


def test_two_intake_installations_do_not_answer_each_other(run_intake, tmp_path):
    """Our acknowledgement reaches another helpdesk running intake: it opens no case and sends nothing."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "intake.toml").write_text(textwrap.dedent(f"""
        [database]
        url = "sqlite:///{other / 'intake.db'}"
        [smtp]
        listen = ""
        [[mailbox]]
        address = "help@other.example"
        queue = "support"
        [outbound]
        path = "{other / 'outbox'}"
        installation = "other.example"
    """), "utf-8")
    first = tmp_path / "first.eml"
    first.write_bytes(make_mail(subject="Partner question", sender="Other Helpdesk <help@other.example>"))
    assert run_intake("ingest", str(first)).returncode == 0
    run_intake("tick", check=True)
    [ack] = [p for p in (tmp_path / "outbox").glob("*-ack.eml")]

    def other_intake(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "intake", "--config", str(other / "intake.toml"), *args],
                              capture_output=True, text=True, env=intake_env(), timeout=60)

    res = other_intake("ingest", "--mailbox", "help@other.example", str(ack))
    assert res.returncode == 0 and "dropped" in res.stdout and "automated" in res.stdout
    assert other_intake("tick").returncode == 0
    assert not (other / "outbox").exists() or list((other / "outbox").glob("*.eml")) == []
