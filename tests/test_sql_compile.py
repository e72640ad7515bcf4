"""Pure unit tests of twophase.sql: builders -> nodes -> compiled SQL, per dialect (no I/O)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import twophase.sql as sql
from twophase.errors import InvalidQuery
from twophase.sql import (
    MYSQL,
    POSTGRES,
    Compiled,
    QueryMethods,
    Rows,
    Runner,
    SqlDialect,
    compile_query,
)
from twophase.sql.nodes import Comparison, SelectNode

SyncDb = QueryMethods[Rows, dict[str, Any] | None]


class FakeRunner:
    """Records every compiled query; returns canned results."""

    def __init__(self, dialect: SqlDialect) -> None:
        self.dialect = dialect
        self.calls: list[tuple[str, Compiled]] = []

    def run(self, query: Compiled) -> Rows:
        self.calls.append(("run", query))
        return Rows([{"id": 1}, {"id": 2}], rowcount=2)

    def run_first(self, query: Compiled) -> dict[str, Any] | None:
        self.calls.append(("run_first", query))
        return {"id": 1}


class FakeDb(QueryMethods[Rows, dict[str, Any] | None]):
    def __init__(self, dialect: SqlDialect) -> None:
        self.runner = FakeRunner(dialect)

    def _runner(self) -> Runner[Rows, dict[str, Any] | None]:
        return self.runner


class FakeAsyncRunner:
    def __init__(self, dialect: SqlDialect) -> None:
        self._dialect = dialect
        self.calls: list[Compiled] = []

    @property
    def dialect(self) -> SqlDialect:
        return self._dialect

    async def run(self, query: Compiled) -> Rows:
        self.calls.append(query)
        return Rows([], rowcount=3)

    async def run_first(self, query: Compiled) -> dict[str, Any] | None:
        self.calls.append(query)
        return None


class FakeAsyncDb(QueryMethods[Awaitable[Rows], Awaitable[dict[str, Any] | None]]):
    def __init__(self, dialect: SqlDialect) -> None:
        self.runner = FakeAsyncRunner(dialect)

    def _runner(self) -> Runner[Awaitable[Rows], Awaitable[dict[str, Any] | None]]:
        return self.runner


pg = FakeDb(POSTGRES)
my = FakeDb(MYSQL)

Build = Callable[[SyncDb], Any]


def check(build: Build, pg_sql: str, my_sql: str, params: tuple[Any, ...]) -> None:
    """Assert the exact SQL per dialect and the same params for both."""
    assert build(pg).compile() == Compiled(pg_sql, params)
    assert build(my).compile() == Compiled(my_sql, params)


# --- identifiers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ident", "pg_q", "my_q"),
    [
        ("accounts", '"accounts"', "`accounts`"),
        ('a"b', '"a""b"', '`a"b`'),
        ("a`b", '"a`b"', "`a``b`"),
        ('""', '""""""', '`""`'),
        ("public.accounts", '"public"."accounts"', "`public`.`accounts`"),
        ("*", "*", "*"),
        ("t.*", '"t".*', "`t`.*"),
        ("50%", '"50%"', "`50%`"),
        (" spaced name ", '" spaced name "', "` spaced name `"),
        ("ünïcode", '"ünïcode"', "`ünïcode`"),
    ],
)
def test_quote_ident(ident: str, pg_q: str, my_q: str) -> None:
    assert POSTGRES.quote_ident(ident) == pg_q
    assert MYSQL.quote_ident(ident) == my_q


@pytest.mark.parametrize("ident", ["a\x00b", "", "a..b", ".a", "a.", "*.a", "a.*.b", 3, None])
def test_quote_ident_rejects(ident: Any) -> None:
    for dialect in (POSTGRES, MYSQL):
        with pytest.raises(InvalidQuery):
            dialect.quote_ident(ident)


def test_nul_in_identifier_is_rejected_by_builders() -> None:
    with pytest.raises(InvalidQuery, match="NUL"):
        pg.select_from("a\x00b")
    with pytest.raises(InvalidQuery, match="NUL"):
        pg.select_from("t").where("a\x00", "=", 1)
    with pytest.raises(InvalidQuery, match="NUL"):
        pg.insert_into("t").values({"a\x00": 1})


def test_percent_in_identifiers_is_doubled_in_compiled_sql() -> None:
    check(
        lambda db: db.select_from("100%").select("a%b").where("c%", "=", "50%"),
        'SELECT "a%%b" FROM "100%%" WHERE "c%%" = %s',
        "SELECT `a%%b` FROM `100%%` WHERE `c%%` = %s",
        ("50%",),
    )
    # What both drivers do with the text once the parameters are bound:
    assert pg.select_from("100%").where(a=1).compile().sql % ("$1",) == (
        'SELECT * FROM "100%" WHERE "a" = $1'
    )


def test_star_only_where_a_column_list_is_expected() -> None:
    with pytest.raises(InvalidQuery):
        pg.select_from("*")
    with pytest.raises(InvalidQuery):
        pg.select_from("t").where("*", "=", 1)
    with pytest.raises(InvalidQuery):
        pg.update_table("t").set({"*": 1})


# --- select and where ---------------------------------------------------------------------


def test_select_all_and_columns() -> None:
    check(lambda db: db.select_from("t"), 'SELECT * FROM "t"', "SELECT * FROM `t`", ())
    check(
        lambda db: db.select_from("s.t").select("id", "t.name"),
        'SELECT "id", "t"."name" FROM "s"."t"',
        "SELECT `id`, `t`.`name` FROM `s`.`t`",
        (),
    )
    # A later select() replaces the list; select() with nothing means *.
    check(
        lambda db: db.select_from("t").select("a").select("b"),
        'SELECT "b" FROM "t"',
        "SELECT `b` FROM `t`",
        (),
    )
    check(
        lambda db: db.select_from("t").select("a").select(),
        'SELECT * FROM "t"',
        "SELECT * FROM `t`",
        (),
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda q: q.where("status", "=", "pending"),
        lambda q: q.where(("status", "=", "pending")),
        lambda q: q.where(["status", "=", "pending"]),
        lambda q: q.where(status="pending"),
        lambda q: q.where({"status": "pending"}),
    ],
)
def test_where_forms_agree(build: Callable[[Any], Any]) -> None:
    check(
        lambda db: build(db.select_from("t")),
        'SELECT * FROM "t" WHERE "status" = %s',
        "SELECT * FROM `t` WHERE `status` = %s",
        ("pending",),
    )


def test_where_ands_across_calls_and_forms() -> None:
    check(
        lambda db: (
            db.select_from("t")
            .where("a", ">", 1)
            .where({"b": 2, "c": 3})
            .where(("d", "like", "x%"), e=5)
            .where(f=6)
        ),
        'SELECT * FROM "t" WHERE "a" > %s AND "b" = %s AND "c" = %s AND "d" LIKE %s '
        'AND "e" = %s AND "f" = %s',
        "SELECT * FROM `t` WHERE `a` > %s AND `b` = %s AND `c` = %s AND `d` LIKE %s "
        "AND `e` = %s AND `f` = %s",
        (1, 2, 3, "x%", 5, 6),
    )


@pytest.mark.parametrize(
    ("op", "sql_op"),
    [
        ("=", "="),
        ("!=", "<>"),
        ("<>", "<>"),
        ("<", "<"),
        (">", ">"),
        ("<=", "<="),
        (">=", ">="),
        ("like", "LIKE"),
        ("LIKE", "LIKE"),
        (" Like ", "LIKE"),
    ],
)
def test_comparison_operators(op: str, sql_op: str) -> None:
    check(
        lambda db: db.select_from("t").where("a", op, 7),
        f'SELECT * FROM "t" WHERE "a" {sql_op} %s',
        f"SELECT * FROM `t` WHERE `a` {sql_op} %s",
        (7,),
    )


@pytest.mark.parametrize("values", [[1, 2, 3], (1, 2, 3)])
@pytest.mark.parametrize(
    ("op", "sql_op"), [("in", "IN"), ("NOT  in", "NOT IN"), ("not in", "NOT IN")]
)
def test_in_lists(values: Any, op: str, sql_op: str) -> None:
    check(
        lambda db: db.select_from("t").where("id", op, values),
        f'SELECT * FROM "t" WHERE "id" {sql_op} (%s, %s, %s)',
        f"SELECT * FROM `t` WHERE `id` {sql_op} (%s, %s, %s)",
        (1, 2, 3),
    )


def test_in_accepts_sets() -> None:
    for values in ({5}, frozenset({5})):
        assert pg.select_from("t").where("id", "in", values).compile() == Compiled(
            'SELECT * FROM "t" WHERE "id" IN (%s)', (5,)
        )


def test_empty_in_lists_are_constant_predicates() -> None:
    check(
        lambda db: db.select_from("t").where("id", "in", []).where("x", "not in", ()),
        'SELECT * FROM "t" WHERE 1 = 0 AND 1 = 1',
        "SELECT * FROM `t` WHERE 1 = 0 AND 1 = 1",
        (),
    )


@pytest.mark.parametrize("value", ["abc", 5, None, {"a": 1}])
def test_in_needs_a_collection(value: Any) -> None:
    with pytest.raises(InvalidQuery, match="list, tuple or set"):
        pg.select_from("t").where("id", "in", value)


def test_none_and_is() -> None:
    check(
        lambda db: (
            db.select_from("t")
            .where(a=None)
            .where("b", "=", None)
            .where("c", "!=", None)
            .where({"d": None})
            .where("e", "is", None)
            .where("f", "IS NOT", None)
            .where("g", "is", True)
            .where("h", "is not", False)
        ),
        'SELECT * FROM "t" WHERE "a" IS NULL AND "b" IS NULL AND "c" IS NOT NULL AND '
        '"d" IS NULL AND "e" IS NULL AND "f" IS NOT NULL AND "g" IS TRUE AND "h" IS NOT FALSE',
        "SELECT * FROM `t` WHERE `a` IS NULL AND `b` IS NULL AND `c` IS NOT NULL AND "
        "`d` IS NULL AND `e` IS NULL AND `f` IS NOT NULL AND `g` IS TRUE AND `h` IS NOT FALSE",
        (),
    )


@pytest.mark.parametrize("value", [0, 1, "null", "", []])
def test_is_takes_only_none_true_false(value: Any) -> None:
    with pytest.raises(InvalidQuery, match="only None, True or False"):
        pg.select_from("t").where("a", "is", value)


@pytest.mark.parametrize("op", ["<", ">", "<=", ">=", "like"])
def test_ordering_with_none_is_refused(op: str) -> None:
    with pytest.raises(InvalidQuery, match="never true"):
        pg.select_from("t").where("a", op, None)


@pytest.mark.parametrize("op", ["==", "between", "", "in in", "ilike", None, 1])
def test_unknown_operator_raised_in_where(op: Any) -> None:
    base = pg.select_from("t")
    with pytest.raises(InvalidQuery, match="unknown where operator") as err:
        base.where("a", op, 1)
    for allowed in ("'='", "'!='", "'like'", "'not in'", "'is not'", "'<>'"):
        assert allowed in str(err.value)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        (({},), {}),
        (("a", 1), {}),
        (("a", "=", 1, 2), {}),
        ((("a", "="),), {}),
        (("a=1",), {}),
        ((5,), {}),
    ],
)
def test_bad_where_calls(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for base in (pg.select_from("t"), pg.update_table("t").set(a=1), pg.delete_from("t")):
        with pytest.raises(InvalidQuery):
            base.where(*args, **kwargs)


def test_where_dict_keys_must_be_strings() -> None:
    with pytest.raises(InvalidQuery, match="must be a str"):
        pg.select_from("t").where({1: 2})  # type: ignore[dict-item]


def test_order_limit_offset_for_update() -> None:
    check(
        lambda db: (
            db.select_from("t")
            .where(a=1)
            .order_by("a")
            .order_by("b", "DESC")
            .order_by("c", " Asc ")
            .limit(10)
            .offset(20)
            .for_update()
        ),
        'SELECT * FROM "t" WHERE "a" = %s ORDER BY "a" ASC, "b" DESC, "c" ASC '
        "LIMIT %s OFFSET %s FOR UPDATE",
        "SELECT * FROM `t` WHERE `a` = %s ORDER BY `a` ASC, `b` DESC, `c` ASC "
        "LIMIT %s OFFSET %s FOR UPDATE",
        (1, 10, 20),
    )


def test_offset_without_limit() -> None:
    check(
        lambda db: db.select_from("t").offset(0),
        'SELECT * FROM "t" OFFSET %s',
        "SELECT * FROM `t` LIMIT 18446744073709551615 OFFSET %s",
        (0,),
    )


def test_limit_zero_and_for_update_alone() -> None:
    check(
        lambda db: db.select_from("t").limit(0).for_update(),
        'SELECT * FROM "t" LIMIT %s FOR UPDATE',
        "SELECT * FROM `t` LIMIT %s FOR UPDATE",
        (0,),
    )


@pytest.mark.parametrize("n", [-1, 1.0, "1", True, None])
def test_limit_and_offset_need_non_negative_ints(n: Any) -> None:
    with pytest.raises(InvalidQuery, match="non-negative int"):
        pg.select_from("t").limit(n)
    with pytest.raises(InvalidQuery, match="non-negative int"):
        pg.select_from("t").offset(n)


@pytest.mark.parametrize("direction", ["up", "", "descending", None])
def test_bad_order_direction(direction: Any) -> None:
    with pytest.raises(InvalidQuery, match="'asc' or 'desc'"):
        pg.select_from("t").order_by("a", direction)


# --- insert -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda q: q.values(a=1, b="x"),
        lambda q: q.values({"a": 1, "b": "x"}),
        lambda q: q.values([{"a": 1, "b": "x"}]),
    ],
)
def test_insert_forms(build: Callable[[Any], Any]) -> None:
    check(
        lambda db: build(db.insert_into("t")),
        'INSERT INTO "t" ("a", "b") VALUES (%s, %s)',
        "INSERT INTO `t` (`a`, `b`) VALUES (%s, %s)",
        (1, "x"),
    )


def test_multi_row_insert_follows_first_row_order() -> None:
    check(
        lambda db: (
            db.insert_into("t")
            .values([{"a": 1, "b": 2}, {"b": 4, "a": 3}])
            .values(a=5, b=6)
            .returning("id", "a")
        ),
        'INSERT INTO "t" ("a", "b") VALUES (%s, %s), (%s, %s), (%s, %s) RETURNING "id", "a"',
        "INSERT INTO `t` (`a`, `b`) VALUES (%s, %s), (%s, %s), (%s, %s) RETURNING `id`, `a`",
        (1, 2, 3, 4, 5, 6),
    )


def test_insert_returning_all() -> None:
    check(
        lambda db: db.insert_into("t").values(a=1).returning(),
        'INSERT INTO "t" ("a") VALUES (%s) RETURNING *',
        "INSERT INTO `t` (`a`) VALUES (%s) RETURNING *",
        (1,),
    )


def test_insert_or_ignore_per_dialect() -> None:
    check(
        lambda db: db.insert_or_ignore("t").values([{"id": 1}, {"id": 2}]),
        'INSERT INTO "t" ("id") VALUES (%s), (%s) ON CONFLICT DO NOTHING',
        "INSERT IGNORE INTO `t` (`id`) VALUES (%s), (%s)",
        (1, 2),
    )
    check(
        lambda db: db.insert_or_ignore("t").values(id=1).returning("id"),
        'INSERT INTO "t" ("id") VALUES (%s) ON CONFLICT DO NOTHING RETURNING "id"',
        "INSERT IGNORE INTO `t` (`id`) VALUES (%s) RETURNING `id`",
        (1,),
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda q: q.values([{"a": 1}, {"b": 2}]),
        lambda q: q.values([{"a": 1}, {"a": 2, "b": 3}]),
        lambda q: q.values(a=1).values(b=2),
        lambda q: q.values([]),
        lambda q: q.values(()),
        lambda q: q.values({}),
        lambda q: q.values(),
        lambda q: q.values([{}]),
        lambda q: q.values({"a": 1}, b=2),
        lambda q: q.values([{"a": 1}], b=2),
        lambda q: q.values([{"a": 1}, 5]),
        lambda q: q.values("a"),
        lambda q: q.values({1: 2}),
    ],
)
def test_bad_insert_values(build: Callable[[Any], Any]) -> None:
    with pytest.raises(InvalidQuery):
        build(pg.insert_into("t"))


def test_insert_without_values_fails_to_compile() -> None:
    with pytest.raises(InvalidQuery, match=r"call \.values"):
        pg.insert_into("t").compile()


# --- update and delete --------------------------------------------------------------------


def test_update() -> None:
    check(
        lambda db: db.update_table("t").set(a=1).set({"b": 2, "a": 3}).where(id=9),
        'UPDATE "t" SET "a" = %s, "b" = %s WHERE "id" = %s',
        "UPDATE `t` SET `a` = %s, `b` = %s WHERE `id` = %s",
        (3, 2, 9),
    )


def test_update_set_null_is_a_parameter() -> None:
    check(
        lambda db: db.update_table("t").set(a=None).where("b", "in", [1]),
        'UPDATE "t" SET "a" = %s WHERE "b" IN (%s)',
        "UPDATE `t` SET `a` = %s WHERE `b` IN (%s)",
        (None, 1),
    )


def test_delete() -> None:
    check(
        lambda db: db.delete_from("t").where("id", "<", 5).returning("id"),
        'DELETE FROM "t" WHERE "id" < %s RETURNING "id"',
        "DELETE FROM `t` WHERE `id` < %s RETURNING `id`",
        (5,),
    )


def test_update_and_delete_need_where_or_all_rows() -> None:
    for query in (pg.update_table("t").set(a=1), pg.delete_from("t")):
        with pytest.raises(InvalidQuery, match=r"all_rows"):
            query.compile()
    check(
        lambda db: db.update_table("t").set(a=1).all_rows(),
        'UPDATE "t" SET "a" = %s',
        "UPDATE `t` SET `a` = %s",
        (1,),
    )
    check(lambda db: db.delete_from("t").all_rows(), 'DELETE FROM "t"', "DELETE FROM `t`", ())


@pytest.mark.parametrize(
    "build",
    [
        lambda db: db.update_table("t").where(a=1),
        lambda db: db.update_table("t").set({}),
        lambda db: db.update_table("t").set(),
        lambda db: db.update_table("t").set({"a": 1}, b=2),
        lambda db: db.update_table("t").set([("a", 1)]),
    ],
)
def test_bad_update(build: Build) -> None:
    with pytest.raises(InvalidQuery):
        build(pg).compile()


def test_returning_support_flags() -> None:
    assert (POSTGRES.name, MYSQL.name) == ("postgresql", "mysql")
    assert POSTGRES.supports_returning_insert and MYSQL.supports_returning_insert
    assert POSTGRES.supports_returning_update and not MYSQL.supports_returning_update
    assert POSTGRES.supports_returning_delete and MYSQL.supports_returning_delete

    def update(db: SyncDb) -> Any:
        return db.update_table("t").set(a=1).where(id=1).returning("a")

    assert update(pg).compile() == Compiled(
        'UPDATE "t" SET "a" = %s WHERE "id" = %s RETURNING "a"', (1, 1)
    )
    with pytest.raises(InvalidQuery, match=r"mysql.*UPDATE.*select_from"):
        update(my).compile()

    oracle_mysql = FakeDb(
        dataclasses.replace(MYSQL, supports_returning_insert=False, supports_returning_delete=False)
    )
    with pytest.raises(InvalidQuery, match=r"INSERT \.\.\. RETURNING"):
        oracle_mysql.insert_into("t").values(a=1).returning().compile()
    with pytest.raises(InvalidQuery, match=r"DELETE \.\.\. RETURNING"):
        oracle_mysql.delete_from("t").where(a=1).returning().compile()
    # Without .returning() the same dialect is fine.
    delete = oracle_mysql.delete_from("t").where(a=1)
    assert delete.compile().sql == "DELETE FROM `t` WHERE `a` = %s"


# --- behaviour of the builders ------------------------------------------------------------


def test_builders_are_immutable_and_reusable() -> None:
    base = pg.select_from("t").where(a=1)
    one = base.where(b=2).limit(1)
    two = base.where(c=3).order_by("c")
    assert base.compile() == Compiled('SELECT * FROM "t" WHERE "a" = %s', (1,))
    assert one.compile() == Compiled(
        'SELECT * FROM "t" WHERE "a" = %s AND "b" = %s LIMIT %s', (1, 2, 1)
    )
    assert two.compile() == Compiled(
        'SELECT * FROM "t" WHERE "a" = %s AND "c" = %s ORDER BY "c" ASC', (1, 3)
    )
    ins = pg.insert_into("t").values(a=1)
    assert ins.values(a=2).compile().params == (1, 2)
    assert ins.values(a=3).compile().params == (1, 3)
    with pytest.raises(AttributeError):
        base._node = SelectNode("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.node.table = "x"  # type: ignore[misc]


def test_execute_calls_the_runner_with_the_compiled_query() -> None:
    db = FakeDb(POSTGRES)
    query = db.select_from("t").where(a=1)
    rows = query.execute()
    assert rows == [{"id": 1}, {"id": 2}] and rows.rowcount == 2
    assert query.execute_take_first() == {"id": 1}
    expected = Compiled('SELECT * FROM "t" WHERE "a" = %s', (1,))
    assert db.runner.calls == [("run", expected), ("run_first", expected)]


def test_errors_are_raised_before_the_runner_is_called() -> None:
    db = FakeDb(MYSQL)
    bad: list[Any] = [
        db.delete_from("t"),
        db.update_table("t").set(a=1),
        db.update_table("t").set(a=1).where(a=2).returning(),
        db.insert_into("t"),
    ]
    for query in bad:
        with pytest.raises(InvalidQuery):
            query.execute()
        with pytest.raises(InvalidQuery):
            query.execute_take_first()
    assert db.runner.calls == []


async def test_async_runner() -> None:
    db = FakeAsyncDb(POSTGRES)
    rows = await db.update_table("t").set(a=1).where(id=2).execute()
    assert rows.rowcount == 3
    assert await db.select_from("t").execute_take_first() is None
    assert [c.sql for c in db.runner.calls] == [
        'UPDATE "t" SET "a" = %s WHERE "id" = %s',
        'SELECT * FROM "t"',
    ]
    with pytest.raises(InvalidQuery):
        db.delete_from("t").execute()  # raised at once, not when awaited
    assert len(db.runner.calls) == 2


def test_str_and_repr_show_sql_but_not_values() -> None:
    query = pg.select_from("t").where(secret="hunter2")
    assert str(query) == 'SELECT * FROM "t" WHERE "secret" = %s'
    assert repr(query) == '<SelectQuery postgresql: SELECT * FROM "t" WHERE "secret" = %s>'
    assert "hunter2" not in repr(query)
    assert str(pg.delete_from("t")).startswith("<invalid query:")


def test_values_pass_through_untouched() -> None:
    values = [Decimal("1.10"), dt.datetime(2024, 1, 2, 3, 4, 5), b"\x00\xff", {"k": [1]}, True]
    compiled = pg.insert_into("t").values({f"c{i}": v for i, v in enumerate(values)}).compile()
    assert all(p is v for p, v in zip(compiled.params, values, strict=True))


def test_compile_query_on_a_node_and_rows() -> None:
    node = SelectNode("t", where=(Comparison("a", "=", 1),))
    assert compile_query(node, MYSQL) == Compiled("SELECT * FROM `t` WHERE `a` = %s", (1,))
    with pytest.raises(InvalidQuery):
        compile_query(object(), POSTGRES)  # type: ignore[arg-type]
    assert Rows().rowcount == 0 and Rows([{"a": 1}]).rowcount == 1
    assert Rows([], rowcount=5).rowcount == 5 and isinstance(Rows(), list)


def test_public_names() -> None:
    # isort-style order, as ruff's RUF022 wants: CONSTANTS, then Classes, then functions.
    assert sql.__all__ == sorted(sql.__all__, key=lambda n: (not n.isupper(), n.islower(), n))
    assert all(hasattr(sql, name) for name in sql.__all__)


# --- properties ---------------------------------------------------------------------------


def unquote(text: str, q: str) -> str:
    """Parse a quoted (possibly dotted) identifier back into the original name."""
    parts, i = [], 0
    while True:
        if text.startswith("*", i):
            parts.append("*")
            i += 1
        else:
            assert text[i] == q
            i += 1
            buf = []
            while True:
                j = text.index(q, i)
                buf.append(text[i:j])
                if text.startswith(q + q, j):
                    buf.append(q)
                    i = j + 2
                else:
                    i = j + 1
                    break
            parts.append("".join(buf))
        if i == len(text):
            return ".".join(parts)
        assert text[i] == "."
        i += 1


@given(st.text().filter(lambda s: "\x00" not in s))
def test_quote_ident_round_trips(ident: str) -> None:
    parts = ident.split(".")
    quotable = "" not in parts and "*" not in parts[:-1]
    for dialect in (POSTGRES, MYSQL):
        if not quotable:
            with pytest.raises(InvalidQuery):
                dialect.quote_ident(ident)
            continue
        quoted = dialect.quote_ident(ident)
        assert unquote(quoted, dialect.quote_char) == ident
        # In compiled SQL the same identifier has % doubled, which the driver undoes.
        sql_text = FakeDb(dialect).select_from(ident.rstrip("*") + "x").compile().sql
        assert sql_text % () == f"SELECT * FROM {dialect.quote_ident(ident.rstrip('*') + 'x')}"


values = st.one_of(
    st.text(),
    st.integers(),
    st.floats(allow_nan=False),
    st.decimals(allow_nan=False),
    st.datetimes(),
    st.binary(),
    st.dictionaries(st.text(), st.integers()),
)


@given(values, values)
def test_values_never_reach_the_sql_text(a: Any, b: Any) -> None:
    def queries(x: Any, y: Any, db: SyncDb) -> list[Any]:
        return [
            db.insert_into("t").values([{"a": x, "b": y}, {"a": y, "b": x}]),
            db.update_table("t").set(a=x).where("b", "!=", y).where("c", "in", [x, y]),
            db.select_from("t").where("a", "like", x).where(b=y).limit(3),
            db.delete_from("t").where({"a": x}).where("b", "not in", (y,)),
        ]

    for db in (pg, my):
        for real, dummy in zip(queries(a, b, db), queries(0, 0, db), strict=True):
            got = real.compile()
            # The text does not depend on the values, so no value can be inlined in it...
            assert got.sql == dummy.compile().sql
            # ...and every value is passed to the driver as it was given.
            assert all(p is a or p is b or p == 3 for p in got.params)
            assert any(p is a for p in got.params) and any(p is b for p in got.params)
