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
import dataclasses
import enum
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("twophase.observe")
# Seeded from the system, our own so that an application seeding the random module does not
# make its processes share ids; reseeded in a forked child, which would repeat them too.
_random = random.Random()
_random_bits = _random.getrandbits
os.register_at_fork(after_in_child=_random.seed)


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


def _event_maker() -> Callable[..., Event]:
    """``Event(*fields)`` for the hot path, at about half the cost: a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``, which looks the field up by
    name; this calls the slots' own setters, found once."""
    new = object.__new__
    setters = tuple(getattr(Event, f.name).__set__ for f in dataclasses.fields(Event))
    (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10) = setters

    def make(
        step: Step,
        name: str,
        outcome: Outcome,
        started: float,
        duration: float,
        correlation_id: str,
        principal: str | None,
        participant: str | None,
        branch: str | None,
        detail: str | None,
        error: BaseException | None,
    ) -> Event:
        event = new(Event)
        s0(event, step)
        s1(event, name)
        s2(event, outcome)
        s3(event, started)
        s4(event, duration)
        s5(event, correlation_id)
        s6(event, principal)
        s7(event, participant)
        s8(event, branch)
        s9(event, detail)
        s10(event, error)
        return event

    return make


_make_event = _event_maker()


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
    # Not os.urandom(): a correlation id needs to be unique, not secret, and a system call
    # lets go of the interpreter lock, which a busy process then waits to get back.
    return _CORRELATION.get() or f"{_random_bits(64):016x}"


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
        event = _make_event(
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
