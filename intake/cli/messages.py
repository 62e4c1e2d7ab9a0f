"""``intake messages``, ``intake quarantine``, ``intake parse``: what came in and what became of it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from intake.cli.common import (
    config,
    config_option,
    dumps,
    local,
    open_app,
    parse_time,
    printable,
    reading,
    table,
    warn,
)
from intake.states import InboundState


@click.group()
def messages() -> None:
    """Every inbound message and its processing log."""


@messages.command("list")
@click.option("--state", type=click.Choice([s.value for s in InboundState]))
@click.option("--since", help="Only messages received at or after this ISO 8601 date/time (UTC unless given).")
@click.option("--from", "from_address", help="Only messages from this address.")
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
def messages_list(ctx: click.Context, state: str | None, since: str | None, from_address: str | None,
                  as_json: bool) -> None:
    """List inbound messages: time, channel, mailbox, sender, subject, state, case."""
    when = parse_time(since, "--since")
    cfg = config(ctx)
    with reading(ctx, cfg) as tx:
        rows = tx.inbound.list(state=state, since=when, from_address=from_address)
    if as_json:
        click.echo(dumps([{**r, "received_at": r["received_at"].isoformat()} for r in rows]))
        return
    click.echo(table(["id", "received", "channel", "mailbox", "from", "state", "case", "subject"],
                     [(r["id"], local(r["received_at"], cfg.tz, "%Y-%m-%d %H:%M:%S"), r["channel"], r["mailbox"],
                       r["from"] or r["envelope_from"] or "-", r["state"], r["case"] or "-", r["subject"] or "")
                      for r in rows]))
    click.echo(f"{len(rows)} message(s)")


@messages.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
def messages_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """The processing log of one message (by id, by the S-id of an SMTP reply, or by Message-ID)."""
    from intake.diagnostics import log_lines

    cfg = config(ctx)
    with reading(ctx, cfg) as tx:
        detail = tx.inbound.detail(ref)
    if detail is None:
        raise click.ClickException(f"no inbound message {ref}" + (
            f" (a message answered 'queued as {ref}' shows here once the processor took it from the spool)"
            if ref[:1] in "Ss" else ""))
    if as_json:
        click.echo(dumps(detail))
        return
    out = [f"inbound #{detail['id']}  {detail['state']}" + (f"  {detail['case']}" if detail["case"] else ""),
           f"  Message-ID  <{detail['message_id']}>" if detail["message_id"] else "  Message-ID  (not parsed yet)",
           f"  from        {detail['from'] or '-'} (envelope {detail['envelope_from'] or '-'})",
           f"  to          {', '.join(detail['envelope_to']) or '-'} (mailbox {detail['mailbox']})",
           f"  subject     {detail['subject'] or '-'}",
           f"  size        {detail['size']} bytes, sha256 {detail['raw_sha256'][:16]}…"
           + ("" if detail["raw_kept"] else " (raw bytes removed by retention)"),
           "log:", *log_lines(detail["log"], cfg.tz)]
    if detail["outbox"]:
        out.append("mails it caused:")
        for o in detail["outbox"]:
            error = f" — {o['last_error']}" if o["last_error"] else ""
            out.append(f"  outbox #{o['id']}  {o['template']} to {o['to']}: {o['state']} ({o['attempts']} attempt(s))"
                       f"{error}")
    if detail["state"] == InboundState.QUARANTINED and detail["traceback"]:
        out += ["error:", detail["traceback"].rstrip()]
    click.echo(printable("\n".join(out)))


@messages.command("raw")
@click.argument("ref")
@config_option
@click.pass_context
def messages_raw(ctx: click.Context, ref: str) -> None:
    """Write the raw bytes of a message exactly as received (redirect to a .eml file)."""
    with reading(ctx) as tx:
        detail = tx.inbound.detail(ref)
        raw = tx.inbound.raw(detail["id"]) if detail else None
    if detail is None:
        raise click.ClickException(f"no inbound message {ref}")
    if raw is None:
        raise click.ClickException(f"inbound #{detail['id']}: raw bytes were removed by retention")
    sys.stdout.buffer.write(raw)
    sys.stdout.buffer.flush()


# -- quarantine ------------------------------------------------------------------------


@click.group()
def quarantine() -> None:
    """Messages that failed to process."""


@quarantine.command("list")
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
def quarantine_list(ctx: click.Context, as_json: bool) -> None:
    """List quarantined messages with their error."""
    cfg = config(ctx)
    with reading(ctx, cfg) as tx:
        recs = tx.inbound.quarantined()
    if as_json:
        click.echo(dumps([{"id": r.id, "received_at": r.received_at.isoformat(), "mailbox": r.mailbox,
                           "channel": r.channel, "message_id": r.message_id, "from": r.from_address,
                           "subject": r.subject, "attempts": r.attempts, "error": r.error} for r in recs]))
        return
    rows = [(r.id, local(r.received_at, cfg.tz), r.mailbox, r.from_address or "-", r.attempts, r.error)
            for r in recs]
    click.echo(table(["id", "received", "mailbox", "from", "tries", "error"], rows, max_width=70))
    click.echo(f"{len(recs)} quarantined message(s)")


@quarantine.command("retry")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Retry every quarantined message.")
@config_option
@click.pass_context
def quarantine_retry(ctx: click.Context, ids: tuple[str, ...], all_: bool) -> None:
    """Process quarantined messages again (ID… or --all)."""
    if not ids and not all_:
        raise click.UsageError("give message ids or --all")
    targets: list[int] = []
    for raw_id in ids:
        if not raw_id.isdigit():
            raise click.UsageError(f"not a message id: {raw_id}")
        targets.append(int(raw_id))
    app = open_app(ctx)
    if all_:
        with app.store.read() as tx:
            targets = [r.id for r in tx.inbound.quarantined()] + targets
    failed = 0
    for inbound_id in targets:
        with app.store.transaction() as tx:
            requeued = tx.inbound.requeue(inbound_id)
        if not requeued:
            click.echo(f"#{inbound_id}: not quarantined")
            failed += 1
            continue
        if app.rules_error:
            # Processing needs rules: the record waits, as serve's processor does.
            click.echo(f"#{inbound_id}: received again; processed once the rules load")
            continue
        outcome = app.processor.process(inbound_id)
        case = f" {outcome.case_number}" if outcome.case_number else ""
        click.echo(printable(f"#{inbound_id}: {outcome.state}{case}{' — ' + outcome.reason if outcome.reason else ''}"))
        failed += outcome.state == InboundState.QUARANTINED
    ctx.exit(1 if failed else 0)


# -- parse -----------------------------------------------------------------------------


@click.command("parse")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a public interface).")
@config_option
@click.pass_context
def parse_cmd(ctx: click.Context, file: str, as_json: bool) -> None:
    """Show what intake sees in a mail, without storing anything."""
    from intake.diagnostics import parse_lines, parse_report
    from intake.rules import RulesError, load_rules

    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        raise click.UsageError(f"{file}: {exc.strerror}") from None
    cfg = config(ctx)
    try:
        agents = load_rules(cfg.rules_path).team.addresses
    except RulesError as exc:
        # The mail is still shown: only who counts as an agent is unknown.
        warn(f"the routing rules are refused, so agents are not recognised: {str(exc).splitlines()[0]}")
        agents = frozenset()
    report = parse_report(raw, own_addresses=cfg.own_addresses, agents=agents, authenticate=cfg.authenticator(raw))
    if as_json:
        click.echo(dumps(report))
        return
    click.echo(printable("\n".join(parse_lines(report))))

