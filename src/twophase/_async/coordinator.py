"""AsyncCoordinator: one atomic commit across several databases, recovery and deadlines.

The protocol (presumed abort; tables in ``protocol.py``, log rows in ``decisions.py``):

1. Each ``enlist`` opens a branch on a participant, claims ``<name>#<index>.<deadline>`` in
   it and runs the caller's function. A branch on the *log* participant becomes the
   decision branch instead: an ordinary transaction that is never prepared.
2. At the end of the block every branch is prepared, concurrently; branches other
   processes prepare (``expect``) are awaited by name. Any failure or "no": all roll back.
3. The commit decision becomes durable: its row is inserted in the decision branch and
   committed with it, in one round trip (or, with no decision branch, inserted on its own).
   A recovery process that gave up on the transaction has inserted a rolled-back row
   first; the primary key then refuses the commit decision, and everything rolls back.
4. Every prepared branch is committed, concurrently, with retries; on PostgreSQL on the
   session that prepared it, kept since (a fresh one if that fails). A participant that
   stays unreachable raises ``InDoubt``: the decision stands and ``recover()`` finishes it.

Recovery lists every participant's prepared transactions a page at a time, in name order,
and merges the pages, so each global transaction's branches are resolved together while
memory stays bounded by the page size.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from .. import _acompat, _context, testing
from ..decisions import (
    REPORT_SAMPLES,
    BranchRef,
    DecisionLog,
    PreparedBranch,
    RecoveryReport,
    Statement,
    decode_branches,
    prepared_page,
)
from ..dialects import ErrorKind
from ..errors import (
    DeadlineExceeded,
    InDoubt,
    NestedTransactionError,
    PermissionDenied,
    TransactionRolledBack,
    TwoPhaseError,
    UnknownTransaction,
)
from ..names import TxName, validate_name, validate_namespace
from ..observe.audit import AuditLog
from ..observe.events import (
    Emitter,
    Observer,
    Outcome,
    Step,
    current_correlation_id,
    current_principal,
)
from ..policy import Policy
from ..protocol import Action, Decision, Recovery, Status, recovery_action
from ..sql import Rows
from .database import AsyncDatabase, AsyncStaged, AsyncTransaction
from .driver import AsyncConn

T = TypeVar("T")
log = logging.getLogger("twophase.coordinator")

#: The reason recovery writes with the rolled-back decision of an expired transaction.
_EXPIRED = "deadline"

Compensation = Callable[[Any, str], Awaitable[None]]


class AsyncGlobalTransaction:
    """One global transaction; made by :meth:`AsyncCoordinator.transaction`."""

    def __init__(
        self, coord: AsyncCoordinator, name: TxName, deadline: int, correlation_id: str
    ) -> None:
        self._coord = coord
        self.name = name
        self.deadline = deadline
        #: Shared by the events of every step of this transaction, branches included.
        self.correlation_id = correlation_id
        self._staged: list[tuple[str, AsyncStaged]] = []
        self._expected: list[PreparedBranch] = []
        # The decision branch's transaction and the context that lends its connection.
        self._decision_tx: AsyncTransaction | None = None
        self._decision_cm: Any = None  # db._begun(...), entered
        self._compensations = 0
        self._next_index = 1
        self._pending_row = False
        self._open = True

    @property
    def gtrid(self) -> str:
        """The global transaction's name as stored (namespace included)."""
        return self.name.full

    def _check_open(self) -> None:
        if not self._open:
            raise NestedTransactionError(
                f"global transaction {self.gtrid!r} has already ended; begin a new one"
            )
        if _expired(self.deadline, time.time()):
            raise DeadlineExceeded(
                f"global transaction {self.gtrid!r} passed its deadline before it was "
                "decided; it is being rolled back. Give it a longer timeout"
            )

    async def enlist(self, participant: str, fn: Callable[[AsyncTransaction], Awaitable[T]]) -> T:
        """Run ``fn(tx)`` now in a new branch on ``participant``; return fn's result.

        The branch stays open until the block ends, then it is prepared with the others.
        If ``fn`` raises, the exception propagates and the whole global transaction rolls
        back when the block ends.
        """
        self._check_open()
        db = self._coord._participant(participant)
        if participant == self._coord.log_key and self._decision_tx is None:
            # The decision branch: an ordinary transaction whose COMMIT carries the decision.
            dialect = db.dialect

            def failed(exc: Exception) -> NoReturn:
                db._raise(exc, f"could not begin a branch of {self.gtrid!r}")

            cm = db._begun((dialect.begin(),), (dialect.rollback(),), failed)
            conn = await cm.__aenter__()
            self._decision_cm = cm
            self._decision_tx = AsyncTransaction(db, conn, None)
            return await self._run(self._decision_tx, fn)
        index = self._next_index
        self._next_index += 1
        staged = await db._stage(self.name.with_branch(index, self.deadline), self.correlation_id)
        self._staged.append((participant, staged))
        return await self._run(staged.tx, fn)

    async def _run(self, tx: AsyncTransaction, fn: Callable[[AsyncTransaction], Awaitable[T]]) -> T:
        token = _context.ACTIVE.set(tx)
        try:
            return await fn(tx)
        finally:
            _context.ACTIVE.reset(token)

    async def expect(self, participant: str, name: str) -> None:
        """Wait, at commit time, for ``name`` to be prepared on ``participant`` by someone else.

        This is the seed's "commits when all participants signal readiness": a prepared
        transaction *is* the signal. The expectation is written to the decision log at once,
        so recovery can roll the branch back if this coordinator dies before deciding.
        """
        self._check_open()
        db = self._coord._participant(participant)
        self._expected.append(PreparedBranch(participant, db._name(name)))
        refs = [BranchRef(p.participant, p.name.record) for p in self._expected]
        coord, record = self._coord, self._expected[-1].name.record
        # One transaction: recovery finds the branch through the expected row and decides
        # by the pending row, so neither may exist without the other.
        stmts = [coord._log.expect(participant, record, self.gtrid, self.deadline)]
        if not self._pending_row:
            stmts.append(coord._log.decide(self.gtrid, "pending", self.deadline, refs))
        else:
            sql = f"UPDATE {coord._log.decisions} SET branches = %s WHERE gtrid = %s"
            stmts.append((sql, (json.dumps([r.as_json() for r in refs]), self.gtrid)))
        await coord._log_atomic(stmts)
        self._pending_row = True

    async def compensate(self, handler: str, payload: Any = None) -> None:
        """Record, durably and now, a compensation to run if this transaction rolls back.

        ``handler`` names a function registered with ``coordinator.on_compensate``; it is
        called with ``payload`` (JSON-serializable) and a stable key for idempotency.
        """
        self._check_open()
        self._coord._handler(handler)
        self._compensations += 1
        coord = self._coord
        await coord._log_run(
            coord._log.add_compensation(self.gtrid, self._compensations, handler, payload)
        )

    # -- ending -----------------------------------------------------------------------

    def _prepared_refs(self) -> list[BranchRef]:
        refs = [BranchRef(p, s.name.record) for p, s in self._staged]
        return refs + [BranchRef(p.participant, p.name.record) for p in self._expected]

    async def _commit(self) -> None:
        coord = self._coord
        self._open = False
        if _expired(self.deadline, time.time()):
            coord._emit(
                Step.EXPIRE,
                self.gtrid,
                Outcome.ROLLED_BACK,
                time.time(),
                self.correlation_id,
                detail="deadline passed before prepare",
            )
            await self._rollback("deadline passed before prepare")
            raise DeadlineExceeded(f"global transaction {self.gtrid!r} passed its deadline")
        testing.reached("before_prepare")
        try:
            await self._prepare_and_decide()
        except BaseException:
            # Connections kept for phase 2 go back to their pools on every way out.
            await self._release_held()
            raise

    async def _prepare_and_decide(self) -> None:
        coord = self._coord
        failures = await self._prepare_all()
        if failures:
            await self._rollback(f"a branch failed to prepare: {failures[0]}")
            raise TransactionRolledBack(
                f"global transaction {self.gtrid!r} rolled back: a branch could not be "
                f"prepared ({failures[0]})"
            ) from failures[0]
        if not await self._await_expected():
            await self._rollback("an expected branch was not prepared in time")
            raise DeadlineExceeded(
                f"global transaction {self.gtrid!r} rolled back: an expected branch was not "
                "prepared before the deadline (or was rolled back by its owner)"
            )
        testing.reached("before_decision")
        started = time.time()
        try:
            decided = await self._decide()
        except BaseException as exc:
            coord._emit(
                Step.DECISION, self.gtrid, Outcome.IN_DOUBT, started, self.correlation_id, error=exc
            )
            raise
        coord._emit(
            Step.DECISION,
            self.gtrid,
            Outcome.COMMITTED if decided else Outcome.ROLLED_BACK,
            started,
            self.correlation_id,
            detail=None if decided else "a recovery process decided rollback first",
        )
        if not decided:
            await self._rollback("a recovery process decided rollback first (deadline)")
            raise DeadlineExceeded(
                f"global transaction {self.gtrid!r} rolled back: it passed its deadline and "
                "a recovery process rolled it back before the commit decision"
            )
        testing.reached("after_decision")
        await coord._commit_branches(self.gtrid, self._commit_work(), self.correlation_id)

    def _commit_work(self) -> list[tuple[PreparedBranch, Callable[[], Awaitable[object]]]]:
        """Each prepared branch with the call that commits it: on the session that prepared
        it when that session was kept (no second pool checkout), else on a fresh one."""
        coord, cid = self._coord, self.correlation_id
        work: list[tuple[PreparedBranch, Callable[[], Awaitable[object]]]] = [
            (PreparedBranch(p, s.name), s.commit_held) for p, s in self._staged if s.prepared
        ]
        for p in self._expected:
            db = coord._participant(p.participant)
            work.append((p, functools.partial(db._finish, Action.COMMIT, p.name, cid)))
        return work

    async def _release_held(self) -> None:
        for _, staged in self._staged:
            try:
                await staged.release()
            except Exception:
                log.debug("could not hand back the session of %s", staged.name, exc_info=True)

    def _prepared(self) -> list[PreparedBranch]:
        mine = [PreparedBranch(p, s.name) for p, s in self._staged if s.prepared]
        return mine + self._expected

    async def _prepare_all(self) -> list[BaseException]:
        # Keep each branch's session after PREPARE to run its COMMIT PREPARED on it. Not
        # while waiting for expected branches: that polls the participants, and a pool
        # sized to the branches would have no connection left for it.
        hold = not self._expected
        for _, staged in self._staged:
            staged.hold = hold
        if testing.armed():
            # Deterministic order, so a crash point names the same step on every run.
            failures: list[BaseException] = []
            for n, (_, staged) in enumerate(self._staged, 1):
                try:
                    await staged.prepare()
                except Exception as exc:
                    failures.append(exc)
                    break
                testing.reached(f"after_prepare:{n}")
            for _, staged in self._staged[n:] if failures else []:
                await staged.abandon("another branch failed to prepare")
            return failures
        results = await _acompat.settle([s.prepare for _, s in self._staged])
        return [r for r in results if isinstance(r, BaseException)]

    async def _await_expected(self) -> bool:
        delay = 0.01
        waiting = list(self._expected)
        while waiting:
            still = []
            for p in waiting:
                db = self._coord._participant(p.participant)
                status = await db._on_fresh_connection(db._status, p.name)
                if status is Status.ROLLED_BACK or status is Status.COMMITTED:
                    return False  # a branch must be prepared, not finished, to vote yes
                if status is not Status.PREPARED:
                    still.append(p)
            waiting = still
            if not waiting:
                return True
            if _expired(self.deadline, time.time()):
                return False
            await _acompat.sleep(delay)
            delay = min(delay * 2, 0.25)
        return True

    async def _decide(self) -> bool:
        """Make the commit decision durable; False when a rollback decision won the race."""
        coord = self._coord
        logdb = coord._log_db
        dialect = logdb.dialect
        refs = self._prepared_refs()
        if self._pending_row:
            decide_sql: tuple[str, Any] = coord._log.settle_pending(self.gtrid, "committed", None)
        else:
            decide_sql = (coord._log.commit_inline(self.gtrid, self.deadline, refs), None)
        tx, cm = self._decision_tx, self._decision_cm
        if tx is None or cm is None:
            try:
                rows = await coord._log_run(decide_sql)
            except TwoPhaseError as exc:
                if isinstance(exc.__cause__, Exception) and dialect.classify(exc.__cause__) in (
                    ErrorKind.DUPLICATE_KEY,
                    ErrorKind.INTEGRITY,
                ):
                    return False
                return await self._unknown_decision(exc)
            return not self._pending_row or rows.rowcount == 1
        # Consumed here, whatever happens: a later rollback must not touch this connection
        # once it is back in the pool.
        self._decision_tx = self._decision_cm = None
        conn = tx._conn
        tx._close()
        unknown: Exception | None = None
        try:
            if self._pending_row:
                rows = await conn.run(*decide_sql)
                if rows.rowcount != 1:
                    await conn.command(dialect.rollback())
                    return False
                await conn.command(dialect.commit())
            elif dialect.name == "postgresql":
                # One round trip: the decision and the branch commit together.
                await conn.command(f"{decide_sql[0]}; {dialect.commit()}")
            else:
                await conn.command(decide_sql[0])
                await conn.command(dialect.commit())
        except Exception as exc:
            kind = dialect.classify(exc)
            if kind in (ErrorKind.DUPLICATE_KEY, ErrorKind.INTEGRITY):
                await logdb._quietly(conn, (dialect.rollback(),))
                return False
            conn.discard()
            unknown = exc
        finally:
            await cm.__aexit__(None, None, None)
        if unknown is not None:
            await self._release_held()
            return await self._unknown_decision(unknown)
        return True

    async def _unknown_decision(self, exc: BaseException) -> bool:
        """The decision write failed in a way that leaves its fate unknown: ask the log.

        True when the decision is there (phase 2 goes on); otherwise ``InDoubt``, because a
        commit still in flight on the old connection may yet land, so rolling back now could
        contradict it. ``recover()`` settles it either way.
        """
        coord = self._coord
        try:
            rows = await coord._log_run(coord._log.lookup([self.gtrid]))
        except TwoPhaseError:
            rows = None
        if rows and rows[0]["outcome"] == "committed":
            return True
        raise InDoubt(
            f"could not learn whether the commit decision of {self.gtrid!r} was written "
            f"({exc}); recover() will finish or roll back every branch once the log "
            "database is reachable"
        ) from exc

    async def _rollback(self, reason: str) -> None:
        """Roll everything back; a durable rolled-back decision first when others need it."""
        coord = self._coord
        self._open = False
        await self._release_held()
        tx, cm = self._decision_tx, self._decision_cm
        if tx is not None and cm is not None:
            self._decision_tx = self._decision_cm = None
            logdb = coord._log_db
            tx._close()
            try:
                await logdb._quietly(tx._conn, (logdb.dialect.rollback(),))
            finally:
                await cm.__aexit__(None, None, None)
        staged_open = [s for _, s in self._staged if s.tx._open]
        await _acompat.settle([_bind(lambda s: s.abandon(reason), s) for s in staged_open])
        logged = True
        if self._pending_row or self._compensations:
            # Recovery and the compensation runner read the decision log; without this row
            # a pending expectation would wait for its deadline.
            refs = self._prepared_refs()
            log_sql = (
                coord._log.settle_pending(self.gtrid, "rolled_back", reason)
                if self._pending_row
                else coord._log.fence(self.gtrid, self.deadline, refs, reason)
            )
            try:
                await coord._log_run(log_sql)
            except TwoPhaseError:
                # The branches are rolled back below all the same; recover() writes the
                # decision (and runs the compensations) once the log is reachable.
                logged = False
                log.warning("could not record the rollback of %s", self.gtrid, exc_info=True)
        await coord._rollback_branches(self.gtrid, self._prepared(), reason, self.correlation_id)
        if self._compensations and logged:
            await coord.run_compensations()


