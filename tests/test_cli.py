"""The `twophase` command, run as a real subprocess against the real PostgreSQL and MariaDB.

Prepared transactions for the command to act on are made with the library in the test;
what the command did is checked back through the library.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import MY_URL, PG_URL

import twophase
from twophase import demo
from twophase.cli import cli, format_age, format_sla, parse_duration

# The console script next to this interpreter (what users type); else `python -m twophase`.
_SCRIPT = Path(sys.executable).with_name("twophase")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "twophase"]

# Environment that changes the command's behaviour; each test sets what it wants.
_SCRUB = ("TWOPHASE_URL", "NO_COLOR", "FORCE_COLOR", "COLUMNS", "TERM")

# SGR parameters that set a colour (foreground or background, 8/16/256/true colour).
_COLOUR = re.compile(r"\x1b\[([0-9;]*)m")


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `twophase ARGS...` and return the finished process (never raises on exit code)."""
    full_env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    full_env.update(env or {})
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def has_colour(text: str) -> bool:
    for params in _COLOUR.findall(text):
        for p in params.split(";"):
            if p and (30 <= int(p) <= 49 or 90 <= int(p) <= 107):
                return True
    return False


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 1, message on stderr, nothing on stdout, and no traceback."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture
def namespace() -> str:
    """A namespace of its own, so listings show only this test's transactions."""
    return f"cli{uuid.uuid4().hex[:10]}"


@pytest.fixture
def nsdb(url: str, namespace: str, table: str) -> Iterator[twophase.Database]:
    """A Database in the test's namespace; rolls back whatever the test left prepared.

    It depends on ``table`` so that it is torn down first: what it leaves prepared holds
    locks on the table, which would make the table's DROP wait.
    """
    database = twophase.connect(url, namespace=namespace, pool_max=4)
    yield database
    for p in database.prepared():
        database.rollback_distributed(p.name)
    database.close()


@pytest.fixture
def stage(table: str, nsdb: twophase.Database) -> Callable[[str, int], None]:
    """stage(name, id): prepare an insert of row ``id`` under ``name`` in the namespace."""

    def _stage(name: str, row_id: int) -> None:
        nsdb.begin_distributed(
            name,
            lambda tx: tx.insert_into(table).values(id=row_id, status="staged").execute(),
        )

    return _stage


# -- status NAME, commit, rollback ---------------------------------------------------------


