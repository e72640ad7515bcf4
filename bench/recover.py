"""How fast does Coordinator.recover() resolve 10,000 in-doubt branches, and in how much memory?

Creates N global transactions frozen at the coordinator's worst moment -- the commit decision
is durable in database A, the branch in database B is still prepared -- exactly as the
library leaves them (same gids, decision rows, claim rows; checked against a real crash at
start-up), then times ``Coordinator.recover()`` in a fresh process resolving all of them,
and records how far that process's peak RSS grew. By default N = 1,000 and 10,000,
interleaved, 3 repeats each, so the two sizes show whether memory stays flat. Afterwards it
checks that every business row is committed and nothing is left prepared.

PostgreSQL must allow >= N prepared transactions (max_prepared_transactions; a restart is
needed to raise it). The benchmark checks, and prints how to raise it; with --configure it
raises it itself (ALTER SYSTEM + one restart at the start) and restores the old value at the
end (one more restart). With --scratch it restarts nothing: it runs against a throwaway
cluster of its own (initdb in a temporary directory, the limit raised there).

    .venv/bin/python bench/recover.py [--scratch | --configure] [--sizes 1000,10000] [--json]

See bench/README.md for how to read the output and why the runs are set up as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import platform
import re
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

# A sibling script, not a package: bench/ is on sys.path when this file is run.
from coordinator import (
    Admin,
    ensure_database,
    machine_busy_jiffies,
    source_revision,
    wait_for_quiet,
)

import twophase
from twophase import testing
from twophase.decisions import DECISIONS, BranchRef, DecisionLog, encode_branches
from twophase.dialects import PostgresDialect
from twophase.dialects.base import OUTCOME_TABLE
from twophase.names import PG_GID_PREFIX, TxName

DEFAULT_URL_A = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_URL_B = "postgresql://postgres@127.0.0.1:5432/test2"
TABLE = "bench_recover_rows"
PAYLOAD = "benchmark payload, 32 bytes long"
TIMEOUT = 30.0  # the global transactions' timeout: it only sets the deadline in the gids
TARGET_BRANCHES = 10_000
TARGET_SECONDS = 10.0
# What --configure raises max_prepared_transactions to (at least): the largest size plus
# room for the start-up check and for other people's prepared transactions meanwhile.
CONFIGURE_TO = 11_000
HEADROOM_PCT = 5
SERVER_WAIT = 120.0
APIS = ("sync", "async", "hand", "hand16")
BASELINES = ("hand", "hand16")
# A round some other recovery process interfered with (one without a namespace, e.g.
# `twophase recover` run by hand on the same databases, finishes our branches too: that
# is allowed) is thrown away and run again, this many times at most.
MAX_ATTEMPTS = 3


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout is just the report (or the JSON)."""
    print(msg, file=sys.stderr, flush=True)


def with_app_name(url: str, app: str) -> str:
    """``url`` tagged with application_name, so the benchmark's sessions can be told apart."""
    return f"{url}{'&' if '?' in url else '?'}application_name={app}"


# --------------------------------------------------------------------------------------
# In-doubt global transactions, made the cheap way
# --------------------------------------------------------------------------------------

_DIALECT = PostgresDialect()
_LOG = DecisionLog(_DIALECT)


@dataclass
class Batch:
    """One set of in-doubt global transactions: names ``<ns>:<tag>.<i>``, row ids from 0."""

    ns: str
    tag: str
    count: int
    deadline: int = field(default_factory=lambda: int(time.time() + TIMEOUT) + 1)

    def name(self, i: int) -> TxName:
        """The global transaction ``i``; its branch on B is index 1 (A's is the decision)."""
        return TxName.make(f"{self.tag}.{i:06d}", self.ns)

    def branch(self, i: int) -> TxName:
        """The branch on B, named as GlobalTransaction.enlist names it."""
        return self.name(i).with_branch(1, self.deadline)

    @property
    def prefix(self) -> str:
        """Every global name of this batch starts with this."""
        return f"{self.ns}:{self.tag}."


def decision_sql(batch: Batch, ids: range) -> str:
    """The decision branch's commit of each global transaction: business row + decision.

    The decision is the library's own statement (DecisionLog.commit_inline, the one that
    rides in the decision branch's COMMIT), so the rows are byte for byte what it writes.
    Literals are safe: names are [a-z0-9.:-], ids ints.
    """
    rows = ", ".join(f"({i}, '{PAYLOAD}')" for i in ids)
    decisions = "; ".join(
        _LOG.commit_inline(
            batch.name(i).full, batch.deadline, [BranchRef("b", batch.branch(i).record)]
        )
        for i in ids
    )
    return f"BEGIN; INSERT INTO {TABLE} (id, payload) VALUES {rows}; {decisions}; COMMIT"


def branch_sql(batch: Batch, i: int) -> str:
    """Branch ``i`` on B, prepared in one round trip: the library's claim (BEGIN and the
    outcome row), the business row, the library's PREPARE TRANSACTION."""
    branch = batch.branch(i)
    (claim,) = _DIALECT.claim(branch)
    (prepare,) = _DIALECT.prepare(branch)
    return f"{claim}; INSERT INTO {TABLE} (id, payload) VALUES ({i}, '{PAYLOAD}'); {prepare}"


@dataclass
class SetupResult:
    """What making one batch cost (not part of the measurement)."""

    decisions_seconds: float
    prepare_seconds: float
    checkpoint_seconds: float


