"""The transactional outbox: a message exists exactly when its transaction commits.

Each test has an outbox of its own (procs/outbox_env.py). "Published" is checked twice: the
rows in the outbox table (read with the driver) and what a relay puts on a real broker.
Crash tests kill a real child process (procs/outbox_child.py) with SIGKILL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from procs import rawdb
from procs.outbox_env import (
    BROKERS,
    URLS,
    BrokerCase,
    RedisCase,
    children,
    isolated_database,
    make_case,
    outbox_rows,
    query,
    table_exists,
)

import twophase
from twophase import Status
from twophase.relay import Relay, run_relay


@pytest.fixture
def ob_url(dialect_name: str) -> Iterator[str]:
    """An empty database of its own for the outbox (one per test)."""
    with isolated_database(dialect_name) as url:
        yield url


@pytest.fixture
def names(ob_url: str) -> Iterator[list[str]]:
    """Distributed transaction names of this test; any left prepared are rolled back before
    the database is dropped (a prepared transaction keeps its locks)."""
    used: list[str] = []
    yield used
    base = URLS["postgresql" if rawdb.is_pg(ob_url) else "mysql"]
    for name in used:
        rawdb.rollback_if_prepared(base, name)


def new_name(names: list[str]) -> str:
    name = f"ob_{uuid.uuid4().hex[:16]}"
    names.append(name)
    return name


@pytest.fixture
def redis_case() -> Iterator[RedisCase]:
    case = RedisCase()
    yield case
    asyncio.run(case.cleanup())


def relay_and_read(url: str, case: BrokerCase) -> list[Any]:
    """Run a relay (the blocking entry) until nothing is pending; what the broker holds.

    Only while nothing is prepared: on PostgreSQL a new relay's first-use DDL waits for
    every prepared transaction that wrote to the outbox (see
    test_relay_starts_while_a_prepared_transaction_holds_outbox_rows).
    """
    run_relay(url, case.url, until_idle=True)
    return asyncio.run(case.read())


class WarmRelay:
    """A relay started (its tables ensured) before anything is prepared, kept on one event
    loop, so it can run while a transaction is prepared."""

    def __init__(self, url: str, case: BrokerCase) -> None:
        self.case = case
        self._loop = asyncio.Runner()
        self._adb = self._loop.run(twophase.connect_async(url, pool_max=4))
        self.relay = Relay(self._adb, case.adapter())
        self._loop.run(self.relay.lag())

    def deliver(self) -> list[Any]:
        """Deliver until nothing is pending; what the broker holds."""
        self._loop.run(self.relay.run(until_idle=True))
        return self._loop.run(self.case.read())

    def pending(self) -> int:
        return self._loop.run(self.relay.lag()).pending

    def close(self) -> None:
        self._loop.run(self._adb.close())
        self._loop.close()


@pytest.fixture
def warm(ob_url: str, redis_case: RedisCase) -> Iterator[WarmRelay]:
    relay = WarmRelay(ob_url, redis_case)
    yield relay
    relay.close()


def ids_of(url: str, topic: str) -> list[str]:
    return [r["msg_id"] for r in outbox_rows(url, topic)]


# -- rolled back or never committed: nothing ----------------------------------------------------


def test_prepared_then_rolled_back_publishes_nothing(
    ob_url: str, names: list[str], warm: WarmRelay
) -> None:
    topic = warm.case.topic
    name = new_name(names)
    with twophase.connect(ob_url) as db:
        with db.distributed(name) as tx:
            for i in range(3):
                tx.outbox.publish(topic, {"i": i}, key="k")
        # Prepared: not committed, so not there (neither for the relay).
        assert db.status(name) is Status.PREPARED
        assert ids_of(ob_url, topic) == []
        assert warm.pending() == 0
        assert warm.deliver() == []

        db.rollback_distributed(name)
        assert db.status(name) is Status.ROLLED_BACK
    assert ids_of(ob_url, topic) == []
    assert relay_and_read(ob_url, warm.case) == []


def test_failed_transactions_publish_nothing(
    ob_url: str, names: list[str], redis_case: RedisCase
) -> None:
    topic = redis_case.topic
    name = new_name(names)

    def stage(tx: twophase.Transaction) -> None:
        tx.outbox.publish(topic, "first", key="k")
        tx.outbox.publish(topic, "second", key="k")
        raise RuntimeError("the work failed")

    with twophase.connect(ob_url) as db:
        with pytest.raises(RuntimeError):
            db.begin_distributed(name, stage)
        assert db.status(name) is Status.ROLLED_BACK
        with pytest.raises(RuntimeError), db.transaction() as tx:
            tx.outbox.publish(topic, "third", key="k")
            raise RuntimeError("plain transaction fails too")
    assert ids_of(ob_url, topic) == []
    assert relay_and_read(ob_url, redis_case) == []


@pytest.mark.parametrize("outcome", ["rollback", "commit"])
def test_child_killed_after_prepare(
    ob_url: str, names: list[str], warm: WarmRelay, outcome: str
) -> None:
    """A child publishes inside begin_distributed, prepares and is killed with SIGKILL; the
    prepared transaction outlives it, and the parent decides: rolled back, nothing is
    published; committed, exactly the child's messages are."""
    topic = warm.case.topic
    name = new_name(names)
    with children() as start:
        child = start("outbox_child.py", ob_url, name, topic, "5", "prepare")
        line = child.wait_for("PREPARED")
        child.sigkill()
    child_ids = json.loads(line.split(" ", 1)[1])
    assert name in rawdb.prepared_names(URLS["postgresql" if rawdb.is_pg(ob_url) else "mysql"])
    assert ids_of(ob_url, topic) == []
    assert warm.deliver() == []

    with twophase.connect(ob_url) as db:
        if outcome == "rollback":
            db.rollback_distributed(name)
        else:
            db.commit_distributed(name)
    delivered = relay_and_read(ob_url, warm.case)
    if outcome == "rollback":
        assert ids_of(ob_url, topic) == []
        assert delivered == []
    else:
        assert ids_of(ob_url, topic) == child_ids
        assert [d.msg_id for d in delivered] == child_ids
        assert all(d.headers["child"] == "yes" for d in delivered)


