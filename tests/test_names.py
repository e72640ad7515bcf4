"""Transaction names, as properties: the one rule, enforced before any SQL, on both databases.

(a) Any name that breaks the rule (1-64 bytes of ``A-Za-z0-9_-.:``), and any non-str, raises
    ``InvalidTransactionName`` from every entry point, sync and async, and nothing reaches
    the server. Proof, twice over: a counting wrapper on the driver connections' ``run``
    and the pools' ``connection`` (primary), and the server's own statement log for the
    sessions the databases hold (PostgreSQL: per-session ``log_statement = 'all'`` plus
    ``pg_stat_activity.query_start``; MariaDB: the general log, as a table).
(b) Every valid name round-trips: prepared, listed by ``prepared()`` under exactly that
    name, committed.
(c) Namespaces: ``namespace:name`` over 64 bytes raises ``InvalidTransactionName`` saying to
    shorten one of them; exactly 64 works.

The rule is restated here (VALID) rather than imported, so the library is checked against the
spec, not against itself. Hypothesis runs inside the test body (a ``@given`` inner function)
so that the database fixtures are made once per test, not once per example.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import string
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from procs import rawdb

import twophase
from twophase import InvalidTransactionName, Status
from twophase._async import driver as adriver
from twophase._sync import driver as sdriver

VALID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
ALLOWED = string.ascii_letters + string.digits + "_-.:"

# Hypothesis must not write a .hypothesis/ folder into the shared tree, and the database
# round trips are slow compared with pure checks.
PURE = settings(max_examples=300, deadline=None, database=None)
DB_BACKED = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Characters that break SQL quoting, C strings, logs or byte limits, plus look-alikes of
# allowed characters (fullwidth a, Kelvin sign, Arabic-Indic digit) and a lone surrogate.
NASTY = [
    *"'\"\\\x00 \n\r\t;%$`/,()#*?=@",
    *("é", "\uff41", "\u212a", "\u0663", "\ud800", "\U0001f600"),
]

valid_names = st.from_regex(VALID, fullmatch=True)

invalid_texts = st.one_of(
    st.text(),
    st.text(alphabet=st.characters()),  # includes surrogates, which st.text() leaves out
    st.text(alphabet=st.sampled_from(ALLOWED + "".join(NASTY)), max_size=70),
    st.tuples(st.text(ALLOWED, max_size=40), st.sampled_from(NASTY), st.text(ALLOWED)).map("".join),
    st.text(alphabet=ALLOWED, min_size=65, max_size=300),  # allowed characters, too long
    st.just(""),
).filter(lambda s: not VALID.fullmatch(s))

not_strings = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.binary(),
    valid_names.map(str.encode),  # bytes that would be a valid name as str
    st.lists(st.text(ALLOWED, min_size=1), max_size=3),
    st.tuples(valid_names),
    st.builds(object),
    st.builds(uuid.uuid4),
)

invalid_names = st.one_of(invalid_texts, not_strings)


# -- the "nothing reached the server" instruments ----------------------------------------------

CONN_CLASSES = (sdriver.PgConn, sdriver.MyConn, adriver.AsyncPgConn, adriver.AsyncMyConn)
POOL_CLASSES = (sdriver.PgPool, sdriver.MyPool, adriver.AsyncPgPool, adriver.AsyncMyPool)


@contextlib.contextmanager
def driver_activity() -> Iterator[list[str]]:
    """Record every statement the drivers run and every connection a pool lends."""
    seen: list[str] = []
    patches = []
    for cls in CONN_CLASSES:
        # run() for statements with parameters or rows, command() for twophase's own
        # (BEGIN and the claim, PREPARE, COMMIT PREPARED), copy_in() for bulk loads.
        for method in ("run", "command", "copy_in"):
            orig = cls.__dict__.get(method)
            if orig is None:
                continue
            if asyncio.iscoroutinefunction(orig):

                async def amethod(
                    self: Any, sql: str, *args: Any, _orig: Any = orig, _m: str = method
                ) -> Any:
                    seen.append(f"{_m}: {sql}")
                    return await _orig(self, sql, *args)

                patches.append(mock.patch.object(cls, method, amethod))
            else:

                def smethod(
                    self: Any, sql: str, *args: Any, _orig: Any = orig, _m: str = method
                ) -> Any:
                    seen.append(f"{_m}: {sql}")
                    return _orig(self, sql, *args)

                patches.append(mock.patch.object(cls, method, smethod))
    for pool_cls in POOL_CLASSES:
        # Every statement needs a lent connection; counting loans also catches a pool that
        # would open (and so talk to the server over) a new connection. connection() lends
        # through lend(), so patching lend() sees both.
        orig_lend = pool_cls.lend
        if asyncio.iscoroutinefunction(orig_lend):

            async def alend(self: Any, _orig: Any = orig_lend, _n: str = pool_cls.__name__) -> Any:
                seen.append(f"checkout: {_n}")
                return await _orig(self)

            patches.append(mock.patch.object(pool_cls, "lend", alend))
        else:

            def slend(self: Any, _orig: Any = orig_lend, _n: str = pool_cls.__name__) -> Any:
                seen.append(f"checkout: {_n}")
                return _orig(self)

            patches.append(mock.patch.object(pool_cls, "lend", slend))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield seen


PG_LOG = Path("/var/log/postgresql/postgresql-15-main.log")


class ServerLog:
    """What the server itself saw from given sessions, between start() and statements()."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pg = rawdb.is_pg(url)
        self.sessions: list[int] = []
        self._offset = 0
        self._activity: dict[int, Any] = {}
        self._t0: Any = None
        self._restore: list[str] = []

    def enable(self) -> None:
        if self.pg:
            return  # log_statement is set per session in watch()
        before = rawdb.query(
            self.url, "SELECT @@global.general_log AS on_, @@global.log_output AS output"
        )[0]
        self._restore = [
            f"SET GLOBAL general_log = {int(before['on_'])}",
            f"SET GLOBAL log_output = '{before['output']}'",
        ]
        if not int(before["on_"]):
            # It was off: whatever the table holds afterwards is ours to discard.
            self._restore.append("TRUNCATE TABLE mysql.general_log")
        rawdb.query(self.url, "SET GLOBAL log_output = 'TABLE'")
        rawdb.query(self.url, "SET GLOBAL general_log = 1")

    def disable(self) -> None:
        for stmt in self._restore:
            rawdb.query(self.url, stmt)

    def watch(self, sessions: list[int]) -> None:
        """Start watching these session ids (PostgreSQL backend pids / MariaDB thread ids)."""
        self.sessions = sessions
        if self.pg:
            self._offset = PG_LOG.stat().st_size if PG_LOG.exists() else 0
            self._activity = self._query_starts()
        else:
            self._t0 = rawdb.query(self.url, "SELECT NOW(6) AS t")[0]["t"]

    def _query_starts(self) -> dict[int, Any]:
        rows = rawdb.query(
            self.url,
            "SELECT pid, query_start FROM pg_stat_activity WHERE pid = ANY(%s)",
            (self.sessions,),
        )
        return {r["pid"]: r["query_start"] for r in rows}

    def statements(self) -> list[str]:
        """Statements the watched sessions sent since watch()."""
        if not self.pg:
            rows = rawdb.query(
                self.url,
                "SELECT command_type, CONVERT(argument USING utf8mb4) AS arg "
                "FROM mysql.general_log WHERE thread_id IN %s AND event_time >= %s",
                (tuple(self.sessions), self._t0),
            )
            return [f"{r['command_type']}: {r['arg']}" for r in rows]
        found = []
        now = self._query_starts()
        for pid in self.sessions:
            if pid not in now:
                found.append(f"session {pid} is gone (its connection was replaced)")
            elif now[pid] != self._activity[pid]:
                found.append(f"session {pid} started a query at {now[pid]}")
        if PG_LOG.exists():
            with PG_LOG.open("rb") as f:
                f.seek(self._offset)
                text = f.read().decode("utf-8", "replace")
            marks = tuple(f"[{pid}] " for pid in self.sessions)
            found += [line for line in text.splitlines() if any(m in line for m in marks)]
        return found


