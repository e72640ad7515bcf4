"""What does the twophase Coordinator cost over hand-written two-phase commit on two databases?

Measures, in one run against two PostgreSQL databases A and B, the throughput (global
transactions/s) of the same work -- one row inserted in A and the same row in B, atomically
-- done these ways:

  (a)  two plain commits:  BEGIN; INSERT; COMMIT on A, then the same on B (not atomic)
  (b)  hand-written psycopg 2PC, sequential (the reference):
       BEGIN; INSERT on A and on B; PREPARE A; PREPARE B; COMMIT PREPARED A; COMMIT PREPARED B
  (b2) hand-written psycopg 2PC with concurrent phases: as (b), but both PREPAREs at once,
       then both COMMIT PREPAREDs at once (a helper thread, or asyncio.gather)
  (c)  twophase.Coordinator({"a": A, "b": B}, log="a"): g.enlist("a", ...); g.enlist("b", ...)

at 1 and 16 concurrent global transactions (threads), plus the async API with 16 tasks. It
prints the environment, a table (median and spread over interleaved repeats) and the ratios
(c)/(b) -- the target is >= 0.9 -- (c)/(b2) and (c)/(a). With --breakdown it adds

  (b+) the exact statements the Coordinator sends, written by hand with psycopg,

which splits (c)/(b) into the protocol's server cost, (b+)/(b), and the library's Python
cost, (c)/(b+).

    .venv/bin/python bench/coordinator.py [--seconds 5] [--repeat 3] [--breakdown] [--json]

See bench/README.md for how to read the output and why the runs are set up as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from psycopg.abc import Params
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import twophase

DEFAULT_URL_A = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_URL_B = "postgresql://postgres@127.0.0.1:5432/test2"
# Not tpc_overhead.py's bench_rows: both benchmarks may run at once, and each drops its own.
TABLE = "bench_coord_rows"
# The one statement every variant runs on each database, byte for byte, with server-side
# parameters (psycopg prepares it on the server after 5 executions on a connection, for
# every variant alike: twophase's pools lend ordinary psycopg connections).
INSERT_SQL = f"INSERT INTO {TABLE} (id, payload) VALUES (%s, %s)"
PAYLOAD = "benchmark payload, 32 bytes long"
OUTCOME_TABLE = "twophase_outcome"
DECISION_TABLE = "twophase_decision"
AUDIT_TABLE = "twophase_audit_log"  # written only with audit=True, which no variant sets
# The global transactions' timeout: it only sets the deadline written into the branch gids.
TIMEOUT = 30.0
TARGET = 0.9

VARIANT_LABELS = {
    "a": "two plain commits: BEGIN; INSERT; COMMIT on A, then on B",
    "b": "hand-written 2PC, sequential: BEGIN; INSERT on A and B; PREPARE A; PREPARE B; "
    "COMMIT PREPARED A; COMMIT PREPARED B",
    "b2": "hand-written 2PC, concurrent phases: as (b), the two PREPAREs at once, then the two "
    "COMMIT PREPAREDs at once",
    "b+": "twophase's exact statements by hand: BEGIN; INSERT on A; claim; INSERT; PREPARE on B; "
    "decision INSERT + COMMIT on A; COMMIT PREPARED on B",
    "c": "twophase Coordinator(log='a'): enlist('a', insert); enlist('b', insert)",
}
ALL_VARIANTS = ("a", "b", "b2", "b+", "c")


def claim_sql(record: str) -> str:
    """The round trip twophase opens a (non-decision) branch with (dialects/postgres.py).

    Copied rather than imported so (b+) stays hand-written; check_mirror() verifies at
    start-up that the library still sends exactly this.
    """
    return (
        "BEGIN; SET LOCAL lock_timeout = '200ms'; "
        f"INSERT INTO \"{OUTCOME_TABLE}\" (name, outcome) VALUES ('{record}', 'committed'); "
        "SET LOCAL lock_timeout = DEFAULT"
    )


def decision_sql(gtrid: str, deadline: int, record: str) -> str:
    """The commit decision riding in the decision branch's COMMIT (decisions.py)."""
    return (
        f'INSERT INTO "{DECISION_TABLE}" (gtrid, outcome, deadline, branches) VALUES '
        f"('{gtrid}', 'committed', {deadline}, '[[\"b\",\"{record}\"]]')"
    )


def check_mirror() -> str | None:
    """None if the library's claim and decision SQL match (b+)'s copies, else a warning."""
    from twophase.decisions import BranchRef, DecisionLog
    from twophase.dialects import PostgresDialect
    from twophase.names import TxName

    dialect = PostgresDialect()
    gtrid, deadline = "tpbc-probe.c001.00.00000000", 1_700_000_000
    branch = TxName.make(gtrid).with_branch(1, deadline)
    theirs_claim = dialect.claim(branch)
    theirs_decision = DecisionLog(dialect).commit_inline(
        gtrid, deadline, [BranchRef("b", branch.record)]
    )
    problems = []
    if theirs_claim != (claim_sql(branch.record),):
        problems.append(f"claim {theirs_claim!r}")
    if theirs_decision != decision_sql(gtrid, deadline, branch.record):
        problems.append(f"decision {theirs_decision!r}")
    if dialect.prepare(branch) != (f"PREPARE TRANSACTION 'tp:{branch.record}'",):
        problems.append(f"prepare {dialect.prepare(branch)!r}")
    if not problems:
        return None
    return "twophase's SQL changed, so (b+) no longer mirrors it: " + "; ".join(problems)


def row_id(client: int, seq: int) -> int:
    """A primary key unique per global transaction within a run (tables truncated between)."""
    return client * 1_000_000_000 + seq


def tx_name(prefix: str, client: int, seq: int) -> str:
    """A gid / global name unique across the whole benchmark.

    Fixed-width numbers keep each client's names ascending, like the order or request ids a
    real application would use, so the log tables' indexes are appended to, not split.
    """
    return f"{prefix}.{client:02d}.{seq:08d}"


def with_app_name(url: str, app: str) -> str:
    """``url`` tagged with application_name, so this run's server backends can be found."""
    return f"{url}{'&' if '?' in url else '?'}application_name={app}"


