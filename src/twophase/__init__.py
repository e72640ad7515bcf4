"""twophase: distributed transactions for Python on PostgreSQL and MariaDB/MySQL."""

from ._async.connect import connect_async
from ._async.coordinator import AsyncCoordinator, AsyncGlobalTransaction
from ._async.database import AsyncDatabase, AsyncTransaction
from ._sync.connect import connect
from ._sync.coordinator import Coordinator, GlobalTransaction
from ._sync.database import Database, Transaction
from .decisions import RecoveryReport
from .errors import (
    DatabaseError,
    DeadlineExceeded,
    IdempotencyConflict,
    InDoubt,
    IntegrityError,
    InvalidQuery,
    InvalidTransactionName,
    NestedTransactionError,
    NotSupported,
    PermissionDenied,
    PreparedTransactionsDisabled,
    TransactionCommitted,
    TransactionNameInUse,
    TransactionRolledBack,
    TwoPhaseError,
    UnknownTransaction,
)
from .idempotency import fingerprint
from .observe.events import context
from .policy import Policy, Rule
from .protocol import Decision, PreparedTransaction, ReapReport, Status
from .sql import Rows

__version__ = "0.1.0"

__all__ = [
    "AsyncCoordinator",
    "AsyncDatabase",
    "AsyncGlobalTransaction",
    "AsyncTransaction",
    "Coordinator",
    "Database",
    "DatabaseError",
    "DeadlineExceeded",
    "Decision",
    "GlobalTransaction",
    "IdempotencyConflict",
    "InDoubt",
    "IntegrityError",
    "InvalidQuery",
    "InvalidTransactionName",
    "NestedTransactionError",
    "NotSupported",
    "PermissionDenied",
    "Policy",
    "PreparedTransaction",
    "PreparedTransactionsDisabled",
    "ReapReport",
    "RecoveryReport",
    "Rows",
    "Rule",
    "Status",
    "Transaction",
    "TransactionCommitted",
    "TransactionNameInUse",
    "TransactionRolledBack",
    "TwoPhaseError",
    "UnknownTransaction",
    "__version__",
    "connect",
    "connect_async",
    "context",
    "fingerprint",
]
