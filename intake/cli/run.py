"""``intake serve``, ``ingest``, ``tick``, ``status`` and ``db``: running an installation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from intake.cli import EX_TEMPFAIL, EX_USAGE
from intake.cli.common import (
    config,
    config_option,
    dumps,
    local,
    mailbox_for_raw,
    open_app,
    open_store,
    parse_time,
    printable,
    table,
)

if TYPE_CHECKING:
    from intake.app import App

#: Messages stored per commit (and processed per transaction) by ``intake ingest``.
INGEST_BATCH = 100


@click.command()
@click.option("--smtp-listen", metavar="HOST:PORT", help="Listen for SMTP there ('' turns the listener off).")
@config_option
@click.pass_context
def serve(ctx: click.Context, smtp_listen: str | None) -> None:
    """Run the listeners, the processor and the periodic jobs in one process."""
    from intake.config import ConfigError
    from intake.service import serve as run_service

    cfg = config(ctx)
    if smtp_listen is not None:
        try:
            cfg = cfg.with_smtp_listen(smtp_listen)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
    # Mail is received and stored even while the rules are refused; it is processed once
    # they load (the rules watcher installs them).
    app = open_app(ctx, create=True, cfg=cfg)
    ctx.exit(run_service(app))


@click.command()
@click.option("--mailbox", "mailbox", help="Mailbox the message was delivered to (default: from its headers).")
@click.option("--channel", default="email", show_default=True)
@click.argument("files", nargs=-1, required=True)
@config_option
@click.pass_context
def ingest(ctx: click.Context, mailbox: str | None, channel: str, files: tuple[str, ...]) -> None:
    """Store .eml FILEs (a folder means every file in it; - is standard input) and process them.

    Exit 0 once every message is stored (whatever processing decided), 75 when one
    could not be stored (an MTA retries), 64 on a usage error.
    """
    from intake.db import StoreUnavailable

    try:
        app = open_app(ctx, create=True)
    except click.ClickException as exc:
        click.echo(f"intake ingest: {exc.message}", err=True)
        ctx.exit(EX_TEMPFAIL)
        return
    if mailbox and app.cfg.mailbox_for(mailbox) is None:
        click.echo(f"intake ingest: {mailbox} is not one of our mailboxes", err=True)
        ctx.exit(EX_USAGE)
    _record_rules(app)
    paths: list[str] = []
    for f in files:
        if f != "-" and Path(f).is_dir():
            paths += sorted(str(p) for p in Path(f).iterdir() if p.is_file())
        elif f != "-" and not Path(f).exists():
            click.echo(f"intake ingest: {f}: no such file", err=True)
            ctx.exit(EX_USAGE)
        else:
            paths.append(f)
    # Batches: one durable commit stores many messages, one more processes them; memory
    # stays bounded by the batch, not by the number of files.
    for start in range(0, len(paths), INGEST_BATCH):
        batch: list[tuple[str, bytes]] = []
        for name in paths[start:start + INGEST_BATCH]:
            try:
                batch.append((name, sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()))
            except OSError as exc:
                click.echo(f"intake ingest: {name}: {exc.strerror}", err=True)
                ctx.exit(EX_TEMPFAIL)
        items = []
        for name, raw in batch:
            target = mailbox or mailbox_for_raw(app.cfg, raw)
            items.append((raw, {"channel": channel, "mailbox": target, "envelope_to": [target],
                                "source": {"ingest": name}}))
        try:
            ids = app.store.receive_many(items)
        except StoreUnavailable as exc:
            click.echo(f"intake ingest: cannot store now: {exc}", err=True)
            ctx.exit(EX_TEMPFAIL)
            return
        if app.rules_error is not None:
            # A rule typo must not cost mail: stored, and processed by serve (which keeps
            # routing with the last good rule set) or by the next ingest or tick.
            for (name, _), inbound_id in zip(batch, ids):
                click.echo(f"{name}: stored as #{inbound_id}; processing deferred (the rules do not load)")
            continue
        try:
            outcomes = app.processor.process_batch(ids)
        except StoreUnavailable as exc:
            # Stored but not processed: `serve`, `tick` or the next ingest picks them up.
            click.echo(f"stored {len(ids)} message(s); processing deferred ({exc})")
            continue
        for (name, _), inbound_id, outcome in zip(batch, ids, outcomes):
            case = f" {outcome.case_number}" if outcome.case_number else ""
            click.echo(printable(f"{name}: #{inbound_id} {outcome.state}{case}"
                                 f"{' — ' + outcome.reason if outcome.reason else ''}"))


@click.command()
@click.option("--at", "at", help="Run as of this ISO 8601 time (default: now).")
@config_option
@click.pass_context
def tick(ctx: click.Context, at: str | None) -> None:
    """Run every periodic job once (IMAP poll, processing of waiting messages, retention, outbox)."""
    from intake.db import utcnow
    from intake.scheduler import tick as run_tick

    when = parse_time(at, "--at") or utcnow()
    app = open_app(ctx)
    _record_rules(app)
    failed = False
    for name, summary in run_tick(app, when):
        click.echo(printable(f"{name}: {summary}"))
        failed |= summary.startswith("failed:")
    ctx.exit(1 if failed else 0)


def _record_rules(app: "App") -> None:
    from intake.db import StoreUnavailable

    try:
        app.record_rules_state()
    except StoreUnavailable:
        pass  # the state is informative: mail is stored all the same


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@config_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Each listener, poller and process: state, last success, backlog, last error; the rules and templates."""
    from intake.db.ops import RULES_STATE_KEY, TEMPLATES_RENDER_KEY, TEMPLATES_STATE_KEY
    from intake.states import InboundState

    cfg = config(ctx)
    store = open_store(ctx, cfg)
    with store.read() as tx:
        rows = {v.name: v for v in tx.ops.statuses()}
        received = tx.inbound.count(InboundState.RECEIVED)
        rules_state = tx.ops.json_setting(RULES_STATE_KEY)
        templates_state = tx.ops.json_setting(TEMPLATES_STATE_KEY)
        template_failure = tx.ops.json_setting(TEMPLATES_RENDER_KEY)
    received += store.spool_backlog()
    names = list(rows)
    # A configured listener and pollers that never reported (serve not started yet) still get a line.
    if cfg.smtp.listen and cfg.smtp.protocol not in rows:
        names.append(cfg.smtp.protocol)
    names += [f"imap:{a.account}" for a in cfg.imap if f"imap:{a.account}" not in rows]
    out: list[dict[str, Any]] = []
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
    out.append(_rules_line(cfg, rules_state))
    out.append(_templates_line(cfg, templates_state, template_failure))
    if as_json:
        click.echo(dumps(out))
        return

    def refused(o: dict[str, Any]) -> dict[str, int]:
        return (o["details"] or {}).get("refused") or {}

    def state(o: dict[str, Any]) -> str:
        total = sum(refused(o).values())
        return f"{o['state']}; {total} refused" if total else o["state"]

    tz = cfg.tz
    fmt = "%Y-%m-%d %H:%M:%S"
    lines = [(o["name"], state(o), local(o["last_success_at"], tz, fmt), "-" if o["backlog"] is None else o["backlog"],
              local(o["updated_at"], tz, fmt),
              f"{local(o['last_error_at'], tz, fmt)} {o['last_error']}" if o["last_error"] else "-") for o in out]
    click.echo(table(["component", "state", "last success", "backlog", "updated", "last error"], lines,
                     max_width=90))
    # Refusals by reason in full, below the table, whose cells are cut at its width.
    for o in out:
        if refused(o):
            click.echo(f"{o['name']} refused: " + ", ".join(f"{why} {n}" for why, n in sorted(refused(o).items())))


