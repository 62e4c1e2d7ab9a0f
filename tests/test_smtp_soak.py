"""Soak (issue 15): legitimate senders beside hostile SMTP clients against a real ``intake
serve``, for ``INTAKE_SOAK_SECONDS`` (default 60; the suite stays under two minutes, set
e.g. ``INTAKE_SOAK_SECONDS=1800`` for a longer run). Every good message must be answered
250 and become a case, serve's memory must stay bounded, and every kind of hostile client
must have been refused (so the run proves something).

The hostile clients, each from a loopback address of its own (as separate hosts):
connection hogs (up to 100 connections kept alive with NOOP), slow-loris clients in the
command phase (a byte a second, never a line) and in DATA (a byte a second), command lines
of 4 MB, garbage commands with control characters, and oversize messages. The timeouts
and the session time are shortened so that each of them acts several times per minute.
"""

from __future__ import annotations

import os
import random
import smtplib
import threading
import time
from collections import Counter

from mailfactory import make_mail
from smtp_fixtures import IntakeServer, PeakRss, RawClient, smtp_config

SOAK_SECONDS = float(os.environ.get("INTAKE_SOAK_SECONDS", "60"))
GOOD_SENDERS = 3
MEMORY_BOUND_MIB = 150  # over serve's resident memory at the start


