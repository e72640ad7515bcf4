"""Idempotency keys and the participant barrier, on both databases, sync and async.

The guarded body sleeps a little and writes a row, so "ran once" is checked twice: by the
body's own run count and by the rows in the table (read with the driver).

While a distributed transaction that claimed a key is *prepared*, the claim is invisible (a
plain read finds no key) and a duplicate call blocks on the claim's row lock: it returns the
stored result once the transaction commits, or claims the key and runs once it is rolled
back. The wait lasts as long as the transaction stays prepared (on MariaDB at most
``innodb_lock_wait_timeout``, 50 s by default, after which the duplicate fails).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from procs import rawdb
from procs.outbox_env import URLS, isolated_database, query

import twophase
from twophase import IdempotencyConflict, InvalidQuery, Status

RESULT_ITEMS = [1, "two", None]


def new_key() -> str:
    return f"idem-{uuid.uuid4().hex}"


class Work:
    """The guarded body: sleeps a little, writes a row with the next id, counts its runs."""

    def __init__(self, table: str, sleep: float = 0.2, fail: bool = False) -> None:
        self.table = table
        self.sleep = sleep
        self.fail = fail
        self.runs: list[int] = []
        self._ids = itertools.count(1)

    def __call__(self, tx: twophase.Transaction) -> dict[str, Any]:
        n = next(self._ids)
        time.sleep(self.sleep)
        tx.insert_into(self.table).values(id=n, status="done").execute()
        self.runs.append(n)
        if self.fail:
            raise ValueError("the body failed after writing")
        return {"run": n, "items": tuple(RESULT_ITEMS)}

    async def run_async(self, tx: twophase.AsyncTransaction) -> dict[str, Any]:
        n = next(self._ids)
        await asyncio.sleep(self.sleep)
        await tx.insert_into(self.table).values(id=n, status="done").execute()
        self.runs.append(n)
        if self.fail:
            raise ValueError("the body failed after writing")
        return {"run": n, "items": tuple(RESULT_ITEMS)}


def stored(n: int) -> dict[str, Any]:
    """The result of run ``n`` as stored: JSON round-tripped (the tuple became a list)."""
    return {"run": n, "items": RESULT_ITEMS}


def must_not_run(tx: Any) -> Any:
    raise AssertionError("the body ran again")


async def must_not_run_async(tx: Any) -> Any:
    raise AssertionError("the body ran again")


def row_ids(url: str, table: str) -> list[int]:
    return [r["id"] for r in query(url, f"SELECT id FROM {table} ORDER BY id")]


def key_row(url: str, key: str) -> dict[str, Any] | None:
    k = '"key"' if rawdb.is_pg(url) else "`key`"
    rows = query(
        url,
        f"SELECT fingerprint, result, finished_at FROM twophase_idempotency WHERE {k} = %s",
        (key,),
    )
    return rows[0] if rows else None


@pytest.fixture
def iso(dialect_name: str) -> Iterator[tuple[str, str]]:
    """An isolated database (see procs/outbox_env.py) with a work table: (url, table).

    Used where a transaction is left prepared, so its locks touch only this test's tables.
    """
    with isolated_database(dialect_name) as url:
        query(url, "CREATE TABLE work (id int PRIMARY KEY, status varchar(32))")
        yield url, "work"


@pytest.fixture
def names(dialect_name: str, iso: tuple[str, str]) -> Iterator[list[str]]:
    """Distributed names of this test; any left prepared are rolled back before the isolated
    database is dropped (a prepared transaction keeps its locks)."""
    used: list[str] = []
    yield used
    for name in used:
        rawdb.rollback_if_prepared(URLS[dialect_name], name)


def new_name(names: list[str]) -> str:
    name = f"idem_{uuid.uuid4().hex[:16]}"
    names.append(name)
    return name


# -- once per key ---------------------------------------------------------------------------


def test_concurrent_duplicates_run_once_sync(db: twophase.Database, url: str, table: str) -> None:
    work = Work(table)
    key, fp = new_key(), twophase.fingerprint({"order": 1})
    start = threading.Barrier(20)

    def call(_: int) -> Any:
        start.wait()
        return db.idempotent(key, fp, work)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(call, range(20)))
    assert work.runs == [1]
    assert results == [stored(1)] * 20
    assert row_ids(url, table) == [1]


async def test_concurrent_duplicates_run_once_async(
    adb: twophase.AsyncDatabase, url: str, table: str
) -> None:
    work = Work(table)
    key, fp = new_key(), twophase.fingerprint({"order": 1})
    results = await asyncio.gather(*(adb.idempotent(key, fp, work.run_async) for _ in range(20)))
    assert work.runs == [1]
    assert results == [stored(1)] * 20
    assert row_ids(url, table) == [1]


def test_retry_after_commit_returns_stored_result(
    db: twophase.Database, url: str, table: str
) -> None:
    work = Work(table, sleep=0)
    key, fp = new_key(), twophase.fingerprint({"order": 2})
    assert db.idempotent(key, fp, work) == stored(1)
    assert db.idempotent(key, fp, must_not_run) == stored(1)
    # Also from inside a larger transaction.
    with db.transaction() as tx:
        assert tx.idempotent(key, fp, must_not_run) == stored(1)
    assert work.runs == [1]
    assert row_ids(url, table) == [1]
    row = key_row(url, key)
    assert row is not None and row["fingerprint"] == fp and row["finished_at"] is not None
    # A body that returns nothing: None is a result too, and is returned again.
    none_key = new_key()
    assert db.idempotent(none_key, fp, lambda tx: None) is None
    assert db.idempotent(none_key, fp, must_not_run) is None


async def test_retry_after_commit_returns_stored_result_async(
    adb: twophase.AsyncDatabase, url: str, table: str
) -> None:
    work = Work(table, sleep=0)
    key, fp = new_key(), twophase.fingerprint({"order": 2})
    assert await adb.idempotent(key, fp, work.run_async) == stored(1)
    assert await adb.idempotent(key, fp, must_not_run_async) == stored(1)
    async with adb.transaction() as tx:
        assert await tx.idempotent(key, fp, must_not_run_async) == stored(1)
    assert work.runs == [1]
    assert row_ids(url, table) == [1]


def test_different_fingerprint_conflicts(db: twophase.Database, url: str, table: str) -> None:
    work = Work(table, sleep=0)
    key = new_key()
    db.idempotent(key, twophase.fingerprint({"amount": 10}), work)
    other = twophase.fingerprint({"amount": 11})
    with pytest.raises(IdempotencyConflict):
        db.idempotent(key, other, must_not_run)
    # Inside a transaction with other work: the conflict rolls that work back too.
    with pytest.raises(IdempotencyConflict), db.transaction() as tx:
        tx.insert_into(table).values(id=99, status="other work").execute()
        tx.idempotent(key, other, must_not_run)
    assert work.runs == [1]
    assert row_ids(url, table) == [1]
    assert db.idempotent(key, twophase.fingerprint({"amount": 10}), must_not_run) == stored(1)


async def test_different_fingerprint_conflicts_async(
    adb: twophase.AsyncDatabase, url: str, table: str
) -> None:
    work = Work(table, sleep=0)
    key = new_key()
    await adb.idempotent(key, "fp-a", work.run_async)
    with pytest.raises(IdempotencyConflict):
        await adb.idempotent(key, "fp-b", must_not_run_async)
    assert work.runs == [1]
    assert row_ids(url, table) == [1]


def test_failing_body_leaves_no_key(db: twophase.Database, url: str, table: str) -> None:
    failing = Work(table, sleep=0, fail=True)
    key, fp = new_key(), "fp"
    with pytest.raises(ValueError):
        db.idempotent(key, fp, failing)
    assert failing.runs == [1]  # it ran, wrote its row, then raised
    assert key_row(url, key) is None
    assert row_ids(url, table) == []
    # The retry runs (and this time succeeds).
    work = Work(table, sleep=0)
    assert db.idempotent(key, fp, work) == stored(1)
    assert work.runs == [1]
    assert row_ids(url, table) == [1]


async def test_failing_body_leaves_no_key_async(
    adb: twophase.AsyncDatabase, url: str, table: str
) -> None:
    failing = Work(table, sleep=0, fail=True)
    key, fp = new_key(), "fp"
    with pytest.raises(ValueError):
        await adb.idempotent(key, fp, failing.run_async)
    assert key_row(url, key) is None
    assert row_ids(url, table) == []
    work = Work(table, sleep=0)
    assert await adb.idempotent(key, fp, work.run_async) == stored(1)
    assert row_ids(url, table) == [1]


CAUGHT_FAILURE_BUG = (
    "tx.idempotent leaves its claim (result NULL, finished_at NULL) in the transaction when "
    "the body raises; if the caller catches the exception and commits, every retry returns "
    "None as if that were the stored result, and the body never runs"
)


def test_failed_body_caught_inside_transaction_is_not_a_result(
    db: twophase.Database, table: str
) -> None:
    key = new_key()
    with db.transaction() as tx:
        with pytest.raises(ValueError):
            tx.idempotent(key, "fp", Work(table, sleep=0, fail=True))
        tx.insert_into(table).values(id=100, status="other work").execute()
    work = Work(table, sleep=0)
    next(work._ids)  # id 1 was written by the failed body, which the caller chose to commit
    assert db.idempotent(key, "fp", work) == stored(2)


def test_invalid_arguments(db: twophase.Database, table: str) -> None:
    work = Work(table, sleep=0)
    for key in ("", "k" * 256, 5, "a\0b", None):
        with pytest.raises(InvalidQuery):
            db.idempotent(key, "fp", work)  # type: ignore[arg-type]
    with pytest.raises(InvalidQuery):
        db.idempotent(new_key(), "", work)
    for ttl in (0, -1):
        with pytest.raises(InvalidQuery):
            db.idempotent(new_key(), "fp", work, ttl=ttl)
    assert work.runs == []
    fp = twophase.fingerprint({"a": 1, "b": [1, 2]})
    assert fp == twophase.fingerprint({"b": [1, 2], "a": 1})
    assert fp != twophase.fingerprint({"a": 1, "b": [2, 1]})
    assert len(fp) == 64 and int(fp, 16) >= 0


# -- inside distributed transactions --------------------------------------------------------


def wait_until_blocked(url: str, key: str, app: str) -> None:
    """Until the server shows the duplicate waiting on a row lock."""
    if rawdb.is_pg(url):
        sql = (
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock'"
        )
        params: tuple[str, ...] = (app,)
    else:
        # The MySQL drivers interpolate parameters, so the key is in the statement text.
        sql = (
            "SELECT 1 FROM information_schema.innodb_trx "
            "WHERE trx_state = 'LOCK WAIT' AND trx_query LIKE %s"
        )
        params = (f"%{key}%",)
    rawdb.poll(lambda: query(url, sql, params), timeout=20, what="the duplicate to block")


def duplicate_url(url: str, app: str) -> str:
    """A URL whose sessions the PostgreSQL server lists under ``app``."""
    return f"{url}&application_name={app}" if rawdb.is_pg(url) else url


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_key_in_distributed_transaction(
    iso: tuple[str, str], names: list[str], outcome: str
) -> None:
    url, table = iso
    app = f"tp_dup_{uuid.uuid4().hex[:8]}"
    key, fp, name = new_key(), "fp", new_name(names)
    work = Work(table, sleep=0)
    with twophase.connect(url) as db, twophase.connect(duplicate_url(url, app)) as dup:
        # First use before anything is prepared: see test_first_use_while_prepared.
        dup.idempotent(new_key(), "fp", lambda tx: None)
        first = db.begin_distributed(name, lambda tx: tx.idempotent(key, fp, work))
        assert first == stored(1)
        assert db.status(name) is Status.PREPARED
        assert key_row(url, key) is None  # prepared is not committed: invisible

        got: list[Any] = []
        worker = threading.Thread(target=lambda: got.append(dup.idempotent(key, fp, work)))
        worker.start()
        try:
            wait_until_blocked(url, key, app)
            assert worker.is_alive() and got == []
        finally:
            if outcome == "commit":
                db.commit_distributed(name)
            else:
                db.rollback_distributed(name)
            worker.join(30)
        if outcome == "commit":
            # The duplicate waited, then returned the committed result without running.
            assert got == [stored(1)]
            assert work.runs == [1]
            assert row_ids(url, table) == [1]
        else:
            # Rolled back: the duplicate claimed the key and ran (run 2); run 1's row is gone.
            assert got == [stored(2)]
            assert work.runs == [1, 2]
            assert row_ids(url, table) == [2]
        row = key_row(url, key)
        assert row is not None and row["finished_at"] is not None
        assert dup.idempotent(key, fp, must_not_run) == got[0]


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_key_in_distributed_transaction_async(
    iso: tuple[str, str], names: list[str], outcome: str
) -> None:
    url, table = iso
    app = f"tp_dup_{uuid.uuid4().hex[:8]}"
    key, fp, name = new_key(), "fp", new_name(names)
    work = Work(table, sleep=0)
    adb = await twophase.connect_async(url)
    dup = await twophase.connect_async(duplicate_url(url, app))
    try:
        await dup.idempotent(new_key(), "fp", must_not_run_async_none)

        async def stage(tx: twophase.AsyncTransaction) -> Any:
            return await tx.idempotent(key, fp, work.run_async)

        assert await adb.begin_distributed(name, stage) == stored(1)
        assert await asyncio.to_thread(key_row, url, key) is None

        duplicate = asyncio.create_task(dup.idempotent(key, fp, work.run_async))
        try:
            await asyncio.to_thread(wait_until_blocked, url, key, app)
            assert not duplicate.done()
        finally:
            if outcome == "commit":
                await adb.commit_distributed(name)
            else:
                await adb.rollback_distributed(name)
        got = await asyncio.wait_for(duplicate, 30)
        run = 1 if outcome == "commit" else 2
        assert got == stored(run)
        assert work.runs == list(range(1, run + 1))
        assert row_ids(url, table) == [run]
    finally:
        await adb.close()
        await dup.close()


async def must_not_run_async_none(tx: Any) -> None:
    return None


def test_first_use_while_prepared(iso: tuple[str, str], names: list[str]) -> None:
    """A key claimed in a prepared transaction must not stop other keys' first use.

    Regression: on PostgreSQL the first-use DDL (CREATE INDEX IF NOT EXISTS) took a
    ShareLock on twophase_idempotency and waited for the prepared transaction.
    """
    url, table = iso
    name = new_name(names)
    with twophase.connect(url) as db:
        db.begin_distributed(name, lambda tx: tx.idempotent(new_key(), "fp", Work(table, 0)))
        # On PostgreSQL a lock_timeout turns the wait into an error instead of a hang.
        bounded = url + "%20-clock_timeout%3D2s" if rawdb.is_pg(url) else url
        try:
            with twophase.connect(bounded) as other:
                assert other.idempotent(new_key(), "fp", lambda tx: "ran") == "ran"
        finally:
            db.rollback_distributed(name)


# -- expiry ---------------------------------------------------------------------------------


def expired(url: str, key: str) -> bool:
    k = '"key"' if rawdb.is_pg(url) else "`key`"
    now = "now()" if rawdb.is_pg(url) else "CURRENT_TIMESTAMP(6)"
    rows = query(
        url, f"SELECT expires_at < {now} AS e FROM twophase_idempotency WHERE {k} = %s", (key,)
    )
    return bool(rows and rows[0]["e"])


def test_expiry_and_prune(iso: tuple[str, str]) -> None:
    """ttl=1: the stored result holds for a second, then the key runs again; prune deletes
    exactly the expired keys (in batches)."""
    url, table = iso
    work = Work(table, sleep=0)
    with twophase.connect(url) as db:
        short = [new_key() for _ in range(4)]
        long = [new_key() for _ in range(2)]
        for key in short:
            db.idempotent(key, "fp", work, ttl=1)
        for key in long:
            db.idempotent(key, "fp", work, ttl=3600)
        assert db.idempotent(short[0], "fp", must_not_run, ttl=1) == stored(1)
        rawdb.poll(lambda: all(expired(url, k) for k in short), timeout=10, what="expiry")

        # Expired: the key runs again, as if new (and is live again, for an hour now).
        assert db.idempotent(short[0], "fp", work, ttl=3600) == stored(7)
        assert work.runs == [1, 2, 3, 4, 5, 6, 7]
        # Prune: the three other expired keys, two per batch; the live ones stay.
        assert db.prune_idempotency_keys(batch=2) == 3
        assert db.prune_idempotency_keys() == 0
        k = '"key"' if rawdb.is_pg(url) else "`key`"
        left = {r["k"] for r in query(url, f"SELECT {k} AS k FROM twophase_idempotency")}
        assert left == {short[0], *long}
        assert db.idempotent(long[0], "fp", must_not_run) == stored(5)
        assert db.idempotent(short[0], "fp", must_not_run) == stored(7)


async def test_expiry_and_prune_async(iso: tuple[str, str]) -> None:
    url, table = iso
    work = Work(table, sleep=0)
    adb = await twophase.connect_async(url)
    try:
        gone, kept = new_key(), new_key()
        await adb.idempotent(gone, "fp", work.run_async, ttl=1)
        await adb.idempotent(kept, "fp", work.run_async)
        assert await adb.idempotent(gone, "fp", must_not_run_async, ttl=1) == stored(1)
        await asyncio.to_thread(rawdb.poll, lambda: expired(url, gone), timeout=10, what="expiry")
        assert await adb.prune_idempotency_keys() == 1
        assert await asyncio.to_thread(key_row, url, gone) is None
        assert await adb.idempotent(gone, "fp", work.run_async, ttl=1) == stored(3)
        assert await adb.idempotent(kept, "fp", must_not_run_async) == stored(2)
    finally:
        await adb.close()


TTL_BUG = (
    "ttl is truncated with int(ttl): 0 < ttl < 1 passes the ttl > 0 check but stores an "
    "expiry of now, so every retry runs the body again"
)


def test_ttl_below_one_second_still_protects(db: twophase.Database, table: str) -> None:
    work = Work(table, sleep=0)
    key = new_key()
    db.idempotent(key, "fp", work, ttl=0.5)
    assert db.idempotent(key, "fp", work, ttl=0.5) == stored(1)
    assert work.runs == [1]


# -- the barrier ----------------------------------------------------------------------------


def barrier(db: twophase.Database, gid: str, branch: str, op: str) -> bool:
    with db.transaction() as tx:
        return tx.barrier(gid, branch, op)


def barrier_rows(url: str, gid: str) -> set[tuple[str, str, str]]:
    rows = query(url, "SELECT branch, op, origin FROM twophase_barrier WHERE gid = %s", (gid,))
    return {(r["branch"], r["op"], r["origin"]) for r in rows}


def new_gid() -> str:
    return f"g-{uuid.uuid4().hex}"


def test_barrier_duplicates_are_no_ops(db: twophase.Database, url: str) -> None:
    gid = new_gid()
    assert barrier(db, gid, "b1", "prepare") is True
    assert barrier(db, gid, "b1", "prepare") is False
    assert barrier(db, gid, "b1", "commit") is True
    assert barrier(db, gid, "b1", "commit") is False
    # A rollback after the prepare has something to undo; its duplicate does not.
    assert barrier(db, gid, "b2", "prepare") is True
    assert barrier(db, gid, "b2", "rollback") is True
    assert barrier(db, gid, "b2", "rollback") is False
    assert barrier(db, gid, "b3", "prepare") is True
    assert barrier(db, gid, "b3", "compensate") is True
    assert barrier(db, gid, "b3", "compensate") is False
    assert barrier_rows(url, gid) == {
        ("b1", "prepare", "prepare"),
        ("b1", "commit", "commit"),
        ("b2", "prepare", "prepare"),
        ("b2", "rollback", "rollback"),
        ("b3", "prepare", "prepare"),
        ("b3", "compensate", "compensate"),
    }


@pytest.mark.parametrize("cancel", ["rollback", "compensate"])
def test_barrier_cancel_before_prepare(db: twophase.Database, url: str, cancel: str) -> None:
    """A null cancel returns False and makes the late prepare a no-op."""
    gid = new_gid()
    assert barrier(db, gid, "b", cancel) is False  # null: the prepare never ran
    assert barrier(db, gid, "b", "prepare") is False  # late: nothing to stage
    assert barrier(db, gid, "b", cancel) is False  # duplicate
    assert barrier_rows(url, gid) == {("b", "prepare", cancel), ("b", cancel, cancel)}


def test_barrier_rows_roll_back_with_the_transaction(db: twophase.Database, url: str) -> None:
    gid = new_gid()
    with pytest.raises(RuntimeError), db.transaction() as tx:
        assert tx.barrier(gid, "b", "prepare") is True
        assert tx.barrier(gid, "b", "rollback") is True
        assert tx.barrier(gid, "n", "rollback") is False
        raise RuntimeError("the operation's own work failed")
    assert barrier_rows(url, gid) == set()
    # Nothing was recorded, so each operation is first again.
    assert barrier(db, gid, "n", "prepare") is True
    assert barrier(db, gid, "b", "prepare") is True
    assert barrier(db, gid, "b", "rollback") is True


def test_barrier_in_distributed_transaction(iso: tuple[str, str], names: list[str]) -> None:
    url, _ = iso
    gid = new_gid()
    with twophase.connect(url) as db:
        barrier(db, new_gid(), "warm", "prepare")  # first use before anything is prepared
        kept, dropped = new_name(names), new_name(names)
        assert db.begin_distributed(kept, lambda tx: tx.barrier(gid, "k", "prepare")) is True
        assert db.begin_distributed(dropped, lambda tx: tx.barrier(gid, "d", "prepare")) is True
        assert barrier_rows(url, gid) == set()  # prepared: not yet recorded
        db.commit_distributed(kept)
        db.rollback_distributed(dropped)
        assert barrier_rows(url, gid) == {("k", "prepare", "prepare")}
        assert barrier(db, gid, "k", "prepare") is False
        assert barrier(db, gid, "d", "prepare") is True


def test_barrier_concurrent_duplicates(db: twophase.Database) -> None:
    gid = new_gid()
    start = threading.Barrier(10)

    def prepare(_: int) -> bool:
        start.wait()
        with db.transaction() as tx:
            first = tx.barrier(gid, "b", "prepare")
            time.sleep(0.05)  # hold the row lock while the others arrive
            return first

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(prepare, range(10)))
    assert sorted(results) == [False] * 9 + [True]


def test_barrier_prepare_and_rollback_race(db: twophase.Database, url: str) -> None:
    """Whichever commits first wins: both do their work, or neither does."""
    gid = new_gid()

    def race(branch: str) -> tuple[bool, bool]:
        start = threading.Barrier(2)

        def op(name: str) -> bool:
            start.wait()
            return barrier(db, gid, branch, name)

        with ThreadPoolExecutor(2) as pool:
            p, r = pool.submit(op, "prepare"), pool.submit(op, "rollback")
            return p.result(), r.result()

    for i in range(6):
        prepared, rolled_back = race(f"b{i}")
        assert prepared == rolled_back
        origin = "prepare" if prepared else "rollback"
        rows = {(op, o) for b, op, o in barrier_rows(url, gid) if b == f"b{i}"}
        assert rows == {("prepare", origin), ("rollback", "rollback")}


def test_barrier_invalid_arguments(db: twophase.Database, url: str) -> None:
    gid = new_gid()
    with db.transaction() as tx:
        with pytest.raises(InvalidQuery):
            tx.barrier(gid, "b", "commit_prepared")
        with pytest.raises(InvalidQuery):
            tx.barrier("", "b", "prepare")
        with pytest.raises(InvalidQuery):
            tx.barrier(gid, "b" * 256, "prepare")
    assert barrier_rows(url, gid) == set()


async def test_barrier_async(adb: twophase.AsyncDatabase, url: str) -> None:
    gid = new_gid()

    async def bar(branch: str, op: str) -> bool:
        async with adb.transaction() as tx:
            return await tx.barrier(gid, branch, op)

    assert await bar("b", "prepare") is True
    assert await bar("b", "prepare") is False
    assert await bar("b", "commit") is True
    assert await bar("b", "commit") is False
    assert await bar("n", "rollback") is False
    assert await bar("n", "prepare") is False
    with pytest.raises(RuntimeError):
        async with adb.transaction() as tx:
            assert await tx.barrier(gid, "x", "prepare") is True
            raise RuntimeError("rolled back")
    assert await bar("x", "prepare") is True
    assert barrier_rows(url, gid) == {
        ("b", "prepare", "prepare"),
        ("b", "commit", "commit"),
        ("n", "prepare", "rollback"),
        ("n", "rollback", "rollback"),
        ("x", "prepare", "prepare"),
    }
