# WARNING: generated from twophase/_async/driver.py by tools/async_to_sync.py.
# Edit the async source and run `python tools/async_to_sync.py`; CI checks they agree.
"""Connections and pools over the drivers: psycopg 3 for PostgreSQL, PyMySQL-family for MariaDB."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

import psycopg
from psycopg.errors import error_from_result
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from .. import _compat
from ..errors import DatabaseError
from ..sql import Rows

Params = tuple[Any, ...] | list[Any] | dict[str, Any] | None

_MYSQL_CURSOR: Any = None  # made on first use: the MySQL driver is an optional extra


class Conn:
    """One checked-out connection, in autocommit mode; twophase issues BEGIN itself."""

    #: Set when the link to the server is lost; the pool then drops the connection.
    broken: bool = False
    #: Set when the session must not be reused (e.g. it holds an XA branch).
    discarded: bool = False

    def run(self, sql: str, params: Params = None) -> Rows:
        """Execute one statement (or, without params, several) and fetch its rows."""
        raise NotImplementedError

    def command(self, sql: str) -> None:
        """Execute twophase's own statements that take no parameters and return no rows
        (BEGIN, a claim, PREPARE, COMMIT PREPARED, ROLLBACK): ASCII text, one or several."""
        self.run(sql)

    def copy_in(self, sql: str, data: Iterable[bytes]) -> None:
        """Bulk-load with ``COPY ... FROM STDIN``, ``data`` being chunks of the COPY's own
        format (PostgreSQL only)."""
        raise NotImplementedError

    def in_failed_transaction(self) -> bool:
        """Whether an earlier error aborted the open transaction (PostgreSQL only)."""
        return False

    def discard(self) -> None:
        """Close this connection instead of returning it to the pool."""
        self.discarded = True


_CONN_OK = psycopg.pq.ConnStatus.OK
_FATAL_ERROR = psycopg.pq.ExecStatus.FATAL_ERROR
_IDLE = psycopg.pq.TransactionStatus.IDLE
_INERROR = psycopg.pq.TransactionStatus.INERROR

# A connection given back is kept by twophase for the next loan rather than returned to
# psycopg_pool, whose getconn/putconn pair (its locks, statistics, logging and checks)
# costs about as much as a statement. It goes back to psycopg_pool, which then applies its
# max_lifetime, checks and FIFO order, once it has cycled outside it for _KEEP_FOR seconds,
# when it sat unused for _KEEP_IDLE seconds, or when someone waits for psycopg_pool.
_KEEP_FOR = 30.0
_KEEP_IDLE = 1.0


class _PgRaw(psycopg.Connection[dict[str, Any]]):
    """psycopg's connection, remembering the wrapper that lends it.

    The wrapper (and the cursor it keeps) then lives as long as the pooled connection,
    instead of being made again on every checkout.
    """

    wrapper: PgConn | None = None


class PgConn(Conn):
    """A psycopg connection."""

    #: Until when (time.monotonic()) PgPool may keep it out of psycopg_pool.
    keep_until = 0.0

    def __init__(self, raw: _PgRaw) -> None:
        self.raw = raw
        # One cursor for the statements that return no rows: making a cursor each time
        # costs a good third of psycopg's execute path. One that read rows is closed at
        # once, so no result set stays in memory while the connection idles in the pool.
        self._cursor: psycopg.Cursor[dict[str, Any]] | None = None

    def in_failed_transaction(self) -> bool:
        """libpq's view of the session: INERROR after a failed statement."""
        # pgconn directly: .info builds a new ConnectionInfo on every access.
        return self.raw.pgconn.transaction_status == _INERROR

    def run(self, sql: str, params: Params = None) -> Rows:
        """Execute through a cursor; without params psycopg uses the simple protocol."""
        cur = self._cursor
        if cur is None:
            cur = self._cursor = self.raw.cursor()
        try:
            cur.execute(sql, params)
            if cur.description is None:
                # DML and the like: nothing to fetch.
                return Rows((), rowcount=cur.rowcount)
            self._cursor = None
            try:
                return Rows(cur.fetchall(), rowcount=cur.rowcount)
            finally:
                cur.close()
        except psycopg.Error:
            self._cursor = None
            self._check_link()
            raise

    def command(self, sql: str) -> None:
        """Straight through libpq's simple-query protocol.

        These statements need nothing of psycopg's cursor (parameter adaptation, the
        prepared-statement cache, row making), and each text is sent once: a gid is part
        of it. Errors are raised as psycopg would raise them (same classes, same fields).
        """
        raw = self.raw
        pgconn = raw.pgconn
        try:
            if pgconn.status != _CONN_OK:
                raise psycopg.OperationalError("the connection is closed")
            results = _compat.pg_exec(raw, sql.encode("ascii"))
            for result in results:
                if result.status != _FATAL_ERROR:
                    continue
                if pgconn.status != _CONN_OK:
                    # libpq reports a lost link as a result without SQLSTATE; psycopg's
                    # own execute raises OperationalError for it, and so do we.
                    message = result.error_message.decode(errors="replace").strip()
                    raise psycopg.OperationalError(message or "the connection was lost")
                raise error_from_result(result, encoding=raw.info.encoding)
        except psycopg.Error:
            self._check_link()
            raise

    def copy_in(self, sql: str, data: Iterable[bytes]) -> None:
        """One COPY statement, sending the chunks as they come."""
        try:
            with self.raw.cursor() as cur, cur.copy(sql) as copy:
                for chunk in data:
                    copy.write(chunk)
        except psycopg.Error:
            self._check_link()
            raise

    def _check_link(self) -> None:
        if self.raw.broken or self.raw.closed:
            self.broken = True


