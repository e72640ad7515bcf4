"""``twophase demo``: the seed page's examples, run step by step on a real database.

Four scenarios, each printed as a header and one line per step saying what happened and
what the database now says (the transaction's status and the rows it touches):

1. Orchestrated multi-step process: stage, verify external systems, commit.
2. Rollback on failure: stage, a worker raises, roll back.
3. Crash and recovery: two child processes stage an order each and are killed with
   SIGKILL before finishing; a recovery scan (``db.prepared()``, as the seed's "Recovery
   after Crash" section suggests) commits or rolls back each one from orchestration state.
4. Idempotent retry: committing twice returns normally; a later rollback is refused.

Every run gets a run id. Transaction names live in the namespace ``demo-<run id>`` (so the
names printed are the seed's own, and the recovery scan sees only this run), and rows carry
the run id (so runs never collide). The tables are created if missing and kept; this run's
rows are deleted at the end unless ``keep`` is set. Nothing is left prepared, even when a
step fails.

The crash scenario re-runs this module in a child process:
``python -m twophase.demo child NAMESPACE NAME RUN_ID ORDER_ID``, with the database URL in
``$TWOPHASE_URL`` (not on the command line, where ``ps`` would show a password).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table

from ._sync.connect import connect
from ._sync.database import Database, Transaction
from .errors import TransactionCommitted
from .protocol import Status
from .url import ENV_URL, url_from_env

#: The demo's tables; every row carries the run id, so runs can share them.
TABLES: dict[str, str] = {
    "demo_users": "run_id varchar(16) NOT NULL, id int NOT NULL, status varchar(32) NOT NULL, "
    "PRIMARY KEY (run_id, id)",
    "demo_jobs": "run_id varchar(16) NOT NULL, id int NOT NULL, PRIMARY KEY (run_id, id)",
    "demo_orders": "run_id varchar(16) NOT NULL, id int NOT NULL, status varchar(32) NOT NULL, "
    "PRIMARY KEY (run_id, id)",
    "demo_orchestration": "run_id varchar(16) NOT NULL, txn_name varchar(64) NOT NULL, "
    "decision varchar(16) NOT NULL, reason varchar(64) NOT NULL, PRIMARY KEY (run_id, txn_name)",
}

#: How long a child may take to start, connect and prepare before the demo gives up.
CHILD_TIMEOUT = 60.0

#: A prepared demo transaction older than this was left by an interrupted run (a run takes
#: seconds); the next run rolls it back, so killed demos do not pile up prepared transactions.
STALE_AFTER = timedelta(minutes=10)

#: The columns a step line shows per table (not the run id every row carries).
_SHOWN: dict[str, tuple[str, ...]] = {
    "demo_users": ("id", "status"),
    "demo_jobs": ("id",),
    "demo_orders": ("id", "status"),
}

#: Step lines wider than this are hard to read; wider terminals get a margin instead.
_MAX_WIDTH = 120

_DEMO_NAME = re.compile(r"demo-[0-9a-f]{6}:.+")

_STATUS_STYLE = {
    Status.PREPARED: "yellow",
    Status.COMMITTED: "green",
    Status.ROLLED_BACK: "red",
    Status.UNKNOWN: "dim",
}


class DemoFailed(Exception):
    """A demo step did not behave as the seed page says it should."""


class WorkerFailed(RuntimeError):
    """The failure of the stand-in worker in the rollback scenario."""


def provision_external_resources() -> str:
    """Stand-in for the seed's external systems check; it succeeds."""
    return "external resources ready"


def run_worker() -> None:
    """Stand-in for the seed's worker; it fails, which is the point of scenario 2."""
    raise WorkerFailed("worker crashed while processing job 1")


