"""Async twins of ``_compat``: the async source calls these, the generated sync code those."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.generators import execute as _pq_execute
from psycopg.pq.abc import PGresult

T = TypeVar("T")

AsyncSemaphore = asyncio.BoundedSemaphore


async def sleep(seconds: float) -> None:
    """Sleep without blocking the event loop."""
    await asyncio.sleep(seconds)


async def to_thread(fn: Callable[[], T]) -> T:
    """Run blocking work (process start-up, file locks) off the event loop."""
    return await asyncio.to_thread(fn)


async def acquire(sem: asyncio.BoundedSemaphore, timeout: float) -> bool:
    """Take a slot of ``sem`` within ``timeout`` seconds; False if none came free."""
    try:
        async with asyncio.timeout(timeout):
            await sem.acquire()
    except TimeoutError:
        return False
    return True


MYSQL_DB_KWARG = "db"  # aiomysql names the schema argument "db", PyMySQL "database"


async def settle(
    calls: Sequence[Callable[[], Awaitable[T]]], limit: int | None = None
) -> list[T | BaseException]:
    """Run the calls concurrently (at most ``limit`` at once); each result or exception.

    Unlike plain gather, no call is abandoned when another fails: two-phase commit needs
    the outcome of every branch. With a limit, a new call starts as soon as any finishes.
    """
    if len(calls) == 1:
        try:
            return [await calls[0]()]
        except Exception as exc:
            return [exc]
    if limit is None:
        return list(await asyncio.gather(*(c() for c in calls), return_exceptions=True))
    slots = asyncio.Semaphore(limit)

    async def bounded(call: Callable[[], Awaitable[T]]) -> T:
        async with slots:
            return await call()

    return list(await asyncio.gather(*(bounded(c) for c in calls), return_exceptions=True))


async def pg_exec(raw: psycopg.AsyncConnection[Any], sql: bytes) -> list[PGresult]:
    """Send ``sql`` through libpq's simple-query protocol; the result of each statement.

    Through psycopg's wait(), as its own execute does: on cancellation it cancels the
    statement on the server too.
    """
    pgconn = raw.pgconn
    pgconn.send_query(sql)
    return await raw.wait(_pq_execute(pgconn))


def mysql_cursor_class() -> Any:
    """aiomysql's cursor without its SHOW WARNINGS round trip after every noted statement.

    aiomysql turns each server note into a Python warning (PyMySQL stopped doing so), so
    ``INSERT IGNORE`` of a duplicate would warn on the async side only.
    """
    import aiomysql

    class QuietCursor(aiomysql.Cursor):  # type: ignore[misc]
        async def _show_warnings(self, conn: Any) -> None:
            return None

    return QuietCursor


async def close_mysql(raw: Any) -> None:
    """Quit an aiomysql session politely; a dead one is just dropped."""
    try:
        await raw.ensure_closed()
    except Exception:
        raw.close()
