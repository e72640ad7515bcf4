"""The sync seed API against real PostgreSQL and MariaDB: outcomes, names, nesting, errors.

Every test checks what the database holds (rows, prepared transactions as the server itself
lists them, statuses), not merely that a call returned.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pymysql
import pytest
from procs import rawdb

import twophase
from twophase import Status

XA_FORMAT_ID = 29808  # "tp": the formatID of every XA branch twophase prepares


class Boom(Exception):
    """Raised by callbacks to make begin_distributed fail on purpose."""


# -- helpers ----------------------------------------------------------------------------


server_prepared = rawdb.prepared_names  # read from the server, not through twophase


def rows_of(db: twophase.Database, table: str) -> list[dict[str, Any]]:
    """The table's rows as a fresh autocommit connection sees them, by id."""
    return list(db.select_from(table).order_by("id").execute())


def stage(table: str, id_: int, status: str) -> Callable[[twophase.Transaction], None]:
    """A callback inserting one row."""

    def fn(tx: twophase.Transaction) -> None:
        tx.insert_into(table).values(id=id_, status=status).execute()

    return fn


def raise_boom(tx: object) -> None:
    raise Boom


def new_name() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


def finish_leftovers(db: twophase.Database, *names: str) -> None:
    """Roll back what a failed namespaced test left prepared (conftest only knows t_*)."""
    for name in names:
        if db.status(name) is Status.PREPARED:
            db.rollback_distributed(name)


# -- retry-safe outcomes, with status checked against the data --------------------------


def test_commit_twice_then_rollback_refused(db, url, table, txname):
    assert db.status(txname) is Status.UNKNOWN

    assert db.begin_distributed(txname, stage(table, 1, "staged")) is None
    assert db.status(txname) is Status.PREPARED
    assert txname in server_prepared(url)
    # Prepared data is durable but invisible to every other connection.
    assert rows_of(db, table) == []

    db.commit_distributed(txname)
    assert db.status(txname) is Status.COMMITTED
    assert rows_of(db, table) == [{"id": 1, "status": "staged"}]
    assert txname not in server_prepared(url)

    db.commit_distributed(txname)  # a retried commit returns normally and changes nothing
    assert db.status(txname) is Status.COMMITTED
    assert rows_of(db, table) == [{"id": 1, "status": "staged"}]

    with pytest.raises(twophase.TransactionCommitted):
        db.rollback_distributed(txname)
    assert db.status(txname) is Status.COMMITTED
    assert rows_of(db, table) == [{"id": 1, "status": "staged"}]


def test_rollback_twice_then_commit_refused(db, url, table, txname):
    db.begin_distributed(txname, stage(table, 1, "staged"))
    assert db.status(txname) is Status.PREPARED

    db.rollback_distributed(txname)
    assert db.status(txname) is Status.ROLLED_BACK
    assert rows_of(db, table) == []
    assert txname not in server_prepared(url)

    db.rollback_distributed(txname)  # retry
    assert db.status(txname) is Status.ROLLED_BACK

    with pytest.raises(twophase.TransactionRolledBack):
        db.commit_distributed(txname)
    assert db.status(txname) is Status.ROLLED_BACK
    assert rows_of(db, table) == []


def test_unknown_names(db, txname):
    with pytest.raises(twophase.UnknownTransaction):
        db.commit_distributed(txname)
    with pytest.raises(twophase.UnknownTransaction):
        db.rollback_distributed(txname)
    # A refused rollback must not leave a tombstone behind: the name stays unknown...
    assert db.status(txname) is Status.UNKNOWN
    with pytest.raises(twophase.UnknownTransaction):
        db.commit_distributed(txname)
    # ...and free to use.
    assert db.begin_distributed(txname, lambda tx: "ok") == "ok"
    db.commit_distributed(txname)
    assert db.status(txname) is Status.COMMITTED


def test_commit_from_another_database_object(url, table, txname):
    # Prepared work is finished by whoever reaches the database, not by the stager.
    with twophase.connect(url) as stager:
        stager.begin_distributed(txname, stage(table, 7, "staged"))
    with twophase.connect(url) as finisher:
        assert finisher.status(txname) is Status.PREPARED
        finisher.commit_distributed(txname)
        assert rows_of(finisher, table) == [{"id": 7, "status": "staged"}]


# -- a failing callback ----------------------------------------------------------------


