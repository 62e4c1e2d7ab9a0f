"""Ingest benchmark (foundation issue): `intake ingest DIR` over generated mixed mail.

Prints messages/second end to end (store + process, SQLite with durable commits), CPU
time per message and the peak memory of the ingest process, for two sizes so that the
growth of memory with the number of messages shows. Two setups: the shipped rules and
templates (every new case queues an acknowledgement and an agent notice), and the same
with notifications off (the foundation's flow: store, parse, classify, thread, route).

    python bench/ingest_bench.py                 # 2,000 and 10,000 messages
    python bench/ingest_bench.py --counts 500    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import mailgen  # noqa: E402


_MEASURE = """
import json, resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"cpu": u.ru_utime + u.ru_stime, "maxrss_kb": u.ru_maxrss}), file=sys.stderr)
sys.exit(rc)
"""


def run(count: int, work: Path, notify: bool) -> dict[str, float]:
    mails = work / f"mails-{count}"
    if not mails.exists():
        mailgen.generate(mails, count)
    inst = work / f"inst-{count}-{'notify' if notify else 'quiet'}"
    inst.mkdir()
    (inst / "intake.toml").write_text(
        f'[database]\nurl = "sqlite:///{inst / "intake.db"}"\n[smtp]\nlisten = ""\n'
        f'[rules]\npath = "{ROOT / "intake" / "shipped" / "routing_rules"}"\n[templates]\npath = "{ROOT / "intake" / "shipped" / "templates"}"\n'
        f'[outbound]\npath = "{inst / "outbox"}"\n'
        + ("" if notify else "[notify]\nack = false\nnotify_agents = false\n"), "utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "intake", "--log-level", "WARNING", "--config", str(inst / "intake.toml")]
    # Create the schema first so that the timing is ingest only.
    subprocess.run(cmd + ["db", "upgrade"], env=env, check=True, capture_output=True)
    # A fresh wrapper per run: its RUSAGE_CHILDREN is this one ingest only (peak memory included).
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd, "ingest", str(mails)], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed ({proc.returncode}): {proc.stderr[-2000:]}")
    usage = json.loads(proc.stderr.strip().splitlines()[-1])
    states: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            states[parts[2]] = states.get(parts[2], 0) + 1
    listed = subprocess.run(cmd + ["cases", "list", "--json"], env=env, capture_output=True, text=True, check=True)
    cpu = usage["cpu"]
    return {
        "messages": count,
        "seconds": wall,
        "msgs_per_s": count / wall,
        "cpu_ms_per_msg": cpu / count * 1000,
        "peak_rss_mb": usage["maxrss_kb"] / 1024,
        "cases": len(json.loads(listed.stdout)),
        "states": states,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[2000, 10000])
    args = ap.parse_args()
    print(f"{'setup':<14} {'messages':>9} {'seconds':>8} {'msgs/s':>8} {'CPU ms/msg':>10} {'peak MB':>8} "
          f"{'cases':>6}  states")
    with tempfile.TemporaryDirectory(prefix="intake-bench-") as tmp:
        for notify in (False, True):
            for count in args.counts:
                r = run(count, Path(tmp), notify)
                setup = "notifications" if notify else "no notify"
                print(f"{setup:<14} {r['messages']:>9} {r['seconds']:>8.1f} {r['msgs_per_s']:>8.0f} "
                      f"{r['cpu_ms_per_msg']:>10.2f} {r['peak_rss_mb']:>8.0f} {r['cases']:>6}  {r['states']}",
                      flush=True)
    print("peak MB: the ingest process's maximum resident set (ru_maxrss).")


if __name__ == "__main__":
    main()
