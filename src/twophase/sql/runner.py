"""What a builder executes through: the Runner protocol and the Rows it returns."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

from .compiler import Compiled
from .dialect import SqlDialect

#: What ``Runner.run`` returns: ``Rows`` (sync) or ``Awaitable[Rows]`` (async).
AllT = TypeVar("AllT", covariant=True)
#: What ``Runner.run_first`` returns: ``dict | None`` (sync) or an awaitable of it (async).
OneT = TypeVar("OneT", covariant=True)


class Rows(list[dict[str, Any]]):
    """Result rows as dicts, plus ``rowcount``: rows affected (DML) or returned (SELECT)."""

    __slots__ = ("rowcount",)

    def __init__(self, rows: Iterable[dict[str, Any]] = (), rowcount: int | None = None) -> None:
        super().__init__(rows)
        self.rowcount: int = len(self) if rowcount is None else rowcount

    def __repr__(self) -> str:
        return f"Rows({list.__repr__(self)}, rowcount={self.rowcount})"


class Runner(Protocol[AllT, OneT]):
    """Executes compiled statements on one connection.

    A sync runner is ``Runner[Rows, dict[str, Any] | None]``; an async one is
    ``Runner[Awaitable[Rows], Awaitable[dict[str, Any] | None]]`` (``async def``
    methods satisfy it). Always pass ``query.params`` to the driver, even when empty:
    the SQL text has every literal ``%`` doubled.
    """

    @property
    def dialect(self) -> SqlDialect:
        """The dialect to compile for."""
        ...

    def run(self, query: Compiled) -> AllT:
        """Execute ``query`` and return all rows (empty ``Rows`` if it returns none)."""
        ...

    def run_first(self, query: Compiled) -> OneT:
        """Execute ``query`` and return its first row, or None."""
        ...