class MyConn(Conn):
    """A MariaDB/MySQL connection (pymysql when async, PyMySQL when sync)."""

    def __init__(self, raw: Any) -> None:
        global _MYSQL_CURSOR
        self.raw = raw
        if _MYSQL_CURSOR is None:
            _MYSQL_CURSOR = _compat.mysql_cursor_class()

    def run(self, sql: str, params: Params = None) -> Rows:
        """Execute through a cursor and build dict rows from the description."""
        import pymysql

        try:
            with self.raw.cursor(_MYSQL_CURSOR) as cur:
                cur.execute(sql, _utc_params(params))
                desc = cur.description
                fetched = cur.fetchall() if desc else ()
                cols = [d[0] for d in desc] if desc else []
                return Rows(
                    (dict(zip(cols, row, strict=True)) for row in fetched),
                    rowcount=max(cur.rowcount, 0),
                )
        except pymysql.InterfaceError:
            self.broken = True
            raise
        except pymysql.OperationalError as exc:
            if exc.args and exc.args[0] in (1053, 1927, 2003, 2006, 2013, 2055, 4031):
                self.broken = True
            raise

    def close(self) -> None:
        """End the session (COM_QUIT, awaited), so a prepared XA branch it held is free
        for other sessions to finish by the time this returns."""
        _compat.close_mysql(self.raw)


def _utc_params(params: Params) -> Params:
    """Aware datetimes as naive UTC: the MySQL drivers drop tzinfo, and sessions run in UTC."""

    def conv(v: Any) -> Any:
        if isinstance(v, datetime) and v.tzinfo is not None:
            return v.astimezone(UTC).replace(tzinfo=None)
        return v

    if isinstance(params, dict):
        return {k: conv(v) for k, v in params.items()}
    if isinstance(params, tuple | list):
        return tuple(conv(v) for v in params)
    return params


class Pool:
    """A pool of connections to one database."""

    def open(self) -> None:
        """Connect, failing fast with the server's own error if it cannot be reached."""
        raise NotImplementedError

    def lend(self) -> Conn:
        """Check a connection out; hand it back with :meth:`give_back`, whatever happens."""
        raise NotImplementedError

    def give_back(self, conn: Conn) -> None:
        """Return a lent connection; one marked broken or discarded is closed, not reused."""
        raise NotImplementedError

    def connection(self) -> Lending:
        """Lend a connection for the block: ``async with pool.connection() as conn``."""
        return Lending(self)

    def reset_idle(self) -> None:
        """Forget idle connections (after a connection loss they are likely dead too)."""
        raise NotImplementedError

    def close(self) -> None:
        """Close every connection."""
        raise NotImplementedError


class Lending:
    """One loan of a pooled connection, as an async context manager.

    A class rather than a generator: it is on every transaction's path. Entering it lends
    a connection; entering it again keeps that one, so a caller can lend early and hand
    the loan to a block or an exit stack later. Leaving it gives the connection back.
    """

    __slots__ = ("_pool", "conn")

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.conn: Conn | None = None

    def __enter__(self) -> Conn:
        if self.conn is None:
            self.conn = self._pool.lend()
        return self.conn

    def __exit__(self, *exc: object) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            self._pool.give_back(conn)