# --------------------------------------------------------------------------------------
# Variants. Each opens its connections before the warm-up (outside the measured window),
# runs one global transaction per step() and closes everything afterwards.
# --------------------------------------------------------------------------------------

Pair = tuple[psycopg.Connection[Any], psycopg.Connection[Any]]
AsyncPair = tuple[psycopg.AsyncConnection[Any], psycopg.AsyncConnection[Any]]


class SyncVariant(ABC):
    """One way of writing the two rows, driven by one thread per client."""

    def __init__(self, url_a: str, url_b: str, name_prefix: str) -> None:
        self.url_a = with_app_name(url_a, name_prefix)
        self.url_b = with_app_name(url_b, name_prefix)
        self.prefix = name_prefix

    def _pairs(self, clients: int) -> list[Pair]:
        # Autocommit plus explicit BEGIN sends what psycopg's implicit transactions send
        # (BEGIN is its own round trip there too) and what twophase sends.
        return [
            (
                psycopg.connect(self.url_a, autocommit=True),
                psycopg.connect(self.url_b, autocommit=True),
            )
            for _ in range(clients)
        ]

    @abstractmethod
    def open(self, clients: int) -> None:
        """Connect enough for ``clients`` concurrent clients."""

    @abstractmethod
    def step(self, client: int, seq: int) -> None:
        """Run one complete global transaction for ``client``."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection."""


class PlainSync(SyncVariant):
    """(a): BEGIN; INSERT; COMMIT on A, then on B, on the client's own two connections."""

    def open(self, clients: int) -> None:
        self.pairs = self._pairs(clients)

    def step(self, client: int, seq: int) -> None:
        rid = row_id(client, seq)
        for conn in self.pairs[client]:
            conn.execute(b"BEGIN")
            conn.execute(INSERT_SQL, (rid, PAYLOAD))
            conn.execute(b"COMMIT")

    def close(self) -> None:
        for pair in self.pairs:
            for conn in pair:
                conn.close()


class HandTpcSync(SyncVariant):
    """(b), (b2) and (b+): two-phase commit written by hand on the client's two connections.

    COMMIT PREPARED runs on the connection that prepared: after PREPARE the session is free,
    and the server does the same work whichever session commits (tpc_overhead.py's
    ``--b-commit`` compares the two). gids are cluster-wide in PostgreSQL, so the two
    branches of (b) need distinct ones (``.a``/``.b``).
    """

    def __init__(self, url_a: str, url_b: str, name_prefix: str, key: str) -> None:
        super().__init__(url_a, url_b, name_prefix)
        self.key = key

    def open(self, clients: int) -> None:
        self.pairs = self._pairs(clients)
        # (b2): one helper thread per client runs A's half while the client thread runs B's:
        # the cheapest way to overlap two blocking calls (one hand-off, not two).
        self.helpers = ThreadPoolExecutor(max_workers=clients) if self.key == "b2" else None

    def _both(
        self, ca: psycopg.Connection[Any], qa: bytes, cb: psycopg.Connection[Any], qb: bytes
    ) -> None:
        assert self.helpers is not None
        fut = self.helpers.submit(ca.execute, qa)
        try:
            cb.execute(qb)
        finally:
            fut.result()

    def step(self, client: int, seq: int) -> None:
        ca, cb = self.pairs[client]
        rid = row_id(client, seq)
        name = tx_name(self.prefix, client, seq)
        if self.key == "b+":
            # Exactly what the Coordinator sends, in its order (see check_mirror()).
            deadline = int(time.time() + TIMEOUT) + 1
            record = f"{name}#1.{deadline}"
            ca.execute(b"BEGIN")
            ca.execute(INSERT_SQL, (rid, PAYLOAD))
            cb.execute(claim_sql(record).encode())
            cb.execute(INSERT_SQL, (rid, PAYLOAD))
            cb.execute(f"PREPARE TRANSACTION 'tp:{record}'".encode())
            ca.execute(f"{decision_sql(name, deadline, record)}; COMMIT".encode())
            cb.execute(f"COMMIT PREPARED 'tp:{record}'".encode())
            return
        ca.execute(b"BEGIN")
        ca.execute(INSERT_SQL, (rid, PAYLOAD))
        cb.execute(b"BEGIN")
        cb.execute(INSERT_SQL, (rid, PAYLOAD))
        # PREPARE/COMMIT PREPARED take no parameters; the gid is built from [a-z0-9.-] only,
        # so inlining it is safe. Bytes skip psycopg's LiteralString typing and any
        # composition cost, as a hand-tuned application would.
        prep_a, prep_b = (f"PREPARE TRANSACTION '{name}.{x}'".encode() for x in "ab")
        commit_a, commit_b = (f"COMMIT PREPARED '{name}.{x}'".encode() for x in "ab")
        if self.key == "b2":
            self._both(ca, prep_a, cb, prep_b)
            self._both(ca, commit_a, cb, commit_b)
        else:
            ca.execute(prep_a)
            cb.execute(prep_b)
            ca.execute(commit_a)
            cb.execute(commit_b)

    def close(self) -> None:
        if self.helpers is not None:
            self.helpers.shutdown()
        for pair in self.pairs:
            for conn in pair:
                conn.close()


class CoordinatorSync(SyncVariant):
    """(c): the library, inserting with ``tx.execute`` (the same SQL text as the others)."""

    def open(self, clients: int) -> None:
        # pool_min = pool_max = clients: a global transaction holds at most one connection
        # per database at a time, and no measured run pays for the pools growing.
        self.dbs = {
            "a": twophase.connect(self.url_a, pool_min=clients, pool_max=clients),
            "b": twophase.connect(self.url_b, pool_min=clients, pool_max=clients),
        }
        self.coord = twophase.Coordinator(self.dbs, log="a")

    def step(self, client: int, seq: int) -> None:
        rid = row_id(client, seq)
        with self.coord.transaction(tx_name(self.prefix, client, seq), timeout=TIMEOUT) as g:
            g.enlist("a", lambda tx: tx.execute(INSERT_SQL, (rid, PAYLOAD)))
            g.enlist("b", lambda tx: tx.execute(INSERT_SQL, (rid, PAYLOAD)))

    def close(self) -> None:
        for db in self.dbs.values():
            db.close()