def test_failing_callback_leaves_nothing(db, url, table, txname):
    seen_inside: list[list[dict[str, Any]]] = []

    def fn(tx: twophase.Transaction) -> None:
        tx.insert_into(table).values(id=1, status="doomed").execute()
        seen_inside.append(list(tx.select_from(table).execute()))
        raise Boom

    with pytest.raises(Boom):
        db.begin_distributed(txname, fn)

    assert seen_inside == [[{"id": 1, "status": "doomed"}]]  # the insert did run
    assert txname not in server_prepared(url)
    assert txname not in {p.name for p in db.prepared()}
    assert rows_of(db, table) == []
    # A failed begin counts as rolled back, so the seed's catch-block rollback is fine.
    assert db.status(txname) is Status.ROLLED_BACK
    db.rollback_distributed(txname)
    with pytest.raises(twophase.TransactionRolledBack):
        db.commit_distributed(txname)


def test_failing_context_manager_leaves_nothing(db, url, table, txname):
    with pytest.raises(Boom), db.distributed(txname) as tx:
        tx.insert_into(table).values(id=1, status="doomed").execute()
        raise Boom

    assert txname not in server_prepared(url)
    assert rows_of(db, table) == []
    assert db.status(txname) is Status.ROLLED_BACK
    db.rollback_distributed(txname)


def test_context_manager_prepares(db, url, table, txname):
    with db.distributed(txname) as tx:
        assert tx.name == txname
        assert tx.is_distributed
        tx.insert_into(table).values(id=3, status="cm").execute()
    assert txname in server_prepared(url)
    assert rows_of(db, table) == []
    db.commit_distributed(txname)
    assert rows_of(db, table) == [{"id": 3, "status": "cm"}]


def test_failed_begin_counts_as_rolled_back_with_one_connection(url, table, txname):
    # Regression: the rollback record was written on a second pooled connection, so with a
    # single connection the failed begin waited out the pool timeout and stayed "unknown".
    with twophase.connect(url, pool_max=1, timeout=3, retry_timeout=3) as db:
        started = time.monotonic()
        with pytest.raises(Boom):
            db.begin_distributed(txname, raise_boom)
        assert time.monotonic() - started < 2.5  # did not wait for a second connection
        assert db.status(txname) is Status.ROLLED_BACK
        db.rollback_distributed(txname)


def test_return_value_is_passed_through(db, url, table, txname):
    def fn(tx: twophase.Transaction) -> dict[str, Any]:
        inserted = tx.insert_into(table).values(id=5, status="x").execute()
        return {"answer": 42, "rowcount": inserted.rowcount}

    assert db.begin_distributed(txname, fn) == {"answer": 42, "rowcount": 1}
    db.commit_distributed(txname)
    assert rows_of(db, table) == [{"id": 5, "status": "x"}]


# -- names -----------------------------------------------------------------------------


def test_name_in_use_after_commit(db, table, txname):
    db.begin_distributed(txname, stage(table, 1, "first"))
    db.commit_distributed(txname)

    ran = []
    with pytest.raises(twophase.TransactionNameInUse):
        db.begin_distributed(txname, lambda tx: ran.append(tx))
    assert ran == []  # the name is claimed before the callback runs
    assert db.status(txname) is Status.COMMITTED
    assert rows_of(db, table) == [{"id": 1, "status": "first"}]


def test_name_in_use_while_prepared(db, url, table, txname):
    db.begin_distributed(txname, stage(table, 1, "first"))
    with pytest.raises(twophase.TransactionNameInUse):
        db.begin_distributed(txname, stage(table, 2, "second"))
    # The refused second begin must not disturb the prepared first one.
    assert txname in server_prepared(url)
    assert db.status(txname) is Status.PREPARED
    db.commit_distributed(txname)
    assert rows_of(db, table) == [{"id": 1, "status": "first"}]


def test_name_in_use_while_active(db, table, txname):
    inside = threading.Event()
    release = threading.Event()
    outcome: list[object] = []

    def slow(tx: twophase.Transaction) -> None:
        tx.insert_into(table).values(id=1, status="first").execute()
        inside.set()
        release.wait(10)

    def first() -> None:
        try:
            outcome.append(db.begin_distributed(txname, slow))
        except Exception as exc:  # reported through `outcome`
            outcome.append(exc)

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert inside.wait(10)
        with pytest.raises(twophase.TransactionNameInUse):
            db.begin_distributed(txname, stage(table, 2, "second"))
        # Not prepared yet, so there is nothing to finish; asking must not disturb it.
        assert db.status(txname) is Status.UNKNOWN
        with pytest.raises(twophase.UnknownTransaction):
            db.commit_distributed(txname)
        with pytest.raises(twophase.UnknownTransaction):
            db.rollback_distributed(txname)
    finally:
        release.set()
        worker.join(15)
    assert outcome == [None]
    db.commit_distributed(txname)
    assert rows_of(db, table) == [{"id": 1, "status": "first"}]


