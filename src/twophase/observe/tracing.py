"""OpenTelemetry spans for the protocol steps; a no-op without ``opentelemetry-api``.

Each event becomes one span named ``twophase.<step>`` (``twophase.prepare``, ...), with the
step's real start and end times, parented to the span that was current in the caller when
the step ran. Attributes: ``twophase.name``, ``twophase.step``, ``twophase.outcome``,
``twophase.participant``, ``twophase.branch``, ``twophase.correlation_id`` and
``enduser.id`` (the principal). Failed, denied and in-doubt steps get an ERROR status.
"""

from __future__ import annotations

from typing import Any

from .events import Event, Outcome, Step

_ERRORS = {Outcome.FAILED, Outcome.DENIED, Outcome.IN_DOUBT}
# Plain strings, looked up once: an enum's .value is a descriptor call, paid per span.
_SPAN_NAMES = {step: f"twophase.{step.value}" for step in Step}
_VALUES: dict[Step | Outcome, str] = {
    **{step: str(step.value) for step in Step},
    **{outcome: str(outcome.value) for outcome in Outcome},
}


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
        tracer = self._tracer
        if tracer is None:
            return
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
        span = tracer.start_span(_SPAN_NAMES[step], start_time=start, attributes=attributes)
        if outcome in _ERRORS or event.error is not None:
            trace = self._trace
            if event.error is not None:
                span.record_exception(event.error, timestamp=end)
            span.set_status(trace.Status(trace.StatusCode.ERROR, event.detail or outcome))
        span.end(end_time=end)
