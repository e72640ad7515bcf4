"""How much does twophase cost on top of hand-written two-phase commit?

Measures, in one run against one PostgreSQL, the throughput (transactions/s) of the same
single-row insert done three ways:

  (a) plain:    psycopg 3, one connection per client: BEGIN; INSERT; COMMIT
  (b) psycopg 2PC: psycopg 3 by hand: BEGIN; INSERT; PREPARE TRANSACTION 'gid' on the
                client's connection, then COMMIT PREPARED 'gid' on a second connection
  (c) twophase: db.begin_distributed(name, insert) + db.commit_distributed(name)

at 1 and 16 concurrent clients (threads), plus the async API with 16 tasks. It prints the
environment, a table (median and spread over repeats) and the ratios (c)/(b) -- the price
of the library -- and (b)/(a) -- the price of two-phase commit itself. With --observe it
adds (o), (c) with the audit log and OpenTelemetry tracing on, and the ratio (o)/(c).
--slice MS makes the variants take turns within one window (robust on a shared machine);
--schema NAME gives the run tables of its own, twophase's outcome table included.

    .venv/bin/python bench/tpc_overhead.py [--seconds 5] [--repeat 3] [--url URL] [--json]

See bench/README.md for how to read the output and why the runs are set up as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import platform
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from psycopg.abc import Params
from psycopg_pool import PoolTimeout

import twophase
from twophase.observe import AuditLog, Tracing

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
TABLE = "bench_rows"
# The one statement every variant runs, byte for byte, with server-side parameters. psycopg
# prepares it on the server after 5 executions on a connection (prepare_threshold), for
# every variant alike, since twophase's pool hands out ordinary psycopg connections.
INSERT_SQL = f"INSERT INTO {TABLE} (id, payload) VALUES (%s, %s)"
PAYLOAD = "benchmark payload, 32 bytes long"
OUTCOME_TABLE = "twophase_outcome"
# What the lead must report: twophase at no less than 95 % of hand-written 2PC throughput.
TARGET = 0.95
# With --observe: auditing and tracing every step may cost at most 10 % of (c)'s throughput.
OBSERVE_TARGET = 0.9
AUDIT_TABLE = "twophase_audit_log"

VARIANT_LABELS = {
    "a": "plain psycopg (BEGIN; INSERT; COMMIT)",
    "b": "hand-written psycopg 2PC (BEGIN; INSERT; PREPARE; COMMIT PREPARED)",
    "c": "twophase begin_distributed + commit_distributed",
    "o": "(c) observed: connect(audit=True, tracing=True), OpenTelemetry SDK, spans discarded",
    "oa": "(c) with connect(audit=True) only",
    "ot": "(c) with connect(tracing=True) only, OpenTelemetry SDK, spans discarded",
    "cs": "(c) plus three spans a transaction made by hand with the same SDK (its own cost)",
}
# (audit, tracing) of each twophase variant: (oa) and (ot) split (o)'s cost in two.
OBSERVED = {
    "c": (False, False),
    "o": (True, True),
    "oa": (True, False),
    "ot": (False, True),
    "cs": (False, False),
}
VARIANTS = ("a", "b", "b+", "c", "o", "oa", "ot", "cs")


class HandSpans:
    """(cs): the three spans twophase makes for a transaction (begin, prepare, commit),
    made by the benchmark itself through the same SDK, with the same attributes, in the
    caller. What any instrumentation with a span a step pays the SDK: (ot)/(cs) is then what
    twophase's tracing costs beyond it."""

    def __init__(self) -> None:
        from opentelemetry import trace

        self.tracer = trace.get_tracer("tpc_overhead")

    def make(self, name: str, cid: str) -> None:
        for step, outcome in (("begin", "ok"), ("prepare", "prepared"), ("commit", "committed")):
            attributes = {
                "twophase.name": name,
                "twophase.step": step,
                "twophase.outcome": outcome,
                "twophase.correlation_id": cid,
                "twophase.participant": "bench",
            }
            self.tracer.start_span(f"twophase.{step}", attributes=attributes).end()


# With --breakdown: (b) plus exactly the SQL twophase adds (its claim of the name), written by
# hand. (b+)/(b) is then the price of the outcome record on the server and (c)/(b+) the
# price of the library's Python code, splitting (c)/(b) into its two causes.
BREAKDOWN_LABEL = "(b) + twophase's claim SQL (outcome row), hand-written"


def claim_sql(name: str) -> str:
    """The round trip twophase opens a distributed transaction with (dialects/postgres.py).

    Copied rather than imported so (b+) stays hand-written; check_claim_sql() verifies at
    start-up that the library still sends exactly this.
    """
    return (
        "BEGIN; SET LOCAL lock_timeout = '200ms'; "
        f"INSERT INTO \"{OUTCOME_TABLE}\" (name, outcome) VALUES ('{name}', 'committed'); "
        "SET LOCAL lock_timeout = DEFAULT"
    )


def check_claim_sql() -> str | None:
    """None if the library's claim matches claim_sql(), else a warning to print."""
    from twophase.dialects import PostgresDialect
    from twophase.names import TxName

    probe = "tpbench-probe.00.00000000"
    theirs = PostgresDialect().claim(TxName.make(probe))
    if theirs == (claim_sql(probe),):
        return None
    return f"twophase's claim changed, so (b+) no longer mirrors it: {theirs!r}"


def install_tracer_provider(sample: float = 1.0) -> str:
    """Install an OpenTelemetry SDK tracer provider globally, for (o); its description.

    A BatchSpanProcessor in front of an exporter that drops every batch: span creation,
    attributes, the processor's queue and its export thread are all paid, network I/O is
    not (it would measure the collector, not twophase). Spans of (o) only: the other
    variants run no code that makes spans.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    sampler = ParentBased(ALWAYS_ON if sample >= 1 else TraceIdRatioBased(sample))
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    trace.set_tracer_provider(provider)
    return (
        "OpenTelemetry SDK TracerProvider + BatchSpanProcessor (defaults) + discarding exporter"
        + ("" if sample >= 1 else f", sampling {sample:g} of traces (ParentBased(TraceIdRatio))")
    )


def row_id(client: int, seq: int) -> int:
    """A primary key unique per transaction within a run (the table is truncated between)."""
    return client * 1_000_000_000 + seq


def tx_name(prefix: str, client: int, seq: int) -> str:
    """A gid / twophase name unique across the whole benchmark.

    Fixed-width numbers keep each client's names in ascending order, like the order or
    request ids a real application would use, so the outcome table's index is appended to
    rather than split at random.
    """
    return f"{prefix}.{client:02d}.{seq:08d}"


# --------------------------------------------------------------------------------------
# Variants. Each opens its connections before the warm-up (outside the measured window),
# runs one transaction per step() and closes everything afterwards.
# --------------------------------------------------------------------------------------


def with_app_name(url: str, app: str) -> str:
    """``url`` tagged with application_name, so this run's server backends can be found."""
    return f"{url}{'&' if '?' in url else '?'}application_name={app}"


def flush_observers(db: Any) -> None:
    """Wait until the audit log and tracing of ``db`` have handled every step so far."""
    for ob in db.observers:
        if isinstance(ob, AuditLog | Tracing):
            ob.flush()


class SyncVariant(ABC):
    """One way of writing the row, driven by one thread per client."""

    def __init__(self, url: str, name_prefix: str) -> None:
        self.url = with_app_name(url, name_prefix)
        self.prefix = name_prefix

    @abstractmethod
    def open(self, clients: int) -> None:
        """Connect enough for ``clients`` concurrent clients."""

    @abstractmethod
    def step(self, client: int, seq: int) -> None:
        """Run one complete transaction for ``client``."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection."""

    def settle(self) -> None:
        """With --slice, at the end of each of this variant's slices: finish the work its
        background threads hold (audit rows, spans), so it is charged to this variant and
        does not spill into the next one's slice. Nothing to do by default."""
        return


