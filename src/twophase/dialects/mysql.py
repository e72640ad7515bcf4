"""MariaDB/MySQL: XA START .. XA PREPARE / XA COMMIT, XA RECOVER, PyMySQL errors."""

from __future__ import annotations

from typing import Any

from ..names import XA_FORMAT_ID, TxName, parse_branch
from ..sql import MYSQL
from .base import OUTCOME_TABLE, Dialect, ErrorKind, PreparedRow, Statement, split_statements

# https://mariadb.com/kb/en/mariadb-error-codes/
_NOT_FOUND = {1397}  # XAER_NOTA
_IN_USE = {1440}  # XAER_DUPID
_DUPLICATE = {1062}
_LOCK = {1205}
_ROLLED_BACK = {1402, 1613, 1614}  # XA_RBROLLBACK, XA_RBTIMEOUT, XA_RBDEADLOCK
_PERMISSION = {1044, 1045, 1142, 1227, 1370}
_CONNECTION = {1053, 1927, 2003, 2006, 2013, 2055, 4031}


class MySQLDialect(Dialect):
    """MariaDB >= 10.5 (prepared XA branches survive disconnects) and MySQL >= 8."""

    sql = MYSQL
    name = "mysql"
    prepare_detaches_session = True
    discard_after_tpc_error = True

    def __init__(self) -> None:
        self._table = self.sql.quote_ident(OUTCOME_TABLE)

    def schema(self) -> tuple[str, ...]:
        """The outcome table; ascii_bin keeps names case-sensitive as gtrids are."""
        return (
            f"CREATE TABLE IF NOT EXISTS {self._table} ("
            " name VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,"
            " outcome VARCHAR(16) CHARACTER SET ascii NOT NULL,"
            " recorded_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),"
            " PRIMARY KEY (name, outcome)"
            ") ENGINE=InnoDB",
        )

    def existing_objects(self, names: list[str]) -> Statement:
        """Tables of the current schema (indexes are created with their tables here)."""
        marks = ", ".join(["%s"] * len(names))
        return (
            "SELECT table_name AS name FROM information_schema.tables "
            f"WHERE table_schema = DATABASE() AND table_name IN ({marks})",
            tuple(names),
        )

    def begin(self) -> str:
        """Start an ordinary transaction."""
        return "START TRANSACTION"

    def xid(self, name: TxName) -> str:
        """The XA id: gtrid = the name, bqual = the branch qualifier, twophase's formatID."""
        return f"{self.literal(name.full)},{self.literal(name.branch or '')},{XA_FORMAT_ID}"

    def claim(self, name: TxName) -> tuple[str, ...]:
        """XA START fails at once (XAER_DUPID) when the id is active or prepared anywhere."""
        return (
            f"XA START {self.xid(name)}",
            f"INSERT INTO {self._table} (name, outcome) VALUES ({self.literal(name.record)}, "
            "'committed')",
        )

    def prepare(self, name: TxName) -> tuple[str, ...]:
        """End the branch and prepare it."""
        return (f"XA END {self.xid(name)}", f"XA PREPARE {self.xid(name)}")

    def abort(self, name: TxName) -> tuple[str, ...]:
        """End and roll back the branch."""
        return (f"XA END {self.xid(name)}", f"XA ROLLBACK {self.xid(name)}")

    def commit_prepared(self, name: TxName) -> str:
        """``XA COMMIT`` from a session other than the preparing one."""
        return f"XA COMMIT {self.xid(name)}"

    def rollback_prepared(self, name: TxName) -> str:
        """``XA ROLLBACK`` from a session other than the preparing one."""
        return f"XA ROLLBACK {self.xid(name)}"

    def record_rollback(self, name: TxName) -> Statement:
        """Tombstone insert; INSERT IGNORE keeps it idempotent."""
        return (
            f"INSERT IGNORE INTO {self._table} (name, outcome) VALUES (%s, 'rolled_back')",
            (name.record,),
        )

    def list_prepared(self, prefix: str) -> Statement:
        """XA RECOVER lists every prepared branch of the server; filtered in parse."""
        return ("XA RECOVER", None)

    def parse_prepared(self, rows: list[dict[str, Any]], database: str) -> list[PreparedRow]:
        """Keep branches with twophase's formatID."""
        out = []
        for row in rows:
            if int(row["formatID"]) != XA_FORMAT_ID:
                continue
            data = row["data"]
            raw = data if isinstance(data, bytes) else str(data).encode()
            glen, blen = int(row["gtrid_length"]), int(row["bqual_length"])
            gtrid = raw[:glen].decode("ascii", "replace")
            bqual = raw[glen : glen + blen].decode("ascii", "replace")
            name = parse_branch(gtrid, bqual)
            if name is not None:
                out.append(PreparedRow(name, None, database))
        return out

    def prepared_times(self, names: list[str]) -> tuple[Statement, ...]:
        """Read the uncommitted claim rows (READ UNCOMMITTED) to learn when each began.

        MariaDB does not record when an XA branch was prepared; the claim row written inside
        the branch carries its start time, and a dirty read may see it.
        """
        if not names:
            return ()
        marks = ", ".join(["%s"] * len(names))
        return (
            ("SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED", None),
            (
                f"SELECT name, recorded_at FROM {self._table} "
                f"WHERE outcome = 'committed' AND name IN ({marks})",
                tuple(names),
            ),
        )

    def classify(self, exc: BaseException) -> ErrorKind:
        """Map MariaDB error numbers to error kinds."""
        import pymysql

        if isinstance(exc, pymysql.InterfaceError):
            return ErrorKind.CONNECTION
        if isinstance(exc, pymysql.IntegrityError) and exc.args and exc.args[0] not in _DUPLICATE:
            return ErrorKind.INTEGRITY
        if isinstance(exc, pymysql.DataError):
            return ErrorKind.BAD_VALUE
        if not isinstance(exc, pymysql.MySQLError) or not exc.args:
            return ErrorKind.OTHER
        code = exc.args[0]
        for codes, kind in (
            (_NOT_FOUND, ErrorKind.NOT_FOUND),
            (_IN_USE, ErrorKind.NAME_IN_USE),
            (_DUPLICATE, ErrorKind.DUPLICATE_KEY),
            (_LOCK, ErrorKind.LOCK_TIMEOUT),
            (_ROLLED_BACK, ErrorKind.ROLLED_BACK),
            (_PERMISSION, ErrorKind.PERMISSION),
            (_CONNECTION, ErrorKind.CONNECTION),
        ):
            if code in codes:
                return kind
        return ErrorKind.OTHER

    def literal(self, value: str) -> str:
        """A MariaDB string literal: quotes doubled, backslashes escaped."""
        if "\0" in value:
            raise ValueError("string literals here cannot hold NUL")
        return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"

    def control_keywords(self, sql: str) -> list[str]:
        """Statements of ``sql`` with literals and comments (``--``, ``#``, ``/* */``) blanked."""
        return split_statements(sql, backslash_escapes=True, dollar_quotes=False)
