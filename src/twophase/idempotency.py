"""Idempotency keys and the participant barrier, as SQL; no I/O.

Both work *inside the caller's transaction*, so their records commit or roll back with the
work they guard:

- An idempotency key is a primary key claimed at the start of the work. The first call
  inserts it, runs, and stores its result in the same transaction. A retry finds the
  committed row and returns the stored result. A concurrent duplicate blocks on the row
  lock of the first one's insert, then sees its committed row (or, if the first one rolled
  back, claims the key and runs). The database does the arbitration; no lock table.
- The barrier records which two-phase operations (prepare, commit, rollback, compensate)
  a participant has applied for one branch. Duplicates find their row and become no-ops; a
  rollback that arrives before its prepare writes the prepare's row too, so the late
  prepare becomes a no-op instead of staging work nobody will finish.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from .dialects import Dialect
from .errors import InvalidQuery

IDEMPOTENCY = "twophase_idempotency"
BARRIER = "twophase_barrier"

Statement = tuple[str, tuple[Any, ...]]

#: The operations a barrier knows, and the ones that cancel a branch.
BARRIER_OPS: Final = ("prepare", "commit", "rollback", "compensate")
_CANCELS: Final = ("rollback", "compensate")

MAX_KEY = 255


def fingerprint(request: Any) -> str:
    """A stable SHA-256 fingerprint of a JSON-serializable request (sorted keys)."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_key(key: object, what: str = "idempotency key") -> str:
    """Refuse keys that are not non-empty str of at most 255 characters."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY or "\0" in key:
        raise InvalidQuery(
            f"{what} must be a non-empty str of at most {MAX_KEY} characters without NUL, "
            f"got {key!r:.80}"
        )
    return key


class RetrySQL:
    """SQL for the idempotency and barrier tables of one database."""

    def __init__(self, dialect: Dialect) -> None:
        q = dialect.sql.quote_ident
        self.keys, self.barrier = q(IDEMPOTENCY), q(BARRIER)
        self._pg = dialect.name == "postgresql"

    def schema(self) -> tuple[str, ...]:
        """CREATE TABLE IF NOT EXISTS for both tables."""
        if self._pg:
            return (
                f"CREATE TABLE IF NOT EXISTS {self.keys} ("
                " key varchar(255) PRIMARY KEY, fingerprint varchar(128) NOT NULL,"
                " result text, locked_at timestamptz NOT NULL DEFAULT now(),"
                " finished_at timestamptz, expires_at timestamptz NOT NULL)",
                f"CREATE INDEX IF NOT EXISTS twophase_idempotency_expiry ON {self.keys} "
                "(expires_at)",
                f"CREATE TABLE IF NOT EXISTS {self.barrier} ("
                " gid varchar(128) NOT NULL, branch varchar(64) NOT NULL,"
                " op varchar(16) NOT NULL, origin varchar(16) NOT NULL,"
                " created_at timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (gid, branch, op))",
            )
        return (
            f"CREATE TABLE IF NOT EXISTS {self.keys} ("
            " `key` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,"
            " fingerprint VARCHAR(128) NOT NULL, result LONGTEXT,"
            " locked_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),"
            " finished_at TIMESTAMP(6) NULL, expires_at TIMESTAMP(6) NOT NULL,"
            " KEY twophase_idempotency_expiry (expires_at)) ENGINE=InnoDB",
            f"CREATE TABLE IF NOT EXISTS {self.barrier} ("
            " gid VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,"
            " branch VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,"
            " op VARCHAR(16) NOT NULL, origin VARCHAR(16) NOT NULL,"
            " created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),"
            " PRIMARY KEY (gid, branch, op)) ENGINE=InnoDB",
        )

    def _key_col(self) -> str:
        return "key" if self._pg else "`key`"

    def claim(self, key: str, fp: str, ttl_seconds: float) -> Statement:
        """Insert the key unless present; rowcount 1 means this call owns it and runs."""
        k = self._key_col()
        if self._pg:
            return (
                f"INSERT INTO {self.keys} ({k}, fingerprint, expires_at) VALUES "
                "(%s, %s, now() + make_interval(secs => %s)) ON CONFLICT DO NOTHING",
                (key, fp, float(ttl_seconds)),
            )
        return (
            f"INSERT IGNORE INTO {self.keys} ({k}, fingerprint, expires_at) VALUES "
            "(%s, %s, CURRENT_TIMESTAMP(6) + INTERVAL %s MICROSECOND)",
            (key, fp, int(ttl_seconds * 1_000_000)),
        )

    def forget(self, key: str) -> Statement:
        """Delete a claim whose body failed (in the claiming transaction)."""
        return (f"DELETE FROM {self.keys} WHERE {self._key_col()} = %s", (key,))

    def read(self, key: str) -> Statement:
        """The stored fingerprint and result, and whether the key has expired."""
        now = "now()" if self._pg else "CURRENT_TIMESTAMP(6)"
        # A locking read on MariaDB: under REPEATABLE READ a plain read could use a snapshot
        # older than the duplicate's commit that our claim just waited for.
        lock = "" if self._pg else " LOCK IN SHARE MODE"
        return (
            f"SELECT fingerprint, result, finished_at, expires_at < {now} AS expired "
            f"FROM {self.keys} WHERE {self._key_col()} = %s{lock}",
            (key,),
        )

    def forget_expired(self, key: str) -> Statement:
        """Delete the key if it expired (then a new claim may take it)."""
        now = "now()" if self._pg else "CURRENT_TIMESTAMP(6)"
        return (
            f"DELETE FROM {self.keys} WHERE {self._key_col()} = %s AND expires_at < {now}",
            (key,),
        )

    def store(self, key: str, result: Any) -> Statement:
        """Store the first call's result, in its transaction."""
        now = "now()" if self._pg else "CURRENT_TIMESTAMP(6)"
        return (
            f"UPDATE {self.keys} SET result = %s, finished_at = {now} WHERE {self._key_col()} = %s",
            (json.dumps(result), key),
        )

    def prune(self, limit: int) -> Statement:
        """Delete up to ``limit`` expired keys."""
        if self._pg:
            return (
                f"DELETE FROM {self.keys} WHERE ctid IN (SELECT ctid FROM {self.keys} "
                "WHERE expires_at < now() LIMIT %s)",
                (limit,),
            )
        return (
            f"DELETE FROM {self.keys} WHERE expires_at < CURRENT_TIMESTAMP(6) LIMIT %s",
            (limit,),
        )

    def mark(self, gid: str, branch: str, op: str, origin: str) -> Statement:
        """Insert a barrier row unless present; rowcount 1 when this one was first."""
        verb = "INSERT" if self._pg else "INSERT IGNORE"
        tail = " ON CONFLICT DO NOTHING" if self._pg else ""
        return (
            f"{verb} INTO {self.barrier} (gid, branch, op, origin) VALUES (%s, %s, %s, %s){tail}",
            (gid, branch, op, origin),
        )


def barrier_plan(op: str) -> list[tuple[str, str]]:
    """The barrier rows ``op`` writes, in order, as (op, origin).

    A cancelling op first writes the prepare row on the prepare's behalf: if that insert
    succeeds, the prepare never ran, so there is nothing to cancel (a "null" cancel) and a
    prepare arriving later finds its row taken and does nothing.
    """
    if op not in BARRIER_OPS:
        raise InvalidQuery(f"unknown barrier operation {op!r}; use one of {', '.join(BARRIER_OPS)}")
    if op in _CANCELS:
        return [("prepare", op), (op, op)]
    return [(op, op)]
