"""Ingest benchmark (foundation issue): `intake ingest DIR` over generated mixed mail.

Prints messages/second end to end (store + process, SQLite with durable commits), CPU
time per message and the peak memory of the ingest process, for two sizes so that the
growth of memory with the number of messages shows.

    python bench/ingest_bench.py                 # 2,000 and 10,000 messages
    python bench/ingest_bench.py --counts 500    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import mailgen  # noqa: E402


def run(count: int, work: Path) -> dict[str, float]:
    mails = work / f"mails-{count}"
    mailgen.generate(mails, count)
    inst = work / f"inst-{count}"
    inst.mkdir()
    (inst / "intake.toml").write_text(
        f'[database]\nurl = "sqlite:///{inst / "intake.db"}"\n[smtp]\nlisten = ""\n'
        f'[rules]\npath = "{ROOT / "routing_rules"}"\n[templates]\npath = "{ROOT / "templates"}"\n'
        f'[outbound]\npath = "{inst / "outbox"}"\n', "utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "intake", "--log-level", "WARNING", "--config", str(inst / "intake.toml")]
    # Create the schema first so that the timing is ingest only.
    subprocess.run(cmd + ["db", "upgrade"], env=env, check=True, capture_output=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + ["ingest", str(mails)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed ({proc.returncode}): {proc.stderr[-2000:]}")
    states: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            states[parts[2]] = states.get(parts[2], 0) + 1
    listed = subprocess.run(cmd + ["cases", "list", "--json"], env=env, capture_output=True, text=True, check=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "messages": count,
        "seconds": wall,
        "msgs_per_s": count / wall,
        "cpu_ms_per_msg": cpu / count * 1000,
        "peak_rss_mb": after.ru_maxrss / 1024,
        "cases": len(json.loads(listed.stdout)),
        "states": states,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[2000, 10000])
    args = ap.parse_args()
    print(f"{'messages':>9} {'seconds':>8} {'msgs/s':>8} {'CPU ms/msg':>10} {'peak MB':>8} {'cases':>6}  states")
    with tempfile.TemporaryDirectory(prefix="intake-bench-") as tmp:
        for count in args.counts:
            r = run(count, Path(tmp))
            print(f"{r['messages']:>9} {r['seconds']:>8.1f} {r['msgs_per_s']:>8.0f} {r['cpu_ms_per_msg']:>10.2f} "
                  f"{r['peak_rss_mb']:>8.0f} {r['cases']:>6}  {r['states']}")
    print("peak MB is the ingest process's maximum resident set (ru_maxrss); the largest of the runs so far.")


if __name__ == "__main__":
    main()
