"""The outbox relay against real brokers: Redis Streams, RabbitMQ and NATS JetStream.

Every test has an outbox of its own (a schema on PostgreSQL, a database on MariaDB; see
procs/outbox_env.py), so ``lag()`` and "delivered exactly once" count only its messages.
What arrived is read from the broker directly: XRANGE on the Redis stream, a consumer on the
RabbitMQ queue, a pull consumer on the JetStream stream.

Messages are published with the sync API (test_outbox.py covers the async one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from procs.outbox_env import (
    BROKERS,
    NATS_URL,
    REDIS_URL,
    BrokerCase,
    NatsCase,
    RedisCase,
    check_delivery,
    children,
    isolated_database,
    make_case,
    outbox_rows,
    query,
    start_broker,
    stop_broker,
)

import twophase
from twophase.relay import Lag, RedisStreams, Relay

T = TypeVar("T")
Published = list[tuple[str, str | None]]


@pytest.fixture
def ob_url(dialect_name: str) -> Iterator[str]:
    """An empty database of its own for the outbox (one per test)."""
    with isolated_database(dialect_name) as url:
        yield url


@pytest.fixture(params=BROKERS)
async def case(request: pytest.FixtureRequest) -> AsyncIterator[BrokerCase]:
    """A topic (queue, stream) of its own on each broker; deleted afterwards."""
    c = make_case(str(request.param))
    await c.setup()
    yield c
    await c.cleanup()


def publish_many(
    url: str, topic: str, n: int, *, keys: int = 5, per_tx: int = 10, start: int = 0
) -> Published:
    """Publish ``n`` messages in transactions of ``per_tx``, one after the other; every
    seventh has no key. Returns (msg_id, key) in commit order."""
    out: Published = []
    with twophase.connect(url, pool_max=2) as db:
        for first in range(start, start + n, per_tx):
            with db.transaction() as tx:
                for i in range(first, min(start + n, first + per_tx)):
                    key = None if i % 7 == 6 else f"k{i % keys}"
                    out.append((tx.outbox.publish(topic, {"i": i}, key=key), key))
    return out


async def until(
    check: Callable[[], Awaitable[T]], *, timeout: float = 20.0, what: str = "condition"
) -> T:
    """Await ``check()`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {value!r}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


# -- delivery -----------------------------------------------------------------------------------


async def test_delivers_each_message_once_in_key_order(ob_url: str, case: BrokerCase) -> None:
    published = publish_many(ob_url, case.topic, 300)
    adb = await twophase.connect_async(ob_url)
    try:
        relay = Relay(adb, case.adapter(), batch=40)
        before = await relay.lag()
        stats = await asyncio.wait_for(relay.run(until_idle=True), 60)
        after = await relay.lag()
    finally:
        await adb.close()

    assert (before.pending, before.dead, before.delivered) == (300, 0, 0)
    assert before.oldest_seconds is not None and before.oldest_seconds >= 0
    assert after == Lag(pending=0, dead=0, oldest_seconds=None, delivered=300)
    assert (stats.delivered, stats.failed, stats.dead) == (300, 0, 0)
    assert stats.batches >= 300 // 40

    delivered = await case.read()
    assert len(delivered) == 300
    check_delivery(published, delivered)
    for d in delivered[:3]:
        assert d.headers.get("content-type") == "application/json"
    rows = outbox_rows(ob_url)
    assert {(r["state"], r["attempts"]) for r in rows} == {(1, 1)}


async def test_lag_before_during_and_after(ob_url: str) -> None:
    case = RedisCase()
    t0 = time.time()
    published = publish_many(ob_url, case.topic, 50)
    adb = await twophase.connect_async(ob_url)
    try:
        relay = Relay(adb, case.adapter(), batch=10)
        first = await relay.lag()
        assert (first.pending, first.dead, first.delivered) == (50, 0, 0)
        # The oldest message ages with the clock (poll until it visibly has).
        aged = await until(
            lambda: _aged(relay, 0.3), timeout=10, what="the oldest message to be 0.3 s old"
        )
        assert aged.oldest_seconds is not None
        assert 0.3 <= aged.oldest_seconds <= time.time() - t0 + 0.1

        assert await relay.step() == 10  # one batch, the ten oldest messages
        mid = await relay.lag()
        assert (mid.pending, mid.dead, mid.delivered) == (40, 0, 10)
        assert mid.oldest_seconds is not None
        assert 0 <= mid.oldest_seconds <= time.time() - t0 + 0.1

        await asyncio.wait_for(relay.run(until_idle=True), 30)
        assert await relay.lag() == Lag(pending=0, dead=0, oldest_seconds=None, delivered=50)
        check_delivery(published, await case.read())
    finally:
        await adb.close()
        await case.cleanup()


async def _aged(relay: Relay, seconds: float) -> Lag | None:
    lag = await relay.lag()
    return lag if lag.oldest_seconds is not None and lag.oldest_seconds >= seconds else None


# -- a relay killed with SIGKILL ----------------------------------------------------------------

CHILD_BATCH = 100
LEASE = 1.0  # seconds: how long a dead worker's partitions stay blocked


def spawn_relay(start: Any, url: str, case: BrokerCase, *extra: str) -> Any:
    return start("relay_worker.py", url, case.spec(), str(CHILD_BATCH), str(LEASE), *extra)


async def finish_with_new_relay(url: str, case: BrokerCase) -> None:
    """A fresh worker: it takes the dead one's partitions once their leases expire."""
    adb = await twophase.connect_async(url)
    try:
        relay = Relay(adb, case.adapter(), batch=500, lease_seconds=LEASE)
        await asyncio.wait_for(relay.run(until_idle=True), 60)
        lag = await relay.lag()
        assert (lag.pending, lag.dead) == (0, 0)
    finally:
        await adb.close()


async def test_relay_killed_mid_batch_then_restarted(ob_url: str, case: BrokerCase) -> None:
    published = publish_many(ob_url, case.topic, 1200, keys=8, per_tx=200)
    with children() as start:
        child = spawn_relay(start, ob_url, case)
        for _ in range(3):
            await asyncio.to_thread(child.wait_for, "BATCH")
        child.sigkill()  # while it works on a later batch
    left = sum(r["state"] == 0 for r in outbox_rows(ob_url))
    assert 0 < left < 1200, "the kill must land while the worker still had work"

    await finish_with_new_relay(ob_url, case)

    delivered = await case.read()
    # At least once: a batch the broker took but the outbox had not marked is sent again,
    # under the same msg_id; every message arrives; per-key order holds in the first copies.
    dups = check_delivery(published, delivered, max_duplicates=CHILD_BATCH)
    if case.kind == "nats":
        # JetStream drops a re-publish with a Nats-Msg-Id inside its duplicate window.
        assert dups == []
    assert {r["state"] for r in outbox_rows(ob_url)} == {1}


@pytest.mark.parametrize(
    ("dialect_name", "broker"),
    [("postgresql", "redis"), ("mysql", "rabbitmq"), ("postgresql", "nats")],
)
async def test_relay_killed_after_broker_ack_before_marking(ob_url: str, broker: str) -> None:
    """The exact at-least-once window: the broker has the batch, the outbox does not know."""
    case = make_case(broker)
    await case.setup()
    try:
        published = publish_many(ob_url, case.topic, 600, keys=6, per_tx=100)
        with children() as start:
            child = spawn_relay(start, ob_url, case, "3")
            line = await asyncio.to_thread(child.wait_for, "PUBLISHED")
            child.sigkill()
        acked = int(line.split()[1])
        assert acked == CHILD_BATCH
        pending = [r["msg_id"] for r in outbox_rows(ob_url) if r["state"] == 0]
        assert len(pending) == 600 - 2 * CHILD_BATCH

        await finish_with_new_relay(ob_url, case)

        delivered = await case.read()
        dups = check_delivery(published, delivered, max_duplicates=CHILD_BATCH)
        if broker == "nats":
            assert dups == []  # de-duplicated by JetStream on Nats-Msg-Id
        else:
            # Exactly the third batch (the oldest pending rows, in id order) came twice.
            assert sorted(dups) == sorted(pending[:CHILD_BATCH])
    finally:
        await case.cleanup()


# -- the broker goes away -----------------------------------------------------------------------


@dataclass
class Lane:
    """One outbox database with its relay, running against the shared broker."""

    url: str
    case: BrokerCase
    adb: Any = None
    relay: Any = None
    task: Any = None


async def _max_failures(url: str) -> int:
    rows = await asyncio.to_thread(
        query, url, "SELECT MAX(failures) AS f FROM twophase_outbox_lease"
    )
    return int(rows[0]["f"] or 0)


@pytest.mark.parametrize("kind", ["redis", "nats", "rabbitmq"])
async def test_broker_outage_backs_off_then_delivers_everything(kind: str) -> None:
    """Both databases at once (one relay each), so the broker restarts once per test."""
    with isolated_database("postgresql") as pg_url, isolated_database("mysql") as my_url:
        lanes = [Lane(pg_url, make_case(kind)), Lane(my_url, make_case(kind))]
        try:
            for lane in lanes:
                await lane.case.setup()
                lane.adb = await twophase.connect_async(lane.url)
                lane.relay = Relay(lane.adb, lane.case.adapter(), batch=20, backoff=(0.05, 0.5))
                lane.task = asyncio.create_task(lane.relay.run())
            first = [
                await asyncio.to_thread(publish_many, ln.url, ln.case.topic, 20, keys=4)
                for ln in lanes
            ]
            for lane, pub in zip(lanes, first, strict=True):
                await until(lambda ln=lane: _settled(ln, 20), what="the first messages")
                check_delivery(pub, await lane.case.read())

            await asyncio.to_thread(stop_broker, kind)
            second = [
                await asyncio.to_thread(publish_many, ln.url, ln.case.topic, 20, keys=4, start=20)
                for ln in lanes
            ]
            for lane in lanes:
                # Backing off: the partitions failed again and again, the worker lives on.
                await until(
                    lambda ln=lane: _backed_off(ln, 3), timeout=30, what="repeated back-offs"
                )
                assert not lane.task.done()
                lag = await lane.relay.lag()
                assert (lag.pending, lag.dead) == (20, 0)
            await asyncio.to_thread(start_broker, kind)

            for lane, pub in zip(lanes, second, strict=True):
                await until(lambda ln=lane: _settled(ln, 40), timeout=30, what="delivery after")
                assert not lane.task.done()
                lag = await lane.relay.lag()
                assert (lag.pending, lag.dead, lag.delivered) == (0, 0, 40)
                # An unreachable broker is no failed attempt: each message counts one, its
                # delivery.
                rows = await asyncio.to_thread(outbox_rows, lane.url)
                assert {(r["state"], r["attempts"]) for r in rows} == {(1, 1)}
                ids = {m for m, _ in pub}
                # Redis lost the first messages in the restart (no persistence), RabbitMQ's
                # were consumed above, JetStream still has them: compare the second round.
                after = [d for d in await lane.case.read() if d.msg_id in ids]
                check_delivery(pub, after)
        finally:
            await asyncio.to_thread(start_broker, kind)
            for lane in lanes:
                if lane.relay is not None:
                    lane.relay.stop()
                    await asyncio.wait_for(lane.task, 30)
                    await lane.adb.close()
                await lane.case.cleanup()


async def _settled(lane: Lane, delivered: int) -> bool:
    """Nothing pending and the delivered counter caught up."""
    lag = await lane.relay.lag()
    return lag.pending == 0 and (lag.dead > 0 or lag.delivered == delivered)


async def _backed_off(lane: Lane, times: int) -> bool:
    return await _max_failures(lane.url) >= times


# -- several workers ----------------------------------------------------------------------------


async def test_parallel_workers_never_double_deliver(ob_url: str, case: BrokerCase) -> None:
    published = publish_many(ob_url, case.topic, 600, keys=24, per_tx=20)
    adb = await twophase.connect_async(ob_url)
    try:
        relays = [Relay(adb, case.adapter(), batch=25, lease_seconds=2) for _ in range(3)]
        stats = await asyncio.wait_for(
            asyncio.gather(*(r.run(until_idle=True) for r in relays)), 60
        )
        lag = await relays[0].lag()
    finally:
        await adb.close()
    delivered = await case.read()
    assert len(delivered) == 600
    check_delivery(published, delivered)
    assert sum(s.delivered for s in stats) == 600
    assert (lag.pending, lag.delivered) == (0, 600)


@pytest.mark.parametrize("dialect_name", ["postgresql"])
async def test_parallel_workers_share_partitions(ob_url: str) -> None:
    """Workers joining a running one get partitions too (each delivers something)."""
    case = RedisCase()
    adb = await twophase.connect_async(ob_url)
    relays = [Relay(adb, case.adapter(), batch=5, lease_seconds=0.6) for _ in range(3)]
    tasks: list[asyncio.Task[Any]] = []
    try:
        publish_many(ob_url, case.topic, 40, keys=40, per_tx=40)
        assert await relays[0].step() > 0  # the first worker is up and holds leases
        tasks = [asyncio.create_task(r.run()) for r in relays]
        # Keep messages coming for a few lease periods (the leases are renewed every 0.2 s).
        for round_ in range(1, 6):
            await asyncio.to_thread(
                publish_many, ob_url, case.topic, 40, keys=40, per_tx=40, start=40 * round_
            )
            await asyncio.sleep(0.3)
        await until(lambda: _idle(relays[0]), what="the workers to catch up")
        counts = [r.stats.delivered for r in relays]
        assert sum(counts) == 240
        assert all(n > 0 for n in counts), f"delivered per worker: {counts}"
    finally:
        for r in relays:
            r.stop()
        for t in tasks:
            await asyncio.wait_for(t, 30)
        await adb.close()
        await case.cleanup()


async def _idle(relay: Relay) -> bool:
    return (await relay.lag()).pending == 0


# -- dead letters -------------------------------------------------------------------------------


async def test_dead_letter_after_max_attempts(ob_url: str) -> None:
    """A stream name taken by a plain string key: every XADD to it fails with WRONGTYPE."""
    import redis.asyncio as redis

    good, bad = RedisCase(), RedisCase()
    client = redis.from_url(REDIS_URL)
    await client.set(bad.topic, "a string, not a stream")
    try:
        with twophase.connect(ob_url, pool_max=2) as db:
            with db.transaction() as tx:
                poisoned = [tx.outbox.publish(bad.topic, {"n": i}, key="poison") for i in range(3)]
            later: Published = []
            for i in range(4):
                with db.transaction() as tx:
                    for key in ("g0", "g1", "g2", "poison"):
                        later.append((tx.outbox.publish(good.topic, {"n": i}, key=key), key))
        adb = await twophase.connect_async(ob_url)
        try:
            relay = Relay(adb, RedisStreams(REDIS_URL), max_attempts=3, backoff=(0.01, 0.05))
            assert (await relay.lag()).pending == 19
            stats = await asyncio.wait_for(relay.run(until_idle=True), 30)
            lag = await relay.lag()
        finally:
            await adb.close()

        assert stats.dead == 3
        assert (lag.pending, lag.dead, lag.delivered, lag.oldest_seconds) == (0, 3, 16, None)
        rows = {r["msg_id"]: r for r in outbox_rows(ob_url, bad.topic)}
        assert sorted(rows) == sorted(poisoned)
        for row in rows.values():
            assert (row["state"], row["attempts"]) == (2, 3)
            assert "ResponseError" in row["error"]  # the message: see the test below
        # Later messages, of other keys and of the poisoned key, went through.
        check_delivery(later, await good.read())
        assert await client.type(bad.topic) == b"string"
    finally:
        await client.delete(bad.topic, good.topic)
        await client.aclose()


@pytest.mark.parametrize("dialect_name", ["postgresql"])
async def test_dead_letter_keeps_the_broker_error_message(ob_url: str) -> None:
    import redis.asyncio as redis

    bad = RedisCase()
    client = redis.from_url(REDIS_URL)
    await client.set(bad.topic, "a string, not a stream")
    try:
        publish_many(ob_url, bad.topic, 1)
        adb = await twophase.connect_async(ob_url)
        try:
            relay = Relay(adb, RedisStreams(REDIS_URL), max_attempts=1)
            assert (await asyncio.wait_for(relay.run(until_idle=True), 30)).dead == 1
        finally:
            await adb.close()
        [row] = outbox_rows(ob_url)
        assert "WRONGTYPE" in row["error"]
    finally:
        await client.delete(bad.topic)
        await client.aclose()


# -- order per key when the broker refuses one message ----------------------------------------


async def test_key_order_survives_a_failed_attempt_nats(ob_url: str) -> None:
    """JetStream refuses a message too large for the stream (until its limit is raised): the
    later messages of that key wait for it, other keys go on (the relay sends such a batch
    in rounds: the n-th message of each key in round n)."""
    import nats
    from nats.js.api import StreamConfig

    from twophase.relay import NatsJetStream

    case = NatsCase()
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=case.stream, subjects=[case.topic], max_msg_size=512))
    try:
        with twophase.connect(ob_url, pool_max=2) as db, db.transaction() as tx:
            published = [
                (tx.outbox.publish(case.topic, body, key=key), key)
                for key, body in [
                    ("k", b"x" * 2048),  # refused
                    ("other", b"o1"),
                    ("k", b"small"),  # held back behind the refused one
                    (None, b"no key"),
                    ("other", b"o2"),
                    ("k", b"small too"),  # held back
                ]
            ]
        adb = await twophase.connect_async(ob_url)
        try:
            relay = Relay(adb, NatsJetStream(NATS_URL), backoff=(0.01, 0.05))
            assert await relay.step() == 3  # o1, o2 and the unkeyed one
            state = {r["msg_id"]: (r["state"], r["attempts"]) for r in outbox_rows(ob_url)}
            assert [state[m] for m, _ in published] == [
                (0, 1),
                (1, 1),
                (0, 0),
                (1, 1),
                (1, 1),
                (0, 0),
            ]
            assert [d.msg_id for d in await case.read()] == [published[i][0] for i in (1, 3, 4)]
            await js.update_stream(
                StreamConfig(name=case.stream, subjects=[case.topic], max_msg_size=-1)
            )
            await asyncio.wait_for(relay.run(until_idle=True), 30)
            lag = await relay.lag()
        finally:
            await adb.close()
        assert (lag.pending, lag.dead, lag.delivered) == (0, 0, 6)
        check_delivery(published, await case.read())
    finally:
        await nc.close()
        await case.cleanup()


async def test_key_order_survives_a_failed_attempt_redis(ob_url: str) -> None:
    """One key's messages go to two streams; XADD to the first fails (its name holds a
    string) until the string is deleted. The key's message on the good stream waits for it
    (Redis stops the key inside the batch's script); another key goes on."""
    import redis.asyncio as redis

    bad, good = RedisCase(), RedisCase()
    client = redis.from_url(REDIS_URL)
    await client.set(bad.topic, "a string, not a stream")
    try:
        with twophase.connect(ob_url, pool_max=2) as db, db.transaction() as tx:
            first = tx.outbox.publish(bad.topic, b"first", key="k")
            second = tx.outbox.publish(good.topic, b"second", key="k")
            other = tx.outbox.publish(good.topic, b"other", key="j")
        adb = await twophase.connect_async(ob_url)
        try:
            relay = Relay(adb, RedisStreams(REDIS_URL), backoff=(0.01, 0.05))
            assert await relay.step() == 1
            assert [d.msg_id for d in await good.read()] == [other]
            state = {r["msg_id"]: (r["state"], r["attempts"]) for r in outbox_rows(ob_url)}
            assert state == {first: (0, 1), second: (0, 0), other: (1, 1)}

            await client.delete(bad.topic)
            await asyncio.wait_for(relay.run(until_idle=True), 30)
            lag = await relay.lag()
        finally:
            await adb.close()
        assert (lag.pending, lag.dead, lag.delivered) == (0, 0, 3)
        assert [d.msg_id for d in await bad.read()] == [first]
        assert [d.msg_id for d in await good.read()] == [other, second]
    finally:
        await client.delete(bad.topic, good.topic)
        await client.aclose()


class Recording:
    """A real adapter, watched: the msg_ids the broker accepted, in the order it did.

    With ``whole_batches`` False it does not declare ``orders_keys``, so the relay sends
    each batch in rounds itself (as for an adapter of another library)."""

    def __init__(self, inner: Any, *, whole_batches: bool) -> None:
        self.inner = inner
        self.name = inner.name
        if whole_batches:
            self.orders_keys = True
        self.accepted: list[str] = []

    async def connect(self) -> None:
        await self.inner.connect()

    async def publish(self, messages: Any) -> list[BaseException | None]:
        results: list[BaseException | None] = await self.inner.publish(messages)
        self.accepted += [m.msg_id for m, r in zip(messages, results, strict=True) if r is None]
        return results

    async def close(self) -> None:
        await self.inner.close()


@pytest.mark.parametrize("whole_batches", [True, False], ids=["adapter-orders", "relay-rounds"])
@pytest.mark.parametrize("dialect_name", ["postgresql", "mysql"])
async def test_run_keeps_key_order_while_batches_overlap(ob_url: str, whole_batches: bool) -> None:
    """run() fetches the next batch while the last one is being marked. A key whose first
    message failed in one batch must not get its later messages, already fetched in the
    next batch, through before it: here k's first message fails (its stream's name holds a
    string) until the string is deleted, with batches of two."""
    import redis.asyncio as redis

    bad, good = RedisCase(), RedisCase()
    client = redis.from_url(REDIS_URL)
    await client.set(bad.topic, "a string, not a stream")
    try:
        published: Published = []
        with twophase.connect(ob_url, pool_max=2) as db, db.transaction() as tx:
            for i in range(8):
                key = "k" if i % 2 == 0 else "j"
                topic = bad.topic if i == 0 else good.topic
                published.append((tx.outbox.publish(topic, {"i": i}, key=key), key))
        adb = await twophase.connect_async(ob_url)
        broker = Recording(RedisStreams(REDIS_URL), whole_batches=whole_batches)
        try:
            relay = Relay(adb, broker, batch=2, backoff=(0.01, 0.05), max_attempts=1000)
            task = asyncio.create_task(relay.run(until_idle=True))
            first = published[0][0]
            await until(lambda: _attempts_at_least(ob_url, first, 3), what="k's first to fail")
            await client.delete(bad.topic)
            await asyncio.wait_for(task, 30)
            lag = await relay.lag()
        finally:
            await adb.close()
        assert (lag.pending, lag.dead, lag.delivered) == (0, 0, 8)
        assert sorted(broker.accepted) == sorted(m for m, _ in published)
        for key in ("k", "j"):
            want = [m for m, k in published if k == key]
            assert [m for m in broker.accepted if m in want] == want, f"order of {key!r}"
    finally:
        await client.delete(bad.topic, good.topic)
        await client.aclose()


async def _attempts_at_least(url: str, msg_id: str, n: int) -> bool:
    rows = await asyncio.to_thread(outbox_rows, url)
    return any(r["msg_id"] == msg_id and r["attempts"] >= n for r in rows)
