"""A coordinator process to kill, and the three participants the crash and soak tests share.

Child usage (tests/test_coordinator_crash.py starts it with ``TWOPHASE_CRASH_AT`` set)::

    crash_coordinator.py run SPEC_JSON
    crash_coordinator.py recover SPEC_JSON

``run`` opens the participants, begins one global transaction named ``spec["gid"]`` and
enlists ``spec["enlist"]`` in order: each ``[participant, part]`` inserts the row
``(gid, part)`` into ``spec["table"]`` on that participant. It prints ``STAGED <deadline>``
just before the block ends (the protocol starts there) and ``DONE`` or ``FAILED <error>``
after it. With a crash point armed it never gets that far: it SIGKILLs itself at the step.

``spec["pause_at"]`` (optional) names a protocol step where ``run`` prints ``PAUSED <step>``
and waits for a line on stdin instead of dying, so a test can act while the coordinator is
alive but stalled there (a slow coordinator).

``publish`` sends one outbox message from a fresh process (its first outbox use), in an
ordinary transaction on ``spec["participant"]``, and prints ``PUBLISHED``.

``recover`` runs one ``recover()`` pass and prints the report as JSON. With
``spec["pause_after_resolve"]`` it prints ``RESOLVED`` once the pass has finished the
branches but before it commits its decision-log transaction, and waits there forever (to
be SIGKILLed at exactly that step).

The helpers below read facts straight from the servers (``rawdb``), never through twophase,
so a library bug cannot hide behind the library's own answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

if __package__ in (None, ""):  # run as a script: make ``procs`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import twophase
from procs import rawdb
from twophase import testing

PG_URL = os.environ.get("TWOPHASE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MY_URL = os.environ.get("TWOPHASE_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")


def _sibling_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


PG2_URL = os.environ.get("TWOPHASE_TEST_PG2_URL", _sibling_database(PG_URL, "test2"))

#: The three participants: two PostgreSQL databases and one MariaDB database.
URLS: dict[str, str] = {"orders": PG_URL, "stock": PG2_URL, "billing": MY_URL}

PG_GID_PREFIX = "tp:"
XA_FORMAT_ID = 0x7470
LOG_TABLES = ("twophase_decision", "twophase_audit_log", "twophase_compensation")
OUTCOME_TABLE = "twophase_outcome"


# -- set-up and facts, shared with the soak ----------------------------------------------


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database of ``url`` if it is missing (CI starts from scratch)."""
    name = urlsplit(url).path.lstrip("/")
    admin = _sibling_database(url, "postgres")
    if rawdb.query(admin, "SELECT 1 AS one FROM pg_database WHERE datname = %s", (name,)):
        return
    try:
        rawdb.query(admin, f'CREATE DATABASE "{name}"')
    except Exception:
        # Another process created it at the same moment: fine if it exists now.
        if not rawdb.query(admin, "SELECT 1 AS one FROM pg_database WHERE datname = %s", (name,)):
            raise


def ensure_databases() -> None:
    """Every PostgreSQL participant database exists."""
    for url in URLS.values():
        if rawdb.is_pg(url):
            ensure_database(url)


def prepared_branches(url: str, namespace: str) -> set[tuple[str, str]]:
    """``(global name, branch qualifier)`` of every branch in ``namespace`` prepared now."""
    prefix = f"{namespace}:"
    found = set()
    if rawdb.is_pg(url):
        rows = rawdb.query(
            url,
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() "
            "AND left(gid, %s) = %s",
            (len(PG_GID_PREFIX + prefix), PG_GID_PREFIX + prefix),
        )
        for r in rows:
            full, _, branch = r["gid"][len(PG_GID_PREFIX) :].partition("#")
            found.add((full, branch))
        return found
    for r in rawdb.query(url, "XA RECOVER"):
        if int(r["formatID"]) != XA_FORMAT_ID:
            continue
        data = r["data"]
        raw = data if isinstance(data, bytes) else str(data).encode()
        glen, blen = int(r["gtrid_length"]), int(r["bqual_length"])
        full = raw[:glen].decode("ascii", "replace")
        if full.startswith(prefix):
            found.add((full, raw[glen : glen + blen].decode("ascii", "replace")))
    return found