@pytest.fixture
def server_log(url: str) -> Iterator[ServerLog]:
    log = ServerLog(url)
    log.enable()
    try:
        yield log
    finally:
        log.disable()


def _session_sql(url: str) -> str:
    return "SELECT pg_backend_pid() AS sid" if rawdb.is_pg(url) else "SELECT CONNECTION_ID() AS sid"


# -- (a) invalid names ---------------------------------------------------------------------


def _never(tx: Any) -> None:
    raise AssertionError("fn ran for an invalid name")


async def _anever(tx: Any) -> None:
    raise AssertionError("fn ran for an invalid name")


def _sync_entry_points(db: twophase.Database) -> dict[str, Callable[[Any], Any]]:
    def distributed(name: Any) -> None:
        with db.distributed(name):
            raise AssertionError("the distributed() block ran for an invalid name")

    return {
        "begin_distributed": lambda n: db.begin_distributed(n, _never),
        "distributed": distributed,
        "commit_distributed": db.commit_distributed,
        "rollback_distributed": db.rollback_distributed,
        "status": db.status,
    }


def _async_entry_points(adb: twophase.AsyncDatabase) -> dict[str, Callable[[Any], Any]]:
    async def distributed(name: Any) -> None:
        async with adb.distributed(name):
            raise AssertionError("the distributed() block ran for an invalid name")

    return {
        "begin_distributed": lambda n: adb.begin_distributed(n, _anever),
        "distributed": distributed,
        "commit_distributed": adb.commit_distributed,
        "rollback_distributed": adb.rollback_distributed,
        "status": adb.status,
    }


