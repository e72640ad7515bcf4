# WARNING: generated from twophase/_async/connect.py by tools/async_to_sync.py.
# Edit the async source and run `python tools/async_to_sync.py`; CI checks they agree.
"""connect(): a URL (or $TWOPHASE_URL, or the embedded PostgreSQL) to an Database."""

from __future__ import annotations

from collections.abc import Sequence

from .. import _compat
from ..dialects import Dialect, MySQLDialect, PostgresDialect
from ..errors import DatabaseError, NotSupported
from ..names import validate_namespace
from ..observe.audit import AuditLog
from ..observe.events import Emitter, Observer
from ..observe.tracing import Tracing
from ..policy import Policy
from ..url import parse_url, url_from_env
from .database import Database
from .driver import MyPool, PgPool, Pool


def connect(
    url: str | None = None,
    *,
    namespace: str | None = None,
    pool_min: int = 1,
    pool_max: int = 20,
    timeout: float = 10.0,
    retry_timeout: float = 10.0,
    principal: str | None = None,
    policy: Policy | None = None,
    audit: bool | AuditLog = False,
    tracing: bool = False,
    observers: Sequence[Observer] = (),
    label: str | None = None,
) -> Database:
    """Open a database: PostgreSQL or MariaDB/MySQL by URL, else the embedded PostgreSQL.

    ``namespace`` prefixes every transaction name (``ns:name``) so services cannot collide.
    ``timeout`` bounds connecting and waiting for a pooled connection; ``retry_timeout``
    bounds how long retry-safe calls (commit, rollback, status) ride out a lost connection.

    Operating it: ``principal`` is who acts when ``twophase.context(principal=...)`` says
    nobody; ``policy`` (a ``twophase.policy.Policy``) is checked before any SQL of begin,
    commit and rollback; ``audit=True`` records every step in this database's
    ``twophase_audit_log`` (or pass an ``AuditLog`` writing elsewhere); ``tracing=True``
    emits OpenTelemetry spans; ``observers`` receive every event (metrics, your own).
    ``label`` names this database in events (default: its database name).
    """
    validate_namespace(namespace)
    if principal is not None and (not isinstance(principal, str) or not principal):
        raise ValueError(f"principal must be a non-empty str, got {principal!r}")
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(
            f"policy must be a twophase.policy.Policy, got {type(policy).__name__}; "
            "build one with Policy([...]) or Policy.from_file(path)"
        )
    if pool_min < 0 or pool_max < 1 or pool_min > pool_max:
        raise ValueError(
            f"need 0 <= pool_min <= pool_max and pool_max >= 1, got {pool_min}, {pool_max}"
        )
    resolved = url_from_env(url)
    if resolved is None:
        from ..embedded import ensure_server

        resolved = _compat.to_thread(ensure_server)
    parsed = parse_url(resolved)
    chain: list[Observer] = []
    owned: list[AuditLog | Tracing] = []
    if isinstance(audit, AuditLog):
        chain.append(audit)
    elif audit:
        owned.append(AuditLog(resolved))
        chain.append(owned[-1])
    if tracing:
        owned.append(Tracing())
        chain.append(owned[-1])
    chain.extend(observers)
    events = Emitter(chain, label=label or parsed.database, principal=principal)
    dialect: Dialect
    pool: Pool
    if parsed.dialect == "postgresql":
        dialect = PostgresDialect()
        pool = PgPool(parsed.conninfo, min_size=pool_min, max_size=pool_max, timeout=timeout)
    else:
        try:
            import pymysql  # noqa: F401
        except ImportError as exc:
            raise NotSupported(
                "MariaDB/MySQL support needs the driver: pip install 'twophase[mysql]'"
            ) from exc
        dialect = MySQLDialect()
        pool = MyPool(parsed.params, min_size=pool_min, max_size=pool_max, timeout=timeout)
    try:
        pool.open()
    except Exception as exc:
        raise DatabaseError(f"could not connect to {parsed.display}: {exc}") from exc
    return Database(
        pool,
        dialect,
        database=parsed.database,
        namespace=namespace,
        display_url=parsed.display,
        retry_timeout=retry_timeout,
        principal=principal,
        policy=policy,
        events=events,
        owned=owned,
    )
