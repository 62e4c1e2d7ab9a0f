"""A private Dovecot IMAP server for the tests (recipe: ../shared/notes/dovecot.md).

Each ``Dovecot`` lives in its own 0755 directory under /tmp (pytest's ``tmp_path`` is 0700,
which Dovecot's unprivileged processes cannot traverse), listens on a free loopback port,
runs in the foreground as a child of the test process and is stopped at teardown.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient

CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
instance_name = intake-test-{port}
protocols = imap
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {dir}/users
  default_fields = uid=nobody gid=nogroup home={dir}/home/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
  }}
}}
protocol imap {{
  mail_max_userip_connections = 50
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Dovecot:
    """One private Dovecot instance: users, start/stop/restart and client helpers."""

    def __init__(self, users: dict[str, str], *, tls: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="intake-dovecot-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.users = dict(users)
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("run", "state", "home"):
            (self.dir / sub).mkdir()
        pw = pwd.getpwnam("nobody")
        self._uid, self._gid = pw.pw_uid, pw.pw_gid
        os.chown(self.dir / "home", self._uid, self._gid)
        self._write_users()
        ssl_conf = "ssl = no"
        self.tls_port = 0
        self.ca_file = ""
        if tls:
            # A private CA (trustme) and a certificate for 127.0.0.1: implicit TLS on
            # tls_port, STARTTLS on port.
            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            cert.private_key_and_cert_chain_pem.write_to_path(str(self.dir / "server.pem"))
            ca.cert_pem.write_to_path(str(self.dir / "ca.pem"))
            self.ca_file = str(self.dir / "ca.pem")
            self.tls_port = free_port()
            ssl_conf = f"ssl = yes\nssl_cert = <{self.dir}/server.pem\nssl_key = <{self.dir}/server.pem"
        (self.dir / "dovecot.conf").write_text(CONF.format(dir=self.dir, port=self.port, ssl=ssl_conf,
                                                           tls_port=self.tls_port))

    def _write_users(self) -> None:
        lines = [f"{u}:{{PLAIN}}{p}::::::" for u, p in self.users.items()]
        (self.dir / "users").write_text("\n".join(lines) + "\n")

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        check = subprocess.run(["dovecot", "-n", "-c", str(self.dir / "dovecot.conf")], capture_output=True)
        if check.returncode != 0:
            raise RuntimeError(f"dovecot config invalid: {check.stderr.decode()}")
        # Its own process group: stop() ends the master and every child it started, as a
        # real restart would (Dovecot's imap processes otherwise outlive their master).
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.dir / "dovecot.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"dovecot did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the children of this instance only
            except ProcessLookupError:
                pass
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- clients and mail ---------------------------------------------------------------

    def client(self, user: str = "test") -> IMAPClient:
        c = IMAPClient("127.0.0.1", port=self.port, ssl=False, timeout=30)
        c.login(user, self.users[user])
        return c

    def append(self, raw: bytes | list[bytes], folder: str = "INBOX", user: str = "test",
               flags: tuple[bytes, ...] = ()) -> None:
        """APPEND one message or many (one MULTIAPPEND per 200) over IMAP."""
        msgs = [raw] if isinstance(raw, bytes) else raw
        c = self.client(user)
        try:
            if not c.folder_exists(folder):
                c.create_folder(folder)
            for i in range(0, len(msgs), 200):
                c.multiappend(folder, [{"msg": m, "flags": flags} for m in msgs[i:i + 200]])
        finally:
            c.logout()

    def maildir_deliver(self, msgs: list[bytes], user: str = "test") -> None:
        """Drop messages straight into the INBOX Maildir (fast, like an LDA would)."""
        home = self.dir / "home" / user / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        for p in (self.dir / "home" / user, home, home / "new", home / "cur", home / "tmp"):
            os.chown(p, self._uid, self._gid)
        stamp = int(time.time())
        for i, m in enumerate(msgs):
            name = f"{stamp}.P{os.getpid()}Q{i}.intake-test"
            tmp = home / "tmp" / name
            tmp.write_bytes(m)
            os.chown(tmp, self._uid, self._gid)
            os.rename(tmp, home / "new" / name)

    def uids(self, folder: str = "INBOX", user: str = "test", criteria: list[str] | str = "ALL") -> list[int]:
        c = self.client(user)
        try:
            if not c.folder_exists(folder):
                return []
            c.select_folder(folder, readonly=True)
            return sorted(c.search(criteria))
        finally:
            c.logout()

    def count(self, folder: str = "INBOX", user: str = "test") -> int:
        c = self.client(user)
        try:
            if not c.folder_exists(folder):
                return 0
            return int(c.folder_status(folder, [b"MESSAGES"])[b"MESSAGES"])
        finally:
            c.logout()

    def flags(self, folder: str = "INBOX", user: str = "test") -> dict[int, tuple[bytes, ...]]:
        c = self.client(user)
        try:
            c.select_folder(folder, readonly=True)
            uids = c.search("ALL")
            return {uid: tuple(d[b"FLAGS"]) for uid, d in c.fetch(uids, ["FLAGS"]).items()} if uids else {}
        finally:
            c.logout()

    def log(self) -> str:
        p = self.dir / "dovecot.log"
        return p.read_text(errors="replace") if p.exists() else ""


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """A running private Dovecot with users ``test`` (password ``secret``) and ``billing``."""
    server = Dovecot({"test": "secret", "billing": "secret2"})
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


PASSWORD_ENV = {"test": "INTAKE_TEST_IMAP_PASSWORD", "billing": "INTAKE_TEST_IMAP_BILLING_PASSWORD"}


def imap_toml(server: Dovecot, user: str = "test", mailbox: str = "support@example.com", **keys: object) -> str:
    """An ``[[imap]]`` section for ``write_config`` pointing at ``server`` (plain, loopback)."""
    values: dict[str, object] = {"name": user, "host": "127.0.0.1", "port": server.port, "tls": False,
                                 "username": user, "password_env": PASSWORD_ENV[user], "mailbox": mailbox,
                                 "folder": "INBOX", "processed_folder": "Processed", "poll_interval": 3600}
    values.update(keys)

    def fmt(v: object) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else (str(v) if isinstance(v, int) else f'"{v}"')

    return "\n[[imap]]\n" + "".join(f"{k} = {fmt(v)}\n" for k, v in values.items())


def password_env(server: Dovecot) -> dict[str, str]:
    """The environment variables holding each user's password."""
    return {PASSWORD_ENV[u]: p for u, p in server.users.items() if u in PASSWORD_ENV}