def make_in_doubt(
    url_a: str, url_b: str, batch: Batch, workers: int, checkpoint: bool
) -> SetupResult:
    """Create ``batch``: decisions committed in A, branches prepared in B.

    That is the state a coordinator leaves when it dies right after its decision
    (crash point ``after_decision``), for every transaction of the batch at once.
    """
    t0 = time.perf_counter()
    with psycopg.connect(url_a, autocommit=True) as conn:
        for start in range(0, batch.count, 1000):
            conn.execute(decision_sql(batch, range(start, min(start + 1000, batch.count))).encode())
    t1 = time.perf_counter()
    # Each PREPARE TRANSACTION waits for its own WAL flush, so one connection would make
    # ~1,000/s; several at once share flushes (group commit). Threads suffice: the work
    # is waiting on the server.
    errors: list[BaseException] = []

    def prepare_slice(k: int) -> None:
        try:
            with psycopg.connect(url_b, autocommit=True) as conn:
                for i in range(k, batch.count, workers):
                    conn.execute(branch_sql(batch, i).encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=prepare_slice, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    t2 = time.perf_counter()
    if checkpoint:
        # See the README: it moves every branch's two-phase state from the WAL into a
        # pg_twophase file, as for branches in doubt across a checkpoint or a restart, and
        # no timed checkpoint lands inside one measurement but not another.
        with psycopg.connect(url_b, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    return SetupResult(t1 - t0, t2 - t1, time.perf_counter() - t2)


# --------------------------------------------------------------------------------------
# The measured recovery, in a fresh child process
# --------------------------------------------------------------------------------------


def _rss_kb() -> int:
    """This process's resident set now, in KiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def backend_ticks(url: str, app: str) -> dict[int, int]:
    """CPU ticks (utime + stime) so far of each server backend whose application_name is
    ``app`` (the recovery process's connections), read from /proc: the server is local."""
    with psycopg.connect(url, autocommit=True) as conn:
        pids = [
            pid
            for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,)
            ).fetchall()
        ]
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state, ...
        except OSError:
            continue  # a remote server, or a backend that went away
        out[pid] = int(rest[11]) + int(rest[12])
    return out


class Meter:
    """Wall time, CPU (this process and its server backends), peak RSS, Python allocations
    of one recovery, measured inside the recovery process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.url, self.app = spec["url_b"], spec["app"]
        self.traced: bool = spec["tracemalloc"]

    def start(self) -> None:
        gc.collect()
        self.ticks0 = backend_ticks(self.url, self.app)
        if self.traced:
            tracemalloc.start()
        self.rss0 = _rss_kb()
        self.peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.j0 = machine_busy_jiffies()
        self.c0 = time.process_time()
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        t1, c1, j1 = time.perf_counter(), time.process_time(), machine_busy_jiffies()
        peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        traced = None
        if self.traced:
            traced = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        # Backends that connected during the recovery (pools grow) count from zero: their
        # start-up is part of the recovery too.
        ticks1 = backend_ticks(self.url, self.app)
        server = sum(t - self.ticks0.get(pid, 0) for pid, t in ticks1.items())
        busy = None
        if self.j0 and j1 and j1[1] > self.j0[1]:
            busy = 100.0 * (j1[0] - self.j0[0]) / (j1[1] - self.j0[1])
        return {
            "seconds": t1 - self.t0,
            "client_cpu_seconds": c1 - self.c0,
            "server_cpu_seconds": server / os.sysconf("SC_CLK_TCK") if ticks1 else None,
            "machine_busy_pct": busy,
            "rss_before_kb": self.rss0,
            "maxrss_before_kb": self.peak0,
            "maxrss_after_kb": peak1,
            # ru_maxrss is the peak since the process began; before the recovery it is about
            # the current RSS (nothing big ran yet), so the difference is the recovery's.
            "rss_growth_kb": max(0, peak1 - self.peak0),
            "traced_peak_bytes": traced,
        }


def _summary(report: twophase.RecoveryReport) -> dict[str, Any]:
    return {
        "committed": report.committed,
        "rolled_back": report.rolled_back,
        "waiting": report.waiting,
        "skipped": report.skipped,
        "in_doubt": report.in_doubt,
        "actions": len(report.actions) + report.actions_omitted,
        "errors": report.errors[:5],
        "error_count": len(report.errors) + report.errors_omitted,
    }


def child_recover(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``recover()`` once, as a recovery process would, and measure it.

    A fresh process per measurement: peak RSS (ru_maxrss) only ever grows, so a process
    that had made 10,000 branches, or recovered before, would hide the growth.
    """
    url_a, url_b, ns, app = spec["url_a"], spec["url_b"], spec["ns"], spec["app"]
    meter = Meter(spec)
    if spec["api"] in ("hand", "hand16"):
        return child_hand(spec, meter)
    if spec["api"] == "async":

        async def run() -> dict[str, Any]:
            dbs = {
                "a": await twophase.connect_async(with_app_name(url_a, app)),
                "b": await twophase.connect_async(with_app_name(url_b, app)),
            }
            try:
                coord = twophase.AsyncCoordinator(dbs, log="a", namespace=ns)
                meter.start()
                report = await coord.recover()
                return meter.stop() | _summary(report)
            finally:
                for db in dbs.values():
                    await db.close()

        return asyncio.run(run())
    # Default pool sizes (pool_max 20 >= the coordinator's 16 concurrent finishing calls):
    # what a recovery process started by hand or by cron would have.
    sync_dbs = {
        "a": twophase.connect(with_app_name(url_a, app)),
        "b": twophase.connect(with_app_name(url_b, app)),
    }
    try:
        sync_coord = twophase.Coordinator(sync_dbs, log="a", namespace=ns)
        meter.start()
        sync_report = sync_coord.recover()
        return meter.stop() | _summary(sync_report)
    finally:
        for sync_db in sync_dbs.values():
            sync_db.close()


HAND_THREADS = 16  # the Coordinator's default concurrency


def child_hand(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """The least any recovery of these branches must do, by hand with psycopg: the baseline.

    List B's prepared branches of the namespace, read which have a commit decision in A
    (500 per query, as recover() batches, with one array parameter), and COMMIT PREPARED
    each from 16 threads with a connection each. ``hand`` pulls from one queue, so a thread
    starts its next commit as soon as its last one returns; ``hand16`` runs them in
    lock-step groups of 16, each group waiting for its slowest, as ``recover()`` does
    (``_resolve``), to show what that structure costs by itself. What both leave out, and
    recover() must do: lock the decision rows against a concurrent recovery, handle
    rollbacks, deadlines and retries, write the audit trail.
    """
    url_a = with_app_name(spec["url_a"], spec["app"])
    url_b = with_app_name(spec["url_b"], spec["app"])
    gid_prefix = f"{PG_GID_PREFIX}{spec['ns']}:"
    local = threading.local()
    conns: list[psycopg.Connection[Any]] = []
    gone: list[str] = []  # finished by someone else between our listing and our commit

    def commit(gid: str) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            # Connecting is part of the recovery, as the library's pools grow inside it.
            conn = local.conn = psycopg.connect(url_b, autocommit=True)
            conns.append(conn)
        try:
            # gids hold [a-z0-9.:#-] only: safe to inline (no parameters allowed).
            conn.execute(f"COMMIT PREPARED '{gid}'".encode())
        except psycopg.errors.UndefinedObject:
            gone.append(gid)  # list.append is atomic

    with (
        psycopg.connect(url_a, autocommit=True) as conn_a,
        psycopg.connect(url_b, autocommit=True) as conn_b,
    ):
        meter.start()
        listed = conn_b.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            " AND left(gid, %s) = %s",
            (len(gid_prefix), gid_prefix),
        ).fetchall()
        by_gtrid: dict[str, list[str]] = {}
        for (gid,) in listed:
            by_gtrid.setdefault(gid[len(PG_GID_PREFIX) :].partition("#")[0], []).append(gid)
        gtrids = sorted(by_gtrid)
        todo: collections.deque[str] = collections.deque()
        for start in range(0, len(gtrids), 500):
            rows = conn_a.execute(
                f"SELECT gtrid FROM {DECISIONS} WHERE gtrid = ANY(%s) AND outcome = 'committed'",
                (gtrids[start : start + 500],),
            ).fetchall()
            for (gtrid,) in rows:
                todo.extend(by_gtrid[gtrid])
        listed_count = len(todo)
        errors: list[BaseException] = []
        if spec["api"] == "hand16":
            with ThreadPoolExecutor(max_workers=HAND_THREADS) as pool:
                work = list(todo)
                for start in range(0, len(work), HAND_THREADS):
                    futures = [
                        pool.submit(commit, gid) for gid in work[start : start + HAND_THREADS]
                    ]
                    for future in futures:
                        if (exc := future.exception()) is not None:
                            errors.append(exc)
        else:

            def worker() -> None:
                try:
                    while True:
                        try:
                            gid = todo.popleft()  # deque.popleft is atomic: a thread-safe queue
                        except IndexError:
                            return
                        commit(gid)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=worker) for _ in range(HAND_THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        # Measured with every connection still open, so their backends' CPU counts.
        measured = meter.stop()
        for conn in conns:
            conn.close()
        if errors:
            raise errors[0]
    return measured | {
        "committed": listed_count - len(gone),
        "rolled_back": 0,
        "waiting": 0,
        "skipped": len(gone),
        "in_doubt": 0,
        "actions": listed_count,
        "errors": [],
        "error_count": 0,
    }


def child_crash(spec: dict[str, Any]) -> None:
    """Run one real global transaction and die (SIGKILL) right after its commit decision."""
    dbs = {"a": twophase.connect(spec["url_a"]), "b": twophase.connect(spec["url_b"])}
    coord = twophase.Coordinator(dbs, log="a", namespace=spec["ns"])
    row = int(spec["row"])
    testing.arm("after_decision")
    with coord.transaction(spec["name"], timeout=TIMEOUT) as g:
        sql = f"INSERT INTO {TABLE} (id, payload) VALUES (%s, %s)"
        g.enlist("a", lambda tx: tx.execute(sql, (row, PAYLOAD)))
        g.enlist("b", lambda tx: tx.execute(sql, (row, PAYLOAD)))
    raise SystemExit("the crash point did not fire")


def run_child(spec: dict[str, Any], profile: str | None = None) -> subprocess.CompletedProcess[str]:
    """This script again, in a fresh interpreter, with ``spec`` (under py-spy if profiling)."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    if profile:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        # Raw collapsed stacks of every thread that is running (not idle): where the
        # recovery process spends its CPU, the finishing threads included.
        cmd = [spy, "record", "--rate", "500", "--format", "raw", "-o", profile, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def child_result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The child's JSON line (py-spy, when used, adds its own lines around it)."""
    if proc.returncode != 0:
        raise RuntimeError(f"the recovery process failed:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"the recovery process printed no result:\n{proc.stdout[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def prepared_of(admin: Admin, prefix: str) -> list[str]:
    """gids of prepared transactions (any database) whose global name starts with prefix."""
    gid_prefix = PG_GID_PREFIX + prefix
    rows = admin.execute(
        "SELECT gid FROM pg_prepared_xacts WHERE left(gid, %s) = %s ORDER BY gid",
        (len(gid_prefix), gid_prefix),
    ).fetchall()
    return [gid for (gid,) in rows]


def locked_tables(admin_b: Admin, gid: str) -> list[str]:
    """Tables the prepared transaction ``gid`` holds locks on (it must be in B)."""
    rows = admin_b.execute(
        "SELECT DISTINCT l.relation::regclass::text FROM pg_locks l"
        " JOIN pg_locks x ON x.virtualtransaction = l.virtualtransaction AND x.pid IS NULL"
        " JOIN pg_prepared_xacts p ON x.locktype = 'transactionid'"
        "  AND x.transactionid = p.transaction"
        " WHERE p.gid = %s AND l.pid IS NULL AND l.locktype = 'relation'"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (gid,),
    ).fetchall()
    return sorted(name for (name,) in rows)


def decision_of(admin_a: Admin, gtrid: str) -> tuple[Any, ...] | None:
    """The decision row, without its timestamp."""
    return admin_a.execute(
        f"SELECT outcome, deadline, branches, reason FROM {DECISIONS} WHERE gtrid = %s",
        (gtrid,),
    ).fetchone()


def fidelity_check(plan: Plan, admin_a: Admin, admin_b: Admin) -> dict[str, Any]:
    """Compare a branch made by make_in_doubt with one a real coordinator left by crashing.

    The coordinator runs in a child process armed to SIGKILL itself right after its commit
    decision (twophase.testing, crash point ``after_decision``). Both must look the same
    to recovery -- gid shape, decision row, what the prepared branch holds -- and both must
    end committed, claim row included, after one recover().
    """
    batch = Batch(plan.ns, "chk", 1)
    crash_name = "chk.crash"
    crash_row = 1_000_000  # the synthetic one uses id 0
    make_in_doubt(plan.url_a, plan.url_b, batch, workers=1, checkpoint=False)
    proc = run_child(
        {
            "mode": "crash",
            "url_a": plan.url_a,
            "url_b": plan.url_b,
            "ns": plan.ns,
            "name": crash_name,
            "row": crash_row,
        }
    )
    problems: list[str] = []
    if proc.returncode != -9:
        problems.append(f"the crashing child exited with {proc.returncode}: {proc.stderr[-500:]}")
    synth, crashed = batch.branch(0), None
    for gid in prepared_of(admin_a, f"{plan.ns}:{crash_name}"):
        crashed = gid
    shape = re.compile(r"tp:[a-z0-9-]+:chk\.[a-z0-9]+#1\.\d{10}")
    if crashed is None or not shape.fullmatch(crashed) or not shape.fullmatch(synth.pg_gid):
        problems.append(f"gid shapes differ: crashed {crashed!r}, synthetic {synth.pg_gid!r}")
    crash_full = f"{plan.ns}:{crash_name}"
    crash_record = crashed.removeprefix(PG_GID_PREFIX) if crashed else ""
    crash_decision = decision_of(admin_a, crash_full)
    synth_decision = decision_of(admin_a, batch.name(0).full)
    expected = {
        crash_full: ("committed", encode_branches([BranchRef("b", crash_record)]), None),
        batch.name(0).full: ("committed", encode_branches([BranchRef("b", synth.record)]), None),
    }
    for gtrid, row in ((crash_full, crash_decision), (batch.name(0).full, synth_decision)):
        if row is None or (row[0], row[2], row[3]) != expected[gtrid]:
            problems.append(f"decision row of {gtrid}: {row!r}, expected {expected[gtrid]!r}")
    crash_locks = locked_tables(admin_b, crashed) if crashed else []
    synth_locks = locked_tables(admin_b, synth.pg_gid)
    if crash_locks != synth_locks:
        problems.append(f"locks differ: crashed {crash_locks}, synthetic {synth_locks}")
    # One recover() for both, then both must be committed the same way.
    proc = run_child(
        {
            "mode": "recover",
            "api": "sync",
            "url_a": plan.url_a,
            "url_b": plan.url_b,
            "ns": plan.ns,
            "tracemalloc": False,
            "app": f"{plan.ns}-check",
        }
    )
    recovered = child_result(proc) if proc.returncode == 0 else None
    if recovered is None or recovered["committed"] != 2:
        problems.append(f"recover() of the two: {recovered or proc.stderr[-500:]}")
    for record in (crash_record, synth.record):
        outcome = admin_b.execute(
            f"SELECT outcome FROM {OUTCOME_TABLE} WHERE name = %s", (record,)
        ).fetchall()
        if outcome != [("committed",)]:
            problems.append(f"claim row of {record} after recovery: {outcome}")
    for admin, where in ((admin_a, "A"), (admin_b, "B")):
        rows = admin.execute(f"SELECT id FROM {TABLE} ORDER BY id").fetchall()
        if rows != [(0,), (crash_row,)]:
            problems.append(f"business rows in {where} after recovery: {rows}")
    left = prepared_of(admin_a, f"{plan.ns}:chk")
    if left:
        problems.append(f"still prepared: {left}")
    clear_batch(admin_a, admin_b, f"{plan.ns}:chk")
    return {
        "ok": not problems,
        "problems": problems,
        "crashed_gid": crashed,
        "synthetic_gid": synth.pg_gid,
        "locked_tables": synth_locks,
        "decision_row": synth_decision[0] if synth_decision else None,
    }


def verify(admin_a: Admin, admin_b: Admin, batch: Batch) -> dict[str, Any]:
    """After recovery: everything of the batch committed, on both sides, nothing prepared."""
    n, p = len(batch.prefix), batch.prefix
    counts = {
        "still_prepared": len(prepared_of(admin_a, p)),
        "rows_a": admin_a.execute(f"SELECT count(*) FROM {TABLE}").fetchone(),
        "rows_b": admin_b.execute(f"SELECT count(*) FROM {TABLE}").fetchone(),
        "claims_committed": admin_b.execute(
            f"SELECT count(*) FROM {OUTCOME_TABLE} WHERE left(name, %s) = %s"
            " AND outcome = 'committed'",
            (n, p),
        ).fetchone(),
        "decisions_committed": admin_a.execute(
            f"SELECT count(*) FROM {DECISIONS} WHERE left(gtrid, %s) = %s"
            " AND outcome = 'committed'",
            (n, p),
        ).fetchone(),
    }
    out: dict[str, Any] = {
        k: (v[0] if isinstance(v, tuple) else v) for k, v in counts.items() if v is not None
    }
    out["ok"] = out["still_prepared"] == 0 and all(
        out[k] == batch.count
        for k in ("rows_a", "rows_b", "claims_committed", "decisions_committed")
    )
    return out


def clear_batch(admin_a: Admin, admin_b: Admin, prefix: str) -> None:
    """Remove a batch's rows, so every round starts from the same (empty) state."""
    for gid in prepared_of(admin_a, prefix):
        # Only after a failure: the branch is ours, and it lives in B.
        admin_b.execute(f"ROLLBACK PREPARED '{gid}'".encode())
    for admin in (admin_a, admin_b):
        admin.execute(f"TRUNCATE {TABLE}")
    n = len(prefix)
    admin_a.execute(f"DELETE FROM {DECISIONS} WHERE left(gtrid, %s) = %s", (n, prefix))
    admin_b.execute(f"DELETE FROM {OUTCOME_TABLE} WHERE left(name, %s) = %s", (n, prefix))
    # The log tables are shared with everyone; 10,000 dead rows in their indexes would make
    # the next round's lookups slower than the first's (autovacuum may be off).
    admin_a.execute(f"VACUUM {DECISIONS}")
    admin_b.execute(f"VACUUM {OUTCOME_TABLE}")


# --------------------------------------------------------------------------------------
# max_prepared_transactions: check, and with --configure raise and restore
# --------------------------------------------------------------------------------------


@dataclass
class Setting:
    """max_prepared_transactions as the server has it, and where the value came from."""

    value: int
    source: str  # pg_settings.source: 'configuration file', 'default', ...
    sourcefile: str | None
    data_directory: str
    shared_memory_mb: int | None


def read_setting(admin: Admin) -> Setting:
    row = admin.execute(
        "SELECT setting::int, source, sourcefile FROM pg_settings"
        " WHERE name = 'max_prepared_transactions'"
    ).fetchone()
    assert row is not None
    # shared_memory_size (PostgreSQL >= 15) shows what the raised limit costs in memory.
    shm = admin.value("SELECT setting::int FROM pg_settings WHERE name = 'shared_memory_size'")
    return Setting(row[0], row[1], row[2], str(admin.value("SHOW data_directory")), shm)


def how_to_raise(need: int, cluster: Sequence[str]) -> str:
    """The instructions printed when the server allows too few prepared transactions."""
    return (
        f"As a superuser run\n"
        f"    ALTER SYSTEM SET max_prepared_transactions = {need};\n"
        f"then restart PostgreSQL, e.g.\n"
        f"    pg_ctlcluster --skip-systemctl-redirect {' '.join(cluster)} restart\n"
        "(this disconnects every session of the server). Or run this benchmark with "
        "--configure, which does both and restores the old value at the end."
    )


def restart_cluster(cluster: Sequence[str], admin: Admin) -> float:
    """Restart the PostgreSQL cluster; seconds until it accepted connections again."""
    admin.drop()
    t0 = time.monotonic()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "restart"],
        check=True,
        capture_output=True,
        text=True,
        timeout=SERVER_WAIT,
    )
    admin.conn()  # waits (up to SERVER_WAIT) until it accepts connections
    return time.monotonic() - t0


def _rescue(saved: Setting, cluster: Sequence[str]) -> None:
    """The server did not come back with the new value: put the old one back by hand.

    ALTER SYSTEM needs a running server, so edit postgresql.auto.conf (which is what
    ALTER SYSTEM writes) and start it.
    """
    auto = Path(saved.data_directory) / "postgresql.auto.conf"
    lines = [
        line
        for line in auto.read_text().splitlines()
        if not line.strip().startswith("max_prepared_transactions")
    ]
    if saved.sourcefile and saved.sourcefile.endswith("postgresql.auto.conf"):
        lines.append(f"max_prepared_transactions = '{saved.value}'")
    auto.write_text("\n".join(lines) + "\n")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "start"],
        check=False,
        capture_output=True,
        timeout=SERVER_WAIT,
    )


