"""Blocking twins of ``_acompat``, used by the sync code generated from ``_async/``."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg.generators import execute as _pq_execute
from psycopg.pq.abc import PGresult

T = TypeVar("T")

Semaphore = threading.BoundedSemaphore


def sleep(seconds: float) -> None:
    """Sleep the calling thread."""
    time.sleep(seconds)


def to_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` here: in sync code the caller's thread is the right one."""
    return fn()


def acquire(sem: threading.BoundedSemaphore, timeout: float) -> bool:
    """Take a slot of ``sem`` within ``timeout`` seconds; False if none came free."""
    return sem.acquire(timeout=timeout)


MYSQL_DB_KWARG = "database"


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # Shared, so a global transaction does not pay for starting threads.
            _pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="twophase")
        return _pool


def settle(calls: Sequence[Callable[[], T]], limit: int | None = None) -> list[T | BaseException]:
    """Run the calls concurrently (threads, at most ``limit`` at once); each result or
    exception, in order."""
    if len(calls) == 1:
        try:
            return [calls[0]()]
        except Exception as exc:
            return [exc]
    if limit is not None:
        slots = threading.BoundedSemaphore(limit)
        plain = calls

        def bound(call: Callable[[], T]) -> Callable[[], T]:
            def run() -> T:
                with slots:
                    return call()

            return run

        calls = [bound(c) for c in plain]
    # Each call sees the caller's context (principal, correlation id, current span), as
    # asyncio tasks do on the async side.
    futures = [_executor().submit(contextvars.copy_context().run, c) for c in calls]
    out: list[T | BaseException] = []
    for f in futures:
        try:
            out.append(f.result())
        except Exception as exc:
            out.append(exc)
    return out


_MAIN_THREAD = threading.main_thread().ident


def pg_exec(raw: psycopg.Connection[Any], sql: bytes) -> list[PGresult]:
    """Send ``sql`` through libpq's simple-query protocol; the result of each statement
    (outside the main thread: of the last one, or of the one that failed).

    In the main thread through psycopg's wait(), as its own execute does, so Ctrl-C
    cancels the statement on the server. Other threads never see KeyboardInterrupt, so
    there libpq's blocking PQexec does the same job (the GIL released while it waits)
    without psycopg's generator machinery, which costs more than the call itself.
    """
    pgconn = raw.pgconn
    if threading.get_ident() == _MAIN_THREAD:
        pgconn.send_query(sql)
        return raw.wait(_pq_execute(pgconn))
    return [pgconn.exec_(sql)]


def mysql_cursor_class() -> Any:
    """PyMySQL's plain cursor (it reports no warnings)."""
    import pymysql.cursors

    return pymysql.cursors.Cursor


def close_mysql(raw: Any) -> None:
    """Quit a PyMySQL session (it sends COM_QUIT); a dead one is just dropped."""
    with contextlib.suppress(Exception):
        raw.close()
