"""Immutable query builders and the QueryMethods mixin that db and tx objects inherit."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Generic, Self, TypeVar, overload

from ..errors import InvalidQuery
from .compiler import Compiled, compile_query
from .dialect import check_ident
from .nodes import DeleteNode, InsertNode, OrderBy, QueryNode, SelectNode, UpdateNode
from .runner import AllT, OneT, Runner
from .where import parse_where

NodeT = TypeVar("NodeT", bound=QueryNode)
FilterNodeT = TypeVar("FilterNodeT", bound=SelectNode | UpdateNode | DeleteNode)


def _columns(cols: tuple[object, ...], what: str) -> tuple[str, ...]:
    """Checked select/returning columns; none given means ``*``."""
    return tuple(check_ident(c, what=what, allow_star=True) for c in cols) or ("*",)


def _count(n: object, what: str) -> int:
    # bool is an int subclass, and limit(True) is surely a mistake.
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InvalidQuery(f"{what} must be a non-negative int, got {n!r}")
    return n


def _one_mapping(rows: object, kwargs: Mapping[str, Any], method: str) -> Mapping[Any, Any]:
    if rows is None:
        return kwargs
    if kwargs:
        raise InvalidQuery(f"pass {method}() either a dict or keyword arguments, not both")
    if not isinstance(rows, Mapping):
        raise InvalidQuery(
            f"{method}() takes a dict or keyword arguments, got {type(rows).__name__}"
        )
    return rows


class _Query(Generic[NodeT, AllT, OneT]):
    """Shared behaviour: holds a runner and a node; methods return new builders."""

    __slots__ = ("_node", "_runner")
    _node: NodeT
    _runner: Runner[AllT, OneT]

    def __init__(self, runner: Runner[AllT, OneT], node: NodeT) -> None:
        object.__setattr__(self, "_runner", runner)
        object.__setattr__(self, "_node", node)

    def __setattr__(self, name: str, value: Any) -> None:
        # Builders are shared and reused (a base query refined twice), so they never change.
        raise AttributeError(f"{type(self).__name__} is immutable; its methods return new ones")

    def _with(self, node: NodeT) -> Self:
        return type(self)(self._runner, node)

    @property
    def node(self) -> NodeT:
        """The plain-data operation node this builder holds."""
        return self._node

    def compile(self) -> Compiled:
        """Compile for the runner's dialect; raises ``InvalidQuery`` if it cannot be run."""
        return compile_query(self._node, self._runner.dialect)

    def execute(self) -> AllT:
        """Compile, then run on the runner and return all rows (``Rows`` or an awaitable)."""
        return self._runner.run(self.compile())

    def execute_take_first(self) -> OneT:
        """Compile, then run on the runner and return the first row or None."""
        return self._runner.run_first(self.compile())

    def __str__(self) -> str:
        try:
            return self.compile().sql
        except InvalidQuery as exc:
            return f"<invalid query: {exc}>"

    def __repr__(self) -> str:
        # Only the SQL: parameter values may be secrets or amounts that do not belong in logs.
        return f"<{type(self).__name__} {self._runner.dialect.name}: {self}>"


class _Filtered(_Query[FilterNodeT, AllT, OneT]):
    """Adds ``where``, shared by select, update and delete."""

    __slots__ = ()

    @overload
    def where(self, column: str, op: str, value: Any, /) -> Self: ...
    @overload
    def where(self, condition: Sequence[Any] | Mapping[str, Any], /, **equal: Any) -> Self: ...
    @overload
    def where(self, /, **equal: Any) -> Self: ...
    def where(self, /, *args: Any, **equal: Any) -> Self:
        """Add conditions, ANDed with any earlier ones.

        Forms: ``where("col", "=", v)``, ``where(("col", "=", v))``, ``where(col=v)``,
        ``where({"col": v})``. Operators: ``= != <> < > <= >= like in not in is is not``.
        ``in``/``not in`` take a list, tuple or set; ``= None`` means ``IS NULL`` and
        ``!= None`` ``IS NOT NULL``; ``is``/``is not`` take only None, True or False.
        """
        conds = parse_where(args, equal)
        return self._with(replace(self._node, where=self._node.where + conds))


class InsertQuery(_Query[InsertNode, AllT, OneT]):
    """``INSERT INTO``; ``insert_or_ignore`` skips rows that hit a unique key.

    On MySQL/MariaDB ``INSERT IGNORE`` also turns some other errors (bad values,
    NULL in a NOT NULL column of a multi-row insert) into warnings; PostgreSQL's
    ``ON CONFLICT DO NOTHING`` skips only unique or exclusion conflicts.
    """

    __slots__ = ()

    def values(
        self,
        rows: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        /,
        **columns: Any,
    ) -> Self:
        """Add one row (``values(a=1)`` or ``values({"a": 1})``) or several (a list of dicts).

        Every row, across calls too, must have the same columns.
        """
        if isinstance(rows, list | tuple):
            if columns:
                raise InvalidQuery("pass values() either a list of dicts or keywords, not both")
            batch = list(rows)
        else:
            batch = [_one_mapping(rows, columns, "values")]
        if not batch:
            raise InvalidQuery("values() got an empty list; pass at least one row")
        for row in batch:
            if not isinstance(row, Mapping):
                raise InvalidQuery(f"values() rows must be dicts, got {type(row).__name__}")
        node = self._node
        names = node.columns or tuple(check_ident(k, what="insert column") for k in batch[0])
        if not names:
            raise InvalidQuery("values() got a row with no columns; pass at least one column")
        added = []
        for i, row in enumerate(batch, start=len(node.rows)):
            if row.keys() != set(names):
                raise InvalidQuery(
                    f"insert row {i} has columns {sorted(map(str, row))}, expected "
                    f"{sorted(names)}; every row of a multi-row insert needs the same columns"
                )
            added.append(tuple(row[n] for n in names))
        return self._with(replace(node, columns=names, rows=node.rows + tuple(added)))

    def returning(self, *cols: str) -> Self:
        """Return these columns (all if none given) of the inserted rows; replaces earlier ones."""
        return self._with(replace(self._node, returning=_columns(cols, "returning column")))


