"""The relay: delivers committed outbox messages to a broker, at least once, in order per key.

A worker leases outbox partitions (rows of ``twophase_outbox_lease``, taken with
``FOR UPDATE SKIP LOCKED`` and renewed while it lives), fetches the oldest pending messages
of its partitions in id order, publishes them in that order, and marks what the broker
acknowledged as delivered. Several workers share the partitions fairly (each takes at
most its share of the live workers' count); a partition whose worker dies is taken over when
its lease expires, and delivery resumes from its first undelivered message.

What "at least once" means here: a message is marked delivered only after the broker has
it; a worker that dies between the two re-sends it later, under the same ``msg_id``.

Order per key: a message is never sent before the broker accepted every earlier pending
message of its key. Within a batch, the adapter stops a key at its first failure (or the
relay sends the batch in rounds, see :class:`~twophase.relay.brokers.Broker`); the messages
held back stay pending, and the failed message's partition backs off, so later batches do
not overtake it either. A message that fails ``max_attempts`` times is dead-lettered
(state 2, error kept) and skipped; its key moves on. Broker failures back the affected
partitions off exponentially (``backoff`` seconds, doubling, capped); an unreachable broker
does not count as a failed attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from psycopg.rows import tuple_row

from .._async.database import AsyncDatabase
from .._async.driver import AsyncPgConn
from ..dialects.base import ErrorKind
from ..outbox import PARTITIONS, Message, Statement
from .brokers import Broker, BrokerUnavailable, HeldBack, in_key_order

log = logging.getLogger("twophase.relay")


@dataclass
class RelayStats:
    """What a relay worker has done since it started."""

    delivered: int = 0
    failed: int = 0
    dead: int = 0
    batches: int = 0


@dataclass(frozen=True)
class Lag:
    """How far behind the outbox is."""

    pending: int
    dead: int
    oldest_seconds: float | None
    delivered: int


class Relay:
    """One relay worker: ``await relay.run()`` until stopped, or ``await relay.step()``.

    ``batch``: messages fetched and published together. ``lease_seconds``: how long a
    partition stays this worker's without renewal (renewed every third of it).
    ``max_attempts``: refusals before a message is dead-lettered. ``backoff``: (first,
    longest) pause of a failing partition, doubling in between. ``idle_sleep``: (first,
    longest) pause when nothing is pending, doubling in between.
    """

    def __init__(
        self,
        db: AsyncDatabase,
        broker: Broker,
        *,
        worker_id: str | None = None,
        batch: int = 500,
        lease_seconds: float = 10.0,
        max_attempts: int = 10,
        backoff: tuple[float, float] = (0.1, 30.0),
        idle_sleep: tuple[float, float] = (0.01, 0.5),
    ) -> None:
        if batch < 1 or max_attempts < 1 or lease_seconds <= 0:
            raise ValueError("batch and max_attempts must be >= 1 and lease_seconds > 0")
        self.db = db
        self.broker = broker
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.idle_sleep = idle_sleep
        self.stats = RelayStats()
        self._sql = db._outbox_sql
        self._held: list[int] = []
        self._leases_at = 0.0
        self._connected = False
        self._stopping = asyncio.Event()

    # -- the loop ---------------------------------------------------------------------

    async def run(
        self, *, until_idle: bool = False, on_batch: Callable[[int], None] | None = None
    ) -> RelayStats:
        """Deliver until ``stop()`` (or, with ``until_idle``, until nothing is pending).

        Batches overlap: while one is being marked delivered, the next is fetched (leaving
        out the one in flight). It is published only once the marking is done, and without
        the partitions that just failed, so the order of a key holds as in :meth:`step`.
        ``on_batch`` gets the number delivered of each batch once it is marked.
        """
        await self.db._ensure_tables("outbox", self._sql.schema())
        idle = self.idle_sleep[0]
        marking: asyncio.Task[_Settled] | None = None
        in_flight: list[int] | None = None

        async def finish() -> _Settled:
            nonlocal marking, in_flight
            assert marking is not None
            try:
                settled = await marking
            finally:
                marking, in_flight = None, None
            if on_batch is not None and settled.delivered:
                on_batch(settled.delivered)
            return settled

        try:
            while not self._stopping.is_set():
                delivered = 0
                if marking is not None and self._leases_due():
                    # Not while a batch is being marked: taking leases skips locked lease
                    # rows, and the marking locks this worker's own.
                    delivered += (await finish()).delivered
                batch = await self._next_batch(in_flight)
                if marking is not None:
                    settled = await finish()
                    delivered += settled.delivered
                    if batch is not None and settled.failing:
                        batch = batch.without(settled.failing)
                if batch is None:
                    if delivered:
                        idle = self.idle_sleep[0]
                        continue
                    if until_idle and not await self.db._autocommit(*self._sql.any_pending()):
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), idle)
                    idle = min(idle * 2, self.idle_sleep[1])
                    continue
                idle = self.idle_sleep[0]
                results = await self._send(batch)
                if results is not None:
                    marking = asyncio.create_task(self._settle(batch, results))
                    in_flight = [m.id for m in batch.messages]
        finally:
            if marking is not None:
                # Published: mark it now, or it is sent again (at least once either way).
                with contextlib.suppress(Exception):
                    await marking
            await self.close()
        return self.stats

    def stop(self) -> None:
        """Ask ``run()`` to finish its current batch and return."""
        self._stopping.set()

    async def step(self) -> int:
        """One round: keep leases fresh, deliver one batch; how many were delivered."""
        batch = await self._next_batch(None)
        if batch is None:
            return 0
        results = await self._send(batch)
        if results is None:
            return 0
        return (await self._settle(batch, results)).delivered

    async def _next_batch(self, in_flight: list[int] | None) -> _Batch | None:
        """Keep leases fresh; the oldest pending messages of this worker's ready partitions
        (without ``in_flight``), or None."""
        await self.db._ensure_tables("outbox", self._sql.schema())
        if self._leases_due():
            await self._refresh_leases()
        if not self._held:
            return None
        ready = [
            r["p"] for r in await self.db._autocommit(*self._sql.ready_partitions(self.worker_id))
        ]
        if not ready:
            return None
        rows = await self._tuples(self._sql.fetch(ready, self.batch, in_flight))
        if not rows:
            return None
        # Columns: id, msg_id, topic, key, partition, payload, headers, attempts.
        return _Batch(
            [Message(r[0], r[1], r[2], r[3], r[5], None, r[7], headers_json=r[6]) for r in rows],
            [r[4] for r in rows],
        )

    async def _send(self, batch: _Batch) -> list[BaseException | None] | None:
        """Publish a batch; None if the broker could not take any of it (then its
        partitions back off)."""
        try:
            if not self._connected:
                await self.broker.connect()
                self._connected = True
            return await self._publish(batch.messages)
        except Exception as exc:
            # The broker is down or the link broke: nothing of this batch is known to have
            # arrived, so nothing is marked; those partitions wait and the batch is re-sent.
            self._connected = False
            log.warning("%s unavailable (%s); backing off", self.broker.name, exc)
            await self._back_off(sorted(set(batch.partitions)))
            self.stats.failed += len(batch.messages)
            return None

    async def _publish(self, messages: list[Message]) -> list[BaseException | None]:
        """No message may go out before the earlier ones of its key were accepted: the
        built-in adapters see to it themselves (``orders_keys``); for others, the relay
        sends the batch in rounds."""
        if getattr(self.broker, "orders_keys", False):
            return await self.broker.publish(messages)
        return await in_key_order(messages, self.broker.publish)

    async def _settle(self, batch: _Batch, results: Sequence[BaseException | None]) -> _Settled:
        """Mark what the broker has, count failed attempts (dead-lettering), back off the
        partitions that did not get through entirely."""
        done: list[int] = []
        failed_partitions: set[int] = set()
        refused: list[tuple[Message, BaseException]] = []
        unavailable: BaseException | None = None
        for m, p, r in zip(batch.messages, batch.partitions, results, strict=True):
            if r is None:
                done.append(m.id)
                continue
            failed_partitions.add(p)
            if isinstance(r, HeldBack):
                continue
            self.stats.failed += 1
            if isinstance(r, BrokerUnavailable):
                unavailable = unavailable or r
            else:
                refused.append((m, r))
        failing = sorted(failed_partitions)
        delivered = await self._mark_delivered(done, failing) if done else 0
        for m, r in refused:
            dead = m.attempts + 1 >= self.max_attempts
            await self.db._autocommit(*self._sql.failed(m, f"{type(r).__name__}: {r}", dead))
            if dead:
                self.stats.dead += 1
                log.error("dead-lettered %s after %d attempts: %r", m.msg_id, m.attempts + 1, r)
        if unavailable is not None:
            # Reconnect before the next batch: the client may be unusable.
            self._connected = False
            log.warning("%s unavailable (%s); backing off", self.broker.name, unavailable)
        if failing:
            await self._back_off(failing)
        self.stats.delivered += delivered
        self.stats.batches += 1
        return _Settled(delivered, failed_partitions)

    async def _mark_delivered(self, ids: list[int], failing: list[int]) -> int:
        """Mark ``ids`` delivered and count them per partition, atomically; how many were
        still pending (another worker may have marked some meanwhile)."""
        db, sql = self.db, self._sql
        if sql.pg:
            rows = await db._autocommit(*sql.settle(ids, failing))
            return sum(int(r["n"]) for r in rows)
        dialect = db.dialect

        def failed(exc: Exception) -> NoReturn:
            db._raise(exc, "could not mark outbox messages delivered")

        async with db._begun((dialect.begin(),), (dialect.rollback(),), failed) as conn:
            try:
                counts = {int(r["p"]): int(r["n"]) for r in await conn.run(*sql.lock_pending(ids))}
                if counts:
                    await conn.run(*sql.mark_delivered(ids))
                    await conn.run(*sql.count_delivered(counts, failing))
                await conn.run(dialect.commit())
            except BaseException as exc:
                await db._quietly(conn, (dialect.rollback(),))
                if isinstance(exc, Exception):
                    failed(exc)
                raise
        return sum(counts.values())

    async def _back_off(self, partitions: list[int]) -> None:
        await self.db._autocommit(*self._sql.back_off(partitions, *self.backoff))

    async def _tuples(self, stmt: Statement) -> list[tuple[Any, ...]]:
        """Rows as tuples: the fetch is the hot path, and dict rows cost per row. On
        PostgreSQL in binary (bytea arrives as is, not hex-encoded)."""
        db = self.db
        async with db._pool.connection() as conn:
            if not isinstance(conn, AsyncPgConn):
                return [tuple(r.values()) for r in await db._user_statement(conn, *stmt)]
            try:
                async with conn.raw.cursor(row_factory=tuple_row) as cur:
                    await cur.execute(stmt[0], stmt[1], binary=True)
                    return await cur.fetchall()
            except Exception as exc:
                if conn.raw.broken or conn.raw.closed:
                    conn.broken = True
                if db.dialect.classify(exc) is ErrorKind.CONNECTION:
                    await db._pool.reset_idle()
                db._raise(exc, "could not fetch outbox messages")

    # -- leases -----------------------------------------------------------------------

    def _leases_due(self) -> bool:
        return time.monotonic() - self._leases_at > self.lease_seconds / 3

    async def _refresh_leases(self) -> None:
        """Renew ours, take free partitions up to a fair share, give back any excess."""
        db, sql = self.db, self._sql
        dialect = db.dialect
        # Every live worker counts, holding partitions or not: a newcomer's heartbeat shrinks
        # everyone's share, the others give partitions back, and it takes them.
        await db._autocommit(*sql.heartbeat(self.worker_id))
        live = int((await db._autocommit(*sql.live_workers(self.lease_seconds)))[0]["n"] or 1)
        share = math.ceil(PARTITIONS / max(1, live))

        def failed(exc: Exception) -> NoReturn:
            db._raise(exc, "could not take outbox leases")

        async with db._begun((dialect.begin(),), (dialect.rollback(),), failed) as conn:
            try:
                rows = await conn.run(*sql.take_leases(self.worker_id, self.lease_seconds, share))
                taken = sorted(r["p"] for r in rows)
                if taken:
                    await conn.run(*sql.hold(self.worker_id, taken, self.lease_seconds))
                await conn.run(dialect.commit())
            except BaseException:
                await db._quietly(conn, (dialect.rollback(),))
                raise
        extra = [p for p in self._held if p not in taken]
        if extra:
            await db._autocommit(*sql.release(self.worker_id, extra))
        self._held = taken
        self._leases_at = time.monotonic()

    async def close(self) -> None:
        """Give back this worker's leases and close the broker connection."""
        try:
            if self._held:
                await self.db._autocommit(*self._sql.release(self.worker_id, self._held))
            await self.db._autocommit(*self._sql.forget_worker(self.worker_id))
        except Exception:
            log.warning("could not release outbox leases", exc_info=True)
        self._held = []
        await self.broker.close()
        self._connected = False

    async def lag(self) -> Lag:
        """Pending and dead messages, the age of the oldest pending one, delivered in all."""
        await self.db._ensure_tables("outbox", self._sql.schema())
        row = (await self.db._autocommit(*self._sql.lag()))[0]
        oldest = row["oldest_seconds"]
        return Lag(
            int(row["pending"] or 0),
            int(row["dead"] or 0),
            float(oldest) if oldest is not None else None,
            int(row["delivered"] or 0),
        )


@dataclass(slots=True)
class _Batch:
    """Messages fetched together, with the partition of each."""

    messages: list[Message]
    partitions: list[int]

    def without(self, partitions: set[int]) -> _Batch | None:
        """The batch less the messages of ``partitions`` (None if nothing is left)."""
        keep = [i for i, p in enumerate(self.partitions) if p not in partitions]
        if not keep:
            return None
        return _Batch([self.messages[i] for i in keep], [self.partitions[i] for i in keep])


@dataclass(frozen=True, slots=True)
class _Settled:
    """A batch once marked: how many were delivered, which partitions failed."""

    delivered: int
    failing: set[int]