class SharedConns:
    """With --slice: one set of psycopg connections for all the hand-written variants.

    Only one variant runs at a time then, so (a), (b) and (b+) can take turns on the same
    connections instead of opening three sets (the server's max_connections is shared
    with everyone else). ``main`` are the clients' own, ``second`` (b)'s committers.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.main: list[psycopg.Connection[Any]] = []
        self.second: list[psycopg.Connection[Any]] = []

    def get(self, conns: list[psycopg.Connection[Any]], clients: int) -> list[Any]:
        while len(conns) < clients:
            conns.append(psycopg.connect(self.url, autocommit=True))
        return conns

    def close(self) -> None:
        for conn in [*self.main, *self.second]:
            conn.close()


class PlainSync(SyncVariant):
    """(a): BEGIN; INSERT; COMMIT on the client's own connection."""

    shared: SharedConns | None = None

    def open(self, clients: int) -> None:
        if self.shared is not None:
            self.conns = self.shared.get(self.shared.main, clients)
            return
        # Autocommit plus explicit BEGIN/COMMIT sends exactly what psycopg's implicit
        # transactions send (BEGIN is its own round trip there too) and matches (b).
        self.conns = [psycopg.connect(self.url, autocommit=True) for _ in range(clients)]

    def step(self, client: int, seq: int) -> None:
        conn = self.conns[client]
        conn.execute("BEGIN")
        conn.execute(INSERT_SQL, (row_id(client, seq), PAYLOAD))
        conn.execute("COMMIT")

    def close(self) -> None:
        if self.shared is None:
            for conn in self.conns:
                conn.close()


class HandTpcSync(SyncVariant):
    """(b): BEGIN; INSERT; PREPARE TRANSACTION, then COMMIT PREPARED on a second connection.

    twophase commits on whatever connection its pool lends (the one given back last: at
    one client the one that prepared, under concurrency usually another), and in real use
    the commit comes from a coordinator anyway. A dedicated second connection per client is the
    cheapest hand-written equivalent (no pool bookkeeping); ``--b-commit same`` commits on
    the preparing connection instead, to check that this choice does not matter.
    """

    shared: SharedConns | None = None

    def __init__(self, url: str, name_prefix: str, *, same_conn: bool, claim: bool) -> None:
        super().__init__(url, name_prefix)
        self.same_conn = same_conn
        self.claim = claim

    def open(self, clients: int) -> None:
        if self.shared is not None:
            self.conns = self.shared.get(self.shared.main, clients)
            self.committers = (
                self.conns if self.same_conn else self.shared.get(self.shared.second, clients)
            )
            return
        self.conns = [psycopg.connect(self.url, autocommit=True) for _ in range(clients)]
        self.committers = (
            self.conns
            if self.same_conn
            else [psycopg.connect(self.url, autocommit=True) for _ in range(clients)]
        )

    def step(self, client: int, seq: int) -> None:
        gid = tx_name(self.prefix, client, seq)
        conn = self.conns[client]
        conn.execute(claim_sql(gid).encode() if self.claim else b"BEGIN")
        conn.execute(INSERT_SQL, (row_id(client, seq), PAYLOAD))
        # PREPARE/COMMIT PREPARED take no parameters; the gid is built from [a-z0-9.-] only,
        # so inlining it is safe. Bytes skip psycopg's LiteralString typing and any
        # composition cost, as a hand-tuned application would.
        conn.execute(f"PREPARE TRANSACTION '{gid}'".encode())
        self.committers[client].execute(f"COMMIT PREPARED '{gid}'".encode())

    def close(self) -> None:
        if self.shared is not None:
            return
        for conn in {id(c): c for c in [*self.conns, *self.committers]}.values():
            conn.close()


class TwophaseSync(SyncVariant):
    """(c): the library, inserting with ``tx.execute`` (the same SQL text as (a) and (b)).

    (o) when ``observe``: every step also goes to the audit log (its own connection and
    writer thread, tagged with this run's application_name, so its server time counts) and
    becomes a span of the OpenTelemetry SDK installed by install_tracer_provider().
    """

    def __init__(
        self,
        url: str,
        name_prefix: str,
        *,
        builder: bool,
        observe: tuple[bool, bool],
        hand_spans: bool = False,
    ) -> None:
        super().__init__(url, name_prefix)
        self.builder = builder
        self.audit, self.tracing = observe
        self.spans = HandSpans() if hand_spans else None

    def open(self, clients: int) -> None:
        # pool_min = pool_max = clients: every client has a connection from the start, so
        # no measured run pays for the pool growing (the warm-up would hide most of it).
        self.db = twophase.connect(
            self.url,
            pool_min=clients,
            pool_max=clients,
            audit=self.audit,
            tracing=self.tracing,
        )

    def step(self, client: int, seq: int) -> None:
        name = tx_name(self.prefix, client, seq)
        rid = row_id(client, seq)
        if self.builder:
            self.db.begin_distributed(
                name, lambda tx: tx.insert_into(TABLE).values(id=rid, payload=PAYLOAD).execute()
            )
        else:
            self.db.begin_distributed(name, lambda tx: tx.execute(INSERT_SQL, (rid, PAYLOAD)))
        self.db.commit_distributed(name)
        if self.spans is not None:
            self.spans.make(name, name)

    def close(self) -> None:
        self.db.close()

    def settle(self) -> None:
        flush_observers(self.db)


class AsyncVariant(ABC):
    """One way of writing the row, driven by one asyncio task per client."""

    def __init__(self, url: str, name_prefix: str) -> None:
        self.url = with_app_name(url, name_prefix)
        self.prefix = name_prefix

    @abstractmethod
    async def open(self, clients: int) -> None:
        """Connect enough for ``clients`` concurrent tasks."""

    @abstractmethod
    async def step(self, client: int, seq: int) -> None:
        """Run one complete transaction for ``client``."""

    @abstractmethod
    async def close(self) -> None:
        """Close every connection."""

    async def settle(self) -> None:
        """The asyncio twin of SyncVariant.settle."""
        return


class SharedAsyncConns:
    """SharedConns for the async variants."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.main: list[psycopg.AsyncConnection[Any]] = []
        self.second: list[psycopg.AsyncConnection[Any]] = []

    async def get(self, conns: list[psycopg.AsyncConnection[Any]], clients: int) -> list[Any]:
        while len(conns) < clients:
            conns.append(await psycopg.AsyncConnection.connect(self.url, autocommit=True))
        return conns

    async def close(self) -> None:
        for conn in [*self.main, *self.second]:
            await conn.close()


class PlainAsync(AsyncVariant):
    """(a) with psycopg's AsyncConnection."""

    shared: SharedAsyncConns | None = None

    async def open(self, clients: int) -> None:
        if self.shared is not None:
            self.conns = await self.shared.get(self.shared.main, clients)
            return
        self.conns = [
            await psycopg.AsyncConnection.connect(self.url, autocommit=True) for _ in range(clients)
        ]

    async def step(self, client: int, seq: int) -> None:
        conn = self.conns[client]
        await conn.execute("BEGIN")
        await conn.execute(INSERT_SQL, (row_id(client, seq), PAYLOAD))
        await conn.execute("COMMIT")

    async def close(self) -> None:
        if self.shared is None:
            for conn in self.conns:
                await conn.close()


class HandTpcAsync(AsyncVariant):
    """(b) with psycopg's AsyncConnection; see HandTpcSync for the commit connection."""

    shared: SharedAsyncConns | None = None

    def __init__(self, url: str, name_prefix: str, *, same_conn: bool, claim: bool) -> None:
        super().__init__(url, name_prefix)
        self.same_conn = same_conn
        self.claim = claim

    async def open(self, clients: int) -> None:
        if self.shared is not None:
            self.conns = await self.shared.get(self.shared.main, clients)
            self.committers = (
                self.conns if self.same_conn else await self.shared.get(self.shared.second, clients)
            )
            return
        self.conns = [
            await psycopg.AsyncConnection.connect(self.url, autocommit=True) for _ in range(clients)
        ]
        self.committers = (
            self.conns
            if self.same_conn
            else [
                await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                for _ in range(clients)
            ]
        )

    async def step(self, client: int, seq: int) -> None:
        gid = tx_name(self.prefix, client, seq)
        conn = self.conns[client]
        await conn.execute(claim_sql(gid).encode() if self.claim else b"BEGIN")
        await conn.execute(INSERT_SQL, (row_id(client, seq), PAYLOAD))
        await conn.execute(f"PREPARE TRANSACTION '{gid}'".encode())
        await self.committers[client].execute(f"COMMIT PREPARED '{gid}'".encode())

    async def close(self) -> None:
        if self.shared is not None:
            return
        for conn in {id(c): c for c in [*self.conns, *self.committers]}.values():
            await conn.close()


