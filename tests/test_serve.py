"""`intake serve` processes what is stored, picks up leftovers on start, and stops cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import list_cases, open_test_app
from conftest import intake_env
from mailfactory import make_mail


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_serve_processes_records_left_received_and_stops_on_sigterm(config_path, run_intake):
    # Stored by an edge that died before processing them.
    app = open_test_app(config_path)
    app.store.receive_many([(make_mail(subject=f"left over {n}"), {"channel": "email", "mailbox": "support@example.com"})
                            for n in range(3)])
    proc = subprocess.Popen([sys.executable, "-m", "intake", "--config", str(config_path), "serve"],
                            env=intake_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _wait(lambda: len(list_cases(app)) == 3), "serve did not process the stored records"
        # Stored while serve runs: picked up too.
        app.store.receive(make_mail(subject="while serving"), channel="email", mailbox="support@example.com")
        assert _wait(lambda: len(list_cases(app)) == 4)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        app.close()
    assert proc.returncode == 0, err.decode()
    assert b"stopped" in err
    subjects = [c["subject"] for c in json.loads(run_intake("cases", "list", "--json", check=True).stdout)]
    assert sorted(subjects) == ["left over 0", "left over 1", "left over 2", "while serving"]