def _rules_line(cfg: Any, served: dict[str, Any] | None) -> dict[str, Any]:
    """The rules' line of ``intake status``: the files on disk now, and what serve runs."""
    from intake.rules import RulesError, load_rules

    try:
        ruleset = load_rules(cfg.rules_path)
        state, error = f"ok ({ruleset.summary()})", None
    except RulesError as exc:
        state, error = "refused", str(exc).splitlines()[0]
    # loaded_at: what serve recorded of the set it runs (ingest and tick record no set).
    if served and served.get("state") == "refused" and served.get("loaded_at") and error is None:
        state += f"; serve still runs the set loaded at {served.get('loaded_at')}"
    elif served and served.get("state") == "refused" and served.get("loaded_at"):
        state = f"refused; serve runs the set loaded at {served.get('loaded_at')}"
    return {"name": "rules", "state": state, "updated_at": served.get("at") if served else None,
            "last_success_at": served.get("loaded_at") if served else None, "backlog": None,
            "last_error": error, "last_error_at": None, "details": {"folder": str(cfg.rules_path)}}


def _templates_line(cfg: Any, served: dict[str, Any] | None, failure: dict[str, Any] | None) -> dict[str, Any]:
    """The templates' line of ``intake status``: what serve uses (its watcher records every
    change within a second), or, before serve ever ran, the files on disk now (each tried
    with sample data within its budget); and the last template that failed at send time."""
    if served is not None:
        count, overrides, refused = served.get("templates", 0), served.get("overrides", []), served.get("refused", [])
    else:
        from intake.notify import templates_for

        tset = templates_for(cfg)
        tset.refresh()
        count, overrides = len(tset.files()), tset.overrides()
        refused = [p.as_dict() for p in tset.problems()]
    state = f"ok ({count} template files, {len(overrides)} override(s))"
    error = error_at = None
    if refused:
        first = refused[0]
        state = f"refused: {len(refused)} file(s)"
        if served is not None:
            state += ("; serve uses the last good version" if first.get("fallback") else
                      "; serve has no good version of it: its mails are skipped")
        error = _here(first["error"]) + (f" (+{len(refused) - 1} more)" if len(refused) > 1 else "")
        error_at = first.get("at")
    elif failure:
        outcome = ("sent with the last good version" if failure.get("fallback") else
                   "message quarantined" if failure.get("kind") == "timeout" else "mail skipped")
        error, error_at = f"{_here(str(failure.get('error')))} (at send time: {outcome})", failure.get("at")
    return {"name": "templates", "state": state, "updated_at": served.get("at") if served else None,
            "last_success_at": None, "backlog": None, "last_error": error, "last_error_at": error_at,
            "details": {"folder": str(cfg.templates_path), "overrides": overrides, "problems": refused,
                        "last_failure": failure, "from": "serve" if served is not None else "disk"}}


def _here(located: str) -> str:
    """``/srv/intake/templates/ja/ack.txt.j2:3: …`` as ``templates/ja/ack.txt.j2:3: …`` when
    run from /srv/intake: short enough for the table (``--json`` has the whole path too)."""
    cwd = str(Path.cwd()) + "/"
    return located[len(cwd):] if located.startswith(cwd) else located


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@config_option
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply schema migrations (Alembic); makes the database when there is none."""
    from intake.db import Store, StoreUnavailable

    store = Store(config(ctx).database_url)
    ctx.call_on_close(store.close)
    try:
        revision = store.upgrade()
    except StoreUnavailable as exc:
        raise click.ClickException(f"database unavailable: {exc}") from None
    click.echo(f"database at revision {revision}")