class Soak:
    """The clients' shared state: the deadline, outcomes, unexpected replies."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port = port
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.good: dict[str, str] = {}  # subject → "250" or what went wrong
        self.unexpected: list[str] = []
        self.done = Counter()

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def pause(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self.deadline - time.monotonic())))

    def note(self, what: str) -> None:
        with self.lock:
            self.done[what] += 1

    def odd(self, what: str) -> None:
        with self.lock:
            self.unexpected.append(what)


def _close(*clients: RawClient | None) -> None:
    for c in clients:
        if c is not None:
            try:
                c.close()
            except OSError:
                pass


def good_sender(soak: Soak, n: int) -> None:
    """A legitimate MTA: sessions of up to 20 messages, some large with long lines."""
    sent = 0
    while soak.running():
        subject = f"soak {n}-{sent}"
        try:
            with smtplib.SMTP("127.0.0.1", soak.port, timeout=30) as s:
                for _ in range(20):
                    if not soak.running():
                        break
                    subject = f"soak {n}-{sent}"
                    body = ("long line " * 5000 + "\n") * 4 if sent % 10 == 9 else "ordinary text\n"
                    s.sendmail("customer@customer.example.org", ["support@example.com"],
                               make_mail(subject=subject, body=body, message_id=f"<soak-{n}-{sent}@customer.example.org>"))
                    with soak.lock:
                        soak.good[subject] = "250"
                    sent += 1
                    soak.pause(0.1)
        except (OSError, smtplib.SMTPException) as exc:
            with soak.lock:
                soak.good[subject] = f"{type(exc).__name__}: {exc}"
            sent += 1
            soak.pause(0.5)


def connection_hog(soak: Soak) -> None:
    """Holds as many connections as it gets (up to 100), a NOOP on each every 2 s."""
    held: list[RawClient] = []
    try:
        while soak.running():
            while len(held) < 100 and soak.running():
                c = RawClient(soak.port, timeout=10, source="127.0.0.2")
                code, _ = c.reply()
                if code != 220:
                    soak.note(f"hog {code}")
                    _close(c)
                    break
                held.append(c)
            for c in list(held):
                try:
                    ok = c.cmd("NOOP")[0] == 250
                except (OSError, ConnectionError):
                    ok = False
                if not ok:
                    held.remove(c)
                    _close(c)
            soak.pause(2)
    finally:
        _close(*held)


def slow_loris(soak: Soak, source: str, in_data: bool) -> None:
    """Ten connections sending a byte a second: a command that never ends, or a message."""
    conns: list[RawClient] = []
    try:
        while soak.running():
            while len(conns) < 10 and soak.running():
                c = RawClient(soak.port, timeout=10, source=source)
                if in_data:
                    c.transaction(sender="loris@bad.example")
                else:
                    assert c.reply()[0] == 220
                conns.append(c)
            for c in list(conns):
                try:
                    c.send(b"x")
                except OSError:
                    conns.remove(c)
                    _close(c)
                    soak.note("loris closed")
            soak.pause(1)
    finally:
        _close(*conns)


def long_lines(soak: Soak) -> None:
    """4 MB command lines, again and again."""
    c: RawClient | None = None
    line = b"EHLO " + b"L" * (4 * 1024 * 1024) + b"\r\n"
    while soak.running():
        try:
            if c is None:
                c = RawClient(soak.port, timeout=30, source="127.0.0.5")
                assert c.reply()[0] == 220
            code, text = c.cmd(line)
            if code == 421:  # the session time is up
                _close(c)
                c = None
            elif text != "500 5.5.2 line too long":
                soak.odd(f"long line: {text}")
        except (OSError, ConnectionError):
            _close(c)
            c = None
        soak.pause(0.2)
    _close(c)


def garbage(soak: Soak) -> None:
    """Unknown commands, control characters and random bytes, until the listener hangs up."""
    rnd = random.Random(15)
    lines = [b"\x00\x01\x02", b"GARBAGE IN", b"\x1b[31mRED\x07", b"MAIL FROM:<p\x00@b.test>", b"HELO a\rb",
             b"RCPT TO:<support+\x00@example.com>", b"DATA", b"AUTH PLAIN AAAA"]
    c: RawClient | None = None
    while soak.running():
        try:
            if c is None:
                c = RawClient(soak.port, timeout=30, source="127.0.0.6")
                assert c.reply()[0] == 220
                c.cmd("EHLO garbage.example")
            data = rnd.choice(lines) if rnd.random() < 0.7 else bytes(rnd.randrange(1, 256) for _ in range(60))
            code, _ = c.cmd(data.replace(b"\n", b"") + b"\r\n")
            if code < 400:
                soak.note("garbage accepted")
        except (OSError, ConnectionError):
            _close(c)
            c = None
            soak.note("garbage closed")
        soak.pause(0.05)
    _close(c)


def oversize(soak: Soak) -> None:
    """Messages of 1.5 MB to a listener that takes 1 MB."""
    raw = make_mail(subject="oversize", body=("O" * 998 + "\n") * 1500)
    while soak.running():
        c = RawClient(soak.port, timeout=30, source="127.0.0.7")
        try:
            c.transaction(sender="big@bad.example")
            c.send(raw + b".\r\n")
            code, text = c.reply()
            if not text.startswith("552 5.3.4"):
                soak.odd(f"oversize: {text}")
        except (OSError, ConnectionError) as exc:
            soak.odd(f"oversize: {exc!r}")
        finally:
            _close(c)
        soak.pause(0.3)


def test_legitimate_mail_flows_beside_hostile_clients_and_memory_stays_bounded(tmp_path):
    cfg = smtp_config(tmp_path, 'max_message_size = "1MB"\ncommand_timeout = "5s"\ndata_timeout = "5s"\n'
                                'max_session_time = "20s"\n')
    srv = IntakeServer(cfg).start()
    try:
        start_rss = srv.rss_mib()
        soak = Soak(srv.port, SOAK_SECONDS)
        clients = [threading.Thread(target=good_sender, args=(soak, n)) for n in range(GOOD_SENDERS)] + [
            threading.Thread(target=connection_hog, args=(soak,)),
            threading.Thread(target=slow_loris, args=(soak, "127.0.0.3", False)),
            threading.Thread(target=slow_loris, args=(soak, "127.0.0.4", True)),
            threading.Thread(target=long_lines, args=(soak,)),
            threading.Thread(target=garbage, args=(soak,)),
            threading.Thread(target=oversize, args=(soak,)),
        ]
        with PeakRss(srv.proc.pid, interval=0.5) as rss:
            for t in clients:
                t.start()
            for t in clients:
                t.join(timeout=SOAK_SECONDS + 120)
        assert not any(t.is_alive() for t in clients)

        failed = {s: r for s, r in soak.good.items() if r != "250"}
        assert not failed, f"{len(failed)} of {len(soak.good)} good messages not accepted: {list(failed.items())[:5]}"
        assert len(soak.good) >= 100, "too few good messages for the run to mean anything"
        assert not soak.unexpected, soak.unexpected[:5]
        cases = srv.wait_for_cases(len(soak.good), timeout=180)
        assert sorted(c["subject"] for c in cases) == sorted(soak.good)

        refused = srv.wait_for_refusals({})
        for reason in ("per-IP limit", "idle timeout", "session time", "line too long", "unrecognized command",
                       "control character", "too big"):
            assert refused.get(reason, 0) > 0, f"no {reason!r} refusal: the hostile client did not run? {refused}"
        grown = rss.peak - start_rss
        print(f"\nsoak {SOAK_SECONDS:.0f}s: {len(soak.good)} good messages, all 250 and cases; "
              f"serve RSS start {start_rss:.0f} MiB, peak {rss.peak:.0f}, end {rss.samples[-1]:.0f} "
              f"({len(rss.samples)} samples); refused {dict(sorted(refused.items()))}; clients {dict(soak.done)}")
        assert grown < MEMORY_BOUND_MIB, f"serve grew by {grown:.0f} MiB (samples {rss.samples[::10]})"
    finally:
        srv.stop()
