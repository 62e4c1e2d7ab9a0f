"""A real ``intake serve`` subprocess with its SMTP/LMTP listener on a free loopback port,
and a few raw-socket helpers for what smtplib cannot say (LMTP's per-recipient replies)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import intake_env, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smtp_config(folder: Path, smtp: str = "", extra: str = "", *, port: int | None = None,
                database: str | None = None) -> Path:
    """A config (example mailboxes) whose ``[smtp]`` listens on a free loopback port."""
    path = write_config(folder, extra, database=database)
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

    def cases(self) -> list[dict]:
        res = self.intake("cases", "list", "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def wait_for_cases(self, count: int, timeout: float = 60) -> list[dict]:
        """The case list once it has ``count`` cases (processing runs after the 250)."""
        deadline = time.monotonic() + timeout
        while True:
            cases = self.cases()
            if len(cases) >= count or time.monotonic() > deadline:
                return cases
            time.sleep(0.2)


class RawClient:
    """A line-level SMTP/LMTP client: sends commands, reads complete (multi-line) replies."""

    def __init__(self, port: int, timeout: float = 60) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
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

    def close(self) -> None:
        self.file.close()
        self.sock.close()
