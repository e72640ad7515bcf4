# WARNING: generated from twophase/_async/database.py by tools/async_to_sync.py.
# Edit the async source and run `python tools/async_to_sync.py`; CI checks they agree.
"""Database: the seed API (begin/commit/rollback distributed) over one database."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

from .. import _compat, _context
from ..dialects import Dialect, ErrorKind, control_statement
from ..dialects.base import created_objects
from ..errors import (
    DatabaseError,
    IntegrityError,
    InvalidQuery,
    NestedTransactionError,
    NotSupported,
    PermissionDenied,
    PreparedTransactionsDisabled,
    TransactionCommitted,
    TransactionNameInUse,
    TwoPhaseError,
    UnknownTransaction,
)
from ..idempotency import RetrySQL
from ..names import TxName, validate_namespace
from ..observe.audit import AuditLog, AuditSQL, normalize_rows
from ..observe.events import Emitter, Outcome, Step, current_correlation_id, current_principal
from ..observe.tracing import Tracing
from ..outbox import OutboxSQL, check_topic, encode_payload
from ..policy import Policy
from ..protocol import (
    Action,
    Answer,
    PreparedTransaction,
    ReapReport,
    Status,
    finish_answer,
    status_of,
)
from ..sql import Compiled, QueryMethods, Rows, SqlDialect
from .driver import Conn, Lending, Params, Pool
from .retry import DEFAULT_TTL, TransactionRetry

T = TypeVar("T")
Row = dict[str, Any]

log = logging.getLogger("twophase")

_BRANCH_NOT_REAPED = "a global transaction's branch: `twophase recover` finishes it by its decision"

# MariaDB keeps a prepared branch attached to its session until the session lets go; a
# finishing call that races that hand-over waits at most this long.
_ATTACHED_WAIT = 5.0


# Keys handed to the dialect's DELETE at a time by prune_outcomes() (PostgreSQL: one
# statement for them all).
_DELETE_KEYS = 500


class _Runner:
    """Runs compiled builder queries on behalf of a database or a transaction."""

    def __init__(self, dialect: SqlDialect, run: Callable[[str, Params], Rows]):
        self.dialect = dialect
        self._run = run

    def run(self, query: Compiled) -> Rows:
        return self._run(query.sql, query.params)

    def run_first(self, query: Compiled) -> Row | None:
        rows = self._run(query.sql, query.params)
        return rows[0] if rows else None


class Transaction(QueryMethods[Rows, Row | None], TransactionRetry):
    """An open transaction: ordinary, or distributed when ``name`` is set.

    It has the whole query builder and ``execute``; statements that would end or nest the
    transaction (COMMIT, SAVEPOINT, XA ..., nested transactions) raise
    ``NestedTransactionError`` before reaching the server.
    """

    def __init__(self, db: Database, conn: Conn, name: TxName | None) -> None:
        self._db = db
        self._conn = conn
        self._name = name
        self._open = True

    @property
    def name(self) -> str | None:
        """The distributed transaction's name as given (without namespace), else None."""
        if self._name is None:
            return None
        ns = self._db.namespace
        return self._name.full[len(ns) + 1 :] if ns else self._name.full

    @property
    def outbox(self) -> Outbox:
        """Publish messages that exist exactly when this transaction commits."""
        return Outbox(self)

    @property
    def is_distributed(self) -> bool:
        """Whether this transaction will be prepared rather than committed."""
        return self._name is not None

    def execute(self, sql: str, params: Params = None) -> Rows:
        """Run raw SQL inside the transaction; values go in ``params`` (``%s`` placeholders)."""
        return self._run(sql, params, raw=True)

    def _runner(self) -> _Runner:
        return _Runner(self._db.dialect.sql, self._run)

    def _tx_run(self, sql: str, params: Any) -> Rows:
        return self._run(sql, params)

    def _as_tx(self) -> Transaction:
        return self

    def _run(self, sql: str, params: Params, raw: bool = False) -> Rows:
        if not self._open:
            raise InvalidQuery(
                "this transaction has already finished; run statements inside its block"
            )
        if raw:
            self._db._refuse_control(sql, inside=self)
        return self._db._user_statement(self._conn, sql, params)

    def _close(self) -> None:
        self._open = False

    def _nested(self, what: str) -> NoReturn:
        kind = "distributed transaction" if self._name else "transaction"
        raise NestedTransactionError(
            f"{what} inside a {kind}: twophase transactions do not nest and have no "
            "savepoints; finish this one first, or split the work into separate transactions"
        )

    def transaction(self) -> NoReturn:
        """Refused: transactions do not nest."""
        self._nested("transaction()")

    def distributed(self, name: str) -> NoReturn:
        """Refused: distributed transactions do not nest."""
        self._nested("distributed()")

    def begin_distributed(self, name: str, fn: object) -> NoReturn:
        """Refused: distributed transactions do not nest."""
        self._nested("begin_distributed()")

    def savepoint(self, name: str | None = None) -> NoReturn:
        """Refused: a prepared transaction cannot hold savepoints across a crash."""
        self._nested("savepoint()")