def configure(admin: Admin, target: int, cluster: Sequence[str]) -> tuple[Setting, dict[str, Any]]:
    """Raise max_prepared_transactions to ``target`` (one restart); the old setting."""
    saved = read_setting(admin)
    if not shutil.which("pg_ctlcluster") or not Path(saved.data_directory).is_dir():
        raise SystemExit(
            "--configure needs the server on this machine, managed by pg_ctlcluster; "
            + how_to_raise(target, cluster)
        )
    log(f"configure: max_prepared_transactions {saved.value} -> {target}, restarting PostgreSQL")
    admin.execute(f"ALTER SYSTEM SET max_prepared_transactions = {int(target)}".encode())
    try:
        seconds = restart_cluster(cluster, admin)
    except (subprocess.SubprocessError, psycopg.OperationalError) as exc:
        log(f"configure: PostgreSQL did not restart with {target} ({exc}); restoring {saved.value}")
        _rescue(saved, cluster)
        raise SystemExit(
            f"PostgreSQL would not start with max_prepared_transactions={target}"
        ) from exc
    now = read_setting(admin)
    if now.value != target:
        raise SystemExit(f"max_prepared_transactions is {now.value} after restarting, not {target}")
    log(
        f"configure: up again after {seconds:.1f} s; shared memory {saved.shared_memory_mb} MB "
        f"-> {now.shared_memory_mb} MB"
    )
    return saved, {
        "raised_from": saved.value,
        "raised_to": target,
        "restart_seconds": round(seconds, 2),
        "shared_memory_mb_before": saved.shared_memory_mb,
        "shared_memory_mb_raised": now.shared_memory_mb,
    }


