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
    """Store .eml FILEs (a folder means every file in it; - is standard input) and process them.

    Exit 0 once every message is stored (whatever processing decided), 75 when one
    could not be stored (an MTA retries), 64 on a usage error.
    """
    try:
        app = _open(ctx, load_rule_files=False)
    except click.ClickException as exc:
        click.echo(f"intake ingest: {exc.message}", err=True)
        ctx.exit(EX_TEMPFAIL)
        return
    # A rule typo must not cost mail: store it anyway and leave processing to `serve`,
    # which keeps routing with the last good rule set (or to the next ingest/tick).
    from intake.rules import load_rules

    rules_error: str | None = None
    try:
        app.ruleset = load_rules(app.cfg.path(app.cfg.rules.path))
    except RulesError as exc:
        rules_error = str(exc)
        click.echo(f"intake ingest: the rules do not load; messages are stored and processed later:\n{exc}",
                   err=True)
    if mailbox and app.cfg.mailbox_for(mailbox) is None:
        click.echo(f"intake ingest: {mailbox} is not one of our mailboxes", err=True)
        ctx.exit(EX_USAGE)
    paths: list[str] = []
    for f in files:
        if f != "-" and Path(f).is_dir():
            paths += sorted(str(p) for p in Path(f).iterdir() if p.is_file())
        elif f != "-" and not Path(f).exists():
            click.echo(f"intake ingest: {f}: no such file", err=True)
            ctx.exit(EX_USAGE)
        else:
            paths.append(f)
    proc = app.processor
    # Batches: one durable commit stores many messages, one more processes them; memory
    # stays bounded by the batch, not by the number of files.
    for start in range(0, len(paths), INGEST_BATCH):
        batch: list[tuple[str, bytes]] = []
        for name in paths[start : start + INGEST_BATCH]:
            try:
                batch.append((name, sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()))
            except OSError as exc:
                click.echo(f"intake ingest: {name}: {exc.strerror}", err=True)
                ctx.exit(EX_TEMPFAIL)
        items = []
        for name, raw in batch:
            target = mailbox or _mailbox_for_raw(app.cfg, raw)
            items.append((raw, {"channel": channel, "mailbox": target, "envelope_to": [target],
                                "source": {"ingest": name}}))
        try:
            ids = app.store.receive_many(items)
        except StoreUnavailable as exc:
            click.echo(f"intake ingest: cannot store now: {exc}", err=True)
            ctx.exit(EX_TEMPFAIL)
            return
        if rules_error is not None:
            for (name, _), inbound_id in zip(batch, ids):
                click.echo(f"{name}: stored as #{inbound_id}; processing deferred (the rules do not load)")
            continue
        try:
            outcomes = proc.process_batch(ids)
        except StoreUnavailable as exc:
            # Stored but not processed: `serve`, `tick` or the next ingest picks them up.
            click.echo(f"stored {len(ids)} message(s); processing deferred ({exc})")
            continue
        for (name, _), inbound_id, outcome in zip(batch, ids, outcomes):
            case = f" {outcome.case_number}" if outcome.case_number else ""
            click.echo(f"{name}: #{inbound_id} {outcome.state}{case}{' — ' + outcome.reason if outcome.reason else ''}")


INGEST_BATCH = 100


def _mailbox_for_raw(cfg: Any, raw: bytes) -> str:
    """The first of our mailboxes named in Delivered-To/X-Original-To/To/Cc."""
    from email.parser import BytesHeaderParser
    from email.policy import compat32
    from email.utils import getaddresses

    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    for name in ("Delivered-To", "X-Original-To", "To", "Cc"):
        for _, addr in getaddresses([str(v) for v in headers.get_all(name, [])]):
            mb = cfg.mailbox_for(addr)
            if mb is not None:
                return mb.address
    return cfg.mailbox[0].address


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
    app = _open(ctx, load_rule_files=False)
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
    app = _open(ctx, load_rule_files=False)
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


# -- routing rules ------------------------------------------------------------------------------


@cli.group()
def rules() -> None:
    """Routing rules: check, explain, stats."""


def _load_config(ctx: click.Context) -> Any:
    from intake.config import load_config

    try:
        return load_config(ctx.obj.get("config"))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@rules.command("check")