class AsyncVariant(ABC):
    """One way of writing the two rows, driven by one asyncio task per client."""

    def __init__(self, url_a: str, url_b: str, name_prefix: str) -> None:
        self.url_a = with_app_name(url_a, name_prefix)
        self.url_b = with_app_name(url_b, name_prefix)
        self.prefix = name_prefix

    async def _pairs(self, clients: int) -> list[AsyncPair]:
        return [
            (
                await psycopg.AsyncConnection.connect(self.url_a, autocommit=True),
                await psycopg.AsyncConnection.connect(self.url_b, autocommit=True),
            )
            for _ in range(clients)
        ]

    @abstractmethod
    async def open(self, clients: int) -> None:
        """Connect enough for ``clients`` concurrent tasks."""

    @abstractmethod
    async def step(self, client: int, seq: int) -> None:
        """Run one complete global transaction for ``client``."""

    @abstractmethod
    async def close(self) -> None:
        """Close every connection."""


class PlainAsync(AsyncVariant):
    """(a) with psycopg's AsyncConnection."""

    async def open(self, clients: int) -> None:
        self.pairs = await self._pairs(clients)

    async def step(self, client: int, seq: int) -> None:
        rid = row_id(client, seq)
        for conn in self.pairs[client]:
            await conn.execute(b"BEGIN")
            await conn.execute(INSERT_SQL, (rid, PAYLOAD))
            await conn.execute(b"COMMIT")

    async def close(self) -> None:
        for pair in self.pairs:
            for conn in pair:
                await conn.close()


class HandTpcAsync(AsyncVariant):
    """(b), (b2), (b+) with psycopg's AsyncConnection; (b2) overlaps with asyncio.gather."""

    def __init__(self, url_a: str, url_b: str, name_prefix: str, key: str) -> None:
        super().__init__(url_a, url_b, name_prefix)
        self.key = key

    async def open(self, clients: int) -> None:
        self.pairs = await self._pairs(clients)

    async def step(self, client: int, seq: int) -> None:
        ca, cb = self.pairs[client]
        rid = row_id(client, seq)
        name = tx_name(self.prefix, client, seq)
        if self.key == "b+":
            deadline = int(time.time() + TIMEOUT) + 1
            record = f"{name}#1.{deadline}"
            await ca.execute(b"BEGIN")
            await ca.execute(INSERT_SQL, (rid, PAYLOAD))
            await cb.execute(claim_sql(record).encode())
            await cb.execute(INSERT_SQL, (rid, PAYLOAD))
            await cb.execute(f"PREPARE TRANSACTION 'tp:{record}'".encode())
            await ca.execute(f"{decision_sql(name, deadline, record)}; COMMIT".encode())
            await cb.execute(f"COMMIT PREPARED 'tp:{record}'".encode())
            return
        await ca.execute(b"BEGIN")
        await ca.execute(INSERT_SQL, (rid, PAYLOAD))
        await cb.execute(b"BEGIN")
        await cb.execute(INSERT_SQL, (rid, PAYLOAD))
        prep_a, prep_b = (f"PREPARE TRANSACTION '{name}.{x}'".encode() for x in "ab")
        commit_a, commit_b = (f"COMMIT PREPARED '{name}.{x}'".encode() for x in "ab")
        if self.key == "b2":
            await asyncio.gather(ca.execute(prep_a), cb.execute(prep_b))
            await asyncio.gather(ca.execute(commit_a), cb.execute(commit_b))
        else:
            await ca.execute(prep_a)
            await cb.execute(prep_b)
            await ca.execute(commit_a)
            await cb.execute(commit_b)

    async def close(self) -> None:
        for pair in self.pairs:
            for conn in pair:
                await conn.close()


class CoordinatorAsync(AsyncVariant):
    """(c) with ``twophase.AsyncCoordinator`` over ``connect_async`` databases."""

    async def open(self, clients: int) -> None:
        self.dbs = {
            "a": await twophase.connect_async(self.url_a, pool_min=clients, pool_max=clients),
            "b": await twophase.connect_async(self.url_b, pool_min=clients, pool_max=clients),
        }
        self.coord = twophase.AsyncCoordinator(self.dbs, log="a")

    async def step(self, client: int, seq: int) -> None:
        rid = row_id(client, seq)

        async def insert(tx: twophase.AsyncTransaction) -> object:
            return await tx.execute(INSERT_SQL, (rid, PAYLOAD))

        name = tx_name(self.prefix, client, seq)
        async with self.coord.transaction(name, timeout=TIMEOUT) as g:
            await g.enlist("a", insert)
            await g.enlist("b", insert)

    async def close(self) -> None:
        for db in self.dbs.values():
            await db.close()


def make_sync(key: str, plan: Plan, names: str) -> SyncVariant:
    """The sync variant ``key`` writing under the name prefix ``names``."""
    if key == "a":
        return PlainSync(plan.url_a, plan.url_b, names)
    if key == "c":
        return CoordinatorSync(plan.url_a, plan.url_b, names)
    return HandTpcSync(plan.url_a, plan.url_b, names, key)


def make_async(key: str, plan: Plan, names: str) -> AsyncVariant:
    """The async variant ``key`` writing under the name prefix ``names``."""
    if key == "a":
        return PlainAsync(plan.url_a, plan.url_b, names)
    if key == "c":
        return CoordinatorAsync(plan.url_a, plan.url_b, names)
    return HandTpcAsync(plan.url_a, plan.url_b, names, key)


# --------------------------------------------------------------------------------------
# Measurement (the same machinery as tpc_overhead.py, copied so the two evolve apart)
# --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One measured run of one variant at one concurrency."""

    variant: str
    api: str
    clients: int
    repeat: int
    position: int  # order within the repeat, to spot position effects
    txns: int  # global transactions completed inside the window
    seconds: float
    tps: float
    p50_ms: float
    p99_ms: float
    client_cpu_us_per_txn: float  # this process, all threads: the Python side's cost
    server_cpu_us_per_txn: float | None  # this run's PostgreSQL backends (local server only)
    machine_cpu_us_per_txn: float | None  # every core's busy time: client + server + noise
    machine_busy_pct: float | None  # of all cores; near 100 means the run is CPU-bound
    attempt: int = 1  # > 1 when a server restart (by someone else) killed earlier attempts
    load_avg_1m_before: float = 0.0
    busy_pct_before: float | None = None  # the machine's busy % the second before the run


