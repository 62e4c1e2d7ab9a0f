"""``intake cases`` and ``intake attachments``: cases, their timeline and files, and the
agent's actions on them (DESIGN 6)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from intake.cli.common import config, config_option, dumps, local, parse_time, printable, reading, table
from intake.states import Priority, Status

#: Cases the table shows unless told otherwise (the newest).
PAGE = 100


@click.group()
def cases() -> None:
    """Cases: list, show, update, note, reply, merge, link."""


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
    if detail.get("merged_into"):
        click.echo(f"  {'merged into':<13}{detail['merged_into']}")
    for link in detail.get("links") or []:
        click.echo(f"  {'linked':<13}{link['case']} ({link['kind']})")
    click.echo("\ntimeline:")
    for e in detail["timeline"]:
        click.echo(printable(_entry_line(e, tz)))


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _sentence(e: dict[str, Any]) -> str:
    """A timeline entry as people say it: ``status new → pending by hanako@example.com``."""
    t, by = e["type"], f" by {e['actor']}" if e.get("actor") else ""
    why = f" ({e['reason']})" if e.get("reason") else ""
    if t == "created":
        return f"created in queue {e.get('queue')} ({e.get('channel')}, {e.get('mailbox')}){by}"
    if t in ("status", "priority", "queue", "category", "resolution"):
        return f"{t} {_fmt(e.get('from'))} → {_fmt(e.get('to'))}{by}{why}"
    if t == "assignee":
        return (f"assigned to {e['to']}{by}{why}" if e.get("to") else f"unassigned{by}{why}")
    if t == "tags":
        changes = [*(f"+{x}" for x in e.get("added") or []), *(f"-{x}" for x in e.get("removed") or [])]
        return f"tags {' '.join(changes)}{by}"
    if t == "rule":
        return f"rule {e.get('rule')!r} matched: {_fmt(e.get('set'))}"
    if t == "note":
        return f"note{by}: {e.get('text')}"
    if t == "link":
        return f"linked with {e.get('case')}{by}"
    if t == "merged":
        return (f"merged into {e['into']}{by}" if e.get("into") else
                f"{e.get('from')} merged into this case{by} ({e.get('messages')} message(s) moved)")
    if t == "duplicate":
        return f"the same message again via {e.get('channel')} to {e.get('mailbox')} (inbound #{e.get('inbound_id')})"
    if t == "bounce":
        acted = f"; outbox {_fmt(e.get('outbox'))} bounced" if e.get("outbox") else ""
        ignored = f"; not acted on: {_fmt(e.get('not_acted_on'))}" if e.get("not_acted_on") else ""
        return f"bounce of <{e.get('bounced_message_id') or '?'}> for {_fmt(e.get('recipients'))}{acted}{ignored}"
    if t == "mail_skipped":
        return f"not sent: {e.get('template')} to {e.get('to')} ({e.get('check')}: {e.get('reason')})"
    if t == "mail_failed":
        return f"delivery failed: {e.get('template')} to {e.get('to')}: {e.get('reply')}"
    if t == "commands_refused":
        return "commands refused: " + "; ".join(f"{r['line']} ({r['reason']})" for r in e.get("refused") or [])
    if t == "loop":
        return f"mail loop: {e.get('text')}"
    extra = {k: v for k, v in e.items() if k not in ("at", "type", "actor")}
    return f"{t}{by} {json.dumps(extra, ensure_ascii=False)}" if extra else f"{t}{by}"


def _entry_line(e: dict[str, Any], tz: Any) -> str:
    head = f"  {local(e['at'], tz)}  "
    if e["type"] != "message":
        return head + _sentence(e)
    vis = " (internal)" if e["visibility"] == "internal" else ""
    if e["direction"] == "out":
        cc = f", cc {', '.join(e['cc'])}" if e.get("cc") else ""
        what = f" [{e['template']}]" if e.get("template") else ""
        line = f"{head}mail → {', '.join(e.get('to') or []) or '-'}{cc}{vis}{what}: {e['subject']}"
    else:
        via = f" via {e['threading']}" if e.get("threading") else ""
        refused = " (agent's address, not authenticated)" if e.get("unauthenticated") else ""
        line = f"{head}mail ← {e['from']}{vis}{via}{refused}: {e['subject']}"
    lines = [line, *(f"      | {text}" for text in (e.get("text") or "").strip().splitlines()[:20])]
    lines += [f"      📎 #{a['id']} {a['filename']} ({a['content_type']}, {a['size']} bytes)"
              for a in e.get("attachments", [])]
    return "\n".join(lines)


# -- acting on cases (DESIGN 6): every change is a case operation --------------------------


def _acting(ctx: click.Context, actor: str, *, agent: bool = False) -> Any:
    """The installation, a transaction and the case operations with ``actor``; an agent's
    address must be one the rules know."""
    from contextlib import contextmanager

    from intake.cases import CaseOps
    from intake.cli.common import first_line, open_app
    from intake.db import utcnow

    app = open_app(ctx)
    if app.rules_error:
        # Agents, queues and their policies come from the rules: without them a change
        # would be checked against nobody (an assignee who is no agent, the default queue).
        raise click.ClickException("the routing rules are refused, and a change to a case needs their agents and "
                                   f"queues: fix them first (intake rules check): {first_line(app.rules_error)}")
    if agent and app.ruleset.team.agent(actor) is None:
        raise click.UsageError(f"--as {actor}: not an agent of the rules (list agents under agents:)")

    @contextmanager
    def ops() -> Any:
        app.processor.secret  # made in a transaction of its own, before this one holds the lock
        with app.store.transaction() as tx:
            yield CaseOps(tx, app.processor.case_env(), utcnow())

    return app, ops


def _text(message: str | None, file: str | None) -> str:
    if (message is None) == (file is None):
        raise click.UsageError("give the text with -m TEXT or --file FILE (one of them)")
    if file is not None:
        try:
            return (sys.stdin.read() if file == "-" else Path(file).read_text("utf-8")).strip("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.UsageError(f"--file {file}: {getattr(exc, 'strerror', None) or exc}") from None
    return str(message)


def _refused(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@cases.command("update")
@click.argument("number")
@click.option("--status", type=click.Choice([s.value for s in Status]))
@click.option("--priority", type=click.Choice([p.value for p in Priority]))
@click.option("--assign", "assignee", metavar="ADDRESS|none", help="Give the case to an agent, or to nobody.")
@click.option("--queue")
@click.option("--category")
@click.option("--tag", "tags", multiple=True, help="Add a tag (repeatable).")
@click.option("--untag", "untags", multiple=True, help="Remove a tag (repeatable).")
@click.option("--resolution", help="The resolution notes.")
@click.option("--as", "actor", default="cli", show_default=True, help="Who makes the change (timeline actor).")
@config_option
@click.pass_context
def cases_update(ctx: click.Context, number: str, status: str | None, priority: str | None, assignee: str | None,
                 queue: str | None, category: str | None, tags: tuple[str, ...], untags: tuple[str, ...],
                 resolution: str | None, actor: str) -> None:
    """Change a case: each change is on its timeline with its actor, and causes its mails."""
    from intake.cases import Refused

    app, acting = _acting(ctx, actor)
    changed: list[str] = []
    try:
        with acting() as ops:
            case = ops.case(number)
            # Notes and fields first, the status last: resolving mails the resolution notes.
            if resolution is not None and ops.set_resolution(case, resolution, actor=actor):
                changed.append("resolution")
            if priority and ops.set_priority(case, priority, actor=actor):
                changed.append(f"priority {case.priority}")
            if queue and ops.set_queue(case, queue, actor=actor):
                changed.append(f"queue {case.queue}")
            if category is not None and ops.set_category(case, category, actor=actor):
                changed.append(f"category {case.category}")
            if assignee is not None and ops.assign(case, None if assignee == "none" else assignee, actor=actor):
                changed.append(f"assignee {case.assignee or 'none'}")
            for tag in tags:
                if ops.tag(case, tag, actor=actor):
                    changed.append(f"+{tag}")
            for tag in untags:
                if ops.untag(case, tag, actor=actor):
                    changed.append(f"-{tag}")
            if status and ops.set_status(case, status, actor=actor):
                changed.append(f"status {case.status}")
            elif changed and ops.env.team().agent(actor) is not None and ops.agent_acted(case, actor=actor):
                changed.append(f"status {case.status}")
    except Refused as exc:
        raise _refused(exc) from None
    click.echo(f"{case.label}: " + (", ".join(changed) if changed else "nothing to change"))


@cases.command("note")
@click.argument("number")
@click.option("--as", "actor", required=True, help="The agent who writes the note.")
@click.option("-m", "--message", help="The note's text.")
@click.option("--file", help="Read the note's text from FILE (- is standard input).")
@config_option
@click.pass_context
def cases_note(ctx: click.Context, number: str, actor: str, message: str | None, file: str | None) -> None:
    """Add an internal note: on the timeline and mailed to the case's other agents, never to a customer."""
    from intake.cases import Refused, typed

    text = _text(message, file)
    app, acting = _acting(ctx, actor, agent=True)
    try:
        with acting() as ops:
            case = ops.case(number)
            ops.note(case, typed(case, actor.lower(), text, mailbox=case.mailbox or ""), actor=actor.lower(),
                     text=text)
            ops.agent_acted(case, actor=actor.lower())
    except Refused as exc:
        raise _refused(exc) from None
    click.echo(f"{case.label}: internal note added")