@click.argument("path", required=False, type=click.Path())
@click.pass_context
def rules_check(ctx: click.Context, path: str | None) -> None:
    """Validate rule files: PATH is a folder or one file (default: the configured folder).

    Every error is printed as file:line: message; the exit status is 1 when there is any.
    """
    from intake.rules import load_rules

    target = Path(path) if path else _load_config(ctx).path(_load_config(ctx).rules.path)
    if not target.exists():
        click.echo(f"{target}: no such file or folder", err=True)
        ctx.exit(1)
    try:
        ruleset = load_rules(target)
    except RulesError as exc:
        for line in exc.errors:
            click.echo(line, err=True)
        click.echo(f"{len(exc.errors)} error(s); nothing changes until they are fixed", err=True)
        ctx.exit(1)
        return
    if not ruleset.files:
        click.echo(f"{target}: no *.yaml rule files", err=True)
        ctx.exit(1)
    click.echo(f"{target}: OK: {ruleset.summary()}")


def _parse_at(at: str | None) -> Any:
    from datetime import datetime, timezone

    from intake.store import utcnow

    if not at:
        return utcnow()
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        raise click.UsageError(f"--at: not an ISO 8601 time: {at}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


@rules.command("explain")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--at", "at", help="Evaluate as of this ISO 8601 time (default: now; naive times are UTC).")
@click.option("--mailbox", "mailbox", help="Mailbox it arrived at (default: from its headers).")
@click.option("--channel", default="email", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def rules_explain(ctx: click.Context, file: str, at: str | None, mailbox: str | None, channel: str,
                  as_json: bool) -> None:
    """Dry run of FILE.eml: what the rules see, each rule's result, the final actions. Writes nothing."""
    from intake.rules.explain import explain, render

    cfg = _load_config(ctx)
    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        raise click.UsageError(f"{file}: {exc.strerror}") from None
    if mailbox and cfg.mailbox_for(mailbox) is None:
        raise click.UsageError(f"{mailbox} is not one of our mailboxes")
    try:
        report = explain(cfg, raw, mailbox=mailbox or _mailbox_for_raw(cfg, raw), channel=channel, now=_parse_at(at))
    except RulesError as exc:
        raise click.ClickException("the rules do not load:\n" + str(exc)) from None
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2, default=str))
    else:
        click.echo(render(report))


@rules.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def rules_stats(ctx: click.Context, as_json: bool) -> None:
    """Hit count and last hit of every rule, and the state of the last reload under serve."""
    from intake.rules import load_rules

    app = _open(ctx, load_rule_files=False)
    stats = app.store.rule_stats()
    state = app.store.rules_state()
    load_error = None
    try:
        current = load_rules(app.cfg.path(app.cfg.rules.path)).rules
    except RulesError as exc:
        current, load_error = (), str(exc)
    rows = []
    for r in current:
        hits, last = stats.pop(r.name, (0, None))
        rows.append({"rule": r.name, "at": r.at, "hits": hits, "last_hit": last.isoformat() if last else None,
                     "enabled": r.enabled, "current": True})
    for name, (hits, last) in sorted(stats.items()):
        rows.append({"rule": name, "at": None, "hits": hits, "last_hit": last.isoformat() if last else None,
                     "enabled": False, "current": False})
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    from datetime import datetime

    tz = app.cfg.tz
    shown = [(r["rule"] + ("" if r["current"] else " (no longer in the rules)") + ("" if r["enabled"] or not r["current"]
                                                                                  else " (disabled)"),
              r["at"] or "-", r["hits"],
              datetime.fromisoformat(r["last_hit"]).astimezone(tz).strftime("%Y-%m-%d %H:%M") if r["last_hit"] else "-")
             for r in rows]
    click.echo(table(["rule", "defined at", "hits", "last hit"], shown, max_width=60))
    if state:
        line = f"serve: rules {state.get('state')} at {state.get('at')}"
        if state.get("state") == "refused":
            line += f"; still using the set loaded at {state.get('loaded_at')}\n{state.get('error')}"
        click.echo(line)
    if load_error:
        click.echo(f"the rule files on disk do not load:\n{load_error}", err=True)


# -- diagnostics: what intake sees and what it did ----------------------------------------------


@cli.command("parse")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a public interface).")
@click.pass_context
def parse_cmd(ctx: click.Context, file: str, as_json: bool) -> None:
    """Show what intake sees in a mail, without storing anything."""
    from intake.diagnostics import parse_lines, parse_report

    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        raise click.UsageError(f"{file}: {exc.strerror}") from None
    app = _open(ctx, upgrade_sqlite=False)
    report = parse_report(raw, own_addresses=app.cfg.own_addresses, agents=app.ruleset.agent_addresses)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return
    for line in parse_lines(report):
        click.echo(line)


@cli.group()
def messages() -> None:
    """Every inbound message and its processing log."""


