"""Transaction names: the one naming rule, namespaces, and the ids databases see."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidTransactionName

#: 64 bytes is MariaDB/MySQL's limit for an XA gtrid; PostgreSQL allows up to 199.
MAX_NAME_BYTES = 64

_ALLOWED = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")

#: Prefix of every PostgreSQL gid twophase prepares, so ``prepared()`` lists only its own.
PG_GID_PREFIX = "tp:"

#: XA formatID of every MariaDB/MySQL branch twophase prepares ("tp" in ASCII).
XA_FORMAT_ID = 0x7470


def validate_name(name: object, *, what: str = "transaction name") -> str:
    """Return ``name`` if it obeys the naming rule, else raise ``InvalidTransactionName``."""
    if not isinstance(name, str):
        raise InvalidTransactionName(
            f"{what} must be a str, got {type(name).__name__}; pass a name such as 'order_42'"
        )
    # fullmatch on the str alone is not enough: the rule is stated in bytes, and
    # every allowed character is one byte, so the length check below is exact.
    if not _ALLOWED.fullmatch(name):
        if not name:
            problem = "is empty"
        elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            problem = f"is {len(name.encode('utf-8', 'surrogatepass'))} bytes long"
        else:
            bad = next(c for c in name if not _ALLOWED.fullmatch(c))
            problem = f"contains {bad!r}"
        raise InvalidTransactionName(
            f"{what} {name[:80]!r} {problem}; use 1-{MAX_NAME_BYTES} bytes of "
            "A-Z a-z 0-9 _ - . : (for example 'order_42' or 'billing:invoice.7')"
        )
    return name


def validate_namespace(namespace: str | None) -> str | None:
    """Check a namespace; it follows the naming rule and leaves room for a name."""
    if namespace is None:
        return None
    validate_name(namespace, what="namespace")
    if len(namespace) > MAX_NAME_BYTES - 2:
        raise InvalidTransactionName(
            f"namespace {namespace!r} leaves no room for a name within {MAX_NAME_BYTES} bytes; "
            "use a shorter namespace"
        )
    return namespace


@dataclass(frozen=True, slots=True)
class TxName:
    """A validated, fully qualified transaction name (namespace included)."""

    full: str

    @classmethod
    def make(cls, name: object, namespace: str | None = None) -> TxName:
        """Validate ``name`` and qualify it with ``namespace`` (``ns:name``)."""
        validate_name(name)
        assert isinstance(name, str)
        full = f"{namespace}:{name}" if namespace else name
        if len(full) > MAX_NAME_BYTES:
            raise InvalidTransactionName(
                f"transaction name {name!r} in namespace {namespace!r} makes {full!r}, "
                f"{len(full)} bytes; the qualified name must fit in {MAX_NAME_BYTES} bytes, "
                "so shorten the name or the namespace"
            )
        return cls(full)

    @property
    def pg_gid(self) -> str:
        """The gid PostgreSQL sees in ``PREPARE TRANSACTION``."""
        return PG_GID_PREFIX + self.full

    def __str__(self) -> str:
        return self.full


def name_from_pg_gid(gid: str) -> str | None:
    """The twophase name behind a PostgreSQL gid, or None for a foreign transaction."""
    if not gid.startswith(PG_GID_PREFIX):
        return None
    name = gid[len(PG_GID_PREFIX) :]
    return name if _ALLOWED.fullmatch(name) else None