def test_child_killed_inside_begin_distributed(
    ob_url: str, names: list[str], redis_case: RedisCase
) -> None:
    """Killed before the prepare: the server rolls the open transaction back with the
    session, and nothing is ever published."""
    topic = redis_case.topic
    name = new_name(names)
    base = URLS["postgresql" if rawdb.is_pg(ob_url) else "mysql"]
    with children() as start:
        child = start("outbox_child.py", ob_url, name, topic, "5", "in_fn")
        sid = int(child.wait_for("IN_FN").split()[1])
        child.sigkill()
    rawdb.poll(lambda: not rawdb.session_alive(base, sid), what="the killed session to end")
    assert name not in rawdb.prepared_names(base)
    with twophase.connect(ob_url) as db:
        assert db.status(name) is not Status.PREPARED
        assert db.status(name) is not Status.COMMITTED
    assert ids_of(ob_url, topic) == []
    assert relay_and_read(ob_url, redis_case) == []


def test_relay_starts_while_a_prepared_transaction_holds_outbox_rows(
    ob_url: str, names: list[str], redis_case: RedisCase
) -> None:
    """A prepared transaction may wait long for its coordinator; relays must still start.

    Regression: on PostgreSQL a new relay's first-use DDL (CREATE INDEX IF NOT EXISTS) took
    a ShareLock on the outbox and waited for the prepared transaction, holding the
    database-wide DDL advisory lock meanwhile (so every new Database's set-up waited too).
    """
    name = new_name(names)
    with twophase.connect(ob_url) as db:
        with db.distributed(name) as tx:
            tx.outbox.publish(redis_case.topic, "staged", key="k")
        with db.transaction() as tx:
            done = tx.outbox.publish(redis_case.topic, "committed", key="j")
        # On PostgreSQL, a lock_timeout turns the wait into an error instead of a hang.
        url = ob_url + "%20-clock_timeout%3D2s" if rawdb.is_pg(ob_url) else ob_url
        try:
            delivered = relay_and_read(url, redis_case)
        finally:
            db.rollback_distributed(name)
    assert [d.msg_id for d in delivered] == [done]


# -- committed: exactly its messages ------------------------------------------------------------


def test_committed_transactions_publish_exactly_their_messages(
    ob_url: str, names: list[str], warm: WarmRelay
) -> None:
    topic = warm.case.topic
    kept, dropped = new_name(names), new_name(names)
    with twophase.connect(ob_url) as db:
        with db.distributed(kept) as tx:
            first = [tx.outbox.publish(topic, {"tx": "kept", "i": i}, key="a") for i in range(3)]
        with db.distributed(dropped) as tx:
            for i in range(2):
                tx.outbox.publish(topic, {"tx": "dropped", "i": i}, key="a")
        db.commit_distributed(kept)
        db.rollback_distributed(dropped)
        with db.transaction() as tx:
            plain = [tx.outbox.publish(topic, {"tx": "plain"}, key="a")]
        # Committed twice is still once.
        db.commit_distributed(kept)

    expected = first + plain
    assert ids_of(ob_url, topic) == expected
    delivered = warm.deliver()
    assert [d.msg_id for d in delivered] == expected
    assert [json.loads(d.payload)["tx"] for d in delivered] == ["kept"] * 3 + ["plain"]


# -- encodings and headers ----------------------------------------------------------------------

PAYLOADS: list[tuple[Any, bytes, str | None]] = [
    # (published, bytes on the broker, content-type header)
    (b"\x00\xff raw \x80", b"\x00\xff raw \x80", None),
    (bytearray(b"\x01\x02"), b"\x01\x02", None),
    ("héllo ✓\nzwei", "héllo ✓\nzwei".encode(), "text/plain; charset=utf-8"),
    ("", b"", "text/plain; charset=utf-8"),
    ({"b": [1, 2.5, None, True], "a": "é"}, b'{"b":[1,2.5,null,true],"a":"\\u00e9"}', "json"),
    ([1, "two"], b'[1,"two"]', "json"),
    (7, b"7", "json"),
    (None, b"null", "json"),
    (dt.date(2024, 5, 17), b'"2024-05-17"', "json"),  # default=str
]


