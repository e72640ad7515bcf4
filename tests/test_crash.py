"""Crashes: a process killed with SIGKILL around prepare, and database restarts.

A child process (tests/procs/crash_child.py) stages a transaction and is killed with a real
SIGKILL, so none of the library's clean-up runs. The parent then finishes the transaction
from its own connections. Facts ("is it prepared", "is the row there") are read with the
driver directly (procs.rawdb), not only through twophase.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from procs import rawdb
from procs.child import Child

import twophase
from twophase import Status


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start children; any still running when the test ends are killed (only ours)."""
    children: list[Child] = []

    def start(url: str, name: str, table: str, mode: str, where: str) -> Child:
        child = Child("crash_child.py", url, name, table, mode, where)
        children.append(child)
        return child

    yield start
    for child in children:
        child.cleanup()


@pytest.fixture
def txname(url: str) -> Iterator[str]:
    """A unique name that does not start with ``t_``; rolled back if a failed test leaves it
    prepared.

    conftest's ``table`` fixture rolls back every prepared ``t_*`` transaction in the
    database when it tears down, including those of other test processes running at the
    same time; a crash test's transaction must sit prepared across that window. Tests list
    this fixture after their table, so this clean-up runs first: a prepared transaction
    keeps its locks, and the table's DROP would wait on them forever.
    """
    name = f"crash_{uuid.uuid4().hex[:16]}"
    yield name
    _ensure_up(url)
    rawdb.rollback_if_prepared(url, name)


def row_ids(url: str, table: str) -> list[int]:
    return [r["id"] for r in rawdb.query(url, f"SELECT id FROM {table} ORDER BY id")]


async def call(
    mode: str, db: twophase.Database, adb: twophase.AsyncDatabase, method: str, *args: Any
) -> Any:
    """Call ``method`` on the sync or the async database, so one test covers both APIs."""
    if mode == "sync":
        return getattr(db, method)(*args)
    return await getattr(adb, method)(*args)


# -- killed after PREPARE ---------------------------------------------------------------------


