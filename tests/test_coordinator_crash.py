"""The crash matrix: a real coordinator process is SIGKILLed at every step of the protocol.

Participants: ``orders`` (PostgreSQL ``test``), ``stock`` (PostgreSQL ``test2``) and
``billing`` (MariaDB ``test``). The child (tests/procs/crash_coordinator.py) runs one global
transaction; each enlisted branch inserts the row ``(gid, part)`` into this module's table
on its participant. ``TWOPHASE_CRASH_AT`` arms one crash point, so the child kills itself
with SIGKILL at exactly that step (branches are then prepared and committed one at a time,
in enlist order).

Configurations:

- ``log_pg``: log on ``orders``, enlisted first: the decision branch is PostgreSQL, the two
  prepared branches are ``stock`` (#1) and ``billing`` (#2).
- ``log_mariadb``: log on ``billing``: the decision branch is MariaDB; the three prepared
  branches are ``orders`` (#1), ``stock`` (#2) and a second ``billing`` branch (#3), so a
  prepared XA branch shares its database with the decision branch.
- ``own_decision_pg`` / ``own_decision_mariadb``: the log participant is not enlisted; the
  decision is a row written on its own (PostgreSQL / MariaDB log), after two prepared
  branches on the other two databases.
- ``log_pg_async``: ``log_pg`` with the AsyncCoordinator.

For each point, the test checks the state the crash left (which branches are prepared, the
decision row, which rows are visible), then recovers from this process (polling
``recover()`` until nothing waits; undecided transactions only after their deadline,
decided ones at once), and checks the exact outcome: all rows in every database or in none,
the final decision, the recovery counts, and that nothing is left prepared.

The tests at the end are regression tests for bugs found while writing this matrix and the
soak.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from procs import crash_coordinator as cc
from procs import rawdb

import twophase

CHILD = Path(__file__).parent / "procs" / "crash_coordinator.py"
TIMEOUT = 1  # the global transaction's timeout (s): deadline = int(start + 1) + 1
CHILD_WAIT = 60.0


@dataclass(frozen=True)
class Config:
    log: str
    #: (participant, part) in enlist order; the first on ``log`` is the decision branch.
    enlist: tuple[tuple[str, str], ...]
    mode: str = "sync"

    @property
    def decision_branch(self) -> tuple[str, str] | None:
        return next((e for e in self.enlist if e[0] == self.log), None)

    @property
    def prepared(self) -> list[tuple[str, str]]:
        """The branches that get prepared, in order: index 1, 2, ..."""
        d = self.decision_branch
        out = list(self.enlist)
        if d is not None:
            out.remove(d)
        return out


CONFIGS = {
    "log_pg": Config("orders", (("orders", "a"), ("stock", "a"), ("billing", "a"))),
    "log_mariadb": Config(
        "billing", (("billing", "a"), ("orders", "a"), ("stock", "a"), ("billing", "b"))
    ),
    "own_decision_pg": Config("orders", (("stock", "a"), ("billing", "a"))),
    "own_decision_mariadb": Config("billing", (("orders", "a"), ("stock", "a"))),
    "log_pg_async": Config("orders", (("orders", "a"), ("stock", "a"), ("billing", "a")), "async"),
}


def points_of(cfg: Config) -> list[str]:
    n = len(cfg.prepared)
    return [
        "before_prepare",
        *(f"after_prepare:{i}" for i in range(1, n + 1)),
        "before_decision",
        "after_decision",
        *(f"after_commit:{i}" for i in range(1, n + 1)),
    ]


CASES = [
    pytest.param(name, point, id=f"{name}-{point}")
    for name, cfg in CONFIGS.items()
    for point in [*points_of(cfg), "none"]
]


@dataclass(frozen=True)
class Expected:
    """What one crash point leaves behind, and what recovery must make of it."""

    prepared_now: frozenset[int]  # indexes of branches prepared at the crash
    decided: bool  # the commit decision was durable at the crash
    visible_now: frozenset[tuple[str, str]]  # rows committed at the crash


def expected(cfg: Config, point: str) -> Expected:
    n = len(cfg.prepared)
    every = frozenset(range(1, n + 1))
    decision_row = frozenset([cfg.decision_branch] if cfg.decision_branch else [])
    base, _, k = point.partition(":")
    if base == "before_prepare":
        return Expected(frozenset(), False, frozenset())
    if base == "after_prepare":
        return Expected(frozenset(range(1, int(k) + 1)), False, frozenset())
    if base == "before_decision":
        return Expected(every, False, frozenset())
    if base == "after_decision":
        return Expected(every, True, decision_row)
    if base == "after_commit":
        done = int(k)
        return Expected(
            frozenset(range(done + 1, n + 1)),
            True,
            decision_row | frozenset(cfg.prepared[:done]),
        )
    assert point == "none"
    return Expected(frozenset(), True, decision_row | frozenset(cfg.prepared))


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table() -> Iterator[str]:
    """One table per database: ``(gid, part)``, keyed by both."""
    cc.ensure_databases()
    name = f"tp_cc_{uuid.uuid4().hex[:10]}"
    for url in cc.URLS.values():
        rawdb.create_table(
            url, name, "gid varchar(64) NOT NULL, part varchar(8) NOT NULL, PRIMARY KEY (gid, part)"
        )
    yield name
    for url in cc.URLS.values():
        cc.drop_table(url, name)


@pytest.fixture
def namespace() -> Iterator[str]:
    """This test's namespace: its recovery sees (and its clean-up touches) nothing else."""
    ns = f"cc{uuid.uuid4().hex[:10]}"
    yield ns
    for url in cc.URLS.values():
        cc.rollback_branches(url, ns)  # leftovers of a failed test only
        cc.purge_namespace(url, ns)


