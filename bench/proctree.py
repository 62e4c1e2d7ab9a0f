"""Peak memory of a process and its children (``intake serve`` and its worker processes)."""

from __future__ import annotations

import threading
import time
from pathlib import Path


def _rss_kb(pid: int) -> int:
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return out


class PeakRss:
    """Samples the resident memory of a process tree until stopped: the peak of the sum
    over all its processes, and the peak of the largest single one (MB)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.total_mb = 0.0
        self.largest_mb = 0.0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = [_rss_kb(p) for p in _tree(self.pid)]
            sizes = [s for s in sizes if s]
            if sizes:
                self.total_mb = max(self.total_mb, sum(sizes) / 1024)
                self.largest_mb = max(self.largest_mb, max(sizes) / 1024)
                self.processes = max(self.processes, len(sizes))
            time.sleep(self.interval)

    def stop(self) -> "PeakRss":
        self._stop.set()
        self._thread.join()
        return self
