"""SMTP intake throughput: Postfix's smtp-source against `intake serve` and a bare aiosmtpd.

    .venv/bin/python bench/smtp_bench.py [--count 10000] [--sizes 4096,51200] [--connections 1,10,50]

For every message size and number of connections, in the same run:
(a) a bare aiosmtpd server (own process, one asyncio loop) whose handler only answers 250;
(a') the same bare server with the one change intake makes to aiosmtpd's protocol (its
MAIL/RCPT address parse remembered per argument), so that the second ratio shows intake's
own cost alone;
(b) `intake serve` (SQLite; every 250 follows a durable commit of the listener's spool;
the processor and outbox sender in a worker process), a fresh installation per cell,
receive ``--count`` messages from ``smtp-source -d`` (connections are reused, as an MTA's
connection cache does). Printed per cell: messages/second of each and the ratios; p50/p99
latency of DATA (from the final "." to the reply) measured by a small client of our own
sending ``--latency-count`` messages over the same number of connections right after;
for intake also whether every accepted message is stored, the backlog (spooled or
``received``, not yet processed) when sending ended, the processing rate while receiving
and after, and how long the backlog took to drain.

smtp-source is in Debian's ``postfix`` package; install it without configuring an MTA:
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y postfix   # with /usr/sbin/policy-rc.d exiting 101
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RCPT = "support@example.com"
SENDER = "bench@client.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port}")


# -- (a) the bare server -----------------------------------------------------------------


def run_bare_server(port: int, memo: bool) -> None:
    """aiosmtpd in one asyncio loop, created like intake's listener; DATA → 250 at once.
    ``memo``: with intake's remembered address parse (``intake.edges.smtp._parsed_address``)."""
    from aiosmtpd.smtp import SMTP

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
            return "250 OK"

    protocol = SMTP
    if memo:
        sys.path.insert(0, str(ROOT))
        from intake.edges.smtp import _parsed_address

        class MemoSMTP(SMTP):
            def _getaddr(self, arg):  # noqa: ANN001, ANN202
                return _parsed_address(super()._getaddr, arg, self.local_part_limit)

        protocol = MemoSMTP

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = await loop.create_server(lambda: protocol(Handler(), hostname="bare.bench", data_size_limit=None),
                                          "127.0.0.1", port)
        await stop.wait()
        server.close()

    asyncio.run(main())


# -- (b) intake serve ----------------------------------------------------------------------


class Intake:
    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        (folder / "routing_rules").mkdir(parents=True)
        shutil.copy(ROOT / "intake" / "shipped" / "routing_rules" / "10-team.yaml", folder / "routing_rules")
        self.db = folder / "intake.db"
        self.config = folder / "intake.toml"
        self.config.write_text(textwrap.dedent(f"""
            [database]
            url = "sqlite:///{self.db}"
            [smtp]
            listen = "127.0.0.1:{port}"
            hostname = "intake.bench"
            max_connections = 200
            [[mailbox]]
            address = "{RCPT}"
            [outbound]
            path = "{folder / 'outbox'}"
            """), "utf-8")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.log = open(folder / "serve.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "intake", "--config", str(self.config), "serve"],
                                     stdout=self.log, stderr=self.log, env=env, cwd=str(folder))
        wait_listening(port, self.proc)
        sys.path.insert(0, str(ROOT))
        from intake.db import Store

        self.store = Store(f"sqlite:///{self.db}")

    def counts(self) -> tuple[int, int]:
        """(stored messages, not yet processed): the spool's waiting messages count in both."""
        spooled = self.store.spool_backlog()
        with self.store.read() as tx:
            return tx.inbound.count() + spooled, tx.inbound.count("received") + spooled

    def stop(self) -> int:
        self.store.close()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=300)
        self.log.close()
        return rc


# -- load and latency ------------------------------------------------------------------------


def smtp_source(port: int, count: int, size: int, connections: int) -> float:
    """Seconds smtp-source needed to have ``count`` messages accepted (it aborts on any non-2xx)."""
    cmd = ["smtp-source", "-d", "-s", str(connections), "-m", str(count), "-l", str(size),
           "-f", SENDER, "-t", RCPT, "-S", "bench", "-M", "client.example", f"127.0.0.1:{port}"]
    started = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - started
    if res.returncode != 0:
        raise SystemExit(f"smtp-source failed ({res.returncode}): {res.stdout}{res.stderr}")
    return elapsed


