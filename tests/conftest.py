"""Shared fixtures: a temporary installation and a way to run the real ``intake`` command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from intake.app import App, open_app

ROOT = Path(__file__).resolve().parent.parent
MAILS = Path(__file__).resolve().parent / "mails"


def mail(name: str) -> bytes:
    """A hand-made test mail from ``tests/mails``."""
    return (MAILS / name).read_bytes()


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
        text = team if team is not None else (ROOT / "intake" / "shipped" / "routing_rules" / "10-team.yaml").read_text("utf-8")
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


@pytest.fixture
def app(config_path: Path) -> App:
    a = open_app(config_path)
    yield a
    a.close()


RunIntake = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_intake(config_path: Path) -> RunIntake:
    """Run the real command line: ``run_intake("cases", "list", "--json")``."""

    def run(*args: str, input: bytes | None = None, config: Path | None = config_path, check: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "intake"]
        if config is not None:
            cmd += ["--config", str(config)]
        proc = subprocess.run(cmd + list(args), input=input, capture_output=True, timeout=timeout,
                              env=intake_env(), cwd=str(config_path.parent))
        out = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                          proc.stderr.decode("utf-8", "replace"))
        if check and out.returncode != 0:
            raise AssertionError(f"intake {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    return run
