"""Pure logic: the transaction-control guard, URL parsing, error kinds."""

from __future__ import annotations

import pytest

from twophase import InvalidTransactionName, NotSupported
from twophase.dialects import MySQLDialect, PostgresDialect, control_statement
from twophase.names import TxName, name_from_pg_gid
from twophase.url import parse_url

PG = PostgresDialect()
MY = MySQLDialect()


@pytest.mark.parametrize(
    ("sql", "found"),
    [
        ("SELECT 1", None),
        ("insert into t values (1)", None),
        ("COMMIT", "COMMIT"),
        ("  commit;", "COMMIT"),
        ("SELECT 1; ROLLBACK", "ROLLBACK"),
        ("/* x */ SAVEPOINT a", "SAVEPOINT A"),
        ("-- comment\nBEGIN", "BEGIN"),
        ("SELECT 'COMMIT; ROLLBACK'", None),
        ('SELECT "commit" FROM t', None),
        ("PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION"),
        ("PREPARE stmt AS SELECT 1", None),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "SET TRANSACTION"),
        ("SET search_path = x", None),
        ("SELECT $$; COMMIT$$", None),
        ("SELECT $tag$ ; COMMIT $tag$", None),
        ("LOCK TABLE t IN SHARE MODE", None),
    ],
)
def test_control_statement_postgres(sql: str, found: str | None) -> None:
    assert control_statement(PG, sql) == found


@pytest.mark.parametrize(
    ("sql", "found"),
    [
        ("XA START 'x'", "XA START"),
        ("SELECT 'it\\'s; COMMIT'", None),
        ("# comment\nCOMMIT", "COMMIT"),
        ("SELECT `commit` FROM t", None),
        ("LOCK TABLES t WRITE", "LOCK TABLES"),
        ("SET autocommit = 0", "SET AUTOCOMMIT"),
        ("START TRANSACTION", "START TRANSACTION"),
    ],
)
def test_control_statement_mysql(sql: str, found: str | None) -> None:
    assert control_statement(MY, sql) == found


def test_url_parsing() -> None:
    pg = parse_url("postgresql://app:secret@db.example:5433/app?sslmode=require")
    assert pg.dialect == "postgresql"
    assert pg.database == "app"
    assert "secret" not in pg.display
    my = parse_url("mariadb://root:pw@127.0.0.1:3307/test")
    assert my.dialect == "mysql"
    assert my.params["port"] == 3307
    assert my.params["password"] == "pw"
    assert "pw" not in my.display


@pytest.mark.parametrize(
    "url", ["sqlite:///x.db", "sqlite://", "oracle://x/y", "nonsense", "mysql://root@h/"]
)
def test_unsupported_urls(url: str) -> None:
    with pytest.raises(NotSupported):
        parse_url(url)


def test_sqlite_message_says_why() -> None:
    with pytest.raises(NotSupported, match="prepared transaction across a crash"):
        parse_url("sqlite:///tmp/x.db")


def test_names_and_ids() -> None:
    name = TxName.make("invoice_7", "billing")
    assert name.full == "billing:invoice_7"
    assert name.pg_gid == "tp:billing:invoice_7"
    assert name_from_pg_gid("tp:billing:invoice_7") == TxName("billing:invoice_7")
    assert name_from_pg_gid("tp:g1#2.1764250000") == TxName("g1", "2.1764250000")
    assert name_from_pg_gid("tp:g1#bad") is None
    assert name_from_pg_gid("other_tool_gid") is None
    assert MY.xid(name) == "'billing:invoice_7','',29808"
    with pytest.raises(InvalidTransactionName, match="namespace"):
        TxName.make("x" * 60, "billing")


def test_literals_quote_properly() -> None:
    # Validation keeps quotes out of names; the literal quoting must still be right.
    assert PG.literal("a'b\\c") == "'a''b\\c'"
    assert MY.literal("a'b\\c") == "'a''b\\\\c'"