@pytest.mark.parametrize("finish", ["commit", "rollback"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_killed_after_prepare_is_finished_by_another_process(
    url: str,
    db: twophase.Database,
    adb: twophase.AsyncDatabase,
    table: str,
    txname: str,
    spawn: Any,
    mode: str,
    finish: str,
) -> None:
    child = spawn(url, txname, table, mode, "prepare")
    child.wait_for("PREPARED")
    child.sigkill()

    # The prepared transaction outlives its process: prepared, holding a row nobody sees.
    assert txname in rawdb.prepared_names(url)
    assert await call(mode, db, adb, "status", txname) is Status.PREPARED
    assert txname in [p.name for p in await call(mode, db, adb, "prepared")]
    assert row_ids(url, table) == []

    await call(mode, db, adb, f"{finish}_distributed", txname)

    assert txname not in rawdb.prepared_names(url)
    if finish == "commit":
        assert rawdb.query(url, f"SELECT id, status FROM {table}") == [
            {"id": 1, "status": "staged"}
        ]
        assert await call(mode, db, adb, "status", txname) is Status.COMMITTED
        # Safe to retry: a second commit (say, after a lost reply) returns normally.
        await call(mode, db, adb, "commit_distributed", txname)
        with pytest.raises(twophase.TransactionCommitted):
            await call(mode, db, adb, "rollback_distributed", txname)
    else:
        assert row_ids(url, table) == []
        assert await call(mode, db, adb, "status", txname) is Status.ROLLED_BACK
        await call(mode, db, adb, "rollback_distributed", txname)
        with pytest.raises(twophase.TransactionRolledBack):
            await call(mode, db, adb, "commit_distributed", txname)
    assert txname not in [p.name for p in await call(mode, db, adb, "prepared")]


# -- killed inside fn, before PREPARE -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_inside_fn_leaves_nothing(
    url: str, db: twophase.Database, table: str, txname: str, spawn: Any, mode: str
) -> None:
    child = spawn(url, txname, table, mode, "in_fn")
    sid = int(child.wait_for("IN_FN").split()[1])
    child.sigkill()

    # The server aborts a dead client's open transaction once it notices the disconnect;
    # until then the session (and its locks) may linger, so wait for it to go.
    rawdb.poll(
        lambda: not rawdb.session_alive(url, sid), what=f"session {sid} of the killed child to end"
    )
    assert txname not in rawdb.prepared_names(url)
    assert txname not in [p.name for p in db.prepared()]
    assert db.status(txname) is Status.UNKNOWN
    assert row_ids(url, table) == []
    with pytest.raises(twophase.UnknownTransaction):
        db.commit_distributed(txname)
    with pytest.raises(twophase.UnknownTransaction):
        db.rollback_distributed(txname)
    assert db.status(txname) is Status.UNKNOWN

    # The dead session's claim on the name went with its transaction: the name is free.
    db.begin_distributed(
        txname, lambda tx: tx.insert_into(table).values(id=1, status="again").execute()
    )
    assert db.status(txname) is Status.PREPARED
    db.rollback_distributed(txname)
    assert db.status(txname) is Status.ROLLED_BACK
    assert row_ids(url, table) == []


# -- database restart while prepared ----------------------------------------------------------


@pytest.fixture
def raw_table(url: str) -> Iterator[str]:
    """A table made with the driver directly: its teardown must not depend on how twophase
    reconnects after the restart under test."""
    name = f"tp_crash_{uuid.uuid4().hex[:10]}"
    rawdb.create_table(url, name, "id int PRIMARY KEY, status varchar(32)")
    yield name
    _ensure_up(url)
    rawdb.drop_table(url, name)


def _restart(url: str) -> None:
    if rawdb.is_pg(url):
        rawdb.restart_postgres(url)
    else:
        rawdb.restart_mariadb(url)


def _ensure_up(url: str) -> None:
    if rawdb.is_pg(url):
        rawdb.ensure_postgres(url)
    else:
        rawdb.ensure_mariadb(url)


@pytest.mark.restart
@pytest.mark.parametrize(
    ("finish", "mode"),
    # Commit through the sync API, rollback through the async one: both reconnect.
    [("commit", "sync"), ("rollback", "async")],
)
async def test_prepared_survives_database_restart(
    url: str, raw_table: str, txname: str, spawn: Any, finish: str, mode: str
) -> None:
    table = raw_table
    # Both made before the restart; the status() calls below leave pooled connections
    # behind, which the restart kills, so finishing proves the automatic reconnect.
    db = twophase.connect(url, retry_timeout=30.0)
    adb = await twophase.connect_async(url, retry_timeout=30.0)
    try:
        child = spawn(url, txname, table, mode, "prepare")
        child.wait_for("PREPARED")
        child.sigkill()
        assert await call(mode, db, adb, "status", txname) is Status.PREPARED

        try:
            _restart(url)
        finally:
            _ensure_up(url)

        # The server kept the prepared transaction through its restart.
        assert txname in rawdb.prepared_names(url)
        assert row_ids(url, table) == []

        await call(mode, db, adb, f"{finish}_distributed", txname)

        assert txname not in rawdb.prepared_names(url)
        if finish == "commit":
            assert rawdb.query(url, f"SELECT id, status FROM {table}") == [
                {"id": 1, "status": "staged"}
            ]
            assert await call(mode, db, adb, "status", txname) is Status.COMMITTED
        else:
            assert row_ids(url, table) == []
            assert await call(mode, db, adb, "status", txname) is Status.ROLLED_BACK
    finally:
        _ensure_up(url)
        if txname in rawdb.prepared_names(url):
            # A failed test must not leave a prepared transaction holding locks on the table.
            db.rollback_distributed(txname)
        db.close()
        await adb.close()


# -- library bugs found here ------------------------------------------------------------------


@pytest.mark.parametrize("dialect_name", ["mysql"])
async def test_async_mariadb_rollback_is_clean_under_warnings_as_errors(
    adb: twophase.AsyncDatabase, txname: str
) -> None:
    async def stage(tx: twophase.AsyncTransaction) -> None:
        pass

    await adb.begin_distributed(txname, stage)
    with warnings.catch_warnings():
        # Many projects run their tests with -W error; a library statement must not warn.
        warnings.simplefilter("error")
        await adb.rollback_distributed(txname)
    assert await adb.status(txname) is Status.ROLLED_BACK
