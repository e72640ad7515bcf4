"""Child programs for tests/test_coordinator.py: coordinators that crash, preparers, recoverers.

Usage::

    coord_child.py crash CONFIG_JSON
        For each spec in the config, fork a process that runs one global transaction with
        the sync Coordinator. A crash point is armed through TWOPHASE_CRASH_AT (inherited by
        every fork), so each one SIGKILLs itself at that step. The parent waits for them all
        and prints ``DONE {"<name>": <wait status>}`` (a negative number: killed by that
        signal; 3: the crash point was never reached; 4: the transaction raised).

    coord_child.py prepare URL NAME TABLE ID
        begin_distributed(NAME) inserting row ID into TABLE, then print ``PREPARED``.

    coord_child.py recover CONFIG_JSON FLAG_PATH
        Build the coordinator, warm every pool up, print ``READY``, wait for FLAG_PATH to
        exist (so several recoverers start at the same moment), run recover() and print
        ``REPORT <json>``.

Config (JSON): ``urls`` (participant key -> URL, the log participant is "orders"),
``namespace``, ``table``, ``comp_log`` (a file every compensation run appends a JSON line
to), ``parallel`` (forks at a time), ``specs``: list of ``{"name", "timeout", "id",
"participants": [...], "expect": [[participant, name], ...], "compensate": payload|null}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import twophase


def make_coordinator(cfg: dict[str, Any], *, pool_max: int = 4) -> twophase.Coordinator:
    dbs = {k: twophase.connect(u, pool_max=pool_max, audit=True) for k, u in cfg["urls"].items()}
    coord = twophase.Coordinator(dbs, log="orders", namespace=cfg["namespace"], concurrency=4)
    comp_log = cfg["comp_log"]

    @coord.on_compensate("co_refund")
    def refund(payload: Any, key: str) -> None:
        # O_APPEND: lines from several processes never interleave (each is one write).
        line = json.dumps({"payload": payload, "key": key, "pid": os.getpid()}) + "\n"
        fd = os.open(comp_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    return coord


def run_one(cfg: dict[str, Any], spec: dict[str, Any]) -> None:
    coord = make_coordinator(cfg)
    table = cfg["table"]

    def insert(tx: twophase.Transaction) -> None:
        tx.insert_into(table).values(id=spec["id"], v=spec["name"]).execute()

    with coord.transaction(spec["name"], timeout=spec["timeout"]) as g:
        for key in spec["participants"]:
            g.enlist(key, insert)
        for key, name in spec.get("expect", []):
            g.expect(key, name)
        if spec.get("compensate") is not None:
            g.compensate("co_refund", spec["compensate"])


def crash(cfg: dict[str, Any]) -> None:
    statuses: dict[str, int] = {}
    running: dict[int, str] = {}

    def reap_one() -> None:
        pid, status = os.wait()
        name = running.pop(pid)
        statuses[name] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    for spec in cfg["specs"]:
        while len(running) >= cfg.get("parallel", 8):
            reap_one()
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                run_one(cfg, spec)
            except BaseException:
                traceback.print_exc()
                code = 4
            sys.stderr.flush()
            os._exit(code)
        running[pid] = spec["name"]
    while running:
        reap_one()
    print("DONE " + json.dumps(statuses), flush=True)


def prepare(url: str, name: str, table: str, row_id: int) -> None:
    db = twophase.connect(url, pool_max=2)

    def stage(tx: twophase.Transaction) -> None:
        tx.insert_into(table).values(id=row_id, v=name).execute()

    db.begin_distributed(name, stage)
    db.close()
    print("PREPARED", flush=True)


def recover(cfg: dict[str, Any], flag: str) -> None:
    coord = make_coordinator(cfg, pool_max=6)
    coord.status("warm-up")  # creates/checks the log tables
    for db in coord.participants.values():
        db.prepared()  # pools open, outcome tables checked
    print("READY", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(flag):
        if time.monotonic() > deadline:
            raise SystemExit("no start flag within 60 s")
        time.sleep(0.001)
    report = coord.recover()
    print("REPORT " + json.dumps(report.as_dict()), flush=True)


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "crash":
        crash(json.loads(sys.argv[2]))
    elif cmd == "prepare":
        prepare(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif cmd == "recover":
        recover(json.loads(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
