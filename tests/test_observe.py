"""Audit trail, tracing and access control on the real databases, sync and async."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from itertools import product
from pathlib import Path
from typing import Any

import pytest
from conftest import MY_URL, PG_URL
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import twophase
from twophase import PermissionDenied, Policy, Rule, Status
from twophase.names import TxName
from twophase.observe import AuditLog, Event, Outcome, Step, Tracing
from twophase.protocol import Action


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def run_python(code: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (``args`` as its sys.argv[1:]), output captured."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def by_name(finished: Sequence[ReadableSpan], prefix: str = "twophase.") -> list[str]:
    return [s.name for s in finished if s.name.startswith(prefix)]


# == tracing =====================================================================================


def test_spans_for_a_commit_parented_to_the_callers_span(
    url: str, table: str, txname: str, spans: Any
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("app")
    tracing = Tracing(provider)  # spans made by a background thread
    with twophase.connect(url, observers=[tracing], principal="svc") as db:
        with tracer.start_as_current_span("request") as request:
            db.begin_distributed(txname, lambda tx: tx.insert_into(table).values(id=1).execute())
            db.commit_distributed(txname)
        assert tracing.flush()
        finished = [s for s in exporter.get_finished_spans() if s.name.startswith("twophase.")]
    assert by_name(finished) == ["twophase.begin", "twophase.prepare", "twophase.commit"]
    request_ctx = request.get_span_context()
    for span in finished[:3]:
        assert span.parent is not None and span.parent.span_id == request_ctx.span_id
        assert span.context.trace_id == request_ctx.trace_id
        assert span.attributes is not None
        assert span.attributes["twophase.name"] == txname
        assert span.attributes["twophase.participant"] == "test"
        assert span.attributes["enduser.id"] == "svc"
        assert span.status.status_code is StatusCode.UNSET
        assert span.start_time is not None and span.end_time is not None
        assert span.end_time >= span.start_time
    outcomes = [s.attributes["twophase.outcome"] for s in finished[:3] if s.attributes]
    assert outcomes == ["ok", "prepared", "committed"]
    # One correlation id for the begin (and its prepare), one for the later commit call.
    cids = [s.attributes["twophase.correlation_id"] for s in finished[:3] if s.attributes]
    assert cids[0] == cids[1] != cids[2]


async def test_async_spans_for_a_failing_callback_and_a_bad_commit(
    url: str, table: str, txname: str, spans: Any
) -> None:
    provider, exporter = spans

    async def fails(tx: twophase.AsyncTransaction) -> None:
        await tx.insert_into(table).values(id=1).execute()
        raise RuntimeError("worker failed")

    db = await twophase.connect_async(url, observers=[Tracing(provider, background=False)])
    try:
        with pytest.raises(RuntimeError):
            await db.begin_distributed(txname, fails)
        with pytest.raises(twophase.TransactionRolledBack):
            await db.commit_distributed(txname)
    finally:
        await db.close()
    finished = exporter.get_finished_spans()
    assert by_name(finished) == ["twophase.begin", "twophase.rollback", "twophase.commit"]
    _, rollback, commit = finished
    assert rollback.attributes and rollback.attributes["twophase.outcome"] == "rolled_back"
    assert commit.status.status_code is StatusCode.ERROR
    assert commit.attributes and commit.attributes["twophase.outcome"] == "failed"
    assert [e.name for e in commit.events] == ["exception"]


def test_coordinator_spans_share_one_trace_and_correlation_id(spans: Any) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("app")
    tracing = Tracing(provider)
    obs = [tracing]
    dbs = {
        "orders": twophase.connect(PG_URL, observers=obs),
        "billing": twophase.connect(MY_URL, observers=obs),
    }
    coord = twophase.Coordinator(dbs, log="orders", namespace="obs_" + uuid_hex())
    try:
        with tracer.start_as_current_span("checkout") as parent, coord.transaction("g1") as g:
            g.enlist("orders", lambda tx: tx.execute("SELECT 1"))
            g.enlist("billing", lambda tx: tx.execute("SELECT 1"))
    finally:
        for d in dbs.values():
            d.close()
    assert tracing.flush()
    finished = [s for s in exporter.get_finished_spans() if s.name.startswith("twophase.")]
    names = sorted(s.name for s in finished)
    # The log participant's branch is the decision branch: no begin/prepare of its own.
    assert names == [
        "twophase.begin",
        "twophase.commit",
        "twophase.decision",
        "twophase.prepare",
    ]
    assert {s.context.trace_id for s in finished} == {parent.get_span_context().trace_id}
    assert len({s.attributes["twophase.correlation_id"] for s in finished if s.attributes}) == 1


def test_background_spans_are_exported_at_exit_without_a_flush() -> None:
    # The application makes its provider after importing twophase, as usual: the spans
    # queued at exit must still reach the exporter before the provider shuts down.
    code = (
        "import time\n"
        "from twophase.observe import Event, Outcome, Step, Tracing\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter\n"
        "from opentelemetry.sdk.trace.export import SpanExportResult\n"
        "class Print(SpanExporter):\n"
        "    def export(self, spans):\n"
        "        for s in spans: print(s.name, flush=True)\n"
        "        return SpanExportResult.SUCCESS\n"
        "provider = TracerProvider()\n"
        "provider.add_span_processor(SimpleSpanProcessor(Print()))\n"
        "t = Tracing(provider)\n"
        "for i in range(500):\n"
        "    t(Event(Step.COMMIT, f'n{i}', Outcome.COMMITTED, time.time(), 0.001, 'c'))\n"
    )
    out = run_python(code, check=True)
    assert out.stdout.split() == ["twophase.commit"] * 500, out.stderr


def test_close_waits_for_the_spans_of_every_step(url: str, txname: str, spans: Any) -> None:
    provider, exporter = spans
    tracing = Tracing(provider)  # shared: flushed by each database's close, not closed
    for n in range(2):
        db = twophase.connect(url, observers=[tracing])
        db.begin_distributed(f"{txname}-{n}", lambda tx: tx.execute("SELECT 1"))
        db.commit_distributed(f"{txname}-{n}")
        db.close()
        assert len(by_name(exporter.get_finished_spans())) == 3 * (n + 1)
    tracing.close()
    tracing.close()  # twice is fine
    # After close, spans are made in the caller's thread.
    tracing(Event(Step.COMMIT, "late", Outcome.COMMITTED, time.time(), 0.0, "c"))
    assert by_name(exporter.get_finished_spans())[-1] == "twophase.commit"


async def test_async_close_waits_for_the_spans_of_every_step(
    url: str, txname: str, spans: Any
) -> None:
    provider, exporter = spans
    db = await twophase.connect_async(url, observers=[Tracing(provider, background=True)])
    await db.begin_distributed(txname, lambda tx: tx.execute("SELECT 1"))
    await db.rollback_distributed(txname)
    await db.close()
    assert by_name(exporter.get_finished_spans()) == [
        "twophase.begin",
        "twophase.prepare",
        "twophase.rollback",
    ]


async def test_under_asyncio_spans_are_made_in_the_loop(url: str, txname: str, spans: Any) -> None:
    # A span thread would only take turns with the event loop for the interpreter lock.
    provider, exporter = spans
    tracing = Tracing(provider)
    db = await twophase.connect_async(url, observers=[tracing])
    try:
        await db.begin_distributed(txname, lambda tx: tx.execute("SELECT 1"))
        # Made as each step ended: no flush, no thread.
        assert by_name(exporter.get_finished_spans()) == ["twophase.begin", "twophase.prepare"]
        await db.commit_distributed(txname)
        assert by_name(exporter.get_finished_spans())[-1] == "twophase.commit"
        assert tracing._backlog._thread is None
    finally:
        await db.close()
    # The same Tracing used from plain threads makes its spans on its own thread.
    with twophase.connect(url, observers=[tracing]) as sdb:
        await asyncio.to_thread(sdb.status, txname)
        await asyncio.to_thread(sdb.begin_distributed, f"{txname}-t", lambda tx: None)
        await asyncio.to_thread(sdb.rollback_distributed, f"{txname}-t")
    assert tracing._backlog._thread is not None
    assert by_name(exporter.get_finished_spans())[-3:] == [
        "twophase.begin",
        "twophase.prepare",
        "twophase.rollback",
    ]


_OWNED_TRACING = """
import sys, threading
import twophase
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
url, name = sys.argv[1], sys.argv[2]
db = twophase.connect(url, tracing=True)
db.begin_distributed(name, lambda tx: tx.execute("SELECT 1"))
db.commit_distributed(name)
db.close()
threads = [t.name for t in threading.enumerate() if t.name == "twophase-tracing"]
print(len(exporter.get_finished_spans()), threads, flush=True)
"""


def test_close_stops_the_tracing_that_connect_made(url: str, txname: str) -> None:
    out = run_python(_OWNED_TRACING, url, txname)
    assert out.returncode == 0, out.stderr
    # Every span made by close(), before exit; the span thread gone with the database.
    assert out.stdout.split() == ["3", "[]"], out.stderr


def test_tracing_queue_is_bounded_and_drops_the_oldest() -> None:
    import threading

    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    release = threading.Event()
    names: list[str] = []

    class Stuck(SpanProcessor):
        """Holds the tracing thread on its first span, as a slow exporter would."""

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            release.wait(30)

        def on_end(self, span: Any) -> None:
            names.append(span.name + ":" + span.attributes["twophase.name"])

    provider = TracerProvider()
    provider.add_span_processor(Stuck())
    tracing = Tracing(provider, max_queue=10)
    for i in range(5000):
        tracing(Event(Step.COMMIT, f"n{i}", Outcome.COMMITTED, time.time(), 0.0, "c"))
    release.set()
    assert tracing.flush()
    assert len(names) + tracing.dropped == 5000
    # The thread holds at most one batch; everything else was cut down to the newest 10.
    assert len(names) <= 10 + 1024
    assert names[-10:] == [f"twophase.commit:n{i}" for i in range(4990, 5000)]
    with pytest.raises(ValueError, match="max_queue"):
        Tracing(max_queue=0)


def test_callers_make_their_own_spans_while_the_thread_is_behind() -> None:
    import threading

    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    release = threading.Event()
    made_by: list[str] = []

    class SlowThread(SpanProcessor):
        """Holds the tracing thread on its first span, as a starved thread would be."""

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            if threading.current_thread().name == "twophase-tracing":
                release.wait(30)

        def on_end(self, span: Any) -> None:
            made_by.append(threading.current_thread().name)

    provider = TracerProvider()
    provider.add_span_processor(SlowThread())
    tracing = Tracing(provider)
    for i in range(3000):
        tracing(Event(Step.COMMIT, f"n{i}", Outcome.COMMITTED, time.time(), 0.0, "c"))
    # The thread holds at most one batch (1,024) and 1,024 more wait for it: the caller
    # made every span beyond that itself, at once.
    inline = made_by.count(threading.current_thread().name)
    assert inline >= 3000 - 2 * 1024
    release.set()
    assert tracing.flush()
    assert len(made_by) == 3000 and tracing.dropped == 0
    # A slow processor is not a starved thread: the callers were not handed the spans.
    assert tracing._inline_until == 0.0
    tracing.close()


def test_a_starved_span_thread_hands_spans_back_to_busy_callers() -> None:
    from twophase.observe.tracing import starved

    # Mostly waiting for the interpreter lock: busy callers make their own spans a while.
    assert starved(64, waited=0.010, cpu=0.002)
    # The thread ran when callers waited for the database: keep it.
    assert not starved(64, waited=0.002, cpu=0.008)
    # Too few spans to judge by.
    assert not starved(4, waited=0.010, cpu=0.001)


def test_tracing_is_a_noop_without_opentelemetry() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from twophase.observe import Tracing\n"
        "t = Tracing(); print(t.enabled)\n"
        "import twophase, time\n"
        "from twophase.observe import Event, Step, Outcome\n"
        "t(Event(Step.BEGIN, 'x', Outcome.OK, time.time(), 0.0, 'c'))\n"
    )
    out = run_python(code, check=True)
    assert out.stdout.strip() == "False"


# == audit =======================================================================================


def test_audit_records_every_step_with_who_and_why(url: str, table: str, txname: str) -> None:
    with twophase.connect(url, audit=True, principal="orders-svc") as db:
        with twophase.context(correlation_id="req-7"):
            db.begin_distributed(txname, lambda tx: tx.insert_into(table).values(id=1).execute())
        with twophase.context(principal="oncall", correlation_id="req-8"):
            db.commit_distributed(txname)
            db.commit_distributed(txname)  # a retry: already committed
        history = db.history(txname)
    assert [(h["step"], h["outcome"], h["principal"], h["correlation_id"]) for h in history] == [
        ("begin", "ok", "orders-svc", "req-7"),
        ("prepare", "prepared", "orders-svc", "req-7"),
        ("commit", "committed", "oncall", "req-8"),
        ("commit", "already", "oncall", "req-8"),
    ]
    for h in history:
        assert h["name"] == txname and h["participant"] == "test" and h["branch"] is None
        assert h["duration_ms"] >= 0 and h["at"].tzinfo is not None
    assert history[0]["at"] <= history[1]["at"] <= history[2]["at"]


async def test_async_audit_of_a_rollback_and_a_failing_callback(
    url: str, table: str, txname: str
) -> None:
    db = await twophase.connect_async(url, audit=True)
    try:

        async def fails(tx: twophase.AsyncTransaction) -> None:
            raise ValueError("no stock")

        with pytest.raises(ValueError):
            await db.begin_distributed(txname, fails)
        await db.begin_distributed(txname + "b", lambda tx: tx.execute("SELECT 1"))
        await db.rollback_distributed(txname + "b")
        first, second = await db.history(txname), await db.history(txname + "b")
    finally:
        await db.close()
    assert [(h["step"], h["outcome"]) for h in first] == [
        ("begin", "ok"),
        ("rollback", "rolled_back"),
    ]
    assert "ValueError: no stock" in first[1]["detail"]
    assert [(h["step"], h["outcome"]) for h in second] == [
        ("begin", "ok"),
        ("prepare", "prepared"),
        ("rollback", "rolled_back"),
    ]
    # No principal configured: recorded as such, not invented.
    assert {h["principal"] for h in first + second} == {None}


def test_audit_keeps_any_text_and_loses_nothing_behind_it(url: str, txname: str) -> None:
    """Tabs, newlines, backslashes, COPY's own \\N and NUL in what callers control: each
    event is stored as given (NUL, which PostgreSQL's text cannot hold, as U+FFFD), and a
    NUL does not fail its batch and the events queued behind it."""
    hostile = "a\\b\tc\nd\re\x00f \\N \u00e9\U0001f600 end\\"
    stored = hostile.replace("\x00", "\ufffd")
    audit = AuditLog(url, flush_interval=0.05)
    with twophase.connect(url, observers=[audit], label="lbl\t\\1") as db:
        with twophase.context(principal=hostile, correlation_id=hostile[:30]):

            def fails(tx: twophase.Transaction) -> None:
                raise ValueError(hostile)

            with pytest.raises(ValueError):
                db.begin_distributed(txname, fails)
        db.begin_distributed(txname + "b", lambda tx: tx.execute("SELECT 1"))
        db.rollback_distributed(txname + "b")
        first, second = audit.history(txname), audit.history(txname + "b")
    audit.close()
    assert [(h["step"], h["outcome"]) for h in first] == [
        ("begin", "ok"),
        ("rollback", "rolled_back"),
    ]
    for h in first:
        assert h["principal"] == stored
        assert h["correlation_id"] == stored[:30]
        assert h["participant"] == "lbl\t\\1"
    assert first[1]["detail"].endswith(f"ValueError: {stored}")
    assert [h["step"] for h in second] == ["begin", "prepare", "rollback"]


def test_an_event_the_database_refuses_is_dropped_alone(url: str) -> None:
    """A batch holding an event the database cannot store (a name longer than its column,
    which only a hand-made event can carry) is written event by event: the refused one is
    dropped and counted, the rest are written, and later batches flow again."""
    audit = AuditLog(url, flush_interval=0.05)
    now = time.time()
    cid = f"refusal-{time.time_ns()}"
    names = ["before-refused", "x" * 100, "after-refused"]
    try:
        for name in names:
            audit(Event(Step.COMMIT, name, Outcome.COMMITTED, now, 0.001, cid))
        assert audit.flush(timeout=10)
        assert audit.dropped == 1
        audit(Event(Step.COMMIT, "later", Outcome.COMMITTED, now, 0.001, cid))
        assert audit.flush(timeout=10)
        written = [e["name"] for e in audit.history(correlation_id=cid)]
    finally:
        audit.close()
    assert written == ["before-refused", "after-refused", "later"]
    assert audit.dropped == 1


def test_audit_outage_never_changes_the_outcome(url: str, table: str, txname: str) -> None:
    dead = AuditLog("postgresql://postgres@127.0.0.1:9/nowhere", flush_interval=0.05)
    db = twophase.connect(url, observers=[dead])
    db.begin_distributed(txname, lambda tx: tx.insert_into(table).values(id=1).execute())
    db.commit_distributed(txname)
    assert db.status(txname) is Status.COMMITTED
    assert list(db.select_from(table).execute()) == [{"id": 1, "status": None}]
    assert dead.flush(timeout=0.2) is False  # still trying, in the background
    started = time.monotonic()
    db.close(timeout=0.3)  # waits that long for the log, not the default 10 s
    assert time.monotonic() - started < 3
    dead.close(timeout=0.1)


def test_synchronous_audit_is_written_before_the_step_returns(url: str, txname: str) -> None:
    audit = AuditLog(url, synchronous=True)
    with twophase.connect(url, observers=[audit]) as db:
        db.begin_distributed(txname, lambda tx: tx.execute("SELECT 1"))
        # Read through another connection, without flushing anything.
        with twophase.connect(url) as other:
            steps = [h["step"] for h in other.history(txname)]
        db.rollback_distributed(txname)
    assert steps == ["begin", "prepare"]


def test_observer_errors_are_contained(url: str, txname: str) -> None:
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("observer bug")

    with twophase.connect(url, observers=[broken, seen.append]) as db:
        db.begin_distributed(txname, lambda tx: tx.execute("SELECT 1"))
        db.commit_distributed(txname)
    assert [e.step for e in seen] == [Step.BEGIN, Step.PREPARE, Step.COMMIT]
    assert [e.outcome for e in seen] == [Outcome.OK, Outcome.PREPARED, Outcome.COMMITTED]


def test_bad_observability_options_fail_before_connecting() -> None:
    with pytest.raises(TypeError, match="observers must be callables"):
        twophase.connect("postgresql://postgres@127.0.0.1:9/x", observers=["audit"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="Policy"):
        twophase.connect("postgresql://postgres@127.0.0.1:9/x", policy={"rule": []})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="principal"):
        twophase.connect("postgresql://postgres@127.0.0.1:9/x", principal="")
    with (
        pytest.raises(ValueError, match="correlation_id"),
        twophase.context(correlation_id="x" * 65),
    ):
        pass


# == access control ==============================================================================

POLICY = Policy(
    [
        Rule(principals=["billing-*"], actions=["begin", "commit"], names=["billing:*"]),
        Rule(principals=["oncall"], actions=["commit", "rollback", "recover"], names=["*"]),
        Rule(principals=["*"], actions=["rollback"], names=["billing:locked-*"], effect="deny"),
    ]
)
PRINCIPALS = ["billing-api", "oncall", "intruder", None]
ACTIONS = ["begin", "commit", "rollback", "recover"]
NAMES = ["billing:inv-1", "billing:locked-9", "orders:o-1"]
ALLOWED = {
    ("billing-api", "begin", "billing:inv-1"),
    ("billing-api", "begin", "billing:locked-9"),
    ("billing-api", "commit", "billing:inv-1"),
    ("billing-api", "commit", "billing:locked-9"),
    ("oncall", "commit", "billing:inv-1"),
    ("oncall", "commit", "billing:locked-9"),
    ("oncall", "commit", "orders:o-1"),
    ("oncall", "commit", "*"),
    ("oncall", "rollback", "*"),
    ("oncall", "rollback", "billing:inv-1"),
    ("oncall", "rollback", "orders:o-1"),
    # recover is checked against "*": only the rule whose names include "*" grants it.
    ("oncall", "recover", "*"),
    *(("oncall", "recover", n) for n in NAMES),
}


def test_policy_matrix() -> None:
    for principal, action, name in product(PRINCIPALS, ACTIONS, [*NAMES, "*"]):
        want = (principal, action, name) in ALLOWED
        assert POLICY.allows(principal, action, name) is want, (principal, action, name)
        if not want:
            with pytest.raises(PermissionDenied):
                POLICY.check(principal, action, name)


def test_policy_from_toml_and_json_files_agree(tmp_path: Path) -> None:
    rules = [
        {"principals": ["billing-*"], "actions": ["begin", "commit"], "names": ["billing:*"]},
        {"principals": ["oncall"], "actions": ["commit", "rollback", "recover"], "names": ["*"]},
        {
            "principals": ["*"],
            "actions": ["rollback"],
            "names": ["billing:locked-*"],
            "effect": "deny",
        },
    ]
    (tmp_path / "p.json").write_text(json.dumps({"rule": rules}))
    toml = "".join(
        "[[rule]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in r.items()) for r in rules
    )
    (tmp_path / "p.toml").write_text(toml)
    for path in ("p.json", "p.toml"):
        loaded = Policy.from_file(tmp_path / path)
        for combo in product(PRINCIPALS, ACTIONS, [*NAMES, "*"]):
            assert loaded.allows(*combo) is POLICY.allows(*combo), (path, combo)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[[rule]]\nprincipals = ["a"]\nactions = ["launch"]\n', "unknown action"),
        ('[[rule]]\nprincipals = ["a"]\nactions = ["begin"]\nwho = 1\n', "unknown key"),
        ('[[rule]]\nactions = ["begin"]\n', "missing"),
        ('[[rule]]\nprincipals = []\nactions = ["begin"]\n', "non-empty"),
        ('[[rule]]\nprincipals = ["a"]\nactions = ["begin"]\neffect = "maybe"\n', "effect"),
        ("[rules]\n", "rule"),
        ("not = [toml", "not valid TOML"),
    ],
)
def test_bad_policy_files_name_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        Policy.from_file(path)


def test_denied_commit_leaves_the_transaction_prepared_and_untouched(
    url: str, table: str, txname: str
) -> None:
    name = f"billing:{txname}"
    seen: list[Event] = []
    with twophase.connect(url, policy=POLICY, audit=True, observers=[seen.append]) as db:
        with twophase.context(principal="billing-api"):
            db.begin_distributed(name, lambda tx: tx.insert_into(table).values(id=1).execute())
        before = len(seen)
        with twophase.context(principal="intruder"), pytest.raises(PermissionDenied) as err:
            db.commit_distributed(name)
        assert "intruder" in str(err.value) and "add a rule" in str(err.value)
        with pytest.raises(PermissionDenied, match="no principal"):
            db.rollback_distributed(name)
        # Refused before any SQL: only the two denial events, and the data is untouched.
        assert [(e.step, e.outcome, e.principal) for e in seen[before:]] == [
            (Step.COMMIT, Outcome.DENIED, "intruder"),
            (Step.ROLLBACK, Outcome.DENIED, None),
        ]
        with twophase.connect(url) as plain:
            assert plain.status(name) is Status.PREPARED
            assert list(plain.select_from(table).execute()) == []
        with twophase.context(principal="oncall"):
            db.commit_distributed(name)
        assert db.status(name) is Status.COMMITTED
        steps = [(h["step"], h["outcome"], h["principal"]) for h in db.history(name)]
    assert steps == [
        ("begin", "ok", "billing-api"),
        ("prepare", "prepared", "billing-api"),
        ("commit", "denied", "intruder"),
        ("rollback", "denied", None),
        ("commit", "committed", "oncall"),
    ]


async def test_async_denied_begin_writes_nothing(url: str, table: str, txname: str) -> None:
    db = await twophase.connect_async(url, policy=POLICY, principal="billing-api")
    try:
        with pytest.raises(PermissionDenied):
            await db.begin_distributed(
                f"orders:{txname}", lambda tx: tx.insert_into(table).values(id=1).execute()
            )
        assert await db.status(f"orders:{txname}") is Status.UNKNOWN
        assert list(await db.select_from(table).execute()) == []
    finally:
        await db.close()


def test_coordinator_checks_begin_and_recover() -> None:
    ns = "pol_" + uuid_hex()
    policy = Policy(
        [
            Rule(principals=["svc"], actions=["begin", "commit"], names=[f"{ns}:*"]),
            Rule(principals=["half"], actions=["begin"], names=[f"{ns}:*"]),
            Rule(principals=["oncall"], actions=["recover", "commit", "rollback"], names=["*"]),
        ]
    )
    seen: list[Event] = []
    dbs = {
        "orders": twophase.connect(PG_URL, policy=policy, observers=[seen.append]),
        "billing": twophase.connect(MY_URL, policy=policy),
    }
    coord = twophase.Coordinator(dbs, log="orders", namespace=ns)
    try:
        with twophase.context(principal="svc"), coord.transaction("ok") as g:
            g.enlist("billing", lambda tx: tx.execute("SELECT 1"))
        with twophase.context(principal="svc"), pytest.raises(PermissionDenied):
            coord.recover()
        with twophase.context(principal="oncall"):
            coord.recover()
        ran = []
        with (
            twophase.context(principal="half"),
            pytest.raises(PermissionDenied, match="commit"),
            coord.transaction("half"),
        ):
            ran.append(1)  # never: the block would commit, so it is refused up front
        assert ran == []
        with (
            twophase.context(principal="intruder"),
            pytest.raises(PermissionDenied),
            coord.transaction("nope"),
        ):
            pass
    finally:
        for d in dbs.values():
            d.close()
    denied = [(e.step, e.name, e.principal) for e in seen if e.outcome is Outcome.DENIED]
    assert denied == [
        (Step.RECOVER, "*", "svc"),
        (Step.COMMIT, f"{ns}:half", "half"),
        (Step.BEGIN, f"{ns}:nope", "intruder"),
    ]


def uuid_hex() -> str:
    import uuid

    return uuid.uuid4().hex[:10]


# == reaping =====================================================================================


def test_reap_rolls_back_only_old_plain_transactions(url: str) -> None:
    ns = "reap_" + uuid_hex()
    seen: list[Event] = []
    policy = Policy([Rule(principals=["janitor"], actions=["reap", "begin"], names=["*"])])
    with twophase.connect(url, namespace=ns, observers=[seen.append], policy=policy) as db:
        with twophase.context(principal="janitor"):
            db.begin_distributed("old", lambda tx: tx.execute("SELECT 1"))
            # A global transaction's branch, left prepared: reap must not touch it.
            branch = TxName.make("g", ns).with_branch(1, int(time.time()) + 3600)
            db._stage(branch).prepare()
            time.sleep(1.5)  # a clear age gap between "old" and "young"
            db.begin_distributed("young", lambda tx: tx.execute("SELECT 1"))

            def between() -> timedelta:
                ages = {p.name: p.age for p in db.prepared()}
                assert ages["old"] and ages["young"]
                return (ages["old"] + ages["young"]) / 2

            assert [p.name for p in db.reap(between(), dry_run=True).reaped] == ["old"]
            assert {p.name for p in db.prepared()} == {"old", "young", "g"}
            cutoff = between()
            report = db.reap(cutoff)
            assert [p.name for p in report.reaped] == ["old"]
            assert [(p.name, why) for p, why in report.skipped] == [
                (
                    "g",
                    "a global transaction's branch: `twophase recover` finishes it by its decision",
                )
            ]
            assert report.younger == 1 and report.failed == []
            assert db.reap(cutoff).reaped == []
            assert db.status("old") is Status.ROLLED_BACK
        with pytest.raises(PermissionDenied), twophase.context(principal="intern"):
            db.reap(cutoff)
        with pytest.raises(ValueError, match="timedelta"):
            db.reap(5)  # type: ignore[arg-type]
        with twophase.context(principal="janitor"):
            assert [p.name for p in db.reap(timedelta(0)).reaped] == ["young"]
            assert [(p.name, p.branch) for p in db.prepared()] == [("g", branch.branch)]
        db.policy = None  # clean up the branch by hand
        db._finish(Action.ROLLBACK, branch)
    reaps = [(e.name, e.outcome) for e in seen if e.step is Step.REAP]
    assert reaps == [
        (f"{ns}:old", Outcome.ROLLED_BACK),
        ("*", Outcome.DENIED),
        (f"{ns}:young", Outcome.ROLLED_BACK),
    ]


# == pruning the audit trail =====================================================================


def test_prune_history_deletes_only_old_events_in_batches(dialect_name: str) -> None:
    from procs.outbox_env import isolated_database

    with isolated_database(dialect_name) as scratch:
        audit = AuditLog(scratch, synchronous=True)
        now = time.time()
        for i, days in enumerate([40, 35, 31, 2, 0]):
            started = now - days * 86400
            audit(Event(Step.COMMIT, f"n{i}", Outcome.COMMITTED, started, 0.001, f"cid{i}"))
        seen: list[Event] = []
        policy = Policy([Rule(principals=["dba"], actions=["prune"], names=["*"])])
        try:
            with twophase.connect(scratch, observers=[seen.append], policy=policy) as db:
                with twophase.context(principal="dba"):
                    month = timedelta(days=30)
                    assert db.prune_history(month, dry_run=True) == 3
                    assert len(db.history("n0")) == 1  # a dry run deletes nothing
                    assert db.prune_history(month, batch=2) == 3  # two statements: 2 + 1
                    assert db.prune_history(month) == 0
                    left = [
                        e["name"] for n in ("n0", "n1", "n2", "n3", "n4") for e in db.history(n)
                    ]
                    assert left == ["n3", "n4"]
                with pytest.raises(PermissionDenied), twophase.context(principal="intern"):
                    db.prune_history(timedelta(days=1))
                for bad in ({"older_than": timedelta(0)}, {"older_than": 30}):
                    with pytest.raises(ValueError, match="older_than"):
                        db.prune_history(**bad)  # type: ignore[arg-type]
                with pytest.raises(ValueError, match="batch"):
                    db.prune_history(timedelta(days=1), batch=0)
                assert len(db.history("n3")) == 1  # refused calls deleted nothing
        finally:
            audit.close()
    prunes = [(e.name, e.outcome, e.principal) for e in seen if e.step is Step.PRUNE]
    assert prunes == [
        ("*", Outcome.OK, "dba"),
        ("*", Outcome.OK, "dba"),
        ("*", Outcome.DENIED, "intern"),
    ]
    details = [e.detail or "" for e in seen if e.step is Step.PRUNE]
    assert details[0].startswith("3 audit events older than") and details[1].startswith("0 ")


async def test_prune_history_async(dialect_name: str) -> None:
    from procs.outbox_env import isolated_database

    with isolated_database(dialect_name) as scratch:
        audit = AuditLog(scratch, synchronous=True)
        old = time.time() - 2 * 86400
        audit(Event(Step.COMMIT, "old", Outcome.COMMITTED, old, 0.001, "c"))
        audit.close()
        db = await twophase.connect_async(scratch)
        try:
            assert await db.prune_history(timedelta(days=1), dry_run=True) == 1
            assert await db.prune_history(timedelta(days=1)) == 1
            assert await db.history("old") == []
        finally:
            await db.close()


# == fork ========================================================================================

_FORKING = """
import os, sys, time
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from twophase.observe import AuditLog, Event, Outcome, Step, Tracing

url, tag = sys.argv[1], sys.argv[2]
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracing, audit = Tracing(provider), AuditLog(url)

def step(name):
    event = Event(Step.COMMIT, f"{tag}-{name}", Outcome.COMMITTED, time.time(), 0.0, tag)
    tracing(event)
    audit(event)

step("parent-1")  # both background threads now run in the parent
assert tracing.flush() and audit.flush()
pid = os.fork()
if pid == 0:
    step("child")
    ok = tracing.flush(5) and audit.flush(5)
    spans = [s.attributes["twophase.name"] for s in exporter.get_finished_spans()]
    print("child", ok, spans.count(f"{tag}-child"), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
step("parent-2")  # the parent's threads and its audit connection still work
assert tracing.flush() and audit.flush()
print("parent", len(audit.history(correlation_id=tag)), flush=True)
audit.close()
"""


def test_a_forked_child_traces_and_audits_on_its_own(url: str) -> None:
    tag = "fork" + uuid_hex()
    out = run_python(_FORKING, url, tag)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert "child True 1" in lines, out
    # parent-1, the child's own event (written on the child's own connection), parent-2
    assert "parent 3" in lines, out
