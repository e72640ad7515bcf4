"""OpenTelemetry spans for the protocol steps; a no-op without ``opentelemetry-api``.

Each event becomes one span named ``twophase.<step>`` (``twophase.prepare``, ...), with the
step's real start and end times, parented to the span that was current in the caller when
the step ran. Attributes: ``twophase.name``, ``twophase.step``, ``twophase.outcome``,
``twophase.participant``, ``twophase.branch``, ``twophase.correlation_id`` and
``enduser.id`` (the principal). Failed, denied and in-doubt steps get an ERROR status.
"""

from __future__ import annotations

from typing import Any

from .events import Event, Outcome

_ERRORS = {Outcome.FAILED, Outcome.DENIED, Outcome.IN_DOUBT}


class Tracing:
    """An observer that turns events into spans (``tracer_provider``: default global)."""

    def __init__(self, tracer_provider: Any = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError:
            self._tracer: Any = None
            return
        from .. import __version__

        self._trace = trace
        self._tracer = trace.get_tracer("twophase", __version__, tracer_provider=tracer_provider)

    @property
    def enabled(self) -> bool:
        """False when opentelemetry-api is not installed."""
        return self._tracer is not None

    def __call__(self, event: Event) -> None:
        if self._tracer is None:
            return
        attributes: dict[str, str] = {
            "twophase.name": event.name,
            "twophase.step": event.step.value,
            "twophase.outcome": event.outcome.value,
            "twophase.correlation_id": event.correlation_id,
        }
        if event.participant is not None:
            attributes["twophase.participant"] = event.participant
        if event.branch is not None:
            attributes["twophase.branch"] = event.branch
        if event.principal is not None:
            attributes["enduser.id"] = event.principal
        start = int(event.started * 1e9)
        span = self._tracer.start_span(
            f"twophase.{event.step.value}", start_time=start, attributes=attributes
        )
        if event.outcome in _ERRORS or event.error is not None:
            trace = self._trace
            if event.error is not None:
                span.record_exception(event.error, timestamp=start + int(event.duration * 1e9))
            span.set_status(trace.Status(trace.StatusCode.ERROR, event.detail or event.outcome))
        span.end(end_time=start + int(event.duration * 1e9))
