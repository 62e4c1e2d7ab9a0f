"""A real ``intake serve`` subprocess with its SMTP/LMTP listener on a free loopback port,
and a few raw-socket helpers for what smtplib cannot say (LMTP's per-recipient replies)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from conftest import intake_env, run_cli, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smtp_config(folder: Path, smtp: str = "", extra: str = "", *, port: int | None = None,
                database: str | None = None, team: str | None = None) -> Path:
    """A config (example mailboxes) whose ``[smtp]`` listens on a free loopback port."""
    path = write_config(folder, extra, database=database, team=team)
    port = port or free_port()
    text = path.read_text("utf-8").replace(
        '[smtp]\nlisten = ""', f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "mx.intake.test"\n{smtp}')
    path.write_text(text, "utf-8")
    return path


class IntakeServer:
    """``python -m intake serve`` as an operator runs it."""

    def __init__(self, config: Path) -> None:
        self.config = config
        text = config.read_text("utf-8")
        self.port = int(text.split('listen = "127.0.0.1:', 1)[1].split('"', 1)[0])
        self.log = config.parent / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> "IntakeServer":
        self._logf = open(self.log, "ab")  # noqa: SIM115 - kept open while the server runs
        self.proc = subprocess.Popen([sys.executable, "-m", "intake", "--config", str(self.config), "serve"],
                                     stdout=self._logf, stderr=self._logf, env=intake_env(),
                                     cwd=str(self.config.parent))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"intake serve exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"intake serve did not listen within {timeout}s:\n{self.log_text()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout)
        self._logf.close()
        return rc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._logf.close()

    def log_text(self) -> str:
        return self.log.read_text("utf-8", "replace") if self.log.exists() else ""

    def intake(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "intake", "--config", str(self.config), *args],
                              capture_output=True, text=True, env=intake_env(), timeout=timeout,
                              cwd=str(self.config.parent))

    def read(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A read command run in this process (the waits below poll with it: a new
        interpreter every 0.2 s would load the machine the server runs on)."""
        return run_cli(["--config", str(self.config), *args], cwd=self.config.parent)

    def cases(self) -> list[dict]:
        res = self.read("cases", "list", "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def status(self, name: str = "smtp") -> dict[str, Any]:
        """The line of ``intake status --json`` for one component."""
        res = self.read("status", "--json")
        assert res.returncode == 0, res.stderr
        return {s["name"]: s for s in json.loads(res.stdout)}[name]

    def wait_for_refusals(self, expected: dict[str, int], timeout: float = 30, name: str = "smtp") -> dict[str, int]:
        """The listener's refusal counts in ``intake status`` once they reach ``expected``
        (each reason at least its count), or as they are when ``timeout`` has passed."""
        deadline = time.monotonic() + timeout
        while True:
            refused = (self.status(name).get("details") or {}).get("refused") or {}
            if all(refused.get(k, 0) >= n for k, n in expected.items()) or time.monotonic() > deadline:
                return refused
            time.sleep(0.3)

    def wait_for_log(self, text: str, timeout: float = 30) -> str:
        """serve.log once it contains ``text`` (or as it is when ``timeout`` has passed)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log or time.monotonic() > deadline:
                return log
            time.sleep(0.1)

    def rss_mib(self) -> float:
        """serve's resident memory (VmRSS of /proc/PID/status) in MiB."""
        assert self.proc is not None
        return rss_mib(self.proc.pid)

    def wait_for_cases(self, count: int, timeout: float = 60) -> list[dict]:
        """The case list once it has ``count`` cases (processing runs after the 250)."""
        deadline = time.monotonic() + timeout
        while True:
            cases = self.cases()
            if len(cases) >= count or time.monotonic() > deadline:
                return cases
            time.sleep(0.2)

    def case_with_subject(self, subject: str, timeout: float = 60) -> dict:
        """The one case with this subject, once processing has made it."""
        deadline = time.monotonic() + timeout
        while True:
            found = [c for c in self.cases() if c["subject"] == subject]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, f"expected one case {subject!r}, got {found}\n{self.log_text()[-3000:]}"
                return found[0]
            time.sleep(0.2)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS of /proc/PID/status) in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class PeakRss:
    """Samples a process's resident memory every ``interval`` seconds in a thread while
    used as a context manager; ``peak`` and ``samples`` in MiB."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def peak(self) -> float:
        return max(self.samples)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mib(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self.samples.append(rss_mib(self.pid))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.samples.append(rss_mib(self.pid))


class RawClient:
    """A line-level SMTP/LMTP client: sends commands, reads complete (multi-line) replies.
    ``source``: the loopback address to connect from (127.0.0.2 … is another client)."""

    def __init__(self, port: int, timeout: float = 60, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.file = self.sock.makefile("rb")

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed: " + " | ".join(lines))
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), "\n".join(lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send(line if isinstance(line, bytes) else line.encode("utf-8") + b"\r\n")
        return self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def transaction(self, sender: str = "alice@customer.example.org", rcpt: str = "support@example.com",
                    helo: str = "client.example.org") -> None:
        """Greeting, EHLO, MAIL and RCPT, each answered as a willing server does; then DATA (354)."""
        assert self.reply()[0] == 220
        for line, code in ((f"EHLO {helo}", 250), (f"MAIL FROM:<{sender}>", 250), (f"RCPT TO:<{rcpt}>", 250),
                           ("DATA", 354)):
            got, text = self.cmd(line)
            assert got == code, f"{line} → {text}"

    def close(self) -> None:
        self.file.close()
        self.sock.close()
