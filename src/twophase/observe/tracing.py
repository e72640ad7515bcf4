"""OpenTelemetry spans for the protocol steps; a no-op without ``opentelemetry-api``.

Each event becomes one span named ``twophase.<step>`` (``twophase.prepare``, ...), with the
step's real start and end times, parented to the span that was current in the caller when
the step ran. Attributes: ``twophase.name``, ``twophase.step``, ``twophase.outcome``,
``twophase.participant``, ``twophase.branch``, ``twophase.correlation_id`` and
``enduser.id`` (the principal). Failed, denied and in-doubt steps get an ERROR status.

Spans are made after their step has finished (an event describes a finished step), so
nothing depends on when. Building a span in the OpenTelemetry SDK costs tens of
microseconds of Python, several times what the step's own Python costs. In threads a
background thread makes them, in batches, from the events and the caller's context
captured when each step ended: the caller pays about one microsecond per step, and the
spans arrive a few tens of milliseconds later (``flush()`` waits for them). That thread
helps while the process has time to spare (callers waiting for the database); in a busy
process it gets the interpreter lock only in turns. So when it waited for the lock twice
as long as it worked on a batch, callers make their own spans for the next second; and
when it falls behind (a batch in its hands, another waiting) each caller makes its own
span until it catches up: spans are never late by more than two batches nor dropped
under a sustained load.
Under asyncio each span is made in the event loop as its step ends, for the same reason:
a second thread there can only take turns with the loop. ``background=True`` or
``False`` forces one way.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
import weakref
from typing import Any

from ._backlog import Backlog
from .events import Event, Outcome, Step

log = logging.getLogger("twophase.tracing")

_ERRORS = {Outcome.FAILED, Outcome.DENIED, Outcome.IN_DOUBT}
# Plain strings, looked up once: an enum's .value is a descriptor call, paid per span.
_SPAN_NAMES = {step: f"twophase.{step.value}" for step in Step}
_VALUES: dict[Step | Outcome, str] = {
    **{step: str(step.value) for step in Step},
    **{outcome: str(outcome.value) for outcome in Outcome},
}
# Spans made between two yields of the GIL (a span costs the SDK tens of microseconds): a
# longer hold makes a caller whose I/O completed wait for it, up to the interpreter's switch
# interval (5 ms). 4 rather than 32 halved the 99th percentile latency of one client.
_CHUNK = 4
# The running loop of the calling thread, or None: a C function, tens of nanoseconds.
_running_loop = asyncio._get_running_loop
_GATHER = 0.05  # seconds the thread gathers steps before making their spans
_BATCH = 1024
# With this many steps waiting (another batch is in the thread's hands) the thread is
# behind: it gets the interpreter lock only in turns with busy callers, so each caller
# makes its own span until it catches up.
_BEHIND = _BATCH
# A thread that waited this many times its CPU time to get the interpreter lock back
# after its yields, over a batch, only gets turns: the callers are busy, and making their
# own spans for a while is cheaper. Only the yields are timed, so a slow span processor
# (an exporter waiting for the network) does not count as starving.
_STARVED = 2.0
_INLINE_FOR = 1.0  # seconds; then a batch on the thread measures again
_JUDGED = 16  # spans a batch needs before its timing says anything


def starved(spans: int, waited: float, cpu: float) -> bool:
    """Whether a batch of ``spans`` that cost the thread ``cpu`` seconds of CPU, and for
    which it ``waited`` seconds to get the interpreter lock back after yielding it, shows
    a thread starved of the lock."""
    return spans >= _JUDGED and waited > _STARVED * cpu


class Tracing:
    """An observer that turns events into spans (``tracer_provider``: default global).

    ``background``: None (the default) makes spans on a background thread, except in a
    thread running an asyncio event loop and while the thread is starved or behind, where
    each is made as its step ends; True always uses the thread; False always makes them in
    the caller's thread.
    ``max_queue`` bounds the events waiting for the background thread; beyond it the
    oldest are dropped (counted in ``dropped``), so tracing never grows memory without end.
    """

    def __init__(
        self,
        tracer_provider: Any = None,
        *,
        background: bool | None = None,
        max_queue: int = 100_000,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue!r}")
        self.background = background
        self.max_queue = max_queue
        self._backlog: Backlog[tuple[Event, Any]] = Backlog(
            "twophase-tracing",
            self._run,
            gather=_GATHER,
            max_batch=_BATCH,
            max_queue=max_queue,
            on_start=lambda: _at_exit(self),
        )
        self._inline_until = 0.0
        try:
            from opentelemetry import context, trace
        except ImportError:
            self._tracer: Any = None
            return
        from .. import __version__

        self._trace = trace
        self._current = context.get_current
        self._tracer = trace.get_tracer("twophase", __version__, tracer_provider=tracer_provider)

    @property
    def enabled(self) -> bool:
        """False when opentelemetry-api is not installed."""
        return self._tracer is not None

    @property
    def dropped(self) -> int:
        """Events dropped because the queue was full."""
        return self._backlog.dropped

    def __call__(self, event: Event) -> None:
        if self._tracer is None:
            return
        background = self.background
        if background is None:
            background = (
                _running_loop() is None
                and len(self._backlog) < _BEHIND
                and time.monotonic() >= self._inline_until
            )
        if background:
            self._backlog.put((event, self._current()))
        else:
            self._span(event, self._current())

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the spans of every step so far are made; False on timeout."""
        return self._backlog.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush, then stop the background thread; later steps' spans are made in the
        caller's thread. Closing twice does nothing."""
        if self._backlog.closed:
            return
        self.background = False
        if not self.flush(timeout):
            log.warning("closing tracing with %d spans not made", len(self._backlog))
        self._backlog.close(timeout)
        _OPEN.discard(self)

    def _run(self) -> None:
        backlog = self._backlog
        while (batch := backlog.take()) is not None:
            cpu, waited = time.thread_time(), 0.0
            for i in range(0, len(batch), _CHUNK):
                chunk = batch[i : i + _CHUNK]
                for event, ctx in chunk:
                    try:
                        self._span(event, ctx)
                    except Exception:
                        log.warning("could not make the span of %s", event.step, exc_info=True)
                backlog.done(len(chunk))
                yielded = time.monotonic()
                time.sleep(0)  # let a caller waiting for the GIL have it
                waited += time.monotonic() - yielded
            if starved(len(batch), waited, time.thread_time() - cpu):
                self._inline_until = time.monotonic() + _INLINE_FOR

    def _span(self, event: Event, ctx: Any) -> None:
        step, outcome = event.step, event.outcome
        attributes: dict[str, str] = {
            "twophase.name": event.name,
            "twophase.step": _VALUES[step],
            "twophase.outcome": _VALUES[outcome],
            "twophase.correlation_id": event.correlation_id,
        }
        if event.participant is not None:
            attributes["twophase.participant"] = event.participant
        if event.branch is not None:
            attributes["twophase.branch"] = event.branch
        if event.principal is not None:
            attributes["enduser.id"] = event.principal
        start = int(event.started * 1e9)
        end = start + int(event.duration * 1e9)
        span = self._tracer.start_span(
            _SPAN_NAMES[step], context=ctx, start_time=start, attributes=attributes
        )
        if outcome in _ERRORS or event.error is not None:
            trace = self._trace
            if event.error is not None:
                span.record_exception(event.error, timestamp=end)
            span.set_status(trace.Status(trace.StatusCode.ERROR, event.detail or outcome))
        span.end(end_time=end)


_OPEN: weakref.WeakSet[Tracing] = weakref.WeakSet()
_REGISTERED = False


def _at_exit(tracing: Tracing) -> None:
    """Flush ``tracing`` at interpreter exit.

    The hook is registered with the first span, not at import: atexit runs hooks last in,
    first out, and this one must run before the OpenTelemetry SDK's provider shuts down
    (its hook is registered when the application makes the provider).
    """
    global _REGISTERED
    _OPEN.add(tracing)
    if not _REGISTERED:
        _REGISTERED = True
        atexit.register(_flush_all)


def _flush_all() -> None:
    for tracing in list(_OPEN):
        tracing.flush(timeout=5.0)
