"""Prometheus metrics: what twophase did (from events) and what is open now (from databases).

Two kinds of figures, both served by one :class:`Metrics` object:

* **Steps.** A ``Metrics`` is an observer: give it to ``twophase.connect(url,
  observers=[metrics])`` (or ``connect_async``, or ``Coordinator(..., observers=...)``) and
  every protocol step is counted by step and outcome, and timed per step.
* **What is open.** Gauges per participant database: prepared transactions, the age of the
  oldest, how many are older than the SLA (stuck), and the outbox lag where an outbox
  exists. They are read from the database by :meth:`Metrics.refresh` (a ``Database``),
  :meth:`Metrics.refresh_async` (an ``AsyncDatabase``), or at every scrape for the
  databases given to :meth:`Metrics.watch`.

::

    from prometheus_client import start_http_server
    from twophase.observe.metrics import Metrics

    metrics = Metrics(sla=timedelta(minutes=1))          # the default registry
    db = twophase.connect(url, observers=[metrics])
    metrics.watch(db, participant="orders")              # gauges read at each scrape
    start_http_server(9464)

prometheus_client is optional (``pip install 'twophase[metrics]'``): this module imports
without it, and :class:`Metrics` raises :class:`MetricsUnavailable` when made without it.

The gauges of a database with a namespace count only that namespace's prepared
transactions; the outbox is one table per database and is counted whole.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, cast

from ..errors import NotSupported
from ..outbox import LEASES, OUTBOX, OutboxSQL
from ..protocol import PreparedTransaction
from ..relay.core import Lag
from .events import Event, Outcome

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    from .._async.database import AsyncDatabase
    from .._sync.database import Database
    from ..dialects import Dialect

log = logging.getLogger("twophase.observe")

#: Latency buckets, in seconds: one database round trip (about a millisecond on a LAN) up
#: to a prepare or commit stuck behind locks or a slow fsync (30 s).
BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

DEFAULT_SLA: Final = timedelta(minutes=1)

_PREFIX = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class MetricsUnavailable(NotSupported, ImportError):
    """prometheus_client is not installed."""


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise MetricsUnavailable(
            "twophase metrics need prometheus_client: pip install 'twophase[metrics]'"
        ) from exc
    return prometheus_client


# -- what is open: one snapshot per participant -------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one database held open when it was last read."""

    participant: str
    #: When it was read (seconds since the epoch).
    taken_at: float
    #: Prepared transactions (and branches of global transactions) in the namespace.
    prepared: int
    #: Age of the oldest of them, in seconds; 0 when there is none.
    oldest_age_seconds: float
    #: How many were prepared longer ago than ``sla_seconds``.
    stuck: int
    sla_seconds: float
    #: The outbox lag; None when the database has no outbox tables.
    outbox: Lag | None = None

    @classmethod
    def of(
        cls,
        participant: str,
        prepared: Sequence[PreparedTransaction],
        outbox: Lag | None,
        sla: timedelta,
        now: datetime | None = None,
    ) -> Snapshot:
        """Summarize a ``db.prepared()`` listing (and an outbox lag) at ``now``."""
        now = now or datetime.now(UTC)
        # The server's clock stamps prepared_at; a little skew must not give negative ages.
        ages = [
            max(0.0, (now - p.prepared_at).total_seconds())
            for p in prepared
            if p.prepared_at is not None
        ]
        limit = sla.total_seconds()
        return cls(
            participant=participant,
            taken_at=now.timestamp(),
            prepared=len(prepared),
            oldest_age_seconds=max(ages, default=0.0),
            stuck=sum(age > limit for age in ages),
            sla_seconds=limit,
            outbox=outbox,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for JSON."""
        lag = self.outbox
        return {
            "participant": self.participant,
            "taken_at": datetime.fromtimestamp(self.taken_at, UTC).isoformat(),
            "prepared": self.prepared,
            "oldest_age_seconds": round(self.oldest_age_seconds, 3),
            "stuck": self.stuck,
            "sla_seconds": self.sla_seconds,
            "outbox": None
            if lag is None
            else {
                "pending": lag.pending,
                "dead": lag.dead,
                "oldest_pending_age_seconds": lag.oldest_seconds,
                "delivered": lag.delivered,
            },
        }


# What reading a database needs, written once and driven by a sync or an async caller: the
# generator yields a request (_PREPARED, or a statement for db.execute) and is sent the
# result. Only the two drivers below do I/O.
_PREPARED: Final = "prepared"
_Request = str | tuple[str, Any]
_Reading = Generator[_Request, Any, tuple[list[PreparedTransaction], Lag | None]]


def _read(dialect: Dialect, outbox_known: bool) -> _Reading:
    prepared: list[PreparedTransaction] = yield _PREPARED
    if not outbox_known:
        # Only look: a metrics scrape must not create the outbox tables.
        rows = yield dialect.existing_objects([OUTBOX, LEASES])
        if {str(r["name"]).lower() for r in rows} != {OUTBOX, LEASES}:
            return prepared, None
    row = (yield OutboxSQL(dialect).lag())[0]
    oldest = row["oldest_seconds"]
    lag = Lag(
        int(row["pending"] or 0),
        int(row["dead"] or 0),
        float(oldest) if oldest is not None else None,
        int(row["delivered"] or 0),
    )
    return prepared, lag


def _drive(db: Database, reading: _Reading) -> tuple[list[PreparedTransaction], Lag | None]:
    request = next(reading)
    while True:
        result = db.prepared() if isinstance(request, str) else db.execute(*request)
        try:
            request = reading.send(result)
        except StopIteration as done:
            value: tuple[list[PreparedTransaction], Lag | None] = done.value
            return value


async def _drive_async(
    db: AsyncDatabase, reading: _Reading
) -> tuple[list[PreparedTransaction], Lag | None]:
    request = next(reading)
    while True:
        if isinstance(request, str):
            result: Any = await db.prepared()
        else:
            result = await db.execute(*request)
        try:
            request = reading.send(result)
        except StopIteration as done:
            value: tuple[list[PreparedTransaction], Lag | None] = done.value
            return value


# -- the metrics ---------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of twophase on ``registry`` (default: prometheus_client's).

    Call it with an :class:`~twophase.observe.events.Event` (it is an observer); read the
    databases with :meth:`refresh`, :meth:`refresh_async` or :meth:`watch`. Metric names
    start with ``prefix``; two ``Metrics`` need two registries or two prefixes.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        sla: timedelta | float = DEFAULT_SLA,
        prefix: str = "twophase",
        buckets: Sequence[float] = BUCKETS,
    ) -> None:
        prom = _prometheus()
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix must be a Prometheus metric name, got {prefix!r}")
        self.sla = sla if isinstance(sla, timedelta) else timedelta(seconds=sla)
        if self.sla < timedelta(0):
            raise ValueError(f"sla must not be negative, got {self.sla}")
        self.prefix = prefix
        self.registry: CollectorRegistry = prom.REGISTRY if registry is None else registry
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        self._up: dict[str, bool] = {}
        self._has_outbox: set[str] = set()
        self._watched: dict[str, Database] = {}
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._steps = prom.Counter(
            f"{prefix}_steps",
            "Protocol steps finished, by step and outcome.",
            ["step", "outcome"],
            registry=None,
        )
        self._durations = prom.Histogram(
            f"{prefix}_step_duration_seconds",
            "How long each protocol step took (denied steps are not timed).",
            ["step"],
            buckets=tuple(buckets),
            registry=None,
        )
        self._collector = _OpenCollector(self)
        done: list[Collector] = []
        try:
            for collector in (self._steps, self._durations, self._collector):
                self.registry.register(cast("Collector", collector))
                done.append(cast("Collector", collector))
        except BaseException:
            # All or nothing: a name clash must not leave half of these registered.
            for collector in done:
                self.registry.unregister(collector)
            raise

    def __repr__(self) -> str:
        return f"<Metrics prefix={self.prefix!r} sla={self.sla}>"

    # -- the observer ---------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        """Count and time one finished step. Never raises."""
        try:
            step, outcome = str(event.step), str(event.outcome)
            children = self._children.get((step, outcome))
            if children is None:
                # labels() takes a lock and builds a key each time; steps are hot.
                children = (
                    self._steps.labels(step=step, outcome=outcome),
                    self._durations.labels(step=step),
                )
                self._children[(step, outcome)] = children
            count, duration = children
            count.inc()
            # A denied step never reached the database: its time is no latency.
            if event.outcome != Outcome.DENIED:
                duration.observe(max(0.0, event.duration))
        except Exception:
            log.warning("metrics could not record %r", event, exc_info=True)

    # -- what is open ---------------------------------------------------------------------

    def refresh(self, db: Database, *, participant: str | None = None) -> Snapshot:
        """Read ``db`` now and set its gauges; the snapshot read.

        ``participant`` labels the gauges (default: the database name). A database that
        cannot be read gets ``up`` 0 and loses its other gauges; the error propagates.
        """
        label = participant or db.label
        try:
            prepared, lag = _drive(db, _read(db.dialect, label in self._has_outbox))
        except Exception:
            self._failed(label)
            raise
        return self._record(label, prepared, lag)

    async def refresh_async(self, db: AsyncDatabase, *, participant: str | None = None) -> Snapshot:
        """:meth:`refresh` for an ``AsyncDatabase``."""
        label = participant or db.label
        try:
            prepared, lag = await _drive_async(db, _read(db.dialect, label in self._has_outbox))
        except Exception:
            self._failed(label)
            raise
        return self._record(label, prepared, lag)

    def watch(self, db: Database, *, participant: str | None = None) -> None:
        """Read ``db`` at every collection of the registry (each scrape).

        For an ``AsyncDatabase``, call :meth:`refresh_async` periodically instead: a scrape
        runs in prometheus_client's thread, outside your event loop.
        """
        with self._lock:
            self._watched[participant or db.label] = db

    def unwatch(self, participant: str) -> None:
        """Stop reading a watched database and drop its gauges."""
        with self._lock:
            self._watched.pop(participant, None)
            self._snapshots.pop(participant, None)
            self._up.pop(participant, None)

    def snapshots(self) -> list[Snapshot]:
        """The latest snapshot of every participant read successfully, by participant."""
        with self._lock:
            return [self._snapshots[k] for k in sorted(self._snapshots)]

    def unregister(self) -> None:
        """Remove these metrics from their registry."""
        for collector in (self._steps, self._durations, self._collector):
            self.registry.unregister(cast("Collector", collector))

    def _record(self, label: str, prepared: list[PreparedTransaction], lag: Lag | None) -> Snapshot:
        snapshot = Snapshot.of(label, prepared, lag, self.sla)
        with self._lock:
            self._snapshots[label] = snapshot
            self._up[label] = True
            if lag is not None:
                self._has_outbox.add(label)
        return snapshot

    def _failed(self, label: str) -> None:
        # Stale figures would keep a resolved alert firing, or hide a new stuck transaction:
        # say "down" instead and let alerts on up == 0 take over.
        with self._lock:
            self._snapshots.pop(label, None)
            self._up[label] = False
            self._has_outbox.discard(label)  # dropped tables: look again next time

    def _refresh_watched(self) -> None:
        with self._lock:
            watched = list(self._watched.items())
        for label, db in watched:
            try:
                self.refresh(db, participant=label)
            except Exception as exc:
                log.warning("metrics could not read %s: %s", label, exc)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        p = self.prefix
        with self._lock:
            snapshots = sorted(self._snapshots.items()) if with_samples else []
            up = sorted(self._up.items()) if with_samples else []

        def family(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{p}_{name}", doc, labels=["participant"])

        sla = GaugeMetricFamily(
            f"{p}_sla_seconds", "Prepared longer than this counts as stuck.", value=None
        )
        if with_samples:
            sla.add_metric([], self.sla.total_seconds())
        up_f = family("participant_up", "1 if the last read of the database succeeded.")
        read_at = family(
            "last_refresh_timestamp_seconds", "When the database was last read successfully."
        )
        prepared = family(
            "prepared_transactions", "Prepared transactions and branches waiting for an outcome."
        )
        oldest = family(
            "prepared_oldest_age_seconds",
            "Age of the oldest prepared transaction (0 when none is prepared).",
        )
        stuck = family("prepared_stuck_transactions", "Prepared transactions older than the SLA.")
        pending = family("outbox_pending_messages", "Committed outbox messages not delivered.")
        pending_age = family(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest undelivered outbox message (0 when none is pending).",
        )
        dead = family("outbox_dead_messages", "Outbox messages dead-lettered by the relay.")
        for label, is_up in up:
            up_f.add_metric([label], 1.0 if is_up else 0.0)
        for label, s in snapshots:
            read_at.add_metric([label], s.taken_at)
            prepared.add_metric([label], s.prepared)
            oldest.add_metric([label], s.oldest_age_seconds)
            stuck.add_metric([label], s.stuck)
            if s.outbox is not None:
                pending.add_metric([label], s.outbox.pending)
                pending_age.add_metric([label], s.outbox.oldest_seconds or 0.0)
                dead.add_metric([label], s.outbox.dead)
        yield from (sla, up_f, read_at, prepared, oldest, stuck, pending, pending_age, dead)


class _OpenCollector:
    """The gauges, as a prometheus_client collector: reads watched databases, then reports
    every participant's latest snapshot."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        # Names only: without describe(), registering would run a collection (database I/O).
        return self._metrics._families(with_samples=False)

    def collect(self) -> Iterator[Metric]:
        self._metrics._refresh_watched()
        return self._metrics._families(with_samples=True)


__all__ = ["BUCKETS", "DEFAULT_SLA", "Metrics", "MetricsUnavailable", "Snapshot"]
