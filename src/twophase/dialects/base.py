"""What a database must tell twophase: two-phase statements, recovery queries, error kinds."""

from __future__ import annotations

import enum
import functools
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..names import TxName
from ..sql import SqlDialect

Params = tuple[Any, ...] | None
Statement = tuple[str, Params]

#: The table of outcomes. A "committed" row is written inside the prepared transaction
#: itself, so it is visible exactly when the transaction's data is; a "rolled_back" row is
#: a tombstone written just before ROLLBACK PREPARED.
OUTCOME_TABLE = "twophase_outcome"


class ErrorKind(enum.Enum):
    """What a driver error means to twophase."""

    NOT_FOUND = "not found"  # no prepared transaction under that id
    NAME_IN_USE = "name in use"  # the id is active or prepared elsewhere
    BUSY = "busy"  # another session is finishing this prepared transaction right now
    DUPLICATE_KEY = "duplicate key"
    INTEGRITY = "constraint violated"
    BAD_VALUE = "a value the column cannot store"  # too long, out of range, bad encoding
    LOCK_TIMEOUT = "lock timeout"
    DISABLED = "prepared transactions disabled"
    CONNECTION = "connection lost"
    PERMISSION = "permission denied"
    UNSUPPORTED = "not supported in a prepared transaction"
    ROLLED_BACK = "rolled back by the server"  # deadlock or timeout inside an XA branch
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class PreparedRow:
    """One prepared transaction as the database reports it."""

    name: TxName
    prepared_at: datetime | None
    database: str


class Dialect(ABC):
    """A database's two-phase vocabulary. Pure: it writes SQL and reads errors, no I/O."""

    #: The query builder's hooks for this database.
    sql: SqlDialect
    #: The ``dialect`` name users see.
    name: str
    #: Whether the session that prepared a transaction must disconnect before any other
    #: session can finish it (MariaDB/MySQL attach a prepared XA branch to its session).
    prepare_detaches_session: bool = False
    #: Whether a connection must be dropped after any two-phase error (its XA state is
    #: left undefined by MariaDB after a failed XA statement).
    discard_after_tpc_error: bool = False

    @abstractmethod
    def schema(self) -> tuple[str, ...]:
        """Statements that create the outcome table if it is missing."""

    @abstractmethod
    def existing_objects(self, names: list[str]) -> Statement:
        """Which of the named tables/indexes exist (column ``name``); read without locks."""

    def serialized_ddl(self, stmts: tuple[str, ...]) -> tuple[str, ...]:
        """``stmts`` arranged so concurrent creators do not collide (default: as they are;
        MariaDB serializes DDL on metadata locks)."""
        return stmts

    def settings_check(self) -> str | None:
        """A query whose single value must be > 0 for prepared transactions to work."""
        return None

    @abstractmethod
    def begin(self) -> str:
        """Start an ordinary transaction."""

    def commit(self) -> str:
        """Commit an ordinary transaction."""
        return "COMMIT"

    def rollback(self) -> str:
        """Roll back an ordinary transaction."""
        return "ROLLBACK"

    @abstractmethod
    def claim(self, name: TxName) -> tuple[str, ...]:
        """Round trips that open a distributed transaction and claim its name.

        Claiming writes the "committed" outcome row first thing: a second session racing
        for the same name collides on that row (or on the XA id) at once, before its
        callback runs.
        """

    @abstractmethod
    def prepare(self, name: TxName) -> tuple[str, ...]:
        """Round trips that prepare the open distributed transaction."""

    @abstractmethod
    def abort(self, name: TxName) -> tuple[str, ...]:
        """Round trips that roll back the open (not yet prepared) distributed transaction."""

    @abstractmethod
    def commit_prepared(self, name: TxName) -> str:
        """Commit a prepared transaction from any session."""

    @abstractmethod
    def rollback_prepared(self, name: TxName) -> str:
        """Roll back a prepared transaction from any session."""

    @abstractmethod
    def record_rollback(self, name: TxName) -> Statement:
        """Insert the rolled-back tombstone unless present (rowcount 1 when inserted)."""

    def outcomes(self, name: TxName) -> Statement:
        """Select the recorded outcomes of a name (column ``outcome``)."""
        return (
            f"SELECT outcome FROM {self.sql.quote_ident(OUTCOME_TABLE)} WHERE name = %s",
            (name.record,),
        )

    def outcome_page(
        self, after: tuple[str, str] | None, limit: int, before: datetime
    ) -> Statement:
        """The next ``limit`` outcome records in key order after the key ``after``, each
        with ``old`` = 1 when recorded before ``before``.

        A plain read: it never waits for, and never sees, the record of a transaction that
        is still prepared (uncommitted). The key written out rather than as a row value,
        which MariaDB does not turn into an index range.
        """
        where = ""
        params: list[Any] = [before]
        if after is not None:
            where = " WHERE name >= %s AND (name > %s OR outcome > %s)"
            params += [after[0], after[0], after[1]]
        return (
            "SELECT name, outcome, CASE WHEN recorded_at < %s THEN 1 ELSE 0 END AS old "
            f"FROM {self.sql.quote_ident(OUTCOME_TABLE)}{where} "
            f"ORDER BY name, outcome LIMIT {int(limit)}",
            tuple(params),
        )

    def delete_outcomes(
        self, keys: list[tuple[str, str]], before: datetime
    ) -> tuple[Statement, ...]:
        """Delete the outcome records of ``keys`` that are still older than ``before``.

        One statement per key, each a lookup of the whole primary key: MariaDB scans any
        range, even an OR of exact keys, one record past its end, locking it, and waits
        when that record belongs to a prepared transaction.
        """
        sql = (
            f"DELETE FROM {self.sql.quote_ident(OUTCOME_TABLE)} "
            "WHERE name = %s AND outcome = %s AND recorded_at < %s"
        )
        return tuple((sql, (name, outcome, before)) for name, outcome in keys)

    def count_outcomes(self, before: datetime) -> Statement:
        """How many outcome records are older than ``before`` (column ``n``)."""
        return (
            f"SELECT count(*) AS n FROM {self.sql.quote_ident(OUTCOME_TABLE)} "
            "WHERE recorded_at < %s",
            (before,),
        )

    @abstractmethod
    def list_prepared(self, prefix: str) -> Statement:
        """List prepared transactions; ``parse_prepared`` keeps twophase's own."""

    @abstractmethod
    def parse_prepared(self, rows: list[dict[str, Any]], database: str) -> list[PreparedRow]:
        """The twophase transactions (full name starting with the prefix) among ``rows``."""

    def prepared_times(self, names: list[str]) -> tuple[Statement, ...]:
        """Extra round trips that find when the listed transactions began, if needed."""
        return ()

    @abstractmethod
    def classify(self, exc: BaseException) -> ErrorKind:
        """What a driver exception means."""

    @abstractmethod
    def literal(self, value: str) -> str:
        """``value`` as an SQL string literal of this dialect."""

    @abstractmethod
    def control_keywords(self, sql: str) -> list[str]:
        """The leading keywords of each statement in ``sql`` (upper case)."""


