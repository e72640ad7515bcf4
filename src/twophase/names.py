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
    if isinstance(namespace, str) and len(namespace.encode("utf-8", "surrogatepass")) > (
        MAX_NAME_BYTES - 2
    ):
        raise InvalidTransactionName(
            f"namespace {namespace[:80]!r} is too long: a namespace may have at most "
            f"{MAX_NAME_BYTES - 2} bytes, to leave room for ':' and a name; use a shorter "
            "namespace"
        )
    validate_name(namespace, what="namespace")
    if len(namespace) > MAX_NAME_BYTES - 2:
        raise InvalidTransactionName(
            f"namespace {namespace!r} leaves no room for a name within {MAX_NAME_BYTES} bytes; "
            "use a shorter namespace"
        )
    return namespace


#: A branch qualifier: the branch's index in its global transaction and its deadline (Unix
#: seconds), so recovery learns a branch's deadline from the database's own listing.
_BRANCH = re.compile(r"(\d{1,5})\.(\d{1,12})")


@dataclass(frozen=True, slots=True)
class TxName:
    """A validated, fully qualified transaction name (namespace included).

    A branch of a global transaction carries a qualifier as well (``branch``); the database
    then knows it as ``<full>#<branch>`` (PostgreSQL) or with an XA bqual (MariaDB).
    """

    full: str
    branch: str | None = None

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

    def with_branch(self, index: int, deadline: int) -> TxName:
        """Branch ``index`` of this global transaction, to be finished by ``deadline``."""
        return TxName(self.full, f"{index}.{deadline}")

    @property
    def deadline(self) -> int | None:
        """The branch's deadline in Unix seconds, or None for a plain name."""
        m = _BRANCH.fullmatch(self.branch) if self.branch else None
        return int(m.group(2)) if m else None

    @property
    def record(self) -> str:
        """The key of this transaction's outcome record."""
        return f"{self.full}#{self.branch}" if self.branch else self.full

    @property
    def pg_gid(self) -> str:
        """The gid PostgreSQL sees in ``PREPARE TRANSACTION``."""
        return PG_GID_PREFIX + self.record

    def __str__(self) -> str:
        return self.record


def parse_branch(full: str, branch: str | None) -> TxName | None:
    """A TxName from a database listing, or None when it is not twophase's."""
    if not _ALLOWED.fullmatch(full):
        return None
    if branch and not _BRANCH.fullmatch(branch):
        return None
    return TxName(full, branch or None)


def name_from_pg_gid(gid: str) -> TxName | None:
    """The twophase name behind a PostgreSQL gid, or None for a foreign transaction."""
    if not gid.startswith(PG_GID_PREFIX):
        return None
    full, _, branch = gid[len(PG_GID_PREFIX) :].partition("#")
    return parse_branch(full, branch)
