"""The ``twophase`` command: inspect and finish distributed transactions, and run the demo.

Layout, so that later commands (recover, reap, history, metrics, relay) slot in:

* :func:`cli` is the click group. Its :class:`_Group` turns every expected error
  (:data:`_EXPECTED_ERRORS`) into exit code 1 with a one-line message on stderr, so no
  command needs its own ``try``.
* :class:`Settings` (the context object) holds the connection choices. ``--url`` and
  ``--namespace`` are accepted before the command (``twophase --url X status``) and after
  it (``twophase status --url X``); :func:`connection_options` adds them to a command.
* :func:`open_db` connects lazily and closes the database when the command ends.
* Output goes through :func:`make_console` (human, rich) or :func:`emit_json` (one JSON
  document on stdout); commands with data take :func:`json_option`. Progress of long work
  goes to :func:`make_err_console` (stderr), and only when it is a terminal.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import Coordinator, __version__, connect
from ._sync.database import Database
from .demo import DemoFailed, run_demo
from .errors import TwoPhaseError
from .observe.events import Event, Observer, Outcome, Step
from .policy import Policy
from .protocol import PreparedTransaction, ReapReport, Status

if TYPE_CHECKING:
    from .observe.metrics import Metrics

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes scripts can rely on (also in ``--help``).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # click's own code for usage errors

DEFAULT_SLA = timedelta(seconds=60)

_MAX_ROWS = 50  # actions listed by `recover` without --verbose

_EPILOG = """\b
Connection: --url URL, else $TWOPHASE_URL, else the embedded PostgreSQL
(started on first use; data in ./.twophase/pg or $TWOPHASE_DATA_DIR).
--url and --namespace may be given before or after the command.

\b
Exit codes:
  0  success; `status NAME` exits 0 for every status, unknown included
  1  a twophase error (unknown transaction, invalid name, database
     unreachable, ...); the message is printed on stderr. `recover`
     also exits 1 while a branch stays in doubt (participant down),
     `reap` when a rollback failed
  2  usage error: unknown option, missing or malformed argument

\b
--json prints one JSON document on stdout: a list of objects for
listings, {"name": ..., "status": ...} for one transaction; times are
ISO 8601 (UTC) and ages are in seconds.
"""

_STATUS_STYLE = {
    Status.PREPARED: "yellow",
    Status.COMMITTED: "green",
    Status.ROLLED_BACK: "red",
    Status.UNKNOWN: "dim",
}


# -- settings and connection ---------------------------------------------------------------


@dataclass
class Settings:
    """Connection and identity choices gathered from the group's and the command's options."""

    url: str | None = None
    namespace: str | None = None
    principal: str | None = None
    policy: str | None = None
    no_audit: bool = False

    def connect(self) -> Database:
        """Open the database (None URL: $TWOPHASE_URL, else the embedded PostgreSQL)."""
        return self.open(self.url, namespace=self.namespace)

    def open(self, url: str | None, *, namespace: str | None = None) -> Database:
        """Connect to ``url`` as the operator: principal, policy and audit applied.

        What an operator does by hand (commit, rollback, recover, reap) is audited in the
        database it touches unless --no-audit (or TWOPHASE_AUDIT=0) says otherwise.
        """
        audit = not self.no_audit and os.environ.get("TWOPHASE_AUDIT", "1") not in _FALSE
        return connect(
            url,
            namespace=namespace,
            principal=self.principal or os.environ.get("TWOPHASE_PRINCIPAL") or _os_user(),
            policy=self._policy(),
            audit=audit,
        )

    def _policy(self) -> Policy | None:
        path = self.policy or os.environ.get("TWOPHASE_POLICY")
        if not path:
            return None
        try:
            return Policy.from_file(path)
        except ValueError as exc:
            raise click.UsageError(f"--policy: {exc}") from None


_FALSE = ("0", "false", "no", "off")


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        return None


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # The same option may appear on the group and on the command; the later (command) one
    # wins, and an option that was not given must not erase the group's value.
    if value is not None and param.name is not None:
        setattr(ctx.ensure_object(Settings), param.name, value)


def connection_options(f: F) -> F:
    """Add ``--url``, ``--namespace`` and the identity options to a command (or the group)."""
    f = click.option(
        "--no-audit",
        is_flag=True,
        default=None,
        expose_value=False,
        callback=_remember,
        help="Do not record this command's steps in twophase_audit_log (or TWOPHASE_AUDIT=0).",
    )(f)
    f = click.option(
        "--policy",
        metavar="FILE",
        expose_value=False,
        callback=_remember,
        help="Access policy (TOML or JSON) to enforce. Default: $TWOPHASE_POLICY.",
    )(f)
    f = click.option(
        "--principal",
        metavar="NAME",
        expose_value=False,
        callback=_remember,
        help="Who acts, for the policy and the audit trail. Default: $TWOPHASE_PRINCIPAL, "
        "else the OS user.",
    )(f)
    f = click.option(
        "--namespace",
        metavar="NS",
        expose_value=False,
        callback=_remember,
        help="Namespace of the transaction names (the library's connect(namespace=...)).",
    )(f)
    f = click.option(
        "--url",
        metavar="URL",
        expose_value=False,
        callback=_remember,
        help="Database URL (postgresql://... or mysql://...). "
        "Default: $TWOPHASE_URL, else the embedded PostgreSQL.",
    )(f)
    return f


def open_db(ctx: click.Context) -> Database:
    """Connect with the current settings; the database closes when the command ends."""
    db = ctx.ensure_object(Settings).connect()
    ctx.call_on_close(db.close)
    return db


# -- output --------------------------------------------------------------------------------


def make_console(*, wide_when_piped: bool = False) -> Console:
    """A rich console for stdout.

    Rich already honours NO_COLOR (and FORCE_COLOR) and writes no styling at all when stdout
    is not a terminal. ``wide_when_piped`` gives a pipe a wide virtual width so table rows
    are not wrapped in the middle of a name (unless $COLUMNS says otherwise).
    """
    console = Console(highlight=False)
    if wide_when_piped and not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200
    return console


def make_err_console() -> Console:
    """A rich console for stderr: progress and warnings, never the command's data."""
    return Console(stderr=True, highlight=False)