@dataclass
class _Window:
    """The measured interval (perf_counter seconds) and what the clients did in it."""

    begin: float = 0.0
    end: float = 0.0
    counts: list[int] = field(default_factory=list)
    latencies: list[list[float]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def machine_busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies over all cores from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _backends_cpu_ticks(pids: Sequence[int]) -> int | None:
    """utime + stime of the server backends serving this run, or None if not local."""
    if not pids:
        return None
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state, ...
        except OSError:
            return None  # a remote server, or a backend that went away
        ticks += int(rest[11]) + int(rest[12])  # utime, stime
    return ticks


@dataclass
class _CpuSample:
    process: float
    machine: tuple[int, int] | None
    server: int | None

    @staticmethod
    def now(pids: Sequence[int]) -> _CpuSample:
        return _CpuSample(time.process_time(), machine_busy_jiffies(), _backends_cpu_ticks(pids))


def _summarise(
    variant: str,
    api: str,
    clients: int,
    repeat: int,
    position: int,
    w: _Window,
    cpu0: _CpuSample,
    cpu1: _CpuSample,
) -> RunResult:
    if w.errors:
        raise w.errors[0]
    txns = sum(w.counts)
    seconds = w.end - w.begin
    lat = sorted(x for per_client in w.latencies for x in per_client)
    if not lat:
        raise RuntimeError(f"{variant} ({api}, {clients} clients) completed no transaction")
    hz = os.sysconf("SC_CLK_TCK")
    machine_us = busy_pct = server_us = None
    if cpu0.server is not None and cpu1.server is not None:
        server_us = (cpu1.server - cpu0.server) / hz / txns * 1e6
    if cpu0.machine and cpu1.machine:
        busy = cpu1.machine[0] - cpu0.machine[0]
        total = cpu1.machine[1] - cpu0.machine[1]
        machine_us = busy / hz / txns * 1e6
        busy_pct = 100.0 * busy / total if total else None
    return RunResult(
        variant=variant,
        api=api,
        clients=clients,
        repeat=repeat,
        position=position,
        txns=txns,
        seconds=seconds,
        tps=txns / seconds,
        p50_ms=lat[len(lat) // 2] * 1e3,
        p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
        client_cpu_us_per_txn=(cpu1.process - cpu0.process) / txns * 1e6,
        server_cpu_us_per_txn=server_us,
        machine_cpu_us_per_txn=machine_us,
        machine_busy_pct=busy_pct,
    )


def measure_sync(
    variant: SyncVariant,
    key: str,
    clients: int,
    warmup: float,
    seconds: float,
    find_pids: Callable[[], list[int]],
    *,
    repeat: int,
    position: int,
) -> RunResult:
    """Run ``clients`` threads through a warm-up, then count completions in the window."""
    w = _Window(counts=[0] * clients, latencies=[[] for _ in range(clients)])
    stop = threading.Event()
    barrier = threading.Barrier(clients + 1)

    def worker(client: int) -> None:
        barrier.wait()
        seq = 0
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                if t0 >= w.end:
                    break
                variant.step(client, seq)
                seq += 1
                t1 = time.perf_counter()
                # Count completions inside the window only: warm-up transactions and one
                # straddling the end are run but not counted.
                if w.begin <= t1 <= w.end:
                    w.counts[client] += 1
                    w.latencies[client].append(t1 - t0)
        except BaseException as exc:
            w.errors.append(exc)
            stop.set()

    variant.open(clients)
    try:
        pids = find_pids()
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        start = time.perf_counter()
        w.begin, w.end = start + warmup, start + warmup + seconds
        barrier.wait()
        try:
            _sleep_until(w.begin, stop)
            cpu0 = _CpuSample.now(pids)
            _sleep_until(w.end, stop)
            cpu1 = _CpuSample.now(pids)
        finally:
            stop.set()
            for t in threads:
                t.join()
    finally:
        variant.close()
    return _summarise(key, "sync", clients, repeat, position, w, cpu0, cpu1)


def _sleep_until(deadline: float, stop: threading.Event) -> None:
    """Sleep until ``deadline``, or until a client fails (no point measuring on)."""
    while (left := deadline - time.perf_counter()) > 0 and not stop.wait(left):
        pass


async def measure_async(
    variant: AsyncVariant,
    key: str,
    clients: int,
    warmup: float,
    seconds: float,
    find_pids: Callable[[], list[int]],
    *,
    repeat: int,
    position: int,
) -> RunResult:
    """The asyncio twin of measure_sync: one task per client on one event loop."""
    w = _Window(counts=[0] * clients, latencies=[[] for _ in range(clients)])

    async def worker(client: int) -> None:
        seq = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= w.end:
                break
            await variant.step(client, seq)
            seq += 1
            t1 = time.perf_counter()
            if w.begin <= t1 <= w.end:
                w.counts[client] += 1
                w.latencies[client].append(t1 - t0)

    await variant.open(clients)
    try:
        pids = find_pids()
        start = time.perf_counter()
        w.begin, w.end = start + warmup, start + warmup + seconds
        tasks = [asyncio.create_task(worker(i)) for i in range(clients)]
        try:
            await asyncio.sleep(max(0.0, w.begin - time.perf_counter()))
            cpu0 = _CpuSample.now(pids)
            await asyncio.sleep(max(0.0, w.end - time.perf_counter()))
            cpu1 = _CpuSample.now(pids)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await variant.close()
    return _summarise(key, "async", clients, repeat, position, w, cpu0, cpu1)


# --------------------------------------------------------------------------------------
# Database housekeeping
# --------------------------------------------------------------------------------------

# The test suites sharing this server restart PostgreSQL now and then; the benchmark waits
# for it to come back rather than dying (or leaving prepared transactions behind).
SERVER_WAIT = 120.0
# A run that dies because the server restarted under it is started again, this many times.
MAX_ATTEMPTS = 3


class Admin:
    """The benchmark's own autocommit connection to one database, reopened after a restart."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None

    def conn(self) -> psycopg.Connection[Any]:
        """The connection, waiting up to SERVER_WAIT for the server if it is down."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            deadline = time.monotonic() + SERVER_WAIT
            while True:
                try:
                    # A bound on TRUNCATE and friends: only a stray of ours could block them,
                    # and those are rolled back first, so waiting would mean a bug.
                    self._conn = psycopg.connect(
                        self.url, autocommit=True, options="-c lock_timeout=10s"
                    )
                    break
                except psycopg.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)
        return self._conn

    def execute(
        self, query: LiteralString | bytes, params: Params | None = None
    ) -> psycopg.Cursor[Any]:
        """Run one statement on the (re)opened connection."""
        return self.conn().execute(query, params)

    def value(self, query: LiteralString | bytes, params: Params | None = None) -> Any:
        """The first column of the first row."""
        row = self.execute(query, params).fetchone()
        return row[0] if row else None

    def server_started_at(self) -> object:
        """pg_postmaster_start_time(): it changes exactly when the server restarted."""
        return self.value("SELECT pg_postmaster_start_time()")

    def backend_pids(self, application_name: str) -> list[int]:
        """The server processes (any database) of connections carrying the name."""
        rows = self.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchall()
        return [pid for (pid,) in rows]

    def has_table(self, table: str) -> bool:
        """Whether ``table`` exists in this database."""
        return self.value("SELECT to_regclass(%s) IS NOT NULL", (table,)) is True

    def drop(self) -> None:
        """Forget the connection (after an error), so the next use reconnects."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None


def ensure_database(url: str) -> bool:
    """Create the database ``url`` names if it is missing (from the ``postgres`` database).

    True if it had to be created.
    """
    try:
        psycopg.connect(url).close()
        return False
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise
    params = conninfo_to_dict(url)
    name = str(params.get("dbname") or "")
    with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return True


def environment(admin_a: Admin, admin_b: Admin) -> dict[str, Any]:
    """What the numbers depend on: server durability settings, cores, versions, load."""
    names = [
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "full_page_writes",
        "commit_delay",
        "shared_buffers",
        "max_prepared_transactions",
        "max_connections",
        "autovacuum",
    ]
    settings = dict(
        admin_a.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)", (names,)
        ).fetchall()
    )
    # Two databases of one cluster share one WAL: their commits' fsyncs can be one fsync
    # (group commit), which two separate servers could not do. Say which case this is.
    ident = "SELECT system_identifier::text FROM pg_control_system()"
    same_cluster = admin_a.value(ident) == admin_b.value(ident)
    return {
        "postgresql": admin_a.value("SELECT version()"),
        "database_a": admin_a.value("SELECT current_database()"),
        "database_b": admin_b.value("SELECT current_database()"),
        "same_cluster": same_cluster,
        "settings": settings,
        "cores": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "psycopg_impl": psycopg.pq.__impl__,
        "libpq": psycopg.pq.version(),
        "twophase": twophase.__version__,
        "twophase_source": source_revision(),
    }


def source_revision() -> str:
    """The git commit of the twophase being measured, marked when its source has edits.

    The library changes under active development; a result means little without this.
    """
    root = Path(twophase.__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src/twophase"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} + uncommitted edits in src/twophase" if dirty else head


def _ours(column: str) -> LiteralString:
    """A WHERE clause keeping this benchmark's names: (b) ``<prefix>...``, (c) ``tp:<prefix>``.

    ``column`` is one of our fixed column names, never user input.
    """
    assert column in ("gid", "name", "gtrid")
    if column == "gid":
        return "WHERE left(gid, %(n)s) = %(p)s OR left(gid, %(n)s + 3) = 'tp:' || %(p)s"
    if column == "name":
        return "WHERE left(name, %(n)s) = %(p)s"
    return "WHERE left(gtrid, %(n)s) = %(p)s"


def rollback_strays(admin: Admin, prefix: str) -> int:
    """Roll back every prepared transaction of this benchmark in ``admin``'s database."""
    stray = [
        gid
        for (gid,) in admin.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            " AND (left(gid, %(n)s) = %(p)s OR left(gid, %(n)s + 3) = 'tp:' || %(p)s)",
            {"n": len(prefix), "p": prefix},
        ).fetchall()
    ]
    for gid in stray:
        # Our gids hold [a-z0-9.:#-] only, so inlining is safe (the statement takes no params).
        admin.execute(f"ROLLBACK PREPARED '{gid}'".encode())
    return len(stray)