@pytest.fixture(params=BROKERS)
def case(request: pytest.FixtureRequest) -> Iterator[BrokerCase]:
    c = make_case(str(request.param))
    asyncio.run(c.setup())
    yield c
    asyncio.run(c.cleanup())


def test_payloads_and_headers_round_trip(ob_url: str, case: BrokerCase) -> None:
    with twophase.connect(ob_url) as db, db.transaction() as tx:
        ids = [
            tx.outbox.publish(case.topic, payload, key=f"k{i}", headers={"trace": f"t-{i}", "n": i})
            for i, (payload, _, _) in enumerate(PAYLOADS)
        ]
        unkeyed = tx.outbox.publish(case.topic, b"no key", headers={"content-type": "x/y"})

    delivered = relay_and_read(ob_url, case)
    assert [d.msg_id for d in delivered] == [*ids, unkeyed]
    for i, ((_, body, ctype), d) in enumerate(zip(PAYLOADS, delivered, strict=False)):
        assert d.payload == body, d
        assert d.key == f"k{i}"
        want = {"trace": f"t-{i}", "n": str(i)}  # header values travel as strings
        if ctype is not None:
            want["content-type"] = "application/json" if ctype == "json" else ctype
        assert d.headers == want, d
    last = delivered[-1]
    # No key travels as the empty string; a content-type given by the caller is kept.
    assert (last.payload, last.key, last.headers) == (b"no key", "", {"content-type": "x/y"})


# -- bad arguments ------------------------------------------------------------------------------

BAD_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("topic None", (None, "p"), {}),
    ("topic int", (5, "p"), {}),
    ("topic bytes", (b"t", "p"), {}),
    ("topic empty", ("", "p"), {}),
    ("topic too long", ("t" * 256, "p"), {}),
    ("topic NUL", ("a\0b", "p"), {}),
    ("key int", ("t", "p"), {"key": 5}),
    ("key bytes", ("t", "p"), {"key": b"k"}),
    ("key too long", ("t", "p"), {"key": "k" * 256}),
    ("payload circular", ("t", (lambda d: d.update(me=d) or d)({})), {}),
]


def test_bad_arguments_raise_invalid_query_before_any_sql(ob_url: str) -> None:
    with twophase.connect(ob_url) as db:
        with db.transaction() as tx:
            for what, args, kwargs in BAD_CALLS:
                with pytest.raises(twophase.InvalidQuery):
                    tx.outbox.publish(*args, **kwargs)
                    pytest.fail(what)
            # The transaction is intact (on PostgreSQL a failed statement would abort it).
            assert tx.execute("SELECT 1 AS one")[0]["one"] == 1
        # Not a statement ran: not even the outbox table's first-use CREATE.
        assert not table_exists(ob_url, "twophase_outbox")


async def test_bad_arguments_raise_invalid_query_before_any_sql_async(ob_url: str) -> None:
    adb = await twophase.connect_async(ob_url)
    try:
        async with adb.transaction() as tx:
            for what, args, kwargs in BAD_CALLS:
                with pytest.raises(twophase.InvalidQuery):
                    await tx.outbox.publish(*args, **kwargs)
                    pytest.fail(what)
    finally:
        await adb.close()
    assert not table_exists(ob_url, "twophase_outbox")


def test_key_with_nul_is_refused_like_a_topic_with_nul(ob_url: str) -> None:
    with (
        twophase.connect(ob_url) as db,
        db.transaction() as tx,
        pytest.raises(twophase.InvalidQuery),
    ):
        tx.outbox.publish("t", "p", key="a\0b")


@pytest.mark.parametrize("payload", [object(), {1, 2}, print], ids=["object", "set", "function"])
@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_payload_that_is_not_json_raises_invalid_query(ob_url: str, payload: Any) -> None:
    with (
        twophase.connect(ob_url) as db,
        db.transaction() as tx,
        pytest.raises(twophase.InvalidQuery),
    ):
        tx.outbox.publish("t", payload)


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_headers_not_a_mapping_raise_invalid_query(ob_url: str) -> None:
    with (
        twophase.connect(ob_url) as db,
        db.transaction() as tx,
        pytest.raises(twophase.InvalidQuery),
    ):
        tx.outbox.publish("t", "p", headers=[("a", "b")])  # type: ignore[arg-type]


# -- the async API ------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
async def test_async_publish(dialect: str) -> None:
    case = RedisCase()
    with isolated_database(dialect) as url:
        adb = await twophase.connect_async(url)
        try:
            async with adb.transaction() as tx:
                sent = await tx.outbox.publish(case.topic, b"\x00bytes", key="k")
            with pytest.raises(RuntimeError):
                async with adb.transaction() as tx:
                    await tx.outbox.publish(case.topic, "dropped", key="k")
                    raise RuntimeError("rolled back")
        finally:
            await adb.close()
        rows = query(url, "SELECT msg_id, payload FROM twophase_outbox")
        assert [(str(r["msg_id"]), bytes(r["payload"])) for r in rows] == [(sent, b"\x00bytes")]