def emit_json(document: object) -> None:
    """Print ``document`` as the command's single JSON document on stdout."""
    click.echo(json.dumps(document, indent=2))


def json_option(f: F) -> F:
    """Add ``--json`` (machine-readable output) to a command; passed as ``as_json``."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON document instead of text."
    )(f)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC, or None."""
    return None if moment is None else moment.astimezone(UTC).isoformat()


def format_sla(sla: timedelta) -> str:
    """A duration the way ``--sla`` takes it: ``90s``, ``5m``, ``2h``, ``1.5s``."""
    seconds = sla.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def format_age(age: timedelta | None) -> str:
    """A short human age: ``4s``, ``2m 05s``, ``1h 02m``, ``3d 04h``."""
    if age is None:
        return "-"
    seconds = max(0, int(age.total_seconds()))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


# -- durations -----------------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+|\d+(?:\.\d+)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")


def parse_duration(text: str) -> timedelta:
    """``30s``, ``5m``, ``1h30m``, ``1.5h``, ``250ms``, or plain seconds; else ValueError."""
    cleaned = text.strip().lower()
    if not _DURATION.fullmatch(cleaned):
        raise ValueError(f"{text!r} is not a duration; use e.g. 30s, 5m, 1h30m or 90")
    seconds = sum(
        float(m.group(1)) * _UNITS[m.group(2) or "s"] for m in _DURATION_PART.finditer(cleaned)
    )
    return timedelta(seconds=seconds)


