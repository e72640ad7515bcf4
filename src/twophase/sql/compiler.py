"""The one compiler: turns an operation node into SQL text and bound parameters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidQuery
from .dialect import SqlDialect
from .nodes import (
    Comparison,
    Condition,
    DeleteNode,
    InList,
    InsertNode,
    QueryNode,
    SelectNode,
    UpdateNode,
)

#: MySQL's documented way to say "no limit" when only an OFFSET is wanted (2**64 - 1).
_MYSQL_NO_LIMIT = "18446744073709551615"

_IS_KEYWORDS = {None: "NULL", True: "TRUE", False: "FALSE"}


@dataclass(frozen=True, slots=True)
class Compiled:
    """A compiled statement: ``sql`` with ``%s`` placeholders and the ``params`` they bind."""

    sql: str
    params: tuple[Any, ...]


class _Writer:
    """Accumulates parameters while one statement is written."""

    def __init__(self, dialect: SqlDialect) -> None:
        self.dialect = dialect
        self.params: list[Any] = []

    def ident(self, name: str) -> str:
        # Both drivers read %-sequences as placeholders, so a literal % must be doubled.
        return self.dialect.quote_ident(name).replace("%", "%%")

    def idents(self, names: Iterable[str]) -> str:
        return ", ".join(self.ident(n) for n in names)

    def param(self, value: Any) -> str:
        self.params.append(value)
        return self.dialect.placeholder

    def condition(self, cond: Condition) -> str:
        column = self.ident(cond.column)
        if isinstance(cond, Comparison):
            return f"{column} {cond.op} {self.param(cond.value)}"
        if isinstance(cond, InList):
            if not cond.values:
                # "x IN ()" is a syntax error; an empty set matches nothing (NOT IN: everything).
                return "1 = 1" if cond.negated else "1 = 0"
            marks = ", ".join(self.param(v) for v in cond.values)
            return f"{column} {'NOT IN' if cond.negated else 'IN'} ({marks})"
        # What is left is an IsCheck.
        return f"{column} IS {'NOT ' if cond.negated else ''}{_IS_KEYWORDS[cond.value]}"

    def where(self, conds: tuple[Condition, ...]) -> str:
        if not conds:
            return ""
        return " WHERE " + " AND ".join(self.condition(c) for c in conds)

    def returning(self, cols: tuple[str, ...], statement: str, supported: bool) -> str:
        if not cols:
            return ""
        if not supported:
            raise InvalidQuery(
                f"the {self.dialect.name} dialect does not support {statement} ... RETURNING; "
                f"drop .returning() and read the rows with a follow-up select_from(...)"
                f".where(...) in the same transaction"
            )
        return " RETURNING " + self.idents(cols)


def _require_filter(kind: str, table: str, where: tuple[Condition, ...], all_rows: bool) -> None:
    if not where and not all_rows:
        raise InvalidQuery(
            f"{kind} on {table!r} has no where clause; add .where(...) or, to touch every "
            f"row on purpose, call .all_rows()"
        )


def _insert(w: _Writer, node: InsertNode) -> str:
    if not node.rows:
        raise InvalidQuery(f"insert into {node.table!r} has no values; call .values(...)")
    d = w.dialect
    ignore = node.ignore and d.insert_ignore_style == "insert_ignore"
    rows = ", ".join("(" + ", ".join(w.param(v) for v in row) + ")" for row in node.rows)
    sql = (
        f"INSERT {'IGNORE ' if ignore else ''}INTO {w.ident(node.table)} "
        f"({w.idents(node.columns)}) VALUES {rows}"
    )
    if node.ignore and d.insert_ignore_style == "on_conflict":
        sql += " ON CONFLICT DO NOTHING"
    return sql + w.returning(node.returning, "INSERT", d.supports_returning_insert)


def _select(w: _Writer, node: SelectNode) -> str:
    sql = f"SELECT {w.idents(node.columns)} FROM {w.ident(node.table)}{w.where(node.where)}"
    if node.order_by:
        terms = (f"{w.ident(o.column)} {'DESC' if o.descending else 'ASC'}" for o in node.order_by)
        sql += " ORDER BY " + ", ".join(terms)
    if node.limit is not None:
        sql += f" LIMIT {w.param(node.limit)}"
    elif node.offset is not None and w.dialect.offset_needs_limit:
        sql += f" LIMIT {_MYSQL_NO_LIMIT}"
    if node.offset is not None:
        sql += f" OFFSET {w.param(node.offset)}"
    if node.for_update:
        sql += " FOR UPDATE"
    return sql


def _update(w: _Writer, node: UpdateNode) -> str:
    if not node.assignments:
        raise InvalidQuery(f"update of {node.table!r} sets nothing; call .set(...)")
    _require_filter("update", node.table, node.where, node.all_rows)
    sets = ", ".join(f"{w.ident(col)} = {w.param(value)}" for col, value in node.assignments)
    sql = f"UPDATE {w.ident(node.table)} SET {sets}{w.where(node.where)}"
    return sql + w.returning(node.returning, "UPDATE", w.dialect.supports_returning_update)


def _delete(w: _Writer, node: DeleteNode) -> str:
    _require_filter("delete", node.table, node.where, node.all_rows)
    sql = f"DELETE FROM {w.ident(node.table)}{w.where(node.where)}"
    return sql + w.returning(node.returning, "DELETE", w.dialect.supports_returning_delete)


def compile_query(node: QueryNode, dialect: SqlDialect) -> Compiled:
    """Compile ``node`` for ``dialect``; raises ``InvalidQuery`` if it cannot be run."""
    w = _Writer(dialect)
    if isinstance(node, InsertNode):
        sql = _insert(w, node)
    elif isinstance(node, SelectNode):
        sql = _select(w, node)
    elif isinstance(node, UpdateNode):
        sql = _update(w, node)
    elif isinstance(node, DeleteNode):
        sql = _delete(w, node)
    else:
        raise InvalidQuery(f"cannot compile {type(node).__name__}; build queries with QueryMethods")
    return Compiled(sql, tuple(w.params))
