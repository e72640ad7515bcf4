"""Database URLs: which dialect, which driver settings, and a display form without secrets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import NotSupported

ENV_URL = "TWOPHASE_URL"

_POSTGRES = {"postgresql", "postgres", "postgresql+psycopg"}
_MYSQL = {"mysql", "mariadb", "mysql+pymysql", "mariadb+pymysql"}


@dataclass(frozen=True)
class DatabaseURL:
    """A parsed database URL."""

    dialect: str  # "postgresql" or "mysql"
    conninfo: str  # what psycopg takes (PostgreSQL only)
    params: dict[str, Any] = field(default_factory=dict)  # what PyMySQL takes (MySQL only)
    database: str = ""
    display: str = ""


def parse_url(url: str) -> DatabaseURL:
    """Parse ``url``, refusing backends that cannot hold a prepared transaction."""
    if not isinstance(url, str) or "://" not in url:
        raise NotSupported(
            f"{url!r} is not a database URL; use postgresql://user@host/db or "
            "mysql://user@host/db (or no URL for the embedded PostgreSQL)"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    display = _display(parts.scheme, parts.username, parts.hostname, parts.port, parts.path)
    if scheme in _POSTGRES:
        # psycopg reads the URL itself (including ?sslmode=... and friends).
        conninfo = url if scheme != "postgresql+psycopg" else "postgresql" + url[len(scheme) :]
        return DatabaseURL(
            "postgresql", conninfo, database=unquote(parts.path.lstrip("/")), display=display
        )
    if scheme in _MYSQL:
        params: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 3306,
            "user": unquote(parts.username) if parts.username else "root",
            "password": unquote(parts.password) if parts.password else "",
            "database": unquote(parts.path.lstrip("/")) or None,
        }
        for key, value in parse_qsl(parts.query):
            if key in ("unix_socket", "ssl_ca", "ssl_cert", "ssl_key"):
                params[key] = value
            else:
                raise NotSupported(
                    f"unknown MariaDB URL option {key!r}; supported: unix_socket, ssl_ca, "
                    "ssl_cert, ssl_key"
                )
        if not params["database"]:
            raise NotSupported(
                f"{display} names no database; add one, e.g. mysql://root@127.0.0.1/test"
            )
        return DatabaseURL("mysql", "", params, params["database"], display)
    if scheme.startswith("sqlite"):
        raise NotSupported(
            "SQLite cannot keep a prepared transaction across a crash or hand it to another "
            "process, so it cannot take part in two-phase commit; use PostgreSQL "
            "(twophase.connect() with no URL starts an embedded one) or MariaDB/MySQL"
        )
    raise NotSupported(
        f"unsupported database URL scheme {parts.scheme!r}; use postgresql:// or mysql:// "
        "(mariadb:// also works)"
    )


def url_from_env(url: str | None) -> str | None:
    """The given URL, else ``$TWOPHASE_URL``, else None (meaning: the embedded database)."""
    if url:
        return url
    return os.environ.get(ENV_URL) or None


def _display(scheme: str, user: str | None, host: str | None, port: int | None, path: str) -> str:
    who = f"{user}@" if user else ""
    where = f"{host or 'localhost'}{f':{port}' if port else ''}"
    return f"{scheme}://{who}{where}{path}"
