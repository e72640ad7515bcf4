"""The events the core emits, one per protocol step, and the context they carry.

Observability hangs off these events and never decides an outcome: the core builds an
:class:`Event` once a step has finished (successfully or not) and hands it to every
observer of the database or coordinator. An observer that raises is logged and ignored.

Who and why travel in context variables, so they work unchanged in threads and asyncio
tasks::

    with twophase.context(principal="billing-svc", correlation_id=request_id):
        db.begin_distributed("invoice-42", work)

With no correlation id in context, each top-level call (``begin_distributed``,
``commit_distributed``, a coordinator transaction, ...) generates one, shared by all the
events of that call.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("twophase.observe")


class Step(enum.StrEnum):
    """What an event records."""

    BEGIN = "begin"
    PREPARE = "prepare"
    DECISION = "decision"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    RECOVER = "recover"
    COMPENSATE = "compensate"
    EXPIRE = "expire"
    REAP = "reap"
    PRUNE = "prune"


class Outcome(enum.StrEnum):
    """How a step ended."""

    OK = "ok"  # begin succeeded; a decision row was written
    PREPARED = "prepared"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    #: The step found it already done (a retried commit or rollback).
    ALREADY = "already"
    #: The policy refused it; nothing reached the database.
    DENIED = "denied"
    IN_DOUBT = "in_doubt"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Event:
    """One finished step of a transaction."""

    step: Step
    #: The transaction's full name (namespace included); a global transaction's name for
    #: its branches and decisions.
    name: str
    outcome: Outcome
    #: Wall-clock start (seconds since the epoch) and how long the step took.
    started: float
    duration: float
    correlation_id: str
    principal: str | None = None
    #: The database (its label) or coordinator participant key the step ran on.
    participant: str | None = None
    #: A global transaction's branch qualifier (``<index>.<deadline>``).
    branch: str | None = None
    #: Free text: the error, the reason for a rollback, the recovery action.
    detail: str | None = None
    #: The exception the step ended with, for observers that record it (spans do).
    error: BaseException | None = field(default=None, compare=False)


class Observer(Protocol):
    """Anything called with each event: audit log, tracing, metrics, your own."""

    def __call__(self, event: Event) -> None: ...


_PRINCIPAL: ContextVar[str | None] = ContextVar("twophase_principal", default=None)
_CORRELATION: ContextVar[str | None] = ContextVar("twophase_correlation_id", default=None)


@contextlib.contextmanager
def context(*, principal: str | None = None, correlation_id: str | None = None) -> Iterator[None]:
    """Act as ``principal`` and tag events with ``correlation_id`` inside the block.

    Either may be omitted to keep the outer value. Nested blocks override and restore.
    """
    if principal is not None and (not isinstance(principal, str) or not principal):
        raise ValueError(f"principal must be a non-empty str, got {principal!r}")
    if correlation_id is not None and (
        not isinstance(correlation_id, str) or not 0 < len(correlation_id) <= 64
    ):
        raise ValueError(
            f"correlation_id must be a str of 1 to 64 characters, got {correlation_id!r}"
        )
    tokens = []
    if principal is not None:
        tokens.append((_PRINCIPAL, _PRINCIPAL.set(principal)))
    if correlation_id is not None:
        tokens.append((_CORRELATION, _CORRELATION.set(correlation_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current_principal(default: str | None = None) -> str | None:
    """The principal set by :func:`context`, else ``default``."""
    return _PRINCIPAL.get() or default


def current_correlation_id() -> str:
    """The correlation id set by :func:`context`, else a fresh one."""
    return _CORRELATION.get() or os.urandom(8).hex()


class Emitter:
    """The observers of one database or coordinator, and the step timer.

    Falsy when nobody observes, so the hot path skips all event work with one test.
    """

    __slots__ = ("label", "observers", "principal")

    def __init__(
        self, observers: Sequence[Observer] = (), *, label: str | None, principal: str | None
    ) -> None:
        for ob in observers:
            if not callable(ob):
                raise TypeError(
                    f"observers must be callables taking an Event, got {type(ob).__name__}"
                )
        self.observers = tuple(observers)
        self.label = label
        self.principal = principal

    def __bool__(self) -> bool:
        return bool(self.observers)

    def emit(
        self,
        step: Step,
        name: str,
        outcome: Outcome,
        started: float,
        *,
        correlation_id: str,
        participant: str | None = None,
        branch: str | None = None,
        detail: str | None = None,
        error: BaseException | None = None,
        duration: float | None = None,
    ) -> None:
        """Build the event of a step that began at ``started`` (time.time()) and ended now."""
        observers = self.observers
        if not observers:
            return
        # Positional, in field order: this runs for every step of every transaction.
        event = Event(
            step,
            name,
            outcome,
            started,
            time.time() - started if duration is None else duration,
            correlation_id,
            _PRINCIPAL.get() or self.principal,  # current_principal(), inlined
            participant if participant is not None else self.label,
            branch,
            detail,
            error,
        )
        for ob in observers:
            try:
                ob(event)
            except Exception:
                # Observability never changes an outcome.
                log.warning("observer %r failed on %s", ob, event.step, exc_info=True)