def restore(admin: Admin, saved: Setting, cluster: Sequence[str]) -> dict[str, Any]:
    """Put the old max_prepared_transactions back (one restart), if it is safe to."""
    prepared = admin.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone()
    count = int(prepared[0]) if prepared else 0
    if count > saved.value:
        # PostgreSQL refuses to start with more prepared transactions than it allows.
        msg = (
            f"NOT restored: {count} prepared transactions exist, more than the old limit "
            f"{saved.value}; finish them, then ALTER SYSTEM SET max_prepared_transactions = "
            f"{saved.value} and restart"
        )
        log(f"restore: {msg}")
        return {"restored": False, "message": msg}
    if saved.sourcefile and saved.sourcefile.endswith("postgresql.auto.conf"):
        stmt = f"ALTER SYSTEM SET max_prepared_transactions = {int(saved.value)}"
    else:
        # It came from postgresql.conf or the default: dropping the override restores it.
        stmt = "ALTER SYSTEM RESET max_prepared_transactions"
    log(f"restore: {stmt}, restarting PostgreSQL")
    admin.execute(stmt.encode())
    seconds = restart_cluster(cluster, admin)
    now = read_setting(admin).value
    log(f"restore: up again after {seconds:.1f} s; max_prepared_transactions = {now}")
    return {"restored": now == saved.value, "value": now, "restart_seconds": round(seconds, 2)}