def test_racing_threads_one_name_exactly_one_wins(db, table, txname):
    n = 6
    barrier = threading.Barrier(n)

    def attempt(i: int) -> str:
        barrier.wait(10)
        try:
            db.begin_distributed(txname, stage(table, i, f"racer{i}"))
        except twophase.TransactionNameInUse:
            return "lost"
        return "won"

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(attempt, range(n)))
    assert sorted(results) == ["lost"] * (n - 1) + ["won"]
    db.commit_distributed(txname)
    winner = results.index("won")
    assert rows_of(db, table) == [{"id": winner, "status": f"racer{winner}"}]


def test_name_reusable_after_rollback(db, table, txname):
    db.begin_distributed(txname, stage(table, 1, "first"))
    db.rollback_distributed(txname)

    db.begin_distributed(txname, stage(table, 2, "second"))
    assert db.status(txname) is Status.PREPARED
    db.commit_distributed(txname)
    assert db.status(txname) is Status.COMMITTED
    assert rows_of(db, table) == [{"id": 2, "status": "second"}]
    with pytest.raises(twophase.TransactionCommitted):
        db.rollback_distributed(txname)


def test_name_reusable_after_failed_begin(db, table, txname):
    with pytest.raises(Boom), db.distributed(txname):
        raise Boom
    db.begin_distributed(txname, stage(table, 1, "retry"))
    db.commit_distributed(txname)
    assert rows_of(db, table) == [{"id": 1, "status": "retry"}]


def test_names_are_case_sensitive(db, table, txname):
    upper, lower = f"{txname}_CASE", f"{txname}_case"
    db.begin_distributed(upper, stage(table, 1, "upper"))
    db.begin_distributed(lower, stage(table, 2, "lower"))
    db.commit_distributed(upper)
    db.rollback_distributed(lower)
    assert (db.status(upper), db.status(lower)) == (Status.COMMITTED, Status.ROLLED_BACK)
    assert rows_of(db, table) == [{"id": 1, "status": "upper"}]


INVALID_NAMES = ["", "has space", "semi;colon", "quote'", "naïve", "slash/", "x" * 65, None, 7]


def test_invalid_names_rejected_before_sql(db):
    ran = []
    for bad in INVALID_NAMES:
        with pytest.raises(twophase.InvalidTransactionName):
            db.begin_distributed(bad, lambda tx: ran.append(tx))
        with pytest.raises(twophase.InvalidTransactionName), db.distributed(bad):
            ran.append("cm")
        for call in (db.commit_distributed, db.rollback_distributed, db.status):
            with pytest.raises(twophase.InvalidTransactionName):
                call(bad)
    assert ran == []


def test_longest_name_round_trips(db, url, table):
    name = f"t_{uuid.uuid4().hex}.:-_" + "z" * 26
    assert len(name) == 64
    db.begin_distributed(name, stage(table, 1, "long"))
    assert name in server_prepared(url)
    assert name in {p.name for p in db.prepared()}
    db.commit_distributed(name)
    assert db.status(name) is Status.COMMITTED
    assert rows_of(db, table) == [{"id": 1, "status": "long"}]


# -- namespaces ------------------------------------------------------------------------


@pytest.fixture
def billing_and_shipping(url: str) -> Iterator[tuple[twophase.Database, twophase.Database]]:
    billing = twophase.connect(url, namespace="billing")
    shipping = twophase.connect(url, namespace="shipping")
    yield billing, shipping
    billing.close()
    shipping.close()