class PgPool(Pool):
    """psycopg_pool's pool, with autocommit dict-row connections."""

    def __init__(self, conninfo: str, *, min_size: int, max_size: int, timeout: float) -> None:
        self._conninfo = conninfo
        self._timeout = timeout
        self._pool: ConnectionPool[_PgRaw] = ConnectionPool(
            conninfo,
            connection_class=_PgRaw,
            kwargs={"autocommit": True, "row_factory": dict_row},
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            name="twophase",
        )
        #: Connections given back and kept for the next loan (see _KEEP_FOR), with when
        #: each was given back; the most recent last.
        self._kept: list[tuple[_PgRaw, float]] = []
        # Held for a few instructions and never across an await, so it serves the async
        # side (where it is never contended) and the threads of the sync side alike.
        self._kept_lock = threading.Lock()
        self._borrowing = 0  # callers inside psycopg_pool's getconn()
        self._closed = False

    def open(self) -> None:
        """Probe with one direct connection so a bad URL fails with the server's message."""
        probe = psycopg.Connection.connect(
            self._conninfo, connect_timeout=max(1, int(self._timeout))
        )
        probe.close()
        self._pool.open(wait=True, timeout=self._timeout)

    # getconn/putconn rather than pool.connection(): that one also runs the connection's
    # own context exit (a commit path) on every return, pointless in autocommit mode.
    # putconn still rolls back a connection left in a transaction and replaces broken ones.
    def lend(self) -> Conn:
        """The connection given back last, if it is still fresh; else one of psycopg_pool."""
        now = time.monotonic()
        stale: list[_PgRaw] = []
        with self._kept_lock:
            if self._kept:
                raw, given = self._kept.pop()
                if now - given <= _KEEP_IDLE:
                    kept = raw.wrapper
                    assert kept is not None  # set when it was first lent
                    return kept
                # The most recent is stale, so are the older ones: all go back.
                stale = [raw, *(r for r, _ in self._kept)]
                self._kept.clear()
            self._borrowing += 1
        try:
            for raw in stale:
                self._pool.putconn(raw)
            raw = self._pool.getconn()
        finally:
            with self._kept_lock:
                self._borrowing -= 1
        conn = raw.wrapper
        if conn is None:
            conn = raw.wrapper = PgConn(raw)
        conn.keep_until = now + _KEEP_FOR
        return conn

    def give_back(self, conn: Conn) -> None:
        """Keep it for the next loan, or return it to psycopg_pool: closed first if it was
        discarded; psycopg_pool rolls back one left in a transaction, replaces broken ones."""
        pg = cast(PgConn, conn)
        raw = pg.raw
        if conn.discarded:
            if not raw.closed:
                raw.close()
        elif raw.pgconn.transaction_status == _IDLE and not conn.broken:
            now = time.monotonic()
            if now < pg.keep_until:
                with self._kept_lock:
                    if not self._borrowing and not self._closed:
                        self._kept.append((raw, now))
                        return
        self._pool.putconn(raw)

    def _return_kept(self) -> None:
        with self._kept_lock:
            kept = [raw for raw, _ in self._kept]
            self._kept.clear()
        for raw in kept:
            self._pool.putconn(raw)

    def reset_idle(self) -> None:
        """Let psycopg_pool test its idle connections (the kept ones too) and replace the
        dead ones."""
        self._return_kept()
        self._pool.check()

    def close(self) -> None:
        """Close the pool."""
        self._closed = True
        self._return_kept()
        self._pool.close()


class MyPool(Pool):
    """A small LIFO pool for MariaDB.

    Hand-written because PyMySQL has no pool, and the sync and async sides must behave alike;
    it only caps concurrent connections and reuses idle ones.
    """

    def __init__(
        self, params: dict[str, Any], *, min_size: int, max_size: int, timeout: float
    ) -> None:
        self._params = {
            **params,
            _compat.MYSQL_DB_KWARG: params.get("database"),
            "autocommit": True,
            "charset": "utf8mb4",
            "connect_timeout": max(1, int(timeout)),
            # Naive TIMESTAMP values then read as UTC.
            "init_command": "SET time_zone = '+00:00'",
        }
        if _compat.MYSQL_DB_KWARG != "database":
            self._params.pop("database", None)
        self._min_size = min_size
        self._timeout = timeout
        self._slots = _compat.Semaphore(max_size)
        self._idle: collections.deque[MyConn] = collections.deque()
        self._closed = False

    def _connect(self) -> MyConn:
        import pymysql

        return MyConn(pymysql.connect(**self._params))

    def open(self) -> None:
        """Open ``min_size`` connections (at least one, to check the server is there)."""
        for _ in range(max(1, self._min_size)):
            self._idle.append(self._connect())

    def lend(self) -> Conn:
        """Lend an idle connection or a new one, within ``max_size``."""
        if self._closed:
            raise DatabaseError("the database was closed; connect again")
        if not _compat.acquire(self._slots, self._timeout):
            raise DatabaseError(
                f"no MariaDB connection came free within {self._timeout} s; "
                "raise pool_max or shorten transactions"
            )
        try:
            return self._idle.pop() if self._idle else self._connect()
        except BaseException:
            self._slots.release()
            raise

    def give_back(self, conn: Conn) -> None:
        """Keep it for reuse, or close it if broken, discarded or the pool is closed."""
        my = cast(MyConn, conn)
        try:
            if my.broken or my.discarded or self._closed:
                my.close()
            else:
                self._idle.append(my)
        finally:
            self._slots.release()

    def reset_idle(self) -> None:
        """Close every idle connection."""
        while self._idle:
            self._idle.pop().close()

    def close(self) -> None:
        """Close idle connections; lent ones close when returned."""
        self._closed = True
        self.reset_idle()
