"""Child process for tests/test_outbox.py: publish inside a distributed transaction, then hang.

Usage: outbox_child.py DB_URL NAME TOPIC COUNT prepare|in_fn

``prepare``: begin_distributed publishes COUNT messages (keys k0, k1, k2), prepares, prints
``PREPARED <msg ids as JSON>`` and sleeps. ``in_fn``: the callback publishes, prints
``IN_FN <session id>`` and sleeps inside the callback (open, not prepared).

The parent kills this process with SIGKILL at the printed line, so none of the library's
clean-up runs, as in a real crash.
"""

from __future__ import annotations

import json
import sys
import time

import twophase


def announce(line: str) -> None:
    print(line, flush=True)


def main(url: str, name: str, topic: str, count: int, where: str) -> None:
    db = twophase.connect(url)

    def stage(tx: twophase.Transaction) -> list[str]:
        ids = [
            tx.outbox.publish(topic, {"n": i}, key=f"k{i % 3}", headers={"child": "yes"})
            for i in range(count)
        ]
        if where == "in_fn":
            pg = url.startswith("postgres")
            sid = tx.execute(
                "SELECT pg_backend_pid() AS s" if pg else "SELECT CONNECTION_ID() AS s"
            )
            announce(f"IN_FN {sid[0]['s']}")
            while True:
                time.sleep(3600)
        return ids

    ids = db.begin_distributed(name, stage)
    announce(f"PREPARED {json.dumps(ids)}")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
