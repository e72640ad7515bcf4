"""Database dialects: what differs between PostgreSQL and MariaDB/MySQL, and nothing else."""

from .base import Dialect, ErrorKind, PreparedRow, control_statement
from .mysql import MySQLDialect
from .postgres import PostgresDialect

__all__ = [
    "Dialect",
    "ErrorKind",
    "MySQLDialect",
    "PostgresDialect",
    "PreparedRow",
    "control_statement",
]