def _message(n: int, size: int) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: latency {n}\r\n"
            f"Message-ID: <lat-{os.getpid()}-{n}-{time.time_ns()}@client.example>\r\n\r\n").encode()
    line = b"Y" * 78 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def _latency(port: int, count: int, size: int, connections: int) -> list[float]:
    samples: list[float] = []
    per = [count // connections + (1 if i < count % connections else 0) for i in range(connections)]

    async def session(n: int, offset: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if not line or line[3:4] != b"-":
                    return line

        async def cmd(text: bytes) -> bytes:
            writer.write(text + b"\r\n")
            return await reply()

        await reply()
        await cmd(b"EHLO latency.client.example")
        for i in range(n):
            for c in (f"MAIL FROM:<{SENDER}>".encode(), f"RCPT TO:<{RCPT}>".encode(), b"DATA"):
                r = await cmd(c)
                if r[:1] not in (b"2", b"3"):
                    raise SystemExit(f"latency client: {c!r} → {r!r}")
            writer.write(_message(offset + i, size) + b".\r\n")
            await writer.drain()
            started = time.perf_counter()
            r = await reply()
            samples.append(time.perf_counter() - started)
            if not r.startswith(b"250"):
                raise SystemExit(f"latency client: DATA → {r!r}")
        await cmd(b"QUIT")
        writer.close()
        await writer.wait_closed()

    offsets = [sum(per[:i]) for i in range(connections)]
    await asyncio.gather(*(session(n, o) for n, o in zip(per, offsets) if n))
    return samples


def latency(port: int, count: int, size: int, connections: int) -> tuple[float, float]:
    """p50 and p99 of DATA latency in milliseconds."""
    samples = sorted(asyncio.run(_latency(port, count, size, connections)))
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return statistics.median(samples) * 1000, p99 * 1000


# -- the run --------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=10_000, help="messages per cell from smtp-source")
    ap.add_argument("--sizes", default="4096,51200", help="message sizes in bytes")
    ap.add_argument("--connections", default="1,10,50", help="concurrent connections")
    ap.add_argument("--latency-count", type=int, default=1000, help="messages of the DATA latency probe")
    ap.add_argument("--drain-seconds", type=float, default=120, help="longest wait for processing after sending")
    ap.add_argument("--keep", action="store_true", help="keep the installations (databases, logs)")
    ap.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--memo", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server:
        run_bare_server(args.bare_server, args.memo)
        return 0
    if shutil.which("smtp-source") is None:
        print("smtp-source not found: install Debian's postfix package (see this script's docstring)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    conns = [int(c) for c in args.connections.split(",")]
    work = Path(tempfile.mkdtemp(prefix="intake-smtp-bench-"))
    bare_port, memo_port = free_port(), free_port()
    bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(bare_port)])
    memo = subprocess.Popen([sys.executable, __file__, "--bare-server", str(memo_port), "--memo"])
    wait_listening(bare_port, bare)
    wait_listening(memo_port, memo)
    print(f"smtp-source -d, {args.count} messages per cell; DATA latency from {args.latency_count} messages; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    head = (f"{'size':>5} {'conns':>5} | {'bare':>6} {'p50':>5} {'p99':>5} | {'bare+':>6} | {'intake':>6} {'p50':>5} "
            f"{'p99':>5} | {'ratio':>5} {'ratio+':>6} | {'stored/acc':>11} {'backlog':>7} {'proc':>5} {'after':>5} "
            f"{'drained':>7} {'left':>4}")
    print(head)
    print("-" * len(head))
    try:
        for size in sizes:
            for n in conns:
                bare_s = smtp_source(bare_port, args.count, size, n)
                bare_lat = latency(bare_port, args.latency_count, size, n)
                memo_s = smtp_source(memo_port, args.count, size, n)
                port = free_port()
                intake = Intake(work / f"intake-{size}-{n}", port)
                started = time.perf_counter()
                intake_s = smtp_source(port, args.count, size, n)
                stored_end, backlog = intake.counts()
                int_lat = latency(port, args.latency_count, size, n)
                stored, pending = intake.counts()
                elapsed = time.perf_counter() - started
                # Processing alone, once the senders are done (bounded: --drain-seconds).
                drain_started, drain_from = time.perf_counter(), pending
                while pending and time.perf_counter() - drain_started < args.drain_seconds:
                    time.sleep(0.25)
                    pending = intake.counts()[1]
                drained = time.perf_counter() - drain_started
                rc = intake.stop()
                accepted = args.count + args.latency_count
                processed = stored - drain_from
                bare_rate, memo_rate, intake_rate = args.count / bare_s, args.count / memo_s, args.count / intake_s
                print(f"{size // 1024:>4}K {n:>5} | {bare_rate:>6.0f} {bare_lat[0]:>5.1f} {bare_lat[1]:>5.1f} | "
                      f"{memo_rate:>6.0f} | {intake_rate:>6.0f} {int_lat[0]:>5.1f} {int_lat[1]:>5.1f} | "
                      f"{intake_rate / bare_rate:>5.0%} {intake_rate / memo_rate:>6.0%} | "
                      f"{stored:>5}/{accepted:<5} {backlog:>7} {processed / elapsed:>5.0f} "
                      f"{(drain_from - pending) / max(1e-9, drained):>5.0f} {drained:>6.1f}s {pending:>4}"
                      + ("" if rc == 0 else f"  (serve exited {rc})"), flush=True)
                if stored != accepted:
                    print(f"  !! {accepted} messages answered 250 but {stored} stored", flush=True)
    finally:
        for proc in (bare, memo):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    print("bare: stock aiosmtpd; bare+: with intake's remembered address parse; msg/s, DATA latency in ms;")
    print("ratio: intake / bare (the target: >= 75 % at 10 connections); ratio+: intake / bare+ (intake's own cost);")
    print("backlog: spooled or received, not yet processed, when smtp-source finished (processing follows the 250);")
    print("proc: messages processed per second while receiving; after: per second once sending stopped;")
    print("drained: time from the end of sending until nothing waited; left: still waiting then.")
    if args.keep:
        print(f"work files: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
