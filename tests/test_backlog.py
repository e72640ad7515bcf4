"""The queue under the audit writer and the span maker: no item lost, doubled or reordered
when many threads put at once, flush() waits for exactly what came before it, and a full
queue drops the oldest and counts them."""

from __future__ import annotations

import threading
import time

from twophase.observe._backlog import Backlog


class Consumer:
    """A loop that handles batches slowly, recording what it saw."""

    def __init__(self, *, delay: float = 0.0, gather: float = 0.01, **kw: int) -> None:
        self.seen: list[int] = []
        self.delay = delay
        self.backlog: Backlog[int] = Backlog(
            "test-backlog",
            self.run,
            gather=gather,
            max_batch=kw.get("max_batch", 100),
            max_queue=kw.get("max_queue", 1_000_000),
        )

    def run(self) -> None:
        while (batch := self.backlog.take()) is not None:
            time.sleep(self.delay)
            self.seen.extend(batch)
            self.backlog.done(len(batch))


def test_concurrent_puts_are_all_handled_once_in_each_threads_order() -> None:
    c = Consumer()
    per_thread, threads = 5_000, 8

    def put(k: int) -> None:
        for i in range(per_thread):
            c.backlog.put(k * per_thread + i)

    workers = [threading.Thread(target=put, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert c.backlog.flush(timeout=10)
    assert sorted(c.seen) == list(range(per_thread * threads))
    for k in range(threads):
        mine = [x for x in c.seen if x // per_thread == k]
        assert mine == sorted(mine)
    assert c.backlog.dropped == 0
    c.backlog.close(timeout=5)


def test_flush_waits_for_items_in_flight() -> None:
    c = Consumer(delay=0.2)
    c.backlog.put(1)
    time.sleep(0.05)  # taken by now, handled only after 0.2 s
    c.backlog.put(2)
    assert c.backlog.flush(timeout=5)
    assert c.seen == [1, 2]
    c.backlog.put(3)
    assert c.backlog.flush(timeout=0.01) is False  # still in flight
    assert c.backlog.flush(timeout=5) and c.seen == [1, 2, 3]
    c.backlog.close(timeout=5)


def test_a_full_queue_drops_the_oldest_and_counts_them() -> None:
    c = Consumer(delay=0.3, max_batch=1, max_queue=5)
    c.backlog.put(0)
    time.sleep(0.05)  # the thread holds 0 for 0.3 s
    for i in range(1, 21):
        c.backlog.put(i)
    assert len(c.backlog) == 5
    assert c.backlog.dropped == 15
    assert c.backlog.flush(timeout=10)
    assert c.seen == [0, 16, 17, 18, 19, 20]
    c.backlog.close(timeout=5)


def test_an_idle_thread_is_woken_by_the_next_item_every_time() -> None:
    """The thread sleeps on an empty queue; each item put then must wake it at once (a
    lost wake-up would show as a wait of the 1 s safety net)."""
    c = Consumer(gather=0.005)
    for i in range(60):
        if i % 3 == 0:
            time.sleep(0.02)  # let the thread fall asleep on an empty queue
        c.backlog.put(i)
        deadline = time.monotonic() + 0.5
        while i not in c.seen:
            assert time.monotonic() < deadline, f"item {i} waited for the safety net"
            time.sleep(0.001)
    assert c.seen == list(range(60))
    c.backlog.close(timeout=5)
