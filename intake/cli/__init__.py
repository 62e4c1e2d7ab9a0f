"""The ``intake`` command (DESIGN.md 6).

Each command group lives in a module of its own and is imported only when it runs:
``intake --help`` imports click and this module, ``intake cases list`` adds the config,
SQLAlchemy's core and one query. Exit codes follow what MTAs expect: 64 (EX_USAGE) for a
usage error, 75 (EX_TEMPFAIL) where ``ingest`` could not store a message.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

import click

EX_USAGE = 64
EX_TEMPFAIL = 75

#: name → (module, attribute, one line of help): the help is here so that ``--help``
#: imports no command module.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("intake.cli.run", "serve", "Run the listeners, the processor and the periodic jobs."),
    "ingest": ("intake.cli.run", "ingest", "Store .eml files (or standard input) and process them."),
    "tick": ("intake.cli.run", "tick", "Run every periodic job once (IMAP poll, processing, retention, outbox)."),
    "status": ("intake.cli.run", "status", "Each listener, poller and process: state, backlog, last error."),
    "db": ("intake.cli.run", "db", "Database schema: upgrade."),
    "cases": ("intake.cli.cases", "cases", "Cases: list, show, update, note, reply, merge, link."),
    "attachments": ("intake.cli.cases", "attachments", "The files of a case: list, get."),
    "messages": ("intake.cli.messages", "messages", "Every inbound message and its processing log."),
    "quarantine": ("intake.cli.messages", "quarantine", "Messages that failed to process: list, retry."),
    "parse": ("intake.cli.messages", "parse_cmd", "Show what intake sees in a mail, without storing it."),
    "rules": ("intake.cli.rules", "rules", "Routing rules: check, explain, stats."),
    "templates": ("intake.cli.rules", "templates", "Mail templates: check."),
    "outbox": ("intake.cli.outbox", "outbox", "Outgoing mail and its state: list, retry."),
}


class Options:
    """The options every command shares (given before or after the command's name)."""

    def __init__(self) -> None:
        self.config: str | None = None


class LazyGroup(click.Group):
    """A group whose commands are imported when used, with MTA-friendly exit codes."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module, attr, _ = entry
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Run; usage errors exit 64 (EX_USAGE) as MTAs expect."""
        try:
            rv = super().main(args=args, prog_name=prog_name or "intake", complete_var=complete_var,
                              standalone_mode=False, **extra)
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


@click.group(cls=LazyGroup)
@click.option("--config", "-c", type=click.Path(dir_okay=False), envvar="INTAKE_CONFIG",
              help="TOML config file (default: embedded defaults); also accepted after the command.")
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
@click.pass_context
def cli(ctx: click.Context, config: str | None, log_level: str) -> None:
    """intake: mail- and message-driven case intake for customer support."""
    opts = ctx.ensure_object(Options)
    opts.config = opts.config or config
    from intake.logs import setup_logging

    setup_logging(log_level)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="intake")
