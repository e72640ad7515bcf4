"""Per-dialect hooks of the SQL compiler: identifier quoting and capability flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidQuery


def check_ident(ident: object, *, what: str = "identifier", allow_star: bool = False) -> str:
    """Return ``ident`` if it can be quoted, else raise ``InvalidQuery``.

    An identifier is a non-empty ``str`` without NUL; dots split it into parts
    (``schema.table``), none of which may be empty. With ``allow_star``, the last
    part may be ``*`` (``*`` or ``t.*``), as in a select or returning list.
    """
    if not isinstance(ident, str):
        raise InvalidQuery(f"{what} must be a str, got {type(ident).__name__}")
    if "\x00" in ident:
        # No server accepts NUL in a name, and a C driver would cut the text there.
        raise InvalidQuery(f"{what} {ident!r} contains a NUL character; remove it")
    parts = ident.split(".")
    if "" in parts:
        raise InvalidQuery(
            f"{what} {ident!r} has an empty part; use a name like 'accounts' or 'public.accounts'"
        )
    if "*" in parts[:-1] or (parts[-1] == "*" and not allow_star):
        where = "only as the last part of a select or returning column" if allow_star else "here"
        raise InvalidQuery(f"{what} {ident!r}: '*' is allowed {where}")
    return ident


@dataclass(frozen=True, slots=True)
class SqlDialect:
    """What the compiler needs to know about one SQL dialect.

    Both supported drivers (psycopg 3 and PyMySQL/aiomysql) use the ``%s``
    positional placeholder, so the compiler doubles every literal ``%`` it writes
    (in practice: inside identifiers). Runners must therefore always pass the
    params tuple to the driver, even when it is empty, so that ``%%`` is read back
    as ``%``.

    The ``supports_returning_*`` flags default to True; a False flag makes
    ``.returning()`` on that statement an ``InvalidQuery`` at compile time.
    """

    #: "postgresql" or "mysql"; shown in error messages.
    name: str
    #: The character that delimits a quoted identifier.
    quote_char: str
    #: Placeholder for one bound parameter.
    placeholder: str = "%s"
    #: INSERT ... RETURNING (PostgreSQL; MariaDB since 10.5; not Oracle MySQL).
    supports_returning_insert: bool = True
    #: UPDATE ... RETURNING (PostgreSQL only; MariaDB has none).
    supports_returning_update: bool = True
    #: DELETE ... RETURNING (PostgreSQL; MariaDB since 10.0.5; not Oracle MySQL).
    supports_returning_delete: bool = True
    #: How insert_or_ignore is spelled: a trailing ON CONFLICT DO NOTHING or INSERT IGNORE.
    insert_ignore_style: Literal["on_conflict", "insert_ignore"] = "on_conflict"
    #: MySQL accepts OFFSET only after a LIMIT, so an offset alone needs a maximal LIMIT.
    offset_needs_limit: bool = False

    def quote_ident(self, ident: str) -> str:
        """Quote ``ident`` (each dotted part; ``*`` stays ``*``), doubling the quote character."""
        check_ident(ident, allow_star=True)
        q = self.quote_char
        return ".".join(
            part if part == "*" else q + part.replace(q, q + q) + q for part in ident.split(".")
        )


#: PostgreSQL through psycopg 3.
POSTGRES = SqlDialect(name="postgresql", quote_char='"')

#: MariaDB (10.5 or newer) through PyMySQL or aiomysql. For Oracle MySQL, which has no
#: RETURNING at all, use ``dataclasses.replace(MYSQL, supports_returning_insert=False,
#: supports_returning_delete=False)``.
MYSQL = SqlDialect(
    name="mysql",
    quote_char="`",
    supports_returning_update=False,
    insert_ignore_style="insert_ignore",
    offset_needs_limit=True,
)
