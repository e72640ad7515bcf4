"""The examples of the seed page (seed/distributed-transactions.md), translated to Python.

Each runs sync and async on PostgreSQL and MariaDB and checks the rows the page promises.
The page's tables (users, jobs, orders) are the fresh ``table`` fixture, so runs never share
data; the names of the page (provision_user_123, batch_txn, ...) get the unique ``txname``
prefix for the same reason (and so conftest's clean-up finds them if a test dies midway).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

import twophase
from twophase import Status


class WorkerFailed(Exception):
    """runWorker() of the page, failing."""


class CardDeclined(Exception):
    """chargeCard() of the page, failing."""


def rows_of(db: twophase.Database, table: str) -> list[dict[str, Any]]:
    return list(db.select_from(table).order_by("id").execute())


async def arows_of(adb: twophase.AsyncDatabase, table: str) -> list[dict[str, Any]]:
    return list(await adb.select_from(table).order_by("id").execute())


def prepared_names(db: twophase.Database) -> set[str]:
    return {p.name for p in db.prepared()}


async def aprepared_names(adb: twophase.AsyncDatabase) -> set[str]:
    return {p.name for p in await adb.prepared()}


# -- Orchestrated multi-step process ---------------------------------------------------


def test_orchestrated_process(db, table, txname):
    users, name = table, f"{txname}.provision_user_123"
    verified: list[str] = []

    def provision_external_resources() -> None:
        # While the external systems are checked the staged row is durable but invisible.
        assert db.status(name) is Status.PREPARED
        assert name in prepared_names(db)
        assert rows_of(db, users) == []
        verified.append(name)

    def stage(tx: twophase.Transaction) -> None:
        tx.insert_into(users).values(id=123, status="pending").execute()

    db.begin_distributed(name, stage)
    provision_external_resources()
    db.commit_distributed(name)

    assert verified == [name]
    assert rows_of(db, users) == [{"id": 123, "status": "pending"}]
    assert db.status(name) is Status.COMMITTED
    assert name not in prepared_names(db)


async def test_orchestrated_process_async(adb, table, txname):
    users, name = table, f"{txname}.provision_user_123"
    verified: list[str] = []

    async def provision_external_resources() -> None:
        assert await adb.status(name) is Status.PREPARED
        assert name in await aprepared_names(adb)
        assert await arows_of(adb, users) == []
        verified.append(name)

    async def stage(tx: twophase.AsyncTransaction) -> None:
        await tx.insert_into(users).values(id=123, status="pending").execute()

    await adb.begin_distributed(name, stage)
    await provision_external_resources()
    await adb.commit_distributed(name)

    assert verified == [name]
    assert await arows_of(adb, users) == [{"id": 123, "status": "pending"}]
    assert await adb.status(name) is Status.COMMITTED
    assert name not in await aprepared_names(adb)


# -- Rollback on failure ---------------------------------------------------------------


def test_rollback_on_failure(db, table, txname):
    jobs, name = table, f"{txname}.batch_txn"
    caught: list[Exception] = []

    def run_worker() -> None:
        raise WorkerFailed

    try:
        db.begin_distributed(name, lambda tx: tx.insert_into(jobs).values(id=1).execute())
        run_worker()
        db.commit_distributed(name)
    except Exception as e:
        caught.append(e)
        db.rollback_distributed(name)

    assert [type(e) for e in caught] == [WorkerFailed]
    assert rows_of(db, jobs) == []
    assert db.status(name) is Status.ROLLED_BACK
    assert name not in prepared_names(db)


def test_rollback_on_failure_when_begin_fails(db, table, txname):
    # The page's catch block also runs when beginDistributed itself throws; its rollback
    # must then return normally rather than fail with "unknown transaction".
    jobs, name = table, f"{txname}.batch_txn"
    db.insert_into(jobs).values(id=1, status="earlier").execute()
    caught: list[Exception] = []
    worker_ran: list[bool] = []

    try:
        db.begin_distributed(name, lambda tx: tx.insert_into(jobs).values(id=1).execute())
        worker_ran.append(True)
        db.commit_distributed(name)
    except Exception as e:
        caught.append(e)
        db.rollback_distributed(name)

    assert [type(e) for e in caught] == [twophase.IntegrityError]
    assert worker_ran == []
    assert rows_of(db, jobs) == [{"id": 1, "status": "earlier"}]
    assert db.status(name) is Status.ROLLED_BACK


async def test_rollback_on_failure_async(adb, table, txname):
    jobs, name = table, f"{txname}.batch_txn"
    caught: list[Exception] = []

    async def run_worker() -> None:
        raise WorkerFailed

    async def stage(tx: twophase.AsyncTransaction) -> None:
        await tx.insert_into(jobs).values(id=1).execute()

    try:
        await adb.begin_distributed(name, stage)
        await run_worker()
        await adb.commit_distributed(name)
    except Exception as e:
        caught.append(e)
        await adb.rollback_distributed(name)

    assert [type(e) for e in caught] == [WorkerFailed]
    assert await arows_of(adb, jobs) == []
    assert await adb.status(name) is Status.ROLLED_BACK
    assert name not in await aprepared_names(adb)


async def test_rollback_on_failure_when_begin_fails_async(adb, table, txname):
    jobs, name = table, f"{txname}.batch_txn"
    await adb.insert_into(jobs).values(id=1, status="earlier").execute()
    caught: list[Exception] = []

    async def stage(tx: twophase.AsyncTransaction) -> None:
        await tx.insert_into(jobs).values(id=1).execute()

    try:
        await adb.begin_distributed(name, stage)
        await adb.commit_distributed(name)
    except Exception as e:
        caught.append(e)
        await adb.rollback_distributed(name)

    assert [type(e) for e in caught] == [twophase.IntegrityError]
    assert await arows_of(adb, jobs) == [{"id": 1, "status": "earlier"}]
    assert await adb.status(name) is Status.ROLLED_BACK


# -- Multi-service user provisioning ---------------------------------------------------


def test_multi_service_provisioning(url, table, txname):
    users, name = table, f"{txname}.user_123"
    with twophase.connect(url) as service_a, twophase.connect(url) as coordinator:
        # service A
        service_a.begin_distributed(
            name, lambda tx: tx.insert_into(users).values(id=123, status="provisioning").execute()
        )
        # service B does external work... and sees nothing yet.
        assert coordinator.status(name) is Status.PREPARED
        assert rows_of(coordinator, users) == []
        # coordinator
        coordinator.commit_distributed(name)

        assert rows_of(service_a, users) == [{"id": 123, "status": "provisioning"}]
        assert service_a.status(name) is Status.COMMITTED


def test_multi_service_provisioning_across_processes(url, table, txname):
    # Service A is a real separate process that exits after staging: the prepared
    # transaction must outlive it and be committed by the coordinator.
    users, name = table, f"{txname}.user_123"
    service_a = textwrap.dedent(
        """
        import sys, twophase
        url, name, users = sys.argv[1:]
        with twophase.connect(url) as db:
            db.begin_distributed(
                name,
                lambda tx: tx.insert_into(users).values(id=123, status="provisioning").execute(),
            )
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", service_a, url, name, users],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    with twophase.connect(url) as coordinator:
        assert coordinator.status(name) is Status.PREPARED
        coordinator.commit_distributed(name)
        assert rows_of(coordinator, users) == [{"id": 123, "status": "provisioning"}]