@dataclass
class Scratch:
    """A throwaway PostgreSQL cluster of the benchmark's own (``--scratch``)."""

    data_dir: Path
    bin_dir: Path
    port: int
    user: str | None  # the account that runs it when we are root

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"


def _as_user(user: str | None, cmd: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def start_scratch(bin_dir: Path, max_prepared: int) -> Scratch:
    """initdb and start a cluster in a temporary directory, allowing ``max_prepared``
    prepared transactions, on a free port of 127.0.0.1; no other server is touched."""
    user = None
    if os.geteuid() == 0:
        user = "postgres"  # PostgreSQL refuses to run as root
    data = Path(tempfile.mkdtemp(prefix="tpbr-pg-"))
    if user:
        shutil.chown(data, user)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
    ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w"]
    try:
        _server_command(_as_user(user, [*initdb, "-E", "UTF8", "--no-sync"]))
        with open(data / "postgresql.conf", "a") as conf:
            # The shared test server's settings that matter here, and the raised limit.
            conf.write(
                f"\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{data}'\n"
                f"max_prepared_transactions = {max_prepared}\n"
                "max_connections = 100\nshared_buffers = 128MB\nautovacuum = off\n"
            )
        _server_command(_as_user(user, [*ctl, "-t", "60", "start"]))
    except BaseException:
        shutil.rmtree(data, ignore_errors=True)
        raise
    scratch = Scratch(data, bin_dir, port, user)
    for dbname in ("test", "test2"):
        ensure_database(scratch.url(dbname))
    return scratch


def _server_command(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SERVER_WAIT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")


def stop_scratch(scratch: Scratch) -> None:
    """Stop the scratch cluster and delete it."""
    ctl = [str(scratch.bin_dir / "pg_ctl"), "-D", str(scratch.data_dir), "-m", "fast", "-w"]
    subprocess.run(_as_user(scratch.user, [*ctl, "stop"]), capture_output=True, timeout=SERVER_WAIT)
    shutil.rmtree(scratch.data_dir, ignore_errors=True)


def pg_bin_dir() -> Path:
    """The PostgreSQL server binaries (pg_config's, else the newest Debian install)."""
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and (Path(out.stdout.strip()) / "initdb").exists():
            return Path(out.stdout.strip())
    installs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts)
    if not installs:
        raise SystemExit("--scratch needs PostgreSQL's server binaries (initdb, pg_ctl)")
    return installs[-1].parent


def cluster_of(admin: Admin, override: str | None) -> list[str]:
    """Version and name of the cluster for pg_ctlcluster (Debian sets cluster_name)."""
    if override:
        return override.split()
    name = str(admin.value("SHOW cluster_name"))
    if "/" in name:
        return name.split("/", 1)
    major = str(admin.value("SHOW server_version_num"))[:2]
    return [major, "main"]


# --------------------------------------------------------------------------------------
# Orchestration and reporting
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything one benchmark invocation does."""

    url_a: str
    url_b: str
    sizes: list[int]
    repeat: int
    apis: list[str]
    workers: int
    checkpoint: bool
    tracemalloc: bool
    profile: str | None
    settle: float
    quiet_pct: float
    ns: str


@dataclass
class RoundResult:
    """One measured recovery."""

    api: str
    branches: int
    repeat: int
    position: int
    seconds: float
    client_cpu_seconds: float
    server_cpu_seconds: float | None
    machine_busy_pct: float | None
    rss_before_kb: int
    rss_growth_kb: int
    traced_peak_bytes: int | None
    committed: int
    in_doubt: int
    skipped: int
    error_count: int
    errors: list[str]
    verified: dict[str, Any]
    setup: dict[str, float]
    busy_pct_before: float | None
    load_avg_1m_before: float
    attempt: int = 1  # > 1 when another recovery process spoiled earlier attempts


def one_round(
    plan: Plan,
    admin_a: Admin,
    admin_b: Admin,
    api: str,
    size: int,
    tag: str,
    *,
    traced: bool,
    profile: str | None = None,
) -> tuple[dict[str, Any], SetupResult, dict[str, Any], float | None, float]:
    """Make ``size`` in-doubt transactions, recover them in a child, verify, clear."""
    batch = Batch(plan.ns, tag, size)
    try:
        setup = make_in_doubt(plan.url_a, plan.url_b, batch, plan.workers, plan.checkpoint)
        quiet = wait_for_quiet(plan.settle, plan.quiet_pct) if plan.settle else None
        load = os.getloadavg()[0]
        proc = run_child(
            {
                "mode": "recover",
                "api": api,
                "url_a": plan.url_a,
                "url_b": plan.url_b,
                "ns": plan.ns,
                "tracemalloc": traced,
                "app": f"{plan.ns}-{tag}",
            },
            profile,
        )
        measured = child_result(proc)
        checked = verify(admin_a, admin_b, batch)
    finally:
        clear_batch(admin_a, admin_b, batch.prefix)
    return measured, setup, checked, quiet, load


def run_all(
    plan: Plan, admin_a: Admin, admin_b: Admin
) -> tuple[list[RoundResult], list[dict[str, Any]]]:
    """Every (api, size), ``repeat`` times, sizes interleaved; then the tracemalloc rounds."""
    results: list[RoundResult] = []
    cells = [(api, size) for api in plan.apis for size in plan.sizes]
    n = 0
    for rep in range(plan.repeat):
        # Rotate the order each repeat, so drift (and what a round leaves behind, e.g. in
        # the shared log tables) hits every size alike.
        order = cells[rep % len(cells) :] + cells[: rep % len(cells)]
        for position, (api, size) in enumerate(order):
            for attempt in range(1, MAX_ATTEMPTS + 1):
                n += 1
                measured, setup, checked, quiet, load = one_round(
                    plan, admin_a, admin_b, api, size, f"r{n:03d}", traced=False
                )
                if not checked["ok"] or measured["committed"] == size:
                    break
                # The data is right but this process did not finish all of it: another
                # recovery process took part, and the timing means nothing.
                log(
                    f"  rep {rep + 1}/{plan.repeat} {api:5s} {size:6d} branches: another "
                    f"recovery process finished {size - measured['committed']} of them; "
                    f"{'again' if attempt < MAX_ATTEMPTS else 'kept, marked'}"
                )
            r = RoundResult(
                api=api,
                branches=size,
                repeat=rep,
                position=position,
                seconds=measured["seconds"],
                client_cpu_seconds=measured["client_cpu_seconds"],
                server_cpu_seconds=measured["server_cpu_seconds"],
                machine_busy_pct=measured["machine_busy_pct"],
                rss_before_kb=measured["rss_before_kb"],
                rss_growth_kb=measured["rss_growth_kb"],
                traced_peak_bytes=None,
                committed=measured["committed"],
                in_doubt=measured["in_doubt"],
                skipped=measured["skipped"],
                error_count=measured["error_count"],
                errors=measured["errors"],
                verified=checked,
                setup=asdict(setup),
                busy_pct_before=quiet,
                load_avg_1m_before=round(load, 2),
                attempt=attempt,
            )
            results.append(r)
            log(
                f"  rep {rep + 1}/{plan.repeat} {api:5s} {size:6d} branches: recover() "
                f"{r.seconds:6.2f} s ({size / r.seconds:7.0f}/s), "
                f"RSS +{r.rss_growth_kb / 1024:.1f} MB, committed {r.committed}, "
                f"verified {'ok' if checked['ok'] else checked}; "
                f"setup {setup.decisions_seconds + setup.prepare_seconds:.1f} s + checkpoint "
                f"{setup.checkpoint_seconds:.1f} s; busy before {quiet}%"
            )
    traced: list[dict[str, Any]] = []
    if plan.tracemalloc:
        # Separate, untimed rounds: tracemalloc slows every allocation down severalfold.
        for api in (a for a in plan.apis if a not in BASELINES):
            for size in plan.sizes:
                n += 1
                measured, _, checked, _, _ = one_round(
                    plan, admin_a, admin_b, api, size, f"t{n:03d}", traced=True
                )
                traced.append(
                    {
                        "api": api,
                        "branches": size,
                        "traced_peak_bytes": measured["traced_peak_bytes"],
                        "rss_growth_kb": measured["rss_growth_kb"],
                        "seconds_under_tracemalloc": measured["seconds"],
                        "verified": checked["ok"],
                    }
                )
                log(
                    f"  tracemalloc {api:5s} {size:6d} branches: Python peak "
                    f"{measured['traced_peak_bytes'] / 2**20:.1f} MB, verified {checked['ok']}"
                )
    if plan.profile:
        # One more untimed round at the largest size, the recovery process under py-spy.
        size = max(plan.sizes)
        for api in (a for a in plan.apis if a not in BASELINES):
            n += 1
            path = f"{plan.profile}.{api}.txt"
            measured, _, checked, _, _ = one_round(
                plan, admin_a, admin_b, api, size, f"p{n:03d}", traced=False, profile=path
            )
            log(
                f"  py-spy {api:5s} {size:6d} branches: {measured['seconds']:.2f} s under the "
                f"profiler, verified {checked['ok']}; raw stacks in {path}"
            )
    return results, traced


def summarise(results: Sequence[RoundResult]) -> list[dict[str, Any]]:
    """Median and spread per (api, size)."""
    cells: dict[tuple[str, int], list[RoundResult]] = {}
    for r in results:
        cells.setdefault((r.api, r.branches), []).append(r)
    out = []
    for (api, size), runs in sorted(cells.items()):
        secs = [r.seconds for r in runs]
        grow = [r.rss_growth_kb for r in runs]
        med = statistics.median(secs)
        busy = [r.machine_busy_pct for r in runs if r.machine_busy_pct is not None]
        server = [r.server_cpu_seconds for r in runs if r.server_cpu_seconds is not None]
        out.append(
            {
                "api": api,
                "branches": size,
                "median_seconds": med,
                "min_seconds": min(secs),
                "max_seconds": max(secs),
                "spread_pct": 100.0 * (max(secs) - min(secs)) / med,
                "branches_per_second": size / med,
                "median_client_cpu_seconds": statistics.median(r.client_cpu_seconds for r in runs),
                "median_server_cpu_seconds": statistics.median(server) if server else None,
                "median_machine_busy_pct": statistics.median(busy) if busy else None,
                "median_rss_before_kb": statistics.median(r.rss_before_kb for r in runs),
                "median_rss_growth_kb": statistics.median(grow),
                "min_rss_growth_kb": min(grow),
                "max_rss_growth_kb": max(grow),
                "all_verified": all(r.verified["ok"] for r in runs),
                "all_committed": all(r.committed == size and r.in_doubt == 0 for r in runs),
            }
        )
    return out


def ratios(results: Sequence[RoundResult]) -> list[dict[str, Any]]:
    """Library recovery time over the hand-written baseline's, per api and size."""
    out = []
    for api in dict.fromkeys(r.api for r in results if r.api != "hand"):
        # Every api, the lock-step baseline included, over the plain hand-written one.
        for size in sorted({r.branches for r in results}):
            lib = [r for r in results if (r.api, r.branches) == (api, size)]
            hand = [r for r in results if (r.api, r.branches) == ("hand", size)]
            if not lib or not hand:
                continue
            out.append(
                {
                    "api": api,
                    "branches": size,
                    "ratio": statistics.median(r.seconds for r in lib)
                    / statistics.median(r.seconds for r in hand),
                    # One repeat's rounds ran close together: their ratio cancels drift.
                    "paired": [
                        a.seconds / b.seconds
                        for a, b in zip(
                            sorted(lib, key=lambda r: r.repeat),
                            sorted(hand, key=lambda r: r.repeat),
                            strict=False,
                        )
                    ],
                }
            )
    return out


def _verdict(s: dict[str, Any]) -> str:
    """ok; FAILED (data wrong or left prepared); shared (right, but another recovery
    process finished some of the branches, so the timing is not this one's alone)."""
    if not s["all_verified"]:
        return "FAILED"
    return "ok" if s["all_committed"] else "shared"


def _num(x: float | None, width: int, digits: int) -> str:
    return f"{x:{width}.{digits}f}" if x is not None else f"{'-':>{width}s}"


def render(report: dict[str, Any]) -> str:
    """The human-readable report."""
    env, plan = report["environment"], report["plan"]
    conf = report["configuration"]
    lines = [
        "Environment",
        f"  server     {env['postgresql']}",
        f"  databases  A = {env['database_a']} (decision log), B = {env['database_b']} "
        "(the in-doubt branches)",
        f"  server     max_prepared_transactions={env['max_prepared_transactions']} "
        f"shared_memory_size={env['shared_memory_mb']} MB fsync={env['fsync']} "
        f"synchronous_commit={env['synchronous_commit']} autovacuum={env['autovacuum']}",
        f"  client     {env['cores']} cores, load avg {env['load_avg_1_5_15']}, Python "
        f"{env['python']}, psycopg {env['psycopg']}, twophase {env['twophase']} "
        f"({env['twophase_source']})",
        f"  plan       sizes {plan['sizes']} x{plan['repeat']} interleaved, api "
        f"{','.join(plan['apis'])}; setup with {plan['workers']} connections; CHECKPOINT "
        f"before each recovery: {'yes' if plan['checkpoint'] else 'no'}; recovery in a fresh "
        "process with default pools (pool_max 20) and concurrency 16",
    ]
    if conf.get("raised_to"):
        lines.append(
            f"  configured max_prepared_transactions {conf['raised_from']} -> {conf['raised_to']}"
            f" (restart {conf['restart_seconds']} s, shared memory "
            f"{conf['shared_memory_mb_before']} -> {conf['shared_memory_mb_raised']} MB); "
            f"restored: {conf.get('restore', {})}"
        )
    fc = report["fidelity_check"]
    if fc is not None:
        verdict = "same" if fc["ok"] else "DIFFERENT: " + "; ".join(fc["problems"])
        lines += [
            "",
            "Fidelity: a branch left by a real coordinator killed after its decision vs one made "
            f"by this benchmark: {verdict}",
            f"  gids {fc['crashed_gid']} / {fc['synthetic_gid']}; both hold locks on "
            f"{', '.join(fc['locked_tables'])}; both committed by one recover()",
        ]
    lines += [
        "",
        "Results (median of the repeats; sync/async = Coordinator.recover(), hand = the",
        "hand-written psycopg baseline; 'cpu s' is the recovery process's CPU, 'srv s' its",
        "server backends' CPU, 'busy' % of all cores; 'RSS growth' is the recovery process's",
        "peak RSS over its RSS before recovering; 'B/branch' divides it by the branches)",
        "",
        f"{'api':5s} {'branches':>8s} {'seconds':>8s} {'min..max':>15s} {'spread':>6s} "
        f"{'branch/s':>8s} {'cpu s':>6s} {'srv s':>6s} {'busy':>4s} {'RSS MB':>6s} "
        f"{'growth MB':>9s} {'min..max':>11s} {'B/branch':>8s} {'verified':>8s}",
    ]
    for s in report["summary"]:
        grow = s["median_rss_growth_kb"]
        lines.append(
            f"{s['api']:5s} {s['branches']:8d} {s['median_seconds']:8.2f} "
            f"{s['min_seconds']:7.2f}..{s['max_seconds']:<6.2f} {s['spread_pct']:5.1f}% "
            f"{s['branches_per_second']:8.0f} {s['median_client_cpu_seconds']:6.2f} "
            f"{_num(s['median_server_cpu_seconds'], 6, 2)} "
            f"{_num(s['median_machine_busy_pct'], 4, 0)} {s['median_rss_before_kb'] / 1024:6.1f} "
            f"{grow / 1024:9.1f} {s['min_rss_growth_kb'] / 1024:5.1f}.."
            f"{s['max_rss_growth_kb'] / 1024:<5.1f}"
            f" {grow * 1024 / s['branches']:8.0f} "
            f"{_verdict(s):>8s}"
        )
    for t in report["tracemalloc"]:
        lines.append(
            f"tracemalloc ({t['api']}, {t['branches']} branches, separate untimed run): Python "
            f"allocations peaked {t['traced_peak_bytes'] / 2**20:.1f} MB above the start "
            f"({t['traced_peak_bytes'] / t['branches']:.0f} B/branch)"
        )
    for api in dict.fromkeys(t["api"] for t in report["tracemalloc"]):
        of_api = [t for t in report["tracemalloc"] if t["api"] == api]
        traced = sorted((t["branches"], t["traced_peak_bytes"]) for t in of_api)
        if len(traced) >= 2:
            (lo, lo_peak), (hi, hi_peak) = traced[0], traced[-1]
            lines.append(
                f"tracemalloc {api}: peak {lo_peak / 2**20:.2f} MB at {lo} branches, "
                f"{hi_peak / 2**20:.2f} MB at {hi}: {(hi_peak - lo_peak) / (hi - lo):.0f} B "
                "per extra branch (flat memory: about 0)"
            )
    lines.append("")
    for api in plan["apis"]:
        by = {s["branches"]: s for s in report["summary"] if s["api"] == api}
        if TARGET_BRANCHES in by:
            s = by[TARGET_BRANCHES]
            ok = s["median_seconds"] < TARGET_SECONDS
            verdict = "meets" if ok else "MISSES"
            if api in BASELINES:
                verdict = "(the baseline) would meet" if ok else "(the baseline) also misses"
            lines.append(
                f"{api}: {TARGET_BRANCHES} branches in {s['median_seconds']:.2f} s: "
                f"{verdict} the < {TARGET_SECONDS:.0f} s target"
            )
        sizes = sorted(by)
        if len(sizes) >= 2:
            lo, hi = by[sizes[0]], by[sizes[-1]]
            extra = hi["median_rss_growth_kb"] - lo["median_rss_growth_kb"]
            lines.append(
                f"{api}: RSS growth {lo['median_rss_growth_kb'] / 1024:.1f} MB at {sizes[0]} vs "
                f"{hi['median_rss_growth_kb'] / 1024:.1f} MB at {sizes[-1]} branches: "
                f"{extra * 1024 / (sizes[-1] - sizes[0]):.0f} B per extra branch; time "
                f"x{hi['median_seconds'] / lo['median_seconds']:.1f} for "
                f"x{sizes[-1] / sizes[0]:.0f} the branches"
            )
    for r in report["ratios"]:
        paired = ", ".join(f"{x:.2f}" for x in r["paired"])
        lines.append(
            f"{r['api']}/hand at {r['branches']} branches: {r['ratio']:.2f} x the baseline's time "
            f"[paired {paired}]"
        )
    c = report["cleanup"]
    lines.append(
        f"Cleanup: {c['still_prepared']} of this benchmark's transactions still prepared, "
        f"tables dropped: {c['dropped']}."
    )
    return "\n".join(lines)


def environment(admin_a: Admin, admin_b: Admin) -> dict[str, Any]:
    """What the numbers depend on."""
    settings = dict(
        admin_b.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
            (["fsync", "synchronous_commit", "autovacuum", "max_prepared_transactions"],),
        ).fetchall()
    )
    return {
        "postgresql": admin_b.value("SELECT version()"),
        "database_a": admin_a.value("SELECT current_database()"),
        "database_b": admin_b.value("SELECT current_database()"),
        **settings,
        "shared_memory_mb": read_setting(admin_b).shared_memory_mb,
        "cores": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "twophase": twophase.__version__,
        "twophase_source": source_revision(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--url-a",
        default=os.environ.get("TWOPHASE_BENCH_URL", DEFAULT_URL_A),
        help="database A, which keeps the decision log",
    )
    p.add_argument(
        "--url-b",
        default=os.environ.get("TWOPHASE_BENCH_URL_B", DEFAULT_URL_B),
        help="database B, where the branches wait prepared",
    )
    p.add_argument("--sizes", default="1000,10000", help="in-doubt branches per round")
    p.add_argument("--repeat", type=int, default=3, help="rounds per size")
    p.add_argument(
        "--api",
        default="sync,hand",
        help="what recovers, comma-separated: sync (Coordinator.recover), async "
        "(AsyncCoordinator.recover), hand (the hand-written psycopg baseline), hand16 (hand "
        "in lock-step groups of 16, like recover())",
    )
    p.add_argument(
        "--configure",
        action="store_true",
        help="raise max_prepared_transactions if too low (restarts PostgreSQL), restore after",
    )
    p.add_argument("--cluster", default=None, help="pg_ctlcluster version and name, e.g. '15 main'")
    p.add_argument(
        "--scratch",
        action="store_true",
        help="run against a throwaway cluster of its own (initdb in a temporary directory, "
        "max_prepared_transactions raised there; no restart of any other server); replaces "
        "--url-a/--url-b",
    )
    p.add_argument("--workers", type=int, default=8, help="connections preparing the branches")
    p.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="skip the CHECKPOINT before each recovery (two-phase state stays in the WAL)",
    )
    p.add_argument(
        "--no-tracemalloc",
        action="store_true",
        help="skip the extra untimed rounds that measure Python allocations with tracemalloc",
    )
    p.add_argument(
        "--profile",
        metavar="PATH",
        help="add an untimed round at the largest size with the recovery process under py-spy"
        " (raw stacks to PATH.<api>.txt)",
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip the start-up check against a real crash"
    )
    p.add_argument(
        "--settle",
        type=float,
        default=15.0,
        help="before each recovery, wait up to this long for a quiet machine (0: do not wait)",
    )
    p.add_argument(
        "--quiet-pct", type=float, default=25.0, help="busy %% of all cores counted as quiet"
    )
    p.add_argument("--json", action="store_true", help="print JSON results instead of a table")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: the recovery/crash process
    args = p.parse_args(argv)
    args.size_list = [int(x) for x in args.sizes.split(",") if x.strip()]
    args.api_list = [x.strip() for x in args.api.split(",") if x.strip()]
    if not args.size_list or min(args.size_list) < 1 or args.repeat < 1 or args.workers < 1:
        p.error("need positive --sizes, --repeat and --workers")
    if not args.api_list or not set(args.api_list) <= set(APIS):
        p.error(f"--api takes a comma-separated subset of {', '.join(APIS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        if spec["mode"] == "crash":
            child_crash(spec)
        print(json.dumps(child_recover(spec)))
        return 0
    plan = Plan(
        url_a=args.url_a,
        url_b=args.url_b,
        sizes=args.size_list,
        repeat=args.repeat,
        apis=args.api_list,
        workers=args.workers,
        checkpoint=not args.no_checkpoint,
        tracemalloc=not args.no_tracemalloc,
        profile=args.profile,
        settle=args.settle,
        quiet_pct=args.quiet_pct,
        # A namespace of our own: recover() then lists and resolves only our branches, never
        # those of tests running on the same server.
        ns=f"tpbr-{secrets.token_hex(3)}",
    )
    scratch: Scratch | None = None
    if args.scratch:
        need = max(plan.sizes) + max(20, max(plan.sizes) * HEADROOM_PCT // 100)
        scratch = start_scratch(pg_bin_dir(), max(CONFIGURE_TO, need))
        plan.url_a, plan.url_b = scratch.url("test"), scratch.url("test2")
        log(f"scratch cluster in {scratch.data_dir}, port {scratch.port}")
    try:
        return run_plan(plan, args)
    finally:
        if scratch is not None:
            stop_scratch(scratch)


def run_plan(plan: Plan, args: argparse.Namespace) -> int:
    """Everything after the options: set up, measure, report, clean up."""
    if ensure_database(plan.url_b):
        log(f"created database B ({plan.url_b.split('@')[-1]})")
    admin_a, admin_b = Admin(plan.url_a), Admin(plan.url_b)
    cluster = cluster_of(admin_b, args.cluster)
    have = read_setting(admin_b).value
    in_use = int(admin_b.value("SELECT count(*) FROM pg_prepared_xacts"))
    headroom = max(20, max(plan.sizes) * HEADROOM_PCT // 100)
    need = max(plan.sizes) + headroom + in_use
    saved: Setting | None = None
    configuration: dict[str, Any] = {"max_prepared_transactions": have}
    if have < need:
        target = max(CONFIGURE_TO, need)
        if not args.configure:
            log(
                f"max_prepared_transactions is {have}; {max(plan.sizes)} in-doubt branches need "
                f"at least {need} (with {in_use} prepared now and {headroom} to spare).\n"
                + how_to_raise(target, cluster)
            )
            return 2
        saved, configuration = configure(admin_b, target, cluster)
    cleanup_done: dict[str, Any] = {"still_prepared": None, "dropped": False}
    try:
        env = environment(admin_a, admin_b)
        for admin in (admin_a, admin_b):
            admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
            admin.execute(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, payload text NOT NULL)")
        # The log tables (A) and the outcome table (B) exist before the first batch.
        with (
            twophase.connect(plan.url_a, pool_max=1) as db_a,
            twophase.connect(plan.url_b, pool_max=1) as db_b,
        ):
            twophase.Coordinator({"a": db_a, "b": db_b}, log="a", namespace=plan.ns).status("x")
            db_b.status("probe")
        log(f"recover bench: namespace {plan.ns}, sizes {plan.sizes} x{plan.repeat}")
        fidelity = None
        if not args.no_check:
            fidelity = fidelity_check(plan, admin_a, admin_b)
            log(f"fidelity check: {'ok' if fidelity['ok'] else fidelity['problems']}")
        try:
            results, traced = run_all(plan, admin_a, admin_b)
        finally:
            # Also on Ctrl-C or a failure: nothing of ours may stay prepared (each holds
            # locks and a slot, and too many would stop the restore's restart).
            admin_a.drop()
            admin_b.drop()
            clear_batch(admin_a, admin_b, f"{plan.ns}:")
            for admin in (admin_a, admin_b):
                admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
            cleanup_done = {
                "still_prepared": len(prepared_of(admin_a, f"{plan.ns}:")),
                "dropped": True,
            }
            log(f"cleanup: {cleanup_done}")
    finally:
        if saved is not None:
            configuration["restore"] = restore(admin_b, saved, cluster)
        admin_a.drop()
        admin_b.drop()
    summary = summarise(results)
    report = {
        "environment": env,
        "plan": asdict(plan)
        | {"url_a": plan.url_a.split("@")[-1], "url_b": plan.url_b.split("@")[-1]},
        "configuration": configuration,
        "fidelity_check": fidelity,
        "runs": [asdict(r) for r in results],
        "summary": summary,
        "ratios": ratios(results),
        "tracemalloc": traced,
        "cleanup": cleanup_done,
    }
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    ok = all(s["all_verified"] for s in summary)
    return 0 if ok and cleanup_done["still_prepared"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