class _AsyncTransactionBlock:
    """The block of ``coordinator.transaction(...)``: commits or rolls back when it ends.

    A plain class rather than a generator-based context manager: it runs once per global
    transaction, on the hot path.
    """

    __slots__ = ("_coord", "_g", "_name", "_timeout")

    def __init__(self, coord: AsyncCoordinator, name: str, timeout: float) -> None:
        self._coord = coord
        self._name = name
        self._timeout = timeout
        self._g: AsyncGlobalTransaction | None = None

    async def __aenter__(self) -> AsyncGlobalTransaction:
        self._g = await self._coord._begin(self._name, self._timeout)
        return self._g

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        g = self._g
        assert g is not None  # __aenter__ returned it
        if exc_type is None:
            await g._commit()
        elif g._open:
            await g._rollback(f"the block raised {exc_type.__name__}")


class AsyncCoordinator:
    """Coordinates global transactions over named participant databases.

    ``participants`` maps stable keys (they are written to the decision log) to databases;
    ``log`` names the participant whose database keeps the decision log. Every process that
    coordinates or recovers the same transactions must use the same keys.
    """

    def __init__(
        self,
        participants: Mapping[str, AsyncDatabase],
        *,
        log: str,
        namespace: str | None = None,
        concurrency: int = 16,
        observers: Sequence[Observer] | None = None,
        principal: str | None = None,
        policy: Policy | None = None,
    ) -> None:
        if not participants:
            raise ValueError("a coordinator needs at least one participant database")
        for key in participants:
            validate_name(key, what="participant key")
        if log not in participants:
            raise ValueError(
                f"log={log!r} is not a participant; name one of {sorted(participants)}"
            )
        self.participants = dict(participants)
        self.log_key = log
        self.namespace = validate_namespace(namespace)
        self.concurrency = concurrency
        self._log_db = participants[log]
        self._log = DecisionLog(self._log_db.dialect)
        self._log_ready = False
        self._handlers: dict[str, Compensation] = {}
        logdb = participants[log]
        #: Who acts when ``twophase.context(principal=...)`` says nobody.
        self.principal = principal if principal is not None else logdb.principal
        #: Checked before a global transaction begins and before recovery.
        self.policy = policy if policy is not None else logdb.policy
        # The coordinator's own steps (decision, rollback, expiry, recovery, compensation)
        # go to the log database's observers and these (each once); branch steps go to each
        # participant's.
        extra = [ob for ob in observers or () if ob not in logdb._events.observers]
        self._events = (
            Emitter([*logdb._events.observers, *extra], label=log, principal=self.principal)
            if extra
            else logdb._events
        )
        # Whether anyone receives events: without observers no correlation id is made.
        self._observed = bool(self._events) or any(db._events for db in participants.values())

    # -- configuration ----------------------------------------------------------------

    def on_compensate(self, handler: str) -> Callable[[Compensation], Compensation]:
        """Register a compensation function under ``handler`` (a decorator)."""
        validate_name(handler, what="compensation handler name")

        def register(fn: Compensation) -> Compensation:
            self._handlers[handler] = fn
            return fn

        return register

    def _handler(self, handler: str) -> Compensation:
        try:
            return self._handlers[handler]
        except KeyError:
            raise ValueError(
                f"no compensation handler {handler!r}; register it with "
                f"@coordinator.on_compensate({handler!r}) in every process that may run it"
            ) from None

    def _participant(self, key: str) -> AsyncDatabase:
        try:
            return self.participants[key]
        except KeyError:
            raise ValueError(
                f"unknown participant {key!r}; known: {', '.join(sorted(self.participants))}"
            ) from None

    # -- global transactions ----------------------------------------------------------

    def transaction(self, name: str, *, timeout: float = 30.0) -> _AsyncTransactionBlock:
        """A global transaction: commits everywhere when the block ends, or nowhere.

        ``timeout`` (seconds) sets the deadline: a transaction not decided by then is rolled
        back, by this process or, if it died, by ``recover()``.
        """
        return _AsyncTransactionBlock(self, name, timeout)

    async def _begin(self, name: str, timeout: float) -> AsyncGlobalTransaction:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        _context.refuse_nesting("coordinator.transaction()")
        txname = TxName.make(name, self.namespace)
        cid = current_correlation_id() if self._observed else ""
        # The block commits when it ends: both are checked now, before any work.
        self._allow("begin", txname.full, cid)
        self._allow("commit", txname.full, cid)
        await self._ensure_log()
        return AsyncGlobalTransaction(self, txname, int(time.time() + timeout) + 1, cid)

    async def run(
        self,
        name: str,
        branches: Mapping[str, Callable[[AsyncTransaction], Awaitable[Any]]],
        *,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Run one function per participant as one global transaction; their results."""
        results: dict[str, Any] = {}
        async with self.transaction(name, timeout=timeout) as g:
            for key, fn in branches.items():
                results[key] = await g.enlist(key, fn)
        return results

    async def status(self, name: str) -> Decision:
        """The decision log's word on a global transaction."""
        await self._ensure_log()
        gtrid = TxName.make(name, self.namespace).full
        rows = await self._log_run(self._log.lookup([gtrid]))
        return Decision(rows[0]["outcome"]) if rows else Decision.NONE

    async def history(self, name: str) -> list[dict[str, Any]]:
        """The audit events of a global transaction and its branches, oldest first.

        Read from every audit log configured on the coordinator and its participants
        (``audit=True``), each once; with none, from the log database's table.
        """
        gtrid = TxName.make(name, self.namespace).full
        logs: dict[str, AuditLog] = {}
        for emitter in [self._events, *(db._events for db in self.participants.values())]:
            for ob in emitter.observers:
                if isinstance(ob, AuditLog):
                    logs.setdefault(ob.url, ob)
        if not logs:
            return await self._log_db.history(gtrid, raw=True)
        events: list[dict[str, Any]] = []
        for audit in logs.values():
            events += await _acompat.to_thread(functools.partial(audit.history, gtrid))
        return sorted(events, key=lambda e: (e["at"], e["id"]))

    # -- phase 2 and rollback, shared by transactions and recovery ---------------------

    async def _commit_branches(
        self,
        gtrid: str,
        work: Sequence[tuple[PreparedBranch, Callable[[], Awaitable[object]]]],
        correlation_id: str,
    ) -> None:
        if testing.armed():
            for n, (_, commit) in enumerate(work, 1):
                await commit()
                testing.reached(f"after_commit:{n}")
            return
        results = await _acompat.settle([commit for _, commit in work])
        failed = [
            (p, r) for (p, _), r in zip(work, results, strict=True) if isinstance(r, BaseException)
        ]
        if failed:
            p, exc = failed[0]
            if isinstance(exc, TransactionRolledBack):
                raise TwoPhaseError(
                    f"global transaction {gtrid!r} has a commit decision, but its branch "
                    f"{str(p.name)!r} on {p.participant!r} was rolled back by someone else "
                    "(an operator?); the transaction is not atomic: reconcile it by hand"
                ) from exc
            raise InDoubt(
                f"global transaction {gtrid!r} is committed (the decision is durable), but "
                f"{len(failed)} branch(es) could not be reached yet, e.g. {str(p.name)!r} on "
                f"{p.participant!r} ({exc}); recover() will finish them"
            ) from exc

    async def _rollback_branches(
        self, gtrid: str, branches: Sequence[PreparedBranch], reason: str, correlation_id: str
    ) -> None:
        started = time.time()

        async def rollback(p: PreparedBranch) -> None:
            # UnknownTransaction: never prepared (its owner did not get that far).
            with contextlib.suppress(UnknownTransaction):
                await self._participant(p.participant)._finish(
                    Action.ROLLBACK, p.name, correlation_id, detail=reason
                )

        results = await _acompat.settle([_bind(rollback, p) for p in branches])
        for p, r in zip(branches, results, strict=True):
            if isinstance(r, BaseException):
                log.warning("rollback of %s on %s failed: %s", p.name, p.participant, r)
        self._emit(
            Step.ROLLBACK, gtrid, Outcome.ROLLED_BACK, started, correlation_id, detail=reason
        )

    # -- recovery ---------------------------------------------------------------------

    async def recover(
        self, *, dry_run: bool = False, batch: int = 500, samples: int = REPORT_SAMPLES
    ) -> RecoveryReport:
        """Finish every in-doubt branch on every participant by the decision log.

        Branches with a commit decision are committed; without a decision and past their
        deadline, a rolled-back decision is written first and they are rolled back, and
        the transaction's compensations run. Idempotent; any number of processes may run it
        at once: each global transaction is handled by whoever locks its decision row.

        ``batch``: prepared transactions listed (and global transactions resolved) at a
        time; memory is bounded by it. ``samples``: actions and errors the report keeps
        (the counts are exact whatever it is; see ``RecoveryReport``).
        """
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        cid = current_correlation_id()
        self._allow("recover", "*", cid)
        await self._ensure_log()
        report = RecoveryReport(samples=samples)
        prefix = f"{self.namespace}:" if self.namespace else ""
        # Every participant's prepared transactions are listed in pages of at most
        # ``batch``, in name order, and merged: the branches of one global transaction
        # (named "<gtrid>#...") come together from all participants, and are resolved
        # together, while memory stays bounded by the pages, however many branches are in
        # doubt. A branch prepared or finished during the scan is simply seen or not; each
        # branch is resolved by its global transaction's decision either way.
        scans = [_Scan(key, db) for key, db in self.participants.items()]
        while True:
            for scan in scans:
                if not scan.buffer:
                    await self._fill(scan, prefix, batch, report, dry_run, cid)
            if not any(scan.buffer for scan in scans):
                break
            # Global transactions named before this are complete in every buffer: each
            # scan's later pages hold only later names.
            open_scans = [scan for scan in scans if not scan.done]
            frontier = min((scan.buffer[-1].full for scan in open_scans), default=None)
            found = _take(scans, frontier, batch)
            if found:
                await self._recover_batch(sorted(found), found, {}, report, dry_run, cid)
                continue
            # Only the frontier's global transaction is left (it may even fill a whole
            # page): read on where it may continue.
            for scan in open_scans:
                if scan.buffer[-1].full == frontier:
                    await self._fill(scan, prefix, batch, report, dry_run, cid)
        await self._recover_pending(report, dry_run, batch, cid)
        if not dry_run:
            report.compensations += await self.run_compensations()
        return report

    async def _fill(
        self,
        scan: _Scan,
        prefix: str,
        batch: int,
        report: RecoveryReport,
        dry_run: bool,
        cid: str,
    ) -> None:
        """Append the next page of ``scan``'s branches (of this namespace) to its buffer;
        plain names, which may be branches other processes prepared, are resolved through
        the expected-branch table a batch at a time."""
        while not scan.done:
            try:
                names = await self._next_page(scan, prefix, batch)
            except TwoPhaseError as exc:
                report.add_error(f"{scan.key}: {exc}")
                scan.done = True
                break
            added = False
            for name in names:
                if name.branch is None:
                    scan.plain.append(name.record)
                elif name.full.startswith(prefix):
                    scan.buffer.append(name)
                    added = True
            if len(scan.plain) >= batch:
                await self._recover_plain(scan, prefix, report, dry_run, cid)
            if added:
                break
        if scan.done and scan.plain:
            await self._recover_plain(scan, prefix, report, dry_run, cid)

    async def _next_page(self, scan: _Scan, prefix: str, batch: int) -> list[TxName]:
        """The next page of the participant's prepared transactions that recovery looks at
        (see ``decisions.prepared_page``), in name order."""
        db = scan.db
        stmt = prepared_page(db.dialect, scan.after, batch, prefix)
        if stmt is not None:
            rows = await db._on_fresh_connection(_fetch, stmt)
            scan.done = len(rows) < batch
            if rows:
                scan.after = rows[-1]["gid"]
            return [p.name for p in db.dialect.parse_prepared(rows, db.database)]
        if scan.rest is None:
            # XA RECOVER lists every branch at once: keep only the names recovery may act
            # on, and hand them out a page at a time (last first, so the list shrinks).
            listed = await db._on_fresh_connection(db._list_prepared_names)
            scan.rest = sorted(
                (n for n in listed if n.branch is None or n.full.startswith(prefix)),
                key=lambda n: n.record,
                reverse=True,
            )
        page = scan.rest[-batch:]
        del scan.rest[-batch:]
        page.reverse()
        scan.done = not scan.rest
        return page

    async def _recover_plain(
        self, scan: _Scan, prefix: str, report: RecoveryReport, dry_run: bool, cid: str
    ) -> None:
        """Resolve the expected branches among ``scan``'s plain names collected so far."""
        records, scan.plain = scan.plain, []
        found: dict[str, list[PreparedBranch]] = {}
        deadlines: dict[str, int] = {}
        for row in await self._log_run(self._log.expected_of(scan.key, records, prefix)):
            name = TxName(row["record"])
            found.setdefault(row["gtrid"], []).append(PreparedBranch(scan.key, name))
            deadlines[row["gtrid"]] = int(row["deadline"])
        if found:
            await self._recover_batch(sorted(found), found, deadlines, report, dry_run, cid)

    async def _recover_batch(
        self,
        gtrids: list[str],
        found: dict[str, list[PreparedBranch]],
        deadlines: dict[str, int],
        report: RecoveryReport,
        dry_run: bool,
        cid: str,
    ) -> None:
        """Two passes: first make rolled-back decisions durable (committed) for expired
        undecided transactions, then resolve decided ones under row locks. A recovery
        process that dies between the two leaves durable fences, never a rolled-back branch
        whose fence a slow coordinator could still beat."""
        fenced = set() if dry_run else await self._fence_batch(gtrids, found, deadlines, cid)
        logdb = self._log_db
        now = time.time()

        def failed(exc: Exception) -> NoReturn:
            logdb._raise(exc, "could not open the decision log")

        dialect = logdb.dialect
        async with logdb._begun((dialect.begin(),), (dialect.rollback(),), failed) as conn:
            try:
                existing, mine = await self._lock_rows(conn, gtrids)
                commits: list[PreparedBranch] = []
                rollbacks: list[tuple[str, PreparedBranch]] = []
                for gtrid in gtrids:
                    row = existing.get(gtrid)
                    branches, deadline = self._plan(gtrid, found[gtrid], row, deadlines)
                    if row is not None and gtrid not in mine:
                        report.skipped += len(branches)
                        continue
                    decision = Decision(row["outcome"]) if row else Decision.NONE
                    action = recovery_action(decision, _expired(deadline, now))
                    if action is Recovery.WAIT:
                        report.waiting += len(branches)
                        continue
                    if action is Recovery.FENCE_AND_ROLLBACK and not dry_run:
                        report.skipped += len(branches)  # its fence lost a race: next pass
                        continue
                    label = action.name.lower()
                    if gtrid in fenced or (
                        decision is Decision.ROLLED_BACK and row and row["reason"] == _EXPIRED
                    ):
                        # Rolled back by a recovery fence: in this batch, or in an earlier
                        # page or pass (a transaction's branches may span pages).
                        label = "fence_and_rollback"
                    for b in branches:
                        if action is Recovery.COMMIT:
                            commits.append(b)
                        else:
                            rollbacks.append((gtrid, b))
                        report.add_action(gtrid, b.participant, str(b.name), label)
                if dry_run:
                    report.committed += len(commits)
                    report.rolled_back += len(rollbacks)
                    await conn.run(dialect.rollback())
                    return
                await self._resolve(commits, rollbacks, report, cid)
                await conn.run(dialect.commit())
            except BaseException:
                await logdb._quietly(conn, (dialect.rollback(),))
                raise

    async def _fence_batch(
        self,
        gtrids: list[str],
        found: dict[str, list[PreparedBranch]],
        deadlines: dict[str, int],
        cid: str,
    ) -> set[str]:
        """Commit rolled-back decisions for the expired undecided transactions of a batch;
        the names this process fenced."""
        fenced: set[str] = set()
        logdb = self._log_db
        dialect = logdb.dialect
        now = time.time()

        def failed(exc: Exception) -> NoReturn:
            logdb._raise(exc, "could not open the decision log")

        async with logdb._begun((dialect.begin(),), (dialect.rollback(),), failed) as conn:
            try:
                existing, mine = await self._lock_rows(conn, gtrids)
                for gtrid in gtrids:
                    row = existing.get(gtrid)
                    if row is not None and gtrid not in mine:
                        continue
                    branches, deadline = self._plan(gtrid, found[gtrid], row, deadlines)
                    decision = Decision(row["outcome"]) if row else Decision.NONE
                    if recovery_action(decision, _expired(deadline, now)) is not (
                        Recovery.FENCE_AND_ROLLBACK
                    ):
                        continue
                    if decision is Decision.PENDING:
                        sql = self._log.settle_pending(gtrid, "rolled_back", _EXPIRED)
                    else:
                        refs = [BranchRef(b.participant, b.name.record) for b in branches]
                        sql = self._log.fence(gtrid, deadline, refs, _EXPIRED)
                    if (await conn.run(*sql)).rowcount == 1:
                        fenced.add(gtrid)
                await conn.run(dialect.commit())
            except BaseException:
                await logdb._quietly(conn, (dialect.rollback(),))
                raise
        for gtrid in sorted(fenced):
            self._emit(
                Step.EXPIRE,
                gtrid,
                Outcome.ROLLED_BACK,
                now,
                cid,
                detail="undecided past its deadline: rollback decided by recovery",
            )
        return fenced

    async def _lock_rows(
        self, conn: AsyncConn, gtrids: list[str]
    ) -> tuple[dict[str, Any], set[str]]:
        """Decision rows of ``gtrids``, and which of them this session now holds."""
        existing = {r["gtrid"]: r for r in await conn.run(*self._log.lookup(gtrids))}
        if not existing:
            return existing, set()
        locked = await conn.run(*self._log.lock(sorted(existing)))
        return existing, {r["gtrid"] for r in locked}

    def _plan(
        self,
        gtrid: str,
        branches: list[PreparedBranch],
        row: dict[str, Any] | None,
        deadlines: dict[str, int],
    ) -> tuple[list[PreparedBranch], int]:
        """The branches to finish for ``gtrid`` and its deadline."""
        if row is None:
            return branches, deadlines.get(gtrid, min(b.name.deadline or 0 for b in branches))
        # Branches other processes prepared (plain names, no "#") are named in the row; they
        # are finished with the rest (they may not all be prepared). Enlisted ones that were
        # not listed are not prepared any more.
        listed = {(b.participant, b.name.record) for b in branches}
        extra = [
            PreparedBranch(ref.participant, _record_name(ref.record))
            for ref in decode_branches(row["branches"])
            if "#" not in ref.record
            and (ref.participant, ref.record) not in listed
            and ref.participant in self.participants
        ]
        return branches + extra, int(row["deadline"])

    async def _resolve(
        self,
        commits: list[PreparedBranch],
        rollbacks: list[tuple[str, PreparedBranch]],
        report: RecoveryReport,
        cid: str,
    ) -> None:
        started = time.time()

        async def finish(action: Action, p: PreparedBranch) -> bool:
            return await self._participant(p.participant)._finish(
                action, p.name, cid, detail="recovery"
            )

        work = [(Action.COMMIT, p) for p in commits] + [(Action.ROLLBACK, p) for _, p in rollbacks]
        results: list[bool | BaseException] = [False] * len(work)
        todo = iter(enumerate(work))

        async def worker() -> None:
            # Each takes the next branch as soon as its last one is finished: a sliding
            # window of ``concurrency``, with that many calls in flight rather than one
            # per branch (a shared iterator hands each branch to exactly one worker).
            for i, (action, p) in todo:
                try:
                    results[i] = await finish(action, p)
                except Exception as exc:
                    results[i] = exc

        await _acompat.settle([worker for _ in range(min(self.concurrency, len(work)))])
        for (action, p), r in zip(work, results, strict=True):
            if isinstance(r, BaseException):
                if isinstance(r, UnknownTransaction):
                    continue  # finished by someone else between listing and now
                report.in_doubt += 1
                report.add_error(f"{action.value} {p.name} on {p.participant}: {r}")
                self._emit(
                    Step.RECOVER,
                    p.name.full,
                    Outcome.IN_DOUBT,
                    started,
                    cid,
                    participant=p.participant,
                    branch=p.name.branch,
                    error=r,
                    detail=f"{action.value} failed: {r}",
                )
                continue
            if r is False:
                continue  # finished by someone else meanwhile: theirs to count
            if action is Action.COMMIT:
                report.committed += 1
            else:
                report.rolled_back += 1
            self._emit(
                Step.RECOVER,
                p.name.full,
                Outcome.COMMITTED if action is Action.COMMIT else Outcome.ROLLED_BACK,
                started,
                cid,
                participant=p.participant,
                branch=p.name.branch,
            )

    async def _recover_pending(
        self, report: RecoveryReport, dry_run: bool, batch: int, cid: str
    ) -> None:
        """Expected branches of coordinators that died before deciding, past the deadline."""
        logdb = self._log_db
        dialect = logdb.dialect

        def failed(exc: Exception) -> NoReturn:
            logdb._raise(exc, "could not open the decision log")

        async with logdb._begun((dialect.begin(),), (dialect.rollback(),), failed) as conn:
            try:
                prefix = f"{self.namespace}:" if self.namespace else ""
                rows = await conn.run(*self._log.expired_pending(time.time(), batch, prefix))
                rollbacks: list[tuple[str, PreparedBranch]] = []
                expired: list[str] = []
                for row in rows:
                    for ref in decode_branches(row["branches"]):
                        if ref.participant not in self.participants:
                            report.add_error(f"{row['gtrid']}: unknown participant {ref}")
                            continue
                        name = _record_name(ref.record)
                        rollbacks.append((row["gtrid"], PreparedBranch(ref.participant, name)))
                        report.add_action(
                            row["gtrid"], ref.participant, ref.record, "fence_and_rollback"
                        )
                    if not dry_run:
                        settle = self._log.settle_pending(row["gtrid"], "rolled_back", _EXPIRED)
                        await conn.run(*settle)
                        expired.append(row["gtrid"])
                if dry_run:
                    report.rolled_back += len(rollbacks)
                    await conn.run(dialect.rollback())
                    return
                # The rolled-back decisions are committed before any branch is touched.
                await conn.run(dialect.commit())
            except BaseException:
                await logdb._quietly(conn, (dialect.rollback(),))
                raise
        now = time.time()
        for gtrid in expired:
            self._emit(
                Step.EXPIRE,
                gtrid,
                Outcome.ROLLED_BACK,
                now,
                cid,
                detail="expected branches not decided by the deadline: rolled back",
            )
        await self._resolve([], rollbacks, report, cid)

    async def run_compensations(self, *, limit: int = 100) -> int:
        """Run the pending compensations of rolled-back transactions; how many ran.

        Each runs inside a transaction that holds its row (SKIP LOCKED), and is marked done
        in that same transaction: a crash mid-handler leaves it pending, to run again with
        the same key. Handlers must therefore be idempotent by that key.
        """
        logdb = self._log_db
        dialect = logdb.dialect
        ran = 0
        cid = current_correlation_id() if self._events else ""

        def failed(exc: Exception) -> NoReturn:
            logdb._raise(exc, "could not open the decision log")

        while True:
            async with logdb._begun((dialect.begin(),), (dialect.rollback(),), failed) as conn:
                try:
                    prefix = f"{self.namespace}:" if self.namespace else ""
                    rows = await conn.run(*self._log.due_compensations(limit, prefix))
                    ran_before = ran
                    for row in rows:
                        key = f"{row['gtrid']}:{row['seq']}"
                        handler = self._handlers.get(row["handler"])
                        if handler is None:
                            log.warning("no handler %r in this process for %s", row["handler"], key)
                            continue
                        started = time.time()
                        try:
                            await handler(json.loads(row["payload"]), key)
                        except Exception as exc:
                            await conn.run(
                                *self._log.finish_compensation(
                                    row["gtrid"], row["seq"], "pending", repr(exc)
                                )
                            )
                            self._emit(
                                Step.COMPENSATE,
                                row["gtrid"],
                                Outcome.FAILED,
                                started,
                                cid,
                                error=exc,
                                detail=f"{row['handler']} (#{row['seq']}): {exc!r}",
                            )
                            continue
                        await conn.run(
                            *self._log.finish_compensation(row["gtrid"], row["seq"], "done", None)
                        )
                        self._emit(
                            Step.COMPENSATE,
                            row["gtrid"],
                            Outcome.OK,
                            started,
                            cid,
                            detail=f"{row['handler']} (#{row['seq']})",
                        )
                        ran += 1
                    await conn.run(dialect.commit())
                except BaseException:
                    await logdb._quietly(conn, (dialect.rollback(),))
                    raise
            # A full page in which nothing finished holds only failing (or foreign-handler)
            # rows: they stay pending for the next call instead of spinning here.
            if len(rows) < limit or ran == ran_before:
                return ran

    async def compensations(self, name: str) -> list[dict[str, Any]]:
        """The compensations recorded for a global transaction."""
        gtrid = TxName.make(name, self.namespace).full
        return list(await self._log_run(self._log.compensations_of(gtrid)))

    # -- plumbing ---------------------------------------------------------------------

    async def _ensure_log(self) -> None:
        if self._log_ready:
            return
        db = self._log_db
        await db._on_fresh_connection(db._create_schema, self._log.schema())
        self._log_ready = True

    async def _log_atomic(self, stmts: list[tuple[str, Any]]) -> None:
        """Run statements in one transaction on the log database."""
        db = self._log_db
        dialect = db.dialect

        def failed(exc: Exception) -> NoReturn:
            db._raise(exc, "could not write to the decision log")

        async with db._begun((dialect.begin(),), (dialect.rollback(),), failed) as conn:
            try:
                for sql, params in stmts:
                    await conn.run(sql, params)
                await conn.run(dialect.commit())
            except Exception as exc:
                await db._quietly(conn, (dialect.rollback(),))
                db._raise(exc, "could not write to the decision log")

    async def _log_run(self, stmt: tuple[str, Any]) -> Any:
        db = self._log_db
        return await db._autocommit(stmt[0], stmt[1])

    def _emit(
        self,
        step: Step,
        gtrid: str,
        outcome: Outcome,
        started: float,
        cid: str,
        *,
        participant: str | None = None,
        branch: str | None = None,
        detail: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        if not self._events:
            return
        if error is not None and detail is None:
            detail = f"{type(error).__name__}: {error}"
        self._events.emit(
            step,
            gtrid,
            outcome,
            started,
            correlation_id=cid,
            participant=participant or self.log_key,
            branch=branch,
            detail=detail,
            error=error,
        )

    def _allow(self, action: str, name: str, cid: str) -> None:
        if self.policy is None:
            return
        try:
            self.policy.check(current_principal(self.principal), action, name)
        except PermissionDenied as exc:
            self._emit(Step(action), name, Outcome.DENIED, time.time(), cid, error=exc)
            raise


def _bind(fn: Callable[[Any], Awaitable[None]], arg: Any) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        await fn(arg)

    return call


class _Scan:
    """Where recovery's scan of one participant's prepared transactions stands."""

    __slots__ = ("after", "buffer", "db", "done", "key", "plain", "rest")

    def __init__(self, key: str, db: AsyncDatabase) -> None:
        self.key = key
        self.db = db
        self.after = ""  # the last gid listed (keyset paging)
        self.done = False  # nothing more to list
        self.rest: list[TxName] | None = None  # what is left of an unpaged listing
        #: Listed branches not resolved yet, in name order.
        self.buffer: collections.deque[TxName] = collections.deque()
        #: Plain names listed, not looked up yet.
        self.plain: list[str] = []


def _take(scans: list[_Scan], frontier: str | None, limit: int) -> dict[str, list[PreparedBranch]]:
    """Take the branches of up to ``limit`` global transactions named before ``frontier``
    (any, if None) off the scans' buffers, smallest names first, grouped by name."""
    found: dict[str, list[PreparedBranch]] = {}
    while len(found) < limit:
        heads = [scan.buffer[0].full for scan in scans if scan.buffer]
        if not heads:
            break
        gtrid = min(heads)
        if frontier is not None and gtrid >= frontier:
            break
        branches = found[gtrid] = []
        for scan in scans:
            buffer = scan.buffer
            while buffer and buffer[0].full == gtrid:
                branches.append(PreparedBranch(scan.key, buffer.popleft()))
    return found


async def _fetch(conn: AsyncConn, stmt: Statement) -> Rows:
    return await conn.run(*stmt)


def _expired(deadline: float, now: float) -> bool:
    """One rule for every deadline check (recovery, pending rows, the coordinator)."""
    return now > deadline


def _record_name(record: str) -> TxName:
    full, _, branch = record.partition("#")
    return TxName(full, branch or None)
