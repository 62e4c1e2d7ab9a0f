"""The documented Postfix setup (docs/postfix/) driven for real: a private Postfix instance
built from those files relays mail for intake's mailboxes to `intake serve` over LMTP.

Needs Debian's postfix package (installed unconfigured by .ci/run) and root, as Postfix's
master does."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

from mailfactory import make_mail
from smtp_fixtures import IntakeServer, free_port, smtp_config

DOCS = Path(__file__).resolve().parent.parent / "docs" / "postfix"


def _map(path: Path) -> dict[str, str]:
    rows = [line.split() for line in path.read_text("utf-8").splitlines() if line.strip() and not line.startswith("#")]
    return {r[0]: r[1] for r in rows}


def test_documented_files_agree_with_each_other():
    doc = tomllib.loads((DOCS / "intake.toml").read_text("utf-8"))
    transport = _map(DOCS / "intake_transport")
    recipients = _map(DOCS / "intake_recipients")
    main = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in (DOCS / "main.cf").read_text().splitlines()
                                                  if "=" in line and not line.startswith("#"))}
    assert doc["smtp"]["protocol"] == "lmtp"
    assert set(transport.values()) == {f"lmtp:inet:{doc['smtp']['listen']}"}
    assert set(recipients) == {mb["address"] for mb in doc["mailbox"]}
    assert main["relay_domains"] in transport
    assert main["recipient_delimiter"] == "+"


class PrivatePostfix:
    """A Postfix instance of its own (config, queue, log in one folder) on a loopback port."""

    def __init__(self, folder: Path, port: int, intake_port: int) -> None:
        self.etc, self.log = folder / "etc", folder / "maillog"
        for d in ("etc", "spool", "data"):
            (folder / d).mkdir()
        shutil.chown(folder / "data", "postfix")
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            f = line.split()
            if line and not line[0].isspace() and not line.startswith("#") and len(f) >= 8:
                if f[:2] == ["smtp", "inet"]:
                    f[0] = f"127.0.0.1:{port}"
                f[4] = "n"  # no chroot: the instance lives in a temporary folder
                line = " ".join(f)
            lines.append(line)
        (self.etc / "master.cf").write_text("\n".join(lines) + "\n")
        # The instance's own places, then the documented lines as they are.
        (self.etc / "main.cf").write_text(
            f"compatibility_level = 3.6\nqueue_directory = {folder}/spool\ndata_directory = {folder}/data\n"
            f"maillog_file = {self.log}\nmaillog_file_prefixes = {folder}\nmyhostname = mx.postfix.test\n"
            "mydestination =\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\nmynetworks = 127.0.0.0/8\n"
            "smtputf8_enable = yes\n"
            + (DOCS / "main.cf").read_text().replace("/etc/postfix/", f"{self.etc}/"))
        (self.etc / "intake_transport").write_text(
            (DOCS / "intake_transport").read_text().replace("127.0.0.1:2525", f"127.0.0.1:{intake_port}"))
        shutil.copy(DOCS / "intake_recipients", self.etc / "intake_recipients")

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postfix", "-c", str(self.etc), *args], capture_output=True, text=True, timeout=60)

    def maillog(self) -> str:
        return self.log.read_text("utf-8", "replace") if self.log.exists() else ""


def swaks(port: int, to: str, subject: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    eml = tmp / f"{abs(hash(subject))}.eml"
    eml.write_bytes(make_mail(subject=subject, to=to, sender="山田 太郎 <taro@bigcorp.co.jp>"))
    return subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(port), "--from", "taro@bigcorp.co.jp",
                           "--to", to, "--data", str(eml), "--timeout", "30"], capture_output=True, text=True, timeout=60)


def test_mail_through_postfix_reaches_intake_over_lmtp(tmp_path):
    assert shutil.which("postfix"), "Debian's postfix package is needed (.ci/run installs it)"
    assert os.geteuid() == 0, "Postfix's master runs as root (as under .ci/run)"
    doc = tomllib.loads((DOCS / "intake.toml").read_text("utf-8"))
    # Postfix runs its daemons as the postfix user: a folder it can enter (tmp_path is 0700).
    folder = Path(tempfile.mkdtemp(prefix="intake-postfix-"))
    folder.chmod(0o755)
    intake_port, postfix_port = free_port(), free_port()
    srv = IntakeServer(smtp_config(tmp_path, f'protocol = "{doc["smtp"]["protocol"]}"\n', port=intake_port)).start()
    pf = PrivatePostfix(folder, postfix_port, intake_port)
    try:
        started = pf.postfix("start")
        assert started.returncode == 0, started.stdout + started.stderr + pf.maillog()
        deadline = time.monotonic() + 30
        res = swaks(postfix_port, "support+web@example.com", "Postfix から LMTP で", tmp_path)
        while res.returncode != 0 and "Connection refused" in res.stdout + res.stderr and time.monotonic() < deadline:
            time.sleep(0.5)
            res = swaks(postfix_port, "support+web@example.com", "Postfix から LMTP で", tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        assert swaks(postfix_port, "billing@example.com", "billing via Postfix", tmp_path).returncode == 0
        # Strangers are refused by Postfix itself, at RCPT: no bounce is ever generated.
        refused = swaks(postfix_port, "nobody@example.com", "stranger", tmp_path)
        assert refused.returncode != 0 and "550 5.1.1" in refused.stdout
        cases = srv.wait_for_cases(2, timeout=60)
        assert {(c["subject"], c["mailbox"]) for c in cases} == {
            ("Postfix から LMTP で", "support@example.com"), ("billing via Postfix", "billing@example.com")}, pf.maillog()
        assert "status=sent" in pf.maillog() and "lmtp" in pf.maillog()
    finally:
        pf.postfix("stop")
        srv.stop()
        shutil.rmtree(folder, ignore_errors=True)