def test_invalid_names_are_refused_before_any_sql(url: str, server_log: ServerLog) -> None:
    loop = asyncio.new_event_loop()
    # One connection each, so the server-side check knows exactly which sessions to watch.
    db = twophase.connect(url, pool_min=1, pool_max=1)
    adb = loop.run_until_complete(twophase.connect_async(url, pool_min=1, pool_max=1))
    try:
        if rawdb.is_pg(url):
            # Superuser, session-level: this session's statements go to the server log.
            db.execute("SET log_statement = 'all'")
            loop.run_until_complete(adb.execute("SET log_statement = 'all'"))
        # Also creates the outcome table first, so later work on these sessions is only ours.
        db.status("warm-up")
        loop.run_until_complete(adb.status("warm-up"))
        sessions = [
            db.execute(_session_sql(url))[0]["sid"],
            loop.run_until_complete(adb.execute(_session_sql(url)))[0]["sid"],
        ]
        server_log.watch(sessions)
        sync_calls = _sync_entry_points(db)
        async_calls = _async_entry_points(adb)

        with driver_activity() as seen:

            @PURE
            @given(name=invalid_names)
            @example(name="")
            @example(name="a" * 65)
            @example(name="é" * 32)  # 32 characters, 64 bytes, all outside the rule
            @example(name="abc\n")  # a trailing newline slips past re.match(...$)
            @example(name="x'; DROP TABLE twophase_outcome; --")
            @example(name="a\\b")
            @example(name="a\x00b")
            @example(name="\ud800")
            @example(name="\u212a")  # Kelvin sign: 'k' under case-folding
            @example(name=b"order_42")
            @example(name=None)
            @example(name=42)
            def check(name: Any) -> None:
                for what, call in sync_calls.items():
                    with pytest.raises(InvalidTransactionName):
                        call(name)
                    assert seen == [], f"{what}({name!r}) reached the driver: {seen}"
                for what, acall in async_calls.items():
                    with pytest.raises(InvalidTransactionName):
                        loop.run_until_complete(acall(name))
                    assert seen == [], f"async {what}({name!r}) reached the driver: {seen}"

            check()

            assert server_log.statements() == []

            # Control: the same instruments do see a valid call, so silence above is real.
            assert db.status("valid-control") is Status.UNKNOWN
            assert loop.run_until_complete(adb.status("valid-control")) is Status.UNKNOWN
            assert any(s.startswith("run:") for s in seen)
            assert any(s.startswith("checkout:") for s in seen)
            # ... and a distributed one, whose claim and PREPARE go by command() on
            # PostgreSQL (by run() on MariaDB).
            control = f"valid-control-{uuid.uuid4().hex[:8]}"
            db.begin_distributed(control, lambda tx: None)
            db.rollback_distributed(control)
            assert any(control in s for s in seen), seen
        logged = rawdb.poll(server_log.statements, timeout=5, what="the control in the log")
        assert any("valid-control" in s for s in logged), logged
    finally:
        db.close()
        loop.run_until_complete(adb.close())
        loop.close()


# -- (b) valid names round-trip -----------------------------------------------------------------


def _forget(url: str, db: twophase.Database, full_name: str) -> None:
    """Make ``full_name`` unused again: hypothesis repeats names within a run and across runs,
    and a committed name is single-use by design."""
    if full_name in rawdb.prepared_names(url):
        db.rollback_distributed(full_name)
    rawdb.query(url, "DELETE FROM twophase_outcome WHERE name = %s", (full_name,))


# conftest's table fixture rolls back prepared "t_*" names of every process at teardown;
# a concurrent test run would otherwise roll back an example mid-flight.
roundtrip_names = valid_names.filter(lambda n: not n.startswith("t_"))


