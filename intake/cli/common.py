"""What the command modules share: options, opening the installation, tables, times."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone, tzinfo
from typing import TYPE_CHECKING, Any, TypeVar
from unicodedata import east_asian_width

import click

from intake.cli import Options
from intake.logs import escaped, json_safe

if TYPE_CHECKING:
    from intake.app import App
    from intake.config import Config
    from intake.db import Store, Tx

F = TypeVar("F", bound=Callable[..., Any])


def _set_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(Options).config = value


def config_option(f: F) -> F:
    """``--config F`` accepted after the command too (``intake serve --config F``)."""
    return click.option("--config", "-c", type=click.Path(dir_okay=False), expose_value=False, is_eager=True,
                        callback=_set_config, help="TOML config file (default: embedded defaults).")(f)


def config(ctx: click.Context) -> "Config":
    """The configuration of this run; a bad file is a clear error."""
    from intake.config import ConfigError, load_config

    try:
        return load_config(ctx.ensure_object(Options).config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _fail(exc: BaseException) -> click.ClickException:
    """The message for a database that is missing, behind, or cannot be reached now."""
    from intake.db import NoDatabase

    return click.ClickException(str(exc) if isinstance(exc, NoDatabase) else f"database unavailable: {exc}")


def open_store(ctx: click.Context, cfg: "Config | None" = None) -> "Store":
    """The database of this installation, which must exist at this code's revision (one
    query checks it; nothing is created or migrated)."""
    from intake.db import NoDatabase, Store, StoreUnavailable

    store = Store((cfg or config(ctx)).database_url)
    ctx.call_on_close(store.close)
    try:
        store.check()
    except (NoDatabase, StoreUnavailable) as exc:
        raise _fail(exc) from None
    return store


@contextmanager
def reading(ctx: click.Context, cfg: "Config | None" = None) -> Iterator["Tx"]:
    """A read-only transaction on the installation's database; a one-line warning when
    ``serve`` reports the rule files refused (diagnostics go on with broken rules)."""
    from intake.db import StoreUnavailable

    cfg = cfg or config(ctx)
    store = open_store(ctx, cfg)
    try:
        with store.read() as tx:
            warn_rules_refused(tx, cfg)
            yield tx
    except StoreUnavailable as exc:
        raise _fail(exc) from None


def open_app(ctx: click.Context, *, create: bool = False, rules: bool = True, cfg: "Config | None" = None) -> "App":
    """The installation with its rules (for commands that process or route mail). Refused
    rules are reported in one line; the command goes on without them where it can."""
    from intake.app import open_app as _open
    from intake.config import ConfigError
    from intake.db import NoDatabase, StoreUnavailable

    try:
        app = _open(cfg or config(ctx), create=create, rules=rules)
    except (NoDatabase, StoreUnavailable) as exc:
        raise _fail(exc) from None
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    ctx.call_on_close(app.close)
    if app.rules_error:
        warn(f"the routing rules are refused (intake rules check shows every error): "
             f"{first_line(app.rules_error)}")
    return app


def warn_rules_refused(tx: "Tx", cfg: "Config") -> None:
    """One line on standard error when the rule files are refused: as serve, ingest or tick
    last recorded it, or, when the files changed since, as they load now."""
    from intake.config import rules_changed_since
    from intake.db.ops import RULES_STATE_KEY

    state = tx.ops.json_setting(RULES_STATE_KEY)
    # Never recorded: no mail was ever processed here, so nothing read depends on the rules.
    if state and rules_changed_since(cfg, state.get("at")):
        from intake.rules import RulesError, load_rules

        try:
            load_rules(cfg.rules_path)
        except RulesError as exc:
            warn(f"the routing rules are refused (intake rules check shows every error): {first_line(str(exc))}")
    elif state and state.get("state") == "refused":
        kept = f" (serve keeps the set loaded at {state['loaded_at']})" if state.get("loaded_at") else ""
        warn(f"the routing rules are refused since {state.get('at')}{kept}: "
             f"{first_line(str(state.get('error') or ''))}")


def warn(text: str) -> None:
    click.echo(f"warning: {text}", err=True)


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    return (lines[0] if lines else "") + more


# -- output ----------------------------------------------------------------------------

def printable(text: str) -> str:
    """Stored text safe for a terminal (a NUL in a subject, an escape sequence or a
    right-to-left override in a name): escaped as in the log, but tabs and newlines."""
    return escaped(text, multiline=True)


def _width(text: str) -> int:
    """Columns a text takes in a terminal: wide (CJK) characters take two."""
    if text.isascii():
        return len(text)
    return sum(2 if east_asian_width(ch) in "WF" else 1 for ch in text)


def _cell(value: Any, limit: int) -> tuple[str, int]:
    """A table cell: one line, printable, cut to ``limit`` columns; and its width."""
    text = "" if value is None else str(value)
    if not text.isprintable():
        text = printable(text).replace("\n", " ").replace("\t", " ")
    width = _width(text)
    if width <= limit:
        return text, width
    out, w = "", 0
    for ch in text:
        cw = _width(ch)
        if w + cw > limit - 1:
            break
        out, w = out + ch, w + cw
    return out + "…", w + 1


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 50) -> str:
    """A plain-text table that lines up Japanese (double-width) text too."""
    cells = [[_cell(v, max_width) for v in r] for r in rows]
    widths = [max([_width(h)] + [r[i][1] for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[tuple[str, int]]) -> str:
        return "  ".join(text + " " * (widths[i] - w) for i, (text, w) in enumerate(values)).rstrip()

    head = [(h, _width(h)) for h in headers]
    return "\n".join([line(head), line([("-" * w, w) for w in widths]), *(line(r) for r in cells)])


def local(value: datetime | str | None, tz: tzinfo, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A stored time (or its ISO text) in the configured time zone; "-" for none."""
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(tz).strftime(fmt)


def parse_time(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 date or time given on the command line (UTC unless it says)."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.UsageError(f"{option}: not an ISO 8601 date or time: {value}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def mailbox_for_raw(cfg: "Config", raw: bytes) -> str:
    """The first of our mailboxes a raw mail names (Delivered-To, X-Original-To, To, Cc)."""
    from intake.mail.addresses import delivered_to

    for addr in delivered_to(raw):
        mb = cfg.mailbox_for(addr)
        if mb is not None:
            return mb.address
    return cfg.mailbox[0].address


def dumps(value: Any) -> str:
    """JSON as the command line prints it (Japanese as it is, indented; C1 and bidirectional
    controls as ``\\u`` escapes, as JSON already writes C0 ones)."""
    import json

    return json_safe(json.dumps(value, ensure_ascii=False, indent=2, default=str))
