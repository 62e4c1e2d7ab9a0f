"""Core statements compiled once per dialect and run on the driver's own cursor.

Two paths run for every message: the edges' commit of the raw bytes and the processing
transaction (about twenty statements a message). Executed through SQLAlchemy's
``Connection`` a statement costs ~50 µs of Python; on the DBAPI cursor ~3 µs. So each hot
statement is a :class:`Statement`: a Core statement over the tables of
:mod:`intake.db.schema`, built and compiled once per dialect, whose parameters and
results go through SQLAlchemy's own type conversions (UTC timestamps, JSON) and are
executed on the cursor of the pooled connection. The SQL text is SQLAlchemy's; nothing
here writes SQL by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import itemgetter
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.sql import Select
from sqlalchemy.sql.expression import Executable

class Kit:
    """What a statement builder may differ on between SQLite and PostgreSQL."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.name = dialect.name
        self.pg = dialect.name == "postgresql"
        if self.pg:
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        #: ``insert`` with ``on_conflict_do_nothing``/``on_conflict_do_update`` for this dialect.
        self.insert = insert
        self._compiled: dict[int, _Compiled] = {}

    def compiled(self, stmt: "Statement") -> "_Compiled":
        c = self._compiled.get(id(stmt))
        if c is None:
            c = self._compiled[id(stmt)] = _Compiled.of(stmt.build(self), self.dialect)
        return c


class Statement:
    """A Core statement made by ``build(kit)``; module constants, compiled once per dialect.

    Parameters are ``bindparam`` names, given as a mapping when the statement runs.
    """

    __slots__ = ("build", "__weakref__")

    def __init__(self, build: Callable[[Kit], Executable]) -> None:
        self.build = build


@dataclass(frozen=True)
class _Compiled:
    sql: str
    positional: bool
    # (name, default) of each parameter, in the order of a positional statement
    params: tuple[tuple[str, Any], ...]
    conversions: tuple[tuple[int, Callable[[Any], Any]], ...]  # (parameter index, conversion) where needed
    results: tuple[tuple[int, Callable[[Any], Any]], ...]  # (column index, conversion) where needed

    @classmethod
    def of(cls, stmt: Executable, dialect: Dialect) -> "_Compiled":
        compiled = stmt.compile(dialect=dialect)
        by_name = {name: bp for bp, name in compiled.bind_names.items()}
        order = compiled.positiontup if compiled.positional else list(by_name)
        params, conversions = [], []
        for i, name in enumerate(order or ()):
            bp = by_name[name]
            proc = bp.type.dialect_impl(dialect).bind_processor(dialect)
            params.append((name, None if bp.required else bp.value))
            if proc is not None:
                conversions.append((i, proc))
        if isinstance(stmt, Select):
            columns: Iterable[Any] = stmt.selected_columns
        else:
            columns = getattr(stmt, "exported_columns", ()) or ()
        procs = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns]
        results = tuple((i, p) for i, p in enumerate(procs) if p is not None)
        return cls(compiled.string, bool(compiled.positional), tuple(params), tuple(conversions), results)

    def bind(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        """The driver's parameters: converted as SQLAlchemy would, in its order or by name."""
        if self.defaults:
            values = {**self.defaults, **values}
        out = list(self.pick(values)) if len(self.params) > 1 else [values[self.params[0][0]]] if self.params else []
        for i, convert in self.conversions:
            if out[i] is not None:
                out[i] = convert(out[i])
        return out if self.positional else dict(zip((p[0] for p in self.params), out))

    @cached_property
    def pick(self) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
        """The parameters' values out of a mapping, in order (at C speed: this runs for every statement)."""
        return itemgetter(*(name for name, _ in self.params))

    @cached_property
    def defaults(self) -> dict[str, Any]:
        """Values the statement carries itself (literals in a WHERE clause, optional parameters)."""
        return {name: default for name, default in self.params if default is not None}

    def row(self, raw: Sequence[Any]) -> tuple[Any, ...]:
        if not self.results:
            return tuple(raw)
        out = list(raw)
        for i, convert in self.results:
            if out[i] is not None:
                out[i] = convert(out[i])
        return tuple(out)


class Sql:
    """Runs :class:`Statement` objects on one DBAPI cursor, inside the caller's transaction."""

    def __init__(self, cursor: Any, kit: Kit) -> None:
        self.cur = cursor
        self.kit = kit

    def run(self, stmt: Statement, values: Mapping[str, Any] | None = None) -> int:
        """Execute; the number of rows it changed (where the driver says)."""
        c = self.kit.compiled(stmt)
        self.cur.execute(c.sql, c.bind(values or {}))
        return self.cur.rowcount

    def many(self, stmt: Statement, rows: Sequence[Mapping[str, Any]]) -> None:
        """Execute once per parameter mapping, in one driver call."""
        if rows:
            c = self.kit.compiled(stmt)
            self.cur.executemany(c.sql, [c.bind(r) for r in rows])

    def one(self, stmt: Statement, values: Mapping[str, Any] | None = None) -> tuple[Any, ...] | None:
        """The first row (converted), or None."""
        c = self.kit.compiled(stmt)
        self.cur.execute(c.sql, c.bind(values or {}))
        raw = self.cur.fetchone()
        return c.row(raw) if raw is not None else None

    def all(self, stmt: Statement, values: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Every row (converted)."""
        c = self.kit.compiled(stmt)
        self.cur.execute(c.sql, c.bind(values or {}))
        return [c.row(r) for r in self.cur.fetchall()]

    def query(self, stmt: Executable) -> list[tuple[Any, ...]]:
        """Every row of a statement built for this call (compiled now, not kept): the command
        line's filtered reads, where SQLAlchemy's row objects would cost more than the query."""
        c = _Compiled.of(stmt, self.kit.dialect)
        self.cur.execute(c.sql, c.bind({}))
        return [c.row(r) for r in self.cur.fetchall()]

    def scalar(self, stmt: Statement, values: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row, or None."""
        row = self.one(stmt, values)
        return row[0] if row is not None else None