def test_every_valid_name_round_trips(url: str, db: twophase.Database, table: str) -> None:
    ids = itertools.count(1)

    @DB_BACKED
    @given(name=roundtrip_names)
    @example(name="a")
    @example(name="Z" * 64)
    @example(name="-.:_")
    @example(name="tp:x")  # looks like a PostgreSQL gid prefix
    @example(name="0123456789" * 6 + "-.:_")
    def roundtrip(name: str) -> None:
        _forget(url, db, name)
        row = next(ids)
        assert db.status(name) is Status.UNKNOWN

        db.begin_distributed(
            name, lambda tx: tx.insert_into(table).values(id=row, status=name[:32]).execute()
        )
        try:
            assert db.status(name) is Status.PREPARED
            assert name in rawdb.prepared_names(url)  # gid tp:<name> / XA gtrid <name>, exactly
            listed = [p for p in db.prepared() if p.full_name == name]
            assert len(listed) == 1 and listed[0].name == name

            db.commit_distributed(name)
        finally:
            # A failing example must not leave locks that would hang the table's DROP.
            rawdb.rollback_if_prepared(url, name)
        assert db.status(name) is Status.COMMITTED
        assert rawdb.query(url, f"SELECT status FROM {table} WHERE id = %s", (row,)) == [
            {"status": name[:32]}
        ]

    roundtrip()


# -- (c) namespaces ----------------------------------------------------------------------------

namespaces = st.from_regex(r"[A-Za-z0-9_.:\-]{1,62}", fullmatch=True).filter(
    lambda ns: not ns.startswith("t_")
)


@st.composite
def overflowing(draw: st.DrawFn) -> tuple[str, str]:
    """A valid namespace and a valid name whose ``ns:name`` is longer than 64 bytes."""
    ns = draw(namespaces)
    shortest = 64 - len(ns)  # one more than fits after "ns:"
    name = draw(st.text(ALLOWED, min_size=shortest, max_size=64))
    return ns, name


def test_namespace_plus_name_over_64_bytes_is_refused(url: str) -> None:
    @settings(max_examples=40, deadline=None, database=None)
    @given(pair=overflowing())
    @example(pair=("a" * 62, "bc"))
    @example(pair=("ns", "x" * 62))
    @example(pair=("a", "b" * 63))
    def check(pair: tuple[str, str]) -> None:
        ns, name = pair
        assert len(f"{ns}:{name}") > 64
        with (
            twophase.connect(url, namespace=ns, pool_min=0, pool_max=1) as db,
            driver_activity() as seen,
        ):
            for what, call in _sync_entry_points(db).items():
                with pytest.raises(InvalidTransactionName) as info:
                    call(name)
                message = str(info.value)
                # The message names the fix, and which two parts to shorten.
                assert "shorten" in message, message
                assert repr(ns) in message and "namespace" in message, message
                assert seen == [], f"{what} reached the driver: {seen}"

    check()


@pytest.mark.parametrize(
    "namespace",
    ["x" * 63, "x" * 64, "x" * 200, "", "bad ns", "ns'", "é", 7, b"ns"],
)
def test_bad_namespace_is_refused_before_connecting(namespace: Any) -> None:
    # Port 1 has no server: the refusal must come before any attempt to connect.
    with pytest.raises(InvalidTransactionName) as info:
        twophase.connect("postgresql://postgres@127.0.0.1:1/none", namespace=namespace)
    if namespace in ("x" * 63, "x" * 64):
        # A valid name on its own, but it leaves no room for ":name".
        assert "shorter namespace" in str(info.value)

    async def connect_async() -> None:
        await twophase.connect_async("mysql://root@127.0.0.1:1/none", namespace=namespace)

    with pytest.raises(InvalidTransactionName):
        asyncio.run(connect_async())


def test_namespaced_names_round_trip_up_to_64_bytes(url: str, table: str) -> None:
    ids = itertools.count(1)

    @settings(max_examples=10, deadline=None, database=None)
    @given(ns=namespaces, data=st.data())
    @example(ns="a" * 62, data=None)  # leaves room for a 1-byte name
    def roundtrip(ns: str, data: st.DataObject | None) -> None:
        longest = 64 - len(ns) - 1
        # Mostly the boundary itself: the qualified name is then exactly 64 bytes.
        size = longest if data is None else data.draw(st.sampled_from([longest, 1]))
        name = (uuid.uuid4().hex * 2)[:size]
        full = f"{ns}:{name}"
        row = next(ids)
        with twophase.connect(url, namespace=ns, pool_max=2) as db:
            _forget(url, db, full)
            db.begin_distributed(name, lambda tx: tx.insert_into(table).values(id=row).execute())
            try:
                assert full in rawdb.prepared_names(url)
                listed = [p for p in db.prepared() if p.full_name == full]
                assert len(listed) == 1 and listed[0].name == name
                assert db.status(name) is Status.PREPARED
                db.commit_distributed(name)
            finally:
                rawdb.rollback_if_prepared(url, full)
            assert db.status(name) is Status.COMMITTED
        assert rawdb.query(url, f"SELECT id FROM {table} WHERE id = %s", (row,)) == [{"id": row}]

    roundtrip()
