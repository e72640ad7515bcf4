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


_NAMES = pytest.StashKey[list[str]]()


def _names_of(request: pytest.FixtureRequest) -> list[str]:
    return request.node.stash.setdefault(_NAMES, [])


@pytest.fixture
def txname(request: pytest.FixtureRequest) -> str:
    """A transaction name no other test (or earlier run) uses; rolled back if left prepared."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    _names_of(request).append(name)
    return name


@pytest.fixture
def table(url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh `(id int primary key, status varchar(32))` table, dropped afterwards."""
    name = f"tp_test_{uuid.uuid4().hex[:10]}"
    with twophase.connect(url, pool_max=2) as admin:
        admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, status varchar(32))")
        yield name
        # Only this test's own names: other tests' transactions are none of our business.
        for leftover in _names_of(request):
            with contextlib.suppress(twophase.TwoPhaseError):
                if admin.status(leftover) is twophase.Status.PREPARED:
                    admin.rollback_distributed(leftover)
        # A transaction prepared by hand and left behind would hold a lock on the table;
        # time out (and leave the table) rather than hang the suite.
        with contextlib.suppress(twophase.TwoPhaseError):
            if admin.dialect.name == "postgresql":
                with admin.transaction() as tx:
                    tx.execute("SET LOCAL lock_timeout = '10s'")
                    tx.execute(f"DROP TABLE IF EXISTS {name}")
            else:
                timeout = "SET STATEMENT lock_wait_timeout = 10 FOR"
                admin.execute(f"{timeout} DROP TABLE IF EXISTS {name}")
