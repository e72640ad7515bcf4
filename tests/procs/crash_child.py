"""Child process for tests/test_crash.py: stage a distributed transaction, then hang.

Usage: crash_child.py URL NAME TABLE sync|async prepare|in_fn

``prepare``: begin_distributed inserts row id=1, prepares, prints ``PREPARED`` and sleeps.
``in_fn``: the callback inserts row id=1, prints ``IN_FN <session id>`` and sleeps inside
the callback, so the transaction is open but not prepared.

The parent kills this process with SIGKILL at the printed line: whatever the library does
on a normal exit (closing pools, rolling back) never happens, as in a real crash.
"""

from __future__ import annotations

import asyncio
import sys
import time

import twophase


def announce(line: str) -> None:
    # The parent blocks on this line; without the flush it would sit in the pipe buffer.
    print(line, flush=True)


def session_id_sql(url: str) -> str:
    return (
        "SELECT pg_backend_pid() AS sid"
        if url.startswith("postgres")
        else ("SELECT CONNECTION_ID() AS sid")
    )


def run_sync(url: str, name: str, table: str, where: str) -> None:
    db = twophase.connect(url)

    def stage(tx: twophase.Transaction) -> None:
        tx.insert_into(table).values(id=1, status="staged").execute()
        if where == "in_fn":
            sid = tx.execute(session_id_sql(url))[0]["sid"]
            announce(f"IN_FN {sid}")
            while True:
                time.sleep(3600)

    db.begin_distributed(name, stage)
    announce("PREPARED")
    while True:
        time.sleep(3600)


async def run_async(url: str, name: str, table: str, where: str) -> None:
    db = await twophase.connect_async(url)

    async def stage(tx: twophase.AsyncTransaction) -> None:
        await tx.insert_into(table).values(id=1, status="staged").execute()
        if where == "in_fn":
            sid = (await tx.execute(session_id_sql(url)))[0]["sid"]
            announce(f"IN_FN {sid}")
            await asyncio.Event().wait()

    await db.begin_distributed(name, stage)
    announce("PREPARED")
    await asyncio.Event().wait()


def main() -> None:
    url, name, table, mode, where = sys.argv[1:6]
    if mode == "sync":
        run_sync(url, name, table, where)
    else:
        asyncio.run(run_async(url, name, table, where))


if __name__ == "__main__":
    main()
