"""Plain-data operation nodes that the builders produce and the compiler reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

#: Binary operators a Comparison may hold, as they are written in SQL.
ComparisonOp: TypeAlias = Literal["=", "<>", "<", ">", "<=", ">=", "LIKE"]


@dataclass(frozen=True, slots=True)
class Comparison:
    """``column <op> %s`` with ``value`` bound as a parameter."""

    column: str
    op: ComparisonOp
    value: Any


@dataclass(frozen=True, slots=True)
class InList:
    """``column [NOT] IN (%s, ...)``; an empty list is a constant false (true if negated)."""

    column: str
    values: tuple[Any, ...]
    negated: bool = False


@dataclass(frozen=True, slots=True)
class IsCheck:
    """``column IS [NOT] NULL | TRUE | FALSE``."""

    column: str
    value: bool | None
    negated: bool = False


#: One predicate of a where clause; the predicates of a clause are ANDed.
Condition: TypeAlias = Comparison | InList | IsCheck


@dataclass(frozen=True, slots=True)
class OrderBy:
    """One ``ORDER BY`` term."""

    column: str
    descending: bool = False


@dataclass(frozen=True, slots=True)
class InsertNode:
    """``INSERT [IGNORE] INTO table (columns) VALUES (row), ... [RETURNING ...]``."""

    table: str
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[Any, ...], ...] = ()
    ignore: bool = False
    returning: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SelectNode:
    """``SELECT columns FROM table [WHERE] [ORDER BY] [LIMIT] [OFFSET] [FOR UPDATE]``."""

    table: str
    columns: tuple[str, ...] = ("*",)
    where: tuple[Condition, ...] = ()
    order_by: tuple[OrderBy, ...] = ()
    limit: int | None = None
    offset: int | None = None
    for_update: bool = False


@dataclass(frozen=True, slots=True)
class UpdateNode:
    """``UPDATE table SET col = %s, ... [WHERE] [RETURNING]``; ``all_rows`` allows no WHERE."""

    table: str
    assignments: tuple[tuple[str, Any], ...] = ()
    where: tuple[Condition, ...] = ()
    all_rows: bool = False
    returning: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeleteNode:
    """``DELETE FROM table [WHERE] [RETURNING]``; ``all_rows`` allows no WHERE."""

    table: str
    where: tuple[Condition, ...] = ()
    all_rows: bool = False
    returning: tuple[str, ...] = ()


#: Any statement node the compiler accepts.
QueryNode: TypeAlias = InsertNode | SelectNode | UpdateNode | DeleteNode
