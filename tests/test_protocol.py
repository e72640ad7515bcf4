"""The protocol tables, without I/O, and their rendering in docs/guarantees.md."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from twophase import TransactionCommitted, TransactionRolledBack, UnknownTransaction
from twophase.protocol import FINISH, Action, Answer, Status, finish_answer, status_of

DOC = Path(__file__).resolve().parent.parent / "docs" / "guarantees.md"


def test_status_table_precedence() -> None:
    for prepared, committed, tombstone in itertools.product([True, False], repeat=3):
        got = status_of(prepared=prepared, committed=committed, tombstone=tombstone)
        if prepared:
            assert got is Status.PREPARED
        elif committed:
            assert got is Status.COMMITTED
        elif tombstone:
            assert got is Status.ROLLED_BACK
        else:
            assert got is Status.UNKNOWN


def test_finish_table_is_total() -> None:
    assert set(FINISH) == set(itertools.product(Action, Status))


@pytest.mark.parametrize(
    ("action", "status", "expected"),
    [
        (Action.COMMIT, Status.COMMITTED, Answer.ALREADY),
        (Action.COMMIT, Status.ROLLED_BACK, TransactionRolledBack),
        (Action.COMMIT, Status.UNKNOWN, UnknownTransaction),
        (Action.COMMIT, Status.PREPARED, Answer.RETRY),
        (Action.ROLLBACK, Status.ROLLED_BACK, Answer.ALREADY),
        (Action.ROLLBACK, Status.COMMITTED, TransactionCommitted),
        (Action.ROLLBACK, Status.UNKNOWN, UnknownTransaction),
        (Action.ROLLBACK, Status.PREPARED, Answer.RETRY),
    ],
)
def test_finish_answers(action: Action, status: Status, expected: object) -> None:
    if isinstance(expected, Answer):
        assert finish_answer(action, status, "n1") is expected
    else:
        assert isinstance(expected, type)
        with pytest.raises(expected, match="'n1'"):
            finish_answer(action, status, "n1")


def _doc_rows(header: str) -> list[list[str]]:
    text = DOC.read_text()
    block = text[text.index(header) :]
    rows = []
    for line in block.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_docs_render_the_status_table() -> None:
    yes_no = {"yes": True, "no": False}
    for prepared, committed, tombstone, status in _doc_rows("| prepared now?"):
        facts = [yes_no.get(prepared, False), yes_no.get(committed), yes_no.get(tombstone)]
        # "any" / "(invisible)" cells: the row must hold for every value.
        choices = [[v] if v is not None else [True, False] for v in facts]
        for p, c, t in itertools.product(*choices):
            got = status_of(prepared=p, committed=c, tombstone=t)
            assert got.value == status.strip("`"), (p, c, t)


def test_docs_render_the_finish_table() -> None:
    names = {"committed": Status.COMMITTED, "rolled back": Status.ROLLED_BACK}
    names |= {"unknown": Status.UNKNOWN, "prepared": Status.PREPARED}
    seen = set()
    for call, status, answer in _doc_rows("| call | status found"):
        actions = list(Action) if call == "either" else [Action(call)]
        for action in actions:
            expected = FINISH[(action, names[status])]
            if isinstance(expected, Answer):
                assert (expected is Answer.ALREADY) == answer.startswith("returns normally")
                assert (expected is Answer.RETRY) == answer.startswith("try again")
            else:
                assert re.search(rf"`{expected.__name__}`", answer), (call, status, answer)
            seen.add((action, names[status]))
    assert seen == set(FINISH)


def test_docs_render_the_recovery_table() -> None:
    from twophase.protocol import RECOVERY, Decision, Recovery

    text = (DOC.parent / "coordinator.md").read_text()
    block = text[text.index("| decision in the log") :]
    names = {
        "committed": Decision.COMMITTED,
        "rolled back": Decision.ROLLED_BACK,
        "pending (expected branches)": Decision.PENDING,
        "pending": Decision.PENDING,
        "none": Decision.NONE,
    }
    seen = set()
    for line in block.splitlines()[2:]:
        if not line.startswith("|"):
            break
        decision, expired, action = (c.strip() for c in line.strip("|").split("|"))
        for flag in [True, False] if expired == "any" else [expired == "yes"]:
            expected = RECOVERY[(names[decision], flag)]
            if expected is Recovery.WAIT:
                assert action.startswith("wait"), line
            elif expected is Recovery.COMMIT:
                assert action.startswith("commit"), line
            elif expected is Recovery.ROLLBACK:
                assert action.startswith("roll the branch back"), line
            else:
                assert "roll" in action and ("fence" in action or "settle" in action), line
            seen.add((names[decision], flag))
    assert seen == set(RECOVERY)