def rollback_branches(url: str, namespace: str) -> int:
    """Roll back, with the driver, every branch of ``namespace`` still prepared (clean-up of
    this test's own leftovers only); how many."""
    leftovers = prepared_branches(url, namespace)
    for full, branch in leftovers:
        with contextlib.suppress(Exception):
            if rawdb.is_pg(url):
                gid = f"{PG_GID_PREFIX}{full}#{branch}" if branch else PG_GID_PREFIX + full
                rawdb.query(url, "ROLLBACK PREPARED '" + gid.replace("'", "''") + "'")
            else:
                rawdb.query(url, f"XA ROLLBACK %s, %s, {XA_FORMAT_ID}", (full, branch))
    return len(leftovers)


def table_exists(url: str, table: str) -> bool:
    sql = "SELECT 1 AS one FROM information_schema.tables WHERE table_name = %s AND " + (
        "table_catalog = current_database()" if rawdb.is_pg(url) else "table_schema = DATABASE()"
    )
    return bool(rawdb.query(url, sql, (table,)))


def decision_of(url: str, gtrid: str) -> str | None:
    """The decision log's outcome for ``gtrid`` on the log database, or None (no row)."""
    if not table_exists(url, "twophase_decision"):
        return None
    rows = rawdb.query(url, "SELECT outcome FROM twophase_decision WHERE gtrid = %s", (gtrid,))
    return str(rows[0]["outcome"]) if rows else None


def decisions_in(url: str, namespace: str) -> dict[str, str]:
    """Every decision row of ``namespace`` on the log database: gtrid -> outcome."""
    if not table_exists(url, "twophase_decision"):
        return {}
    prefix = f"{namespace}:"
    rows = rawdb.query(
        url,
        "SELECT gtrid, outcome FROM twophase_decision WHERE left(gtrid, %s) = %s",
        (len(prefix), prefix),
    )
    return {str(r["gtrid"]): str(r["outcome"]) for r in rows}


