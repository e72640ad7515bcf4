"""Shared fixtures: real PostgreSQL and MariaDB, sync and async databases, unique names."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

import twophase

PG_URL = os.environ.get("TWOPHASE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MY_URL = os.environ.get("TWOPHASE_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
URLS = {"postgresql": PG_URL, "mysql": MY_URL}


@pytest.fixture(params=["postgresql", "mysql"])
def dialect_name(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once per database."""
    return str(request.param)


@pytest.fixture
def url(dialect_name: str) -> str:
    """The test database URL of the current dialect."""
    return URLS[dialect_name]


@pytest.fixture
def db(url: str) -> Iterator[twophase.Database]:
    """A sync Database on the current dialect."""
    database = twophase.connect(url)
    yield database
    database.close()


@pytest.fixture
async def adb(url: str) -> AsyncIterator[twophase.AsyncDatabase]:
    """An async Database on the current dialect."""
    database = await twophase.connect_async(url)
    yield database
    await database.close()


@pytest.fixture
def txname() -> str:
    """A transaction name no other test (or earlier run) uses."""
    return f"t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def table(url: str) -> Iterator[str]:
    """A fresh `(id int primary key, status varchar(32))` table, dropped afterwards."""
    name = f"tp_test_{uuid.uuid4().hex[:10]}"
    with twophase.connect(url, pool_max=2) as admin:
        admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, status varchar(32))")
        yield name
        _rollback_leftovers(admin)
        admin.execute(f"DROP TABLE IF EXISTS {name}")


def _rollback_leftovers(database: twophase.Database) -> None:
    # A failing test may leave a transaction prepared; it would hold locks on the table.
    for p in database.prepared():
        if p.full_name.startswith("t_"):
            with contextlib.suppress(twophase.TwoPhaseError):
                database.rollback_distributed(p.full_name)