def test_namespaces_isolate(db, url, table, txname, billing_and_shipping):
    billing, shipping = billing_and_shipping
    try:
        billing.begin_distributed(txname, stage(table, 1, "billing"))
        # The same short name in another namespace is another transaction.
        shipping.begin_distributed(txname, stage(table, 2, "shipping"))
        assert {f"billing:{txname}", f"shipping:{txname}"} <= server_prepared(url)

        mine = [p for p in billing.prepared() if p.name == txname]
        assert [p.full_name for p in mine] == [f"billing:{txname}"]
        assert all(p.full_name.startswith("billing:") for p in billing.prepared())
        assert all(p.full_name == f"billing:{p.name}" for p in billing.prepared())
        assert all(p.full_name.startswith("shipping:") for p in shipping.prepared())
        # Without a namespace, names are taken as they are stored.
        assert db.status(txname) is Status.UNKNOWN
        assert db.status(f"billing:{txname}") is Status.PREPARED
        assert {f"billing:{txname}", f"shipping:{txname}"} <= {p.name for p in db.prepared()}

        billing.commit_distributed(txname)
        assert billing.status(txname) is Status.COMMITTED
        assert shipping.status(txname) is Status.PREPARED
        shipping.rollback_distributed(txname)
        assert shipping.status(txname) is Status.ROLLED_BACK
        assert rows_of(db, table) == [{"id": 1, "status": "billing"}]

        with pytest.raises(twophase.TransactionRolledBack):
            shipping.commit_distributed(txname)
        with pytest.raises(twophase.TransactionCommitted):
            billing.rollback_distributed(txname)
    finally:
        finish_leftovers(billing, txname)
        finish_leftovers(shipping, txname)


def test_namespaced_name_must_fit(url):
    with twophase.connect(url, namespace="billing") as billing:
        with pytest.raises(twophase.InvalidTransactionName):
            billing.status("x" * 60)  # "billing:" + 60 bytes > 64
        assert billing.status("x" * 56) is Status.UNKNOWN  # exactly 64 bytes in all


# -- prepared() ------------------------------------------------------------------------


def test_prepared_lists_name_time_and_age(db, table, txname):
    slack = timedelta(seconds=5)  # clocks of client and server are the same machine's
    second = new_name()
    before = datetime.now(UTC)
    db.begin_distributed(txname, stage(table, 1, "a"))
    db.begin_distributed(second, stage(table, 2, "b"))
    after = datetime.now(UTC)
    try:
        listed = [p for p in db.prepared() if p.name in (txname, second)]
        assert [p.name for p in listed] == [txname, second]  # oldest first
        for p in listed:
            assert isinstance(p, twophase.PreparedTransaction)
            assert p.full_name == p.name
            assert p.database == "test"
            assert p.prepared_at is not None
            assert p.prepared_at.utcoffset() is not None  # timezone-aware
            assert before - slack <= p.prepared_at <= after + slack
            assert p.age is not None
            assert -slack <= p.age <= timedelta(seconds=60)
        assert listed[0].prepared_at <= listed[1].prepared_at
    finally:
        db.commit_distributed(txname)
        db.rollback_distributed(second)
    assert not {txname, second} & {p.name for p in db.prepared()}
    assert rows_of(db, table) == [{"id": 1, "status": "a"}]


# -- nesting ---------------------------------------------------------------------------


def _enter(cm: AbstractContextManager[Any]) -> None:
    with cm:
        pytest.fail("a nested transaction was opened")


def _never(tx: object) -> None:
    pytest.fail("a nested callback ran")


# (what is tried inside the outer transaction) -> callable(db, other_db, tx, inner_name)
NESTED: dict[str, Callable[..., object]] = {
    "db.transaction": lambda db, other, tx, n: _enter(db.transaction()),
    "db.distributed": lambda db, other, tx, n: _enter(db.distributed(n)),
    "db.begin_distributed": lambda db, other, tx, n: db.begin_distributed(n, _never),
    "other_db.begin_distributed": lambda db, other, tx, n: other.begin_distributed(n, _never),
    "other_db.transaction": lambda db, other, tx, n: _enter(other.transaction()),
    "tx.savepoint": lambda db, other, tx, n: tx.savepoint(),
    "tx.transaction": lambda db, other, tx, n: tx.transaction(),
    "tx.distributed": lambda db, other, tx, n: tx.distributed(n),
    "tx.begin_distributed": lambda db, other, tx, n: tx.begin_distributed(n, _never),
    "SAVEPOINT": lambda db, other, tx, n: tx.execute("SAVEPOINT sp1"),
    "RELEASE": lambda db, other, tx, n: tx.execute("RELEASE SAVEPOINT sp1"),
    "COMMIT": lambda db, other, tx, n: tx.execute("COMMIT"),
    "commit lower case": lambda db, other, tx, n: tx.execute("commit"),
    "ROLLBACK": lambda db, other, tx, n: tx.execute("ROLLBACK"),
    "BEGIN": lambda db, other, tx, n: tx.execute("BEGIN"),
    "START TRANSACTION": lambda db, other, tx, n: tx.execute("START TRANSACTION"),
    "XA END": lambda db, other, tx, n: tx.execute("XA END 'x'"),
    "XA COMMIT": lambda db, other, tx, n: tx.execute("XA COMMIT 'x'"),
    "PREPARE TRANSACTION": lambda db, other, tx, n: tx.execute("PREPARE TRANSACTION 'x'"),
    "COMMIT after SELECT": lambda db, other, tx, n: tx.execute("SELECT 1; COMMIT"),
    "COMMIT after comment": lambda db, other, tx, n: tx.execute("/* hi */ COMMIT"),
    "db.execute COMMIT": lambda db, other, tx, n: db.execute("COMMIT"),
}