# -- helpers --------------------------------------------------------------------------------


def spawn(spec: dict[str, object], crash_at: str | None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop(twophase.testing.ENV, None)
    if crash_at:
        env[twophase.testing.ENV] = crash_at
    return subprocess.Popen(
        [sys.executable, str(CHILD), "run", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def branch_state(ns: str) -> dict[str, set[tuple[str, str]]]:
    return {key: cc.prepared_branches(url, ns) for key, url in cc.URLS.items()}


def rows_of(table: str, gid: str) -> set[tuple[str, str]]:
    found = set()
    for key, url in cc.URLS.items():
        for r in rawdb.query(url, f"SELECT part FROM {table} WHERE gid = %s", (gid,)):
            found.add((key, str(r["part"])))
    return found


def expected_branches(cfg: Config, gtrid: str, deadline: int, idx: frozenset[int]) -> dict:
    want: dict[str, set[tuple[str, str]]] = {key: set() for key in cc.URLS}
    for i in idx:
        key = cfg.prepared[i - 1][0]
        want[key].add((gtrid, f"{i}.{deadline}"))
    return want


@dataclass
class Recovered:
    committed: int = 0
    rolled_back: int = 0
    passes: int = 0
    first_waiting: int = -1
    #: When the passes that finished something ended, and those that found something waiting.
    acted_ends: list[float] = field(default_factory=list)
    waited_begins: list[float] = field(default_factory=list)


def recover_until_idle(coord: twophase.Coordinator, *, limit: float = 30.0) -> Recovered:
    """``recover()`` until a pass finds nothing waiting and does nothing."""
    out = Recovered()
    stop = time.monotonic() + limit
    while True:
        began = time.time()
        report = coord.recover()
        ended = time.time()
        assert report.errors == [], report.errors
        assert report.in_doubt == 0, report
        out.passes += 1
        if out.first_waiting < 0:
            out.first_waiting = report.waiting
        if report.waiting:
            out.waited_begins.append(began)
        if report.committed or report.rolled_back:
            out.acted_ends.append(ended)
        out.committed += report.committed
        out.rolled_back += report.rolled_back
        if not (report.waiting or report.committed or report.rolled_back or report.skipped):
            return out
        assert time.monotonic() < stop, f"recovery did not settle within {limit}s: {out}"
        time.sleep(0.1)


# -- the matrix -----------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "point"), CASES)
def test_crash_then_recover(config: str, point: str, table: str, namespace: str) -> None:
    cfg = CONFIGS[config]
    gid = f"g_{namespace}"  # the table is shared by the module: unique ids
    gtrid = f"{namespace}:{gid}"
    spec = {
        "ns": namespace,
        "log": cfg.log,
        "enlist": cfg.enlist,
        "table": table,
        "gid": gid,
        "timeout": TIMEOUT,
        "mode": cfg.mode,
    }
    exp = expected(cfg, point)
    crash_at = None if point == "none" else point

    child = spawn(spec, crash_at)
    out, err = child.communicate(timeout=CHILD_WAIT)
    lines = out.splitlines()
    assert lines and lines[0].startswith("STAGED "), (out, err)
    deadline = int(lines[0].split()[1])
    if crash_at is None:
        assert child.returncode == 0 and lines[1:] == ["DONE"], (child.returncode, out, err)
    else:
        # Killed by its own SIGKILL at the step, never reaching the end of the block.
        assert child.returncode == -signal.SIGKILL, (child.returncode, out, err)
        assert lines == [lines[0]], out

    # The state the crash left, read from the servers.
    logurl = cc.URLS[cfg.log]
    assert branch_state(namespace) == expected_branches(cfg, gtrid, deadline, exp.prepared_now)
    assert cc.decision_of(logurl, gtrid) == ("committed" if exp.decided else None)
    assert rows_of(table, gid) == exp.visible_now

    dbs = cc.connect_all(namespace)
    try:
        coord = twophase.Coordinator(dbs, log=cfg.log, namespace=namespace)
        rec = recover_until_idle(coord)
        n = len(exp.prepared_now)
        if exp.decided:
            # Committed at once, whatever the deadline: one pass does it, nothing waits.
            assert (rec.committed, rec.rolled_back, rec.first_waiting) == (n, 0, 0), rec
            final_rows = frozenset(cfg.enlist)
            final_decision: str | None = "committed"
        else:
            assert (rec.committed, rec.rolled_back) == (0, n), rec
            if n:
                # Undecided: left alone until the deadline (no pass that ended by then
                # touched it), rolled back after it; a pass that began after the deadline
                # never reports it waiting.
                assert min(rec.acted_ends) > deadline, (rec, deadline)
                assert max(rec.waited_begins, default=0) <= deadline + 0.5, (rec, deadline)
            final_rows = frozenset()
            # Presumed abort: a rolled-back decision (the fence) exists only if recovery
            # had something to roll back.
            final_decision = "rolled_back" if n else None
        assert rows_of(table, gid) == final_rows
        assert cc.decision_of(logurl, gtrid) == final_decision
        assert branch_state(namespace) == {key: set() for key in cc.URLS}
        assert coord.status(gid).value == (final_decision or "none")

        # Idempotent: another pass finds nothing to do.
        again = coord.recover()
        assert (again.committed, again.rolled_back, again.waiting) == (0, 0, 0), again
    finally:
        for db in dbs.values():
            db.close()


# -- a slow coordinator and a recovery process that dies mid-way -----------------------------


class AtomicityViolation(AssertionError):
    """The end state of a global transaction is neither all-committed nor all-rolled-back."""


def test_recovery_killed_after_rollback_lets_slow_coordinator_commit(
    table: str, namespace: str
) -> None:
    """A coordinator stalls after preparing (alive, past its deadline). A recovery process
    fences the transaction and rolls its branches back, and is SIGKILLed before its log
    transaction commits. The coordinator then resumes: its commit decision must fail
    (the transaction was rolled back), but the fence died with the recovery process."""
    cfg = CONFIGS["log_pg"]
    gid = f"g_{namespace}"  # the table is shared by the module: unique ids
    spec = {
        "ns": namespace,
        "log": cfg.log,
        "enlist": cfg.enlist,
        "table": table,
        "gid": gid,
        "timeout": TIMEOUT,
        "pause_at": "before_decision",
    }
    coordinator = spawn(spec, None)
    recovery: subprocess.Popen[str] | None = None
    try:
        assert coordinator.stdout is not None and coordinator.stdin is not None
        staged = coordinator.stdout.readline()
        assert staged.startswith("STAGED "), staged
        deadline = int(staged.split()[1])
        assert coordinator.stdout.readline().strip() == "PAUSED before_decision"
        while time.time() <= deadline + 0.2:
            time.sleep(0.05)

        recovery = subprocess.Popen(
            [
                sys.executable,
                str(CHILD),
                "recover",
                json.dumps({"ns": namespace, "log": cfg.log, "pause_after_resolve": True}),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert recovery.stdout is not None
        assert recovery.stdout.readline().strip() == "RESOLVED"
        # Both prepared branches are rolled back now; the fence is not committed yet.
        assert branch_state(namespace) == {key: set() for key in cc.URLS}
        recovery.send_signal(signal.SIGKILL)
        assert recovery.wait(CHILD_WAIT) == -signal.SIGKILL

        coordinator.stdin.write("go\n")
        coordinator.stdin.flush()
        out, err = coordinator.communicate(timeout=CHILD_WAIT)
    finally:
        for proc in (coordinator, recovery):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    dbs = cc.connect_all(namespace)
    try:
        recover_until_idle(twophase.Coordinator(dbs, log=cfg.log, namespace=namespace))
    finally:
        for db in dbs.values():
            db.close()
    rows = rows_of(table, gid)
    decision = cc.decision_of(cc.URLS[cfg.log], f"{namespace}:{gid}")
    # The only correct end: rolled back everywhere (the coordinator passed its deadline and
    # a recovery process rolled branches back).
    if (rows, decision) != (set(), "rolled_back"):
        raise AtomicityViolation(
            f"rows {sorted(rows)}, decision {decision!r}; coordinator said {out!r} {err!r}"
        )


# -- phase 2 racing recovery ------------------------------------------------------------------


class SpuriousError(AssertionError):
    """A finishing call failed although the transaction ended exactly as asked."""


def test_concurrent_commits_of_one_prepared_name_both_succeed(namespace: str) -> None:
    """Phase 2 of a live coordinator and a recover() pass may commit the same branch at the
    same moment (recovery commits decided transactions at once). Commit is idempotent: both
    calls must return normally. Two threads race ``commit_distributed`` on one name, 50
    rounds (about a third of the rounds collide on this machine)."""
    url = cc.URLS["orders"]
    a = twophase.connect(url, namespace=namespace, pool_max=2)
    b = twophase.connect(url, namespace=namespace, pool_max=2)
    failures: list[str] = []
    try:
        for i in range(50):
            name = f"c{i}"
            a.begin_distributed(name, lambda tx: tx.execute("SELECT 1"))
            barrier = threading.Barrier(2)

            def commit(
                db: twophase.Database, name: str = name, barrier: threading.Barrier = barrier
            ) -> None:
                barrier.wait()
                try:
                    db.commit_distributed(name)
                except twophase.TwoPhaseError as exc:
                    failures.append(f"{name}: {type(exc).__name__}: {exc}")

            threads = [threading.Thread(target=commit, args=(db,)) for db in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert a.status(name) is twophase.Status.COMMITTED
    finally:
        a.close()
        b.close()
    if failures:
        raise SpuriousError(f"{len(failures)} of 100 commits failed, e.g. {failures[0]}")


# -- namespaces and the shared decision log --------------------------------------------------


def test_recover_runs_only_its_own_namespaces_compensations(namespace: str) -> None:
    """Namespace ``a`` records a compensation whose handler fails, so it stays pending. A
    coordinator of namespace ``b`` on the same log database, with a handler of the same name,
    must not run it. (Regression: ``due_compensations`` did not filter by namespace; found
    by the soak, fixed in abd22b9.)"""
    other = f"{namespace}b"
    dbs_a = cc.connect_all(namespace, ["orders"])
    dbs_b = cc.connect_all(other, ["orders"])
    ran_by_b: list[str] = []
    try:
        a = twophase.Coordinator(dbs_a, log="orders", namespace=namespace)
        b = twophase.Coordinator(dbs_b, log="orders", namespace=other)

        @a.on_compensate("undo")
        def fail(payload: object, key: str) -> None:
            raise RuntimeError("the handler of a fails; its compensation stays pending")

        @b.on_compensate("undo")
        def record(payload: object, key: str) -> None:
            ran_by_b.append(key)

        with pytest.raises(RuntimeError, match="abandon"), a.transaction("t1") as g:
            g.compensate("undo", {"order": 1})
            raise RuntimeError("abandon")
        assert [c["state"] for c in a.compensations("t1")] == ["pending"]

        report = b.recover()
    finally:
        for db in (*dbs_a.values(), *dbs_b.values()):
            db.close()
        cc.purge_namespace(cc.URLS["orders"], namespace)  # a's pending compensation too
        cc.purge_namespace(cc.URLS["orders"], other)
    if ran_by_b or report.compensations:
        raise SpuriousError(f"namespace {other!r} ran {ran_by_b} (report: {report.compensations})")


# -- start-up must not wait for in-doubt branches --------------------------------------------


class Hang(AssertionError):
    """A process did not get past its start-up within the allowed time."""


def test_recovery_starts_while_an_outbox_branch_is_in_doubt(namespace: str) -> None:
    """A branch that published to the outbox is prepared (in doubt). A new process publishes
    its first message (it may wait for the branch: fine); a new recovery process must still
    start and finish its pass, since it is what resolves in-doubt branches. Runs on
    ``test2`` so that a hang, while it lasts, blocks only that database. (Regression: the
    outbox's ``CREATE INDEX IF NOT EXISTS`` waited for the branch under the database-wide DDL
    lock and every new process queued behind it; found by the soak, fixed in abd22b9.)"""
    url = cc.URLS["stock"]
    topic = f"cc.{namespace}"
    db = twophase.connect(url, namespace=namespace, pool_max=2)
    children: list[subprocess.Popen[str]] = []
    try:
        db.begin_distributed("in_doubt", lambda tx: tx.outbox.publish(topic, {"n": 1}))

        def child(command: str, spec: dict[str, object]) -> subprocess.Popen[str]:
            proc = subprocess.Popen(
                [sys.executable, str(CHILD), command, json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            children.append(proc)
            return proc

        child("publish", {"ns": namespace, "participant": "stock", "topic": topic})
        time.sleep(2.0)  # the publisher is now waiting for the in-doubt branch
        recovery = child("recover", {"ns": namespace, "log": "stock"})
        try:
            out, err = recovery.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            raise Hang(
                "recover() in a new process did not finish within 10 s while an outbox "
                "branch was prepared"
            ) from None
        assert recovery.returncode == 0, (out, err)
    finally:
        with contextlib.suppress(twophase.TwoPhaseError):
            db.rollback_distributed("in_doubt")
        for proc in children:
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        db.close()
        with contextlib.suppress(Exception):  # the publisher's message: nobody relays it
            rawdb.query(url, "DELETE FROM twophase_outbox WHERE topic = %s", (topic,))
