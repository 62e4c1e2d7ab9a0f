"""SMTP intake throughput: Postfix's smtp-source against `intake serve` and a bare aiosmtpd.

    .venv/bin/python bench/smtp_bench.py [--count 10000] [--sizes 4096,51200] [--connections 1,10,50]
        [--repeat 3] [--skip-bare] [--before DIR]
    .venv/bin/python bench/smtp_bench.py --ehlo-attack 20x8 [--before DIR]

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

What the SMTP limits cost (issue 15), in the same run: (b) runs with the ``[smtp]``
limits at their defaults, but for 200 sessions per address (smtp-source is one address
opening up to 50 at once); (c) `intake serve` with the limits effectively off (the same
code; a command line may be as long as a message, 300 s timeouts as aiosmtpd's default,
no per-address or session limit in reach), receiving the same load; ``cost`` is
1 - (b)/(c). ``--repeat N`` runs (b) and (c) N times each, alternately, and compares
their medians (single runs vary by a quarter). ``--before DIR`` adds (d): an earlier
intake source tree (e.g.
``git archive REV | tar -x -C DIR``) run the same way, for the cost of the new code too.
Besides messages/second, each of these prints the CPU time serve's own process (the
listener's; processing runs in its children) spent per message accepted: on a machine
shared with other work the rate swings by a quarter from run to run, the CPU time much
less, so a cost of a few per cent shows there first.

``--ehlo-attack NxM`` measures instead what N connections each sending an EHLO line of M
MB do to serve's resident memory (VmRSS): before, while the lines are in flight, at the
peak and after the sessions closed (issue 15: 95 x 24 MB took serve to 2.4 GB).

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


# The [smtp] limits at their defaults, but for the sessions one address may open: one load
# generator opens up to 50 at once, and a session still closing (the readiness probe's)
# would make the 50th a 421. The check costs the same whatever its value.
LIMITS = """
max_connections_per_ip = 200
"""
# The [smtp] limits at values that never act on this load: what the listener was before them.
NO_LIMITS = """
max_command_line = "25MB"
max_connections_per_ip = 100000
max_session_time = "3650d"
command_timeout = "300s"
data_timeout = "300s"
"""


class Intake:
    def __init__(self, folder: Path, port: int, smtp_extra: str = "", root: Path = ROOT) -> None:
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
            {textwrap.indent(smtp_extra.strip(), " " * 12).lstrip()}
            [[mailbox]]
            address = "{RCPT}"
            [outbound]
            path = "{folder / 'outbox'}"
            """), "utf-8")
        env = dict(os.environ, PYTHONPATH=str(root))
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

    def cpu_seconds(self) -> float:
        """CPU time (user + system) serve's own process has used: the listener's, not its workers'."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.store.close()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=300)
        self.log.close()
        return rc


# -- memory under long command lines ---------------------------------------------------------


def rss_mib(pid: int) -> float:
    """A process's resident memory (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmRSS for {pid}")


def ehlo_attack(folder: Path, connections: int, megabytes: int, root: Path = ROOT) -> str:
    """What ``connections`` sessions each sending an EHLO line of ``megabytes`` MB do to
    the resident memory of a fresh `intake serve` (the tree at ``root``, default config)."""
    intake = Intake(folder, free_port(), "", root)
    pid = intake.proc.pid
    socks = [socket.create_connection(("127.0.0.1", intake.port), timeout=60) for _ in range(connections)]
    try:
        admitted = [s for s in socks if s.recv(512).startswith(b"220")]
        before = peak = rss_mib(pid)
        line = b"EHLO " + b"x" * (megabytes * 1024 * 1024)
        for s in admitted:  # no line end yet: every line is in flight at once
            s.sendall(line)
            peak = max(peak, rss_mib(pid))
        in_flight = rss_mib(pid)
        replies = set()
        for s in admitted:
            s.sendall(b"\r\n")
            replies.add(s.recv(512).decode("ascii", "replace").strip())
            peak = max(peak, rss_mib(pid))
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 2  # the listener notices the closed sessions
    while time.monotonic() < deadline:
        peak = max(peak, rss_mib(pid))
        time.sleep(0.1)
    after = rss_mib(pid)
    intake.stop()
    return (f"{len(admitted)} of {connections} sessions admitted; RSS {before:.0f} MiB before, {in_flight:.0f} with "
            f"the lines in flight, {peak:.0f} at the peak, {after:.0f} after the sessions closed; replies {sorted(replies)}")


