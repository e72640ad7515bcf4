"""Which twophase transaction the current thread or task is inside, shared by sync and async."""

from __future__ import annotations

from contextvars import ContextVar
from typing import NoReturn, Protocol


class Open(Protocol):
    """An open transaction: it refuses anything that would nest inside it."""

    def _nested(self, what: str) -> NoReturn: ...


#: The transaction the caller is inside (sync or async), or None.
ACTIVE: ContextVar[Open | None] = ContextVar("twophase_active_transaction", default=None)


def refuse_nesting(what: str) -> None:
    """Raise NestedTransactionError if the caller is inside a twophase transaction."""
    active = ACTIVE.get()
    if active is not None:
        active._nested(what)
