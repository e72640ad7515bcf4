"""PostgreSQL: PREPARE TRANSACTION / COMMIT PREPARED, pg_prepared_xacts, psycopg errors."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pgerr

from ..names import PG_GID_PREFIX, TxName, name_from_pg_gid
from ..sql import POSTGRES
from .base import OUTCOME_TABLE, Dialect, ErrorKind, PreparedRow, Statement, split_statements

# How long a claim waits for a row lock on the name before concluding that another session
# holds it: long enough to ride out a scheduler hiccup, short enough that a loser learns at
# once. A prepared holder keeps the lock indefinitely, so waiting longer would only hang.
CLAIM_LOCK_TIMEOUT = "200ms"

# Advisory lock key for twophase's DDL ("tp" in ASCII, like the XA formatID).
_DDL_LOCK = 0x7470

_CONNECTION_STATES = {"57P01", "57P02", "57P03"}  # admin/crash shutdown, cannot connect now


class PostgresDialect(Dialect):
    """PostgreSQL >= 12 through psycopg 3."""

    sql = POSTGRES
    name = "postgresql"

    def __init__(self) -> None:
        self._table = self.sql.quote_ident(OUTCOME_TABLE)

    def schema(self) -> tuple[str, ...]:
        """The outcome table; the primary key makes a second claim of one name collide."""
        return (
            f"CREATE TABLE IF NOT EXISTS {self._table} ("
            " name varchar(128) NOT NULL,"
            " outcome varchar(16) NOT NULL CHECK (outcome IN ('committed', 'rolled_back')),"
            " recorded_at timestamptz NOT NULL DEFAULT now(),"
            " PRIMARY KEY (name, outcome))",
        )

    def existing_objects(self, names: list[str]) -> Statement:
        """Catalog lookups only: ``CREATE INDEX IF NOT EXISTS`` would take a table lock
        before checking, and wait behind any prepared transaction that wrote the table."""
        return (
            "SELECT n AS name FROM unnest(%s::text[]) AS n WHERE to_regclass(n) IS NOT NULL",
            (names,),
        )

    def serialized_ddl(self, stmts: tuple[str, ...]) -> tuple[str, ...]:
        """One transaction under an advisory lock: concurrent ``CREATE TABLE IF NOT EXISTS``
        can fail on PostgreSQL's catalog unique indexes instead of waiting. The lock timeout
        turns a wait behind a stuck transaction into an error that names the cause."""
        body = "; ".join(stmts)
        return (
            f"BEGIN; SET LOCAL lock_timeout = '30s'; "
            f"SELECT pg_advisory_xact_lock({_DDL_LOCK}); {body}; COMMIT",
        )

    def settings_check(self) -> str:
        """``max_prepared_transactions`` must be above zero."""
        return "SELECT current_setting('max_prepared_transactions')::int AS value"

    def begin(self) -> str:
        """Start an ordinary transaction."""
        return "BEGIN"

    def claim(self, name: TxName) -> tuple[str, ...]:
        """One round trip: BEGIN and the claim row, under a short lock timeout."""
        return (
            f"BEGIN; SET LOCAL lock_timeout = '{CLAIM_LOCK_TIMEOUT}'; "
            f"INSERT INTO {self._table} (name, outcome) VALUES ({self.literal(name.record)}, "
            "'committed'); SET LOCAL lock_timeout = DEFAULT",
        )

    def prepare(self, name: TxName) -> tuple[str, ...]:
        """``PREPARE TRANSACTION``: the transaction now survives crashes and restarts."""
        return (f"PREPARE TRANSACTION {self.literal(name.pg_gid)}",)

    def abort(self, name: TxName) -> tuple[str, ...]:
        """Roll back the open transaction."""
        return ("ROLLBACK",)

    def commit_prepared(self, name: TxName) -> str:
        """``COMMIT PREPARED``: must run outside a transaction block, in the same database."""
        return f"COMMIT PREPARED {self.literal(name.pg_gid)}"

    def rollback_prepared(self, name: TxName) -> str:
        """``ROLLBACK PREPARED``."""
        return f"ROLLBACK PREPARED {self.literal(name.pg_gid)}"

    def record_rollback(self, name: TxName) -> Statement:
        """Tombstone insert; ON CONFLICT keeps it idempotent."""
        return (
            f"INSERT INTO {self._table} (name, outcome) VALUES (%s, 'rolled_back') "
            "ON CONFLICT DO NOTHING",
            (name.record,),
        )

    def delete_outcomes(
        self, keys: list[tuple[str, str]], before: datetime
    ) -> tuple[Statement, ...]:
        """One statement: the keys as two arrays joined to the primary key. A plain
        DELETE neither sees nor waits for a prepared transaction's uncommitted record."""
        return (
            (
                f"DELETE FROM {self._table} AS t "
                "USING unnest(%s::text[], %s::text[]) AS k(name, outcome) "
                "WHERE t.name = k.name AND t.outcome = k.outcome AND t.recorded_at < %s",
                ([name for name, _ in keys], [outcome for _, outcome in keys], before),
            ),
        )

    def list_prepared(self, prefix: str) -> Statement:
        """This database's prepared transactions whose gid starts with the prefix."""
        gid_prefix = PG_GID_PREFIX + prefix
        return (
            "SELECT gid, prepared, database FROM pg_prepared_xacts "
            "WHERE database = current_database() AND left(gid, %s) = %s ORDER BY prepared",
            (len(gid_prefix), gid_prefix),
        )

    def parse_prepared(self, rows: list[dict[str, Any]], database: str) -> list[PreparedRow]:
        """Keep twophase's own gids."""
        out = []
        for row in rows:
            name = name_from_pg_gid(row["gid"])
            if name is not None:
                out.append(PreparedRow(name, row["prepared"], row["database"]))
        return out

    def classify(self, exc: BaseException) -> ErrorKind:
        """Map psycopg's exception classes (SQLSTATE-based) to error kinds."""
        if isinstance(exc, pgerr.UndefinedObject):
            return ErrorKind.NOT_FOUND
        if isinstance(exc, pgerr.ObjectInUse) or (
            # "prepared transaction with identifier ... is busy" (SQLSTATE 55000)
            isinstance(exc, pgerr.ObjectNotInPrerequisiteState) and "is busy" in str(exc)
        ):
            return ErrorKind.BUSY
        if isinstance(exc, pgerr.DuplicateObject):
            return ErrorKind.NAME_IN_USE
        if isinstance(exc, pgerr.UniqueViolation):
            return ErrorKind.DUPLICATE_KEY
        if isinstance(exc, psycopg.IntegrityError):
            return ErrorKind.INTEGRITY
        if isinstance(exc, psycopg.DataError):
            return ErrorKind.BAD_VALUE
        if isinstance(exc, pgerr.LockNotAvailable):
            return ErrorKind.LOCK_TIMEOUT
        if isinstance(exc, pgerr.ObjectNotInPrerequisiteState) and "disabled" in str(exc):
            return ErrorKind.DISABLED
        if isinstance(exc, pgerr.InsufficientPrivilege):
            return ErrorKind.PERMISSION
        if isinstance(exc, pgerr.FeatureNotSupported):
            return ErrorKind.UNSUPPORTED
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            state = getattr(exc, "sqlstate", None)
            if state is None or state.startswith("08") or state in _CONNECTION_STATES:
                return ErrorKind.CONNECTION
        return ErrorKind.OTHER

    def literal(self, value: str) -> str:
        """A standard-conforming string literal (backslashes are not escapes)."""
        if "\0" in value:
            raise ValueError("PostgreSQL string literals cannot hold NUL")
        return "'" + value.replace("'", "''") + "'"

    def control_keywords(self, sql: str) -> list[str]:
        """Statements of ``sql`` with literals, dollar-quoted bodies and comments blanked."""
        return split_statements(sql, backslash_escapes=False, dollar_quotes=True)
