"""Shared fixtures: a temporary installation and a way to run the real ``intake`` command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest

from click.testing import CliRunner

from intake.app import App, open_app
from intake.cli import cli
from intake.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_RULES = ROOT / "intake" / "shipped" / "routing_rules"


def intake_env(**extra: str) -> dict[str, str]:
    """Environment for running ``python -m intake`` from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("INTAKE_CONFIG", None)
    env.update(extra)
    return env


# Two agents sharing every queue, nobody assigned automatically: for tests about who is
# notified, independent of the shipped example's round robin.
SIMPLE_TEAM = """\
agents:
  hanako@example.com: {name: 山田 花子, language: ja}
  ken@example.com: {name: Ken Sato, language: en}
queues:
  support: {name: Support, agents: [hanako@example.com, ken@example.com], assign: none}
  billing: {name: Billing, agents: [hanako@example.com], assign: none}
"""


def write_config(folder: Path, extra: str = "", *, database: str | None = None, team: str | None = None) -> Path:
    """A config file in ``folder`` with the example mailboxes and the given extra TOML.

    The rules folder gets the shipped team file, or ``team`` (YAML) when given.
    """
    rules = folder / "routing_rules"
    if not rules.exists():
        rules.mkdir()
        text = team if team is not None else (SHIPPED_RULES / "10-team.yaml").read_text("utf-8")
        (rules / "10-team.yaml").write_text(text, "utf-8")
    db_url = database or f"sqlite:///{folder / 'intake.db'}"
    text = textwrap.dedent(
        f"""
        [database]
        url = "{db_url}"
        [smtp]
        listen = ""
        [[mailbox]]
        address = "support@example.com"
        queue = "support"
        [[mailbox]]
        address = "billing@example.com"
        queue = "billing"
        [security]
        trusted_authserv_ids = ["mx.example.com"]
        [outbound]
        path = "{folder / 'outbox'}"
        """
    ) + textwrap.dedent(extra)
    path = folder / "intake.toml"
    path.write_text(text, "utf-8")
    return path


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def open_test_app(config: Path) -> App:
    """The installation of a config file, its SQLite database made as ``serve`` makes it."""
    return open_app(load_config(config), create=True)


@pytest.fixture
def app(config_path: Path) -> App:
    a = open_test_app(config_path)
    yield a
    a.close()


RunIntake = Callable[..., subprocess.CompletedProcess[str]]


def run_cli(args: list[str], *, cwd: Path, input: bytes | None = None, in_process: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real command line, run in this process (click's runner, the same entry point and
    exit codes) or, with ``in_process=False``, as ``python -m intake``."""
    if not in_process:
        proc = subprocess.run([sys.executable, "-m", "intake", *args], input=input, capture_output=True,
                              timeout=timeout, env=intake_env(), cwd=str(cwd))
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                           proc.stderr.decode("utf-8", "replace"))
    old = os.getcwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(cli, args, input=input, env={"INTAKE_CONFIG": None}, catch_exceptions=True)
    finally:
        os.chdir(old)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(["intake", *args], res.exit_code, res.stdout, res.stderr)


@pytest.fixture
def run_intake(config_path: Path) -> RunIntake:
    """Run the real command line: ``run_intake("cases", "list", "--json")``."""

    def run(*args: str, input: bytes | None = None, config: Path | None = config_path, check: bool = False,
            timeout: float = 60, in_process: bool = True) -> subprocess.CompletedProcess[str]:
        argv = (["--config", str(config)] if config is not None else []) + list(args)
        out = run_cli(argv, cwd=config_path.parent, input=input, in_process=in_process, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"intake {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    return run


# -- reading and changing an installation the way intake does ------------------------------
# Each helper takes an App or a bare Store.


def _store(where: object):
    return getattr(where, "store", where)


def list_cases(app, **filters: object) -> list:
    """The cases (``CaseRec``), oldest first, as ``intake cases list`` reads them."""
    with _store(app).read() as tx:
        return tx.cases.list(**filters)


def case_detail(app, label: str) -> dict | None:
    """One case as ``intake cases show --json`` prints it."""
    from intake.db.cases import parse_case_label

    with _store(app).read() as tx:
        return tx.cases.detail(parse_case_label(label))


def case_record(app, number: int):
    with _store(app).read() as tx:
        return tx.cases.by_number(number)


def inbound_detail(app, ref: str) -> dict | None:
    with _store(app).read() as tx:
        return tx.inbound.detail(ref)


def outbox_items(app, **filters: object) -> list:
    """Outbox rows, oldest first."""
    with _store(app).read() as tx:
        return list(reversed(tx.outbox.list(**filters)))


@contextmanager
def case_ops(app: App, at=None):
    """The case operations in a transaction of their own, as a caller of intake would use them."""
    from intake.cases import CaseOps
    from intake.db import utcnow

    app.processor.secret  # made in a transaction of its own (SQLite has one writer)
    with app.store.transaction() as tx:
        yield CaseOps(tx, app.processor.case_env(), at or utcnow())


def set_status(app: App, number: int, status: str, *, at=None) -> None:
    """Change a case's status through the case operations (``at``: when it happened)."""
    with case_ops(app, at) as ops:
        ops.set_status(ops.tx.cases.by_number(number), status, actor="test")


def count_inbound(app, state: str | None = None) -> int:
    with _store(app).read() as tx:
        return tx.inbound.count(state)


def pending_inbound(app) -> list[int]:
    with _store(app).read() as tx:
        return tx.inbound.pending()


def inbound_raw(app, inbound_id: int) -> bytes | None:
    with _store(app).read() as tx:
        return tx.inbound.raw(inbound_id)


def statuses(app) -> list:
    with _store(app).read() as tx:
        return tx.ops.statuses()


def rules_state(where: object) -> dict | None:
    """What serve recorded of its last rule (re)load."""
    from intake.db.ops import RULES_STATE_KEY

    with _store(where).read() as tx:
        return tx.ops.json_setting(RULES_STATE_KEY)
