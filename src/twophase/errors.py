"""The error tree of twophase; every message says what to do next.

::

    TwoPhaseError
     +-- InvalidTransactionName      the name breaks the naming rule (nothing was sent)
     +-- InvalidQuery                a query builder was misused (nothing was sent)
     +-- TransactionNameInUse        the name is prepared, active or already committed
     +-- UnknownTransaction          the database has never seen this name
     +-- TransactionRolledBack       asked to commit a name that was rolled back
 |    +-- DeadlineExceeded       a global transaction passed its deadline undecided
     +-- TransactionCommitted        asked to roll back a name that was committed
     +-- PreparedTransactionsDisabled  PostgreSQL has max_prepared_transactions = 0
     +-- NotSupported                a backend or operation that cannot keep the guarantees
     +-- NestedTransactionError      begin/savepoint/transaction inside a distributed one
     +-- PermissionDenied            a policy refused the action
     +-- InDoubt                     a commit decision exists, a participant is unreachable
 +-- IdempotencyConflict         an idempotency key was reused for a different request
     +-- DatabaseError               any other driver error, original chained as __cause__
          +-- IntegrityError         a constraint (unique, foreign key, check) was violated

Driver errors that a caller must act on are translated into this tree; the driver's own
exception is always chained (``raise ... from``), and ``sqlstate`` keeps the server's code.
"""

from __future__ import annotations


class TwoPhaseError(Exception):
    """Base class of every error raised by twophase."""

    #: The server's error code (SQLSTATE on PostgreSQL, the numeric code on MariaDB/MySQL).
    sqlstate: str | None = None

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        if sqlstate is not None:
            self.sqlstate = sqlstate


class InvalidTransactionName(TwoPhaseError, ValueError):
    """The transaction name breaks the naming rule; nothing reached the database."""


class InvalidQuery(TwoPhaseError, ValueError):
    """A query builder was given something it cannot compile; nothing reached the database."""


class TransactionNameInUse(TwoPhaseError):
    """The name is already prepared, being staged by another session, or committed."""


class UnknownTransaction(TwoPhaseError, LookupError):
    """The database has no prepared transaction and no recorded outcome under this name."""


class TransactionRolledBack(TwoPhaseError):
    """Commit was asked for a transaction that was rolled back."""


class DeadlineExceeded(TransactionRolledBack):
    """A global transaction passed its deadline before it was decided; it rolled back."""


class TransactionCommitted(TwoPhaseError):
    """Rollback was asked for a transaction that was committed."""


class PreparedTransactionsDisabled(TwoPhaseError):
    """PostgreSQL runs with ``max_prepared_transactions = 0``."""


class NotSupported(TwoPhaseError):
    """The backend or operation cannot keep twophase's guarantees."""


class NestedTransactionError(TwoPhaseError):
    """A transaction, savepoint or distributed transaction was opened inside a distributed one."""


class PermissionDenied(TwoPhaseError):
    """A policy refused the principal this action on this name."""


class InDoubt(TwoPhaseError):
    """A commit decision is durable but a participant could not be reached yet."""


class IdempotencyConflict(TwoPhaseError):
    """An idempotency key was reused with a different request fingerprint."""


class DatabaseError(TwoPhaseError):
    """A driver error with no more specific meaning; the original is the ``__cause__``."""


class IntegrityError(DatabaseError):
    """A statement violated a constraint (unique key, foreign key, check, not null)."""


__all__ = [
    "DatabaseError",
    "DeadlineExceeded",
    "IdempotencyConflict",
    "InDoubt",
    "IntegrityError",
    "InvalidQuery",
    "InvalidTransactionName",
    "NestedTransactionError",
    "NotSupported",
    "PermissionDenied",
    "PreparedTransactionsDisabled",
    "TransactionCommitted",
    "TransactionNameInUse",
    "TransactionRolledBack",
    "TwoPhaseError",
    "UnknownTransaction",
]
