"""Prometheus metrics (twophase.observe.metrics) on the real PostgreSQL and MariaDB.

Figures are read back from the registry (``get_sample_value``) or from the exposition text
the ``twophase metrics`` command prints. Every test works in a namespace of its own, so the
prepared-transaction gauges count only its own transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from conftest import URLS
from procs.outbox_env import isolated_database, table_exists
from procs.tcp_proxy import TcpProxy
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import twophase
from twophase.observe.events import Event, Outcome, Step
from twophase.observe.metrics import BUCKETS, Metrics, MetricsUnavailable, Snapshot
from twophase.policy import Policy, Rule

_SCRIPT = Path(sys.executable).with_name("twophase")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "twophase"]


def event(step: Step, outcome: Outcome, duration: float = 0.004) -> Event:
    return Event(step, "ns:x", outcome, time.time() - duration, duration, "c0ffee")


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def namespace() -> str:
    return f"mx{uuid.uuid4().hex[:10]}"


@pytest.fixture
def nsdb(url: str, namespace: str) -> Iterator[twophase.Database]:
    """A Database in the test's namespace; what the test left prepared is rolled back."""
    database = twophase.connect(url, namespace=namespace, pool_max=4)
    yield database
    for p in database.prepared():
        with contextlib.suppress(twophase.TwoPhaseError):
            database.rollback_distributed(p.name)
    database.close()


def nothing(tx: twophase.Transaction) -> None:
    tx.execute("SELECT 1")


def wait_older_than(db: twophase.Database, name: str, age: timedelta) -> None:
    """Sleep until the database says ``name`` has been prepared for longer than ``age``."""
    (p,) = [p for p in db.prepared() if p.name == name]
    assert p.prepared_at is not None
    rest = (p.prepared_at + age - datetime.now(UTC)).total_seconds()
    time.sleep(max(0.0, rest) + 0.2)
    assert p.age is not None and p.age > age


# -- the observer --------------------------------------------------------------------------