# One test per dialect walks every attempt: a fresh table per attempt would cost seconds.
def test_nesting_in_distributed_refused(db, url, table):
    with twophase.connect(url, pool_max=2) as other:
        for attempt, action in NESTED.items():
            outer, inner = new_name(), new_name()

            def fn(tx: twophase.Transaction, action=action, inner=inner) -> None:
                tx.insert_into(table).values(id=1, status="outer").execute()
                action(db, other, tx, inner)

            with pytest.raises(twophase.NestedTransactionError):
                db.begin_distributed(outer, fn)
                pytest.fail(f"{attempt} was not refused")
            # The error propagated out of fn, so the outer transaction was rolled back.
            assert not {outer, inner} & server_prepared(url), attempt
            assert rows_of(db, table) == [], attempt
            assert db.status(outer) is Status.ROLLED_BACK, attempt
            assert other.status(inner) is Status.UNKNOWN, attempt


ORDINARY_NESTED = [
    "db.transaction", "db.distributed", "db.begin_distributed", "other_db.begin_distributed",
    "other_db.transaction", "tx.savepoint", "tx.transaction", "SAVEPOINT", "COMMIT", "BEGIN",
    "XA END", "PREPARE TRANSACTION",
]  # fmt: skip


def test_nesting_in_ordinary_transaction_refused(db, url, table):
    with twophase.connect(url, pool_max=2) as other:
        for attempt in ORDINARY_NESTED:
            inner = new_name()
            with pytest.raises(twophase.NestedTransactionError), db.transaction() as tx:
                tx.insert_into(table).values(id=1, status="outer").execute()
                NESTED[attempt](db, other, tx, inner)
                pytest.fail(f"{attempt} was not refused")
            assert rows_of(db, table) == [], attempt
            assert inner not in server_prepared(url), attempt
            assert other.status(inner) is Status.UNKNOWN, attempt


def test_caught_refusal_keeps_transaction_usable(db, table, txname):
    # A refusal happens before the server sees the statement, so the transaction is intact.
    def fn(tx: twophase.Transaction) -> None:
        tx.insert_into(table).values(id=1, status="kept").execute()
        with pytest.raises(twophase.NestedTransactionError):
            tx.execute("COMMIT")
        tx.insert_into(table).values(id=2, status="kept").execute()

    db.begin_distributed(txname, fn)
    assert rows_of(db, table) == []
    db.commit_distributed(txname)
    assert [r["id"] for r in rows_of(db, table)] == [1, 2]


@pytest.mark.parametrize(
    "sql",
    ["BEGIN", "COMMIT", "ROLLBACK", "START TRANSACTION", "SAVEPOINT a", "XA START 'x'",
     "PREPARE TRANSACTION 'x'", "COMMIT PREPARED 'x'", "SELECT 1; BEGIN"],
)  # fmt: skip
def test_transaction_control_through_db_execute_refused(db, sql):
    with pytest.raises(twophase.NestedTransactionError):
        db.execute(sql)
    # Nothing was left open: an ordinary statement still runs in autocommit.
    assert db.execute("SELECT 1 AS one") == [{"one": 1}]


def test_control_words_inside_literals_are_allowed(db):
    assert db.execute("SELECT 'BEGIN; COMMIT' AS s") == [{"s": "BEGIN; COMMIT"}]
    assert db.execute("SELECT %s AS s", ("ROLLBACK",)) == [{"s": "ROLLBACK"}]


# -- errors ----------------------------------------------------------------------------