def _parse_since(value: str | None) -> Any:
    if not value:
        return None
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.UsageError(f"--since: not an ISO 8601 date or time: {value}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@messages.command("list")
@click.option("--state", type=click.Choice(["received", "processed", "duplicate", "dropped", "quarantined"]))
@click.option("--since", help="Only messages received at or after this ISO 8601 date/time (UTC unless given).")
@click.option("--from", "from_address", help="Only messages from this address.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def messages_list(ctx: click.Context, state: str | None, since: str | None, from_address: str | None,
                  as_json: bool) -> None:
    """List inbound messages: time, channel, mailbox, sender, subject, state, case."""
    when = _parse_since(since)
    app = _open(ctx)
    rows = app.store.list_inbound(state=state, since=when, from_address=from_address)
    if as_json:
        click.echo(json.dumps([{**r, "received_at": r["received_at"].isoformat()} for r in rows],
                              ensure_ascii=False, indent=2))
        return
    tz = app.cfg.tz
    click.echo(table(["id", "received", "channel", "mailbox", "from", "state", "case", "subject"],
                     [(r["id"], r["received_at"].astimezone(tz).strftime("%Y-%m-%d %H:%M:%S"), r["channel"],
                       r["mailbox"], r["from"] or r["envelope_from"] or "-", r["state"], r["case"] or "-",
                       r["subject"] or "") for r in rows]))
    click.echo(f"{len(rows)} message(s)")


@messages.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def messages_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """The processing log of one message (by id, by the S-id of an SMTP reply, or by Message-ID)."""
    from intake.diagnostics import log_lines

    app = _open(ctx)
    detail = app.store.inbound_detail(ref)
    if detail is None:
        raise click.ClickException(f"no inbound message {ref}" + (
            f" (a message answered 'queued as {ref}' shows here once the processor took it from the spool)"
            if ref[:1] in "Ss" else ""))
    if as_json:
        click.echo(json.dumps(detail, ensure_ascii=False, indent=2))
        return
    click.echo(f"inbound #{detail['id']}  {detail['state']}" + (f"  {detail['case']}" if detail["case"] else ""))
    click.echo(f"  Message-ID  <{detail['message_id']}>" if detail["message_id"] else "  Message-ID  (not parsed yet)")
    click.echo(f"  from        {detail['from'] or '-'} (envelope {detail['envelope_from'] or '-'})")
    click.echo(f"  to          {', '.join(detail['envelope_to']) or '-'} (mailbox {detail['mailbox']})")
    click.echo(f"  subject     {detail['subject'] or '-'}")
    click.echo(f"  size        {detail['size']} bytes, sha256 {detail['raw_sha256'][:16]}…"
               + ("" if detail["raw_kept"] else " (raw bytes removed by retention)"))
    click.echo("log:")
    for line in log_lines(detail["log"], app.cfg.tz):
        click.echo(line)
    if detail["outbox"]:
        click.echo("mails it caused:")
        for o in detail["outbox"]:
            error = f" — {o['last_error']}" if o["last_error"] else ""
            click.echo(f"  outbox #{o['id']}  {o['template']} to {o['to']}: {o['state']}"
                       f" ({o['attempts']} attempt(s)){error}")
    if detail["state"] == QUARANTINED and detail["traceback"]:
        click.echo("error:")
        click.echo(detail["traceback"].rstrip())


@messages.command("raw")
@click.argument("ref")
@click.pass_context
def messages_raw(ctx: click.Context, ref: str) -> None:
    """Write the raw bytes of a message exactly as received (redirect to a .eml file)."""
    app = _open(ctx)
    detail = app.store.inbound_detail(ref)
    if detail is None:
        raise click.ClickException(f"no inbound message {ref}")
    raw = app.store.inbound_raw(detail["id"])
    if raw is None:
        raise click.ClickException(f"inbound #{detail['id']}: raw bytes were removed by retention")
    sys.stdout.buffer.write(raw)
    sys.stdout.buffer.flush()
# -- outbox ------------------------------------------------------------------------------------


@cli.group()
def outbox() -> None:
    """Outgoing mail and its state."""


@outbox.command("list")
@click.option("--state", type=click.Choice(["queued", "sending", "sent", "failed", "bounced"]))
@click.option("--case", "case", help="Only the mail of this case (CASE-N).")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def outbox_list(ctx: click.Context, state: str | None, case: str | None, limit: int, as_json: bool) -> None:
    """List outgoing mail, newest first."""
    from intake.store import list_outbox

    app = _open(ctx)
    items = list_outbox(app.store, state=state, case=case, limit=limit)
    if as_json:
        click.echo(json.dumps([i.as_json() for i in items], ensure_ascii=False, indent=2))
        return
    tz = app.cfg.tz
    rows = [(i.id, i.case or "-", i.template, i.recipient, i.state, i.attempts,
             i.created_at.astimezone(tz).strftime("%Y-%m-%d %H:%M"),
             (i.sent_at.astimezone(tz).strftime("%Y-%m-%d %H:%M") if i.sent_at else
              i.next_attempt_at.astimezone(tz).strftime("next %m-%d %H:%M") if i.state == "queued" else "-"),
             i.last_error or i.subject) for i in items]
    click.echo(table(["id", "case", "template", "to", "state", "tries", "queued", "sent", "subject / last error"],
                     rows, max_width=60))
    click.echo(f"{len(items)} mail(s)")


@outbox.command("retry")
@click.argument("ids", nargs=-1, required=True)
@click.pass_context
def outbox_retry(ctx: click.Context, ids: tuple[str, ...]) -> None:
    """Queue failed mail ID… for delivery now (a sent mail is never sent twice)."""
    from intake.config import parse_duration
    from intake.store import retry_outbox, utcnow

    app = _open(ctx)
    failed = 0
    for raw_id in ids:
        if not raw_id.isdigit():
            raise click.UsageError(f"not an outbox id: {raw_id}")
        why = retry_outbox(app.store, int(raw_id), utcnow(), parse_duration(app.cfg.outbound.give_up_after))
        click.echo(f"#{raw_id}: {'queued for delivery' if why is None else why}")
        failed += why is not None
    ctx.exit(1 if failed else 0)


# -- templates ----------------------------------------------------------------------------------


@cli.group()
def templates() -> None:
    """Mail templates."""


@templates.command("check")
@click.argument("path", required=False, type=click.Path(file_okay=False))
@click.pass_context
def templates_check(ctx: click.Context, path: str | None) -> None:
    """Render every template against sample data in both languages; errors as file:line."""
    from intake.config import parse_size
    from intake.notify import sample_context
    from intake.templates import TemplateSet

    app = _open(ctx, load_rule_files=False)
    cfg = app.cfg
    folder = Path(path) if path else cfg.path(cfg.templates.path)
    tset = TemplateSet(folder, cfg.templates.default_language, parse_size(cfg.notify.max_output))
    brands = tuple(sorted({mb.brand for mb in cfg.mailbox if mb.brand}))
    languages = tuple(dict.fromkeys(["ja", "en", cfg.templates.default_language]))
    count, errors = tset.check(sample_context, languages=languages, brands=brands)
    for line in errors:
        click.echo(line, err=True)
    roots = ", ".join(str(r) for r in tset.roots if r.is_dir())
    click.echo(f"{count} template file(s) rendered from {roots}; {len(errors)} error(s)")
    ctx.exit(1 if errors else 0)


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
    # A configured listener and pollers that never reported (serve not started yet) still get a line.
    if app.cfg.smtp.listen and app.cfg.smtp.protocol not in rows:
        names.append(app.cfg.smtp.protocol)
    names += [f"imap:{a.account}" for a in app.cfg.imap if f"imap:{a.account}" not in rows]
    received = app.store.count_inbound(RECEIVED) + app.store.spool_backlog()
    out = []
    for name in sorted(names, key=lambda n: (n == "processor", n)):
        v = rows.get(name)
        out.append({
            "name": name,
            "state": v.state if v else "not started",
            "updated_at": v.updated_at.isoformat() if v else None,
            "last_success_at": v.last_success_at.isoformat() if v and v.last_success_at else None,
            # The processor's backlog is counted now: messages still waiting (spooled or received).
            "backlog": received if name == "processor" else (v.backlog if v else None),
            "last_error": v.last_error if v else None,
            "last_error_at": v.last_error_at.isoformat() if v and v.last_error_at else None,
            "details": v.details if v else None,
        })
    if as_json:
        click.echo(json.dumps(out, ensure_ascii=False, indent=2))
        return
    from datetime import datetime

    tz = app.cfg.tz

    def when(iso: str | None) -> str:
        return datetime.fromisoformat(iso).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") if iso else "-"

    def state(o: dict[str, Any]) -> str:
        refused = (o["details"] or {}).get("refused") or {}
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(refused.items()))
        return f"{o['state']}; refused: {counts}" if counts else o["state"]

    lines = [(o["name"], state(o), when(o["last_success_at"]), "-" if o["backlog"] is None else o["backlog"],
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