def test_counts_and_times_steps(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    metrics(event(Step.BEGIN, Outcome.OK))
    metrics(event(Step.PREPARE, Outcome.PREPARED, 0.002))
    metrics(event(Step.COMMIT, Outcome.COMMITTED, 0.02))
    metrics(event(Step.COMMIT, Outcome.COMMITTED, 3.0))
    metrics(event(Step.COMMIT, Outcome.ALREADY))
    metrics(event(Step.COMMIT, Outcome.DENIED, 0.5))

    steps = "twophase_steps_total"
    assert sample(registry, steps, step="begin", outcome="ok") == 1
    assert sample(registry, steps, step="commit", outcome="committed") == 2
    assert sample(registry, steps, step="commit", outcome="already") == 1
    assert sample(registry, steps, step="commit", outcome="denied") == 1
    assert sample(registry, steps, step="rollback", outcome="rolled_back") is None

    hist = "twophase_step_duration_seconds"
    # The denied step is counted but not timed: it never reached the database.
    assert sample(registry, f"{hist}_count", step="commit") == 3
    assert sample(registry, f"{hist}_sum", step="commit") == pytest.approx(3.024)
    assert sample(registry, f"{hist}_bucket", step="commit", le="0.025") == 2
    assert sample(registry, f"{hist}_bucket", step="commit", le="2.5") == 2
    assert sample(registry, f"{hist}_bucket", step="commit", le="30.0") == 3
    assert sample(registry, f"{hist}_bucket", step="prepare", le="0.001") == 0
    assert sample(registry, f"{hist}_bucket", step="prepare", le="0.0025") == 1
    assert BUCKETS[0] == 0.001 and BUCKETS[-1] == 30.0


def test_observer_never_raises(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    metrics("not an event")  # type: ignore[arg-type]
    metrics(event(Step.COMMIT, Outcome.COMMITTED, duration=-1.0))  # clock step: clamped
    assert sample(registry, "twophase_step_duration_seconds_sum", step="commit") == 0


def test_registries_and_prefixes_do_not_collide(registry: CollectorRegistry) -> None:
    one, two = Metrics(registry), Metrics(CollectorRegistry())
    one(event(Step.BEGIN, Outcome.OK))
    assert sample(one.registry, "twophase_steps_total", step="begin", outcome="ok") == 1
    assert sample(two.registry, "twophase_steps_total", step="begin", outcome="ok") is None

    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(registry)
    other = Metrics(registry, prefix="billing_2pc")
    other(event(Step.BEGIN, Outcome.OK))
    assert sample(registry, "billing_2pc_steps_total", step="begin", outcome="ok") == 1

    one.unregister()
    Metrics(registry)  # the names are free again
    with pytest.raises(ValueError, match="prefix"):
        Metrics(CollectorRegistry(), prefix="bad-prefix")


def test_default_registry() -> None:
    from prometheus_client import REGISTRY

    metrics = Metrics(sla=5)
    try:
        assert metrics.registry is REGISTRY
        assert metrics.sla == timedelta(seconds=5)
        metrics(event(Step.ROLLBACK, Outcome.ROLLED_BACK))
        value = REGISTRY.get_sample_value(
            "twophase_steps_total", {"step": "rollback", "outcome": "rolled_back"}
        )
        assert value == 1
        assert REGISTRY.get_sample_value("twophase_sla_seconds") == 5
    finally:
        metrics.unregister()


def test_snapshot_of_a_listing() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)

    def prepared(seconds_ago: float | None) -> twophase.PreparedTransaction:
        at = None if seconds_ago is None else now - timedelta(seconds=seconds_ago)
        return twophase.PreparedTransaction("n", "n", at, "db")

    listing = [prepared(120), prepared(61), prepared(10), prepared(None), prepared(-2)]
    s = Snapshot.of("orders", listing, None, timedelta(minutes=1), now)
    assert (s.prepared, s.stuck, s.oldest_age_seconds) == (5, 2, 120)
    assert s.taken_at == now.timestamp()
    empty = Snapshot.of("orders", [], None, timedelta(minutes=1), now)
    assert (empty.prepared, empty.stuck, empty.oldest_age_seconds) == (0, 0, 0)


def test_without_prometheus_client() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import twophase.observe.metrics as m\n"
        "try:\n"
        "    m.Metrics()\n"
        "except m.MetricsUnavailable as exc:\n"
        "    import twophase\n"
        "    assert isinstance(exc, ImportError) and isinstance(exc, twophase.NotSupported)\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'twophase[metrics]'" in proc.stdout
    assert issubclass(MetricsUnavailable, ImportError)


# -- real transactions, through connect(observers=...) -------------------------------------


def test_real_steps_are_counted(url: str, namespace: str, registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    with twophase.connect(url, namespace=namespace, observers=[metrics]) as db:
        db.begin_distributed("a", nothing)
        db.commit_distributed("a")
        db.commit_distributed("a")  # a retry
        db.begin_distributed("b", nothing)
        db.rollback_distributed("b")
        with pytest.raises(twophase.UnknownTransaction):
            db.commit_distributed("never")

    def steps(step: str, outcome: str) -> float | None:
        return sample(registry, "twophase_steps_total", step=step, outcome=outcome)

    assert steps("begin", "ok") == 2
    assert steps("prepare", "prepared") == 2
    assert steps("commit", "committed") == 1
    assert steps("commit", "already") == 1
    assert steps("commit", "failed") == 1
    assert steps("rollback", "rolled_back") == 1
    for step, n in (("begin", 2), ("prepare", 2), ("commit", 3), ("rollback", 1)):
        assert sample(registry, "twophase_step_duration_seconds_count", step=step) == n


def test_denied_steps_are_counted(url: str, namespace: str, registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    policy = Policy([Rule(principals=["app"], actions=["begin", "rollback"])])
    with twophase.connect(
        url, namespace=namespace, observers=[metrics], principal="app", policy=policy
    ) as db:
        db.begin_distributed("d", nothing)
        with pytest.raises(twophase.PermissionDenied):
            db.commit_distributed("d")
        db.rollback_distributed("d")
    assert sample(registry, "twophase_steps_total", step="commit", outcome="denied") == 1
    assert not sample(registry, "twophase_step_duration_seconds_count", step="commit")


def test_coordinator_steps_are_counted(namespace: str, registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    dbs = {
        key: twophase.connect(URLS[d], namespace=namespace, observers=[metrics], label=key)
        for key, d in (("pg", "postgresql"), ("maria", "mysql"))
    }
    try:
        coord = twophase.Coordinator(dbs, log="pg", namespace=namespace, observers=[metrics])
        with coord.transaction("g1", timeout=30) as g:
            g.enlist("pg", nothing)
            g.enlist("maria", nothing)
        assert coord.status("g1") is twophase.Decision.COMMITTED
    finally:
        for db in dbs.values():
            db.close()
    assert sample(registry, "twophase_steps_total", step="decision", outcome="committed") == 1
    assert sample(registry, "twophase_steps_total", step="commit", outcome="committed") == 1


# -- gauges of what is open ----------------------------------------------------------------


def test_prepared_gauges_and_a_stuck_transaction(
    nsdb: twophase.Database, registry: CollectorRegistry
) -> None:
    metrics = Metrics(registry, sla=timedelta(seconds=1))
    gauge = "twophase_prepared_{}"

    def value(name: str) -> float | None:
        return sample(registry, gauge.format(name), participant="orders")

    assert value("transactions") is None  # never read: no sample at all
    s = metrics.refresh(nsdb, participant="orders")
    assert (s.participant, s.prepared, s.stuck, s.outbox) == ("orders", 0, 0, None)
    assert (value("transactions"), value("stuck_transactions")) == (0, 0)
    assert value("oldest_age_seconds") == 0
    assert sample(registry, "twophase_participant_up", participant="orders") == 1
    assert sample(registry, "twophase_sla_seconds") == 1

    nsdb.begin_distributed("slow", nothing)
    s = metrics.refresh(nsdb, participant="orders")
    assert (s.prepared, s.stuck) == (1, 0)
    assert value("transactions") == 1 and value("stuck_transactions") == 0

    wait_older_than(nsdb, "slow", timedelta(seconds=1))
    nsdb.begin_distributed("fresh", nothing)
    s = metrics.refresh(nsdb, participant="orders")
    assert (s.prepared, s.stuck) == (2, 1)
    assert (value("transactions"), value("stuck_transactions")) == (2, 1)
    oldest = value("oldest_age_seconds")
    assert oldest is not None and oldest > 1
    read_at = sample(registry, "twophase_last_refresh_timestamp_seconds", participant="orders")
    assert read_at == s.taken_at

    nsdb.commit_distributed("slow")
    metrics.refresh(nsdb, participant="orders")
    assert (value("transactions"), value("stuck_transactions")) == (1, 0)
    nsdb.rollback_distributed("fresh")
    metrics.refresh(nsdb, participant="orders")
    assert (value("transactions"), value("stuck_transactions")) == (0, 0)
    assert value("oldest_age_seconds") == 0


def test_refresh_async(url: str, namespace: str, registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, sla=timedelta(hours=1))

    async def scenario() -> tuple[Snapshot, Snapshot]:
        adb = await twophase.connect_async(url, namespace=namespace)
        try:

            async def work(tx: twophase.AsyncTransaction) -> None:
                await tx.execute("SELECT 1")

            await adb.begin_distributed("x", work)
            before = await metrics.refresh_async(adb)
            await adb.rollback_distributed("x")
            return before, await metrics.refresh_async(adb)
        finally:
            await adb.close()

    before, after = asyncio.run(scenario())
    # Labelled with the database name by default, like the events of the database.
    assert before.participant == "test"
    assert (before.prepared, before.stuck, after.prepared) == (1, 0, 0)
    assert sample(registry, "twophase_prepared_transactions", participant="test") == 0


def test_watched_database_is_read_at_each_scrape(
    nsdb: twophase.Database, registry: CollectorRegistry
) -> None:
    metrics = Metrics(registry)
    metrics.watch(nsdb, participant="w")
    assert sample(registry, "twophase_prepared_transactions", participant="w") == 0
    nsdb.begin_distributed("x", nothing)
    assert sample(registry, "twophase_prepared_transactions", participant="w") == 1
    text = generate_latest(registry).decode()
    assert 'twophase_prepared_transactions{participant="w"} 1.0' in text
    nsdb.commit_distributed("x")
    assert sample(registry, "twophase_prepared_transactions", participant="w") == 0

    metrics.unwatch("w")
    assert sample(registry, "twophase_participant_up", participant="w") is None


def test_database_down_and_back(
    url: str, namespace: str, nsdb: twophase.Database, registry: CollectorRegistry
) -> None:
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
    via_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    metrics = Metrics(registry)
    # Read through the proxy (short timeouts: a scrape waits for a database that does not
    # answer); transactions are made and finished directly.
    watched = twophase.connect(via_proxy, namespace=namespace, timeout=1, retry_timeout=1)
    try:
        nsdb.begin_distributed("x", nothing)
        metrics.watch(watched, participant="p")
        assert sample(registry, "twophase_participant_up", participant="p") == 1
        assert sample(registry, "twophase_prepared_transactions", participant="p") == 1

        proxy.down()
        # Down: up 0, and no stale figures to keep an alert firing or hide a new one.
        assert sample(registry, "twophase_participant_up", participant="p") == 0
        assert sample(registry, "twophase_prepared_transactions", participant="p") is None
        with pytest.raises(twophase.TwoPhaseError):
            metrics.refresh(watched, participant="p")

        proxy.up()
        # The pool reconnects with a back-off: wait for it, each scrape reading again.
        give_up = time.monotonic() + 60
        while sample(registry, "twophase_participant_up", participant="p") != 1:
            assert time.monotonic() < give_up, "the database never came back"
            time.sleep(0.2)
        assert sample(registry, "twophase_prepared_transactions", participant="p") == 1
        nsdb.rollback_distributed("x")
        assert sample(registry, "twophase_prepared_transactions", participant="p") == 0
    finally:
        watched.close()
        proxy.close()


def test_outbox_lag(dialect_name: str, registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    with isolated_database(dialect_name) as ob_url, twophase.connect(ob_url) as db:
        # No outbox tables: no outbox figures, and reading must not create them.
        s = metrics.refresh(db, participant="ob")
        assert s.outbox is None
        assert sample(registry, "twophase_outbox_pending_messages", participant="ob") is None
        assert not table_exists(ob_url, "twophase_outbox")

        with db.transaction() as tx:
            tx.outbox.publish("orders", {"id": 1}, key="order-1")
            tx.outbox.publish("orders", {"id": 2}, key="order-2")
        s = metrics.refresh(db, participant="ob")
        assert s.outbox is not None
        assert (s.outbox.pending, s.outbox.dead) == (2, 0)
        assert sample(registry, "twophase_outbox_pending_messages", participant="ob") == 2
        assert sample(registry, "twophase_outbox_dead_messages", participant="ob") == 0
        age = sample(registry, "twophase_outbox_oldest_pending_age_seconds", participant="ob")
        assert age is not None and age >= 0
        assert s.as_dict()["outbox"]["pending"] == 2
        db.execute("UPDATE twophase_outbox SET state = 1")  # as if a relay delivered them
        s = metrics.refresh(db, participant="ob")
        assert s.outbox is not None and s.outbox.pending == 0
        assert sample(registry, "twophase_outbox_pending_messages", participant="ob") == 0
        pending_age = "twophase_outbox_oldest_pending_age_seconds"
        assert sample(registry, pending_age, participant="ob") == 0


# -- the `twophase metrics` command --------------------------------------------------------


def run_cli(*args: str, url: str, namespace: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(TWOPHASE_URL=url)
    return subprocess.run(
        [*COMMAND, *args, "--namespace", namespace],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def parse_exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_once(url: str, namespace: str, nsdb: twophase.Database) -> None:
    nsdb.begin_distributed("one", nothing)
    nsdb.begin_distributed("two", nothing)
    wait_older_than(nsdb, "one", timedelta(seconds=1))

    proc = run_cli(
        "metrics", "--once", "--sla", "1s", "--label", "shop", url=url, namespace=namespace
    )
    assert proc.returncode == 0, proc.stderr
    assert "# TYPE twophase_prepared_transactions gauge" in proc.stdout
    assert "# TYPE twophase_steps_total counter" in proc.stdout
    assert "# TYPE twophase_step_duration_seconds histogram" in proc.stdout
    values = parse_exposition(proc.stdout)
    shop = (("participant", "shop"),)
    assert values[("twophase_prepared_transactions", shop)] == 2
    assert values[("twophase_prepared_stuck_transactions", shop)] >= 1
    assert values[("twophase_prepared_oldest_age_seconds", shop)] > 1
    assert values[("twophase_participant_up", shop)] == 1
    assert values[("twophase_sla_seconds", ())] == 1

    proc = run_cli("metrics", "--once", "--json", url=url, namespace=namespace)
    assert proc.returncode == 0, proc.stderr
    (doc,) = json.loads(proc.stdout)
    assert doc["participant"] == nsdb.database
    assert (doc["prepared"], doc["stuck"], doc["sla_seconds"]) == (2, 0, 60)
    assert doc["oldest_age_seconds"] > 1
    assert datetime.fromisoformat(doc["taken_at"]).utcoffset() == timedelta(0)


def test_metrics_command_errors(namespace: str) -> None:
    pg = URLS["postgresql"]
    proc = run_cli("metrics", url=pg, namespace=namespace)  # neither --port nor --once
    assert proc.returncode == 2 and "--once" in proc.stderr
    proc = run_cli("metrics", "--once", "--sla", "soon", url=pg, namespace=namespace)
    assert proc.returncode == 2
    proc = run_cli(
        "metrics", "--once", url="postgresql://postgres@127.0.0.1:1/test", namespace=namespace
    )
    assert proc.returncode == 1 and "DatabaseError" in proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("dialect_name", ["postgresql"])  # the server is database-independent
def test_metrics_server(url: str, namespace: str, nsdb: twophase.Database) -> None:
    nsdb.begin_distributed("served", nothing)
    port = free_port()
    env = {**os.environ, "TWOPHASE_URL": url}
    args = ["metrics", "--port", str(port), "--addr", "127.0.0.1", "--interval", "0.2"]
    server = subprocess.Popen(
        [*COMMAND, *args, "--namespace", namespace, "--label", "srv"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        text = ""
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
                break
            except OSError:
                time.sleep(0.1)
        assert text, server.stderr.read() if server.poll() is not None else "no server"
        values = parse_exposition(text)
        assert values[("twophase_prepared_transactions", (("participant", "srv"),))] == 1
    finally:
        server.send_signal(2)  # SIGINT: the command's Ctrl-C
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert f"127.0.0.1:{port}/metrics" in err
    assert out == ""


@pytest.mark.parametrize("dialect_name", ["postgresql"])  # names do not depend on the database
def test_the_guides_name_real_metrics(dialect_name: str, registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    metrics(event(Step.COMMIT, Outcome.COMMITTED))
    with isolated_database(dialect_name) as ob_url, twophase.connect(ob_url) as db:
        with db.transaction() as tx:
            tx.outbox.publish("orders", "x")
        metrics.refresh(db, participant="ob")
    exposed = {
        name
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for name in (family.name, *(s.name for s in family.samples))
    }
    docs = Path(__file__).parent.parent / "docs"
    named = set()
    for page in ("operations.md", "cli.md"):
        named |= set(re.findall(r"\btwophase_[a-z_]+\b", (docs / page).read_text()))
    # Tables the guides name.
    tables = {"twophase_outbox", "twophase_audit_log", "twophase_outcome", "twophase_decision"}
    assert named - tables, "the guides name no metric"
    assert named - tables <= exposed, sorted(named - tables - exposed)
