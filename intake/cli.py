"""The ``intake`` command (DESIGN.md 6)."""

from __future__ import annotations

import json
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from intake.app import App, open_app, setup_logging
from intake.config import ConfigError
from intake.rules import RulesError
from intake.store import QUARANTINED, StoreUnavailable

EX_USAGE = 64
EX_TEMPFAIL = 75


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _cut(text: str, limit: int) -> str:
    if _width(text) <= limit:
        return text
    out, w = "", 0
    for ch in text:
        cw = _width(ch)
        if w + cw > limit - 1:
            return out + "…"
        out, w = out + ch, w + cw
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 50) -> str:
    """A plain-text table that lines up Japanese (double-width) text too."""
    cells = [[_cut("" if v is None else str(v), max_width) for v in r] for r in rows]
    widths = [max([_width(h)] + [_width(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v + " " * (widths[i] - _width(v)) for i, v in enumerate(values)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _open(ctx: click.Context, **kw: Any) -> App:
    try:
        app = open_app(ctx.obj.get("config"), **kw)
    except (ConfigError, RulesError) as exc:
        raise click.ClickException(str(exc)) from None
    except StoreUnavailable as exc:
        raise click.ClickException(f"database unavailable: {exc}") from None
    ctx.call_on_close(app.close)
    return app


@click.group()
@click.option("--config", "-c", type=click.Path(dir_okay=False), envvar="INTAKE_CONFIG",
              help="TOML config file (default: embedded defaults).")
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
@click.pass_context
def cli(ctx: click.Context, config: str | None, log_level: str) -> None:
    """intake: mail- and message-driven case intake for customer support."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    setup_logging(log_level)


@cli.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the listeners, the processor and the periodic jobs in one process."""
    from intake.service import serve as run_service

    app = _open(ctx)
    ctx.exit(run_service(app))


@cli.command()
@click.option("--mailbox", "mailbox", help="Mailbox the message was delivered to (default: from its headers).")
@click.option("--channel", default="email", show_default=True)
@click.argument("files", nargs=-1, required=True)
@click.pass_context
def ingest(ctx: click.Context, mailbox: str | None, channel: str, files: tuple[str, ...]) -> None:
    """Store .eml FILEs (or - for standard input) and process them.

    Exit 0 once every message is stored (whatever processing decided), 75 when one
    could not be stored (an MTA retries), 64 on a usage error.
    """
    try:
        app = _open(ctx)
    except click.ClickException as exc:
        click.echo(f"intake ingest: {exc.message}", err=True)
        ctx.exit(EX_TEMPFAIL)
        return
    if mailbox and app.cfg.mailbox_for(mailbox) is None:
        click.echo(f"intake ingest: {mailbox} is not one of our mailboxes", err=True)
        ctx.exit(EX_USAGE)
    raws: list[tuple[str, bytes]] = []
    for f in files:
        try:
            raws.append((f, sys.stdin.buffer.read() if f == "-" else Path(f).read_bytes()))
        except OSError as exc:
            click.echo(f"intake ingest: {f}: {exc.strerror}", err=True)
            ctx.exit(EX_USAGE if isinstance(exc, (FileNotFoundError, IsADirectoryError)) else EX_TEMPFAIL)
    proc = app.processor
    for name, raw in raws:
        target = mailbox or _mailbox_from_headers(app, raw)
        try:
            inbound_id = app.store.receive(raw, channel=channel, mailbox=target, envelope_to=[target],
                                           source={"ingest": name})
        except StoreUnavailable as exc:
            click.echo(f"intake ingest: {name}: cannot store now: {exc}", err=True)
            ctx.exit(EX_TEMPFAIL)
            return
        try:
            outcome = proc.process(inbound_id)
        except StoreUnavailable as exc:
            # Stored but not processed: `serve` or the next ingest picks it up.
            click.echo(f"{name}: stored as #{inbound_id}; processing deferred ({exc})")
            continue
        case = f" {outcome.case_number}" if outcome.case_number else ""
        click.echo(f"{name}: #{inbound_id} {outcome.state}{case}{' — ' + outcome.reason if outcome.reason else ''}")


def _mailbox_from_headers(app: App, raw: bytes) -> str:
    """The first of our mailboxes named in Delivered-To/X-Original-To/To/Cc."""
    from email.parser import BytesHeaderParser
    from email.policy import compat32
    from email.utils import getaddresses

    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    for name in ("Delivered-To", "X-Original-To", "To", "Cc"):
        for _, addr in getaddresses([str(v) for v in headers.get_all(name, [])]):
            mb = app.cfg.mailbox_for(addr)
            if mb is not None:
                return mb.address
    return app.cfg.mailbox[0].address


# -- cases ---------------------------------------------------------------------------------


@cli.group()
def cases() -> None:
    """Read cases and their timeline."""


@cases.command("list")
@click.option("--queue")
@click.option("--status")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def cases_list(ctx: click.Context, queue: str | None, status: str | None, as_json: bool) -> None:
    """List cases, oldest first."""
    app = _open(ctx)
    views = app.store.list_cases(queue=queue, status=status)
    if as_json:
        click.echo(json.dumps([v.as_json() for v in views], ensure_ascii=False, indent=2))
        return
    tz = app.cfg.tz
    rows = [(v.number, v.status, v.priority, v.queue, v.assignee or "-", v.requester or "-",
             v.created_at.astimezone(tz).strftime("%Y-%m-%d %H:%M"), v.subject) for v in views]
    click.echo(table(["case", "status", "priority", "queue", "assignee", "requester", "created", "subject"], rows))
    click.echo(f"{len(views)} case(s)")


@cases.command("show")
@click.argument("number")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def cases_show(ctx: click.Context, number: str, as_json: bool) -> None:
    """Show one case (CASE-N) with its timeline."""
    app = _open(ctx)
    detail = app.store.case_detail(number)
    if detail is None:
        raise click.ClickException(f"no case {number}")
    if as_json:
        click.echo(json.dumps(detail, ensure_ascii=False, indent=2))
        return
    tz = app.cfg.tz
    from datetime import datetime

    def when(iso: str) -> str:
        return datetime.fromisoformat(iso).astimezone(tz).strftime("%Y-%m-%d %H:%M")

    click.echo(f"{detail['number']}  {detail['subject']}")
    for key in ("status", "priority", "queue", "category", "assignee", "requester", "organization", "channel",
                "mailbox", "language"):
        value = detail.get(key)
        if key == "requester" and detail.get("requester_name"):
            value = f"{detail['requester_name']} <{value}>"
        click.echo(f"  {key:<13}{value if value not in (None, '') else '-'}")
    click.echo(f"  {'tags':<13}{', '.join(detail['tags']) or '-'}")
    click.echo(f"  {'participants':<13}{', '.join(detail['participants']) or '-'}")
    click.echo(f"  {'created':<13}{when(detail['created_at'])}   updated {when(detail['updated_at'])}")
    click.echo("\ntimeline:")
    for e in detail["timeline"]:
        head = f"  {when(e['at'])}  {e['type']}"
        if e["type"] == "message":
            arrow = "→" if e["direction"] == "out" else "←"
            vis = " (internal)" if e["visibility"] == "internal" else ""
            click.echo(f"{head} {arrow} {e['from']}{vis}: {e['subject']}")
            for line in (e.get("text") or "").strip().splitlines()[:20]:
                click.echo(f"      | {line}")
            for a in e.get("attachments", []):
                click.echo(f"      📎 {a['filename']} ({a['content_type']}, {a['size']} bytes)")
        else:
            extra = {k: v for k, v in e.items() if k not in ("at", "type")}
            click.echo(f"{head}  {json.dumps(extra, ensure_ascii=False)}" if extra else head)


# -- quarantine -------------------------------------------------------------------------------


@cli.group()
def quarantine() -> None:
    """Messages that failed to process."""


@quarantine.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def quarantine_list(ctx: click.Context, as_json: bool) -> None:
    """List quarantined messages with their error."""
    app = _open(ctx)
    recs = app.store.quarantined()
    if as_json:
        click.echo(json.dumps([{"id": r.id, "received_at": r.received_at.isoformat(), "mailbox": r.mailbox,
                                "channel": r.channel, "message_id": r.message_id, "from": r.from_address,
                                "subject": r.subject, "attempts": r.attempts, "error": r.error} for r in recs],
                              ensure_ascii=False, indent=2))
        return
    tz = app.cfg.tz
    rows = [(r.id, r.received_at.astimezone(tz).strftime("%Y-%m-%d %H:%M"), r.mailbox, r.from_address or "-",
             r.attempts, r.error) for r in recs]
    click.echo(table(["id", "received", "mailbox", "from", "tries", "error"], rows, max_width=70))
    click.echo(f"{len(recs)} quarantined message(s)")


@quarantine.command("retry")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Retry every quarantined message.")
@click.pass_context
def quarantine_retry(ctx: click.Context, ids: tuple[str, ...], all_: bool) -> None:
    """Process quarantined messages again (ID… or --all)."""
    if not ids and not all_:
        raise click.UsageError("give message ids or --all")
    app = _open(ctx)
    targets = [r.id for r in app.store.quarantined()] if all_ else []
    for raw_id in ids:
        if not raw_id.isdigit():
            raise click.UsageError(f"not a message id: {raw_id}")
        targets.append(int(raw_id))
    proc = app.processor
    failed = 0
    for inbound_id in targets:
        if not app.store.requeue(inbound_id):
            click.echo(f"#{inbound_id}: not quarantined")
            failed += 1
            continue
        outcome = proc.process(inbound_id)
        case = f" {outcome.case_number}" if outcome.case_number else ""
        click.echo(f"#{inbound_id}: {outcome.state}{case}{' — ' + outcome.reason if outcome.reason else ''}")
        failed += outcome.state == QUARANTINED
    ctx.exit(1 if failed else 0)


# -- periodic jobs -----------------------------------------------------------------------------


@cli.command()
@click.option("--at", "at", help="Run as of this ISO 8601 time (default: now).")
@click.pass_context
def tick(ctx: click.Context, at: str | None) -> None:
    """Run every periodic job once (SLA, escalation, auto-close, outbox, IMAP poll…)."""
    from datetime import datetime, timezone

    from intake.scheduler import tick as run_tick
    from intake.store import utcnow

    when = utcnow()
    if at:
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            raise click.UsageError(f"--at: not an ISO 8601 time: {at}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
    app = _open(ctx)
    failed = False
    for name, summary in run_tick(app, when):
        click.echo(f"{name}: {summary}")
        failed |= summary.startswith("failed:")
    ctx.exit(1 if failed else 0)


# -- status -------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Each listener, poller and process: state, last success, backlog, last error."""
    from intake.store import RECEIVED

    app = _open(ctx, load_rule_files=False)
    rows = {v.name: v for v in app.store.statuses()}
    names = list(rows)
    # Configured pollers that never reported (serve not started yet) still get a line.
    names += [f"imap:{a.account}" for a in app.cfg.imap if f"imap:{a.account}" not in rows]
    received = app.store.count_inbound(RECEIVED)
    out = []
    for name in sorted(names, key=lambda n: (n == "processor", n)):
        v = rows.get(name)
        out.append({
            "name": name,
            "state": v.state if v else "not started",
            "updated_at": v.updated_at.isoformat() if v else None,
            "last_success_at": v.last_success_at.isoformat() if v and v.last_success_at else None,
            # The processor's backlog is counted now: records still waiting to be processed.
            "backlog": received if name == "processor" else (v.backlog if v else None),
            "last_error": v.last_error if v else None,
            "last_error_at": v.last_error_at.isoformat() if v and v.last_error_at else None,
        })
    if as_json:
        click.echo(json.dumps(out, ensure_ascii=False, indent=2))
        return
    from datetime import datetime

    tz = app.cfg.tz

    def when(iso: str | None) -> str:
        return datetime.fromisoformat(iso).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") if iso else "-"

    lines = [(o["name"], o["state"], when(o["last_success_at"]), "-" if o["backlog"] is None else o["backlog"],
              when(o["updated_at"]),
              f"{when(o['last_error_at'])} {o['last_error']}" if o["last_error"] else "-") for o in out]
    click.echo(table(["component", "state", "last success", "backlog", "updated", "last error"], lines,
                     max_width=90))


# -- database -----------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply schema migrations (Alembic)."""
    app = _open(ctx, upgrade_sqlite=False, load_rule_files=False)
    app.store.upgrade()
    from intake.store import current_revision

    click.echo(f"database at revision {', '.join(sorted(current_revision(app.store.engine)))}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point; usage errors exit 64 (EX_USAGE) as MTAs expect."""
    try:
        rv = cli.main(args=list(argv) if argv is not None else None, prog_name="intake", standalone_mode=False)
    except click.UsageError as exc:
        exc.show()
        sys.exit(EX_USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
