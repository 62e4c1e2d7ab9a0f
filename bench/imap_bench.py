"""IMAP intake figures against a private Dovecot (needs the `dovecot` binary, run as root).

1. Drain: 10,000 messages waiting in INBOX, `intake serve` started: time until every one
   is stored and moved (edge) and until every one is a case (end to end), messages per
   second, peak memory of serve and its worker processes together.
   Then the IMAP side alone (one drain in process, no processing meanwhile).
2. IDLE latency: serve running and idle; 50 messages appended one at a time; time from
   the APPEND's completion to the case existing, p50 and p99.

    .venv/bin/python bench/imap_bench.py [--messages 10000] [--idle 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from dovecot import Dovecot, imap_toml, password_env  # noqa: E402
from mailfactory import make_mail  # noqa: E402
from proctree import PeakRss  # noqa: E402

from conftest import intake_env, write_config  # noqa: E402
from intake.db import Store  # noqa: E402
from intake.states import InboundState  # noqa: E402

RECEIVED = InboundState.RECEIVED

BASE = tempfile.mkdtemp(prefix="intake-bench-")  # every installation of this run; removed at the end


def _serve(cfg: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(cfg.parent / "serve.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "intake", "--config", str(cfg), "--log-level", "WARNING", "serve"],
                            stdout=log, stderr=subprocess.STDOUT, env=intake_env(**env), cwd=str(cfg.parent))


def _wait(what: str, check, timeout: float, poll: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll)
    raise SystemExit(f"gave up waiting for {what}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def bench_drain(server: Dovecot, n: int) -> None:
    folder = Path(tempfile.mkdtemp(dir=BASE))
    cfg = write_config(folder, imap_toml(server, batch_size=100))
    mails = [make_mail(subject=f"Bench {i}", body=f"Hello,\nmessage number {i} of the backlog.\n" * 5)
             for i in range(n)]
    server.maildir_deliver(mails)
    del mails
    store = Store(f"sqlite:///{folder / 'intake.db'}")
    t0 = time.monotonic()
    proc = _serve(cfg, password_env(server))
    memory = PeakRss(proc.pid)
    _wait("INBOX drained", lambda: server.count("INBOX") == 0, 1800, poll=0.25)
    t_edge = time.monotonic() - t0
    _wait("every case", lambda: _count(store) >= n and _count(store, RECEIVED) == 0, 3600, poll=0.25)
    t_cases = time.monotonic() - t0
    memory.stop()
    _stop(proc)
    with store.read() as tx:
        cases = len(tx.cases.list())
    store.close()
    print(f"drain of {n} messages (serve start included):")
    print(f"  stored and moved (edge):  {t_edge:7.1f} s  {n / t_edge:7.0f} msgs/s")
    print(f"  every one a case:         {t_cases:7.1f} s  {n / t_cases:7.0f} msgs/s   ({cases} cases)")
    print(f"  peak memory of intake serve: {memory.total_mb:4.0f} MB in {memory.processes} processes "
          f"(serve, its workers, multiprocessing's tracker); largest one {memory.largest_mb:.0f} MB")


def bench_edge_only(server: Dovecot, n: int) -> None:
    """The IMAP side alone: one drain in this process, nothing processed meanwhile."""
    from intake.app import open_app
    from intake.config import load_config
    from intake.edges.imap import ImapPoller

    folder = Path(tempfile.mkdtemp(dir=BASE))
    os.environ.update(password_env(server))
    app = open_app(load_config(write_config(folder, imap_toml(server, batch_size=100))), create=True)
    server.maildir_deliver([make_mail(subject=f"Edge {i}") for i in range(n)])
    poller = ImapPoller(app.store, app.cfg.imap[0])
    t0 = time.monotonic()
    result = poller.poll_once()
    elapsed = time.monotonic() - t0
    poller.close()
    app.close()
    print(f"edge only, {n} messages stored and moved, no processing meanwhile:")
    print(f"  {elapsed:7.1f} s  {result.stored / elapsed:7.0f} msgs/s")


def bench_idle(server: Dovecot, n: int) -> None:
    folder = Path(tempfile.mkdtemp(dir=BASE))
    cfg = write_config(folder, imap_toml(server, user="billing", mailbox="billing@example.com"))
    store = Store(f"sqlite:///{folder / 'intake.db'}")
    proc = _serve(cfg, password_env(server))

    def idle() -> bool:
        try:
            with store.read() as tx:
                return any(s.name == "imap:billing" and s.state == "idle" for s in tx.ops.statuses())
        except Exception:  # noqa: BLE001 - tables appear after serve migrated
            return False

    _wait("poller in IDLE", idle, 60)
    client = server.client("billing")
    latencies = []
    for i in range(n):
        client.append("INBOX", make_mail(subject=f"Idle {i}", to="billing@example.com"))
        t0 = time.monotonic()
        _wait(f"case {i + 1}", lambda i=i: _count(store) > i and _count(store, RECEIVED) == 0, 60,
              poll=0.005)
        latencies.append(time.monotonic() - t0)
    client.logout()
    _stop(proc)
    store.close()
    print(f"IDLE latency, APPEND done → case stored, {n} messages:")
    print(f"  p50 {statistics.median(latencies) * 1000:6.0f} ms   p99 {_pct(latencies, 99) * 1000:6.0f} ms   "
          f"max {max(latencies) * 1000:6.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--idle", type=int, default=50)
    args = ap.parse_args()
    server = Dovecot({"test": "secret", "billing": "secret2"})
    server.start()
    try:
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (shared with other work)")
        bench_drain(server, args.messages)
        bench_edge_only(server, args.messages)
        bench_idle(server, args.idle)
    finally:
        server.cleanup()
        shutil.rmtree(BASE, ignore_errors=True)


def _count(store: Store, state: str | None = None) -> int:
    with store.read() as tx:
        return tx.inbound.count(state)


if __name__ == "__main__":
    main()