def count_prepared(admin: Admin, prefix: str) -> int:
    """This benchmark's prepared transactions, in any database of the cluster."""
    query: LiteralString = "SELECT count(*) FROM pg_prepared_xacts " + _ours("gid")
    return int(admin.value(query, {"n": len(prefix), "p": prefix}))


def log_table_stats(admin_a: Admin, admin_b: Admin, prefix: str) -> dict[str, dict[str, int]]:
    """Rows (all / this benchmark's) and size of the log tables the protocol writes to."""
    out: dict[str, dict[str, int]] = {}
    for admin, table, column in (
        (admin_a, DECISION_TABLE, "gtrid"),
        (admin_b, OUTCOME_TABLE, "name"),
    ):
        if not admin.has_table(table):
            out[table] = {"rows": 0, "bench_rows": 0, "bytes": 0}
            continue
        where = _ours(column).removeprefix("WHERE ")
        row = admin.execute(
            f"SELECT count(*), count(*) FILTER (WHERE {where}),"
            f" pg_total_relation_size('{table}') FROM {table}",
            {"n": len(prefix), "p": prefix},
        ).fetchone()
        assert row is not None
        out[table] = {"rows": row[0], "bench_rows": row[1], "bytes": row[2]}
    return out


def wait_for_quiet(settle: float, threshold: float) -> float | None:
    """Wait (at most ``settle`` s) for a second in which the machine is < threshold % busy.

    On a shared machine other people's test runs come and go; starting each run in a quiet
    moment keeps them from landing on one variant more than another. Returns the busy % of
    the last second sampled (None off Linux).
    """
    deadline = time.monotonic() + settle
    while True:
        before = machine_busy_jiffies()
        time.sleep(1.0)
        after = machine_busy_jiffies()
        if before is None or after is None:
            return None
        total = after[1] - before[1]
        busy = 100.0 * (after[0] - before[0]) / total if total else 0.0
        if busy < threshold or time.monotonic() >= deadline:
            return round(busy, 1)


