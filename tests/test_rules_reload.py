"""Hot reload under a real ``intake serve``: a valid change applies, an invalid one is refused."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import intake_env, list_cases, rules_state, write_config
from intake.db import Store
from mailfactory import make_mail

VALID = """
queues:
  hotline: {name: Hotline}
rules:
  - name: hot reload
    when: {subject: {contains: hot reload}}
    then: {queue: hotline, tags: [reloaded]}
"""
# The same rule pointing at a queue that does not exist.
INVALID = VALID.replace("then: {queue: hotline,", "then: {queue: hotlines,")


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_serve_reloads_valid_rules_and_keeps_the_last_good_set(tmp_path: Path, run_intake):
    config = write_config(tmp_path)
    log = tmp_path / "serve.log"
    store = Store(f"sqlite:///{tmp_path / 'intake.db'}")
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "intake", "--config", str(config), "serve"],
                                stdout=subprocess.DEVNULL, stderr=err, env=intake_env(), cwd=str(tmp_path))
    try:
        text = lambda: log.read_text("utf-8", "replace")  # noqa: E731
        wait_for(lambda: "serving" in text(), "serve to start")
        wait_for(lambda: (rules_state(store) or {}).get("state") == "ok", "the initial rules state")
        first_fingerprint = rules_state(store)["fingerprint"]

        rule_file = tmp_path / "routing_rules" / "20-reload.yaml"
        rule_file.write_text(textwrap.dedent(VALID), "utf-8")
        wait_for(lambda: "rules reloaded" in text(), "the valid change to be loaded")
        state = rules_state(store)
        assert state["state"] == "ok" and state["fingerprint"] != first_fingerprint

        one = tmp_path / "one.eml"
        one.write_bytes(make_mail(subject="Hot reload one", sender="a@customer.example.org"))
        assert run_intake("ingest", str(one), check=True).returncode == 0

        rule_file.write_text(textwrap.dedent(INVALID), "utf-8")
        wait_for(lambda: "rules refused" in text(), "the invalid change to be refused")
        state = rules_state(store)
        assert state["state"] == "refused"
        assert "routing_rules/20-reload.yaml:7: rule 'hot reload': queue: unknown queue 'hotlines'" in state["error"]
        assert "did you mean 'hotline'" in state["error"]

        # ingest cannot load the broken set: it stores the mail, and serve routes it with the
        # last good set.
        two = tmp_path / "two.eml"
        two.write_bytes(make_mail(subject="ＨＯＴ　ＲＥＬＯＡＤ two", sender="b@customer.example.org"))
        res = run_intake("ingest", str(two))
        assert res.returncode == 0 and "processing deferred" in res.stdout

        def landed():
            return {c.subject: c for c in list_cases(store)} if len(list_cases(store)) == 2 else None

        got = wait_for(landed, "serve to process the deferred message")
        assert got["Hot reload one"].queue == "hotline"
        assert got["ＨＯＴ　ＲＥＬＯＡＤ two"].queue == "hotline"
        assert got["ＨＯＴ　ＲＥＬＯＡＤ two"].tags == ["reloaded"]

        stats = run_intake("rules", "stats", check=True).stdout
        assert "serve: rules refused" in stats and "unknown queue 'hotlines'" in stats

        # Fixed again: the state returns to ok.
        rule_file.write_text(textwrap.dedent(VALID).replace("tags: [reloaded]", "tags: [fixed]"), "utf-8")
        wait_for(lambda: text().count("rules reloaded") >= 2, "the fixed set to be loaded")
        assert rules_state(store)["state"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        store.close()
    assert proc.returncode == 0, log.read_text("utf-8", "replace")
    assert "rules refused, keeping the set loaded at" in log.read_text("utf-8")
