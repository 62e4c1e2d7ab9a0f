"""Periodic jobs: one table of jobs, run by APScheduler in ``serve`` and once by ``tick``.

The only module that imports APScheduler. A job is a plain function
``job(app, now) -> str`` (a one-line summary for the log and for ``intake tick``), so
cron users, operators and tests can run the scheduler's work on demand with
``intake tick [--at TIME]``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from intake.app import App

log = logging.getLogger("intake.scheduler")

JobFunc = Callable[["App", datetime], str]


@dataclass(frozen=True)
class Job:
    name: str
    func: JobFunc
    interval: float  # seconds between runs under `serve`


def _process_received(app: "App", now: datetime) -> str:
    """Fallback sweep: records left ``received`` (a crash, a database outage) are processed."""
    if app.processing_in_serve:
        return "processed continuously by serve's processor"
    if app.rules_error is not None:
        return "waiting: the rule files are refused (intake rules check shows why)"
    return f"{app.processor.process_pending()} received message(s) processed"


def _retention(app: "App", now: datetime) -> str:
    """Remove raw bytes and processing logs older than ``retention_days`` (0 keeps forever)."""
    days = app.cfg.cases.retention_days
    if days <= 0:
        return "retention off (retention_days = 0)"
    with app.store.transaction() as tx:
        purged = tx.inbound.purge_raw(now - timedelta(days=days), now)
    return f"{purged} raw message(s) older than {days} days removed"


def _deliver_outbox(app: "App", now: datetime) -> str:
    """Outbox delivery (``tick``; under ``serve`` a worker delivers continuously)."""
    if app.processing_in_serve:
        return "delivered continuously by serve's outbox sender"
    from intake.edges.outbox_sender import deliver_due

    return str(deliver_due(app.cfg, app.store, now))


def _poll_imap(app: "App", now: datetime) -> str:
    """Drain every [[imap]] account once (under `serve`: only those without a running poller)."""
    from intake.edges.imap import poll_accounts

    return poll_accounts(app.cfg, app.store, now)


# The job table, in the order `intake tick` runs them. Each capability adds its row here.
JOBS: list[Job] = [
    Job("imap-poll", _poll_imap, 60.0),
    Job("process-received", _process_received, 30.0),
    Job("retention", _retention, 3600.0),
    Job("outbox-delivery", _deliver_outbox, 60.0),
]


def tick(app: "App", at: datetime) -> list[tuple[str, str]]:
    """Run every job once as of ``at``; returns (job name, summary or error) pairs."""
    results = []
    for job in JOBS:
        try:
            summary = job.func(app, at)
        except Exception as exc:  # noqa: BLE001 - one failing job must not stop the others
            log.exception("job %s failed", job.name)
            summary = f"failed: {type(exc).__name__}: {exc}"
        results.append((job.name, summary))
    return results


async def run_scheduler(app: "App", stopping: asyncio.Event, clock: Callable[[], datetime]) -> None:
    """Run the job table on an AsyncIOScheduler in the current loop until ``stopping``."""
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    loop = asyncio.get_running_loop()
    scheduler = AsyncIOScheduler(event_loop=loop)

    def runner(job: Job) -> Callable[[], object]:
        async def run() -> None:
            # Jobs do blocking database work: run them off the loop.
            try:
                summary = await loop.run_in_executor(None, job.func, app, clock())
                log.debug("job %s: %s", job.name, summary)
            except Exception:  # noqa: BLE001
                log.exception("job %s failed", job.name)

        return run

    for job in JOBS:
        scheduler.add_job(runner(job), "interval", seconds=job.interval, id=job.name, max_instances=1,
                          coalesce=True)
    scheduler.start()
    try:
        await stopping.wait()
    finally:
        scheduler.shutdown(wait=False)