class Outbox:
    """The outbox of one transaction (``tx.outbox``)."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    def publish(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Write a message in this transaction; its stable id (for de-duplication).

        ``payload``: bytes, str (UTF-8) or anything JSON-serializable. Messages with the
        same ``key`` are delivered in the order their transactions committed; see
        ``twophase.outbox`` for the precise guarantee.
        """
        check_topic(topic)
        if headers is not None and not isinstance(headers, Mapping):
            raise InvalidQuery(
                f"outbox headers must be a mapping of str to str, got {type(headers).__name__}"
            )
        if key is not None and (not isinstance(key, str) or len(key) > 255 or "\0" in key):
            raise InvalidQuery(
                f"outbox key must be a str of at most 255 characters without NUL, got {key!r:.80}"
            )
        hdrs = {str(k): str(v) for k, v in (headers or {}).items()}
        body = encode_payload(payload, hdrs)
        db = self._tx._db
        db._ensure_tables("outbox", db._outbox_sql.schema())
        msg_id, stmt = db._outbox_sql.publish(topic, body, key, hdrs)
        self._tx._run(*stmt)
        return msg_id


class Staged:
    """A claimed, open distributed transaction: staged work that is not prepared yet."""

    def __init__(
        self,
        db: Database,
        stack: ExitStack,
        conn: Conn,
        name: TxName,
        correlation_id: str,
    ) -> None:
        self._db = db
        self._stack = stack
        self._conn = conn
        self.name = name
        self.correlation_id = correlation_id
        self.tx = Transaction(db, conn, name)
        #: Set once PREPARE succeeded.
        self.prepared = False
        #: Set before prepare() to keep the session after a successful PREPARE, so that
        #: commit_held() runs COMMIT PREPARED on it; release() hands it back otherwise.
        self.hold = False
        self._held: ExitStack | None = None

    def prepare(self) -> None:
        """Prepare the transaction and hand its connection back; on failure roll it back."""
        events = self._db._events
        if not events:
            return self._prepare()
        started = time.time()
        try:
            self._prepare()
        except BaseException as exc:
            outcome = Outcome.PREPARED if self.prepared else Outcome.ROLLED_BACK
            self._db._emit(Step.PREPARE, self.name, outcome, started, self.correlation_id, exc)
            raise
        self._db._emit(Step.PREPARE, self.name, Outcome.PREPARED, started, self.correlation_id)

    def _prepare(self) -> None:
        """Prepare (see :meth:`prepare`).

        Follow-up work after a failure (asking the server, writing the tombstone) happens
        once the connection is back in the pool, so it works even with ``pool_max=1``.
        """
        db, conn, name = self._db, self._conn, self.name
        dialect = db.dialect
        self.tx._close()
        failure: Exception | None = None
        kind: ErrorKind | None = None
        recorded = True
        with self._stack:
            if conn.in_failed_transaction():
                # PostgreSQL would answer PREPARE with a silent rollback here.
                recorded = db._abandon(conn, name)
                failure = DatabaseError(
                    f"a statement inside {str(name)!r} failed and the error was caught, so "
                    "the database aborted the transaction; it was rolled back, not prepared"
                )
            else:
                try:
                    for stmt in dialect.prepare(name):
                        conn.command(stmt)
                except Exception as exc:
                    failure, kind = exc, dialect.classify(exc)
                    if kind is not ErrorKind.CONNECTION:
                        recorded = db._abandon(conn, name)
                else:
                    self.prepared = True
                    if dialect.prepare_detaches_session:
                        conn.discard()
                    elif self.hold:
                        self._held = self._stack.pop_all()
        if failure is None:
            log.debug("prepared %s", name)
            return
        if kind is ErrorKind.CONNECTION:
            # The server may have prepared it before the link broke: ask it.
            if db._prepared_despite_loss(name):
                log.debug("prepared %s (confirmed after a lost connection)", name)
                self.prepared = True
                return
            recorded = False  # the server rolls it back with the lost session
        if not recorded:
            db._record_rollback_quietly(name)
        if isinstance(failure, TwoPhaseError):
            raise failure
        if kind is ErrorKind.UNSUPPORTED:
            raise NotSupported(
                f"{str(name)!r} could not be prepared: {failure}. Temporary tables, "
                "LISTEN/NOTIFY and WITH HOLD cursors cannot be part of a prepared "
                "transaction; move them out of the distributed transaction"
            ) from failure
        db._raise(failure, f"could not prepare {str(name)!r}; it was rolled back")

    def commit_held(self) -> bool:
        """Commit the prepared transaction on the session kept by ``hold``, then hand it
        back; without one, or if that session fails, as ``commit_distributed`` does (a fresh
        connection, retries, the outcome record). True if this call committed it."""
        held, self._held = self._held, None
        db, name = self._db, self.name
        if held is None:
            return db._finish(Action.COMMIT, name, self.correlation_id)
        db._refuse_nesting("commit_distributed()")
        started = time.time()
        try:
            with held:
                self._conn.command(db.dialect.commit_prepared(name))
        except Exception:
            # Whatever happened (a lost session, someone else finished it), the retrying
            # path finds out from the server and answers as a retried commit would.
            log.debug("commit of %s on its own session failed; retrying", name, exc_info=True)
            return db._finish(Action.COMMIT, name, self.correlation_id)
        log.debug("commit %s", name)
        if db._events:
            db._emit(Step.COMMIT, name, Outcome.COMMITTED, started, self.correlation_id)
        return True

    def release(self) -> None:
        """Hand back the session kept by ``hold`` when the commit will not run on it."""
        held, self._held = self._held, None
        if held is not None:
            held.close()

    def abandon(self, reason: str = "abandoned before prepare") -> None:
        """Roll the transaction back (best effort) and hand its connection back."""
        started = time.time()
        self.tx._close()
        with self._stack:
            recorded = self._db._abandon(self._conn, self.name)
        if not recorded:
            self._db._record_rollback_quietly(self.name)
        if self._db._events:
            self._db._emit(
                Step.ROLLBACK,
                self.name,
                Outcome.ROLLED_BACK,
                started,
                self.correlation_id,
                detail=reason,
            )


