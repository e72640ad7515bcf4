"""connect_async(): a URL (or $TWOPHASE_URL, or the embedded PostgreSQL) to an AsyncDatabase."""

from __future__ import annotations

from .. import _acompat
from ..dialects import Dialect, MySQLDialect, PostgresDialect
from ..errors import DatabaseError, NotSupported
from ..names import validate_namespace
from ..url import parse_url, url_from_env
from .database import AsyncDatabase
from .driver import AsyncMyPool, AsyncPgPool, AsyncPool


async def connect_async(
    url: str | None = None,
    *,
    namespace: str | None = None,
    pool_min: int = 1,
    pool_max: int = 20,
    timeout: float = 10.0,
    retry_timeout: float = 10.0,
) -> AsyncDatabase:
    """Open a database: PostgreSQL or MariaDB/MySQL by URL, else the embedded PostgreSQL.

    ``namespace`` prefixes every transaction name (``ns:name``) so services cannot collide.
    ``timeout`` bounds connecting and waiting for a pooled connection; ``retry_timeout``
    bounds how long retry-safe calls (commit, rollback, status) ride out a lost connection.
    """
    validate_namespace(namespace)
    if pool_min < 0 or pool_max < 1 or pool_min > pool_max:
        raise ValueError(
            f"need 0 <= pool_min <= pool_max and pool_max >= 1, got {pool_min}, {pool_max}"
        )
    resolved = url_from_env(url)
    if resolved is None:
        from ..embedded import ensure_server

        resolved = await _acompat.to_thread(ensure_server)
    parsed = parse_url(resolved)
    dialect: Dialect
    pool: AsyncPool
    if parsed.dialect == "postgresql":
        dialect = PostgresDialect()
        pool = AsyncPgPool(parsed.conninfo, min_size=pool_min, max_size=pool_max, timeout=timeout)
    else:
        try:
            import aiomysql  # noqa: F401
        except ImportError as exc:
            raise NotSupported(
                "MariaDB/MySQL support needs the driver: pip install 'twophase[mysql]'"
            ) from exc
        dialect = MySQLDialect()
        pool = AsyncMyPool(parsed.params, min_size=pool_min, max_size=pool_max, timeout=timeout)
    try:
        await pool.open()
    except Exception as exc:
        raise DatabaseError(f"could not connect to {parsed.display}: {exc}") from exc
    return AsyncDatabase(
        pool,
        dialect,
        database=parsed.database,
        namespace=namespace,
        display_url=parsed.display,
        retry_timeout=retry_timeout,
    )