class TwophaseAsync(AsyncVariant):
    """(c) (or (o), see TwophaseSync) with ``twophase.connect_async``."""

    def __init__(
        self,
        url: str,
        name_prefix: str,
        *,
        builder: bool,
        observe: tuple[bool, bool],
        hand_spans: bool = False,
    ) -> None:
        super().__init__(url, name_prefix)
        self.builder = builder
        self.audit, self.tracing = observe
        self.spans = HandSpans() if hand_spans else None

    async def settle(self) -> None:
        await asyncio.to_thread(flush_observers, self.db)

    async def open(self, clients: int) -> None:
        self.db = await twophase.connect_async(
            self.url,
            pool_min=clients,
            pool_max=clients,
            audit=self.audit,
            tracing=self.tracing,
        )

    async def step(self, client: int, seq: int) -> None:
        name = tx_name(self.prefix, client, seq)
        rid = row_id(client, seq)

        async def insert(tx: twophase.AsyncTransaction) -> object:
            if self.builder:
                return await tx.insert_into(TABLE).values(id=rid, payload=PAYLOAD).execute()
            return await tx.execute(INSERT_SQL, (rid, PAYLOAD))

        await self.db.begin_distributed(name, insert)
        await self.db.commit_distributed(name)
        if self.spans is not None:
            self.spans.make(name, name)

    async def close(self) -> None:
        await self.db.close()


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One measured run of one variant at one concurrency."""

    variant: str
    api: str
    clients: int
    repeat: int
    position: int  # order within the repeat, to spot position effects
    txns: int
    seconds: float
    tps: float
    p50_ms: float
    p99_ms: float
    client_cpu_us_per_txn: float  # this process, all threads: the Python side's cost
    server_cpu_us_per_txn: float | None  # this run's PostgreSQL backends (local server only)
    machine_cpu_us_per_txn: float | None  # every core busy time: client + server + noise
    machine_busy_pct: float | None  # of all cores; near 100 means the run is CPU-bound
    # Busy time of all cores that was neither this process nor its backends, as % of all
    # cores: WAL writer, checkpointer, kernel -- and other people's work, when it is large.
    other_busy_pct: float | None
    attempt: int = 1  # > 1 when a server restart or other work spoiled earlier attempts
    disturbed: bool = False  # other work exceeded --max-other-pct in every attempt
    load_avg_1m_before: float = 0.0  # other work on the machine skews a run
    busy_pct_before: float | None = None  # the machine's busy % the second before the run
    # Prepared transactions on the whole server: PREPARE and COMMIT PREPARED scan them all,
    # so thousands of them (left by someone else) slow (b) and (c) alike.
    prepared_xacts_before: int = 0


class NoProgress(RuntimeError):
    """A run completed no transaction at all (a server busy recovering, a lock wait)."""


@dataclass
class _Window:
    """The measured interval (perf_counter seconds) and what the clients did in it."""

    begin: float = 0.0
    end: float = 0.0
    counts: list[int] = field(default_factory=list)
    latencies: list[list[float]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def _machine_busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies over all cores from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already counted in user; the first 8 fields are the whole total.
    total = sum(fields[:8])
    return total - idle, total


def _backends_cpu_ticks(pids: Sequence[int]) -> int | None:
    """utime + stime of the server backends serving this run, or None if not local."""
    if not pids:
        return None
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # Fields after "(comm)": state is the first, utime the 12th, stime the 13th.
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None  # a remote server, or a backend that went away
        ticks += int(rest[11]) + int(rest[12])
    return ticks


@dataclass
class _CpuSample:
    process: float
    machine: tuple[int, int] | None
    server: int | None

    @staticmethod
    def now(pids: Sequence[int]) -> _CpuSample:
        return _CpuSample(time.process_time(), _machine_busy_jiffies(), _backends_cpu_ticks(pids))


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
    acc = _CpuDelta()
    acc.add(cpu0, cpu1)
    return _result(
        variant,
        api,
        clients,
        repeat,
        position,
        sum(w.counts),
        w.end - w.begin,
        [x for per_client in w.latencies for x in per_client],
        acc,
    )


@dataclass
class _CpuDelta:
    """CPU used over one window, or summed over the slices of one variant (--slice)."""

    process: float = 0.0
    server: int | None = 0
    busy: int | None = 0
    total: int = 0

    def add(self, cpu0: _CpuSample, cpu1: _CpuSample) -> None:
        self.process += cpu1.process - cpu0.process
        if cpu0.server is None or cpu1.server is None or self.server is None:
            self.server = None
        else:
            self.server += cpu1.server - cpu0.server
        if not (cpu0.machine and cpu1.machine) or self.busy is None:
            self.busy = None
        else:
            self.busy += cpu1.machine[0] - cpu0.machine[0]
            self.total += cpu1.machine[1] - cpu0.machine[1]


def _result(
    variant: str,
    api: str,
    clients: int,
    repeat: int,
    position: int,
    txns: int,
    seconds: float,
    latencies: list[float],
    cpu: _CpuDelta,
) -> RunResult:
    lat = sorted(latencies)
    if not lat:
        raise NoProgress(f"({variant}) completed no transaction in its {seconds:.1f} s")
    hz = os.sysconf("SC_CLK_TCK")
    client_s = cpu.process
    machine_us = busy_pct = server_us = other_pct = None
    server_s = 0.0
    if cpu.server is not None:
        server_s = cpu.server / hz
        server_us = server_s / txns * 1e6
    if cpu.busy is not None:
        busy, total = cpu.busy, cpu.total
        machine_us = busy / hz / txns * 1e6
        if total:
            busy_pct = 100.0 * busy / total
            other_pct = max(0.0, 100.0 * (busy / hz - client_s - server_s) / (total / hz))
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
        client_cpu_us_per_txn=client_s / txns * 1e6,
        server_cpu_us_per_txn=server_us,
        machine_cpu_us_per_txn=machine_us,
        machine_busy_pct=busy_pct,
        other_busy_pct=other_pct,
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


SLICE_SEQ_BLOCK = 10_000_000


@dataclass
class _Sliced:
    """What the clients of one variant did over its slices (--slice)."""

    counts: list[int]
    latencies: list[list[float]]
    seqs: list[int]
    seconds: float = 0.0
    cpu: _CpuDelta = field(default_factory=_CpuDelta)


def _sliced_state(keys: Sequence[str], clients: int) -> dict[str, _Sliced]:
    """Empty tallies; each variant numbers its transactions from its own block of
    SLICE_SEQ_BLOCK, since all of them insert into bench_rows within one window."""
    return {
        k: _Sliced([0] * clients, [[] for _ in range(clients)], [i * SLICE_SEQ_BLOCK] * clients)
        for i, k in enumerate(keys)
    }


def _slice_plan(
    keys: Sequence[str], warmup: float, seconds: float, slice_s: float
) -> tuple[list[str], int]:
    """The variants in slice order, and how many of the first slices are warm-up: each
    variant gets ``seconds`` measured (and ``warmup`` unmeasured) in turns of ``slice_s``."""
    rounds = max(1, round(seconds / slice_s))
    warm = max(1, round(warmup / slice_s)) if warmup > 0 else 0
    return [k for _ in range(warm + rounds) for k in keys], warm * len(keys)


def measure_sliced_sync(
    variants: dict[str, SyncVariant],
    clients: int,
    warmup: float,
    seconds: float,
    slice_s: float,
    find_pids: Callable[[], list[int]],
    *,
    repeat: int,
    shared: SharedConns | None = None,
) -> list[RunResult]:
    """All ``variants`` in one window, taking turns every ``slice_s`` seconds.

    Every variant's connections stay open; at each turn all client threads finish the
    transaction in flight (not counted), meet at a barrier, and the next variant runs until
    its slice ends. A neighbour's burst of work, which lasts seconds, then falls on every
    variant alike instead of on whichever ran at the time. Server CPU is that of all the
    window's backends during a variant's slices: the others are idle then.
    """
    keys = list(variants)
    order, warm_slices = _slice_plan(keys, warmup, seconds, slice_s)
    got = _sliced_state(keys, clients)
    barrier = threading.Barrier(clients + 1)
    current: list[Any] = [None, 0.0, False]  # key, slice end, measured
    errors: list[BaseException] = []

    def worker(client: int) -> None:
        while True:
            barrier.wait()
            key, end, measured = current
            if key is None:
                return
            g = got[key]
            step = variants[key].step
            try:
                while not errors and (t0 := time.perf_counter()) < end:
                    step(client, g.seqs[client])
                    g.seqs[client] += 1
                    t1 = time.perf_counter()
                    if measured and t1 <= end:
                        g.counts[client] += 1
                        g.latencies[client].append(t1 - t0)
            except BaseException as exc:
                errors.append(exc)
            barrier.wait()

    opened: list[SyncVariant] = []
    try:
        for v in variants.values():
            v.open(clients)
            opened.append(v)
        pids = find_pids()
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        try:
            for i, key in enumerate(order):
                measured = i >= warm_slices
                current[:] = [key, time.perf_counter() + slice_s, measured]
                barrier.wait()
                cpu0 = _CpuSample.now(pids) if measured else None
                start = time.perf_counter()
                _sleep_until(current[1], threading.Event())
                if cpu0 is not None:
                    got[key].cpu.add(cpu0, _CpuSample.now(pids))
                    got[key].seconds += current[1] - start
                barrier.wait()
                if errors:
                    break
                with _charged(got[key], pids, measured):
                    variants[key].settle()
        finally:
            current[:] = [None, 0.0, False]
            barrier.wait()
            for t in threads:
                t.join()
    finally:
        for v in opened:
            v.close()
        if shared is not None:
            shared.close()
    if errors:
        raise errors[0]
    return [_sliced_result(k, got[k], "sync", clients, repeat, keys.index(k)) for k in keys]


@contextlib.contextmanager
def _charged(got: _Sliced, pids: list[int], measured: bool) -> Iterator[None]:
    """Charge the time and CPU of the block (a variant's settle() after its slice) to the
    variant: a conservative price, since that work no longer overlaps the clients' waits."""
    cpu0 = _CpuSample.now(pids) if measured else None
    start = time.perf_counter()
    yield
    if cpu0 is not None:
        got.cpu.add(cpu0, _CpuSample.now(pids))
        got.seconds += time.perf_counter() - start


async def measure_sliced_async(
    variants: dict[str, AsyncVariant],
    clients: int,
    warmup: float,
    seconds: float,
    slice_s: float,
    find_pids: Callable[[], list[int]],
    *,
    repeat: int,
    shared: SharedAsyncConns | None = None,
) -> list[RunResult]:
    """The asyncio twin of measure_sliced_sync: one task per client, one event loop."""
    keys = list(variants)
    order, warm_slices = _slice_plan(keys, warmup, seconds, slice_s)
    got = _sliced_state(keys, clients)

    async def worker(client: int, key: str, end: float, measured: bool) -> None:
        g = got[key]
        step = variants[key].step
        while (t0 := time.perf_counter()) < end:
            await step(client, g.seqs[client])
            g.seqs[client] += 1
            t1 = time.perf_counter()
            if measured and t1 <= end:
                g.counts[client] += 1
                g.latencies[client].append(t1 - t0)

    opened: list[AsyncVariant] = []
    try:
        for v in variants.values():
            await v.open(clients)
            opened.append(v)
        pids = find_pids()
        for i, key in enumerate(order):
            measured = i >= warm_slices
            end = time.perf_counter() + slice_s
            cpu0 = _CpuSample.now(pids) if measured else None
            start = time.perf_counter()
            tasks = [asyncio.create_task(worker(c, key, end, measured)) for c in range(clients)]
            try:
                await asyncio.sleep(max(0.0, end - time.perf_counter()))
                if cpu0 is not None:
                    got[key].cpu.add(cpu0, _CpuSample.now(pids))
                    got[key].seconds += end - start
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            with _charged(got[key], pids, measured):
                await variants[key].settle()
    finally:
        for v in opened:
            await v.close()
        if shared is not None:
            await shared.close()
    return [_sliced_result(k, got[k], "async", clients, repeat, keys.index(k)) for k in keys]


def _sliced_result(
    key: str, g: _Sliced, api: str, clients: int, repeat: int, position: int
) -> RunResult:
    lat = [x for per_client in g.latencies for x in per_client]
    return _result(key, api, clients, repeat, position, sum(g.counts), g.seconds, lat, g.cpu)


# --------------------------------------------------------------------------------------
# Database housekeeping
# --------------------------------------------------------------------------------------

# The test suites sharing this server restart PostgreSQL now and then; the benchmark waits
# for it to come back rather than dying (or leaving prepared transactions behind).
SERVER_WAIT = 120.0
# A run that dies because the server restarted under it, that completed nothing, or that
# other work on the machine disturbed (--max-other-pct) is started again: at most this many
# attempts for each of the two causes (restarts; disturbances).
MAX_ATTEMPTS = 3
# Other people's test suites can take every connection the server allows for a while; a run
# that cannot connect then waits for slots to free up, this long at most.
CROWDED_WAIT = 180.0


def _too_many_clients(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is the server refusing a connection for want of
    slots (max_connections reached), a transient condition on a shared server. A pool that
    could not fill itself in time says only that (the refusals went to its log)."""
    while exc is not None:
        if isinstance(exc, psycopg.errors.TooManyConnections | PoolTimeout) or (
            "too many clients" in str(exc)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Admin:
    """The benchmark's own autocommit connection, reopened after a server restart."""

    def __init__(self, url: str, schema: str | None = None) -> None:
        self.url = url
        # A bound on TRUNCATE and friends: only a stray of ours could block them, and those
        # are rolled back first, so waiting would mean a bug.
        self.options = "-c lock_timeout=10s" + (f" -c search_path={schema}" if schema else "")
        self._conn: psycopg.Connection[Any] | None = None

    def conn(self) -> psycopg.Connection[Any]:
        """The connection, waiting up to SERVER_WAIT for the server if it is down."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            deadline = time.monotonic() + SERVER_WAIT
            while True:
                try:
                    self._conn = psycopg.connect(self.url, autocommit=True, options=self.options)
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

    def server_started_at(self) -> object:
        """pg_postmaster_start_time(): it changes exactly when the server restarted."""
        row = self.execute("SELECT pg_postmaster_start_time()").fetchone()
        return row[0] if row else None

    def prepared_count(self) -> int:
        """Prepared transactions on the whole server, anyone's."""
        row = self.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone()
        return row[0] if row else 0

    def backend_pids(self, application_name: str) -> list[int]:
        """The server processes of the connections that carry ``application_name``."""
        rows = self.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchall()
        return [pid for (pid,) in rows]

    def backend_pids_tagged(self, tag: str) -> list[int]:
        """The server processes of the connections whose application_name starts with
        ``tag``."""
        rows = self.execute(
            "SELECT pid FROM pg_stat_activity WHERE left(application_name, %s) = %s",
            (len(tag), tag),
        ).fetchall()
        return [pid for (pid,) in rows]

    def drop(self) -> None:
        """Forget the connection (after an error), so the next use reconnects."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None


def environment(admin: Admin) -> dict[str, Any]:
    """What the numbers depend on: server durability settings, cores, versions, load."""
    settings = {
        name: value
        for name, value in admin.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
            (
                [
                    "fsync",
                    "synchronous_commit",
                    "wal_sync_method",
                    "full_page_writes",
                    "commit_delay",
                    "shared_buffers",
                    "max_prepared_transactions",
                    "max_connections",
                    "autovacuum",
                ],
            ),
        ).fetchall()
    }
    version_row = admin.execute("SELECT version()").fetchone()
    return {
        "postgresql": version_row[0] if version_row else "?",
        "prepared_xacts_at_start": admin.prepared_count(),
        "settings": settings,
        "cores": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "psycopg_impl": psycopg.pq.__impl__,
        "libpq": psycopg.pq.version(),
        "twophase": twophase.__version__,
        "twophase_source": _source_revision(),
    }


def _source_revision() -> str:
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


def outcome_table_stats(admin: Admin, prefix: str) -> dict[str, int]:
    """Rows (all / this benchmark's) and on-disk size of twophase's outcome table."""
    if admin.execute("SELECT to_regclass(%s)", (OUTCOME_TABLE,)).fetchone() == (None,):
        return {"rows": 0, "bench_rows": 0, "bytes": 0}
    row = admin.execute(
        f"SELECT count(*), count(*) FILTER (WHERE left(name, %s) = %s),"
        f" pg_total_relation_size('{OUTCOME_TABLE}') FROM {OUTCOME_TABLE}",
        (len(prefix), prefix),
    ).fetchone()
    assert row is not None
    return {"rows": row[0], "bench_rows": row[1], "bytes": row[2]}


def rollback_strays(admin: Admin, prefix: str) -> int:
    """Roll back every prepared transaction of this benchmark; how many there were.

    Our gids are ``<prefix>...`` (b) and ``tp:<prefix>...`` (c, twophase adds ``tp:``).
    """
    stray = [
        gid
        for (gid,) in admin.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE left(gid, %s) = %s OR left(gid, %s) = %s",
            (len(prefix), prefix, len(prefix) + 3, "tp:" + prefix),
        ).fetchall()
    ]
    for gid in stray:
        # Our gids hold [a-z0-9.:-] only, so inlining is safe (the statement takes no params).
        admin.execute(f"ROLLBACK PREPARED '{gid}'".encode())
    return len(stray)


def wait_for_quiet(settle: float, threshold: float) -> float | None:
    """Wait (at most ``settle`` s) for a second in which the machine is < threshold % busy.

    On a shared machine other people's test runs come and go; starting each run in a quiet
    moment keeps them from landing on one variant more than another. Returns the busy % of
    the last second sampled (None off Linux).
    """
    deadline = time.monotonic() + settle
    while True:
        before = _machine_busy_jiffies()
        time.sleep(1.0)
        after = _machine_busy_jiffies()
        if before is None or after is None:
            return None
        total = after[1] - before[1]
        busy = 100.0 * (after[0] - before[0]) / total if total else 0.0
        if busy < threshold or time.monotonic() >= deadline:
            return round(busy, 1)


def reset_between_runs(admin: Admin, prefix: str) -> None:
    """Empty the row table and checkpoint, so every run starts from the same state.

    Without the CHECKPOINT a run that happens to overlap a timed checkpoint pays for it (and
    for the full-page images after it) while its neighbours do not. Strays (from a run a
    restart interrupted) go first: one holding a row lock would block the TRUNCATE.
    """
    rollback_strays(admin, prefix)
    admin.execute(f"TRUNCATE {TABLE}")
    admin.execute("CHECKPOINT")


def cleanup(admin: Admin, prefix: str) -> dict[str, int]:
    """Roll back anything of ours still prepared, delete our outcome rows, drop our table."""
    stray = rollback_strays(admin, prefix)
    deleted = 0
    if admin.execute("SELECT to_regclass(%s)", (OUTCOME_TABLE,)).fetchone() != (None,):
        deleted = admin.execute(
            f"DELETE FROM {OUTCOME_TABLE} WHERE left(name, %s) = %s", (len(prefix), prefix)
        ).rowcount
        # autovacuum may be off (it is on the reference server): reclaim the dead rows so
        # the table is left as compact as the benchmark found it.
        admin.execute(f"VACUUM {OUTCOME_TABLE}")
    audit_deleted = 0
    if admin.execute("SELECT to_regclass(%s)", (AUDIT_TABLE,)).fetchone() != (None,):
        audit_deleted = admin.execute(
            f"DELETE FROM {AUDIT_TABLE} WHERE left(name, %s) = %s", (len(prefix), prefix)
        ).rowcount
        if audit_deleted:
            admin.execute(f"VACUUM {AUDIT_TABLE}")
    admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
    left = admin.execute(
        "SELECT count(*) FROM pg_prepared_xacts WHERE left(gid, %s) = %s OR left(gid, %s) = %s",
        (len(prefix), prefix, len(prefix) + 3, "tp:" + prefix),
    ).fetchone()
    return {
        "rolled_back_stray_prepared": stray,
        "deleted_outcome_rows": deleted,
        "deleted_audit_rows": audit_deleted,
        "still_prepared": left[0] if left else -1,
    }


# --------------------------------------------------------------------------------------
# Orchestration and reporting
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything one benchmark invocation does."""

    url: str
    seconds: float
    warmup: float
    repeat: int
    clients: list[int]
    async_clients: list[int]
    same_conn: bool
    builder: bool
    variants: list[str]
    settle: float
    quiet_pct: float
    max_other_pct: float
    prefix: str
    tracer: str = ""  # what install_tracer_provider() set up, when (o) runs
    slice: float = 0.0  # --slice in seconds: the variants take turns within one window
    schema: str | None = None  # --schema: tables (twophase's too) in a schema of their own


def connections_needed(plan: Plan) -> int:
    """The most server connections one cell holds at once (admin included).

    Without --slice one variant runs at a time. With it, every variant of a cell is open
    together: each twophase variant has a pool of its own (plus the audit log's
    connection), the hand-written ones share one set (and (b)'s committers, a second).
    """
    most = max(plan.clients + plan.async_clients)
    hand = [v for v in plan.variants if v in ("a", "b", "b+")]
    library = [v for v in plan.variants if v not in hand]
    audits = sum(1 for v in library if OBSERVED[v][0])
    second = most if not plan.same_conn and {"b", "b+"} & set(hand) else 0
    if not plan.slice:
        per_variant = [most + (1 if v in library and OBSERVED[v][0] else 0) for v in library]
        return 1 + max([*per_variant, most + second if hand else 0])
    return 1 + most * len(library) + audits + (most + second if hand else 0)


def make_sync(key: str, plan: Plan, names: str) -> SyncVariant:
    """The sync variant ``key`` writing under the name prefix ``names``."""
    if key == "a":
        return PlainSync(plan.url, names)
    if key in ("b", "b+"):
        return HandTpcSync(plan.url, names, same_conn=plan.same_conn, claim=key == "b+")
    return TwophaseSync(
        plan.url, names, builder=plan.builder, observe=OBSERVED[key], hand_spans=key == "cs"
    )


def make_async(key: str, plan: Plan, names: str) -> AsyncVariant:
    """The async variant ``key`` writing under the name prefix ``names``."""
    if key == "a":
        return PlainAsync(plan.url, names)
    if key in ("b", "b+"):
        return HandTpcAsync(plan.url, names, same_conn=plan.same_conn, claim=key == "b+")
    return TwophaseAsync(
        plan.url, names, builder=plan.builder, observe=OBSERVED[key], hand_spans=key == "cs"
    )


def run_all(plan: Plan, admin: Admin, log: Callable[[str], None]) -> list[RunResult]:
    """Every (variant, api, clients) cell, ``repeat`` times, variants interleaved."""
    cells: list[tuple[str, int]] = [("sync", n) for n in plan.clients]
    cells += [("async", n) for n in plan.async_clients]
    results: list[RunResult] = []
    numbers = itertools.count(1)
    keys = plan.variants
    for rep in range(plan.repeat):
        for api, clients in cells:
            # Interleave a, b, c and rotate the starting variant each repeat, so slow drift
            # (and whatever a run leaves behind for the next one) hits every variant alike.
            order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
            if plan.slice:
                for r in run_sliced(plan, admin, log, numbers, api, order, clients, rep):
                    results.append(r)
                    log(
                        f"  rep {rep + 1}/{plan.repeat} {api:5s} clients={clients:2d} "
                        f"({r.variant}) {r.tps:8.1f} tx/s  p50 {r.p50_ms:6.2f} ms  "
                        f"client CPU {r.client_cpu_us_per_txn:6.0f} us/tx  "
                        f"other {r.other_busy_pct or 0:.0f}% of the machine"
                    )
                continue
            for position, key in enumerate(order):
                r = run_one(plan, admin, log, numbers, api, key, clients, rep, position)
                results.append(r)
                log(
                    f"  rep {rep + 1}/{plan.repeat} {api:5s} clients={clients:2d} ({key}) "
                    f"{r.tps:8.1f} tx/s  p50 {r.p50_ms:6.2f} ms  "
                    f"client CPU {r.client_cpu_us_per_txn:6.0f} us/tx  "
                    f"load {r.load_avg_1m_before:.2f}  busy before {r.busy_pct_before}%"
                    + ("  DISTURBED" if r.disturbed else "")
                )
    return results


class ServerTrouble:
    """What a run does about a database error: it waits (up to CROWDED_WAIT) while the
    server has no connection slot free, starts again after a server restart (up to
    MAX_ATTEMPTS runs), and raises anything else: a real failure, which must be seen."""

    def __init__(self, admin: Admin, log: Callable[[str], None]) -> None:
        self.admin = admin
        self.log = log
        self.restarts = 0
        self._crowded_until: float | None = None

    def again(self, exc: Exception, started: object, what: str) -> None:
        """Return to run again; raise ``exc`` if that would not help."""
        if _too_many_clients(exc):
            self._crowded_until = self._crowded_until or time.monotonic() + CROWDED_WAIT
            if time.monotonic() > self._crowded_until:
                raise exc
            self.log(f"  {what}: the server has no connection slot free; waiting")
            time.sleep(5.0)
            return
        self.admin.drop()
        self.restarts += 1
        if self.restarts >= MAX_ATTEMPTS or self.admin.server_started_at() == started:
            raise exc
        self.log(f"  server restarted during {what}: {exc}; again")


def run_sliced(
    plan: Plan,
    admin: Admin,
    log: Callable[[str], None],
    numbers: Iterator[int],
    api: str,
    keys: list[str],
    clients: int,
    rep: int,
) -> list[RunResult]:
    """One window in which ``keys`` take turns (--slice); again after a server restart.

    Nothing is re-run for being disturbed: every variant shared the disturbance.
    """
    trouble = ServerTrouble(admin, log)
    while True:
        # One tag for the window: application_name finds all its backends by it.
        window = f"{plan.prefix}.w{next(numbers):03d}"
        names = {k: f"{window}{k}" for k in keys}
        started = admin.server_started_at()
        try:
            reset_between_runs(admin, plan.prefix)
            quiet = wait_for_quiet(plan.settle, plan.quiet_pct) if plan.settle else None
            load = os.getloadavg()[0]
            prepared = admin.prepared_count()
            finder = functools.partial(admin.backend_pids_tagged, window)
            shared_url = with_app_name(plan.url, f"{window}hand")
            if api == "sync":
                shared = SharedConns(shared_url)
                sync_variants = {k: make_sync(k, plan, names[k]) for k in keys}
                for v in sync_variants.values():
                    if isinstance(v, PlainSync | HandTpcSync):
                        v.shared = shared
                results = measure_sliced_sync(
                    sync_variants,
                    clients,
                    plan.warmup,
                    plan.seconds,
                    plan.slice,
                    finder,
                    repeat=rep,
                    shared=shared,
                )
            else:
                shared_async = SharedAsyncConns(shared_url)
                async_variants = {k: make_async(k, plan, names[k]) for k in keys}
                for av in async_variants.values():
                    if isinstance(av, PlainAsync | HandTpcAsync):
                        av.shared = shared_async
                results = asyncio.run(
                    measure_sliced_async(
                        async_variants,
                        clients,
                        plan.warmup,
                        plan.seconds,
                        plan.slice,
                        finder,
                        repeat=rep,
                        shared=shared_async,
                    )
                )
        except (psycopg.Error, twophase.TwoPhaseError) as exc:
            trouble.again(exc, started, f"{api} x{clients}")
            continue
        for r in results:
            r.attempt = trouble.restarts + 1
            r.load_avg_1m_before = round(load, 2)
            r.busy_pct_before = quiet
            r.prepared_xacts_before = prepared
        return results


def run_one(
    plan: Plan,
    admin: Admin,
    log: Callable[[str], None],
    numbers: Iterator[int],
    api: str,
    key: str,
    clients: int,
    rep: int,
    position: int,
) -> RunResult:
    """One measured run, started again after a server restart or a disturbance."""
    trouble = ServerTrouble(admin, log)
    spoiled = 0
    what = f"({key}) {api} x{clients}"
    while True:
        # A fresh name prefix per attempt: twophase names are single-use once committed,
        # and an interrupted attempt may have committed some.
        names = f"{plan.prefix}.{key}{next(numbers):03d}"
        started = admin.server_started_at()
        try:
            reset_between_runs(admin, plan.prefix)
            quiet = wait_for_quiet(plan.settle, plan.quiet_pct) if plan.settle else None
            load = os.getloadavg()[0]
            prepared = admin.prepared_count()

            def find_pids(app: str = names) -> list[int]:
                return admin.backend_pids(app)

            args = (key, clients, plan.warmup, plan.seconds, find_pids)
            if api == "sync":
                r = measure_sync(make_sync(key, plan, names), *args, repeat=rep, position=position)
            else:
                coro = measure_async(
                    make_async(key, plan, names), *args, repeat=rep, position=position
                )
                r = asyncio.run(coro)
        except NoProgress as exc:
            spoiled += 1
            if spoiled >= MAX_ATTEMPTS:
                raise
            log(f"  {what}: {exc}; again")
            continue
        except (psycopg.Error, twophase.TwoPhaseError) as exc:
            trouble.again(exc, started, what)
            continue
        disturbed = (r.other_busy_pct or 0.0) > plan.max_other_pct
        if disturbed and spoiled + 1 < MAX_ATTEMPTS:
            spoiled += 1
            log(
                f"  {what}: {r.tps:.1f} tx/s, but other work took {r.other_busy_pct:.0f}% of "
                "the machine meanwhile; again"
            )
            continue
        r.disturbed = disturbed
        r.attempt = trouble.restarts + spoiled + 1
        r.load_avg_1m_before = round(load, 2)
        r.busy_pct_before = quiet
        r.prepared_xacts_before = prepared
        return r


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
                "label": VARIANT_LABELS.get(key, BREAKDOWN_LABEL),
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
                "disturbed_runs": sum(r.disturbed for r in runs),
                "reruns": sum(r.attempt - 1 for r in runs),
            }
        )
    ratios: list[dict[str, Any]] = []
    for r_api, r_clients in dict.fromkeys((row["api"], row["clients"]) for row in summary):
        by_key = {
            row["variant"]: row
            for row in summary
            if row["api"] == r_api and row["clients"] == r_clients
        }

        def runs_of(key: str, api: str = r_api, clients: int = r_clients) -> list[RunResult]:
            return [r for r in results if (r.api, r.clients, r.variant) == (api, clients, key)]

        ratio: dict[str, Any] = {"api": r_api, "clients": r_clients}
        if {"b", "c"} <= by_key.keys():
            paired, clean, verdict, doubts = _paired(
                runs_of("b"), runs_of("c"), TARGET, "(b)", "(c)"
            )
            if "a" in by_key:
                ratio["b_over_a"] = by_key["b"]["median_tps"] / by_key["a"]["median_tps"]
            ratio |= {
                "c_over_b": by_key["c"]["median_tps"] / by_key["b"]["median_tps"],
                "c_over_b_paired": paired,
                "target_c_over_b": TARGET,
                "c_over_b_undisturbed": clean,
                # None: inconclusive, see "doubts".
                "target_met": verdict,
                "doubts": doubts,
            }
            if "b+" in by_key:
                plus = by_key["b+"]["median_tps"]
                ratio["bplus_over_b"] = plus / by_key["b"]["median_tps"]
                ratio["c_over_bplus"] = by_key["c"]["median_tps"] / plus
        if {"c", "o"} <= by_key.keys():
            paired, clean, verdict, doubts = _paired(
                runs_of("c"), runs_of("o"), OBSERVE_TARGET, "(c)", "(o)"
            )
            ratio |= {
                "o_over_c": by_key["o"]["median_tps"] / by_key["c"]["median_tps"],
                "o_over_c_paired": paired,
                "target_o_over_c": OBSERVE_TARGET,
                "o_over_c_undisturbed": clean,
                "observe_target_met": verdict,
                "observe_doubts": doubts,
            }
        for part in ("oa", "ot", "cs"):
            if {"c", part} <= by_key.keys():
                ratio[f"{part}_over_c"] = by_key[part]["median_tps"] / by_key["c"]["median_tps"]
                ratio[f"{part}_over_c_paired"] = _paired(
                    runs_of("c"), runs_of(part), OBSERVE_TARGET, "(c)", f"({part})"
                )[0]
        if {"cs", "ot"} <= by_key.keys():
            ratio["ot_over_cs"] = by_key["ot"]["median_tps"] / by_key["cs"]["median_tps"]
            ratio["ot_over_cs_paired"] = _paired(
                runs_of("cs"), runs_of("ot"), OBSERVE_TARGET, "(cs)", "(ot)"
            )[0]
        if len(ratio) > 2:
            ratios.append(ratio)
    return summary, ratios


def _paired(
    base: Sequence[RunResult], other: Sequence[RunResult], target: float, b: str, o: str
) -> tuple[list[float], list[float], bool | None, list[str]]:
    """other/base per repeat, those of undisturbed repeats, the verdict and its doubts.

    Runs of one repeat ran back to back, so their ratio cancels drift between repeats. The
    verdict rests on the repeats whose two runs both ran undisturbed: on a shared machine a
    neighbour's burst can halve one run and flip its ratio. It is given only when all of
    those land on the same side of the target (None: inconclusive).
    """
    paired = [y.tps / x.tps for x, y in zip(base, other, strict=True)]
    clean = [
        y.tps / x.tps for x, y in zip(base, other, strict=True) if not (x.disturbed or y.disturbed)
    ]
    verdict: bool | None = None
    doubts = []
    if len(clean) < len(paired):
        doubts.append(f"{len(paired) - len(clean)} repeat(s) with a disturbed {b} or {o} left out")
    if not clean:
        doubts.append("no undisturbed repeat")
    elif all(x >= target for x in clean):
        verdict = True
    elif all(x < target for x in clean):
        verdict = False
    else:
        doubts.append("undisturbed repeats fall on both sides of the target")
    return paired, clean, verdict, doubts


def _num(x: float | None, width: int) -> str:
    return f"{x:{width}.0f}" if x is not None else f"{'-':>{width}s}"


def render(report: dict[str, Any]) -> str:
    """The human-readable report."""
    env = report["environment"]
    s = env["settings"]
    plan = report["plan"]
    lines = [
        "Environment",
        f"  server     {env['postgresql']}",
        "  durability fsync={fsync} synchronous_commit={synchronous_commit} "
        "wal_sync_method={wal_sync_method} full_page_writes={full_page_writes} "
        "commit_delay={commit_delay}".format(**s),
        f"  server     shared_buffers={s['shared_buffers']} "
        f"max_prepared_transactions={s['max_prepared_transactions']} "
        f"max_connections={s['max_connections']} autovacuum={s['autovacuum']}; "
        f"{env['prepared_xacts_at_start']} transactions prepared (by anyone) at start",
        f"  client     {env['cores']} cores, load avg {env['load_avg_1_5_15']}, "
        f"Python {env['python']}, psycopg {env['psycopg']} ({env['psycopg_impl']}, "
        f"libpq {env['libpq']}), twophase {env['twophase']} ({env['twophase_source']})",
        f"  plan       {plan['seconds']} s measured after {plan['warmup']} s warm-up, "
        f"x{plan['repeat']} interleaved"
        + (
            f" (within one window, taking turns every {plan['slice'] * 1000:.0f} ms)"
            if plan.get("slice")
            else ""
        )
        + "; (b) commits on the "
        f"{'same' if plan['same_conn'] else 'second'} connection; (c) inserts with "
        f"{'the query builder' if plan['builder'] else 'tx.execute'}; each run waits up to "
        f"{plan['settle']} s for a second with the machine < {plan['quiet_pct']}% busy"
        + (f"; tables in schema {plan['schema']}" if plan.get("schema") else ""),
        "",
        "Variants",
        *(
            f"  ({k}) {VARIANT_LABELS.get(k, BREAKDOWN_LABEL)}"
            for k in VARIANTS
            if k in plan["variants"]
        ),
        *([f"  tracing: {plan['tracer']}"] if plan.get("tracer") else []),
        "",
        "Results (median of the repeats; CPU is microseconds per transaction: 'client' this",
        "process, 'server' this run's backends, 'other' the rest of the machine's busy time --",
        "WAL writer, checkpointer, kernel and anything else running; 'busy' is % of all cores)",
        "",
        f"{'api':5s} {'cli':>3s} {'var':4s} {'tx/s':>8s} {'min..max':>17s} {'spread':>6s} "
        f"{'p50 ms':>6s} {'p99 ms':>6s} {'client':>6s} {'server':>6s} {'other':>6s} {'busy':>4s}",
    ]
    for row in report["summary"]:
        machine = row["median_machine_cpu_us_per_txn"]
        server = row["median_server_cpu_us_per_txn"]
        client = row["median_client_cpu_us_per_txn"]
        other = machine - client - (server or 0.0) if machine is not None else None
        var = f"({row['variant']})"
        lines.append(
            f"{row['api']:5s} {row['clients']:3d} {var:4s} {row['median_tps']:8.1f} "
            f"{row['min_tps']:8.1f}..{row['max_tps']:<8.1f} {row['spread_pct']:5.1f}% "
            f"{row['median_p50_ms']:6.2f} {row['median_p99_ms']:6.2f} {client:6.0f} "
            f"{_num(server, 6)} {_num(other, 6)} {_num(row['median_machine_busy_pct'], 4)}"
            + (f"  {row['disturbed_runs']} disturbed run(s)" if row["disturbed_runs"] else "")
        )
    lines += ["", "Ratios (of medians; paired = per repeat, c and b measured back to back)"]
    verdicts = {True: "meets", False: "MISSES", None: "INCONCLUSIVE for"}
    for r in report["ratios"]:
        head = f"  {r['api']:5s} {r['clients']:2d} clients: "
        pad = " " * len(head)
        if "c_over_b" in r:
            paired = ", ".join(f"{x:.3f}" for x in r["c_over_b_paired"])
            clean = ", ".join(f"{x:.3f}" for x in r["c_over_b_undisturbed"]) or "none"
            lines.append(
                f"{head}(c)/(b) = {r['c_over_b']:.3f} [paired {paired}] "
                f"{verdicts[r['target_met']]} the >= {TARGET} target"
                + (f";  (b)/(a) = {r['b_over_a']:.3f}" if "b_over_a" in r else "")
            )
            lines.append(
                f"{pad}verdict from undisturbed repeats [{clean}]"
                + (f" ({'; '.join(r['doubts'])})" if r["doubts"] else "")
            )
            head = pad
        if "bplus_over_b" in r:
            lines.append(
                f"{pad}split: (b+)/(b) = {r['bplus_over_b']:.3f} "
                f"(outcome row, server side) x (c)/(b+) = {r['c_over_bplus']:.3f} "
                "(library Python code)"
            )
        if "o_over_c" in r:
            paired = ", ".join(f"{x:.3f}" for x in r["o_over_c_paired"])
            clean = ", ".join(f"{x:.3f}" for x in r["o_over_c_undisturbed"]) or "none"
            lines.append(
                f"{head}(o)/(c) = {r['o_over_c']:.3f} [paired {paired}] "
                f"{verdicts[r['observe_target_met']]} the >= {OBSERVE_TARGET} target "
                "(audit + tracing)"
            )
            lines.append(
                f"{pad}verdict from undisturbed repeats [{clean}]"
                + (f" ({'; '.join(r['observe_doubts'])})" if r["observe_doubts"] else "")
            )
        for part, what in (
            ("oa", "audit only"),
            ("ot", "tracing only"),
            ("cs", "the SDK's own cost for three spans"),
        ):
            if f"{part}_over_c" in r:
                paired = ", ".join(f"{x:.3f}" for x in r[f"{part}_over_c_paired"])
                lines.append(
                    f"{head}({part})/(c) = {r[f'{part}_over_c']:.3f} [paired {paired}] ({what})"
                )
                head = pad
        if "ot_over_cs" in r:
            paired = ", ".join(f"{x:.3f}" for x in r["ot_over_cs_paired"])
            lines.append(
                f"{head}(ot)/(cs) = {r['ot_over_cs']:.3f} [paired {paired}] "
                "(twophase's tracing beyond the SDK's cost)"
            )
    ot = report["outcome_table"]
    lines += [
        "",
        f"twophase_outcome: {ot['before']['rows']} rows / {ot['before']['bytes'] // 1024} kB "
        f"before, {ot['after_runs']['rows']} rows / {ot['after_runs']['bytes'] // 1024} kB "
        f"after the runs ({ot['after_runs']['bench_rows']} of them this benchmark's: one per "
        f"{', '.join(f'({k})' for k in plan['variants'] if k not in ('a', 'b'))} "
        "transaction, warm-ups included).",
        "Cleanup: {rolled_back_stray_prepared} stray prepared rolled back, "
        "{deleted_outcome_rows} outcome rows and {deleted_audit_rows} audit rows deleted, "
        "{still_prepared} still prepared.".format(**report["cleanup"]),
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default=os.environ.get("TWOPHASE_BENCH_URL", DEFAULT_URL))
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant and concurrency")
    p.add_argument("--clients", default="1,16", help="sync thread counts, comma-separated")
    p.add_argument(
        "--async-clients", default="16", help="async task counts ('' to skip the async API)"
    )
    p.add_argument(
        "--b-commit",
        choices=["second", "same"],
        default="second",
        help="connection (b) issues COMMIT PREPARED on (default: a second one per client)",
    )
    p.add_argument("--builder", action="store_true", help="(c) inserts with the query builder")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="add (b+): (b) plus twophase's claim SQL, to split (c)/(b) into server and client",
    )
    p.add_argument(
        "--schema",
        help="run in this schema (made, and dropped at the end, if missing): a fresh\n"
        "twophase_outcome of its own rather than the database's shared one (README)",
    )
    p.add_argument(
        "--slice",
        type=float,
        default=0.0,
        metavar="MS",
        help="interleave the variants within one window, taking turns every MS milliseconds\n"
        "(robust to other work on a shared machine; see bench/README.md)",
    )
    p.add_argument(
        "--observe",
        action="store_true",
        help="add (o): (c) with audit=True, tracing=True and an OpenTelemetry SDK; (o)/(c)",
    )
    p.add_argument(
        "--sample",
        type=float,
        default=1.0,
        metavar="RATIO",
        help="the tracer provider samples this share of traces (default 1: every span, the\n"
        "worst case); 0.1 is a common production setting",
    )
    p.add_argument(
        "--variants",
        default="a,b,c",
        help="which variants to run, of a,b,b+,c,o,oa,ot,cs (e.g. 'c' alone to profile it\n"
        "with py-spy; 'c,o,oa,ot,cs' to split the cost of observing into audit, tracing and\n"
        "the OpenTelemetry SDK's own share)",
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
    p.add_argument(
        "--max-other-pct",
        type=float,
        default=25.0,
        help="run again (up to 3 attempts) when other work took more than this %% of all "
        "cores during the window",
    )
    p.add_argument("--json", action="store_true", help="print JSON results instead of a table")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON results to FILE")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.breakdown and "b+" not in variants:
        variants.insert(variants.index("c") if "c" in variants else len(variants), "b+")
    if args.observe and "o" not in variants:
        variants.append("o")
    if not variants or not set(variants) <= set(VARIANTS):
        p.error(
            f"--variants takes a comma-separated subset of {','.join(VARIANTS)}, "
            f"got {args.variants!r}"
        )
    args.variant_list = variants
    if args.schema is not None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", args.schema):
            p.error(f"--schema takes a lower-case SQL identifier, got {args.schema!r}")
        if "options=" in args.url:
            p.error("--schema sets the connections' options; drop options= from --url")
        sep = "&" if "?" in args.url else "?"
        args.url = f"{args.url}{sep}options=-csearch_path%3D{args.schema}"
    if args.seconds <= 0 or args.warmup < 0 or args.repeat < 1 or args.slice < 0:
        p.error("need --seconds > 0, --warmup >= 0, --repeat >= 1 and --slice >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    plan = Plan(
        url=args.url,
        seconds=args.seconds,
        warmup=args.warmup,
        repeat=args.repeat,
        clients=ints(args.clients),
        async_clients=ints(args.async_clients),
        same_conn=args.b_commit == "same",
        builder=args.builder,
        variants=args.variant_list,
        settle=args.settle,
        quiet_pct=args.quiet_pct,
        max_other_pct=args.max_other_pct,
        # Lower-case hex, dots and digits only: valid as a twophase name, safe to inline as a
        # gid, and unique per invocation so concurrent benchmarks never clean up each other.
        prefix=f"tpbench-{secrets.token_hex(3)}",
        slice=args.slice / 1000.0,
        schema=args.schema,
    )
    if not 0 < args.sample <= 1:
        print(f"tpc_overhead: --sample takes a ratio in (0, 1], got {args.sample}", file=sys.stderr)
        return 2
    if {"o", "ot", "cs"} & set(plan.variants):
        plan.tracer = install_tracer_provider(args.sample)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    admin = Admin(plan.url, args.schema)
    made_schema = False
    if args.schema:
        made_schema = (
            admin.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (args.schema,)
            ).fetchone()
            is None
        )
        if made_schema:
            admin.execute(f'CREATE SCHEMA "{args.schema}"'.encode())
    try:
        env = environment(admin)
        limit = int(env["settings"]["max_connections"]) - 3  # superuser_reserved_connections
        if (need := connections_needed(plan)) > limit:
            log(
                f"tpc_overhead: this plan holds up to {need} connections at once, and the "
                f"server allows {limit}: run fewer variants per invocation (with --slice "
                "every variant of a cell is connected together), fewer clients, or raise "
                "max_connections"
            )
            return 2
        admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
        admin.execute(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, payload text NOT NULL)")
        if "b+" in plan.variants:
            warning = check_claim_sql()
            if warning:
                log(f"WARNING: {warning}")
            # (b+) writes to twophase's outcome table, perhaps before any (c) run created it.
            with twophase.connect(plan.url, pool_min=1, pool_max=1) as db:
                db.status(f"{plan.prefix}.probe")
        outcome_before = outcome_table_stats(admin, plan.prefix)
        log(f"tpc_overhead: prefix {plan.prefix}, {plan.repeat} repeats")
        try:
            results = run_all(plan, admin, log)
            outcome_after = outcome_table_stats(admin, plan.prefix)
        finally:
            # Also on Ctrl-C or a failure: nothing of ours may stay prepared (it would hold
            # locks and a max_prepared_transactions slot until someone rolls it back).
            admin.drop()  # it may be the very connection a restart broke
            cleaned = cleanup(admin, plan.prefix)
            log(f"cleanup: {cleaned}")
    finally:
        admin.drop()
        if made_schema:
            admin.execute(f'DROP SCHEMA "{args.schema}" CASCADE'.encode())
            admin.drop()

    summary, ratios = summarise(results)
    report = {
        "environment": env,
        "plan": asdict(plan) | {"url": plan.url.split("@")[-1]},
        "runs": [asdict(r) for r in results],
        "summary": summary,
        "ratios": ratios,
        "outcome_table": {"before": outcome_before, "after_runs": outcome_after},
        "cleanup": cleaned,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if cleaned["still_prepared"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