def run_demo(
    url: str | None = None,
    *,
    namespace: str | None = None,
    console: Console | None = None,
    keep: bool = False,
) -> None:
    """Run the scenarios on ``url`` (else $TWOPHASE_URL, else the embedded PostgreSQL).

    ``namespace`` prefixes the run's own namespace. Raises ``DemoFailed`` (or a
    ``TwoPhaseError``) if a step goes wrong; nothing is left prepared either way.
    """
    console = console or Console(highlight=False)
    started = time.monotonic()
    resolved = _resolve_url(url, console)
    run = secrets.token_hex(3)
    run_ns = f"{namespace}:demo-{run}" if namespace else f"demo-{run}"
    _tidy_stale_runs(resolved, namespace, console)
    with connect(resolved, namespace=run_ns, audit=True, principal="demo") as db:
        console.print(
            f"[bold]twophase demo[/] on {escape(db.display_url)}\n"
            f"run {run}; transaction names are in namespace {escape(run_ns)}"
        )
        demo = _Demo(db, console, run, resolved)
        demo.create_tables()
        try:
            demo.orchestrated()
            demo.rollback_on_failure()
            demo.crash_and_recovery()
            demo.idempotent_retry()
            demo.audit_trail()
        except BaseException:
            # Best effort, and never hide the error that stopped the demo.
            try:
                demo.cleanup(keep)
            except Exception as exc:
                console.print(f"[red]cleanup after the failure also failed: {escape(str(exc))}")
            raise
        leftover = demo.cleanup(keep)
    if leftover:
        raise DemoFailed(
            f"the scenarios left {', '.join(leftover)} prepared (now rolled back); "
            "every begin_distributed should have been finished"
        )
    rows = "kept (--keep)" if keep else "deleted"
    console.print(
        f"\n[bold]Done[/] in {time.monotonic() - started:.1f}s. Nothing left prepared by this "
        f"run; its rows in the demo_* tables were {rows}."
    )


def _resolve_url(url: str | None, console: Console) -> str:
    resolved = url_from_env(url)
    if resolved:
        return resolved
    # Imported here: only the embedded path needs it, and it is the heaviest module.
    from .embedded import DATA_DIR_ENV, DEFAULT_DATA_DIR, ensure_server

    data_dir = os.environ.get(DATA_DIR_ENV) or str(DEFAULT_DATA_DIR)
    console.print(f"Using the embedded PostgreSQL (data in {escape(data_dir)}; started if needed)")
    return ensure_server()


def _tidy_stale_runs(url: str, namespace: str | None, console: Console) -> None:
    """Roll back what interrupted demo runs left prepared (see ``STALE_AFTER``)."""
    with connect(url, namespace=namespace, pool_max=2) as db:
        stale = [
            p
            for p in db.prepared()
            if _DEMO_NAME.fullmatch(p.name) and p.age is not None and p.age > STALE_AFTER
        ]
        for p in stale:
            db.rollback_distributed(p.name)
    if stale:
        console.print(
            f"Rolled back {len(stale)} prepared transaction(s) left by interrupted demo runs: "
            + escape(", ".join(p.name for p in stale))
        )