# Statements that would break out of a transaction twophase manages.
_CONTROL = {
    "BEGIN", "START", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "PREPARE", "END",
    "ABORT", "XA", "LOCK",
}  # fmt: skip
_CONTROL_PAIRS = {("SET", "TRANSACTION"), ("SET", "SESSION"), ("SET", "AUTOCOMMIT")}


# MariaDB/MySQL commit the open transaction before (and after) these statements, which
# would silently end a transaction twophase manages.
# https://mariadb.com/kb/en/sql-statements-that-cause-an-implicit-commit/
_MYSQL_IMPLICIT_COMMIT = {
    "ALTER", "CREATE", "DROP", "RENAME", "TRUNCATE", "GRANT", "REVOKE", "ANALYZE",
    "OPTIMIZE", "REPAIR", "FLUSH", "INSTALL", "UNINSTALL", "CACHE", "LOAD",
}  # fmt: skip


def control_statement(dialect: Dialect, sql: str, *, in_transaction: bool = False) -> str | None:
    """The first statement in ``sql`` that would end or escape a managed transaction."""
    # Applications run the same statement texts over and over: the verdict is cached.
    return _control_statement(dialect, sql, in_transaction)


@functools.lru_cache(maxsize=4096)
def _control_statement(dialect: Dialect, sql: str, in_transaction: bool) -> str | None:
    for words in _statements(dialect, sql):
        if not words:
            continue
        if words[0] in _CONTROL and not (words[0] == "PREPARE" and words[1:2] != ["TRANSACTION"]):
            # LOCK TABLE is fine in PostgreSQL transactions; MySQL's LOCK TABLES commits.
            if words[0] == "LOCK" and dialect.name == "postgresql":
                continue
            return " ".join(words[:2])
        if tuple(words[:2]) in _CONTROL_PAIRS:
            return " ".join(words[:2])
        if (
            in_transaction
            and dialect.name == "mysql"
            and words[0] in _MYSQL_IMPLICIT_COMMIT
            and words[1:2] != ["TEMPORARY"]
            and not (words[0] == "LOAD" and words[1:2] == ["DATA"])
        ):
            return " ".join(words[:2]) + " (it commits implicitly on MariaDB/MySQL)"
    return None


_WORD = re.compile(r"[A-Za-z_]+")


def _statements(dialect: Dialect, sql: str) -> list[list[str]]:
    return [[w.upper() for w in _WORD.findall(stmt)][:2] for stmt in dialect.control_keywords(sql)]


def split_statements(sql: str, *, backslash_escapes: bool, dollar_quotes: bool) -> list[str]:
    """Split SQL text on top-level semicolons, skipping strings, identifiers and comments.

    Returns the code of each statement with literals and comments blanked out, which is all
    the guard needs to read leading keywords.
    """
    out: list[str] = []
    cur: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"`":
            j = i + 1
            while j < n:
                if backslash_escapes and sql[j] == "\\" and ch != "`":
                    j += 2
                    continue
                if sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:
                        j += 2
                        continue
                    break
                j += 1
            cur.append(" ")
            i = j + 1
        elif sql.startswith("--", i) or (ch == "#" and backslash_escapes):
            j = sql.find("\n", i)
            i = n if j < 0 else j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            cur.append(" ")
        elif ch == "$" and dollar_quotes:
            m = re.match(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$", sql[i:])
            if m:
                end = sql.find(m.group(0), i + len(m.group(0)))
                i = n if end < 0 else end + len(m.group(0))
                cur.append(" ")
            else:
                cur.append(ch)
                i += 1
        elif ch == ";":
            out.append("".join(cur))
            cur = []
            i += 1
        else:
            cur.append(ch)
            i += 1
    out.append("".join(cur))
    return [s for s in out if s.strip()]


_CREATED = re.compile(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS [`\"]?([A-Za-z0-9_]+)")


def created_objects(stmts: tuple[str, ...]) -> list[str]:
    """The names of the tables and indexes a schema's statements create."""
    return [m.group(1) for stmt in stmts for m in [_CREATED.search(stmt)] if m]
