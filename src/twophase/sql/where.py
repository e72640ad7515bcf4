"""Turns the accepted forms of ``.where(...)`` arguments into condition nodes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InvalidQuery
from .dialect import check_ident
from .nodes import Comparison, ComparisonOp, Condition, InList, IsCheck

#: Accepted operators (after lower-casing and collapsing whitespace) and their SQL spelling.
_COMPARISONS: dict[str, ComparisonOp] = {
    "=": "=",
    "!=": "<>",
    "<": "<",
    ">": ">",
    "<=": "<=",
    ">=": ">=",
    "like": "LIKE",
}
_ALIASES = {"<>": "!="}
_OPERATORS = (*_COMPARISONS, "in", "not in", "is", "is not")
_ALLOWED_TEXT = ", ".join(repr(op) for op in (*_OPERATORS, "<>"))

_FORMS = (
    "use where('col', '=', value), where(('col', '=', value)), where(col=value) "
    "or where({'col': value})"
)


def normalize_operator(op: object) -> str:
    """Return the canonical spelling of ``op`` or raise ``InvalidQuery`` listing the allowed."""
    if isinstance(op, str):
        key = " ".join(op.split()).lower()
        key = _ALIASES.get(key, key)
        if key in _OPERATORS:
            return key
    raise InvalidQuery(f"unknown where operator {op!r}; use one of {_ALLOWED_TEXT}")


def condition(column: object, op: object, value: Any) -> Condition:
    """Build the condition node for ``column op value``."""
    col = check_ident(column, what="where column")
    key = normalize_operator(op)
    if key in ("in", "not in"):
        # A str is iterable too, and "x IN ('a', 'b', 'c')" from "abc" is never what was meant.
        if not isinstance(value, list | tuple | set | frozenset):
            raise InvalidQuery(
                f"where {col!r} {key!r} needs a list, tuple or set of values, "
                f"got {type(value).__name__}"
            )
        return InList(col, tuple(value), negated=key == "not in")
    if key in ("is", "is not"):
        if value is not None and value is not True and value is not False:
            raise InvalidQuery(
                f"where {col!r} {key!r} takes only None, True or False, "
                f"got a {type(value).__name__}; use '=' to compare with other values"
            )
        return IsCheck(col, value, negated=key == "is not")
    if value is None:
        # "x = NULL" is never true in SQL, so equality with None means IS NULL.
        if key in ("=", "!="):
            return IsCheck(col, None, negated=key == "!=")
        raise InvalidQuery(
            f"where {col!r} {key!r} None is never true in SQL; use 'is' or 'is not' with None"
        )
    return Comparison(col, _COMPARISONS[key], value)


def _equalities(values: Mapping[Any, Any]) -> list[Condition]:
    return [condition(col, "=", value) for col, value in values.items()]


def parse_where(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Condition, ...]:
    """Parse one ``.where(*args, **kwargs)`` call; at least one condition is required."""
    conds: list[Condition]
    if not args:
        conds = []
    elif len(args) == 3:
        conds = [condition(*args)]
    elif len(args) == 1 and isinstance(args[0], Mapping):
        conds = _equalities(args[0])
    elif len(args) == 1 and isinstance(args[0], tuple | list) and len(args[0]) == 3:
        conds = [condition(*args[0])]
    else:
        # Name only the types: the arguments may hold values that do not belong in logs.
        got = ", ".join(type(a).__name__ for a in args)
        raise InvalidQuery(f"where() cannot read {len(args)} argument(s) ({got}); {_FORMS}")
    conds += _equalities(kwargs)
    if not conds:
        # An empty where() must not count as a filter: it would unlock UPDATE/DELETE of all rows.
        raise InvalidQuery(f"where() was given no condition; {_FORMS}")
    return tuple(conds)
