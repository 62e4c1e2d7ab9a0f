"""IMAP pollers under the real ``intake serve`` process, against a real Dovecot.

IDLE delivery, two accounts, a server restart, a wrong password, and kill -9 while a
backlog drains. Every wait is bounded; nothing asserts how fast it happened.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dovecot import Dovecot, dovecot, imap_toml, password_env  # noqa: F401 - `dovecot` is a fixture
from mailfactory import make_mail

from conftest import count_inbound, intake_env, list_cases, statuses, write_config
from intake.db import Store
from intake.states import InboundState

RECEIVED = InboundState.RECEIVED


class Serving:
    """A running ``intake serve`` whose standard error goes to a file."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.config = config
        self.log_path = config.parent / f"serve-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "intake", "--config", str(config), "serve"],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=intake_env(**env),
                                     cwd=str(config.parent))

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


@contextmanager
def serving(config: Path, env: dict[str, str]) -> Iterator[Serving]:
    s = Serving(config, env)
    try:
        yield s
    finally:
        s.stop()


def wait_for(what: str, check: Callable[[], object], timeout: float = 60.0, serve: Serving | None = None) -> object:
    """Poll ``check`` until it returns something true; fail (with the serve log) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if serve is not None and serve.proc.poll() is not None:
            raise AssertionError(f"intake serve exited {serve.proc.returncode} while waiting for {what}:\n{serve.log()}")
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}" + (f"; serve log:\n{serve.log()[-4000:]}" if serve else ""))


def _store(config: Path) -> Store:
    return Store(f"sqlite:///{config.parent / 'intake.db'}")


def _status(store: Store, name: str):  # type: ignore[no-untyped-def]
    try:
        return {s.name: s for s in statuses(store)}.get(name)
    except Exception:  # noqa: BLE001 - the table appears once serve has migrated the database
        return None


def _cases(store: Store) -> list:  # type: ignore[type-arg]
    try:
        return list_cases(store)
    except Exception:  # noqa: BLE001 - not migrated yet
        return []


def test_idle_delivers_new_mail_of_two_accounts_into_their_mailboxes(tmp_path, dovecot):
    # poll_interval = 3600: only IDLE can bring these messages in while the test waits.
    cfg = write_config(tmp_path, imap_toml(dovecot) + imap_toml(dovecot, user="billing", mailbox="billing@example.com"))
    store = _store(cfg)
    with serving(cfg, password_env(dovecot)) as serve:
        for name in ("imap:test", "imap:billing"):
            wait_for(f"{name} in IDLE", lambda n=name: (s := _status(store, n)) and s.state == "idle", serve=serve)
        dovecot.append(make_mail(subject="Printer jammed", to="support@example.com"))
        dovecot.append(make_mail(subject="請求書が届きません", to="billing@example.com", charset="iso-2022-jp",
                                 cte="7bit", body="先月分の請求書が届いていません。\n"), user="billing")
        cases = wait_for("two cases", lambda: len(_cases(store)) == 2 and _cases(store), serve=serve)
        assert {(c.subject, c.mailbox, c.queue) for c in cases} == {
            ("Printer jammed", "support@example.com", "support"),
            ("請求書が届きません", "billing@example.com", "billing")}
        assert dovecot.count("Processed") == 1 and dovecot.count("Processed", user="billing") == 1
        assert serve.stop() == 0
    assert _status(store, "imap:test").state == "stopped"
    store.close()


def test_server_restart_mid_run_reconnects_and_logs_once(tmp_path, dovecot):
    cfg = write_config(tmp_path, imap_toml(dovecot))
    store = _store(cfg)
    with serving(cfg, password_env(dovecot)) as serve:
        wait_for("poller in IDLE", lambda: (s := _status(store, "imap:test")) and s.state == "idle", serve=serve)
        dovecot.append([make_mail(subject=f"Before restart {i}") for i in range(3)])
        wait_for("3 cases", lambda: len(_cases(store)) == 3, serve=serve)

        dovecot.stop()
        wait_for("the outage in status", lambda: (s := _status(store, "imap:test")) and s.state == "error", serve=serve)
        # Each failed reconnect stamps the error again: wait for two more of them.
        failures: set[object] = set()
        wait_for("two more failed reconnects",
                 lambda: failures.add(_status(store, "imap:test").last_error_at) or len(failures) >= 3, serve=serve)
        dovecot.start()
        dovecot.append([make_mail(subject=f"After restart {i}") for i in range(3)])
        wait_for("6 cases", lambda: len(_cases(store)) == 6, timeout=90, serve=serve)
        assert serve.proc.poll() is None
        log = serve.log()
        assert sum("connection refused" in line for line in log.splitlines()) == 1, log
        assert "imap test: connected again" in log
    assert sorted(c.subject for c in list_cases(store)) == sorted(
        [f"Before restart {i}" for i in range(3)] + [f"After restart {i}" for i in range(3)])
    store.close()


def test_wrong_password_is_reported_not_fatal(tmp_path, dovecot, run_intake):
    cfg = write_config(tmp_path, imap_toml(dovecot))
    store = _store(cfg)
    env = {**password_env(dovecot), "INTAKE_TEST_IMAP_PASSWORD": "wrong"}
    with serving(cfg, env) as serve:
        wait_for("login failure in status",
                 lambda: (s := _status(store, "imap:test")) and "login failed" in (s.last_error or ""), serve=serve)
        wait_for("a second login attempt", lambda: dovecot.log().count("auth failed") >= 2, serve=serve)
        assert serve.proc.poll() is None  # serve keeps running
        status = run_intake("status", config=cfg, check=True).stdout
        line = next(x for x in status.splitlines() if x.startswith("imap:test"))
        assert " error " in line and "login failed" in line and "AUTHENTICATIONFAILED" in line
        log = serve.log()
        assert sum("login failed" in x for x in log.splitlines()) == 1, log
        assert "Traceback" not in log
        assert serve.stop() == 0
    store.close()


def test_kill_9_while_draining_then_restart_makes_each_message_one_case(tmp_path, dovecot):
    total = 400
    cfg = write_config(tmp_path, imap_toml(dovecot, batch_size=4))
    subjects = [f"Backlog mail {i:03d}" for i in range(total)]
    dovecot.maildir_deliver([make_mail(subject=s) for s in subjects])
    env = password_env(dovecot)

    first = Serving(cfg, env)
    try:
        wait_for("the drain to be under way", lambda: dovecot.count("Processed") >= 40, serve=first)
    finally:
        first.kill()
    assert dovecot.count("INBOX") > 0, "drained before the kill: nothing left to test"

    store = _store(cfg)
    with serving(cfg, env) as serve:
        wait_for("every message processed",
                 lambda: dovecot.count("INBOX") == 0 and count_inbound(store) >= total
                 and count_inbound(store, RECEIVED) == 0, timeout=180, serve=serve)
    cases = list_cases(store)
    assert sorted(c.subject for c in cases) == subjects  # each exactly once
    assert dovecot.count("Processed") == total
    # The folder position is committed with the messages: nothing was even stored twice.
    assert count_inbound(store) == total
    store.close()


def test_status_lists_processor_and_unstarted_pollers(tmp_path, dovecot, run_intake):
    cfg = write_config(tmp_path, imap_toml(dovecot))
    run_intake("db", "upgrade", config=cfg, check=True)
    out = json.loads(run_intake("status", "--json", config=cfg, check=True).stdout)
    assert [(s["name"], s["state"]) for s in out if s["name"] not in ("rules", "templates")] == [("imap:test", "not started")]
    assert next(s for s in out if s["name"] == "rules")["state"].startswith("ok (")
    with serving(cfg, password_env(dovecot)) as serve:
        store = _store(cfg)
        wait_for("processor status", lambda: _status(store, "processor"), serve=serve)
        wait_for("a first poll", lambda: getattr(_status(store, "imap:test"), "last_success_at", None),
                 serve=serve)
        store.close()
    out = json.loads(run_intake("status", "--json", config=cfg, check=True).stdout)
    by_name = {s["name"]: s for s in out}
    assert by_name["processor"]["state"] == "stopped" and by_name["processor"]["backlog"] == 0
    assert by_name["imap:test"]["state"] == "stopped" and by_name["imap:test"]["last_success_at"]