def _duration_option(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    # A callback rather than a click.ParamType subclass: ParamType became generic in click
    # 8.2, and one spelling cannot satisfy both mypy there and click 8.1 at run time.
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc  # exit 2


def sla_option(f: F) -> F:
    """Add ``--sla DURATION``: prepared transactions older than this are highlighted."""
    return click.option(
        "--sla",
        metavar="DURATION",
        default="60s",
        callback=_duration_option,
        show_default=True,
        help="Highlight transactions prepared longer ago than this (30s, 5m, 1h...).",
    )(f)


def older_than_option(help: str, *, above_zero: bool = False) -> Callable[[F], F]:
    """Add a required ``--older-than DURATION`` (``above_zero``: 0s is refused)."""

    def callback(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
        duration = _duration_option(ctx, param, value)
        if above_zero and duration <= timedelta(0):
            raise click.BadParameter("must be above zero", ctx=ctx, param=param)  # exit 2
        return duration

    return click.option(
        "--older-than",
        "older_than",
        metavar="DURATION",
        required=True,
        callback=callback,
        help=help,
    )


# -- the group -----------------------------------------------------------------------------


#: Errors that mean "the operation failed", not "twophase has a bug": exit 1, no traceback.
_EXPECTED_ERRORS: tuple[type[Exception], ...] = (TwoPhaseError, DemoFailed)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _EXPECTED_ERRORS as exc:
            # The class name lets scripts tell errors apart without parsing prose.
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@click.group(
    cls=_Group,
    epilog=_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@connection_options
@click.version_option(__version__, prog_name="twophase")
def cli() -> None:
    """Inspect and finish twophase distributed transactions (two-phase commit)."""
    # The context object is created by the option callbacks; make sure it exists anyway.
    click.get_current_context().ensure_object(Settings)


# -- status / prepared ---------------------------------------------------------------------


def _prepared_json(p: PreparedTransaction) -> dict[str, Any]:
    age = p.age
    return {
        "name": p.name,
        "full_name": p.full_name,
        "database": p.database,
        "branch": p.branch,
        "prepared_at": iso(p.prepared_at),
        "age_seconds": None if age is None else round(age.total_seconds(), 3),
    }


def _listing_json(items: Iterable[PreparedTransaction], sla: timedelta) -> list[dict[str, Any]]:
    out = []
    for p in items:
        age = p.age
        out.append({**_prepared_json(p), "over_sla": age is not None and age > sla})
    return out


def _where(db: Database) -> str:
    return escape(db.display_url) + (f" (namespace {escape(db.namespace)})" if db.namespace else "")


def _prepared_at_text(p: PreparedTransaction) -> str:
    when = p.prepared_at
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if when else "-"


def _show_prepared(db: Database, sla: timedelta, as_json: bool) -> None:
    items = db.prepared()
    if as_json:
        emit_json(_listing_json(items, sla))
        return
    console = make_console(wide_when_piped=True)
    where = _where(db)
    if not items:
        console.print(f"No prepared transactions in {where}.")
        return
    over = 0
    branches = any(p.branch for p in items)
    table = Table()
    table.add_column("Name", overflow="fold")
    if branches:
        table.add_column("Branch")
    table.add_column("Database")
    table.add_column("Prepared at (UTC)")
    table.add_column("Age", justify="right")
    for p in items:
        age = p.age
        late = age is not None and age > sla
        over += late
        # The marker keeps the highlight visible without colour (NO_COLOR, pipes).
        age_text = format_age(age) + (" > SLA" if late else "")
        cells = [escape(p.name)]
        if branches:
            cells.append(escape(p.branch or "-"))
        cells += [escape(p.database), _prepared_at_text(p), age_text]
        table.add_row(*cells, style="bold red" if late else None)
    # Title and summary as plain lines: a table title would wrap at the table's width.
    console.print(f"Prepared transactions in {where}:")
    console.print(table)
    late_text = f"[bold red]{over}[/]" if over else "none"
    oldest = max((p.age for p in items if p.age is not None), default=None)
    console.print(
        f"{len(items)} prepared; {late_text} older than the {format_sla(sla)} SLA"
        + (f"; oldest {format_age(oldest)}" if oldest is not None else "")
    )
    if branches:
        console.print("Branches of global transactions are finished by `twophase recover`.")


def _show_status(name: str, status: Status, as_json: bool) -> None:
    if as_json:
        emit_json({"name": name, "status": str(status)})
        return
    style = _STATUS_STYLE[status]
    make_console().print(f"{escape(name)}: [{style}]{status}[/]")


@cli.command("status")
@click.argument("name", required=False)
@sla_option
@json_option
@connection_options
@click.pass_context
def status_command(ctx: click.Context, name: str | None, sla: timedelta, as_json: bool) -> None:
    """Without NAME: list prepared transactions. With NAME: its status.

    The status is one of prepared, committed, rolled_back, unknown; the command exits 0
    for all of them.
    """
    db = open_db(ctx)
    if name is None:
        _show_prepared(db, sla, as_json)
    else:
        _show_status(name, db.status(name), as_json)


@cli.command("prepared")
@sla_option
@json_option
@connection_options
@click.pass_context
def prepared_command(ctx: click.Context, sla: timedelta, as_json: bool) -> None:
    """List prepared transactions, oldest first (same as `status` without NAME)."""
    _show_prepared(open_db(ctx), sla, as_json)


# -- commit / rollback ---------------------------------------------------------------------


@cli.command("commit")
@click.argument("name")
@json_option
@connection_options
@click.pass_context
def commit_command(ctx: click.Context, name: str, as_json: bool) -> None:
    """Commit the prepared transaction NAME. Safe to retry.

    Exits 0 if it is (or already was) committed; 1 if it was rolled back or is unknown.
    """
    open_db(ctx).commit_distributed(name)
    _show_status(name, Status.COMMITTED, as_json)


@cli.command("rollback")
@click.argument("name")
@json_option
@connection_options
@click.pass_context
def rollback_command(ctx: click.Context, name: str, as_json: bool) -> None:
    """Roll back the prepared transaction NAME. Safe to retry.

    Exits 0 if it is (or already was) rolled back; 1 if it was committed or is unknown.
    """
    open_db(ctx).rollback_distributed(name)
    _show_status(name, Status.ROLLED_BACK, as_json)


# -- reap ----------------------------------------------------------------------------------


def _reap_json(report: ReapReport) -> dict[str, Any]:
    return {
        "older_than_seconds": report.older_than.total_seconds(),
        "dry_run": report.dry_run,
        "reaped": [_prepared_json(p) for p in report.reaped],
        "skipped": [{**_prepared_json(p), "reason": r} for p, r in report.skipped],
        "failed": [{**_prepared_json(p), "error": e} for p, e in report.failed],
        "younger": report.younger,
    }


@cli.command("reap")
@older_than_option("Roll back transactions prepared longer ago than this (30s, 10m, 2h...).")
@click.option("--dry-run", is_flag=True, help="Report what would be rolled back; change nothing.")
@json_option
@connection_options
@click.pass_context
def reap_command(ctx: click.Context, older_than: timedelta, dry_run: bool, as_json: bool) -> None:
    """Roll back prepared transactions older than --older-than (abandoned by their owner).

    Only transactions of begin_distributed() are rolled back. Branches of global
    transactions are listed as skipped: `twophase recover` finishes them by the decision
    log once their deadline has passed. Exits 0 when every rollback succeeded, 1 when one
    failed (the others are still done).
    """
    db = open_db(ctx)
    report = db.reap(older_than, dry_run=dry_run)
    if as_json:
        emit_json(_reap_json(report))
    else:
        _show_reap(db, report)
    if report.failed:
        ctx.exit(EXIT_ERROR)


def _show_reap(db: Database, report: ReapReport) -> None:
    console = make_console(wide_when_piped=True)
    limit = format_sla(report.older_than)
    rows: list[tuple[PreparedTransaction, str, str | None]] = [
        (p, "would roll back" if report.dry_run else "rolled back", None) for p in report.reaped
    ]
    rows += [(p, f"skipped: {escape(r)}", "yellow") for p, r in report.skipped]
    rows += [(p, f"failed: {escape(e)}", "bold red") for p, e in report.failed]
    if report.dry_run:
        console.print("Dry run: nothing changed.")
    if rows:
        console.print(f"Prepared transactions older than {limit} in {_where(db)}:")
        table = Table()
        for column in ("Name", "Branch", "Database", "Prepared at (UTC)", "Age", "Action"):
            fold = column in ("Name", "Action")
            table.add_column(column, overflow="fold" if fold else "ellipsis")
        for p, action, style in rows:
            table.add_row(
                escape(p.name),
                escape(p.branch or "-"),
                escape(p.database),
                _prepared_at_text(p),
                format_age(p.age),
                action,
                style=style,
            )
        console.print(table)
    verb = "would roll back" if report.dry_run else "rolled back"
    failed = f"[bold red]{len(report.failed)}[/]" if report.failed else "0"
    console.print(
        f"{verb} {len(report.reaped)} older than {limit}; skipped {len(report.skipped)}; "
        f"failed {failed}; {report.younger} younger left alone"
    )
    if any(p.branch is not None for p, _ in report.skipped):
        console.print("Skipped branches: run `twophase recover`; it resolves them by deadline.")


@cli.command("prune-history")
@older_than_option(
    "Delete audit events recorded longer ago than this (90d, 2160h...).", above_zero=True
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; change nothing.")
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Rows deleted per statement.",
)
@json_option
@connection_options
@click.pass_context
def prune_history_command(
    ctx: click.Context, older_than: timedelta, dry_run: bool, batch: int, as_json: bool
) -> None:
    """Delete audit events older than --older-than from the database's audit log.

    Outcome and decision records are not touched (see prune-outcomes). The pruning is
    itself audited. Needs the policy's `prune`.
    """
    db = open_db(ctx)
    count = db.prune_history(older_than, dry_run=dry_run, batch=batch)
    report_prune(db, "audit events", count, older_than, dry_run, as_json)


@cli.command("prune-outcomes")
@older_than_option(
    "Forget transactions finished longer ago than this (30d, 720h...).", above_zero=True
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; change nothing.")
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=5_000,
    show_default=True,
    help="Records read per page of the walk through the table.",
)
@json_option
@connection_options
@click.pass_context
def prune_outcomes_command(
    ctx: click.Context, older_than: timedelta, dry_run: bool, batch: int, as_json: bool
) -> None:
    """Delete the outcome records of transactions finished before --older-than.

    A retried commit or rollback of a forgotten name gets "unknown transaction" instead of
    its true answer, and the name can be begun again: choose a window longer than anything
    may retry, recover or reap late. Prepared transactions are never touched. The pruning
    is audited. Needs the policy's `prune`.
    """
    db = open_db(ctx)
    count = db.prune_outcomes(older_than, dry_run=dry_run, batch=batch)
    report_prune(db, "outcome records", count, older_than, dry_run, as_json)


def report_prune(
    db: Database, what: str, count: int, older_than: timedelta, dry_run: bool, as_json: bool
) -> None:
    """How many ``what`` a prune deleted (or would have): JSON or a sentence."""
    if as_json:
        key = "would_delete" if dry_run else "deleted"
        emit_json(
            {"dry_run": dry_run, "older_than_seconds": older_than.total_seconds(), key: count}
        )
        return
    verb = "would delete" if dry_run else "deleted"
    make_console().print(
        f"{verb} {count} {what} older than {format_sla(older_than)} in {_where(db)}"
    )


# -- demo ----------------------------------------------------------------------------------


@cli.command("demo")
@click.option("--keep", is_flag=True, help="Keep this run's rows in the demo_* tables.")
@connection_options
@click.pass_context
def demo_command(ctx: click.Context, keep: bool) -> None:
    """Run the seed page's examples, step by step, on a real database.

    Four scenarios: an orchestrated commit, a rollback after a failing worker, a crash
    (child processes killed with SIGKILL) followed by a recovery scan, and an idempotent
    retry. Uses the tables demo_users, demo_jobs, demo_orders and demo_orchestration, and
    leaves nothing prepared.
    """
    settings = ctx.ensure_object(Settings)
    run_demo(settings.url, namespace=settings.namespace, console=make_console(), keep=keep)


# -- coordinator, relay and housekeeping ---------------------------------------------------


def _participant_urls(
    config: str | None, participants: tuple[str, ...]
) -> tuple[dict[str, str], dict[str, Any]]:
    """``--participant KEY=URL`` options over the TOML config file: the URLs by key, and
    the file's document (empty without a file)."""
    urls: dict[str, str] = {}
    doc: dict[str, Any] = {}
    path = config or os.environ.get("TWOPHASE_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise click.UsageError(f"cannot read the config file {path}: {exc}") from exc
        urls.update({str(k): str(v) for k, v in doc.get("participants", {}).items()})
    for item in participants:
        key, sep, url = item.partition("=")
        if not sep or not key or not url:
            raise click.UsageError(f"--participant takes KEY=URL, got {item!r}")
        urls[key] = url
    return urls, doc


def _load_coordinator(
    ctx: click.Context,
    config: str | None,
    participants: tuple[str, ...],
    log_key: str | None,
    observers: Sequence[Observer] | None = None,
) -> Coordinator:
    """A Coordinator from ``--participant KEY=URL`` options and/or a TOML config file.

    The file (``--config`` or ``$TWOPHASE_CONFIG``) looks like::

        log = "orders"
        namespace = "shop"          # optional
        [participants]
        orders = "postgresql://app@db1/orders"
        billing = "mysql://app@db3/billing"
    """
    namespace = ctx.ensure_object(Settings).namespace
    urls, doc = _participant_urls(config, participants)
    log_key = log_key or doc.get("log")
    namespace = namespace or doc.get("namespace")
    if not urls:
        raise click.UsageError(
            "name the participant databases: --participant KEY=URL (repeat it) or --config FILE"
        )
    if log_key is None:
        raise click.UsageError("name the participant that keeps the decision log: --log KEY")
    settings = ctx.ensure_object(Settings)
    dbs = {key: settings.open(url) for key, url in urls.items()}
    for db in dbs.values():
        ctx.call_on_close(db.close)
    return Coordinator(dbs, log=log_key, namespace=namespace, observers=observers)


def coordinator_options(f: F) -> F:
    """``--config``, ``--participant KEY=URL`` (repeatable) and ``--log KEY``."""
    f = click.option(
        "--log", "log_key", metavar="KEY", help="Participant keeping the decision log."
    )(f)
    f = click.option(
        "--participant",
        "participants",
        metavar="KEY=URL",
        multiple=True,
        help="A participant database (repeat for each); keys must match the coordinators'.",
    )(f)
    f = click.option(
        "--config",
        metavar="FILE",
        help="TOML file with log = KEY and a [participants] table. Default: $TWOPHASE_CONFIG.",
    )(f)
    return f


class _RecoverProgress:
    """A live line on stderr fed by the coordinator's recovery events."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task = self._progress.add_task(
            "recovering: listing prepared branches on every participant...", total=None
        )
        self._counts: Counter[str] = Counter()
        # Branches are finished concurrently, from several threads.
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if event.step is Step.RECOVER:
            key = str(event.outcome)
        elif event.step is Step.COMPENSATE and event.outcome is not Outcome.FAILED:
            key = "compensations"
        else:
            return
        with self._lock:
            self._counts[key] += 1
            c = self._counts
            text = (
                f"recovering: {c[Outcome.COMMITTED]} committed, "
                f"{c[Outcome.ROLLED_BACK]} rolled back, {c[Outcome.IN_DOUBT]} in doubt, "
                f"{c['compensations']} compensations"
            )
        self._progress.update(self._task, description=text)

    @contextmanager
    def shown(self) -> Iterator[None]:
        """Display it for the duration of the block."""
        with self._progress:
            yield


@cli.command("recover")
@click.option("--dry-run", is_flag=True, help="Report what would be done; change nothing.")
@click.option("--verbose", is_flag=True, help="List every action, not just the first 50.")
@coordinator_options
@json_option
@connection_options
@click.pass_context
def recover_command(
    ctx: click.Context,
    dry_run: bool,
    verbose: bool,
    config: str | None,
    participants: tuple[str, ...],
    log_key: str | None,
    as_json: bool,
) -> None:
    """Finish every in-doubt branch of global transactions by the decision log.

    Commits branches with a commit decision; rolls back undecided ones past their deadline
    and runs their compensations. Exits 0 when everything reachable was resolved (undecided
    branches within their deadline are left waiting), 1 when a participant could not be
    reached or an error occurred (run it again later). Progress is shown on stderr when it
    is a terminal.
    """
    err = make_err_console()
    progress = _RecoverProgress(err) if err.is_terminal else None
    coord = _load_coordinator(
        ctx, config, participants, log_key, observers=[progress] if progress else None
    )
    if progress is None:
        report = coord.recover(dry_run=dry_run)
    else:
        with progress.shown():
            report = coord.recover(dry_run=dry_run)
    if as_json:
        emit_json({"dry_run": dry_run, **report.as_dict()})
    else:
        console = make_console(wide_when_piped=True)
        table = Table(title="dry run: nothing changed" if dry_run else "recovery")
        for column in ("global", "participant", "branch", "action"):
            table.add_column(column)
        shown = report.actions if verbose else report.actions[:_MAX_ROWS]
        for gtrid, participant, branch, action in shown:
            table.add_row(
                escape(gtrid), escape(participant), escape(branch), action.replace("_", " ")
            )
        if report.actions:
            console.print(table)
        hidden = len(report.actions) - len(shown)
        if hidden:
            console.print(f"... and {hidden} more (--verbose lists them)")
        if report.actions_omitted:
            console.print(
                f"... and {report.actions_omitted} more not kept in the report "
                "(the counts below include them)"
            )
        console.print(
            f"committed {report.committed}, rolled back {report.rolled_back}, "
            f"waiting {report.waiting}, skipped {report.skipped}, in doubt {report.in_doubt}, "
            f"compensations {report.compensations}"
        )
        for error in report.errors:
            console.print(f"[red]error:[/] {escape(error)}")
        if report.errors_omitted:
            console.print(f"[red]... and {report.errors_omitted} more errors[/]")
    if report.errors or report.errors_omitted or report.in_doubt:
        ctx.exit(EXIT_ERROR)


@cli.command("history")
@click.argument("name")
@coordinator_options
@json_option
@connection_options
@click.pass_context
def history_command(
    ctx: click.Context,
    name: str,
    config: str | None,
    participants: tuple[str, ...],
    log_key: str | None,
    as_json: bool,
) -> None:
    """The audit trail of NAME: every recorded step, oldest first.

    With --url only: a transaction of that database (begin_distributed) and its status;
    NAME '*' lists the database-wide operator actions (reap, recover and prune denials,
    prune-history, prune-outcomes). With --participant/--config: a global transaction,
    its decision, and the events of its branches from every participant's audit log.
    """
    if name == "*" and (config is not None or participants):
        raise click.UsageError("'*' goes with --url only (a database's own audit log)")
    if config is None and not participants:
        db = open_db(ctx)
        if name == "*":
            verdict = ("scope", "database-wide operator actions")
        else:
            verdict = ("status", db.status(name).value)
        events = db.history(name)
    else:
        coord = _load_coordinator(ctx, config, participants, log_key)
        verdict = ("decision", coord.status(name).value)
        events = coord.history(name)
    if as_json:
        emit_json(
            {
                "name": name,
                verdict[0]: verdict[1],
                "events": [{k: _plain(v) for k, v in e.items()} for e in events],
            }
        )
        return
    console = make_console(wide_when_piped=True)
    console.print(f"{escape(name)}: {verdict[0]} {verdict[1]}")
    if not events:
        console.print("No audit events recorded (connect with audit=True to record them).")
        return
    # Columns from the events themselves, in a readable order: audit sources differ in
    # what they record (an event or a step, an actor or a principal, a duration...).
    keys = [k for e in events for k in e if k != "id"]
    columns = sorted(dict.fromkeys(keys), key=lambda k: _HISTORY_ORDER.get(k, len(_HISTORY_ORDER)))
    table = Table()
    for column in columns or ("at", "event"):
        table.add_column(column, overflow="fold" if column == "detail" else "ellipsis")
    for e in events:
        table.add_row(*(escape(_cell(e.get(c))) for c in columns))
    console.print(table)


_HISTORY_ORDER = {
    k: i
    for i, k in enumerate(
        (
            "at",
            "event",
            "step",
            "name",
            "gtrid",
            "participant",
            "branch",
            "outcome",
            "duration_ms",
            "actor",
            "principal",
            "correlation_id",
            "detail",
        )
    )
}


def _plain(value: Any) -> Any:
    """A JSON-friendly value: times as ISO 8601 UTC, other odd types as text."""
    if isinstance(value, datetime):
        return iso(value if value.tzinfo else value.replace(tzinfo=UTC))
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    plain = _plain(value)
    return plain if isinstance(plain, str) else str(plain)


@cli.command("relay")
@click.option("--to", "to", required=True, metavar="URL", help="redis://, amqp:// or nats:// URL.")
@click.option("--batch", default=500, show_default=True, help="Messages per round.")
@click.option(
    "--max-attempts", default=10, show_default=True, help="Failures before a dead letter."
)
@click.option("--until-idle", is_flag=True, help="Stop once nothing is pending.")
@json_option
@connection_options
@click.pass_context
def relay_command(
    ctx: click.Context, to: str, batch: int, max_attempts: int, until_idle: bool, as_json: bool
) -> None:
    """Deliver committed outbox messages to a broker until interrupted (Ctrl-C)."""
    from .relay import run_relay

    settings = ctx.ensure_object(Settings)
    try:
        stats = run_relay(
            settings.url, to, until_idle=until_idle, batch=batch, max_attempts=max_attempts
        )
    except KeyboardInterrupt:
        return
    document = {
        "delivered": stats.delivered,
        "failed": stats.failed,
        "dead": stats.dead,
        "batches": stats.batches,
    }
    if as_json:
        emit_json(document)
    else:
        make_console().print(", ".join(f"{k} {v}" for k, v in document.items()))


def _metrics_targets(
    ctx: click.Context, config: str | None, participants: tuple[str, ...], label: str | None
) -> list[tuple[str, Database]]:
    """The databases to read: each ``--participant`` (or the config file's), else --url."""
    namespace = ctx.ensure_object(Settings).namespace
    urls, doc = _participant_urls(config, participants)
    if not urls:
        db = open_db(ctx)
        return [(label or db.database, db)]
    if label is not None:
        raise click.UsageError("--label names the --url database; participants use their keys")
    targets = []
    for key, url in urls.items():
        db = connect(url, namespace=namespace or doc.get("namespace"))
        ctx.call_on_close(db.close)
        targets.append((key, db))
    return targets


def _new_registry() -> Any:
    # A registry of its own: the default one also carries this process's own metrics.
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        return None  # Metrics() then says what to install
    return CollectorRegistry()


def _refresh_all(metrics: Metrics, targets: list[tuple[str, Database]], *, strict: bool) -> None:
    for label, db in targets:
        try:
            metrics.refresh(db, participant=label)
        except TwoPhaseError as exc:
            if strict:
                raise
            # A server that keeps serving reports the database as down (up 0) instead.
            make_err_console().print(
                f"[yellow]warning:[/] cannot read {escape(label)}: {escape(str(exc))}"
            )


@cli.command("metrics")
@click.option("--port", type=int, metavar="N", help="Serve /metrics over HTTP on this port.")
@click.option(
    "--addr",
    default="0.0.0.0",
    show_default=True,
    metavar="ADDR",
    help="Address the HTTP server listens on.",
)
@click.option(
    "--interval",
    default=15.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    metavar="SECONDS",
    help="Seconds between two reads of the databases.",
)
@click.option("--once", is_flag=True, help="Print the metrics once (Prometheus text) and exit.")
@click.option(
    "--label", metavar="NAME", help="Participant label of the --url database (default: its name)."
)
@click.option(
    "--participant",
    "participants",
    metavar="KEY=URL",
    multiple=True,
    help="Read this database, labelled KEY (repeat it), instead of --url.",
)
@click.option("--config", metavar="FILE", help="TOML file with a [participants] table.")
@click.option(
    "--sla",
    metavar="DURATION",
    default="60s",
    callback=_duration_option,
    show_default=True,
    help="Prepared longer ago than this counts as stuck (30s, 5m, 1h...).",
)
@json_option
@connection_options
@click.pass_context
def metrics_command(
    ctx: click.Context,
    port: int | None,
    addr: str,
    interval: float,
    once: bool,
    label: str | None,
    participants: tuple[str, ...],
    config: str | None,
    sla: timedelta,
    as_json: bool,
) -> None:
    """Serve Prometheus metrics of prepared transactions and the outbox.

    Gauges per participant: prepared transactions, age of the oldest, how many are older
    than --sla, outbox pending/dead messages and oldest pending age. They are read every
    --interval seconds and served on http://ADDR:PORT/metrics until interrupted (Ctrl-C).
    With --once they are read once and printed (--json: one object per participant);
    exits 1 if a database cannot be read. Needs prometheus-client (twophase[metrics]).
    """
    if once == (port is not None):
        raise click.UsageError("give either --port N (serve) or --once (print and exit)")
    if as_json and not once:
        raise click.UsageError("--json goes with --once")
    from .observe.metrics import Metrics

    metrics = Metrics(_new_registry(), sla=sla)  # without prometheus_client: exit 1, clearly
    from prometheus_client import generate_latest, start_http_server

    registry = metrics.registry
    targets = _metrics_targets(ctx, config, participants, label)
    if once:
        _refresh_all(metrics, targets, strict=True)
        if as_json:
            emit_json([s.as_dict() for s in metrics.snapshots()])
        else:
            click.echo(generate_latest(registry).decode(), nl=False)
        return
    assert port is not None
    _refresh_all(metrics, targets, strict=False)
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {addr}:{port}: {exc}") from exc
    err = make_err_console()
    names = ", ".join(label for label, _ in targets)
    err.print(
        f"serving metrics of {escape(names)} on http://{addr}:{server.server_port}/metrics, "
        f"read every {interval:g}s (Ctrl-C stops)"
    )
    try:
        while True:
            time.sleep(interval)
            _refresh_all(metrics, targets, strict=False)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


@cli.command("prune-keys")
@json_option
@connection_options
@click.pass_context
def prune_keys_command(ctx: click.Context, as_json: bool) -> None:
    """Delete expired idempotency keys."""
    deleted = open_db(ctx).prune_idempotency_keys()
    if as_json:
        emit_json({"deleted": deleted})
    else:
        make_console().print(f"deleted {deleted} expired idempotency keys")


# -- entry point ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: ``twophase ...`` (exits with the codes in ``--help``)."""
    # click exits with 2 on usage errors, 1 on ClickException, and quietly on a broken pipe.
    cli.main(args=argv)
