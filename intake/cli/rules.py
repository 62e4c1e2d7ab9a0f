"""``intake rules`` and ``intake templates``: what admins edit, checked and explained."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from intake.cli.common import (
    config,
    config_option,
    dumps,
    local,
    mailbox_for_raw,
    parse_time,
    printable,
    reading,
    table,
)


@click.group()
def rules() -> None:
    """Routing rules: check, explain, stats."""


@rules.command("check")
@click.argument("path", required=False, type=click.Path())
@config_option
@click.pass_context
def rules_check(ctx: click.Context, path: str | None) -> None:
    """Validate rule files: PATH is a folder or one file (default: the configured folder).

    Every error is printed as file:line: message; the exit status is 1 when there is any.
    """
    from intake.rules import RulesError, load_rules

    target = Path(path) if path else config(ctx).rules_path
    if not target.exists():
        click.echo(f"{target}: no such file or folder", err=True)
        ctx.exit(1)
    try:
        ruleset = load_rules(target)
    except RulesError as exc:
        for line in exc.errors:
            click.echo(printable(line), err=True)
        click.echo(f"{len(exc.errors)} error(s); nothing changes until they are fixed", err=True)
        ctx.exit(1)
        return
    if not ruleset.files:
        click.echo(f"{target}: no *.yaml rule files", err=True)
        ctx.exit(1)
    click.echo(f"{target}: OK: {ruleset.summary()}")


@rules.command("explain")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--at", "at", help="Evaluate as of this ISO 8601 time (default: now; naive times are UTC).")
@click.option("--mailbox", "mailbox", help="Mailbox it arrived at (default: from its headers).")
@click.option("--channel", default="email", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
@click.pass_context
def rules_explain(ctx: click.Context, file: str, at: str | None, mailbox: str | None, channel: str,
                  as_json: bool) -> None:
    """Dry run of FILE.eml: what the rules see, each rule's result, the final actions. Writes nothing."""
    from intake.db import utcnow
    from intake.rules import RulesError
    from intake.rules.explain import explain, render

    cfg = config(ctx)
    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        raise click.UsageError(f"{file}: {exc.strerror}") from None
    if mailbox and cfg.mailbox_for(mailbox) is None:
        raise click.UsageError(f"{mailbox} is not one of our mailboxes")
    try:
        report = explain(cfg, raw, mailbox=mailbox or mailbox_for_raw(cfg, raw), channel=channel,
                         now=parse_time(at, "--at") or utcnow())
    except RulesError as exc:
        raise click.ClickException("the rules do not load:\n" + str(exc)) from None
    click.echo(dumps(report) if as_json else printable(render(report)))


@rules.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@config_option
@click.pass_context
def rules_stats(ctx: click.Context, as_json: bool) -> None:
    """Hit count and last hit of every rule, and the state of the last reload under serve."""
    from intake.db.ops import RULES_STATE_KEY
    from intake.rules import RulesError, load_rules

    cfg = config(ctx)
    with reading(ctx, cfg) as tx:
        stats = tx.ops.rule_stats()
        state = tx.ops.json_setting(RULES_STATE_KEY)
    load_error = None
    try:
        current = load_rules(cfg.rules_path).rules
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
        click.echo(dumps(rows))
        return
    # While the files do not load, which rules they hold cannot be told.
    gone = " (not in the rule files that load)" if load_error else " (no longer in the rules)"
    shown = [(r["rule"] + ("" if r["current"] else gone)
              + ("" if r["enabled"] or not r["current"] else " (disabled)"),
              r["at"] or "-", r["hits"], local(r["last_hit"], cfg.tz)) for r in rows]
    click.echo(table(["rule", "defined at", "hits", "last hit"], shown, max_width=60))
    if state:
        line = f"serve: rules {state.get('state')} at {state.get('at')}"
        if state.get("state") == "refused":
            line += f"; still using the set loaded at {state.get('loaded_at')}\n{state.get('error')}"
        click.echo(printable(line))
    if load_error:
        click.echo(printable(f"the rule files on disk do not load:\n{load_error}"), err=True)


# -- templates -------------------------------------------------------------------------


@click.group()
def templates() -> None:
    """Mail templates."""


@templates.command("check")
@click.argument("path", required=False, type=click.Path(file_okay=False))
@config_option
@click.pass_context
def templates_check(ctx: click.Context, path: str | None) -> None:
    """Render every template against sample data in both languages; errors as file:line.

    Each rendering may take [templates] budget (default 1s), as at send time: a template
    that runs longer (an endless loop) is reported with its file and line.
    """
    from intake.config import parse_size
    from intake.notify import sample_context
    from intake.templates import TemplateSet

    cfg = config(ctx)
    folder = Path(path) if path else cfg.templates_path
    tset = TemplateSet(folder, cfg.templates.default_language, parse_size(cfg.notify.max_output),
                       budget=cfg.templates_budget)
    brands = tuple(sorted({mb.brand for mb in cfg.mailbox if mb.brand}))
    languages = tuple(dict.fromkeys(["ja", "en", cfg.templates.default_language]))
    count, errors = tset.check(sample_context, languages=languages, brands=brands)
    for line in errors:
        click.echo(printable(line), err=True)
    roots = ", ".join(str(r) for r in tset.roots if r.is_dir())
    click.echo(f"{count} template file(s) rendered from {roots}; {len(errors)} error(s)")
    ctx.exit(1 if errors else 0)