def test_caught_statement_error_inside_fn(db, url, dialect_name, table, txname):
    def fn(tx: twophase.Transaction) -> str:
        tx.insert_into(table).values(id=1, status="first").execute()
        with pytest.raises(twophase.IntegrityError):
            tx.insert_into(table).values(id=1, status="dup").execute()
        return "swallowed"

    if dialect_name == "postgresql":
        # The failed statement aborted the whole transaction; preparing it would silently
        # roll it back, so begin_distributed must say so instead of returning.
        with pytest.raises(twophase.DatabaseError) as info:
            db.begin_distributed(txname, fn)
        assert not isinstance(info.value, twophase.IntegrityError)
        assert txname not in server_prepared(url)
        assert rows_of(db, table) == []
        assert db.status(txname) is Status.ROLLED_BACK
        db.rollback_distributed(txname)
    else:
        # MariaDB rolls back only the failed statement; the transaction goes on.
        assert db.begin_distributed(txname, fn) == "swallowed"
        db.commit_distributed(txname)
        assert rows_of(db, table) == [{"id": 1, "status": "first"}]


def _driver_error(dialect_name: str) -> type[Exception]:
    return psycopg.Error if dialect_name == "postgresql" else pymysql.MySQLError


def test_user_sql_errors_are_translated(db, dialect_name, table):
    db.insert_into(table).values(id=1, status="a").execute()

    with pytest.raises(twophase.IntegrityError) as dup:
        db.insert_into(table).values(id=1, status="b").execute()
    assert isinstance(dup.value.__cause__, _driver_error(dialect_name))

    with pytest.raises(twophase.IntegrityError) as null:
        db.execute(f"INSERT INTO {table} (id, status) VALUES (%s, %s)", (None, "x"))
    assert isinstance(null.value.__cause__, _driver_error(dialect_name))

    with pytest.raises(twophase.DatabaseError) as missing:
        db.execute("SELECT * FROM tp_no_such_table_anywhere")
    assert not isinstance(missing.value, twophase.IntegrityError)
    assert isinstance(missing.value.__cause__, _driver_error(dialect_name))

    with pytest.raises(twophase.DatabaseError) as syntax:
        db.execute("SELEC 1")
    assert isinstance(syntax.value.__cause__, _driver_error(dialect_name))
    assert rows_of(db, table) == [{"id": 1, "status": "a"}]


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_sqlstate_on_postgresql(db, table):
    db.insert_into(table).values(id=1, status="a").execute()
    with pytest.raises(twophase.IntegrityError) as dup:
        db.insert_into(table).values(id=1, status="b").execute()
    assert dup.value.sqlstate == "23505"
    with pytest.raises(twophase.DatabaseError) as missing:
        db.execute("SELECT * FROM tp_no_such_table_anywhere")
    assert missing.value.sqlstate == "42P01"


@pytest.mark.parametrize("dialect_name", ["mysql"])
def test_sqlstate_on_mariadb_is_the_error_number(db, table):
    db.insert_into(table).values(id=1, status="a").execute()
    with pytest.raises(twophase.IntegrityError) as dup:
        db.insert_into(table).values(id=1, status="b").execute()
    assert dup.value.sqlstate == "1062"


def test_integrity_error_inside_distributed(db, url, dialect_name, table, txname):
    db.insert_into(table).values(id=1, status="existing").execute()
    with pytest.raises(twophase.IntegrityError) as info:
        db.begin_distributed(txname, stage(table, 1, "clash"))
    assert isinstance(info.value.__cause__, _driver_error(dialect_name))
    assert txname not in server_prepared(url)
    assert rows_of(db, table) == [{"id": 1, "status": "existing"}]
    db.rollback_distributed(txname)  # the failed begin counts as rolled back


# -- ordinary transactions -------------------------------------------------------------


def test_transaction_commits_on_success(db, table):
    with db.transaction() as tx:
        assert tx.name is None
        assert not tx.is_distributed
        tx.insert_into(table).values(id=1, status="a").execute()
        tx.execute(f"INSERT INTO {table} (id, status) VALUES (%s, %s)", (2, "b"))
        assert len(tx.select_from(table).execute()) == 2  # own writes visible inside
        assert rows_of(db, table) == []  # not yet to others
    assert rows_of(db, table) == [{"id": 1, "status": "a"}, {"id": 2, "status": "b"}]