class _Demo:
    """One demo run: the database, the console and the run id shared by the scenarios."""

    def __init__(self, db: Database, console: Console, run: str, url: str) -> None:
        self.db = db
        self.console = console
        self.run = run
        self.url = url
        self.children: list[subprocess.Popen[str]] = []

    # -- output and checks ----------------------------------------------------------------

    def header(self, number: int, title: str, what: str) -> None:
        width = min(self.console.width, _MAX_WIDTH)
        self.console.print()
        self.console.print(Rule(f"[bold]{number}. {title}", align="left"), width=width)
        self.console.print(f"[dim]{escape(what)}", width=width)
        self.step("", "what happened", "what the database now says", style="dim italic")

    def step(self, label: str, happened: str, says: str, *, style: str | None = None) -> None:
        """One step: a label, what happened, and what the database now says (rich markup)."""
        # One grid per line, so each step appears as it happens; equal-ratio columns keep
        # the lines of a scenario aligned and wrap long text inside its own column.
        line = Table.grid(padding=(0, 2))
        line.width = min(self.console.width, _MAX_WIDTH)
        line.add_column(width=8, no_wrap=True, style="bold cyan")
        line.add_column(ratio=1, overflow="fold")
        line.add_column(ratio=1, overflow="fold")
        line.add_row(label, escape(happened), says, style=style)
        self.console.print(line)

    def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        cols = _SHOWN[table]
        return self.db.select_from(table).select(*cols).where(run_id=self.run, **where).execute()

    def says(self, name: str, expected: Status, table: str, **where: Any) -> str:
        """What the database says about ``name`` and its rows; checks the status first."""
        status = self.db.status(name)
        if status is not expected:
            raise DemoFailed(f"{name!r} is {status}, but the seed's flow expects {expected}")
        found = self.rows(table, **where)
        if found:
            shown = "; ".join(" ".join(f"{k}={v}" for k, v in row.items()) for row in found)
        elif status is Status.PREPARED:
            shown = "not visible yet"
        else:
            shown = "none"
        style = _STATUS_STYLE[status]
        if found:
            return f"[{style}]{status}[/]; {table}: {escape(shown)}"
        key = " ".join(f"{k}={v}" for k, v in where.items())
        return f"[{style}]{status}[/]; {table} {escape(key)}: {escape(shown)}"

    def expect_rows(self, table: str, count: int, **where: Any) -> None:
        found = self.rows(table, **where)
        if len(found) != count:
            raise DemoFailed(f"expected {count} row(s) in {table} {where}, found {found}")

    # -- set-up and clean-up --------------------------------------------------------------

    def create_tables(self) -> None:
        for table, columns in TABLES.items():
            self.db.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")

    def cleanup(self, keep: bool) -> list[str]:
        """Kill children, roll back this run's prepared transactions (returning their names),
        and delete this run's rows unless ``keep``."""
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            _close_pipes(proc)
        leftover = [p.name for p in self.db.prepared()]
        for name in leftover:
            self.db.rollback_distributed(name)
        if not keep:
            for table in TABLES:
                self.db.delete_from(table).where(run_id=self.run).execute()
        return leftover

    # -- 1. orchestrated multi-step process -----------------------------------------------

    def orchestrated(self) -> None:
        self.header(
            1,
            "Orchestrated multi-step process",
            "Stage user 123 as pending, verify external systems, then commit.",
        )
        name = "provision_user_123"

        def stage(tx: Transaction) -> None:
            tx.insert_into("demo_users").values(run_id=self.run, id=123, status="pending").execute()

        self.db.begin_distributed(name, stage)
        self.step(
            "stage",
            f"begin_distributed({name!r}) staged user 123 as pending",
            self.says(name, Status.PREPARED, "demo_users", id=123),
        )
        outcome = provision_external_resources()
        self.step(
            "verify",
            f"provision_external_resources(): {outcome}",
            self.says(name, Status.PREPARED, "demo_users", id=123),
        )
        self.db.commit_distributed(name)
        self.step(
            "commit",
            f"commit_distributed({name!r})",
            self.says(name, Status.COMMITTED, "demo_users", id=123),
        )
        self.expect_rows("demo_users", 1, id=123)

    # -- 2. rollback on failure -----------------------------------------------------------

    def rollback_on_failure(self) -> None:
        self.header(
            2,
            "Rollback on failure",
            "Stage job 1, run a worker that fails, roll back: the job never appears.",
        )
        name = "batch_txn"

        def stage(tx: Transaction) -> None:
            tx.insert_into("demo_jobs").values(run_id=self.run, id=1).execute()

        # The seed catches every exception; the demo catches only the worker's, so that a
        # real database error stops the demo loudly instead of looking like the scenario.
        try:
            self.db.begin_distributed(name, stage)
            self.step(
                "stage",
                f"begin_distributed({name!r}) staged job 1",
                self.says(name, Status.PREPARED, "demo_jobs", id=1),
            )
            run_worker()
            self.db.commit_distributed(name)
        except WorkerFailed as exc:
            self.step(
                "worker",
                f"run_worker() raised {type(exc).__name__}: {exc}",
                self.says(name, Status.PREPARED, "demo_jobs", id=1),
            )
            self.db.rollback_distributed(name)
            self.step(
                "rollback",
                f"rollback_distributed({name!r})",
                self.says(name, Status.ROLLED_BACK, "demo_jobs", id=1),
            )
        else:
            raise DemoFailed("the stand-in worker was supposed to fail")
        self.expect_rows("demo_jobs", 0, id=1)

    # -- 3. crash and recovery ------------------------------------------------------------

    def crash_and_recovery(self) -> None:
        self.header(
            3,
            "Crash and recovery",
            "Two worker processes stage an order each and are killed before they finish; "
            "recovery scans what is prepared and decides from orchestration state.",
        )
        # name -> (order id, the orchestrator's decision, why)
        orders = {
            "order_1": (1, "commit", "payment captured"),
            "order_2": (2, "rollback", "payment declined"),
        }
        # Start both children before waiting on either: each spends most of its time
        # importing and connecting, which can overlap.
        started = {name: self.spawn_child(name, oid) for name, (oid, _, _) in orders.items()}
        for name, proc in started.items():
            self.wait_prepared(name, proc)
            self.step(
                "stage",
                f"worker process {proc.pid}: begin_distributed({name!r}) placed "
                f"order {orders[name][0]}",
                self.says(name, Status.PREPARED, "demo_orders", id=orders[name][0]),
            )
        # The orchestration state the seed's FAQ refers to: written by the coordinator (this
        # process) as the external answers arrive, before anyone commits.
        for name, (_, decision, reason) in orders.items():
            self.db.insert_into("demo_orchestration").values(
                run_id=self.run, txn_name=name, decision=decision, reason=reason
            ).execute()
        recorded = self.db.select_from("demo_orchestration").where(run_id=self.run).execute()
        self.step(
            "decide",
            "orchestrator recorded: "
            + ", ".join(f"{n} {d} ({r})" for n, (_, d, r) in orders.items()),
            f"demo_orchestration: {len(recorded)} decisions",
        )
        for name, proc in started.items():
            proc.kill()  # SIGKILL on POSIX: no clean-up code runs in the child
            proc.wait()
            _close_pipes(proc)
            self.step(
                "crash",
                f"SIGKILL to worker {proc.pid} before it committed {name!r}",
                self.says(name, Status.PREPARED, "demo_orders", id=orders[name][0]),
            )

        # "Recovery after Crash": on boot, scan pending distributed transactions and
        # decide commit/rollback from the orchestration state.
        pending = self.db.prepared()
        found = ", ".join(f"{p.name} ({_short(p.age)} old)" for p in pending)
        self.step(
            "scan",
            f"db.prepared() lists {found or 'nothing'}",
            f"{len(pending)} prepared in namespace {escape(self.db.namespace or '')}",
        )
        if sorted(p.name for p in pending) != sorted(orders):
            raise DemoFailed(f"the scan found {[p.name for p in pending]}, expected {list(orders)}")
        decisions = {
            row["txn_name"]: row
            for row in self.db.select_from("demo_orchestration").where(run_id=self.run).execute()
        }
        for p in pending:
            row = decisions.get(p.name)
            oid = orders[p.name][0]
            if row is not None and row["decision"] == "commit":
                self.db.commit_distributed(p.name)
                expected, how = Status.COMMITTED, "orchestration says commit"
                call = "commit_distributed"
            else:
                # Presumed abort: without a recorded commit decision, roll back.
                self.db.rollback_distributed(p.name)
                why = "orchestration says rollback" if row else "no decision recorded"
                expected, how, call = Status.ROLLED_BACK, why, "rollback_distributed"
            self.step(
                "recover",
                f"{p.name}: {how}, so {call}({p.name!r})",
                self.says(p.name, expected, "demo_orders", id=oid),
            )
        final = self.rows("demo_orders")
        shown = "; ".join(f"id={r['id']} status={r['status']}" for r in final) or "no rows"
        self.step("result", "all orders after recovery", f"demo_orders: {escape(shown)}")
        self.expect_rows("demo_orders", 1, id=1)
        self.expect_rows("demo_orders", 0, id=2)

    def spawn_child(self, name: str, order_id: int) -> subprocess.Popen[str]:
        """Start a worker process that stages ``order_id`` under ``name`` and then waits."""
        env = dict(os.environ)
        env[ENV_URL] = self.url
        # Make the child import this very twophase, even when it is not installed.
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        namespace = self.db.namespace or ""
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "twophase.demo",
                "child",
                namespace,
                name,
                self.run,
                str(order_id),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.children.append(proc)
        return proc

    def wait_prepared(self, name: str, proc: subprocess.Popen[str]) -> None:
        """Wait for the child's "prepared" line; a child that fails is a DemoFailed."""
        line = _readline(proc, CHILD_TIMEOUT)
        if line.strip() == f"prepared {name}":
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
        tail = "\n".join(err.strip().splitlines()[-5:])
        raise DemoFailed(
            f"worker process for {name!r} did not prepare (exit code {proc.returncode}, "
            f"output {line!r}): {tail or 'no error output'}"
        )

    # -- 4. idempotent retry ----------------------------------------------------------------

    def idempotent_retry(self) -> None:
        self.header(
            4,
            "Idempotent retry",
            "Commit twice: the retry returns normally and the status stays committed.",
        )
        name = "user_124"

        def stage(tx: Transaction) -> None:
            # insert_or_ignore, as the seed's idempotency advice suggests.
            tx.insert_or_ignore("demo_users").values(
                run_id=self.run, id=124, status="provisioning"
            ).execute()

        self.db.begin_distributed(name, stage)
        self.step(
            "stage",
            f"begin_distributed({name!r}) staged user 124 as provisioning",
            self.says(name, Status.PREPARED, "demo_users", id=124),
        )
        self.db.commit_distributed(name)
        self.step(
            "commit",
            f"commit_distributed({name!r})",
            self.says(name, Status.COMMITTED, "demo_users", id=124),
        )
        self.db.commit_distributed(name)
        self.step(
            "retry",
            f"commit_distributed({name!r}) again: returned normally",
            self.says(name, Status.COMMITTED, "demo_users", id=124),
        )
        try:
            self.db.rollback_distributed(name)
        except TransactionCommitted:
            self.step(
                "refuse",
                f"rollback_distributed({name!r}) raised TransactionCommitted",
                self.says(name, Status.COMMITTED, "demo_users", id=124),
            )
        else:
            raise DemoFailed(f"rolling back the committed {name!r} should have been refused")
        self.expect_rows("demo_users", 1, id=124)

    # -- 5. the audit trail -------------------------------------------------------------

    def audit_trail(self) -> None:
        self.header(
            5,
            "Audit trail",
            "Every step above was recorded with who, when, how long and a correlation id: "
            "here is user 124's history (db.history, or `twophase history user_124`).",
        )
        events = self.db.history("user_124")
        if [e["step"] for e in events] != ["begin", "prepare", "commit", "commit", "rollback"]:
            raise DemoFailed(f"unexpected audit trail for user_124: {events}")
        for e in events:
            took = f"{e['duration_ms']:.1f} ms"
            detail = f"; {e['detail']}" if e["detail"] else ""
            self.step(
                e["step"],
                f"{e['outcome']} in {took}, by {e['principal']}{detail}",
                f"correlation id {escape(e['correlation_id'])}",
            )


def _short(age: timedelta | None) -> str:
    return "?" if age is None else f"{age.total_seconds():.1f}s"


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the child's stdout, or "" on EOF or timeout (portable: no select())."""
    assert proc.stdout is not None
    stdout = proc.stdout
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0] if got else ""


def _close_pipes(proc: subprocess.Popen[str]) -> None:
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


# -- the child process ---------------------------------------------------------------------


def _child(namespace: str, name: str, run: str, order_id: int) -> int:
    """Stage one order under ``name``, say so, then wait to be killed (scenario 3)."""
    db = connect(namespace=namespace or None)  # the URL comes from $TWOPHASE_URL

    def stage(tx: Transaction) -> None:
        tx.insert_into("demo_orders").values(run_id=run, id=order_id, status="placed").execute()

    db.begin_distributed(name, stage)
    print(f"prepared {name}", flush=True)
    # Stand-in for "charge the card": block until the parent kills us. If the parent itself
    # dies, stdin reaches EOF and we exit, leaving the transaction prepared as a crash would.
    sys.stdin.read()
    return 0


def _main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "child":
        return _child(argv[1], argv[2], argv[3], int(argv[4]))
    print("usage: twophase demo [--url URL]   (this module is the demo's worker process)")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
