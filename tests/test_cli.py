"""The command line as a newcomer and an admin meet it: where the database is, broken rules,
options after the command, exit codes."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from conftest import run_cli, write_config
from mailfactory import make_mail


def _eml(folder: Path, raw: bytes, name: str = "m.eml") -> str:
    path = folder / name
    path.write_bytes(raw)
    return str(path)


def test_reading_in_the_wrong_folder_says_there_is_no_database_and_creates_none(tmp_path):
    for args in (["cases", "list"], ["cases", "show", "CASE-1"], ["messages", "list"], ["outbox", "list"],
                 ["quarantine", "list"], ["status"], ["rules", "stats"], ["tick"]):
        res = run_cli(args, cwd=tmp_path)
        assert res.returncode == 1, args
        assert ("no database at ./intake.db: run intake serve, intake ingest or intake db upgrade first, "
                "or pass --config") in res.stderr, args
    assert list(tmp_path.iterdir()) == []  # nothing was made


def test_only_serve_ingest_and_db_upgrade_make_the_database(tmp_path):
    res = run_cli(["ingest", _eml(tmp_path, make_mail(subject="Hello"))], cwd=tmp_path)
    assert res.returncode == 0 and (tmp_path / "intake.db").exists()
    listed = json.loads(run_cli(["cases", "list", "--json"], cwd=tmp_path).stdout)
    assert [c["subject"] for c in listed] == ["Hello"]
    other = tmp_path / "other"
    other.mkdir()
    res = run_cli(["db", "upgrade"], cwd=other)
    assert res.returncode == 0 and "database at revision" in res.stdout and (other / "intake.db").exists()
    assert json.loads(run_cli(["cases", "list", "--json"], cwd=other).stdout) == []


def test_config_is_accepted_before_and_after_the_command(tmp_path):
    cfg = write_config(tmp_path)
    run_cli(["--config", str(cfg), "ingest", _eml(tmp_path, make_mail(subject="Where am I"))], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = run_cli(["--config", str(cfg), "cases", "list", "--json"], cwd=elsewhere)
    after = run_cli(["cases", "list", "--json", "--config", str(cfg)], cwd=elsewhere)
    assert before.returncode == after.returncode == 0
    assert [c["subject"] for c in json.loads(before.stdout)] == ["Where am I"]
    assert json.loads(before.stdout) == json.loads(after.stdout)
    # A bad file named after the command is refused with its name and reason.
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nlisten = 25\n", "utf-8")
    res = run_cli(["status", "--config", str(bad)], cwd=elsewhere)
    assert res.returncode == 1 and f"{bad}:2: smtp.listen: expected str, got int" in res.stderr


def test_serve_refuses_a_listen_address_that_is_not_host_and_port(tmp_path):
    res = run_cli(["serve", "--smtp-listen", "localhost"], cwd=tmp_path)
    assert res.returncode == 64 and "--smtp-listen: expected host:port" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_diagnostics_work_while_the_rules_are_broken_and_say_so_in_one_line(tmp_path):
    cfg = write_config(tmp_path)
    run_cli(["--config", str(cfg), "ingest", _eml(tmp_path, make_mail(subject="Before the typo"))], cwd=tmp_path)
    (tmp_path / "routing_rules" / "20-typo.yaml").write_text("rules:\n  - name: x\n    when: {form: a@b.c}\n"
                                                             "    then: {queue: support}\n", "utf-8")
    stored = run_cli(["--config", str(cfg), "ingest", _eml(tmp_path, make_mail(subject="After the typo"), "2.eml")],
                     cwd=tmp_path)
    assert stored.returncode == 0 and "processing deferred" in stored.stdout

    def run(*args: str):
        return run_cli(["--config", str(cfg), *args], cwd=tmp_path)

    listed = run("messages", "list", "--json")
    assert listed.returncode == 0
    assert [m["state"] for m in json.loads(listed.stdout)] == ["processed", "received"]
    for args in (["cases", "list"], ["outbox", "list"], ["quarantine", "list"], ["cases", "show", "CASE-1"],
                 ["messages", "show", "2"]):
        res = run(*args)
        assert res.returncode == 0, args
        # No serve ran: ingest recorded the refusal, and every reader says so in one line.
        warned = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
        assert len(warned) == 1 and "20-typo.yaml:3: rule 'x': unknown condition 'form'" in warned[0], args
    parsed = run("parse", str(tmp_path / "2.eml"))
    assert parsed.returncode == 0 and "After the typo" in parsed.stdout
    warning = [line for line in parsed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "20-typo.yaml:3: rule 'x': unknown condition 'form'" in warning[0]
    ticked = run("tick")
    assert ticked.returncode == 0
    assert "process-received: waiting: the rule files are refused" in ticked.stdout
    assert [line for line in ticked.stderr.splitlines() if line.startswith("warning:")] == [
        "warning: the routing rules are refused (intake rules check shows every error): "
        f"{Path('routing_rules') / '20-typo.yaml'}:3: rule 'x': unknown condition 'form' (did you mean 'from'?)"]
    status = {s["name"]: s for s in json.loads(run("status", "--json").stdout)}
    assert status["rules"]["state"] == "refused" and "unknown condition 'form'" in status["rules"]["last_error"]
    # Fixed: the waiting message is processed by the next tick.
    (tmp_path / "routing_rules" / "20-typo.yaml").unlink()
    assert "1 received message(s) processed" in run("tick").stdout
    assert "warning:" not in run("cases", "list").stderr
    # Broken again after the last recorded look: the readers look at the files themselves.
    typo = tmp_path / "routing_rules" / "30-typo.yaml"
    typo.write_text("rules:\n  - name: y\n    when: {subjct: a}\n    then: {queue: support}\n", "utf-8")
    later = datetime.now().timestamp() + 5  # newer than the state tick recorded, whatever the clock's grain
    os.utime(typo, (later, later))
    warned = [line for line in run("cases", "list").stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "30-typo.yaml:3: rule 'y'" in warned[0]
    assert [c["subject"] for c in json.loads(run("cases", "list", "--json").stdout)] == ["Before the typo",
                                                                                        "After the typo"]


def test_a_bad_status_is_a_usage_error(tmp_path):
    cfg = write_config(tmp_path)
    run_cli(["--config", str(cfg), "db", "upgrade"], cwd=tmp_path)
    res = run_cli(["--config", str(cfg), "cases", "list", "--status", "bogus"], cwd=tmp_path)
    assert res.returncode == 64 and "'bogus' is not one of" in res.stderr


def test_the_real_entry_point_keeps_the_mta_exit_codes(tmp_path):
    res = run_cli(["ingest", str(tmp_path / "missing.eml")], cwd=tmp_path, in_process=False)
    assert res.returncode == 64 and "no such file" in res.stderr
    res = run_cli(["ingest", "--mailbox", "nobody@example.com", _eml(tmp_path, make_mail())], cwd=tmp_path,
                  in_process=False)
    assert res.returncode == 64 and "is not one of our mailboxes" in res.stderr


def test_the_table_shows_a_page_of_the_newest_cases_and_says_how_many_there_are(tmp_path):
    for n in range(3):
        run_cli(["ingest", _eml(tmp_path, make_mail(subject=f"case {n}"), f"{n}.eml")], cwd=tmp_path)
    page = run_cli(["cases", "list", "--limit", "2"], cwd=tmp_path).stdout.splitlines()
    assert [line.split()[0] for line in page[2:-1]] == ["CASE-2", "CASE-3"]
    assert page[-1] == "2 of 3 case(s), the newest; --limit N or --all for more"
    assert run_cli(["cases", "list"], cwd=tmp_path).stdout.splitlines()[-1] == "3 case(s)"
    assert len(json.loads(run_cli(["cases", "list", "--json", "--limit", "2"], cwd=tmp_path).stdout)) == 2


def test_control_and_direction_characters_never_reach_the_terminal(tmp_path):
    # A subject with a C1 escape introducer (U+009B) and a right-to-left override (U+202E):
    # a terminal would act on the one, and the other would make "gpj.exe" read "exe.jpg".
    subject = "請求書\u009b31m 赤 \u202egpj.exe"
    write_config(tmp_path)
    raw = make_mail(subject=subject, sender="Mallory <m@attacker.example>")
    assert run_cli(["ingest", _eml(tmp_path, raw)], cwd=tmp_path).returncode == 0
    for args in (["cases", "list"], ["cases", "show", "CASE-1"], ["messages", "list"], ["outbox", "list"],
                 ["cases", "list", "--json"], ["cases", "show", "CASE-1", "--json"]):
        out = run_cli(args, cwd=tmp_path)
        assert out.returncode == 0, (args, out.stderr)
        assert "\u009b" not in out.stdout and "\u202e" not in out.stdout, args
        if "--json" not in args and args[0] == "cases":
            assert "請求書\\x9b31m 赤 \\u202egpj.exe" in out.stdout, args
    listed = json.loads(run_cli(["cases", "list", "--json"], cwd=tmp_path).stdout)
    assert listed[0]["subject"] == subject  # the same text, escaped only in the JSON source
