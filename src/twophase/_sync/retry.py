# WARNING: generated from twophase/_async/retry.py by tools/async_to_sync.py.
# Edit the async source and run `python tools/async_to_sync.py`; CI checks they agree.
"""Retry safety on transactions: idempotency keys and the participant barrier (I/O side)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import IdempotencyConflict, InvalidQuery
from ..idempotency import barrier_plan, check_key

if TYPE_CHECKING:
    from .database import Database, Transaction

T = TypeVar("T")

DEFAULT_TTL = 24 * 3600.0


class TransactionRetry:
    """Mixed into Transaction: the retry-safety helpers that run inside it."""

    _db: Database

    def idempotent(
        self,
        key: str,
        fingerprint: str,
        fn: Callable[[Transaction], T],
        *,
        ttl: float = DEFAULT_TTL,
    ) -> Any:
        """Run ``fn(tx)`` once per ``key``; a retry returns the stored result instead.

        The key is claimed in this transaction and the result stored in it, so both
        commit or roll back with the work. A retry with the same key and ``fingerprint``
        returns the first call's result (JSON round-tripped, as stored); the same key with
        another fingerprint raises ``IdempotencyConflict``. A concurrent duplicate waits
        for the first call's transaction, then returns its result (or, if it rolled back,
        runs). The key expires after ``ttl`` seconds (prune with
        ``db.prune_idempotency_keys()``).
        """
        check_key(key)
        check_key(fingerprint, "fingerprint")
        if ttl <= 0:
            raise InvalidQuery(f"ttl must be positive seconds, got {ttl}")
        db = self._db
        db._ensure_retry_tables()
        sql = db._retry_sql
        for _ in range(2):
            claimed = self._tx_run(*sql.claim(key, fingerprint, ttl))
            if claimed.rowcount == 1:
                try:
                    result = json.loads(json.dumps(fn(self._as_tx())))
                except BaseException:
                    # A caller that catches this and commits anyway must not commit a key
                    # with no result: every retry would return nothing without running.
                    self._tx_run(*sql.forget(key))
                    raise
                self._tx_run(*sql.store(key, result))
                return result
            rows = self._tx_run(*sql.read(key))
            if not rows:
                continue  # expired and pruned between our two statements: claim again
            row = rows[0]
            if row["expired"]:
                self._tx_run(*sql.forget_expired(key))
                continue
            if row["fingerprint"] != fingerprint:
                raise IdempotencyConflict(
                    f"idempotency key {key!r} was first used for a different request "
                    "(fingerprints differ); use a new key for a new request"
                )
            return json.loads(row["result"]) if row["result"] is not None else None
        raise IdempotencyConflict(f"idempotency key {key!r} keeps changing hands; retry later")

    def barrier(self, gid: str, branch: str, op: str) -> bool:
        """Whether ``op`` (prepare, commit, rollback, compensate) should run for this branch.

        False for a duplicate, for a prepare that arrives after its rollback, and for a
        rollback or compensation of a branch whose prepare never ran. The record is written
        in this transaction, so it commits exactly when the operation's own work does.
        """
        check_key(gid, "barrier gid")
        check_key(branch, "barrier branch")
        db = self._db
        db._ensure_retry_tables()
        plan = barrier_plan(op)
        first = True
        for step_op, origin in plan:
            rows = self._tx_run(*db._retry_sql.mark(gid, branch, step_op, origin))
            if step_op != op:
                # The prepare row written on a cancel's behalf: inserted means the prepare
                # never ran, so nothing is there to cancel (but duplicates must still see us).
                first = rows.rowcount == 0
                continue
            if rows.rowcount == 0:
                return False
        return first

    # Provided by Transaction.
    def _tx_run(self, sql: str, params: Any) -> Any:
        raise NotImplementedError

    def _as_tx(self) -> Transaction:
        raise NotImplementedError
