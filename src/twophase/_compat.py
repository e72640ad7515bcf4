"""Blocking twins of ``_acompat``, used by the sync code generated from ``_async/``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

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