class Database(QueryMethods[Rows, Row | None]):
    """One database (PostgreSQL or MariaDB/MySQL) and its pool of connections.

    Made by :func:`twophase.connect`; close it with ``close()``, or use it as a
    context manager.
    """

    def __init__(
        self,
        pool: Pool,
        dialect: Dialect,
        *,
        database: str,
        namespace: str | None = None,
        display_url: str = "",
        retry_timeout: float = 10.0,
        principal: str | None = None,
        policy: Policy | None = None,
        events: Emitter | None = None,
        owned: Sequence[AuditLog | Tracing] = (),
    ) -> None:
        self._pool = pool
        self.dialect = dialect
        self.database = database
        self.namespace = validate_namespace(namespace)
        self.display_url = display_url
        self._retry_timeout = retry_timeout
        self._schema_ready = False
        self._prepared_ok = False
        self._retry_sql = RetrySQL(dialect)
        self._outbox_sql = OutboxSQL(dialect)
        self._tables_ready: set[str] = set()
        #: The access policy checked before any SQL of begin/commit/rollback, or None.
        self.policy = policy
        self._events = events or Emitter((), label=database, principal=principal)
        #: The principal used when ``twophase.context(principal=...)`` sets none.
        self.principal = principal
        # Made by connect(audit=True, tracing=True): closed with this database.
        self._owned = tuple(owned)

    def __repr__(self) -> str:
        ns = f" namespace={self.namespace!r}" if self.namespace else ""
        return f"<{type(self).__name__} {self.display_url}{ns}>"

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Close every pooled connection, after waiting up to ``timeout`` seconds in all
        for the audit log and tracing to write what they hold. Prepared transactions stay
        prepared."""
        end = time.monotonic() + timeout
        for ob in self._events.observers:
            if isinstance(ob, AuditLog | Tracing):
                left = max(0.0, end - time.monotonic())
                # One given by the caller may serve other databases too: flush, do not close.
                finish = ob.close if ob in self._owned else ob.flush
                _compat.to_thread(functools.partial(finish, left))
        self._pool.close()

    @property
    def label(self) -> str:
        """This database's name in events and metrics (``connect(label=...)``, by default
        its database name)."""
        return self._events.label or self.database

    @property
    def observers(self) -> tuple[Any, ...]:
        """The observers every step of this database is reported to."""
        return self._events.observers

    def _audit_logs(self) -> list[AuditLog]:
        return [ob for ob in self._events.observers if isinstance(ob, AuditLog)]

    # -- observability and access -----------------------------------------------------

    def _emit(
        self,
        step: Step,
        name: TxName,
        outcome: Outcome,
        started: float,
        correlation_id: str,
        error: BaseException | None = None,
        *,
        detail: str | None = None,
    ) -> None:
        if error is not None and detail is None:
            detail = f"{type(error).__name__}: {error}"
        self._events.emit(
            step,
            name.full,
            outcome,
            started,
            correlation_id=correlation_id,
            branch=name.branch,
            detail=detail,
            error=error,
        )

    def _authorize(self, action: str, name: TxName | None) -> str:
        """The correlation id of a public call, once the policy allows ``action`` on
        ``name`` (None: on everything, checked as ``*``).

        Only the public entry points check: a coordinator's own steps on its branches were
        authorized when its transaction or recovery began. A denial is audited, then raised.
        """
        cid = current_correlation_id() if self._events or self.policy else ""
        policy = self.policy
        if policy is None:
            return cid
        full = "*" if name is None else name.full
        try:
            policy.check(current_principal(self.principal), action, full)
        except PermissionDenied as exc:
            self._events.emit(
                Step(action),
                full,
                Outcome.DENIED,
                time.time(),
                correlation_id=cid,
                branch=None if name is None else name.branch,
                detail=str(exc),
                error=exc,
            )
            raise
        return cid

    def history(self, name: str, *, raw: bool = False) -> list[dict[str, Any]]:
        """The audit events of ``name`` (a transaction, or a global transaction and its
        branches) recorded in this database, oldest first; see ``twophase.observe.audit``.

        Events this process queued are flushed first, so a caller sees its own steps.
        ``raw=True`` takes ``name`` as stored (namespace included) instead of adding this
        database's namespace. ``"*"`` gives the events of calls that act on no one name
        (``reap``, ``recover`` and ``prune`` denials, ``prune_history``), all namespaces'.
        """
        full = "*" if name == "*" else (TxName.make(name) if raw else self._name(name)).full
        for audit in self._audit_logs():
            _compat.to_thread(audit.flush)
        sql = AuditSQL(self.dialect)
        self._ensure_tables("audit", sql.schema())
        rows = self._autocommit(*sql.select(name=full))
        return normalize_rows(rows)

    def prune_history(
        self, older_than: timedelta, *, dry_run: bool = False, batch: int = 10_000
    ) -> int:
        """Delete audit events older than ``older_than`` from this database's audit log;
        how many were deleted (with ``dry_run``: how many would be).

        Deletes in batches of ``batch`` rows, each its own statement, so a large backlog
        never holds long locks. The audit log holds every namespace's events and so does
        the pruning: the policy must grant ``prune`` on the name ``*``. The pruning itself
        is recorded as an event, so the trail says who cut it.
        """
        sql = AuditSQL(self.dialect)

        def ready() -> None:
            self._ensure_tables("audit", sql.schema())

        def count(before: datetime) -> int:
            return int((self._autocommit(*sql.count_before(before)))[0]["n"])

        def deletions(before: datetime) -> Iterator[int]:
            while True:
                deleted = (self._autocommit(*sql.prune(before, batch))).rowcount
                yield deleted
                if deleted < batch:
                    return

        return self._prune(
            "prune_history()", "audit events", older_than, dry_run, batch, ready, count, deletions
        )

    def prune_outcomes(
        self, older_than: timedelta, *, dry_run: bool = False, batch: int = 5_000
    ) -> int:
        """Delete the outcome records of transactions finished longer ago than
        ``older_than``; how many were deleted (with ``dry_run``: how many would be).

        One record is kept per finished name so that a retried commit or rollback gets its
        true answer; past the window it gets ``UnknownTransaction`` instead, and the name
        can be begun again. Choose a window longer than anything may retry, recover or
        reap late (days, not minutes). The record of a transaction still prepared is never
        touched (nor waited for). Walks the table in key order, ``batch`` records a read,
        deleting the old ones by key in short statements. Every namespace's records: the
        policy must grant ``prune`` on ``*``. The pruning is recorded as an event.
        """
        dialect = self.dialect

        def count(before: datetime) -> int:
            return int((self._autocommit(*dialect.count_outcomes(before)))[0]["n"])

        def deletions(before: datetime) -> Iterator[int]:
            after: tuple[str, str] | None = None
            while True:
                page = self._autocommit(*dialect.outcome_page(after, batch, before))
                old = [(row["name"], row["outcome"]) for row in page if row["old"]]
                for i in range(0, len(old), _DELETE_KEYS):
                    for stmt in dialect.delete_outcomes(old[i : i + _DELETE_KEYS], before):
                        yield (self._autocommit(*stmt)).rowcount
                if len(page) < batch:
                    return
                after = (page[-1]["name"], page[-1]["outcome"])

        return self._prune(
            "prune_outcomes()",
            "outcome records",
            older_than,
            dry_run,
            batch,
            self._ensure_ready,
            count,
            deletions,
        )

    def _prune(
        self,
        call: str,
        what: str,
        older_than: timedelta,
        dry_run: bool,
        batch: int,
        ready: Callable[[], None],
        count: Callable[[datetime], int],
        deletions: Callable[[datetime], Iterator[int]],
    ) -> int:
        """What the prunes share: the arguments checked before anything, the policy's
        ``prune`` on ``*``, a dry run that counts, and one event saying how many ``what``
        were deleted (also when it failed midway)."""
        if not isinstance(older_than, timedelta) or older_than <= timedelta(0):
            raise ValueError(
                f"older_than must be a positive datetime.timedelta, got {older_than!r}"
            )
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        self._refuse_nesting(call)
        cid = self._authorize("prune", None)
        started = time.time()
        before = datetime.now(UTC) - older_than
        ready()
        if dry_run:
            return count(before)
        total = 0
        try:
            for deleted in deletions(before):
                total += deleted
        except BaseException as exc:
            self._events.emit(
                Step.PRUNE,
                "*",
                Outcome.FAILED,
                started,
                correlation_id=cid,
                detail=f"{total} {what} deleted before: {type(exc).__name__}: {exc}",
                error=exc,
            )
            raise
        self._events.emit(
            Step.PRUNE,
            "*",
            Outcome.OK,
            started,
            correlation_id=cid,
            detail=f"{total} {what} older than {before.isoformat()} deleted",
        )
        return total

    # -- plain statements -------------------------------------------------------------

    def _runner(self) -> _Runner:
        return _Runner(self.dialect.sql, self._autocommit)

    def execute(self, sql: str, params: Params = None) -> Rows:
        """Run one raw statement in autocommit mode and return its rows."""
        self._refuse_control(sql, inside=None)
        return self._autocommit(sql, params)

    def _autocommit(self, sql: str, params: Params) -> Rows:
        with self._pool.connection() as conn:
            return self._user_statement(conn, sql, params)

    def _user_statement(self, conn: Conn, sql: str, params: Params) -> Rows:
        try:
            return conn.run(sql, params)
        except Exception as exc:
            if self.dialect.classify(exc) is ErrorKind.CONNECTION:
                # Its idle siblings are likely dead too (server restart); the statement
                # itself is not retried: it may not be safe to run twice.
                self._pool.reset_idle()
            self._raise(exc, "the statement failed")

    def _refuse_control(self, sql: str, *, inside: Transaction | None) -> None:
        stmt = control_statement(self.dialect, sql, in_transaction=inside is not None)
        if stmt is None:
            return
        if inside is not None:
            inside._nested(f"{stmt!r}")
        raise NestedTransactionError(
            f"{stmt!r} through execute(): use db.transaction() or db.distributed() to "
            "control transactions, so twophase can keep its guarantees"
        )

    # -- ordinary transactions --------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """An ordinary transaction: committed when the block ends, rolled back on error."""
        self._refuse_nesting("transaction()")
        dialect = self.dialect

        def failed(exc: Exception) -> NoReturn:
            self._raise(exc, "BEGIN failed")

        with self._begun((dialect.begin(),), (dialect.rollback(),), failed) as conn:
            tx = Transaction(self, conn, None)
            token = _context.ACTIVE.set(tx)
            try:
                yield tx
            except BaseException:
                tx._close()
                self._quietly(conn, (dialect.rollback(),))
                raise
            finally:
                _context.ACTIVE.reset(token)
            tx._close()
            self._control(conn, dialect.commit(), "COMMIT failed")

    @contextmanager
    def _begun(
        self,
        stmts: tuple[str, ...],
        abort: tuple[str, ...],
        failed: Callable[[Exception], NoReturn],
        *,
        tpc: bool = False,
    ) -> Iterator[Conn]:
        """A pooled connection on which ``stmts`` (BEGIN, or a claim) succeeded.

        Opening a transaction is always safe to repeat, so a connection lost on the way
        (a restarted server leaves dead connections in the pool) is replaced and the
        statements run again, until ``retry_timeout``. Other errors go to ``failed``.
        """
        with self._open(stmts, abort, failed, tpc=tpc) as conn:
            yield conn

    def _open(
        self,
        stmts: tuple[str, ...],
        abort: tuple[str, ...],
        failed: Callable[[Exception], NoReturn],
        *,
        tpc: bool = False,
    ) -> Lending:
        """:meth:`_begun` without the block: the loan of the connection, already lent, for
        the caller to enter (a block or an exit stack) so it goes back to the pool."""
        deadline = time.monotonic() + self._retry_timeout
        delay = 0.05
        while True:
            lending = self._pool.connection()
            conn = lending.__enter__()
            try:
                for stmt in stmts:
                    conn.command(stmt)
            except Exception as exc:
                try:
                    self._quietly(conn, abort, tpc_error=tpc)
                finally:
                    lending.__exit__(None, None, None)
                lost = self.dialect.classify(exc) is ErrorKind.CONNECTION
                if not lost or time.monotonic() > deadline:
                    failed(exc)
                log.info("connection lost (%s); retrying in %.2fs", exc, delay)
                self._pool.reset_idle()
                _compat.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            except BaseException:
                # Cancelled mid-statement: the session's state is unknown, so it is dropped.
                conn.discard()
                lending.__exit__(None, None, None)
                raise
            return lending

    # -- distributed transactions -----------------------------------------------------

    def _name(self, name: str) -> TxName:
        return TxName.make(name, self.namespace)

    @contextmanager
    def distributed(self, name: str) -> Iterator[Transaction]:
        """Stage work under ``name``; when the block ends the transaction is *prepared*.

        On an exception inside the block the transaction is rolled back and the exception
        propagates; nothing is left prepared. Finish it later, from anywhere, with
        :meth:`commit_distributed` or :meth:`rollback_distributed`.
        """
        txname = self._name(name)
        self._refuse_nesting("distributed()")
        staged = self._stage(txname, self._authorize("begin", txname))
        token = _context.ACTIVE.set(staged.tx)
        try:
            yield staged.tx
        except BaseException as exc:
            staged.abandon(f"the block raised {type(exc).__name__}: {exc}")
            raise
        finally:
            _context.ACTIVE.reset(token)
        staged.prepare()

    def _stage(self, txname: TxName, correlation_id: str | None = None) -> Staged:
        """Open a transaction and claim ``txname`` in it (see Dialect.claim)."""
        events = self._events
        cid = correlation_id or (current_correlation_id() if events else "")
        if not events:
            return self._claim(txname, cid)
        started = time.time()
        try:
            staged = self._claim(txname, cid)
        except BaseException as exc:
            self._emit(Step.BEGIN, txname, Outcome.FAILED, started, cid, exc)
            raise
        self._emit(Step.BEGIN, txname, Outcome.OK, started, cid)
        return staged

    def _claim(self, txname: TxName, cid: str) -> Staged:
        if not (self._schema_ready and self._prepared_ok):  # _ensure_ready's test, inlined
            self._ensure_ready(prepare=True)
        dialect = self.dialect

        def failed(exc: Exception) -> NoReturn:
            kind = dialect.classify(exc)
            if kind in (ErrorKind.NAME_IN_USE, ErrorKind.LOCK_TIMEOUT):
                raise TransactionNameInUse(
                    f"distributed transaction {str(txname)!r} is already active or "
                    "prepared; finish it first, or use another name"
                ) from exc
            if kind is ErrorKind.DUPLICATE_KEY:
                raise TransactionNameInUse(
                    f"distributed transaction {str(txname)!r} was already committed; "
                    "names are single-use once committed, so choose a new name"
                ) from exc
            self._raise(exc, f"could not begin {str(txname)!r}")

        lending = self._open(dialect.claim(txname), dialect.abort(txname), failed, tpc=True)
        stack = ExitStack()
        conn = stack.enter_context(lending)
        return Staged(self, stack, conn, txname, cid)

    def begin_distributed(self, name: str, fn: Callable[[Transaction], T]) -> T:
        """Run ``fn(tx)`` in a transaction, then prepare it under ``name``; return fn's result.

        If ``fn`` raises, the transaction is rolled back and the exception propagates.
        """
        with self.distributed(name) as tx:
            return fn(tx)

    def _prepared_despite_loss(self, name: TxName) -> bool:
        """After a connection loss during PREPARE: True if the server did prepare it."""
        try:
            status = self._on_fresh_connection(self._status, name)
        except TwoPhaseError as again:
            raise DatabaseError(
                f"lost the connection while preparing {str(name)!r} and could not reach the "
                "database since; call status() once it is back to learn whether it is "
                "prepared"
            ) from again
        return status is Status.PREPARED

    def _abandon(self, conn: Conn, name: TxName) -> bool:
        """Roll back a claimed, unprepared transaction, then record the rollback on the same
        connection; False if the record could not be written there (the caller then writes
        it on a fresh connection once this one is back in the pool)."""
        if not self._quietly(conn, self.dialect.abort(name), tpc_error=True):
            return False
        try:
            self._tombstone(conn, name)
        except Exception:
            conn.discard()
            return False
        return True

    def _record_rollback_quietly(self, name: TxName) -> None:
        try:
            self._on_fresh_connection(self._tombstone, name)
        except Exception:
            # The rollback itself happened; only the retry-friendly record is missing.
            log.warning("could not record the rollback of %s", name, exc_info=True)

    def commit_distributed(self, name: str) -> None:
        """Commit the prepared transaction ``name``, from any process. Safe to retry.

        Returns normally if it is (or already was) committed; raises
        ``TransactionRolledBack`` if it was rolled back, ``UnknownTransaction`` if the
        database never saw it.
        """
        txname = self._name(name)
        self._finish(Action.COMMIT, txname, self._authorize("commit", txname))

    def rollback_distributed(self, name: str) -> None:
        """Roll back the prepared transaction ``name``, from any process. Safe to retry.

        Returns normally if it is (or already was) rolled back; raises
        ``TransactionCommitted`` if it was committed, ``UnknownTransaction`` if the
        database never saw it.
        """
        txname = self._name(name)
        self._finish(Action.ROLLBACK, txname, self._authorize("rollback", txname))

    def _finish(
        self,
        action: Action,
        name: TxName,
        correlation_id: str | None = None,
        *,
        detail: str | None = None,
    ) -> bool:
        """Commit or roll back ``name``; True if this call did it, False if it was done."""
        self._refuse_nesting(f"{action.value}_distributed()")
        events = self._events
        cid = correlation_id or (current_correlation_id() if events else "")
        if not events:
            return self._finish_retrying(action, name)
        step = Step(action.value)
        started = time.time()
        try:
            done = self._finish_retrying(action, name)
        except BaseException as exc:
            self._emit(step, name, Outcome.FAILED, started, cid, exc, detail=detail)
            raise
        outcome = (
            Outcome.ALREADY
            if not done
            else (Outcome.COMMITTED if action is Action.COMMIT else Outcome.ROLLED_BACK)
        )
        self._emit(step, name, outcome, started, cid, detail=detail)
        return done

    def _finish_retrying(self, action: Action, name: TxName) -> bool:
        if not self._schema_ready:  # _ensure_ready's test, inlined: this is every commit
            self._ensure_ready()
        deadline = time.monotonic() + _ATTACHED_WAIT
        delay = 0.01
        while True:
            answer = self._on_fresh_connection(self._finish_once, action, name)
            if answer is not Answer.RETRY:
                return answer is Answer.DONE
            if time.monotonic() > deadline:
                raise DatabaseError(
                    f"{str(name)!r} is prepared but held by another session (the one that "
                    "prepared it, or one finishing it); retry once that session lets go"
                )
            _compat.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _finish_once(self, conn: Conn, action: Action, name: TxName) -> Answer:
        dialect = self.dialect
        if action is Action.ROLLBACK:
            # The tombstone goes in only once the name is seen prepared: a rollback of a
            # name never seen must still answer UnknownTransaction, and one racing another
            # rollback must find the other's tombstone.
            if self._is_prepared(conn, name):
                conn.run(*dialect.record_rollback(name))
            stmt = dialect.rollback_prepared(name)
        else:
            stmt = dialect.commit_prepared(name)
        try:
            conn.command(stmt)
        except Exception as exc:
            kind = dialect.classify(exc)
            if dialect.discard_after_tpc_error:
                conn.discard()
            if action is Action.ROLLBACK and kind is ErrorKind.ROLLED_BACK:
                return Answer.DONE
            if kind is ErrorKind.BUSY:
                # Another session is finishing it this instant; its outcome decides ours.
                return Answer.RETRY
            if kind is ErrorKind.PERMISSION:
                raise PermissionDenied(
                    f"the database refused to {action.value} {str(name)!r}: {exc}. Only the "
                    "role that prepared it (or a superuser) may finish it; connect as that role"
                ) from exc
            if kind is not ErrorKind.NOT_FOUND:
                raise
            status = self._status(conn, name)
            return finish_answer(action, status, str(name))
        if action is Action.ROLLBACK:
            # Covers a name that became prepared between the check and the rollback.
            conn.run(*dialect.record_rollback(name))
        log.debug("%s %s", action.value, name)
        return Answer.DONE

    def reap(self, older_than: timedelta, *, dry_run: bool = False) -> ReapReport:
        """Roll back this namespace's prepared transactions older than ``older_than``.

        For transactions whose owner will never come back (a crashed process, a lost
        name). Branches of global transactions are skipped: only their decision log may
        say how they end, and ``recover()`` resolves them by it. A transaction finished
        meanwhile by someone else is skipped; a failed rollback is reported and the others
        still go ahead. The policy must grant ``reap`` (checked against the name ``*``).
        """
        if not isinstance(older_than, timedelta) or older_than < timedelta(0):
            raise ValueError(
                f"older_than must be a non-negative datetime.timedelta, got {older_than!r}"
            )
        self._refuse_nesting("reap()")
        cid = self._authorize("reap", None)
        report = ReapReport(older_than, dry_run)
        for p in self.prepared():
            age = p.age
            if age is None:
                report.skipped.append((p, "age unknown: the database does not say"))
            elif age <= older_than:
                report.younger += 1
            elif p.branch is not None:
                report.skipped.append((p, _BRANCH_NOT_REAPED))
            elif dry_run:
                report.reaped.append(p)
            else:
                self._reap_one(p, report, cid)
        return report

    def _reap_one(self, p: PreparedTransaction, report: ReapReport, cid: str) -> None:
        name = TxName.make(p.full_name)
        started = time.time()
        try:
            done = self._finish_retrying(Action.ROLLBACK, name)
        except (TransactionCommitted, UnknownTransaction) as exc:
            report.skipped.append((p, f"finished meanwhile ({type(exc).__name__})"))
            return
        except TwoPhaseError as exc:
            report.failed.append((p, f"{type(exc).__name__}: {exc}"))
            self._emit(Step.REAP, name, Outcome.FAILED, started, cid, exc)
            return
        if not done:
            report.skipped.append((p, "rolled back meanwhile"))
            return
        report.reaped.append(p)
        self._emit(
            Step.REAP,
            name,
            Outcome.ROLLED_BACK,
            started,
            cid,
            detail=f"prepared {p.age} ago, older than {report.older_than}",
        )

    def status(self, name: str) -> Status:
        """``prepared``, ``committed``, ``rolled_back`` or ``unknown`` (see ``protocol``)."""
        txname = self._name(name)
        self._ensure_ready()
        return self._on_fresh_connection(self._status, txname)

    def _status(self, conn: Conn, name: TxName) -> Status:
        # Prepared first, then the record: see the status table in protocol.py.
        prepared = self._is_prepared(conn, name)
        outcomes = {row["outcome"] for row in conn.run(*self.dialect.outcomes(name))}
        return status_of(
            prepared=prepared,
            committed="committed" in outcomes,
            tombstone="rolled_back" in outcomes,
        )

    def _is_prepared(self, conn: Conn, name: TxName) -> bool:
        rows = conn.run(*self.dialect.list_prepared(name.full))
        return any(p.name == name for p in self.dialect.parse_prepared(rows, ""))

    def _list_prepared_names(self, conn: Conn) -> list[TxName]:
        """Every prepared twophase transaction and branch of this database, any namespace."""
        rows = conn.run(*self.dialect.list_prepared(""))
        return [p.name for p in self.dialect.parse_prepared(rows, self.database)]

    def prepared(self) -> list[PreparedTransaction]:
        """This database's prepared twophase transactions (in this namespace), oldest first.

        Branches of global transactions are listed too, with their ``branch`` qualifier.
        """
        self._ensure_ready()
        return self._on_fresh_connection(self._prepared)

    def _prepared(self, conn: Conn) -> list[PreparedTransaction]:
        prefix = f"{self.namespace}:" if self.namespace else ""
        rows = conn.run(*self.dialect.list_prepared(prefix))
        found = [
            p
            for p in self.dialect.parse_prepared(rows, self.database)
            if p.name.full.startswith(prefix)
        ]
        began: dict[str, Any] = {}
        for sql, params in self.dialect.prepared_times([p.name.record for p in found]):
            for row in conn.run(sql, params):
                began[row["name"]] = row["recorded_at"]
        return sorted(
            (
                PreparedTransaction.make(
                    p.name, prefix, p.prepared_at or began.get(p.name.record), p.database
                )
                for p in found
            ),
            key=PreparedTransaction.sort_key,
        )

    # -- retry safety -----------------------------------------------------------------

    def idempotent(
        self,
        key: str,
        fingerprint: str,
        fn: Callable[[Transaction], T],
        *,
        ttl: float = DEFAULT_TTL,
    ) -> Any:
        """``tx.idempotent`` in a transaction of its own (see Transaction.idempotent)."""
        self._ensure_retry_tables()
        with self.transaction() as tx:
            return tx.idempotent(key, fingerprint, fn, ttl=ttl)

    def prune_idempotency_keys(self, *, batch: int = 10_000) -> int:
        """Delete expired idempotency keys, in batches; how many were deleted."""
        self._ensure_retry_tables()
        total = 0
        while True:
            rows = self._autocommit(*self._retry_sql.prune(batch))
            total += rows.rowcount
            if rows.rowcount < batch:
                return total

    def _ensure_retry_tables(self) -> None:
        self._ensure_tables("retry", self._retry_sql.schema())

    def _ensure_tables(self, kind: str, stmts: tuple[str, ...]) -> None:
        # On a connection of its own: DDL inside the caller's transaction would commit it
        # implicitly on MariaDB.
        if kind not in self._tables_ready:
            self._on_fresh_connection(self._create_schema, stmts)
            self._tables_ready.add(kind)

    def _create_schema(self, conn: Conn, stmts: tuple[str, ...]) -> None:
        """Create twophase's tables if missing, one creator at a time across processes."""
        names = created_objects(stmts)
        if names:
            found = {r["name"] for r in conn.run(*self.dialect.existing_objects(names))}
            if found >= set(names):
                return
        try:
            for sql in self.dialect.serialized_ddl(stmts):
                conn.run(sql)
        except Exception:
            self._quietly(conn, (self.dialect.rollback(),))
            raise

    # -- plumbing ---------------------------------------------------------------------

    def _refuse_nesting(self, what: str) -> None:
        _context.refuse_nesting(what)

    def _ensure_ready(self, *, prepare: bool = False) -> None:
        """Create the outcome table once; before a prepare, check the server allows it."""
        if self._schema_ready and (self._prepared_ok or not prepare):
            return
        self._on_fresh_connection(self._setup, prepare)

    def _setup(self, conn: Conn, prepare: bool) -> None:
        if prepare and not self._prepared_ok:
            check = self.dialect.settings_check()
            if check is not None:
                value = int((conn.run(check))[0]["value"])
                if value <= 0:
                    raise PreparedTransactionsDisabled(
                        f"PostgreSQL at {self.display_url} has max_prepared_transactions = "
                        f"{value}, so it cannot prepare transactions. As a superuser run "
                        "ALTER SYSTEM SET max_prepared_transactions = 100; then restart the "
                        "server (for example: pg_ctlcluster 15 main restart). Or call "
                        "twophase.connect() with no URL to use the embedded PostgreSQL"
                    )
            self._prepared_ok = True
        if not self._schema_ready:
            self._create_schema(conn, self.dialect.schema())
            self._schema_ready = True

    def _on_fresh_connection(self, op: Callable[..., T], *args: Any) -> T:
        """Run an idempotent operation, retrying on a lost connection until retry_timeout."""
        deadline = time.monotonic() + self._retry_timeout
        delay = 0.05
        while True:
            try:
                with self._pool.connection() as conn:
                    return op(conn, *args)
            except TwoPhaseError:
                raise
            except Exception as exc:
                kind = self.dialect.classify(exc)
                if kind is not ErrorKind.CONNECTION or time.monotonic() > deadline:
                    self._raise(exc, "the database call failed")
                log.info("connection lost (%s); retrying in %.2fs", exc, delay)
                self._pool.reset_idle()
                _compat.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _control(self, conn: Conn, sql: str, what: str) -> None:
        try:
            conn.command(sql)
        except Exception as exc:
            self._raise(exc, what)

    def _quietly(self, conn: Conn, stmts: tuple[str, ...], *, tpc_error: bool = False) -> bool:
        """Best-effort rollback; False (and the connection dropped, so the server rolls back
        whatever was not prepared) when it failed."""
        try:
            for stmt in stmts:
                conn.command(stmt)
        except Exception:
            log.debug("rollback failed; dropping the connection", exc_info=True)
            conn.discard()
            return False
        if tpc_error and self.dialect.discard_after_tpc_error:
            conn.discard()
        return True

    def _tombstone(self, conn: Conn, name: TxName) -> None:
        conn.run(*self.dialect.record_rollback(name))

    def _raise(self, exc: Exception, what: str) -> NoReturn:
        """Translate a driver error into the twophase tree, chaining the original."""
        if isinstance(exc, TwoPhaseError):
            raise exc
        kind = self.dialect.classify(exc)
        code = _code(exc)
        if kind is ErrorKind.DISABLED:
            raise PreparedTransactionsDisabled(
                f"{what}: {exc}. Set max_prepared_transactions > 0 and restart PostgreSQL",
                sqlstate=code,
            ) from exc
        if kind is ErrorKind.PERMISSION:
            raise PermissionDenied(f"{what}: {exc}", sqlstate=code) from exc
        if kind in (ErrorKind.DUPLICATE_KEY, ErrorKind.INTEGRITY):
            raise IntegrityError(f"{what}: {exc}", sqlstate=code) from exc
        if kind is ErrorKind.CONNECTION:
            raise DatabaseError(
                f"{what}: lost the connection to {self.display_url} ({exc}); "
                "check the server is up, then retry",
                sqlstate=code,
            ) from exc
        raise DatabaseError(f"{what}: {exc}", sqlstate=code) from exc


def _code(exc: Exception) -> str | None:
    # MariaDB's error number says more than its SQLSTATE class (23000 for every constraint).
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int):
        return str(args[0])
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None