class SelectQuery(_Filtered[SelectNode, AllT, OneT]):
    """``SELECT``; ``limit`` and ``offset`` are bound as parameters."""

    __slots__ = ()

    def select(self, *cols: str) -> Self:
        """Select these columns (``*`` if none given); replaces any earlier list."""
        return self._with(replace(self._node, columns=_columns(cols, "select column")))

    def order_by(self, column: str, direction: str = "asc") -> Self:
        """Append an ORDER BY term; ``direction`` is ``"asc"`` or ``"desc"`` (any case)."""
        col = check_ident(column, what="order_by column")
        key = direction.strip().lower() if isinstance(direction, str) else direction
        if key not in ("asc", "desc"):
            raise InvalidQuery(f"order_by direction must be 'asc' or 'desc', got {direction!r}")
        term = OrderBy(col, descending=key == "desc")
        return self._with(replace(self._node, order_by=(*self._node.order_by, term)))

    def limit(self, n: int) -> Self:
        """Return at most ``n`` rows."""
        return self._with(replace(self._node, limit=_count(n, "limit")))

    def offset(self, n: int) -> Self:
        """Skip the first ``n`` rows."""
        return self._with(replace(self._node, offset=_count(n, "offset")))

    def for_update(self) -> Self:
        """Lock the selected rows until the transaction ends (``FOR UPDATE``)."""
        return self._with(replace(self._node, for_update=True))


class UpdateQuery(_Filtered[UpdateNode, AllT, OneT]):
    """``UPDATE``. Refuses to compile without ``.where(...)`` unless ``.all_rows()`` was called.

    ``.returning()`` works on PostgreSQL only; MariaDB has no ``UPDATE ... RETURNING``.
    """

    __slots__ = ()

    def set(self, values: Mapping[str, Any] | None = None, /, **columns: Any) -> Self:
        """Assign columns (``set(a=1)`` or ``set({"a": 1})``); a later call wins per column."""
        given = _one_mapping(values, columns, "set")
        if not given:
            raise InvalidQuery("set() got no columns; pass at least one")
        merged = dict(self._node.assignments)
        merged.update((check_ident(k, what="update column"), v) for k, v in given.items())
        return self._with(replace(self._node, assignments=tuple(merged.items())))

    def all_rows(self) -> Self:
        """Allow this UPDATE to run without a where clause, changing every row."""
        return self._with(replace(self._node, all_rows=True))

    def returning(self, *cols: str) -> Self:
        """Return these columns (all if none given) of the updated rows; replaces earlier ones."""
        return self._with(replace(self._node, returning=_columns(cols, "returning column")))


class DeleteQuery(_Filtered[DeleteNode, AllT, OneT]):
    """``DELETE``. Refuses to compile without ``.where(...)`` unless ``.all_rows()`` was called."""

    __slots__ = ()

    def all_rows(self) -> Self:
        """Allow this DELETE to run without a where clause, removing every row."""
        return self._with(replace(self._node, all_rows=True))

    def returning(self, *cols: str) -> Self:
        """Return these columns (all if none given) of the deleted rows; replaces earlier ones."""
        return self._with(replace(self._node, returning=_columns(cols, "returning column")))


class QueryMethods(Generic[AllT, OneT]):
    """Entry points of the query builder, for database and transaction objects to inherit.

    A subclass implements ``_runner()``; ``AllT``/``OneT`` are what its runner returns
    (``Rows`` and ``dict | None`` when sync, awaitables of them when async).
    """

    __slots__ = ()

    @abstractmethod
    def _runner(self) -> Runner[AllT, OneT]:
        """The runner that executes this object's queries."""
        raise NotImplementedError

    def insert_into(self, table: str) -> InsertQuery[AllT, OneT]:
        """Start an ``INSERT INTO table``."""
        return InsertQuery(self._runner(), InsertNode(check_ident(table, what="table")))

    def insert_or_ignore(self, table: str) -> InsertQuery[AllT, OneT]:
        """Start an insert that silently skips rows conflicting with a unique key."""
        node = InsertNode(check_ident(table, what="table"), ignore=True)
        return InsertQuery(self._runner(), node)

    def select_from(self, table: str) -> SelectQuery[AllT, OneT]:
        """Start a ``SELECT * FROM table``."""
        return SelectQuery(self._runner(), SelectNode(check_ident(table, what="table")))

    def update_table(self, table: str) -> UpdateQuery[AllT, OneT]:
        """Start an ``UPDATE table``; it needs ``.set(...)`` and ``.where()`` or ``.all_rows()``."""
        return UpdateQuery(self._runner(), UpdateNode(check_ident(table, what="table")))

    def delete_from(self, table: str) -> DeleteQuery[AllT, OneT]:
        """Start a ``DELETE FROM table``; it needs ``.where(...)`` or ``.all_rows()``."""
        return DeleteQuery(self._runner(), DeleteNode(check_ident(table, what="table")))
