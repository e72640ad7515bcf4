"""The query builder against the real databases, through a Database and inside a transaction.

test_sql_compile.py checks the SQL text; this file checks what the servers do with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

import twophase

# Values that break naive string splicing; they must come back byte for byte.
AWKWARD = [
    "O'Reilly",
    'say "hi"',
    "back\\slash",
    "trailing\\",
    "'; DROP TABLE x; --",
    "100% %s %(x)s",
    "ünïcødé ✓ 🎉",
    "tab\tnew\nline",
    "`backtick`",
    "$$dollar$$",
]

SEED_ROWS = [
    {"id": 1, "status": "pending"},
    {"id": 2, "status": "done"},
    {"id": 3, "status": "pending"},
    {"id": 4, "status": None},
    {"id": 5, "status": "failed"},
]


@pytest.fixture(params=["db", "tx"])
def q(request: pytest.FixtureRequest, db: twophase.Database, table: str) -> Iterator[Any]:
    """Where the builder runs: the Database (autocommit) or an open transaction.

    Depends on ``table`` so the transaction ends before the table is dropped.
    """
    if request.param == "db":
        yield db
    else:
        with db.transaction() as tx:
            yield tx


@pytest.fixture
def seeded(q: Any, table: str) -> str:
    q.insert_into(table).values(SEED_ROWS).execute()
    return table


def ids(rows: list[dict[str, Any]]) -> list[int]:
    return [r["id"] for r in rows]


# -- insert ----------------------------------------------------------------------------


def test_insert_with_returning(q, table):
    rows = q.insert_into(table).values(id=1, status="new").returning("id", "status").execute()
    assert rows == [{"id": 1, "status": "new"}]
    assert rows.rowcount == 1
    star = q.insert_into(table).values({"id": 2, "status": "dict"}).returning().execute()
    assert star == [{"id": 2, "status": "dict"}]
    assert q.select_from(table).order_by("id").execute() == [
        {"id": 1, "status": "new"},
        {"id": 2, "status": "dict"},
    ]


def test_insert_without_returning(q, table):
    rows = q.insert_into(table).values(id=1, status="plain").execute()
    assert list(rows) == []
    assert rows.rowcount == 1
    assert q.select_from(table).execute() == [{"id": 1, "status": "plain"}]


def test_multi_row_insert(q, table):
    batch = [{"id": i, "status": f"s{i}"} for i in range(1, 4)]
    rows = q.insert_into(table).values(batch).values(id=4, status="s4").returning("id").execute()
    assert ids(rows) == [1, 2, 3, 4]
    assert rows.rowcount == 4
    assert q.select_from(table).order_by("id").execute() == [*batch, {"id": 4, "status": "s4"}]


def test_insert_or_ignore(q, table):
    assert q.insert_or_ignore(table).values(id=1, status="first").execute().rowcount == 1
    again = q.insert_or_ignore(table).values(id=1, status="second").execute()
    assert again.rowcount == 0
    mixed = q.insert_or_ignore(table).values(
        [{"id": 1, "status": "third"}, {"id": 2, "status": "new"}]
    )
    assert mixed.execute().rowcount == 1  # only the row without a conflict
    assert q.select_from(table).order_by("id").execute() == [
        {"id": 1, "status": "first"},
        {"id": 2, "status": "new"},
    ]


def test_plain_insert_conflict_is_integrity_error(db, table):
    db.insert_into(table).values(id=1, status="first").execute()
    with pytest.raises(twophase.IntegrityError):
        db.insert_into(table).values(id=1, status="second").execute()
    assert db.select_from(table).execute() == [{"id": 1, "status": "first"}]


# -- select and where ------------------------------------------------------------------


WHERE_CASES = [
    ((("status", "=", "pending"),), [1, 3]),
    (("status", "=", "pending"), [1, 3]),
    (({"status": "pending"},), [1, 3]),
    (({"status": "pending", "id": 3},), [3]),
    (("id", "!=", 1), [2, 3, 4, 5]),
    (("id", "<>", 1), [2, 3, 4, 5]),
    (("id", "<", 3), [1, 2]),
    (("id", "<=", 3), [1, 2, 3]),
    (("id", ">", 3), [4, 5]),
    (("id", ">=", 3), [3, 4, 5]),
    (("id", "in", [1, 4, 99]), [1, 4]),
    (("id", "IN", (2,)), [2]),
    (("id", "in", []), []),
    (("id", "not in", [1, 2]), [3, 4, 5]),
    (("id", "not in", []), [1, 2, 3, 4, 5]),
    (("status", "like", "pend%"), [1, 3]),
    (("status", "like", "%n_"), [1, 2, 3]),  # pendi-ng, do-ne
    (("status", "is", None), [4]),
    (("status", "is not", None), [1, 2, 3, 5]),
    (("status", "=", None), [4]),
    (("status", "!=", None), [1, 2, 3, 5]),
]


# One test walks all cases: a fresh seeded table per case would cost seconds.
def test_where_forms(q, seeded):
    for where, expected in WHERE_CASES:
        rows = q.select_from(seeded).where(*where).order_by("id").execute()
        assert ids(rows) == expected, where
        assert rows.rowcount == len(expected), where


def test_where_kwargs_and_chaining(q, seeded):
    assert ids(q.select_from(seeded).where(status="pending").order_by("id").execute()) == [1, 3]
    assert ids(q.select_from(seeded).where(status=None).execute()) == [4]
    chained = q.select_from(seeded).where(status="pending").where("id", ">", 1).execute()
    assert ids(chained) == [3]
    mixed = q.select_from(seeded).where(("id", "<", 5), status="pending").order_by("id")
    assert ids(mixed.execute()) == [1, 3]


def test_select_columns(q, seeded):
    rows = q.select_from(seeded).select("status").where(id=2).execute()
    assert rows == [{"status": "done"}]
    both = q.select_from(seeded).select("id", "status").where(id=2).execute()
    assert both == [{"id": 2, "status": "done"}]


def test_order_limit_offset(q, seeded):
    base = q.select_from(seeded).select("id")
    assert ids(base.order_by("id", "desc").execute()) == [5, 4, 3, 2, 1]
    assert ids(base.order_by("id").limit(2).execute()) == [1, 2]
    assert ids(base.order_by("id").limit(2).offset(2).execute()) == [3, 4]
    assert ids(base.order_by("id").offset(3).execute()) == [4, 5]  # offset alone
    assert ids(base.order_by("id").limit(0).execute()) == []
    by_status = base.where("status", "is not", None).order_by("status").order_by("id", "DESC")
    assert ids(by_status.execute()) == [2, 5, 3, 1]  # done, failed, pending (3 before 1)


def test_execute_take_first(q, seeded):
    assert q.select_from(seeded).where(id=3).execute_take_first() == {
        "id": 3,
        "status": "pending",
    }
    assert q.select_from(seeded).where(id=99).execute_take_first() is None
    first = q.select_from(seeded).order_by("id", "desc").execute_take_first()
    assert first == {"id": 5, "status": "failed"}


def test_builders_are_reusable(q, seeded):
    # A base query refined twice gives two independent queries.
    base = q.select_from(seeded).order_by("id")
    pending = base.where(status="pending")
    done = base.where(status="done")
    assert ids(pending.execute()) == [1, 3]
    assert ids(done.execute()) == [2]
    assert ids(base.execute()) == [1, 2, 3, 4, 5]


# -- update ----------------------------------------------------------------------------


def test_update(q, seeded):
    rows = q.update_table(seeded).set(status="archived").where(status="pending").execute()
    assert rows.rowcount == 2
    assert ids(q.select_from(seeded).where(status="archived").order_by("id").execute()) == [1, 3]
    assert q.update_table(seeded).set({"status": "x"}).where(id=99).execute().rowcount == 0


def test_update_returning(q, seeded, dialect_name):
    query = q.update_table(seeded).set(status="seen").where("id", "in", [1, 2]).returning("id")
    if dialect_name == "postgresql":
        rows = query.execute()
        assert sorted(ids(rows)) == [1, 2]
        assert rows.rowcount == 2
    else:
        # MariaDB has no UPDATE ... RETURNING: refused before anything is sent.
        with pytest.raises(twophase.InvalidQuery):
            query.execute()
    seen = q.select_from(seeded).where(status="seen").execute()
    assert sorted(ids(seen)) == ([1, 2] if dialect_name == "postgresql" else [])


def test_update_and_delete_need_where(q, seeded):
    with pytest.raises(twophase.InvalidQuery):
        q.update_table(seeded).set(status="all").execute()
    with pytest.raises(twophase.InvalidQuery):
        q.delete_from(seeded).execute()
    assert len(q.select_from(seeded).execute()) == 5
    assert q.update_table(seeded).set(status="all").all_rows().execute().rowcount == 5
    assert q.delete_from(seeded).all_rows().execute().rowcount == 5
    assert q.select_from(seeded).execute() == []


# -- delete ----------------------------------------------------------------------------


def test_delete_with_returning(q, seeded):
    rows = q.delete_from(seeded).where(status="pending").returning("id", "status").execute()
    assert sorted(ids(rows)) == [1, 3]
    assert all(r["status"] == "pending" for r in rows)
    assert rows.rowcount == 2
    assert ids(q.select_from(seeded).order_by("id").execute()) == [2, 4, 5]
    plain = q.delete_from(seeded).where("id", "in", [2, 4]).execute()
    assert plain.rowcount == 2
    assert ids(q.select_from(seeded).execute()) == [5]


# -- binding ---------------------------------------------------------------------------


def test_awkward_values_round_trip(q, table):
    for i, value in enumerate(AWKWARD):
        inserted = q.insert_into(table).values(id=i, status=value).returning("status").execute()
        assert inserted == [{"status": value}]
    rows = q.select_from(table).order_by("id").execute()
    assert [r["status"] for r in rows] == AWKWARD
    for i, value in enumerate(AWKWARD):
        # Found by the value itself: the comparison is bound too.
        assert ids(q.select_from(table).where(status=value).execute()) == [i]
    q.update_table(table).set(status=AWKWARD[0]).where("status", "in", AWKWARD[1:3]).execute()
    assert ids(q.select_from(table).where(status=AWKWARD[0]).order_by("id").execute()) == [0, 1, 2]


def test_like_metacharacters_in_values_are_data(q, table):
    q.insert_into(table).values(
        [{"id": 1, "status": "100%"}, {"id": 2, "status": "1000"}]
    ).execute()
    assert ids(q.select_from(table).where("status", "like", "100%").order_by("id").execute()) == [
        1,
        2,
    ]
    assert ids(q.select_from(table).where(status="100%").execute()) == [1]


def test_awkward_identifiers(db, txname):
    # Identifiers are quoted per dialect, and a % in them must survive placeholder parsing.
    quote = '"' if db.dialect.name == "postgresql" else "`"
    table = f"tp {quote}odd{quote} 50%_{txname}"
    column = f"select {quote}%s{quote}"
    ident = db.dialect.sql.quote_ident
    db.execute(f"CREATE TABLE {ident(table)} (id int PRIMARY KEY, {ident(column)} varchar(32))")
    try:
        db.insert_into(table).values({"id": 1, column: "a"}).execute()
        with db.transaction() as tx:
            tx.update_table(table).set({column: "b"}).where({column: "a"}).execute()
        rows = db.select_from(table).select("id", column).where(column, "like", "b%").execute()
        assert rows == [{"id": 1, column: "b"}]
        assert db.delete_from(table).where({column: "b"}).execute().rowcount == 1
        assert db.select_from(table).execute() == []
    finally:
        db.execute(f"DROP TABLE IF EXISTS {ident(table)}")


@pytest.mark.parametrize(
    "dialect_name",
    [
        "postgresql",
        "mysql",
    ],
)
def test_aware_datetime_keeps_its_instant(db, txname):
    table = f"tp_ts_{txname}"
    column = "timestamptz" if db.dialect.name == "postgresql" else "timestamp(6) NULL"
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, at {column})")
    try:
        paris_noon = datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=1)))
        db.insert_into(table).values(id=1, at=paris_noon).execute()
        row = db.select_from(table).execute_take_first()
        assert row is not None
        at = row["at"]
        # twophase reads MariaDB's naive TIMESTAMPs as UTC (it sets the session time zone).
        at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
        assert at == paris_noon  # the same instant: 11:00 UTC
    finally:
        db.execute(f"DROP TABLE IF EXISTS {table}")


# -- raw execute -----------------------------------------------------------------------


def test_raw_execute_with_params(q, table):
    done = q.execute(
        f"INSERT INTO {table} (id, status) VALUES (%s, %s), (%s, %s)", (1, "O'Reilly", 2, "b")
    )
    assert done.rowcount == 2
    rows = q.execute(f"SELECT id, status FROM {table} WHERE status = %s", ("O'Reilly",))
    assert rows == [{"id": 1, "status": "O'Reilly"}]
    named = q.execute(f"SELECT id FROM {table} WHERE id = %(id)s", {"id": 2})
    assert named == [{"id": 2}]
    listed = q.execute(f"SELECT id FROM {table} WHERE id > %s ORDER BY id", [0])
    assert ids(listed) == [1, 2]
    # Without params nothing is interpolated, so a literal % needs no doubling.
    assert q.execute("SELECT '100%' AS p") == [{"p": "100%"}]
    assert q.execute("SELECT %s AS p", ("50%",)) == [{"p": "50%"}]


def test_builder_inside_distributed_transaction(db, table, txname):
    def fn(tx: twophase.Transaction) -> list[int]:
        tx.insert_into(table).values([{"id": 1, "status": "a"}, {"id": 2, "status": "b"}]).execute()
        tx.update_table(table).set(status="c").where(id=2).execute()
        tx.delete_from(table).where(id=1).execute()
        return ids(tx.select_from(table).execute())

    assert db.begin_distributed(txname, fn) == [2]
    assert db.select_from(table).execute() == []
    db.commit_distributed(txname)
    assert db.select_from(table).execute() == [{"id": 2, "status": "c"}]


# -- async -----------------------------------------------------------------------------


async def test_async_builder(adb, table, dialect_name):
    rows = await adb.insert_into(table).values(SEED_ROWS).returning("id").execute()
    assert ids(rows) == [1, 2, 3, 4, 5]
    assert await adb.insert_or_ignore(table).values(id=1, status="x").execute() == []
    assert ids(await adb.select_from(table).where("id", "in", [2, 3]).order_by("id").execute()) == [
        2,
        3,
    ]
    async with adb.transaction() as tx:
        first = await tx.select_from(table).where(status=None).execute_take_first()
        assert first == {"id": 4, "status": None}
        changed = await tx.update_table(table).set(status="x").where(id=4).execute()
        assert changed.rowcount == 1
        gone = await tx.delete_from(table).where(id=5).returning("id").execute()
        assert ids(gone) == [5]
        raw = await tx.execute(f"SELECT status FROM {table} WHERE id = %s", (4,))
        assert raw == [{"status": "x"}]
    assert ids(await adb.select_from(table).order_by("id").execute()) == [1, 2, 3, 4]
    if dialect_name == "mysql":
        with pytest.raises(twophase.InvalidQuery):
            await adb.update_table(table).set(status="y").where(id=1).returning("id").execute()