def reset_between_runs(admin_a: Admin, admin_b: Admin, prefix: str, same_cluster: bool) -> None:
    """Empty the row tables and checkpoint, so every run starts from the same state.

    Without the CHECKPOINT a run that happens to overlap a timed checkpoint pays for it (and
    for the full-page images after it) while its neighbours do not. Strays (from a run a
    restart interrupted) go first: one holding a row lock would block the TRUNCATE.
    """
    for admin in (admin_a, admin_b):
        rollback_strays(admin, prefix)
        admin.execute(f"TRUNCATE {TABLE}")
    admin_a.execute("CHECKPOINT")
    if not same_cluster:
        admin_b.execute("CHECKPOINT")


def cleanup(admin_a: Admin, admin_b: Admin, prefix: str) -> dict[str, int]:
    """Roll back anything of ours still prepared, delete our log rows, drop our tables."""
    params = {"n": len(prefix), "p": prefix}
    stray = rollback_strays(admin_a, prefix) + rollback_strays(admin_b, prefix)
    deleted: dict[str, int] = {}
    for admin, table, column in (
        (admin_a, DECISION_TABLE, "gtrid"),
        (admin_a, AUDIT_TABLE, "name"),
        (admin_b, OUTCOME_TABLE, "name"),
    ):
        if not admin.has_table(table):
            continue
        query: LiteralString = f"DELETE FROM {table} " + _ours(column)
        deleted[table] = admin.execute(query, params).rowcount
        # autovacuum may be off: reclaim the dead rows so the table is left as compact as
        # the benchmark found it.
        admin.execute(f"VACUUM {table}")
    for admin in (admin_a, admin_b):
        admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
    return {
        "rolled_back_stray_prepared": stray,
        "deleted_decision_rows": deleted.get(DECISION_TABLE, 0),
        "deleted_audit_rows": deleted.get(AUDIT_TABLE, 0),
        "deleted_outcome_rows": deleted.get(OUTCOME_TABLE, 0),
        "still_prepared": count_prepared(admin_a, prefix),
    }


# --------------------------------------------------------------------------------------
# Orchestration and reporting
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything one benchmark invocation does."""

    url_a: str
    url_b: str
    seconds: float
    warmup: float
    repeat: int
    clients: list[int]
    async_clients: list[int]
    variants: list[str]
    settle: float
    quiet_pct: float
    prefix: str


def run_all(
    plan: Plan,
    admin_a: Admin,
    admin_b: Admin,
    same_cluster: bool,
    log: Callable[[str], None],
) -> list[RunResult]:
    """Every (variant, api, clients) cell, ``repeat`` times, variants interleaved."""
    cells: list[tuple[str, int]] = [("sync", n) for n in plan.clients]
    cells += [("async", n) for n in plan.async_clients]
    results: list[RunResult] = []
    run_no = 0
    keys = plan.variants
    for rep in range(plan.repeat):
        for api, clients in cells:
            # Interleave the variants and rotate the starting one each repeat, so slow drift
            # (and whatever a run leaves behind for the next one) hits every variant alike.
            order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
            for position, key in enumerate(order):
                for attempt in range(1, MAX_ATTEMPTS + 1):
                    run_no += 1
                    # A fresh name prefix per attempt: twophase names are single-use once
                    # committed, and an interrupted attempt may have committed some.
                    tag = key.replace("+", "p")  # '+' is not allowed in a twophase name
                    names = f"{plan.prefix}.{tag}{run_no:03d}"
                    started = admin_a.server_started_at()
                    try:
                        reset_between_runs(admin_a, admin_b, plan.prefix, same_cluster)
                        quiet = wait_for_quiet(plan.settle, plan.quiet_pct) if plan.settle else None
                        load = os.getloadavg()[0]

                        def find_pids(app: str = names) -> list[int]:
                            return admin_a.backend_pids(app)

                        args = (key, clients, plan.warmup, plan.seconds, find_pids)
                        if api == "sync":
                            r = measure_sync(
                                make_sync(key, plan, names), *args, repeat=rep, position=position
                            )
                        else:
                            coro = measure_async(
                                make_async(key, plan, names), *args, repeat=rep, position=position
                            )
                            r = asyncio.run(coro)
                    except (psycopg.Error, twophase.TwoPhaseError) as exc:
                        admin_a.drop()
                        admin_b.drop()
                        if attempt == MAX_ATTEMPTS or admin_a.server_started_at() == started:
                            raise  # not a restart: a real failure, which must be seen
                        log(f"  server restarted during ({key}) {api} x{clients}: {exc}; again")
                        continue
                    r.attempt = attempt
                    r.load_avg_1m_before = round(load, 2)
                    r.busy_pct_before = quiet
                    results.append(r)
                    log(
                        f"  rep {rep + 1}/{plan.repeat} {api:5s} clients={clients:2d} "
                        f"({key}){'' if len(key) > 1 else ' '} {r.tps:8.1f} tx/s  "
                        f"p50 {r.p50_ms:6.2f} ms  client CPU {r.client_cpu_us_per_txn:6.0f} "
                        f"us/tx  load {load:.2f}  busy before {quiet}%"
                    )
                    break
    return results


def summarise(results: Sequence[RunResult]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-cell medians and spreads, then the ratios per (api, clients)."""
    cells: dict[tuple[str, int, str], list[RunResult]] = {}
    for r in results:
        cells.setdefault((r.api, r.clients, r.variant), []).append(r)
    summary: list[dict[str, Any]] = []
    for (api, clients, key), runs in cells.items():
        tps = [r.tps for r in runs]
        med = statistics.median(tps)
        machine = [r.machine_cpu_us_per_txn for r in runs if r.machine_cpu_us_per_txn]
        server = [r.server_cpu_us_per_txn for r in runs if r.server_cpu_us_per_txn]
        busy = [r.machine_busy_pct for r in runs if r.machine_busy_pct is not None]
        summary.append(
            {
                "api": api,
                "clients": clients,
                "variant": key,
                "label": VARIANT_LABELS[key],
                "median_tps": med,
                "min_tps": min(tps),
                "max_tps": max(tps),
                "spread_pct": 100.0 * (max(tps) - min(tps)) / med,
                "tps_per_repeat": tps,
                "median_p50_ms": statistics.median(r.p50_ms for r in runs),
                "median_p99_ms": statistics.median(r.p99_ms for r in runs),
                "median_client_cpu_us_per_txn": statistics.median(
                    r.client_cpu_us_per_txn for r in runs
                ),
                "median_server_cpu_us_per_txn": statistics.median(server) if server else None,
                "median_machine_cpu_us_per_txn": statistics.median(machine) if machine else None,
                "median_machine_busy_pct": statistics.median(busy) if busy else None,
            }
        )
    ratios: list[dict[str, Any]] = []
    for r_api, r_clients in dict.fromkeys((row["api"], row["clients"]) for row in summary):
        medians = {
            row["variant"]: row["median_tps"]
            for row in summary
            if row["api"] == r_api and row["clients"] == r_clients
        }

        def runs_of(key: str, api: str = r_api, clients: int = r_clients) -> list[RunResult]:
            return [r for r in results if (r.api, r.clients, r.variant) == (api, clients, key)]

        ratio: dict[str, Any] = {"api": r_api, "clients": r_clients}
        for num, den in (("c", "b"), ("c", "b2"), ("c", "a"), ("b", "a"), ("b2", "b")):
            if num in medians and den in medians:
                ratio[f"{num}_over_{den}"] = medians[num] / medians[den]
        if "c" in medians and "b" in medians:
            # Runs of one repeat ran back to back, so their ratio cancels drift between repeats.
            ratio["c_over_b_paired"] = [
                c.tps / b.tps for b, c in zip(runs_of("b"), runs_of("c"), strict=True)
            ]
            ratio["target_c_over_b"] = TARGET
            ratio["target_met"] = ratio["c_over_b"] >= TARGET
        if "b+" in medians:
            if "b" in medians:
                ratio["bplus_over_b"] = medians["b+"] / medians["b"]
            if "c" in medians:
                ratio["c_over_bplus"] = medians["c"] / medians["b+"]
        ratios.append(ratio)
    return summary, ratios


