"""The layout's promises (STYLE.md, DESIGN 3): imports flow one way, each dependency has one owner.

Every ``intake.*`` import counts, also those under ``TYPE_CHECKING`` and inside functions:
a module graph with a cycle is one where a reader cannot tell which part comes first.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import intake_env

PACKAGE = Path(__file__).resolve().parent.parent / "intake"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if "migrations" in parts:
            continue  # Alembic's scripts, loaded by Alembic
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the intake modules it imports (any import statement anywhere in it)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    targets.append(sub if sub in modules else node.module)
            for t in targets:
                if t.startswith("intake") and t in modules and t != name:
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and sum(len(v) for v in graph.values()) > 100  # the graph was read
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # and would be seen
    assert _cycles(graph) == []


def test_edges_and_the_scheduler_do_not_import_the_service_that_runs_them():
    graph = import_graph()

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == target:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return False

    for module in [m for m in graph if m.startswith("intake.edges")] + ["intake.scheduler"]:
        assert not reaches(module, "intake.service"), module


@pytest.mark.parametrize("library,owners", [
    ("sqlalchemy", ("intake.db",)),
    ("apscheduler", ("intake.scheduler",)),
    ("jinja2", ("intake.templates",)),
    ("aiosmtpd", ("intake.edges.smtp",)),
    ("imapclient", ("intake.edges.imap",)),
    ("yaml", ("intake.rules.loader",)),
    ("re2", ("intake.rules.compile",)),
])
def test_each_library_has_one_owner(library, owners):
    users = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == library or n.startswith(library + ".") for n in names):
                users.add(name)
    assert users and all(u.startswith(owners) for u in users), sorted(users)


def _imports_of(args: list[str]) -> set[str]:
    """The modules a fresh interpreter has imported after running ``intake ARGS``."""
    code = ("import sys, runpy; sys.argv = ['intake', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('intake', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('\\n'.join(sorted(sys.modules)), file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=intake_env(),
                         timeout=60)
    return {line for line in res.stderr.splitlines() if line and " " not in line}


def test_help_imports_click_and_nothing_of_the_flow():
    loaded = _imports_of(["--help"])
    assert "click" in loaded
    for heavy in ("sqlalchemy", "jinja2", "yaml", "alembic", "email.parser", "intake.config", "intake.db"):
        assert heavy not in loaded, heavy


def test_a_read_command_imports_no_migration_tool_nor_the_mail_flow(tmp_path):
    from conftest import open_test_app, write_config

    cfg = write_config(tmp_path)
    open_test_app(cfg).close()
    loaded = _imports_of(["--config", str(cfg), "cases", "list"])
    assert "sqlalchemy" in loaded and "intake.db" in loaded
    for heavy in ("alembic", "jinja2", "yaml", "sqlalchemy.orm", "intake.flow", "intake.rules", "intake.mail.parse"):
        assert heavy not in loaded, heavy
