"""twophase: distributed transactions for Python on PostgreSQL and MariaDB/MySQL."""

from ._async.connect import connect_async
from ._async.database import AsyncDatabase, AsyncTransaction
from ._sync.connect import connect
from ._sync.database import Database, Transaction
from .errors import (
    DatabaseError,
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
from .protocol import PreparedTransaction, Status
from .sql import Rows

__version__ = "0.1.0"

__all__ = [
    "AsyncDatabase",
    "AsyncTransaction",
    "Database",
    "DatabaseError",
    "InDoubt",
    "IntegrityError",
    "InvalidQuery",
    "InvalidTransactionName",
    "NestedTransactionError",
    "NotSupported",
    "PermissionDenied",
    "PreparedTransaction",
    "PreparedTransactionsDisabled",
    "Rows",
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
]