def _num(x: float | None, width: int) -> str:
    return f"{x:{width}.0f}" if x is not None else f"{'-':>{width}s}"


def render(report: dict[str, Any]) -> str:
    """The human-readable report."""
    env = report["environment"]
    s = env["settings"]
    plan = report["plan"]
    cluster = (
        "one cluster: the two databases share one WAL, so their commits can share an fsync"
        if env["same_cluster"]
        else "two clusters: each database flushes its own WAL"
    )
    lines = [
        "Environment",
        f"  server     {env['postgresql']}",
        f"  databases  A = {env['database_a']} (decision log), B = {env['database_b']}; {cluster}",
        "  durability fsync={fsync} synchronous_commit={synchronous_commit} "
        "wal_sync_method={wal_sync_method} full_page_writes={full_page_writes} "
        "commit_delay={commit_delay}".format(**s),
        f"  server     shared_buffers={s['shared_buffers']} "
        f"max_prepared_transactions={s['max_prepared_transactions']} "
        f"max_connections={s['max_connections']} autovacuum={s['autovacuum']}",
        f"  client     {env['cores']} cores, load avg {env['load_avg_1_5_15']}, "
        f"Python {env['python']}, psycopg {env['psycopg']} ({env['psycopg_impl']}, "
        f"libpq {env['libpq']}), twophase {env['twophase']} ({env['twophase_source']})",
        f"  plan       {plan['seconds']} s measured after {plan['warmup']} s warm-up, "
        f"x{plan['repeat']} interleaved; each run waits up to {plan['settle']} s for a second "
        f"with the machine < {plan['quiet_pct']}% busy",
        "",
        "Variants (one global transaction = the same row inserted in A and in B)",
        *(f"  ({k}) {VARIANT_LABELS[k]}" for k in ALL_VARIANTS if k in plan["variants"]),
        "",
        "Results (median of the repeats, global transactions/s; CPU is microseconds per global",
        "transaction: 'client' this process, 'server' this run's backends, 'other' the rest of",
        "the machine's busy time -- WAL writer, checkpointer, kernel and anything else running;",
        "'busy' is % of all cores)",
        "",
        f"{'api':5s} {'cli':>3s} {'var':5s} {'tx/s':>8s} {'min..max':>17s} {'spread':>6s} "
        f"{'p50 ms':>6s} {'p99 ms':>6s} {'client':>6s} {'server':>6s} {'other':>6s} {'busy':>4s}",
    ]
    for row in report["summary"]:
        machine = row["median_machine_cpu_us_per_txn"]
        server = row["median_server_cpu_us_per_txn"]
        client = row["median_client_cpu_us_per_txn"]
        other = machine - client - (server or 0.0) if machine is not None else None
        var = f"({row['variant']})"
        lines.append(
            f"{row['api']:5s} {row['clients']:3d} {var:5s} {row['median_tps']:8.1f} "
            f"{row['min_tps']:8.1f}..{row['max_tps']:<8.1f} {row['spread_pct']:5.1f}% "
            f"{row['median_p50_ms']:6.2f} {row['median_p99_ms']:6.2f} {client:6.0f} "
            f"{_num(server, 6)} {_num(other, 6)} {_num(row['median_machine_busy_pct'], 4)}"
        )
    lines += [
        "",
        "Ratios (of medians; paired = per repeat, (c) and (b) measured back to back;",
        "(b), the sequential hand-written 2PC, is the reference)",
    ]
    for r in report["ratios"]:
        head = f"  {r['api']:5s} {r['clients']:2d} clients:"
        parts = []
        if "c_over_b" in r:
            paired = ", ".join(f"{x:.3f}" for x in r["c_over_b_paired"])
            verdict = "meets" if r["target_met"] else "MISSES"
            parts.append(
                f"(c)/(b) = {r['c_over_b']:.3f} [paired {paired}] {verdict} the >= {TARGET} target"
            )
        extra = [
            f"{label} = {r[k]:.3f}"
            for k, label in (
                ("c_over_b2", "(c)/(b2)"),
                ("c_over_a", "(c)/(a)"),
                ("b_over_a", "(b)/(a)"),
                ("b2_over_b", "(b2)/(b)"),
            )
            if k in r
        ]
        lines.append(f"{head} {'; '.join(parts)}")
        lines.append(f"  {'':5s} {'':2s}          {';  '.join(extra)}")
        if "bplus_over_b" in r and "c_over_bplus" in r:
            lines.append(
                f"  {'':5s} {'':2s}          split: (b+)/(b) = {r['bplus_over_b']:.3f} "
                f"(twophase's protocol, server side) x (c)/(b+) = {r['c_over_bplus']:.3f} "
                "(library Python code)"
            )
    lt = report["log_tables"]
    lines.append("")
    for table, stats in lt["after_runs"].items():
        before = lt["before"][table]
        lines.append(
            f"{table}: {before['rows']} rows / {before['bytes'] // 1024} kB before, "
            f"{stats['rows']} rows / {stats['bytes'] // 1024} kB after the runs "
            f"({stats['bench_rows']} of them this benchmark's, warm-ups included)"
        )
    c = report["cleanup"]
    lines.append(
        f"Cleanup: {c['rolled_back_stray_prepared']} stray prepared rolled back, "
        f"{c['deleted_decision_rows']} decision, {c['deleted_audit_rows']} audit and "
        f"{c['deleted_outcome_rows']} outcome rows deleted, {c['still_prepared']} still prepared."
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--url-a",
        default=os.environ.get("TWOPHASE_BENCH_URL", DEFAULT_URL_A),
        help="database A, which keeps the decision log",
    )
    p.add_argument(
        "--url-b", default=os.environ.get("TWOPHASE_BENCH_URL_B", DEFAULT_URL_B), help="database B"
    )
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant and concurrency")
    p.add_argument("--clients", default="1,16", help="sync thread counts, comma-separated")
    p.add_argument(
        "--async-clients", default="16", help="async task counts ('' to skip the async API)"
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="add (b+): twophase's exact SQL by hand, to split (c)/(b) into server and client",
    )
    p.add_argument(
        "--variants",
        default="a,b,b2,c",
        help="which variants to run, of a,b,b2,b+,c (e.g. 'c' alone to profile it)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=15.0,
        help="before each run, wait up to this long for a quiet machine (0: do not wait)",
    )
    p.add_argument(
        "--quiet-pct", type=float, default=25.0, help="busy %% of all cores counted as quiet"
    )
    p.add_argument("--json", action="store_true", help="print JSON results instead of a table")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.breakdown and "b+" not in variants:
        variants.insert(variants.index("c") if "c" in variants else len(variants), "b+")
    if not variants or not set(variants) <= set(ALL_VARIANTS):
        p.error(f"--variants takes a comma-separated subset of a,b,b2,b+,c, got {args.variants!r}")
    args.variant_list = variants
    if args.seconds <= 0 or args.warmup < 0 or args.repeat < 1:
        p.error("need --seconds > 0, --warmup >= 0 and --repeat >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    plan = Plan(
        url_a=args.url_a,
        url_b=args.url_b,
        seconds=args.seconds,
        warmup=args.warmup,
        repeat=args.repeat,
        clients=ints(args.clients),
        async_clients=ints(args.async_clients),
        variants=args.variant_list,
        settle=args.settle,
        quiet_pct=args.quiet_pct,
        # Lower-case hex, dots and digits only: valid as a twophase name, safe to inline as a
        # gid, and unique per invocation so concurrent benchmarks never clean up each other.
        prefix=f"tpbc-{secrets.token_hex(3)}",
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if ensure_database(plan.url_b):
        log(f"created database B ({plan.url_b.split('@')[-1]})")
    admin_a, admin_b = Admin(plan.url_a), Admin(plan.url_b)
    try:
        env = environment(admin_a, admin_b)
        for admin in (admin_a, admin_b):
            admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
            admin.execute(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, payload text NOT NULL)")
        # The log tables must exist before the first (b+) run, which may precede any (c).
        with (
            twophase.connect(plan.url_a, pool_min=1, pool_max=1) as db_a,
            twophase.connect(plan.url_b, pool_min=1, pool_max=1) as db_b,
        ):
            db_b.status(f"{plan.prefix}.probe")  # creates twophase_outcome in B
            probe = twophase.Coordinator({"a": db_a, "b": db_b}, log="a")
            probe.status(f"{plan.prefix}.probe")  # creates the decision log in A
        if "b+" in plan.variants and (warning := check_mirror()):
            log(f"WARNING: {warning}")
        tables_before = log_table_stats(admin_a, admin_b, plan.prefix)
        log(f"coordinator bench: prefix {plan.prefix}, {plan.repeat} repeats")
        try:
            results = run_all(plan, admin_a, admin_b, env["same_cluster"], log)
            tables_after = log_table_stats(admin_a, admin_b, plan.prefix)
        finally:
            # Also on Ctrl-C or a failure: nothing of ours may stay prepared (it would hold
            # locks and a max_prepared_transactions slot until someone rolls it back).
            admin_a.drop()  # it may be the very connection a restart broke
            admin_b.drop()
            cleaned = cleanup(admin_a, admin_b, plan.prefix)
            log(f"cleanup: {cleaned}")
    finally:
        admin_a.drop()
        admin_b.drop()

    summary, ratios = summarise(results)
    report = {
        "environment": env,
        "plan": asdict(plan)
        | {"url_a": plan.url_a.split("@")[-1], "url_b": plan.url_b.split("@")[-1]},
        "runs": [asdict(r) for r in results],
        "summary": summary,
        "ratios": ratios,
        "log_tables": {"before": tables_before, "after_runs": tables_after},
        "cleanup": cleaned,
    }
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0 if cleaned["still_prepared"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
