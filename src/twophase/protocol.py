"""The life of one distributed transaction, as tables; no I/O.

Theory of operation
-------------------
A distributed transaction is one database transaction that is *prepared* instead of
committed: its changes are durable and its locks held, but invisible, until some session
says ``COMMIT PREPARED`` (``XA COMMIT``) or ``ROLLBACK PREPARED`` (``XA ROLLBACK``). The
session that prepared it may be long gone; the database remembers the transaction across
disconnects, crashes and restarts.

twophase makes the two finishing calls safe to retry by keeping an *outcome record* per
name. The ``committed`` record is inserted *inside* the transaction when it begins, so it
becomes visible exactly when the transaction commits and vanishes with it on rollback: the
record can never disagree with the data. A ``rolled_back`` tombstone is written just before
a rollback, and is read only when the transaction is neither prepared nor committed.

What the database says about a name therefore maps to one :class:`Status`::

    prepared now?   committed record?   tombstone?   ->  status
    yes             (invisible)         any              PREPARED
    no              yes                 any              COMMITTED
    no              no                  yes              ROLLED_BACK
    no              no                  no               UNKNOWN

The prepared check is made before the record is read: a transaction can only move from
prepared to finished, so reading in that order never misses a commit that happens in between.

When ``COMMIT PREPARED`` or ``ROLLBACK PREPARED`` finds no such transaction, the status that
follows decides the answer (:data:`FINISH`): a retried commit of a committed name returns
normally, a commit of a rolled-back name raises ``TransactionRolledBack``, and so on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from .errors import (
    TransactionCommitted,
    TransactionRolledBack,
    TwoPhaseError,
    UnknownTransaction,
)
from .names import TxName


class Status(enum.StrEnum):
    """Where a named distributed transaction stands."""

    PREPARED = "prepared"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    UNKNOWN = "unknown"


class Action(enum.StrEnum):
    """The two ways to finish a prepared transaction."""

    COMMIT = "commit"
    ROLLBACK = "rollback"


class Answer(enum.Enum):
    """What a finishing call does once it learns the status."""

    DONE = "return normally: this call finished it"
    ALREADY = "return normally: it was already finished (a retry)"
    RETRY = "try the statement again"


def status_of(*, prepared: bool, committed: bool, tombstone: bool) -> Status:
    """The status table above, as a function."""
    if prepared:
        return Status.PREPARED
    if committed:
        return Status.COMMITTED
    if tombstone:
        return Status.ROLLED_BACK
    return Status.UNKNOWN


#: (action, status found after the statement said "no such prepared transaction") -> answer.
FINISH: Final[dict[tuple[Action, Status], Answer | type[TwoPhaseError]]] = {
    (Action.COMMIT, Status.COMMITTED): Answer.ALREADY,
    (Action.COMMIT, Status.ROLLED_BACK): TransactionRolledBack,
    (Action.COMMIT, Status.UNKNOWN): UnknownTransaction,
    # Prepared but not found: MariaDB still attaches it to the session that prepared it.
    (Action.COMMIT, Status.PREPARED): Answer.RETRY,
    (Action.ROLLBACK, Status.ROLLED_BACK): Answer.ALREADY,
    (Action.ROLLBACK, Status.COMMITTED): TransactionCommitted,
    (Action.ROLLBACK, Status.UNKNOWN): UnknownTransaction,
    (Action.ROLLBACK, Status.PREPARED): Answer.RETRY,
}

_MESSAGES: Final[dict[type[TwoPhaseError], str]] = {
    TransactionRolledBack: (
        "distributed transaction {name!r} was rolled back, so it cannot be committed; "
        "stage it again under a new name if the work is still wanted"
    ),
    TransactionCommitted: (
        "distributed transaction {name!r} was committed, so it cannot be rolled back; "
        "undo its effects with a compensating transaction"
    ),
    UnknownTransaction: (
        "no distributed transaction {name!r} is prepared or recorded in this database; "
        "check the name and namespace, and that begin_distributed() returned without error"
    ),
}


def finish_answer(action: Action, status: Status, name: str) -> Answer:
    """The answer for ``action`` on a name in ``status``; raises the mapped error."""
    answer = FINISH[(action, status)]
    if isinstance(answer, Answer):
        return answer
    raise answer(_MESSAGES[answer].format(name=name))


@dataclass(frozen=True, slots=True)
class PreparedTransaction:
    """A prepared transaction waiting for commit or rollback."""

    #: The name as the owning ``Database`` knows it (namespace stripped).
    name: str
    #: The name with its namespace, as the database stores it.
    full_name: str
    #: When it was prepared (PostgreSQL) or began (MariaDB); None if the server cannot say.
    prepared_at: datetime | None
    #: The database it lives in.
    database: str
    #: For a branch of a global transaction: its qualifier (``<index>.<deadline>``).
    branch: str | None = None

    @classmethod
    def make(
        cls, name: TxName, prefix: str, prepared_at: datetime | None, database: str
    ) -> PreparedTransaction:
        """Build one from a database row, stripping the namespace ``prefix``."""
        if prepared_at is not None and prepared_at.tzinfo is None:
            # MariaDB sessions run in UTC (twophase sets time_zone), so naive means UTC.
            prepared_at = prepared_at.replace(tzinfo=UTC)
        return cls(name.full[len(prefix) :], name.full, prepared_at, database, name.branch)

    @property
    def age(self) -> timedelta | None:
        """How long it has been prepared."""
        if self.prepared_at is None:
            return None
        return datetime.now(UTC) - self.prepared_at

    def sort_key(self) -> tuple[datetime, str, str]:
        """Oldest first; unknown times last."""
        return (
            self.prepared_at or datetime.max.replace(tzinfo=UTC),
            self.full_name,
            self.branch or "",
        )


@dataclass
class ReapReport:
    """What one ``db.reap(older_than)`` pass found and did."""

    older_than: timedelta
    dry_run: bool
    #: Rolled back (with ``dry_run``: would be), oldest first.
    reaped: list[PreparedTransaction] = field(default_factory=list)
    #: Old but left alone, with the reason (a coordinator's branch, finished meanwhile...).
    skipped: list[tuple[PreparedTransaction, str]] = field(default_factory=list)
    #: Old, and the rollback failed: ``(transaction, error)``; the others are still done.
    failed: list[tuple[PreparedTransaction, str]] = field(default_factory=list)
    #: Prepared transactions not old enough.
    younger: int = 0


# -- global transactions ----------------------------------------------------------------
#
# A global transaction spans branches on several databases. Its fate is one row in the
# coordinator's decision log (see twophase.decisions): presumed abort, so no row means
# "not committed". What recovery does with a prepared branch it finds:


class Decision(enum.StrEnum):
    """What the decision log holds for a global transaction."""

    NONE = "none"  # no row: the coordinator never decided (presumed abort)
    PENDING = "pending"  # waiting for branches prepared by other processes
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"


class Recovery(enum.Enum):
    """What recovery does with an in-doubt branch."""

    COMMIT = "commit the branch"
    ROLLBACK = "roll the branch back"
    FENCE_AND_ROLLBACK = "write a rolled-back decision first, then roll the branch back"
    WAIT = "leave it: its coordinator may still decide"


#: (decision found, deadline passed?) -> action. A committed decision is final whatever the
#: clock says: a branch with a commit decision is never rolled back. Without a decision,
#: nothing is done before the deadline; after it, the rolled-back decision is *committed*
#: before any branch is touched, so a slow coordinator can no longer decide commit (its insert or
#: update of the same row fails).
RECOVERY: Final[dict[tuple[Decision, bool], Recovery]] = {
    (Decision.COMMITTED, False): Recovery.COMMIT,
    (Decision.COMMITTED, True): Recovery.COMMIT,
    (Decision.ROLLED_BACK, False): Recovery.ROLLBACK,
    (Decision.ROLLED_BACK, True): Recovery.ROLLBACK,
    (Decision.PENDING, False): Recovery.WAIT,
    (Decision.PENDING, True): Recovery.FENCE_AND_ROLLBACK,
    (Decision.NONE, False): Recovery.WAIT,
    (Decision.NONE, True): Recovery.FENCE_AND_ROLLBACK,
}


def recovery_action(decision: Decision, expired: bool) -> Recovery:
    """The RECOVERY table as a function."""
    return RECOVERY[(decision, expired)]


#: Crash points of the coordinator, in protocol order (see twophase.testing).
CRASH_POINTS: Final[tuple[str, ...]] = (
    "before_prepare",  # branches staged, none prepared
    "after_prepare",  # after the n-th prepare (``after_prepare:n``)
    "before_decision",  # all prepared, no decision yet
    "after_decision",  # decision durable, no branch committed
    "after_commit",  # after the n-th commit (``after_commit:n``)
)
