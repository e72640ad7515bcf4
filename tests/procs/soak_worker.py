"""Randomized crash soak: global transactions over three databases, killed at random moments.

Three roles, one file (tests/test_soak.py and scripts/soak drive it):

``worker SPEC_JSON``
    Opens the participants ``orders`` (PostgreSQL ``test``), ``stock`` (PostgreSQL
    ``test2``) and ``billing`` (MariaDB ``test``), prints ``READY`` and waits for ``GO`` on
    stdin (so the parent can start the next one while the current one runs). Then it runs
    global transactions until it is killed. Before each one it appends the id to the id log
    (one ``write()``, no fsync). Each transaction enlists the three participants in a random
    order; every branch inserts the row ``(gid, slot)``; in some transactions every branch
    also adds 1 to the counter row ``slot`` of its database. Some transactions stall a
    little inside the block, some raise on purpose (rolled back). Sync or async coordinator,
    as the parent says.

``recoverer SPEC_JSON``
    Opens the participants, prints ``READY``, waits for ``GO``, then calls ``recover()``
    until a pass finds nothing to do and prints the totals as JSON. The parent lets it run
    alongside a worker, and sometimes SIGKILLs it mid-way.

``soak [--kills N] [--minutes M] [--seed S] [--log orders|billing]``
    The parent (:func:`run_soak`): starts workers, SIGKILLs each one 0-300 ms after its
    ``GO`` (seeded RNG), starts the next, runs recovery now and then (in-process, or in a
    recoverer process, sometimes killed), and at the end recovers until nothing waits and
    checks atomicity over every transaction id ever started. Prints the summary line
    ``kills=... transactions=... committed=... rolled_back=... violations=...`` and exits 1
    on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``procs`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import twophase
from procs import crash_coordinator as cc
from procs import rawdb

KEYS = ("orders", "stock", "billing")
SLOTS = 8
TX_TIMEOUT = 1  # seconds: deadline = int(start + 1) + 1, so recovery may act 1-2 s later
KILL_WINDOW = 0.3  # a worker is killed uniformly 0-300 ms after its GO
P_COUNTER = 0.3  # a transaction bumps a counter slot in every database
P_ABORT = 0.05  # a transaction raises inside its block (rolled back on purpose)
P_STALL = 0.2  # a transaction sleeps 0-50 ms inside its block (before its end)
P_ASYNC = 0.3  # a worker process uses the AsyncCoordinator
READY_TIMEOUT = 60.0
PREWARM = 2
MAX_START_FAILURES = 30  # processes that could not connect (a server restarting) before giving up


class Abort(Exception):
    """Raised inside a transaction's block on purpose."""


def _err(line: str) -> None:
    # Goes to the shared error file the parent reads at the end.
    sys.stderr.write(line.replace("\n", " ") + "\n")
    sys.stderr.flush()


def _wait_for_go(conn: Connection) -> str | None:
    """Say READY, wait for ``("GO", argument)``; the argument, or None when dismissed."""
    conn.send("READY")
    try:
        msg = conn.recv()
    except EOFError:
        return None
    return str(msg[1]) if isinstance(msg, tuple) and msg[0] == "GO" else None


# -- the worker ------------------------------------------------------------------------------


@dataclass
class Plan:
    gid: str
    slot: int  # -1: no counter
    order: list[str]
    abort: bool
    stall: float


def _plans(spec: dict[str, Any]) -> Any:
    rng = random.Random(spec["seed"])
    seq = 0
    while True:
        order = list(KEYS)
        rng.shuffle(order)
        yield Plan(
            gid=f"i{spec['inc']}-{seq}",
            slot=rng.randrange(SLOTS) if rng.random() < P_COUNTER else -1,
            order=order,
            abort=rng.random() < P_ABORT,
            stall=rng.uniform(0, 0.05) if rng.random() < P_STALL else 0.0,
        )
        seq += 1


def _log_id(fd: int, gid: str) -> None:
    # One write() of a short line on an O_APPEND file: whole or not at all, even on SIGKILL.
    os.write(fd, f"{gid}\n".encode())