@cases.command("reply")
@click.argument("number")
@click.option("--as", "actor", required=True, help="The agent who answers.")
@click.option("-m", "--message", help="The reply's text.")
@click.option("--file", help="Read the reply's text from FILE (- is standard input).")
@click.option("--attach", "attach", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Send a file with the reply (repeatable).")
@config_option
@click.pass_context
def cases_reply(ctx: click.Context, number: str, actor: str, message: str | None, file: str | None,
                attach: tuple[str, ...]) -> None:
    """Answer the customer: mailed by agent_reply to the requester with the case's participants in Cc."""
    from intake.cases import FileAttachment, Refused, typed

    text = _text(message, file)
    files = [FileAttachment.of(Path(f).name, Path(f).read_bytes()) for f in attach]
    app, acting = _acting(ctx, actor, agent=True)
    try:
        with acting() as ops:
            case = ops.case(number)
            ops.reply(case, typed(case, actor.lower(), text, mailbox=case.mailbox or "", attachments=files),
                      actor=actor.lower(), text=text)
    except Refused as exc:
        raise _refused(exc) from None
    click.echo(f"{case.label}: reply queued to {case.requester.address if case.requester else 'nobody'}"
               + (f" with {len(files)} file(s)" if files else "") + f"; status {case.status}")


@cases.command("merge")
@click.argument("number")
@click.option("--into", "into", required=True, help="The case that carries on (CASE-A).")
@click.option("--as", "actor", default="cli", show_default=True)
@config_option
@click.pass_context
def cases_merge(ctx: click.Context, number: str, into: str, actor: str) -> None:
    """Merge a duplicate case (CASE-B) into another: its messages and threads move there, and it closes."""
    from intake.cases import Refused

    app, acting = _acting(ctx, actor)
    try:
        with acting() as ops:
            duplicate = ops.case(number)
            target = ops.merge(duplicate, ops.case(into), actor=actor)
    except Refused as exc:
        raise _refused(exc) from None
    click.echo(f"{duplicate.label} merged into {target.label}")


@cases.command("link")
@click.argument("first")
@click.argument("second")
@click.option("--as", "actor", default="cli", show_default=True)
@config_option
@click.pass_context
def cases_link(ctx: click.Context, first: str, second: str, actor: str) -> None:
    """Link two related cases; both timelines show it."""
    from intake.cases import Refused

    app, acting = _acting(ctx, actor)
    try:
        with acting() as ops:
            a, b = ops.case(first), ops.case(second)
            made = ops.link(a, b, actor=actor)
    except Refused as exc:
        raise _refused(exc) from None
    click.echo(f"{a.label} and {b.label} " + ("linked" if made else "were linked already"))


# -- attachments ---------------------------------------------------------------------------


@click.group()
def attachments() -> None:
    """The files of a case: list, get."""


@attachments.command("list")
@click.argument("number")
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
def attachments_list(ctx: click.Context, number: str, as_json: bool) -> None:
    """The files of a case's messages, oldest first."""
    from intake.db.cases import parse_case_label

    cfg = config(ctx)
    n = parse_case_label(number)
    with reading(ctx, cfg) as tx:
        case = tx.cases.by_number(n) if n is not None else None
        if case is None:
            raise click.ClickException(f"no case {number}")
        files = tx.cases.attachments_of(case.id)
    if as_json:
        click.echo(dumps([{"id": f.id, "filename": f.filename, "content_type": f.content_type, "size": f.size,
                           "inline": f.inline, "sha256": f.sha256, "direction": f.direction,
                           "from": f.from_address, "at": f.at.isoformat()} for f in files]))
        return
    rows = [(f.id, f.filename, f.content_type, f.size, "in" if f.direction == "in" else "out",
             f.from_address or "-", local(f.at, cfg.tz)) for f in files]
    click.echo(table(["id", "file", "type", "bytes", "", "from", "at"], rows, max_width=60))
    click.echo(f"{len(files)} file(s)")


@attachments.command("get")
@click.argument("attachment_id", type=int)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to FILE (default: standard output).")
@config_option
@click.pass_context
def attachments_get(ctx: click.Context, attachment_id: int, output: str | None) -> None:
    """Write one file (by the id attachments list shows) exactly as it was received."""
    with reading(ctx) as tx:
        found = tx.cases.attachment(attachment_id)
    if found is None:
        raise click.ClickException(f"no attachment #{attachment_id}")
    view, _number, data = found
    if output:
        Path(output).write_bytes(data)
        click.echo(printable(f"{output}: {view.filename}, {len(data)} bytes"), err=True)
        return
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