def test_status_commit_rollback_each_state(
    url: str, namespace: str, nsdb: twophase.Database, stage: Callable[[str, int], None]
) -> None:
    stage("a", 1)
    stage("b", 2)
    base = ["--url", url, "--namespace", namespace]

    proc = run_cli("status", *base, "a")
    assert (proc.returncode, proc.stdout.strip()) == (0, "a: prepared")
    proc = run_cli("status", *base, "a", "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"name": "a", "status": "prepared"}

    proc = run_cli("commit", *base, "a")
    assert (proc.returncode, proc.stdout.strip()) == (0, "a: committed")
    assert nsdb.status("a") is twophase.Status.COMMITTED
    # Retry-safe: a second commit succeeds too.
    proc = run_cli("commit", *base, "a", "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"name": "a", "status": "committed"}

    proc = run_cli("rollback", *base, "b")
    assert (proc.returncode, proc.stdout.strip()) == (0, "b: rolled_back")
    assert nsdb.status("b") is twophase.Status.ROLLED_BACK
    assert run_cli("rollback", *base, "b").returncode == 0

    for name, expected in (("a", "committed"), ("b", "rolled_back"), ("never", "unknown")):
        proc = run_cli("status", *base, name, "--json")
        assert proc.returncode == 0, proc.stderr  # status NAME exits 0 for every status
        assert json.loads(proc.stdout) == {"name": name, "status": expected}
    proc = run_cli("status", *base, "never")
    assert (proc.returncode, proc.stdout.strip()) == (0, "never: unknown")


def test_finishing_the_other_way_is_refused(
    url: str, namespace: str, nsdb: twophase.Database, stage: Callable[[str, int], None]
) -> None:
    stage("c", 1)
    stage("r", 2)
    nsdb.commit_distributed("c")
    nsdb.rollback_distributed("r")
    base = ["--url", url, "--namespace", namespace]
    assert_clean_error(run_cli("rollback", *base, "c"), "TransactionCommitted", "compensating")
    assert_clean_error(run_cli("commit", *base, "r"), "TransactionRolledBack", "new name")
    assert nsdb.status("c") is twophase.Status.COMMITTED
    assert nsdb.status("r") is twophase.Status.ROLLED_BACK


@pytest.mark.parametrize("command", ["commit", "rollback"])
def test_unknown_name_exits_1(url: str, txname: str, command: str) -> None:
    proc = run_cli(command, "--url", url, txname)
    assert_clean_error(proc, "UnknownTransaction", f"no distributed transaction {txname!r}")


@pytest.mark.parametrize("command", ["commit", "rollback", "status"])
def test_invalid_name_exits_1(command: str) -> None:
    proc = run_cli(command, "--url", PG_URL, "bad name!")
    assert_clean_error(proc, "InvalidTransactionName", "contains ' '", "A-Z a-z 0-9 _ - . :")


# -- listing -------------------------------------------------------------------------------


def test_listing_table_and_json(
    url: str, namespace: str, nsdb: twophase.Database, stage: Callable[[str, int], None]
) -> None:
    stage("first", 1)
    stage("second", 2)
    base = ["--url", url, "--namespace", namespace]

    proc = run_cli("status", *base)
    assert proc.returncode == 0, proc.stderr
    assert "first" in proc.stdout and "second" in proc.stdout
    assert "2 prepared; none older than the 1m SLA" in proc.stdout
    assert "\x1b[" not in proc.stdout  # not a terminal: no styling at all

    proc = run_cli("prepared", *base, "--json", "--sla", "1h")
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert [item["name"] for item in listing] == ["first", "second"]  # oldest first
    for item in listing:
        assert item["full_name"] == f"{namespace}:{item['name']}"
        assert item["database"] == nsdb.database
        prepared_at = datetime.fromisoformat(item["prepared_at"])
        assert prepared_at.utcoffset() == timedelta(0)
        assert 0 <= item["age_seconds"] < 600
        assert item["over_sla"] is False

    # Past the SLA: flagged in JSON, highlighted (and marked, for no-colour) in the table.
    proc = run_cli("status", *base, "--json", "--sla", "0s")
    assert all(item["over_sla"] for item in json.loads(proc.stdout))
    proc = run_cli("status", *base, "--sla", "0s")
    assert proc.stdout.count("> SLA") == 2
    assert "2 prepared; 2 older than the 0s SLA" in proc.stdout


def test_listing_empty(namespace: str) -> None:
    proc = run_cli("status", "--url", PG_URL, "--namespace", namespace, "--json")
    assert (proc.returncode, json.loads(proc.stdout)) == (0, [])
    proc = run_cli("prepared", "--url", PG_URL, "--namespace", namespace)
    assert proc.returncode == 0
    assert "No prepared transactions" in proc.stdout


@pytest.mark.parametrize("dialect_name", ["postgresql"])  # styling is database-independent
def test_colour_only_when_allowed(namespace: str, stage: Callable[[str, int], None]) -> None:
    stage("late", 1)
    args = ["status", "--url", PG_URL, "--namespace", namespace, "--sla", "0s"]
    assert not has_colour(run_cli(*args).stdout)  # a pipe
    assert has_colour(run_cli(*args, env={"FORCE_COLOR": "1"}).stdout)
    no_colour = run_cli(*args, env={"FORCE_COLOR": "1", "NO_COLOR": "1"}).stdout
    assert not has_colour(no_colour)
    assert "> SLA" in no_colour  # the highlight survives without colour


# -- global options, environment, exit codes -----------------------------------------------


def test_url_from_environment_and_before_command(url: str, txname: str) -> None:
    proc = run_cli("status", txname, "--json", env={"TWOPHASE_URL": url})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "unknown"
    proc = run_cli("--url", url, "status", txname, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "unknown"


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--bogus"],
        ["commit"],  # NAME missing
        ["status", "--sla", "soon"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    proc = run_cli(*args, "--url", PG_URL)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Usage:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_database_exits_1() -> None:
    proc = run_cli("status", "--url", "postgresql://postgres@127.0.0.1:1/test")
    assert_clean_error(proc, "DatabaseError", "could not connect")


def test_unsupported_url_exits_1() -> None:
    assert_clean_error(run_cli("status", "--url", "sqlite:///x.db"), "NotSupported", "SQLite")


def test_help_documents_exit_codes() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "Exit codes:" in proc.stdout
    for line in ("0  success", "1  a twophase error", "2  usage error"):
        assert line in proc.stdout
    for command in ("status", "commit", "rollback", "prepared", "demo"):
        assert command in proc.stdout


def test_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "twophase", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert twophase.__version__ in proc.stdout


# -- demo ----------------------------------------------------------------------------------


def test_demo(url: str) -> None:
    proc = run_cli("demo", "--url", url, timeout=180)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    out = proc.stdout
    for header in (
        "1. Orchestrated multi-step process",
        "2. Rollback on failure",
        "3. Crash and recovery",
        "4. Idempotent retry",
        "5. Audit trail",
    ):
        assert header in out
    assert "SIGKILL" in out
    assert "Nothing left prepared" in out.splitlines()[-2] + out.splitlines()[-1]
    match = re.search(r"namespace (demo-([0-9a-f]{6}))", out)
    assert match, out
    run_ns, run_id = match.groups()

    # What it printed is what the database holds: check through the library.
    with twophase.connect(url, namespace=run_ns) as db:
        assert db.prepared() == []
        expected = {
            "provision_user_123": twophase.Status.COMMITTED,
            "batch_txn": twophase.Status.ROLLED_BACK,
            "order_1": twophase.Status.COMMITTED,  # recovery: orchestration said commit
            "order_2": twophase.Status.ROLLED_BACK,  # recovery: orchestration said rollback
            "user_124": twophase.Status.COMMITTED,
        }
        for name, status in expected.items():
            assert db.status(name) is status, name
        # The audit trail it printed is in the database, with the demo's principal.
        trail = db.history("user_124")
        assert [(e["step"], e["outcome"]) for e in trail] == [
            ("begin", "ok"),
            ("prepare", "prepared"),
            ("commit", "committed"),
            ("commit", "already"),
            ("rollback", "failed"),
        ]
        assert {e["principal"] for e in trail} == {"demo"}
        for table in ("demo_users", "demo_jobs", "demo_orders", "demo_orchestration"):
            assert db.select_from(table).where(run_id=run_id).execute() == []  # cleaned up
    with twophase.connect(url) as db:
        assert not [p for p in db.prepared() if p.full_name.startswith(run_ns)]


def test_demo_reports_a_worker_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # In process, to break the crash scenario's worker: exit 1 with the reason, nothing
    # left prepared.
    def broken_worker(self: demo._Demo, name: str, order_id: int) -> subprocess.Popen[str]:
        code = "import sys; sys.stderr.write('boom: no database\\n'); sys.exit(3)"
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.children.append(proc)
        return proc

    monkeypatch.setattr(demo._Demo, "spawn_child", broken_worker)
    result = CliRunner().invoke(cli, ["demo", "--url", PG_URL])
    assert result.exit_code == 1, result.output
    assert "DemoFailed" in result.output
    assert "did not prepare (exit code 3" in result.output
    assert "boom: no database" in result.output
    match = re.search(r"namespace (demo-[0-9a-f]{6})", result.output)
    assert match, result.output
    with twophase.connect(PG_URL, namespace=match.group(1)) as db:
        assert db.prepared() == []


# -- pure helpers (no subprocess) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        ("90", 90),
        ("250ms", 0.25),
        ("1.5h", 5400),
        ("2d", 172800),
        (" 10S ", 10),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "s", "5x", "-5s", "1h 30m", "m5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_formatting() -> None:
    assert format_sla(timedelta(seconds=60)) == "1m"
    assert format_sla(timedelta(seconds=90)) == "90s"
    assert format_sla(timedelta(hours=2)) == "2h"
    assert format_sla(timedelta(seconds=0.5)) == "0.5s"
    assert format_age(None) == "-"
    assert format_age(timedelta(seconds=4.7)) == "4s"
    assert format_age(timedelta(seconds=125)) == "2m 05s"
    assert format_age(timedelta(hours=1, minutes=2)) == "1h 02m"
    assert format_age(timedelta(days=3, hours=4)) == "3d 04h"


# -- reap ----------------------------------------------------------------------------------


def test_reap(
    url: str, namespace: str, nsdb: twophase.Database, stage: Callable[[str, int], None]
) -> None:
    stage("a", 1)
    stage("b", 2)
    reap = ["reap", "--namespace", namespace]
    env = {"TWOPHASE_URL": url}

    # Nothing is an hour old: both are left alone.
    proc = run_cli(*reap, "--older-than", "1h", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["dry_run"], report["older_than_seconds"]) == (False, 3600.0)
    assert (report["reaped"], report["skipped"], report["failed"]) == ([], [], [])
    assert report["younger"] == 2
    proc = run_cli(*reap, "--older-than", "1h", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "rolled back 0 older than 1h; skipped 0; failed 0; 2 younger left alone" in proc.stdout

    # A dry run lists what it would roll back, and changes nothing.
    proc = run_cli(*reap, "--older-than", "0s", "--dry-run", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["dry_run"] is True
    assert [p["name"] for p in plan["reaped"]] == ["a", "b"]  # oldest first
    for item in plan["reaped"]:
        assert item["full_name"] == f"{namespace}:{item['name']}"
        assert item["database"] == nsdb.database and item["branch"] is None
        assert item["age_seconds"] >= 0
        assert datetime.fromisoformat(item["prepared_at"]).utcoffset() == timedelta(0)
    proc = run_cli(*reap, "--older-than", "0s", "--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Dry run: nothing changed." in proc.stdout
    assert "would roll back 2 older than 0s" in proc.stdout
    assert nsdb.status("a") is nsdb.status("b") is twophase.Status.PREPARED

    proc = run_cli(*reap, "--older-than", "0s", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)
    assert [p["name"] for p in done["reaped"]] == ["a", "b"]
    assert done["failed"] == [] and done["dry_run"] is False
    assert nsdb.status("a") is nsdb.status("b") is twophase.Status.ROLLED_BACK
    assert nsdb.prepared() == []

    proc = run_cli(*reap, "--older-than", "0s", env=env)  # nothing left
    assert proc.returncode == 0, proc.stderr
    assert "rolled back 0 older than 0s" in proc.stdout


def test_reap_usage() -> None:
    for args in (["reap"], ["reap", "--older-than", "soon"]):
        proc = run_cli(*args, "--url", PG_URL)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "Usage:" in proc.stderr


# -- prune-history -------------------------------------------------------------------------


@pytest.mark.parametrize("db_url", [PG_URL, MY_URL], ids=["postgresql", "mysql"])
def test_prune_history(db_url: str) -> None:
    import time

    from procs.outbox_env import isolated_database

    from twophase.observe import AuditLog, Event, Outcome, Step

    dialect = "postgresql" if db_url == PG_URL else "mysql"
    with isolated_database(dialect) as scratch:
        audit = AuditLog(scratch, synchronous=True)
        for i, days in enumerate([100, 91, 1]):
            started = time.time() - days * 86400
            audit(Event(Step.COMMIT, f"n{i}", Outcome.COMMITTED, started, 0.0, "c"))
        audit.close()
        env = {"TWOPHASE_URL": scratch}
        proc = run_cli("prune-history", "--older-than", "90d", "--dry-run", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {
            "dry_run": True,
            "older_than_seconds": 90 * 86400.0,
            "would_delete": 2,
        }
        proc = run_cli("prune-history", "--older-than", "90d", "--batch", "1", env=env)
        assert proc.returncode == 0, proc.stderr
        assert "deleted 2 audit events older than 90d" in proc.stdout
        proc = run_cli("prune-history", "--older-than", "90d", "--json", env=env)
        assert json.loads(proc.stdout)["deleted"] == 0
        # The CLI audits by default: its own prunes are in the trail, and n2 is left.
        with twophase.connect(scratch) as db:
            assert [e["name"] for e in db.history("n2")] == ["n2"]
            prunes = [(e["step"], e["outcome"], e["detail"]) for e in db.history("*")]
        assert [(s, o) for s, o, _ in prunes] == [("prune", "ok"), ("prune", "ok")]
        assert prunes[0][2].startswith("2 audit events older than")
        proc = run_cli("history", "*", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        shown = json.loads(proc.stdout)
        assert shown["scope"] == "database-wide operator actions"
        assert [e["step"] for e in shown["events"]] == ["prune", "prune"]
        proc = run_cli("history", "*", env=env)
        assert proc.returncode == 0 and "*: scope database-wide operator actions" in proc.stdout
        proc = run_cli("history", "*", "--participant", f"a={scratch}", env=env)
        assert proc.returncode == 2 and "'*' goes with --url only" in proc.stderr
    for bad in (["--older-than", "soon"], ["--older-than", "0s"], []):
        proc = run_cli("prune-history", *bad, "--url", db_url)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert "Usage:" in proc.stderr and "Traceback" not in proc.stderr


# -- prune-outcomes ------------------------------------------------------------------------


@pytest.mark.parametrize("db_url", [PG_URL, MY_URL], ids=["postgresql", "mysql"])
def test_prune_outcomes(db_url: str) -> None:
    import time

    from procs.outbox_env import isolated_database

    dialect = "postgresql" if db_url == PG_URL else "mysql"
    with isolated_database(dialect) as scratch:
        with twophase.connect(scratch) as db:
            for name in ("old-1", "old-2"):
                db.begin_distributed(name, lambda tx: tx.execute("SELECT 1"))
                db.commit_distributed(name)
            db.begin_distributed("open", lambda tx: tx.execute("SELECT 1"))
        time.sleep(0.3)
        env = {"TWOPHASE_URL": scratch}
        try:
            proc = run_cli(
                "prune-outcomes", "--older-than", "100ms", "--dry-run", "--json", env=env
            )
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout) == {
                "dry_run": True,
                "older_than_seconds": 0.1,
                "would_delete": 2,
            }
            proc = run_cli("prune-outcomes", "--older-than", "100ms", "--batch", "1", env=env)
            assert proc.returncode == 0, proc.stderr
            assert "deleted 2 outcome records older than" in proc.stdout
            proc = run_cli("prune-outcomes", "--older-than", "100ms", "--json", env=env)
            assert json.loads(proc.stdout)["deleted"] == 0
            proc = run_cli("status", "old-1", "--json", env=env)
            assert json.loads(proc.stdout)["status"] == "unknown"
            proc = run_cli("commit", "old-1", env=env)
            assert proc.returncode == 1 and "UnknownTransaction" in proc.stderr
            proc = run_cli("commit", "open", env=env)  # its record was never touched
            assert proc.returncode == 0, proc.stderr
            proc = run_cli("history", "*", "--json", env=env)
            details = [e["detail"] for e in json.loads(proc.stdout)["events"]]
            assert details[0].startswith("2 outcome records older than")
        finally:
            with twophase.connect(scratch) as db:
                if db.status("open") is twophase.Status.PREPARED:
                    db.rollback_distributed("open")
    for bad in (["--older-than", "soon"], ["--older-than", "0s"], []):
        proc = run_cli("prune-outcomes", *bad, "--url", db_url)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert "Usage:" in proc.stderr and "Traceback" not in proc.stderr


# -- global transactions: status, reap, recover, history -----------------------------------

# A coordinator that dies once its commit decision is durable: its branches stay prepared.
_CRASHING_COORDINATOR = """
import sys, twophase
ns, pg, my = sys.argv[1:4]
dbs = {"pg": twophase.connect(pg), "maria": twophase.connect(my)}
coord = twophase.Coordinator(dbs, log="pg", namespace=ns)
with coord.transaction("order", timeout=600) as g:
    for key in ("pg", "pg", "maria"):  # the first pg branch carries the decision
        g.enlist(key, lambda tx: tx.execute("SELECT 1"))
sys.exit(3)  # the crash point was not reached
"""


@pytest.fixture
def crashed_order(namespace: str) -> Iterator[dict[str, str]]:
    """The global transaction ``order`` of the namespace, decided commit, its two branches
    (one on PostgreSQL, one on MariaDB) left prepared by a coordinator killed with SIGKILL."""
    urls = {"pg": PG_URL, "maria": MY_URL}
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHING_COORDINATOR, namespace, PG_URL, MY_URL],
        env={**os.environ, "TWOPHASE_CRASH_AT": "after_decision"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    yield urls
    # Whatever the test left: finish it by the decision (commit), in this namespace only.
    dbs = {key: twophase.connect(u) for key, u in urls.items()}
    try:
        twophase.Coordinator(dbs, log="pg", namespace=namespace).recover()
    finally:
        for db in dbs.values():
            db.close()


def _branches(url: str, namespace: str) -> list[twophase.PreparedTransaction]:
    with twophase.connect(url, namespace=namespace) as db:
        return [p for p in db.prepared() if p.branch is not None]


def test_global_transaction_commands(namespace: str, crashed_order: dict[str, str]) -> None:
    (pg_branch,) = _branches(PG_URL, namespace)
    (my_branch,) = _branches(MY_URL, namespace)
    assert pg_branch.name == my_branch.name == "order"

    # status lists the branches, with their qualifier.
    proc = run_cli("status", "--url", PG_URL, "--namespace", namespace, "--json")
    assert proc.returncode == 0, proc.stderr
    (item,) = json.loads(proc.stdout)
    assert (item["name"], item["branch"]) == ("order", pg_branch.branch)
    proc = run_cli("status", "--url", MY_URL, "--namespace", namespace)
    assert proc.returncode == 0, proc.stderr
    assert "Branch" in proc.stdout and "twophase recover" in proc.stdout

    # reap never touches a branch: only the decision log may say how it ends.
    proc = run_cli(
        "reap", "--url", PG_URL, "--namespace", namespace, "--older-than", "0s", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["reaped"] == [] and report["failed"] == []
    (skipped,) = report["skipped"]
    assert (skipped["name"], skipped["branch"]) == ("order", pg_branch.branch)
    assert "twophase recover" in skipped["reason"]
    proc = run_cli("reap", "--url", MY_URL, "--namespace", namespace, "--older-than", "0s")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1" in proc.stdout and "twophase recover" in proc.stdout
    assert len(_branches(PG_URL, namespace)) == len(_branches(MY_URL, namespace)) == 1

    coordinator = [
        "--namespace", namespace, "--participant", f"pg={PG_URL}",
        "--participant", f"maria={MY_URL}", "--log", "pg",
    ]  # fmt: skip
    proc = run_cli("recover", *coordinator, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert (plan["dry_run"], plan["committed"]) == (True, 2)
    assert len(_branches(PG_URL, namespace)) == 1

    proc = run_cli("recover", *coordinator, "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # not a terminal: no progress display
    done = json.loads(proc.stdout)
    assert (done["dry_run"], done["committed"], done["in_doubt"], done["errors"]) == (
        False, 2, 0, [],
    )  # fmt: skip
    assert {(a["gtrid"], a["participant"], a["action"]) for a in done["actions"]} == {
        (f"{namespace}:order", "pg", "commit"),
        (f"{namespace}:order", "maria", "commit"),
    }
    assert _branches(PG_URL, namespace) == [] and _branches(MY_URL, namespace) == []

    proc = run_cli("recover", *coordinator)  # nothing left: a plain summary
    assert proc.returncode == 0, proc.stderr
    assert "committed 0, rolled back 0" in proc.stdout

    proc = run_cli("history", *coordinator, "order", "--json")
    assert proc.returncode == 0, proc.stderr
    history = json.loads(proc.stdout)
    assert (history["name"], history["decision"]) == ("order", "committed")
    assert isinstance(history["events"], list)
    proc = run_cli("history", *coordinator, "order")
    assert proc.returncode == 0, proc.stderr
    assert "order: decision committed" in proc.stdout


def test_recover_shows_progress_on_a_terminal(
    namespace: str, crashed_order: dict[str, str]
) -> None:
    """stderr a terminal, stdout a pipe: the live progress goes to the terminal only."""
    leader, follower = pty.openpty()
    args = [
        "recover", "--namespace", namespace, "--participant", f"pg={PG_URL}",
        "--participant", f"maria={MY_URL}", "--log", "pg", "--json",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["TERM"] = "xterm"
    proc = subprocess.Popen(
        [*COMMAND, *args], stdout=subprocess.PIPE, stderr=follower, env=env, text=True
    )
    os.close(follower)
    chunks: list[bytes] = []

    def drain() -> None:
        with contextlib.suppress(OSError):  # EIO once the command has exited
            while chunk := os.read(leader, 4096):
                chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=120)
    reader.join(timeout=30)
    os.close(leader)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal
    assert json.loads(out)["committed"] == 2  # stdout: the JSON document alone
    assert "recovering" in terminal


# -- metrics -------------------------------------------------------------------------------


def test_metrics_once(
    url: str, namespace: str, nsdb: twophase.Database, stage: Callable[[str, int], None]
) -> None:
    stage("m1", 1)
    env = {"TWOPHASE_URL": url}
    proc = run_cli("metrics", "--once", "--namespace", namespace, "--label", "cli", env=env)
    assert proc.returncode == 0, proc.stderr
    assert 'twophase_prepared_transactions{participant="cli"} 1.0' in proc.stdout
    assert 'twophase_prepared_stuck_transactions{participant="cli"} 0.0' in proc.stdout
    assert 'twophase_participant_up{participant="cli"} 1.0' in proc.stdout

    proc = run_cli("metrics", "--once", "--json", "--sla", "0s", "--namespace", namespace, env=env)
    assert proc.returncode == 0, proc.stderr
    (doc,) = json.loads(proc.stdout)
    assert (doc["participant"], doc["prepared"], doc["stuck"]) == (nsdb.database, 1, 1)


def test_help_lists_every_command() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("reap", "metrics", "recover", "history", "relay", "prune-keys"):
        assert command in proc.stdout
    assert "`reap` when a rollback failed" in proc.stdout
    for command in ("reap", "metrics", "recover", "status"):
        proc = run_cli(command, "--help")
        assert proc.returncode == 0 and "--json" in proc.stdout, command


def test_history_of_a_plain_transaction(url: str, namespace: str) -> None:
    with twophase.connect(url, namespace=namespace, audit=True, principal="cli-test") as db:
        with twophase.context(correlation_id="hist-1"):
            db.begin_distributed("h", lambda tx: tx.execute("SELECT 1"))
        db.rollback_distributed("h")
    env = {"TWOPHASE_URL": url}
    proc = run_cli("history", "h", "--namespace", namespace, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    history = json.loads(proc.stdout)
    assert history["status"] == "rolled_back"
    steps = [(e["step"], e["outcome"], e["principal"]) for e in history["events"]]
    assert steps == [
        ("begin", "ok", "cli-test"),
        ("prepare", "prepared", "cli-test"),
        ("rollback", "rolled_back", "cli-test"),
    ]
    assert history["events"][0]["correlation_id"] == "hist-1"
    proc = run_cli("history", "h", "--namespace", namespace, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "rolled_back" in proc.stdout and "cli-test" in proc.stdout
    proc = run_cli("history", "never", "--namespace", namespace, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "status unknown" in proc.stdout and "No audit events" in proc.stdout


def test_operator_identity_policy_and_audit(
    url: str,
    namespace: str,
    nsdb: twophase.Database,
    stage: Callable[[str, int], None],
    tmp_path: Path,
) -> None:
    stage("pay", 1)
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[rule]]\nprincipals = ["oncall-*"]\nactions = ["commit", "rollback"]\nnames = ["*"]\n'
    )
    env = {"TWOPHASE_URL": url, "TWOPHASE_POLICY": str(policy)}
    ns = ["--namespace", namespace]

    proc = run_cli("--principal", "intern", "commit", "pay", *ns, env=env)
    assert proc.returncode == 1
    assert "PermissionDenied" in proc.stderr and "intern" in proc.stderr
    assert nsdb.status("pay") is twophase.Status.PREPARED  # refused before any SQL

    proc = run_cli("commit", "pay", *ns, env={**env, "TWOPHASE_PRINCIPAL": "oncall-ana"})
    assert proc.returncode == 0, proc.stderr
    assert nsdb.status("pay") is twophase.Status.COMMITTED

    proc = run_cli("history", "pay", *ns, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    steps = [(e["step"], e["outcome"], e["principal"]) for e in json.loads(proc.stdout)["events"]]
    assert steps == [("commit", "denied", "intern"), ("commit", "committed", "oncall-ana")]

    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nprincipals = ["x"]\nactions = ["launch"]\n')
    proc = run_cli("--policy", str(bad), "commit", "pay", *ns, env={"TWOPHASE_URL": url})
    assert proc.returncode == 2 and "unknown action" in proc.stderr

    stage("quiet", 2)
    proc = run_cli("rollback", "quiet", *ns, "--no-audit", env={"TWOPHASE_URL": url})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(run_cli("history", "quiet", *ns, "--json", env=env).stdout)["events"] == []
