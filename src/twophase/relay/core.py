"""The relay: delivers committed outbox messages to a broker, at least once, in order per key.

A worker leases outbox partitions (rows of ``twophase_outbox_lease``, taken with
``FOR UPDATE SKIP LOCKED`` and renewed while it lives), fetches the oldest pending messages
of its partitions in id order, publishes them in that order, and marks what the broker
acknowledged as delivered. Several workers share the partitions fairly (each takes at
most its share of the live workers' count); a partition whose worker dies is taken over when
its lease expires, and delivery resumes from its first undelivered message.

What "at least once" means here: a message is marked delivered only after the broker has
it; a worker that dies between the two re-sends it later, under the same ``msg_id``.
A message that fails ``max_attempts`` times is dead-lettered (state 2, error kept) and
skipped; its partition moves on. Broker failures back the affected partitions off
exponentially (``backoff`` seconds, doubling, capped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from .._async.database import AsyncDatabase
from ..outbox import PARTITIONS, Message
from .brokers import Broker

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
    """One relay worker: ``await relay.run()`` until stopped, or ``await relay.step()``."""

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
        self._failures: dict[int, int] = {}
        self._connected = False
        self._stopping = asyncio.Event()

    # -- the loop ---------------------------------------------------------------------

    async def run(
        self, *, until_idle: bool = False, on_batch: Callable[[int], None] | None = None
    ) -> RelayStats:
        """Deliver until ``stop()`` (or, with ``until_idle``, until nothing is pending)."""
        await self.db._ensure_tables("outbox", self._sql.schema())
        idle = self.idle_sleep[0]
        try:
            while not self._stopping.is_set():
                sent = await self.step()
                if on_batch is not None and sent:
                    on_batch(sent)
                if sent:
                    idle = self.idle_sleep[0]
                    continue
                if until_idle and (await self.lag()).pending == 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), idle)
                idle = min(idle * 2, self.idle_sleep[1])
        finally:
            await self.close()
        return self.stats

    def stop(self) -> None:
        """Ask ``run()`` to finish its current batch and return."""
        self._stopping.set()

    async def step(self) -> int:
        """One round: keep leases fresh, deliver one batch; how many were delivered."""
        await self.db._ensure_tables("outbox", self._sql.schema())
        if time.monotonic() - self._leases_at > self.lease_seconds / 3:
            await self._refresh_leases()
        if not self._held:
            return 0
        ready = [
            r["p"] for r in await self.db._autocommit(*self._sql.ready_partitions(self.worker_id))
        ]
        if not ready:
            return 0
        rows = await self.db._autocommit(*self._sql.fetch(ready, self.batch))
        if not rows:
            return 0
        messages = [_message(r) for r in rows]
        try:
            if not self._connected:
                await self.broker.connect()
                self._connected = True
            results = await self.broker.publish(messages)
        except Exception as exc:
            # The broker is down or the link broke: nothing of this batch is known to have
            # arrived, so nothing is marked; those partitions wait and the batch is re-sent.
            self._connected = False
            log.warning("%s unavailable (%s); backing off", self.broker.name, exc)
            await self._back_off(sorted({_partition_of(r) for r in rows}))
            self.stats.failed += len(messages)
            return 0
        return await self._settle(rows, messages, results)

    async def _settle(
        self,
        rows: list[dict[str, Any]],
        messages: list[Message],
        results: list[BaseException | None],
    ) -> int:
        done = [m.id for m, r in zip(messages, results, strict=True) if r is None]
        per_partition: dict[int, int] = {}
        for row, r in zip(rows, results, strict=True):
            if r is None:
                p = _partition_of(row)
                per_partition[p] = per_partition.get(p, 0) + 1
        if done:
            await self.db._autocommit(*self._sql.delivered(done))
            for p, n in per_partition.items():
                await self.db._autocommit(*self._sql.count_delivered(p, n))
                self._failures.pop(p, None)
        failed_partitions: set[int] = set()
        for row, m, r in zip(rows, messages, results, strict=True):
            if r is None:
                continue
            dead = m.attempts + 1 >= self.max_attempts
            await self.db._autocommit(*self._sql.failed(m, f"{type(r).__name__}: {r}", dead))
            self.stats.failed += 1
            if dead:
                self.stats.dead += 1
                log.error("dead-lettered %s after %d attempts: %r", m.msg_id, m.attempts + 1, r)
            failed_partitions.add(_partition_of(row))
        if failed_partitions:
            await self._back_off(sorted(failed_partitions))
        self.stats.delivered += len(done)
        self.stats.batches += 1
        return len(done)

    async def _back_off(self, partitions: list[int]) -> None:
        for p in partitions:
            self._failures[p] = self._failures.get(p, 0) + 1
        worst = max(self._failures[p] for p in partitions)
        delay = min(self.backoff[0] * 2 ** (worst - 1), self.backoff[1])
        await self.db._autocommit(*self._sql.back_off(partitions, delay))

    # -- leases -----------------------------------------------------------------------

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


def _message(row: dict[str, Any]) -> Message:
    payload = row["payload"]
    return Message(
        id=int(row["id"]),
        msg_id=str(row["msg_id"]),
        topic=row["topic"],
        key=row["msg_key"],
        payload=bytes(payload),
        headers=json.loads(row["headers"] or "{}"),
        attempts=int(row["attempts"]),
    )


def _partition_of(row: dict[str, Any]) -> int:
    return int(row["part"])
