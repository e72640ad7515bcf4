# WARNING: generated from twophase/_async/driver.py by tools/async_to_sync.py.
# Edit the async source and run `python tools/async_to_sync.py`; CI checks they agree.
"""Connections and pools over the drivers: psycopg 3 for PostgreSQL, PyMySQL-family for MariaDB."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
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

    def in_failed_transaction(self) -> bool:
        """Whether an earlier error aborted the open transaction (PostgreSQL only)."""
        return False

    def discard(self) -> None:
        """Close this connection instead of returning it to the pool."""
        self.discarded = True


class PgConn(Conn):
    """A psycopg connection."""

    def __init__(self, raw: psycopg.Connection[dict[str, Any]]) -> None:
        self.raw = raw

    def in_failed_transaction(self) -> bool:
        """libpq's view of the session: INERROR after a failed statement."""
        # pgconn directly: .info builds a new ConnectionInfo on every access.
        return self.raw.pgconn.transaction_status == psycopg.pq.TransactionStatus.INERROR

    def run(self, sql: str, params: Params = None) -> Rows:
        """Execute through a cursor; without params psycopg uses the simple protocol."""
        try:
            with self.raw.cursor() as cur:
                cur.execute(sql, params)
                if cur.description is None:
                    # BEGIN, PREPARE, COMMIT PREPARED, DML: nothing to fetch.
                    return Rows((), rowcount=cur.rowcount)
                return Rows(cur.fetchall(), rowcount=cur.rowcount)
        except psycopg.Error:
            if self.raw.broken or self.raw.closed:
                self.broken = True
            raise


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

    def connection(self) -> Any:
        """An async context manager lending one connection."""
        raise NotImplementedError

    def reset_idle(self) -> None:
        """Forget idle connections (after a connection loss they are likely dead too)."""
        raise NotImplementedError

    def close(self) -> None:
        """Close every connection."""
        raise NotImplementedError


class PgPool(Pool):
    """psycopg_pool's pool, with autocommit dict-row connections."""

    def __init__(self, conninfo: str, *, min_size: int, max_size: int, timeout: float) -> None:
        self._conninfo = conninfo
        self._timeout = timeout
        self._pool: ConnectionPool[Any] = ConnectionPool(
            conninfo,
            kwargs={"autocommit": True, "row_factory": dict_row},
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            name="twophase",
        )

    def open(self) -> None:
        """Probe with one direct connection so a bad URL fails with the server's message."""
        probe = psycopg.Connection.connect(
            self._conninfo, connect_timeout=max(1, int(self._timeout))
        )
        probe.close()
        self._pool.open(wait=True, timeout=self._timeout)

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        """Lend a connection; one marked broken or discarded is closed, not reused."""
        # getconn/putconn rather than pool.connection(): that one also runs the connection's
        # own context exit (a commit path) on every return, pointless in autocommit mode.
        # putconn still rolls back a connection left in a transaction and replaces broken ones.
        raw = self._pool.getconn()
        conn = PgConn(raw)
        try:
            yield conn
        finally:
            if conn.discarded and not raw.closed:
                raw.close()
            self._pool.putconn(raw)

    def reset_idle(self) -> None:
        """Let psycopg_pool test its idle connections and replace the dead ones."""
        self._pool.check()

    def close(self) -> None:
        """Close the pool."""
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

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        """Lend an idle connection or a new one, within ``max_size``."""
        if self._closed:
            raise DatabaseError("the database was closed; connect again")
        if not _compat.acquire(self._slots, self._timeout):
            raise DatabaseError(
                f"no MariaDB connection came free within {self._timeout} s; "
                "raise pool_max or shorten transactions"
            )
        conn: MyConn | None = None
        try:
            conn = self._idle.pop() if self._idle else self._connect()
            yield conn
        finally:
            if conn is not None:
                if conn.broken or conn.discarded or self._closed:
                    conn.close()
                else:
                    self._idle.append(conn)
            self._slots.release()

    def reset_idle(self) -> None:
        """Close every idle connection."""
        while self._idle:
            self._idle.pop().close()

    def close(self) -> None:
        """Close idle connections; lent ones close when returned."""
        self._closed = True
        self.reset_idle()
