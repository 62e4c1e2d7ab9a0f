"""``intake cases``: read cases and their timeline."""

from __future__ import annotations

import json
from typing import Any

import click

from intake.cli.common import config, config_option, dumps, local, parse_time, printable, reading, table
from intake.states import Status

#: Cases the table shows unless told otherwise (the newest).
PAGE = 100


@click.group()
def cases() -> None:
    """Cases: list, show."""


@cases.command("list")
@click.option("--queue")
@click.option("--status", type=click.Choice([s.value for s in Status]))
@click.option("--assignee", help="An agent's address, or 'none' for unassigned cases.")
@click.option("--requester", help="The requester's address.")
@click.option("--organization", help="The requester's organization (mail domain).")
@click.option("--category")
@click.option("--channel")
@click.option("--search", help="Text in the subject or a message.")
@click.option("--since", help="Created at or after this ISO 8601 date/time (UTC unless given).")
@click.option("--limit", type=click.IntRange(min=1), help="At most N cases (the table shows the newest "
              f"{PAGE} by default).")
@click.option("--all", "all_", is_flag=True, help="The table shows every case that matches.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (every case that matches, or --limit).")
@config_option
@click.pass_context
def cases_list(ctx: click.Context, queue: str | None, status: str | None, assignee: str | None,
               requester: str | None, organization: str | None, category: str | None, channel: str | None,
               search: str | None, since: str | None, limit: int | None, all_: bool, as_json: bool) -> None:
    """List cases, oldest first; the table shows the newest ones (--limit N, --all)."""
    cfg = config(ctx)
    filters = dict(queue=queue, status=status, assignee=assignee, requester=requester, organization=organization,
                   category=category, channel=channel, search=search, since=parse_time(since, "--since"))
    with reading(ctx, cfg) as tx:
        if as_json:
            click.echo(dumps([c.as_json() for c in tx.cases.list(limit=limit, **filters)]))
            return
        # Nobody reads ten thousand lines: a page of the newest, and how many there are.
        page = None if all_ else (limit or PAGE)
        found = tx.cases.list(limit=page, newest=True, **filters)
        total = tx.cases.count(**filters) if page is not None and len(found) == page else len(found)
    tz = cfg.tz
    rows = [(c.label, c.status, c.priority, c.queue, c.assignee or "-",
             c.requester.address if c.requester else "-", local(c.created_at, tz), c.subject) for c in found]
    click.echo(table(["case", "status", "priority", "queue", "assignee", "requester", "created", "subject"], rows))
    if len(found) < total:
        click.echo(f"{len(found)} of {total} case(s), the newest; --limit N or --all for more")
    else:
        click.echo(f"{total} case(s)")


@cases.command("show")
@click.argument("number")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
@click.pass_context
def cases_show(ctx: click.Context, number: str, as_json: bool) -> None:
    """Show one case (CASE-N) with its timeline."""
    from intake.db.cases import parse_case_label

    cfg = config(ctx)
    n = parse_case_label(number)
    with reading(ctx, cfg) as tx:
        detail = tx.cases.detail(n) if n is not None else None
    if detail is None:
        raise click.ClickException(f"no case {number}")
    if as_json:
        click.echo(dumps(detail))
        return
    tz = cfg.tz
    click.echo(printable(f"{detail['number']}  {detail['subject']}"))
    for key in ("status", "priority", "queue", "category", "assignee", "requester", "organization", "channel",
                "mailbox", "language"):
        value = detail.get(key)
        if key == "requester" and detail.get("requester_name"):
            value = f"{detail['requester_name']} <{value}>"
        click.echo(printable(f"  {key:<13}{value if value not in (None, '') else '-'}"))
    click.echo(printable(f"  {'tags':<13}{', '.join(detail['tags']) or '-'}"))
    click.echo(printable(f"  {'participants':<13}{', '.join(detail['participants']) or '-'}"))
    click.echo(f"  {'created':<13}{local(detail['created_at'], tz)}   updated {local(detail['updated_at'], tz)}")
    click.echo("\ntimeline:")
    for e in detail["timeline"]:
        click.echo(printable(_entry_line(e, tz)))


def _entry_line(e: dict[str, Any], tz: Any) -> str:
    head = f"  {local(e['at'], tz)}  {e['type']}"
    if e["type"] == "message":
        arrow = "→" if e["direction"] == "out" else "←"
        vis = " (internal)" if e["visibility"] == "internal" else ""
        lines = [f"{head} {arrow} {e['from']}{vis}: {e['subject']}"]
        lines += [f"      | {line}" for line in (e.get("text") or "").strip().splitlines()[:20]]
        lines += [f"      📎 {a['filename']} ({a['content_type']}, {a['size']} bytes)" for a in e.get("attachments", [])]
        return "\n".join(lines)
    extra = {k: v for k, v in e.items() if k not in ("at", "type", "actor")}
    return f"{head}  {json.dumps(extra, ensure_ascii=False)}" if extra else head
