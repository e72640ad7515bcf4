"""A small, pure query builder: immutable builders -> nodes -> compiler -> ``Compiled``."""

from __future__ import annotations

from .builder import DeleteQuery, InsertQuery, QueryMethods, SelectQuery, UpdateQuery
from .compiler import Compiled, compile_query
from .dialect import MYSQL, POSTGRES, SqlDialect
from .runner import Rows, Runner

__all__ = [
    "MYSQL",
    "POSTGRES",
    "Compiled",
    "DeleteQuery",
    "InsertQuery",
    "QueryMethods",
    "Rows",
    "Runner",
    "SelectQuery",
    "SqlDialect",
    "UpdateQuery",
    "compile_query",
]
