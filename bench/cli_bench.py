"""CLI latency (architecture issue): ``intake --help`` and ``intake cases list`` against the
imports they cannot avoid, measured with the same interpreter in the same run.

Targets, medians of 5 runs: ``--help`` ≤ 2 × ``python -c "import click"`` and
``cases list`` on 10,000 cases ≤ 1.5 × ``python -c "import sqlalchemy"``.

    python bench/cli_bench.py                 # 10,000 cases
    python bench/cli_bench.py --cases 2000    # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import mailgen  # noqa: E402


def median_seconds(cmd: list[str], runs: int, **kw: object) -> float:
    """Median wall time of ``runs`` runs (after one warm-up run that fills the OS caches)."""
    subprocess.run(cmd, capture_output=True, check=True, **kw)  # type: ignore[call-overload]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, **kw)  # type: ignore[call-overload]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    py = sys.executable
    script = Path(py).parent / "intake"
    intake = [str(script)] if script.exists() else [py, "-m", "intake"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="intake-cli-bench-") as tmp:
        work = Path(tmp)
        mails = work / "mails"
        mailgen.generate(mails, args.cases, replies=False)
        (work / "intake.toml").write_text(
            f'[database]\nurl = "sqlite:///{work / "intake.db"}"\n[smtp]\nlisten = ""\n'
            '[notify]\nack = false\nnotify_agents = false\n', "utf-8")
        cfg = ["--config", str(work / "intake.toml")]
        t0 = time.perf_counter()
        subprocess.run(intake + ["--log-level", "WARNING", *cfg, "ingest", str(mails)], capture_output=True,
                       check=True, env=env)
        listed = subprocess.run(intake + [*cfg, "cases", "list"], capture_output=True, text=True, check=True, env=env)
        count = listed.stdout.strip().splitlines()[-1]
        print(f"installation: {count} (made in {time.perf_counter() - t0:.0f} s)")
        rows = [
            ("python -c 'import click'", [py, "-c", "import click"]),
            ("intake --help", intake + ["--help"]),
            ("python -c 'import sqlalchemy'", [py, "-c", "import sqlalchemy"]),
            (f"intake cases list ({args.cases} cases)", intake + [*cfg, "cases", "list"]),
            ("intake cases list --json", intake + [*cfg, "cases", "list", "--json"]),
            ("intake cases list --status new --limit 20", intake + [*cfg, "cases", "list", "--status", "new",
                                                                     "--limit", "20"]),
        ]
        figures = {}
        print(f"{'command':<46} {'median s':>9}")
        for name, cmd in rows:
            figures[name] = median_seconds(cmd, args.runs, env=env, cwd=tmp)
            print(f"{name:<46} {figures[name]:>9.3f}", flush=True)
        help_ratio = figures["intake --help"] / figures["python -c 'import click'"]
        list_ratio = figures[f"intake cases list ({args.cases} cases)"] / figures["python -c 'import sqlalchemy'"]
        print(f"--help / import click:          {help_ratio:.2f}x (target <= 2)")
        print(f"cases list / import sqlalchemy: {list_ratio:.2f}x (target <= 1.5)")


if __name__ == "__main__":
    main()
