"""AsyncDatabase behaves like Database: same names, same parameters, same outcomes.

The key flows of test_distributed.py, awaited, on PostgreSQL and MariaDB; the public
surfaces compared with inspect.signature; the generated sync code checked against its async
source; and the event loop shown to keep running while the server works.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import time
import uuid
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
import pymysql
import pytest
from procs import rawdb

import twophase
from twophase import Status

ROOT = Path(__file__).resolve().parent.parent
XA_FORMAT_ID = 29808


class Boom(Exception):
    """Raised by callbacks to make begin_distributed fail on purpose."""


server_prepared = rawdb.prepared_names  # read from the server, not through twophase


async def rows_of(adb: twophase.AsyncDatabase, table: str) -> list[dict[str, Any]]:
    return list(await adb.select_from(table).order_by("id").execute())


def xa_commit_elsewhere(url: str, name: str, *, within: float) -> None:
    """XA COMMIT from a separate blocking session, retrying while the branch is attached.

    Blocking on purpose: the event loop must not get a chance to run meanwhile.
    """
    parts = urlsplit(url)
    conn = pymysql.connect(
        host=parts.hostname,
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        database=parts.path.lstrip("/"),
        autocommit=True,
    )
    deadline = time.monotonic() + within
    try:
        while True:
            try:
                with conn.cursor() as cur:
                    cur.execute(f"XA COMMIT '{name}','',{XA_FORMAT_ID}")
                return
            except pymysql.MySQLError as exc:
                if exc.args[0] != 1397 or time.monotonic() > deadline:  # 1397: XAER_NOTA
                    raise
                time.sleep(0.02)
    finally:
        conn.close()


def stage(table: str, id_: int, status: str):
    async def fn(tx: twophase.AsyncTransaction) -> None:
        await tx.insert_into(table).values(id=id_, status=status).execute()

    return fn


def new_name() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


# -- the surfaces match ----------------------------------------------------------------


def _public(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and (callable(member) or isinstance(member, property))
    }


def _params(fn: Any) -> list[tuple[str, Any, Any]]:
    # Annotations differ by design (Awaitable[...] on the async side); names, kinds and
    # defaults are what callers rely on.
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [
        (twophase.Database, twophase.AsyncDatabase),
        (twophase.Transaction, twophase.AsyncTransaction),
    ],
    ids=["Database", "Transaction"],
)
def test_public_methods_match(sync_cls, async_cls):
    sync_api, async_api = _public(sync_cls), _public(async_cls)
    assert sorted(sync_api) == sorted(async_api)
    for name, member in sync_api.items():
        other = async_api[name]
        if isinstance(member, property):
            assert isinstance(other, property), name
            continue
        assert _params(member) == _params(other), name


def test_connect_signatures_match():
    assert _params(twophase.connect) == _params(twophase.connect_async)
    assert inspect.iscoroutinefunction(twophase.connect_async)


@pytest.mark.parametrize(
    "name",
    ["execute", "begin_distributed", "commit_distributed", "rollback_distributed", "status",
     "prepared", "close"],
)  # fmt: skip
def test_async_io_methods_are_coroutines(name):
    assert inspect.iscoroutinefunction(getattr(twophase.AsyncDatabase, name))
    assert not inspect.iscoroutinefunction(getattr(twophase.Database, name))


async def test_instances_match(db, adb, txname):
    public = {k for k in vars(db) if not k.startswith("_")}
    assert public == {k for k in vars(adb) if not k.startswith("_")}
    for key in public:
        if key != "dialect":
            assert getattr(db, key) == getattr(adb, key), key
    assert type(db.dialect) is type(adb.dialect)
    # Context managers of the async side are async ones.
    assert hasattr(adb.transaction(), "__aenter__")
    assert hasattr(adb.distributed(txname), "__aenter__")


def test_generated_sync_code_is_current():
    done = subprocess.run(
        [sys.executable, "tools/async_to_sync.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- key flows, awaited ----------------------------------------------------------------


async def test_commit_retry_and_status(adb, url, table, txname):
    assert await adb.status(txname) is Status.UNKNOWN
    assert await adb.begin_distributed(txname, stage(table, 1, "staged")) is None
    assert await adb.status(txname) is Status.PREPARED
    assert txname in server_prepared(url)
    assert await rows_of(adb, table) == []

    await adb.commit_distributed(txname)
    await adb.commit_distributed(txname)
    assert await adb.status(txname) is Status.COMMITTED
    assert await rows_of(adb, table) == [{"id": 1, "status": "staged"}]
    with pytest.raises(twophase.TransactionCommitted):
        await adb.rollback_distributed(txname)
    assert await rows_of(adb, table) == [{"id": 1, "status": "staged"}]


async def test_rollback_retry_and_status(adb, url, table, txname):
    await adb.begin_distributed(txname, stage(table, 1, "staged"))
    await adb.rollback_distributed(txname)
    await adb.rollback_distributed(txname)
    assert await adb.status(txname) is Status.ROLLED_BACK
    assert txname not in server_prepared(url)
    assert await rows_of(adb, table) == []
    with pytest.raises(twophase.TransactionRolledBack):
        await adb.commit_distributed(txname)


async def test_unknown_names(adb, txname):
    with pytest.raises(twophase.UnknownTransaction):
        await adb.commit_distributed(txname)
    with pytest.raises(twophase.UnknownTransaction):
        await adb.rollback_distributed(txname)
    assert await adb.status(txname) is Status.UNKNOWN


async def test_sync_and_async_see_the_same_transaction(db, adb, table, txname):
    db.begin_distributed(
        txname, lambda tx: tx.insert_into(table).values(id=1, status="sync").execute()
    )
    assert await adb.status(txname) is Status.PREPARED
    await adb.commit_distributed(txname)
    assert db.status(txname) is Status.COMMITTED
    assert db.select_from(table).execute() == [{"id": 1, "status": "sync"}]


@pytest.mark.parametrize("dialect_name", ["mysql"])
async def test_async_prepared_branch_is_detached_on_return(adb, url, table, txname):
    # Regression: the preparing session used to be closed only when the event loop next ran,
    # so the XA branch stayed attached to it (XAER_NOTA elsewhere) after begin returned.
    await adb.begin_distributed(txname, stage(table, 1, "async"))
    # No await from here on: a coordinator elsewhere must be able to commit right away
    # (allowing the server a moment to notice the disconnect, but not our event loop).
    try:
        xa_commit_elsewhere(url, txname, within=1.0)
    finally:
        if await adb.status(txname) is Status.PREPARED:
            await adb.rollback_distributed(txname)
    assert await rows_of(adb, table) == [{"id": 1, "status": "async"}]


async def test_context_manager_and_return_value(adb, url, table, txname):
    async with adb.distributed(txname) as tx:
        assert (tx.name, tx.is_distributed) == (txname, True)
        await tx.insert_into(table).values(id=1, status="cm").execute()
    assert txname in server_prepared(url)
    await adb.commit_distributed(txname)

    second = new_name()

    async def fn(tx: twophase.AsyncTransaction) -> dict[str, int]:
        rows = await tx.insert_into(table).values(id=2, status="fn").execute()
        return {"rowcount": rows.rowcount}

    assert await adb.begin_distributed(second, fn) == {"rowcount": 1}
    await adb.commit_distributed(second)
    assert [r["id"] for r in await rows_of(adb, table)] == [1, 2]


async def test_failing_callback_leaves_nothing(adb, url, table, txname):
    async def fn(tx: twophase.AsyncTransaction) -> None:
        await tx.insert_into(table).values(id=1, status="doomed").execute()
        raise Boom

    with pytest.raises(Boom):
        await adb.begin_distributed(txname, fn)
    assert txname not in server_prepared(url)
    assert txname not in {p.name for p in await adb.prepared()}
    assert await rows_of(adb, table) == []
    assert await adb.status(txname) is Status.ROLLED_BACK
    await adb.rollback_distributed(txname)

    other = new_name()
    with pytest.raises(Boom):
        async with adb.distributed(other) as tx:
            await tx.insert_into(table).values(id=2, status="doomed").execute()
            raise Boom
    assert other not in server_prepared(url)
    assert await rows_of(adb, table) == []


@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_cancelled_begin_leaves_nothing(adb, url, table, txname, how):
    inside = asyncio.Event()

    async def fn(tx: twophase.AsyncTransaction) -> None:
        await tx.insert_into(table).values(id=1, status="cancelled").execute()
        inside.set()
        await asyncio.sleep(30)

    if how == "cancel":
        task = asyncio.create_task(adb.begin_distributed(txname, fn))
        await asyncio.wait_for(inside.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await adb.begin_distributed(txname, fn)
    assert txname not in server_prepared(url)
    assert await rows_of(adb, table) == []
    assert await adb.status(txname) is Status.ROLLED_BACK


async def test_names_in_use_and_reuse(adb, table, txname):
    await adb.begin_distributed(txname, stage(table, 1, "first"))
    with pytest.raises(twophase.TransactionNameInUse):
        await adb.begin_distributed(txname, stage(table, 2, "while prepared"))
    await adb.commit_distributed(txname)
    with pytest.raises(twophase.TransactionNameInUse):
        await adb.begin_distributed(txname, stage(table, 3, "after commit"))
    assert await rows_of(adb, table) == [{"id": 1, "status": "first"}]

    other = new_name()
    await adb.begin_distributed(other, stage(table, 4, "rolled back"))
    await adb.rollback_distributed(other)
    await adb.begin_distributed(other, stage(table, 5, "reused"))
    await adb.commit_distributed(other)
    assert [r["id"] for r in await rows_of(adb, table)] == [1, 5]


async def test_invalid_names(adb):
    for bad in ["", "a b", "x" * 65, "naïve"]:
        with pytest.raises(twophase.InvalidTransactionName):
            await adb.begin_distributed(bad, stage("unused", 1, "x"))
        with pytest.raises(twophase.InvalidTransactionName):
            await adb.commit_distributed(bad)
        with pytest.raises(twophase.InvalidTransactionName):
            await adb.status(bad)


async def test_namespaces(url, table, txname):
    billing = await twophase.connect_async(url, namespace="billing")
    shipping = await twophase.connect_async(url, namespace="shipping")
    try:
        await billing.begin_distributed(txname, stage(table, 1, "billing"))
        await shipping.begin_distributed(txname, stage(table, 2, "shipping"))
        mine = [p for p in await billing.prepared() if p.name == txname]
        assert [p.full_name for p in mine] == [f"billing:{txname}"]
        assert all(p.full_name.startswith("shipping:") for p in await shipping.prepared())
        await billing.commit_distributed(txname)
        await shipping.rollback_distributed(txname)
        assert await rows_of(billing, table) == [{"id": 1, "status": "billing"}]
    finally:
        for adb in (billing, shipping):
            if await adb.status(txname) is Status.PREPARED:
                await adb.rollback_distributed(txname)
            await adb.close()


async def test_prepared_fields(adb, table, txname):
    before = datetime.now(UTC)
    await adb.begin_distributed(txname, stage(table, 1, "a"))
    try:
        (p,) = [p for p in await adb.prepared() if p.name == txname]
        assert (p.full_name, p.database) == (txname, "test")
        assert p.prepared_at is not None and p.prepared_at.utcoffset() is not None
        assert before - timedelta(seconds=5) <= p.prepared_at <= datetime.now(UTC)
        assert p.age is not None and p.age <= timedelta(seconds=60)
    finally:
        await adb.commit_distributed(txname)


async def test_nesting_refused(adb, url, table, txname):
    inner = new_name()
    other = await twophase.connect_async(url, pool_max=2)

    async def _never(tx: object) -> None:
        pytest.fail("a nested callback ran")

    async def enter(cm: Any) -> None:
        async with cm:
            pytest.fail("a nested transaction was opened")

    attempts = {
        "adb.transaction": lambda tx: enter(adb.transaction()),
        "adb.distributed": lambda tx: enter(adb.distributed(inner)),
        "adb.begin_distributed": lambda tx: adb.begin_distributed(inner, _never),
        "other.begin_distributed": lambda tx: other.begin_distributed(inner, _never),
        "other.transaction": lambda tx: enter(other.transaction()),
        "SAVEPOINT": lambda tx: tx.execute("SAVEPOINT sp"),
        "COMMIT": lambda tx: tx.execute("COMMIT"),
        "BEGIN": lambda tx: tx.execute("BEGIN"),
        "XA END": lambda tx: tx.execute("XA END 'x'"),
        "PREPARE TRANSACTION": lambda tx: tx.execute("PREPARE TRANSACTION 'x'"),
        "adb.execute": lambda tx: adb.execute("ROLLBACK"),
    }
    try:
        for attempt, action in attempts.items():
            outer = new_name()
            with pytest.raises(twophase.NestedTransactionError):
                async with adb.distributed(outer) as tx:
                    await tx.insert_into(table).values(id=1, status="outer").execute()
                    await action(tx)
                    pytest.fail(f"{attempt} was not refused")
            assert not {outer, inner} & server_prepared(url), attempt
            assert await rows_of(adb, table) == [], attempt

        # The methods that refuse on the transaction object itself are plain calls.
        async with adb.transaction() as tx:
            for refuse in (tx.savepoint, tx.transaction):
                with pytest.raises(twophase.NestedTransactionError):
                    refuse()
            with pytest.raises(twophase.NestedTransactionError):
                tx.distributed(inner)
            with pytest.raises(twophase.NestedTransactionError):
                tx.begin_distributed(inner, _never)
            await tx.insert_into(table).values(id=9, status="kept").execute()
        assert await rows_of(adb, table) == [{"id": 9, "status": "kept"}]
    finally:
        await other.close()

    with pytest.raises(twophase.NestedTransactionError):
        await adb.execute("BEGIN")


async def test_caught_statement_error(adb, url, dialect_name, table, txname):
    async def fn(tx: twophase.AsyncTransaction) -> str:
        await tx.insert_into(table).values(id=1, status="first").execute()
        with pytest.raises(twophase.IntegrityError):
            await tx.insert_into(table).values(id=1, status="dup").execute()
        return "swallowed"

    if dialect_name == "postgresql":
        with pytest.raises(twophase.DatabaseError) as info:
            await adb.begin_distributed(txname, fn)
        assert not isinstance(info.value, twophase.IntegrityError)
        assert txname not in server_prepared(url)
        assert await rows_of(adb, table) == []
        await adb.rollback_distributed(txname)
    else:
        assert await adb.begin_distributed(txname, fn) == "swallowed"
        await adb.commit_distributed(txname)
        assert await rows_of(adb, table) == [{"id": 1, "status": "first"}]


async def test_user_errors_are_translated(adb, dialect_name, table):
    driver_error = psycopg.Error if dialect_name == "postgresql" else pymysql.MySQLError
    await adb.insert_into(table).values(id=1, status="a").execute()
    with pytest.raises(twophase.IntegrityError) as dup:
        await adb.insert_into(table).values(id=1, status="b").execute()
    assert isinstance(dup.value.__cause__, driver_error)
    with pytest.raises(twophase.DatabaseError) as missing:
        await adb.execute("SELECT * FROM tp_no_such_table_anywhere")
    assert not isinstance(missing.value, twophase.IntegrityError)
    assert isinstance(missing.value.__cause__, driver_error)


async def test_ordinary_transaction(adb, table, txname):
    async with adb.transaction() as tx:
        assert (tx.name, tx.is_distributed) == (None, False)
        await tx.insert_into(table).values(id=1, status="a").execute()
        assert await rows_of(adb, table) == []
    assert await rows_of(adb, table) == [{"id": 1, "status": "a"}]

    with pytest.raises(Boom):
        async with adb.transaction() as tx:
            await tx.update_table(table).set(status="changed").where(id=1).execute()
            raise Boom
    assert await rows_of(adb, table) == [{"id": 1, "status": "a"}]

    # The transaction object is dead once its block is over.
    with pytest.raises(twophase.InvalidQuery):
        await tx.execute("SELECT 1")
    async with adb.distributed(txname) as dtx:
        pass
    with pytest.raises(twophase.InvalidQuery):
        await dtx.insert_into(table).values(id=2, status="late").execute()
    await adb.commit_distributed(txname)
    assert await rows_of(adb, table) == [{"id": 1, "status": "a"}]


# -- concurrency and the event loop ----------------------------------------------------


async def test_twenty_concurrent_tasks(url, table):
    names = [new_name() for _ in range(20)]
    # A fresh AsyncDatabase, so the tasks also race through its first-use setup.
    adb = await twophase.connect_async(url)
    try:

        async def work(i: int) -> int:
            await adb.begin_distributed(names[i], stage(table, i, f"task{i}"))
            await adb.commit_distributed(names[i])
            return i

        assert await asyncio.gather(*(work(i) for i in range(20))) == list(range(20))
        assert await rows_of(adb, table) == [{"id": i, "status": f"task{i}"} for i in range(20)]
        statuses = await asyncio.gather(*(adb.status(n) for n in names))
        assert set(statuses) == {Status.COMMITTED}
        assert not set(names) & server_prepared(url)
    finally:
        await adb.close()


async def test_event_loop_keeps_running_during_queries(adb, dialect_name):
    # A slow server-side statement must not stall other tasks: a ticker keeps ticking.
    sleep_sql = "SELECT pg_sleep(0.4)" if dialect_name == "postgresql" else "SELECT SLEEP(0.4)"
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    try:
        await adb.execute(sleep_sql)
    finally:
        task.cancel()
    assert time.monotonic() - started >= 0.35
    assert ticks >= 10


@pytest.mark.parametrize("dialect_name", ["mysql"])
async def test_rollback_emits_no_driver_warnings(adb, table, txname):
    # Regression: aiomysql turned the duplicate tombstone of INSERT IGNORE into a Python
    # Warning, so under -W error a successful rollback raised DatabaseError.
    await adb.begin_distributed(txname, stage(table, 1, "x"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await adb.rollback_distributed(txname)
    assert await adb.status(txname) is Status.ROLLED_BACK