def work_sync(spec: dict[str, Any], conn: Connection) -> None:
    dbs = cc.connect_all(spec["ns"])
    coord = twophase.Coordinator(dbs, log=spec["log"], namespace=spec["ns"])
    coord.status("warm-up")  # creates the log tables and opens the log connection
    fd = os.open(spec["idlog"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    table, ctr = spec["table"], spec["ctr"]
    if _wait_for_go(conn) is None:
        return

    def branch(plan: Plan) -> Callable[[twophase.Transaction], None]:
        def fn(tx: twophase.Transaction) -> None:
            tx.insert_into(table).values(gid=plan.gid, slot=plan.slot).execute()
            if plan.slot >= 0:
                tx.execute(f"UPDATE {ctr} SET n = n + 1 WHERE slot = %s", (plan.slot,))

        return fn

    for plan in _plans(spec):
        _log_id(fd, plan.gid)
        try:
            with coord.transaction(plan.gid, timeout=TX_TIMEOUT) as g:
                for key in plan.order:
                    g.enlist(key, branch(plan))
                if plan.stall:
                    time.sleep(plan.stall)
                if plan.abort:
                    raise Abort
        except Abort:
            pass
        except twophase.TwoPhaseError as exc:
            _err(f"ERR {type(exc).__name__} {plan.gid}: {exc}")
        except Exception as exc:  # not part of the contract: report it, keep going
            _err(f"UNEXPECTED {type(exc).__name__} {plan.gid}: {exc!r}")


async def work_async(spec: dict[str, Any], conn: Connection) -> None:
    dbs = await cc.connect_all_async(spec["ns"])
    coord = twophase.AsyncCoordinator(dbs, log=spec["log"], namespace=spec["ns"])
    await coord.status("warm-up")
    fd = os.open(spec["idlog"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    table, ctr = spec["table"], spec["ctr"]
    if await asyncio.to_thread(_wait_for_go, conn) is None:
        return

    def branch(plan: Plan) -> Any:
        async def fn(tx: twophase.AsyncTransaction) -> None:
            await tx.insert_into(table).values(gid=plan.gid, slot=plan.slot).execute()
            if plan.slot >= 0:
                await tx.execute(f"UPDATE {ctr} SET n = n + 1 WHERE slot = %s", (plan.slot,))

        return fn

    for plan in _plans(spec):
        _log_id(fd, plan.gid)
        try:
            async with coord.transaction(plan.gid, timeout=TX_TIMEOUT) as g:
                for key in plan.order:
                    await g.enlist(key, branch(plan))
                if plan.stall:
                    await asyncio.sleep(plan.stall)
                if plan.abort:
                    raise Abort
        except Abort:
            pass
        except twophase.TwoPhaseError as exc:
            _err(f"ERR {type(exc).__name__} {plan.gid}: {exc}")
        except Exception as exc:
            _err(f"UNEXPECTED {type(exc).__name__} {plan.gid}: {exc!r}")


# -- the recoverer ---------------------------------------------------------------------------


def recover_loop(spec: dict[str, Any], conn: Connection) -> None:
    dbs = cc.connect_all(spec["ns"])
    coord = twophase.Coordinator(dbs, log=spec["log"], namespace=spec["ns"])
    coord.status("warm-up")
    seconds = _wait_for_go(conn)
    if seconds is None:
        return
    # Pass after pass for that long, so a kill at a random moment lands inside a pass.
    totals: Counter[str] = Counter()
    stop = time.monotonic() + float(seconds or 0.5)
    while time.monotonic() < stop:
        report = coord.recover()
        totals.update(committed=report.committed, rolled_back=report.rolled_back, passes=1)
        for e in report.errors:
            _err(f"RECOVER_ERROR {e}")
    conn.send(dict(totals))


def child_main(role: str, spec: dict[str, Any], conn: Connection, errors: str) -> None:
    """Entry point of a worker or recoverer process (forked by the forkserver)."""
    fd = os.open(errors, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)  # tracebacks and _err() lines go to the shared error file
    os.close(fd)
    if role == "recoverer":
        recover_loop(spec, conn)
    elif spec["mode"] == "async":
        asyncio.run(work_async(spec, conn))
    else:
        work_sync(spec, conn)


# -- the parent ------------------------------------------------------------------------------


@dataclass
class SoakResult:
    seed: int
    namespace: str
    workdir: str
    kills: int = 0
    recovery_kills: int = 0
    recovery_processes: int = 0
    parent_recoveries: int = 0
    async_workers: int = 0
    transactions: int = 0
    committed: int = 0
    rolled_back: int = 0
    violations: int = 0
    unlogged: int = 0
    recovered_commits: int = 0
    fenced: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    worker_errors: Counter[str] = field(default_factory=Counter)
    recovery_errors: int = 0
    start_failures: int = 0

    def summary(self) -> str:
        return (
            f"kills={self.kills} transactions={self.transactions} committed={self.committed} "
            f"rolled_back={self.rolled_back} violations={self.violations}"
        )

    def details(self) -> str:
        errors = ", ".join(f"{k}={v}" for k, v in sorted(self.worker_errors.items())) or "none"
        return (
            f"seed={self.seed} namespace={self.namespace} seconds={self.seconds:.0f} "
            f"recovery_kills={self.recovery_kills} recovery_processes={self.recovery_processes} "
            f"parent_recoveries={self.parent_recoveries} async_workers={self.async_workers} "
            f"recovered_commits={self.recovered_commits} fenced={self.fenced} "
            f"unlogged={self.unlogged} recovery_errors={self.recovery_errors} "
            f"start_failures={self.start_failures} "
            f"worker_errors: {errors}"
        )


class Child:
    """A worker or recoverer process: started ahead of its turn, READY, then GO.

    It is forked by a forkserver that has already imported twophase and the drivers, so a
    child is ready in about the time it takes to connect; it is a real process, killed with
    a real SIGKILL.
    """

    def __init__(self, ctx: Any, role: str, spec: dict[str, Any], errors: str) -> None:
        self.role = role
        self.spec = spec
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(
            target=child_main, args=(role, spec, child_end, errors), name=f"soak-{role}"
        )
        self.proc.start()
        child_end.close()

    def go(self, arg: str = "") -> bool:
        """Wait for READY, send GO; False (and the process reaped) if it did not start."""
        try:
            ready = self.conn.poll(READY_TIMEOUT) and self.conn.recv() == "READY"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            return False
        self.conn.send(("GO", arg))
        return True

    def kill(self) -> int | None:
        """SIGKILL it (if it still runs) and reap it; its exit code."""
        if self.proc.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(READY_TIMEOUT)
        self.conn.close()
        return self.proc.exitcode

    def wait(self) -> Any:
        """Wait for it to finish on its own; what it sent (None if nothing)."""
        got = None
        with contextlib.suppress(EOFError, OSError):
            if self.conn.poll(READY_TIMEOUT):
                got = self.conn.recv()
        self.proc.join(READY_TIMEOUT)
        self.conn.close()
        return got

    def dismiss(self) -> None:
        """A child that never got GO: it exits without doing anything."""
        with contextlib.suppress(OSError):
            self.conn.send(("STOP", ""))
        self.proc.join(READY_TIMEOUT)
        if self.proc.exitcode is None:
            self.kill()
        self.conn.close()


def _context() -> Any:
    """The forkserver, with twophase, the drivers and this module imported once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["twophase", "psycopg", "pymysql", "aiomysql", __name__])
    # The forkserver must find ``procs`` on its own path: start it now with PYTHONPATH set
    # (it does not take the parent's sys.path), then put the environment back as it was.
    tests_dir = str(Path(__file__).resolve().parents[1])
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, before) if p)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    return ctx


def _create_tables(table: str, ctr: str) -> None:
    for url in cc.URLS.values():
        rawdb.create_table(url, table, "gid varchar(64) PRIMARY KEY, slot int NOT NULL")
        rawdb.create_table(url, ctr, "slot int PRIMARY KEY, n int NOT NULL")
        values = ", ".join(f"({s}, 0)" for s in range(SLOTS))
        rawdb.query(url, f"INSERT INTO {ctr} (slot, n) VALUES {values}")


def _recover_until_idle(coord: twophase.Coordinator, result: SoakResult, limit: float) -> None:
    stop = time.monotonic() + limit
    while True:
        try:
            report = coord.recover()
        except twophase.TwoPhaseError as exc:  # e.g. a server restarting: try again
            if time.monotonic() > stop:
                result.problems.append(f"final recovery failed: {exc!r}")
                return
            time.sleep(1.0)
            continue
        if report.errors:
            result.recovery_errors += len(report.errors)
        busy = report.waiting or report.committed or report.rolled_back or report.skipped
        if not busy and not report.errors:
            left = {k: cc.prepared_branches(u, result.namespace) for k, u in cc.URLS.items()}
            if not any(left.values()):
                return
        if time.monotonic() > stop:
            result.problems.append(f"final recovery did not settle within {limit:.0f}s")
            return
        time.sleep(0.2)


def _check(result: SoakResult, table: str, ctr: str, idlog: Path, log_key: str) -> None:
    """Atomicity over every id ever started: all three rows or none, and the rest."""
    ns = result.namespace
    logged = {line.strip() for line in idlog.read_text().splitlines() if line.strip()}
    rows: dict[str, dict[str, int]] = {}
    for key, url in cc.URLS.items():
        rows[key] = {
            str(r["gid"]): int(r["slot"])
            for r in rawdb.query(url, f"SELECT gid, slot FROM {table}")
        }
    found = set().union(*(set(r) for r in rows.values()))
    result.unlogged = len(found - logged)
    ids = logged | found
    decisions = cc.decisions_in(cc.URLS[log_key], ns)
    result.transactions = len(ids)
    for gid in sorted(ids):
        present = [k for k in KEYS if gid in rows[k]]
        decision = decisions.get(f"{ns}:{gid}")
        if present and len(present) != len(KEYS):
            result.problems.append(f"{gid}: rows only in {present} (decision {decision})")
            result.violations += 1
            continue
        if present:
            result.committed += 1
            if len({rows[k][gid] for k in KEYS}) != 1:
                result.problems.append(f"{gid}: slots differ {[rows[k][gid] for k in KEYS]}")
                result.violations += 1
            if decision != "committed":
                result.problems.append(f"{gid}: committed everywhere, decision {decision}")
                result.violations += 1
        else:
            result.rolled_back += 1
            if decision == "committed":
                result.problems.append(f"{gid}: commit decision but no rows")
                result.violations += 1
    result.fenced = sum(1 for d in decisions.values() if d == "rolled_back")
    # Counters: each database's slot equals the number of its committed rows in that slot.
    for key, url in cc.URLS.items():
        want = Counter(slot for slot in rows[key].values() if slot >= 0)
        for r in rawdb.query(url, f"SELECT slot, n FROM {ctr}"):
            if int(r["n"]) != want.get(int(r["slot"]), 0):
                result.problems.append(
                    f"{key}: counter slot {r['slot']} = {r['n']}, rows say {want[int(r['slot'])]}"
                )
                result.violations += 1
    for key, url in cc.URLS.items():
        left = cc.prepared_branches(url, ns)
        if left:
            result.problems.append(f"{key}: still prepared: {sorted(left)[:5]}")
            result.violations += len(left)
    audit = cc.URLS[log_key]
    if cc.table_exists(audit, "twophase_audit_log"):
        prefix = f"{ns}:"
        result.recovered_commits = int(
            rawdb.query(
                audit,
                "SELECT count(DISTINCT name) AS n FROM twophase_audit_log "
                "WHERE step = 'recover' AND outcome = 'committed' AND left(name, %s) = %s",
                (len(prefix), prefix),
            )[0]["n"]
        )


def _read_errors(path: Path, result: SoakResult) -> None:
    for line in path.read_text(errors="replace").splitlines():
        word = line.split(" ", 2)
        if word[0] in ("ERR", "UNEXPECTED") and len(word) > 1:
            result.worker_errors[f"{word[0].lower()}:{word[1]}"] += 1
        elif word[0] == "RECOVER_ERROR":
            result.recovery_errors += 1


def run_soak(
    *,
    kills: int | None = 200,
    minutes: float | None = None,
    seed: int | None = None,
    log_key: str = "orders",
    workdir: str | None = None,
    out: Callable[[str], None] = print,
    keep: bool = False,
) -> SoakResult:
    """The whole soak; returns its figures (``violations`` must be 0)."""
    if kills is None and minutes is None:
        raise ValueError("give kills or minutes (or both: whichever comes first)")
    seed = seed if seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    cc.ensure_databases()
    ns = f"sk{uuid.uuid4().hex[:10]}"
    work = Path(workdir or tempfile.mkdtemp(prefix="twophase-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    result = SoakResult(seed=seed, namespace=ns, workdir=str(work))
    table, ctr = f"tp_soak_{ns}", f"tp_soakc_{ns}"
    idlog, errlog = work / "ids.log", work / "errors.log"
    idlog.touch()
    out(f"soak: seed={seed} namespace={ns} log={log_key} kills={kills} minutes={minutes}")
    out(f"soak: workdir {work}")
    _create_tables(table, ctr)
    started = time.monotonic()
    stop_at = started + minutes * 60 if minutes is not None else None
    dbs = cc.connect_all(ns)
    coord = twophase.Coordinator(dbs, log=log_key, namespace=ns)
    errlog.touch()
    errors = str(errlog)
    ctx = _context()
    inc = 0

    def spec(**extra: Any) -> dict[str, Any]:
        return {"ns": ns, "log": log_key, "table": table, "ctr": ctr, "idlog": str(idlog)} | extra

    def new_worker() -> Child:
        nonlocal inc
        inc += 1
        mode = "async" if rng.random() < P_ASYNC else "sync"
        result.async_workers += mode == "async"
        return Child(ctx, "worker", spec(inc=inc, seed=rng.randrange(2**32), mode=mode), errors)

    def new_recoverer() -> Child:
        return Child(ctx, "recoverer", spec(), errors)

    # Workers start up (imports, connections) ahead of their turn, PREWARM of them at a time.
    waiting = [new_worker() for _ in range(PREWARM)]
    next_recoverer: Child | None = new_recoverer()
    try:
        while True:
            if kills is not None and result.kills >= kills:
                break
            if stop_at is not None and time.monotonic() >= stop_at:
                break
            worker = waiting.pop(0)
            recoverer: Child | None = None
            kill_recoverer = rng.random() < 0.5
            if rng.random() < 0.3:
                # A recovery process alongside the worker; half of them are killed mid-way
                # (those run pass after pass until then), the others run 0.3 s and exit.
                recoverer, next_recoverer = next_recoverer, new_recoverer()
                if recoverer.go("30" if kill_recoverer else "0.3"):
                    result.recovery_processes += 1
                else:
                    recoverer = None
                    result.start_failures += 1
            started_ok = worker.go()
            waiting.append(new_worker())
            if not started_ok:
                # E.g. a server restarting (other suites restart them): try the next one.
                result.start_failures += 1
                if result.start_failures > MAX_START_FAILURES:
                    result.problems.append(f"{result.start_failures} processes failed to start")
                    break
                if recoverer is not None:
                    recoverer.kill()
                time.sleep(1.0)
                continue
            time.sleep(rng.uniform(0, KILL_WINDOW))
            rc = worker.kill()
            result.kills += 1
            if rc != -signal.SIGKILL:
                result.problems.append(f"worker {worker.spec['inc']} exited by itself (rc={rc})")
            if recoverer is not None:
                if kill_recoverer:
                    time.sleep(rng.uniform(0, KILL_WINDOW))
                    if recoverer.kill() == -signal.SIGKILL:
                        result.recovery_kills += 1
                else:
                    totals = recoverer.wait()
                    if recoverer.proc.exitcode != 0 or not isinstance(totals, dict):
                        result.problems.append(
                            f"a recovery process failed (rc={recoverer.proc.exitcode})"
                        )
            if rng.random() < 0.25:
                try:
                    report = coord.recover()
                    result.recovery_errors += len(report.errors)
                except twophase.TwoPhaseError as exc:  # e.g. a server restarting
                    result.recovery_errors += 1
                    out(f"soak: recover() raised {exc!r}")
                result.parent_recoveries += 1
            if result.kills % 50 == 0:
                out(f"soak: {result.kills} kills, {time.monotonic() - started:.0f}s, {inc} workers")
    finally:
        for child in [*waiting, next_recoverer]:
            if child is not None:
                child.dismiss()
    try:
        _recover_until_idle(coord, result, limit=120.0)
        _check(result, table, ctr, idlog, log_key)
        _read_errors(errlog, result)
    finally:
        for db in dbs.values():
            db.close()
        result.seconds = time.monotonic() - started
        if not result.violations and not result.problems and not keep:
            for url in cc.URLS.values():
                cc.drop_table(url, table)
                cc.drop_table(url, ctr)
                cc.purge_namespace(url, ns)
    for p in result.problems[:20]:
        out(f"soak: PROBLEM {p}")
    out(f"soak: {result.details()}")
    out(result.summary())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/soak", description="Randomized crash soak of the twophase coordinator."
    )
    parser.add_argument("--kills", type=int, default=None, help="stop after this many kills")
    parser.add_argument(
        "--minutes", type=float, default=None, help="stop after this long (default: 20)"
    )
    parser.add_argument("--seed", type=int, default=None, help="RNG seed (printed if random)")
    parser.add_argument("--log", choices=KEYS, default="orders", help="the log participant")
    parser.add_argument("--workdir", default=None, help="where ids.log and errors.log go")
    parser.add_argument("--keep", action="store_true", help="keep tables and log rows")
    args = parser.parse_args()
    minutes = args.minutes if args.kills is not None or args.minutes is not None else 20.0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="twophase-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # The library's and the pools' warnings (a connection lost while a server restarts...)
    # go to a file, not between the progress lines.
    logging.basicConfig(
        filename=workdir / "parent.log",
        level=logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # Through the package, so the forkserver's children find child_main by its module name.
    from procs import soak_worker

    result = soak_worker.run_soak(
        kills=args.kills,
        minutes=minutes,
        seed=args.seed,
        log_key=args.log,
        workdir=str(workdir),
        keep=args.keep,
    )
    sys.exit(1 if result.violations or result.problems else 0)


if __name__ == "__main__":
    main()