async def test_multi_service_provisioning_async(url, table, txname):
    users, name = table, f"{txname}.user_123"
    service_a = await twophase.connect_async(url)
    coordinator = await twophase.connect_async(url)
    try:

        async def stage(tx: twophase.AsyncTransaction) -> None:
            await tx.insert_into(users).values(id=123, status="provisioning").execute()

        await service_a.begin_distributed(name, stage)
        assert await coordinator.status(name) is Status.PREPARED
        assert await arows_of(coordinator, users) == []
        await coordinator.commit_distributed(name)

        assert await arows_of(service_a, users) == [{"id": 123, "status": "provisioning"}]
        assert await service_a.status(name) is Status.COMMITTED
    finally:
        await service_a.close()
        await coordinator.close()


# -- Rollback with compensation --------------------------------------------------------


@pytest.mark.parametrize("card", ["declined", "accepted"])
def test_rollback_with_compensation(db, table, txname, card):
    orders, name = table, f"{txname}.order_1"
    refunds: list[str] = []
    charged: list[str] = []

    def charge_card() -> None:
        if card == "declined":
            raise CardDeclined
        charged.append(name)

    def issue_refund() -> None:
        refunds.append(name)

    try:
        db.begin_distributed(
            name, lambda tx: tx.insert_into(orders).values(id=1, status="placed").execute()
        )
        charge_card()
        db.commit_distributed(name)
    except Exception:
        db.rollback_distributed(name)
        issue_refund()

    if card == "declined":
        assert refunds == [name]
        assert rows_of(db, orders) == []
        assert db.status(name) is Status.ROLLED_BACK
    else:
        assert (charged, refunds) == ([name], [])
        assert rows_of(db, orders) == [{"id": 1, "status": "placed"}]
        assert db.status(name) is Status.COMMITTED


async def test_rollback_with_compensation_async(adb, table, txname):
    orders, name = table, f"{txname}.order_1"
    refunds: list[str] = []

    async def charge_card() -> None:
        raise CardDeclined

    async def issue_refund() -> None:
        refunds.append(name)

    async def place(tx: twophase.AsyncTransaction) -> None:
        await tx.insert_into(orders).values(id=1, status="placed").execute()

    try:
        await adb.begin_distributed(name, place)
        await charge_card()
        await adb.commit_distributed(name)
    except Exception:
        await adb.rollback_distributed(name)
        await issue_refund()

    assert refunds == [name]
    assert await arows_of(adb, orders) == []
    assert await adb.status(name) is Status.ROLLED_BACK


# -- Idempotency: insertOrIgnore -------------------------------------------------------


def test_insert_or_ignore_idempotency(db, table, txname):
    keys = table  # the page's idempotency_keys: the key is the primary key
    first = db.insert_or_ignore(keys).values(id=42, status="first").execute()
    again = db.insert_or_ignore(keys).values(id=42, status="second").execute()
    assert (first.rowcount, again.rowcount) == (1, 0)
    assert rows_of(db, keys) == [{"id": 42, "status": "first"}]

    # A retried distributed step that repeats the insert commits without a duplicate.
    def step(tx: twophase.Transaction) -> int:
        return tx.insert_or_ignore(keys).values(id=42, status="retry").execute().rowcount

    assert db.begin_distributed(txname, step) == 0
    db.commit_distributed(txname)
    assert rows_of(db, keys) == [{"id": 42, "status": "first"}]


async def test_insert_or_ignore_idempotency_async(adb, table, txname):
    keys = table
    first = await adb.insert_or_ignore(keys).values(id=42, status="first").execute()
    again = await adb.insert_or_ignore(keys).values(id=42, status="second").execute()
    assert (first.rowcount, again.rowcount) == (1, 0)

    async def step(tx: twophase.AsyncTransaction) -> int:
        return (await tx.insert_or_ignore(keys).values(id=42, status="retry").execute()).rowcount

    assert await adb.begin_distributed(txname, step) == 0
    await adb.commit_distributed(txname)
    assert await arows_of(adb, keys) == [{"id": 42, "status": "first"}]