def test_transaction_rolls_back_on_exception(db, table):
    db.insert_into(table).values(id=1, status="before").execute()
    with pytest.raises(Boom), db.transaction() as tx:
        tx.update_table(table).set(status="changed").where(id=1).execute()
        tx.insert_into(table).values(id=2, status="new").execute()
        raise Boom
    assert rows_of(db, table) == [{"id": 1, "status": "before"}]


@pytest.mark.parametrize(
    "dialect_name",
    [
        "postgresql",
        "mysql",
    ],
)
def test_transaction_rolls_back_despite_ddl(db, table):
    extra = f"{table}_ddl"
    try:
        with pytest.raises((Boom, twophase.NestedTransactionError)), db.transaction() as tx:
            tx.insert_into(table).values(id=1, status="undo me").execute()
            tx.execute(f"CREATE TABLE {extra} (id int)")
            raise Boom
        # Whether the DDL was refused or run, the block failed, so its insert must be gone.
        assert rows_of(db, table) == []
    finally:
        db.execute(f"DROP TABLE IF EXISTS {extra}")


def test_transaction_with_failed_statement_rolls_back(db, table):
    with pytest.raises(twophase.IntegrityError), db.transaction() as tx:
        tx.insert_into(table).values(id=1, status="a").execute()
        tx.insert_into(table).values(id=1, status="a").execute()
    assert rows_of(db, table) == []


@pytest.mark.parametrize("kind", ["transaction", "distributed", "failed distributed"])
def test_tx_unusable_after_its_block(db, table, txname, kind):
    kept: list[twophase.Transaction] = []
    if kind == "transaction":
        with db.transaction() as tx:
            kept.append(tx)
    elif kind == "distributed":
        with db.distributed(txname) as tx:
            kept.append(tx)
    else:
        with pytest.raises(Boom), db.distributed(txname) as tx:
            kept.append(tx)
            raise Boom
    (tx,) = kept
    with pytest.raises(twophase.InvalidQuery):
        tx.execute("SELECT 1")
    with pytest.raises(twophase.InvalidQuery):
        tx.insert_into(table).values(id=1, status="late").execute()
    with pytest.raises(twophase.InvalidQuery):
        tx.select_from(table).execute_take_first()
    if kind == "distributed":
        db.commit_distributed(txname)
    assert rows_of(db, table) == []


# -- concurrency -----------------------------------------------------------------------


def test_twenty_threads_begin_and_commit(url, table):
    names = [new_name() for _ in range(20)]
    barrier = threading.Barrier(len(names))
    # A fresh Database, so the threads also race to create the outcome table's handle.
    with twophase.connect(url) as db:

        def work(i: int) -> int:
            barrier.wait(10)
            db.begin_distributed(names[i], stage(table, i, f"thread{i}"))
            db.commit_distributed(names[i])
            return i

        with ThreadPoolExecutor(len(names)) as pool:
            done = list(pool.map(work, range(len(names))))

        assert done == list(range(20))
        assert rows_of(db, table) == [{"id": i, "status": f"thread{i}"} for i in range(20)]
        assert {db.status(n) for n in names} == {Status.COMMITTED}
        assert not set(names) & server_prepared(url)


# -- retention of outcome records ---------------------------------------------------------------