def purge_namespace(url: str, namespace: str) -> None:
    """Delete this run's bookkeeping rows (decisions, audit, outcome records) of
    ``namespace``; only once none of its branches is prepared any more."""
    prefix = f"{namespace}:"
    pg = rawdb.is_pg(url)
    here = "table_catalog = current_database()" if pg else "table_schema = DATABASE()"
    with rawdb.connect(url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT table_name AS t FROM information_schema.tables WHERE {here}")
        tables = {str(r["t"]) for r in cur.fetchall()}
        for table, key in (
            (OUTCOME_TABLE, ("name", "outcome")),
            ("twophase_decision", ("gtrid",)),
            ("twophase_audit_log", ("id",)),
            ("twophase_compensation", ("gtrid", "seq")),
        ):
            if table not in tables:
                continue
            column = "gtrid" if table not in (OUTCOME_TABLE, "twophase_audit_log") else "name"
            match = f"left({column}, %s) = %s"
            if pg:
                cur.execute(f"DELETE FROM {table} WHERE {match}", (len(prefix), prefix))
                continue
            # InnoDB: a DELETE that scans would wait on rows that other sessions' prepared
            # branches hold; read the keys without locking, then delete each by its key.
            cur.execute(
                f"SELECT {', '.join(key)} FROM {table} WHERE {match}", (len(prefix), prefix)
            )
            rows = cur.fetchall()
            if rows:
                where = " AND ".join(f"{c} = %s" for c in key)
                cur.executemany(
                    f"DELETE FROM {table} WHERE {where}", [tuple(r[c] for c in key) for r in rows]
                )


def drop_table(url: str, table: str) -> None:
    """Drop a test table; time out rather than hang behind a leftover lock."""
    with contextlib.suppress(Exception):
        if rawdb.is_pg(url):
            with rawdb.connect(url) as conn, conn.cursor() as cur:
                cur.execute("SET lock_timeout = '10s'")
                cur.execute(f"DROP TABLE IF EXISTS {table}")
        else:
            rawdb.query(
                url, f"SET STATEMENT lock_wait_timeout = 10 FOR DROP TABLE IF EXISTS {table}"
            )


def connect_all(namespace: str, keys: list[str] | None = None) -> dict[str, twophase.Database]:
    """Sync databases for the participants (all three unless ``keys``)."""
    return {
        k: twophase.connect(URLS[k], namespace=namespace, pool_min=0, pool_max=8, audit=True)
        for k in keys or URLS
    }


async def connect_all_async(namespace: str) -> dict[str, twophase.AsyncDatabase]:
    """Async databases for the three participants."""
    return {
        k: await twophase.connect_async(url, namespace=namespace, pool_min=0, pool_max=8)
        for k, url in URLS.items()
    }


# -- the child ---------------------------------------------------------------------------


def say(line: str) -> None:
    # The parent reads these lines; without the flush they would die in the pipe buffer.
    print(line, flush=True)


def _pause_at(point: str | None) -> None:
    if not point:
        return
    reached = testing.reached

    def pausing(step: str) -> None:
        if step == point:
            say(f"PAUSED {step}")
            sys.stdin.readline()
        reached(step)

    testing.reached = pausing  # the coordinator looks the function up at each step


def _row_inserter(table: str, gid: str, part: str) -> Callable[[twophase.Transaction], None]:
    def insert(tx: twophase.Transaction) -> None:
        tx.insert_into(table).values(gid=gid, part=part).execute()

    return insert


def run_sync(spec: dict[str, Any]) -> None:
    dbs = connect_all(spec["ns"])
    coord = twophase.Coordinator(dbs, log=spec["log"], namespace=spec["ns"])
    try:
        with coord.transaction(spec["gid"], timeout=spec["timeout"]) as g:
            for key, part in spec["enlist"]:
                g.enlist(key, _row_inserter(spec["table"], spec["gid"], part))
            say(f"STAGED {g.deadline}")
    except twophase.TwoPhaseError as exc:
        say(f"FAILED {type(exc).__name__}: {exc}")
        return
    say("DONE")


async def run_async(spec: dict[str, Any]) -> None:
    dbs = await connect_all_async(spec["ns"])
    coord = twophase.AsyncCoordinator(dbs, log=spec["log"], namespace=spec["ns"])

    def inserter(part: str) -> Any:
        async def insert(tx: twophase.AsyncTransaction) -> None:
            await tx.insert_into(spec["table"]).values(gid=spec["gid"], part=part).execute()

        return insert

    try:
        async with coord.transaction(spec["gid"], timeout=spec["timeout"]) as g:
            for key, part in spec["enlist"]:
                await g.enlist(key, inserter(part))
            say(f"STAGED {g.deadline}")
    except twophase.TwoPhaseError as exc:
        say(f"FAILED {type(exc).__name__}: {exc}")
        return
    say("DONE")


def recover_once(spec: dict[str, Any]) -> None:
    dbs = connect_all(spec["ns"])
    coord = twophase.Coordinator(dbs, log=spec["log"], namespace=spec["ns"])
    if spec.get("pause_after_resolve"):
        resolve = type(coord)._resolve  # private: the step between branches and log commit

        def resolve_then_stall(self: Any, *args: Any) -> None:
            resolve(self, *args)
            say("RESOLVED")
            while True:
                time.sleep(3600)

        type(coord)._resolve = resolve_then_stall  # type: ignore[method-assign]
    report = coord.recover()
    say(json.dumps(report.as_dict()))


def publish_once(spec: dict[str, Any]) -> None:
    """A fresh process's first outbox message, in an ordinary transaction."""
    db = twophase.connect(URLS[spec["participant"]], namespace=spec["ns"], pool_max=2)
    with db.transaction() as tx:
        tx.outbox.publish(spec["topic"], {"from": "publish_once"})
    say("PUBLISHED")


def main() -> None:
    command, spec_json = sys.argv[1:3]
    spec = json.loads(spec_json)
    if command == "recover":
        recover_once(spec)
        return
    if command == "publish":
        publish_once(spec)
        return
    _pause_at(spec.get("pause_at"))
    if spec.get("mode", "sync") == "async":
        asyncio.run(run_async(spec))
    else:
        run_sync(spec)


if __name__ == "__main__":
    main()
