"""A bounded queue that one daemon thread drains in batches: what the audit writer and
the span maker share.

Callers :meth:`~Backlog.put` items: an append to a deque, no lock, since every step of
every transaction does it and a lock shared by many client threads costs several times the
append once they contend for it. The thread starts with the first item. A caller wakes it
(taking the lock) only when it sleeps on an empty queue; while items keep coming it
gathers them on its own schedule. Its loop calls
:meth:`~Backlog.take` for each batch and :meth:`~Backlog.done` once it is handled. A batch is
gathered for up to ``gather`` seconds after the previous one was taken, unless ``max_batch``
items wait, someone flushes or the backlog closes: handling items as soon as they come would
cost a round trip or a thread switch for every one or two of them under load. Beyond
``max_queue`` waiting items the oldest are dropped and counted.

After ``fork()`` a child starts afresh: the thread did not come along, the lock may have
been held when it forked, and the parent's queued items stay the parent's to handle.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


# An idle thread also looks for items this often, as a safety net: it is woken anyway.
_IDLE_CHECK = 1.0


class Backlog(Generic[T]):
    """Items waiting for the thread ``name`` running ``loop`` (see the module docs)."""

    def __init__(
        self,
        name: str,
        loop: Callable[[], None],
        *,
        gather: float,
        max_batch: int,
        max_queue: int,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.gather = gather
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._loop = loop
        self._on_start = on_start
        #: Items dropped because the queue was full (or left when a close gave up).
        self.dropped = 0
        self.closed = False
        self._items: collections.deque[T] = collections.deque()
        self._reset()
        _EVERY.add(self)

    def _reset(self) -> None:
        self._items.clear()
        self._cond = threading.Condition(threading.Lock())
        # Under the condition's lock: the items handled or dropped, and those taken by the
        # thread and not yet done. Puts count nowhere: what they added is in the deque.
        self._settled = 0
        self._in_flight = 0
        self._flushing = 0  # callers of flush() waiting: the thread does not gather
        self._last_take = -float("inf")
        self._thread: threading.Thread | None = None
        # Set by the thread, under the lock, before it looks at an empty queue and sleeps:
        # a put that then reads it True wakes the thread; one that reads it False appended
        # before the thread looked, so the thread sees its item.
        self._idle = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        """Queue ``item`` for the thread (started on first use)."""
        items = self._items
        items.append(item)  # atomic: deque.append holds the interpreter lock
        n = len(items)
        if self._idle or n >= self.max_batch or n > self.max_queue or self._thread is None:
            self._put_slowly()

    def _put_slowly(self) -> None:
        with self._cond:
            items = self._items
            while len(items) > self.max_queue:
                items.popleft()
                self.dropped += 1
                self._settled += 1
            if self._thread is None:
                if self._on_start is not None:
                    self._on_start()
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            elif self._idle or len(items) >= self.max_batch:
                self._cond.notify_all()

    def take(self) -> list[T] | None:
        """In the thread: the next batch, once gathered; None once closed and empty."""
        with self._cond:
            items = self._items
            self._idle = True
            while not items and not self.closed:
                self._cond.wait(_IDLE_CHECK)
            self._idle = False
            until = self._last_take + self.gather
            while not (self.closed or self._flushing or len(items) >= self.max_batch):
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self.closed and not items:
                return None
            self._last_take = time.monotonic()
            batch = [items.popleft() for _ in range(min(len(items), self.max_batch))]
            self._in_flight += len(batch)
            return batch

    def done(self, count: int) -> None:
        """In the thread: ``count`` items of the batch taken are handled."""
        with self._cond:
            self._settled += count
            self._in_flight -= count
            self._cond.notify_all()

    def drop(self, count: int) -> None:
        """In the thread: ``count`` items of the batch taken could not be handled and are
        given up (counted in ``dropped``)."""
        with self._cond:
            self.dropped += count
            self._settled += count
            self._in_flight -= count
            self._cond.notify_all()

    def put_back(self, batch: list[T]) -> bool:
        """In the thread: return a batch that could not be handled, to the front, for the
        next :meth:`take`. False if the backlog closed meanwhile: then everything waiting
        is counted as dropped (and the thread should end)."""
        with self._cond:
            self._items.extendleft(reversed(batch))
            self._in_flight -= len(batch)
            if not self.closed:
                return True
            lost = len(self._items)
            self.dropped += lost
            self._settled += lost
            self._items.clear()
            self._cond.notify_all()
            return False

    def flush(self, timeout: float) -> bool:
        """Wait until every item put so far is handled (or dropped); False on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            # Items leave in order (taken or dropped from the left), so once this many are
            # settled, every one put before this call is.
            target = self._settled + self._in_flight + len(self._items)
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._settled < target:
                    left = end - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 0.05))
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout: float) -> None:
        """Let the thread end once nothing is waiting, and wait up to ``timeout`` for it."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


_EVERY: weakref.WeakSet[Backlog[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for backlog in list(_EVERY):
        backlog._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