def test_prune_outcomes_forgets_finished_names_and_never_a_prepared_one(dialect_name):
    """Old records of committed and rolled-back names go, in several key-ordered pages;
    prepared transactions (one of them a name begun again after its rollback) are neither
    deleted nor waited for, and finish normally afterwards."""
    from procs.outbox_env import isolated_database

    from twophase import Policy, Rule
    from twophase.errors import PermissionDenied, UnknownTransaction
    from twophase.observe import Event, Outcome, Step

    with isolated_database(dialect_name) as scratch:
        seen: list[Event] = []
        policy = Policy(
            [
                Rule(principals=["dba"], actions=["prune"], names=["*"]),
                Rule(principals=["dba"], actions=["begin", "commit", "rollback"], names=["*"]),
            ]
        )
        db = twophase.connect(scratch, observers=[seen.append], policy=policy)
        try:
            with twophase.context(principal="dba"):
                committed = [f"done-{i}" for i in range(7)]
                for name in committed:
                    db.begin_distributed(name, lambda tx: tx.execute("SELECT 1"))
                    db.commit_distributed(name)
                db.begin_distributed("undone", lambda tx: tx.execute("SELECT 1"))
                db.rollback_distributed("undone")  # a tombstone
                db.begin_distributed("again", lambda tx: tx.execute("SELECT 1"))
                db.rollback_distributed("again")
                db.begin_distributed("again", lambda tx: tx.execute("SELECT 1"))  # prepared
                db.begin_distributed("pending", lambda tx: tx.execute("SELECT 1"))  # prepared
                time.sleep(0.05)
                window = timedelta(milliseconds=10)

                assert db.prune_outcomes(window, dry_run=True) == 9
                assert db.status("done-0") is Status.COMMITTED  # a dry run deletes nothing
                started = time.monotonic()
                assert db.prune_outcomes(window, batch=3) == 9
                assert time.monotonic() - started < 5  # waited for no prepared record
                assert db.prune_outcomes(window) == 0

                assert db.status("done-0") is Status.UNKNOWN
                with pytest.raises(UnknownTransaction):
                    db.commit_distributed("done-0")  # the retry window is over
                assert db.status("undone") is Status.UNKNOWN
                assert db.status("again") is Status.PREPARED
                assert db.status("pending") is Status.PREPARED
                db.commit_distributed("again")
                db.rollback_distributed("pending")
                assert db.status("again") is Status.COMMITTED
                assert db.status("pending") is Status.ROLLED_BACK
                # A forgotten name can be begun again.
                db.begin_distributed("done-0", lambda tx: tx.execute("SELECT 1"))
                db.commit_distributed("done-0")
                assert db.status("done-0") is Status.COMMITTED
                assert db.prepared() == []

            with pytest.raises(PermissionDenied), twophase.context(principal="intern"):
                db.prune_outcomes(timedelta(days=1))
            for bad in ({"older_than": timedelta(0)}, {"older_than": 30}):
                with pytest.raises(ValueError, match="older_than"):
                    db.prune_outcomes(**bad)
            with pytest.raises(ValueError, match="batch"):
                db.prune_outcomes(timedelta(days=1), batch=0)
        finally:
            for name in ("again", "pending"):
                if db.status(name) is Status.PREPARED:
                    db.rollback_distributed(name)
            db.close()
    prunes = [(e.outcome, e.principal, e.detail or "") for e in seen if e.step is Step.PRUNE]
    assert [(o, p) for o, p, _ in prunes] == [
        (Outcome.OK, "dba"),
        (Outcome.OK, "dba"),
        (Outcome.DENIED, "intern"),
    ]
    assert prunes[0][2].startswith("9 outcome records older than")


async def test_prune_outcomes_async(dialect_name):
    from procs.outbox_env import isolated_database

    with isolated_database(dialect_name) as scratch:
        db = await twophase.connect_async(scratch)
        try:
            await db.begin_distributed("old", lambda tx: tx.execute("SELECT 1"))
            await db.commit_distributed("old")
            await asyncio.sleep(0.05)
            window = timedelta(milliseconds=10)
            assert await db.prune_outcomes(window, dry_run=True) == 1
            assert await db.prune_outcomes(window) == 1
            assert await db.status("old") is Status.UNKNOWN
        finally:
            await db.close()


def test_prune_outcomes_never_waits_for_a_prepared_record_among_many(dialect_name):
    """20,000 old records in the pages before and after a prepared transaction's: MariaDB
    locks one record past any key range it scans, so deleting old records by range would
    wait for the prepared one; by whole key it does not."""
    from procs.outbox_env import isolated_database

    with isolated_database(dialect_name) as scratch, twophase.connect(scratch) as db:
        db.status("probe")  # creates the outcome table
        if dialect_name == "postgresql":
            db.execute(
                "INSERT INTO twophase_outcome (name, outcome, recorded_at) "
                "SELECT 'm-' || lpad(g::text, 6, '0'), 'committed', now() - interval '40 days' "
                "FROM generate_series(1, 20000) g"
            )
        else:
            db.execute(
                "INSERT INTO twophase_outcome (name, outcome, recorded_at) "
                "SELECT CONCAT('m-', LPAD(seq, 6, '0')), 'committed', NOW(6) - INTERVAL 40 DAY "
                "FROM seq_1_to_20000"
            )
        # Sorts right after m-010000, inside a page of old records.
        db.begin_distributed("m-010000a", lambda tx: tx.execute("SELECT 1"))
        try:
            started = time.monotonic()
            assert db.prune_outcomes(timedelta(days=30), batch=5000) == 20000
            assert time.monotonic() - started < 30
            assert db.status("m-010000a") is Status.PREPARED
        finally:
            db.rollback_distributed("m-010000a")
