"""Observability: the events the core emits and the observers shipped for them.

* :mod:`~twophase.observe.events`: :class:`Event`, :class:`Step`, :class:`Outcome` and the
  ``context(principal=..., correlation_id=...)`` block.
* :class:`AuditLog`: durable audit trail in a database table.
* :class:`Tracing`: OpenTelemetry spans (no-op without ``opentelemetry-api``).
* :mod:`twophase.observe.metrics`: Prometheus metrics (needs ``prometheus-client``).
"""

from .audit import AuditLog
from .events import Event, Observer, Outcome, Step, context, current_correlation_id
from .tracing import Tracing

__all__ = [
    "AuditLog",
    "Event",
    "Observer",
    "Outcome",
    "Step",
    "Tracing",
    "context",
    "current_correlation_id",
]
