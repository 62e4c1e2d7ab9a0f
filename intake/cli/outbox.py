"""``intake outbox``: outgoing mail and its state."""

from __future__ import annotations

import click

from intake.cli.common import config, config_option, dumps, local, open_store, reading, table
from intake.states import OutboxState


@click.group()
def outbox() -> None:
    """Outgoing mail and its state."""


@outbox.command("list")
@click.option("--state", type=click.Choice([s.value for s in OutboxState]))
@click.option("--case", "case", help="Only the mail of this case (CASE-N).")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@config_option
@click.pass_context
def outbox_list(ctx: click.Context, state: str | None, case: str | None, limit: int, as_json: bool) -> None:
    """List outgoing mail, newest first."""
    cfg = config(ctx)
    with reading(ctx, cfg) as tx:
        items = tx.outbox.list(state=state, case=case, limit=limit)
    if as_json:
        click.echo(dumps([i.as_json() for i in items]))
        return
    tz = cfg.tz
    rows = [(i.id, i.case or "-", i.template, i.recipient, i.state, i.attempts, local(i.created_at, tz),
             local(i.sent_at, tz) if i.sent_at else
             local(i.next_attempt_at, tz, "next %m-%d %H:%M") if i.state == OutboxState.QUEUED else "-",
             i.last_error or i.subject) for i in items]
    click.echo(table(["id", "case", "template", "to", "state", "tries", "queued", "sent", "subject / last error"],
                     rows, max_width=60))
    click.echo(f"{len(items)} mail(s)")


@outbox.command("retry")
@click.argument("ids", nargs=-1, required=True)
@config_option
@click.pass_context
def outbox_retry(ctx: click.Context, ids: tuple[str, ...]) -> None:
    """Queue failed mail ID… for delivery now (a sent mail is never sent twice)."""
    from intake.db import utcnow
    from intake.edges.outbox_sender import retry

    for raw_id in ids:
        if not raw_id.isdigit():
            raise click.UsageError(f"not an outbox id: {raw_id}")
    cfg = config(ctx)
    store = open_store(ctx, cfg)
    failed = 0
    for raw_id in ids:
        why = retry(cfg, store, int(raw_id), utcnow())
        click.echo(f"#{raw_id}: {'queued for delivery' if why is None else why}")
        failed += why is not None
    ctx.exit(1 if failed else 0)