# -- load and latency ------------------------------------------------------------------------


def intake_rate(folder: Path, count: int, size: int, connections: int, smtp_extra: str = "",
                root: Path = ROOT) -> tuple[float, float]:
    """Messages per second a fresh `intake serve` accepted from smtp-source, and the CPU
    milliseconds its listener's process spent per message meanwhile."""
    intake = Intake(folder, free_port(), smtp_extra, root)
    try:
        cpu = intake.cpu_seconds()
        rate = count / smtp_source(intake.port, count, size, connections)
        return rate, (intake.cpu_seconds() - cpu) / count * 1000
    finally:
        intake.stop()


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
        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if not line or line[3:4] != b"-":
                    return line

        async def cmd(text: bytes) -> bytes:
            writer.write(text + b"\r\n")
            return await reply()

        for attempt in range(50):  # as an MTA does: 421 (smtp-source's sessions still closing), again later
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if (await reply()).startswith(b"220"):
                break
            writer.close()
            await asyncio.sleep(0.1)
        else:
            raise SystemExit("latency client: no session in 50 attempts")
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
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of intake with and without the SMTP limits per cell; their medians are compared")
    ap.add_argument("--skip-bare", action="store_true", help="no bare server: intake with and without the limits only")
    ap.add_argument("--before", type=Path, help="an earlier intake source tree, run as a further variant")
    ap.add_argument("--ehlo-attack", metavar="NxM", help="instead: N connections sending M MB EHLO lines; serve's memory")
    ap.add_argument("--keep", action="store_true", help="keep the installations (databases, logs)")
    ap.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--memo", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server:
        run_bare_server(args.bare_server, args.memo)
        return 0
    if args.ehlo_attack:
        n, mb = (int(x) for x in args.ehlo_attack.lower().split("x"))
        work = Path(tempfile.mkdtemp(prefix="intake-smtp-bench-"))
        try:
            print(f"EHLO lines of {mb} MB over {n} connections, default [smtp] config")
            print(f"this tree:   {ehlo_attack(work / 'now', n, mb)}", flush=True)
            if args.before:
                print(f"--before:    {ehlo_attack(work / 'before', n, mb, args.before.resolve())}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    if shutil.which("smtp-source") is None:
        print("smtp-source not found: install Debian's postfix package (see this script's docstring)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    conns = [int(c) for c in args.connections.split(",")]
    work = Path(tempfile.mkdtemp(prefix="intake-smtp-bench-"))
    bare = memo = None
    if not args.skip_bare:
        bare_port, memo_port = free_port(), free_port()
        bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(bare_port)])
        memo = subprocess.Popen([sys.executable, __file__, "--bare-server", str(memo_port), "--memo"])
        wait_listening(bare_port, bare)
        wait_listening(memo_port, memo)
    print(f"smtp-source -d, {args.count} messages per cell; DATA latency from {args.latency_count} messages; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
          + (f"; intake with and without the limits {args.repeat} times each (medians)" if args.repeat > 1 else ""))
    head = (f"{'size':>5} {'conns':>5} | {'bare':>6} {'p50':>5} {'p99':>5} | {'bare+':>6} | {'intake':>6} {'p50':>5} "
            f"{'p99':>5} | {'ratio':>5} {'ratio+':>6} | {'stored/acc':>11} {'backlog':>7} {'proc':>5} {'after':>5} "
            f"{'drained':>7} {'left':>4} | {'nolim':>6} {'cost':>5} | {'cpu':>5} {'cpu-':>5} {'cost':>6}"
            + (f" | {'before':>6} {'vs bef':>6} {'cpu':>5} {'vs bef':>6}" if args.before else ""))
    print(head)
    print("-" * len(head))
    try:
        for size in sizes:
            for n in conns:
                bare_cols = f"{'-':>6} {'-':>5} {'-':>5} | {'-':>6}"
                ratios = f"{'-':>5} {'-':>6}"
                if bare is not None:
                    bare_s = smtp_source(bare_port, args.count, size, n)
                    bare_lat = latency(bare_port, args.latency_count, size, n)
                    memo_s = smtp_source(memo_port, args.count, size, n)
                port = free_port()
                intake = Intake(work / f"intake-{size}-{n}", port, LIMITS)
                started = time.perf_counter()
                cpu_started = intake.cpu_seconds()
                intake_s = smtp_source(port, args.count, size, n)
                intake_cpu = (intake.cpu_seconds() - cpu_started) / args.count * 1000
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
                # The same load with the limits effectively off (and from --before), alternating.
                limited, unlimited, before = [(args.count / intake_s, intake_cpu)], [], []
                for r in range(args.repeat):
                    unlimited.append(intake_rate(work / f"nolim-{size}-{n}-{r}", args.count, size, n, NO_LIMITS))
                    if args.before:
                        before.append(intake_rate(work / f"before-{size}-{n}-{r}", args.count, size, n,
                                                  root=args.before.resolve()))
                    if r + 1 < args.repeat:
                        limited.append(intake_rate(work / f"lim-{size}-{n}-{r}", args.count, size, n, LIMITS))
                int_rate, nolim_rate = (statistics.median(r for r, _ in runs) for runs in (limited, unlimited))
                int_cpu, nolim_cpu = (statistics.median(c for _, c in runs) for runs in (limited, unlimited))
                if bare is not None:
                    bare_rate, memo_rate = args.count / bare_s, args.count / memo_s
                    bare_cols = (f"{bare_rate:>6.0f} {bare_lat[0]:>5.1f} {bare_lat[1]:>5.1f} | {memo_rate:>6.0f}")
                    ratios = f"{int_rate / bare_rate:>5.0%} {int_rate / memo_rate:>6.0%}"
                extra = ""
                if before:
                    before_rate = statistics.median(r for r, _ in before)
                    before_cpu = statistics.median(c for _, c in before)
                    extra = (f" | {before_rate:>6.0f} {1 - int_rate / before_rate:>6.1%} {before_cpu:>5.3f} "
                             f"{int_cpu / before_cpu - 1:>6.1%}")
                print(f"{size // 1024:>4}K {n:>5} | {bare_cols} | {int_rate:>6.0f} {int_lat[0]:>5.1f} {int_lat[1]:>5.1f} | "
                      f"{ratios} | {stored:>5}/{accepted:<5} {backlog:>7} {processed / elapsed:>5.0f} "
                      f"{(drain_from - pending) / max(1e-9, drained):>5.0f} {drained:>6.1f}s {pending:>4} | "
                      f"{nolim_rate:>6.0f} {1 - int_rate / nolim_rate:>5.1%} | {int_cpu:>5.3f} {nolim_cpu:>5.3f} "
                      f"{int_cpu / nolim_cpu - 1:>6.1%}{extra}"
                      + ("" if rc == 0 else f"  (serve exited {rc})"), flush=True)
                if args.repeat > 1:
                    def show(runs: list[tuple[float, float]]) -> str:
                        return "[" + ", ".join(f"{r:.0f}/{c:.3f}" for r, c in runs) + "]"
                    line = f"      runs (msg/s / cpu ms): limits {show(limited)}, no limits {show(unlimited)}"
                    print(line + (f", before {show(before)}" if before else ""), flush=True)
                if stored != accepted:
                    print(f"  !! {accepted} messages answered 250 but {stored} stored", flush=True)
    finally:
        for proc in (bare, memo):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    print("bare: stock aiosmtpd; bare+: with intake's remembered address parse; msg/s, DATA latency in ms;")
    print("ratio: intake / bare (the target: >= 75 % at 10 connections); ratio+: intake / bare+ (intake's own cost);")
    print("backlog: spooled or received, not yet processed, when smtp-source finished (processing follows the 250);")
    print("proc: messages processed per second while receiving; after: per second once sending stopped;")
    print("drained: time from the end of sending until nothing waited; left: still waiting then;")
    print("intake: with the [smtp] limits at their defaults (but 200 sessions per address, for one load generator);")
    print("nolim: the same code with the limits effectively off;")
    print("cost: 1 - intake / nolim (the target: below 5 %); cpu, cpu-: CPU ms per message of serve's own process")
    print("(the listener's) with and without the limits, and their cost: cpu / cpu- - 1"
          + ("; before: the --before source tree (msg/s, 1 - intake / before, cpu, cpu / cpu before - 1)."
             if args.before else "."))
    if args.keep:
        print(f"work files: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
