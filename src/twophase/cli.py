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
  document on stdout); commands with data take :func:`json_option`.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import Coordinator, __version__, connect
from ._sync.database import Database
from .demo import DemoFailed, run_demo
from .errors import TwoPhaseError
from .protocol import PreparedTransaction, Status

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
     also exits 1 while a branch stays in doubt (participant down)
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
    """Connection choices gathered from the group's and the command's options."""

    url: str | None = None
    namespace: str | None = None

    def connect(self) -> Database:
        """Open the database (None URL: $TWOPHASE_URL, else the embedded PostgreSQL)."""
        return connect(self.url, namespace=self.namespace)


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # The same option may appear on the group and on the command; the later (command) one
    # wins, and an option that was not given must not erase the group's value.
    if value is not None and param.name is not None:
        setattr(ctx.ensure_object(Settings), param.name, value)


def connection_options(f: F) -> F:
    """Add ``--url`` and ``--namespace`` to a command (or the group)."""
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


def _listing_json(items: Iterable[PreparedTransaction], sla: timedelta) -> list[dict[str, Any]]:
    out = []
    for p in items:
        age = p.age
        out.append(
            {
                "name": p.name,
                "full_name": p.full_name,
                "database": p.database,
                "prepared_at": iso(p.prepared_at),
                "age_seconds": None if age is None else round(age.total_seconds(), 3),
                "over_sla": age is not None and age > sla,
            }
        )
    return out


def _show_prepared(db: Database, sla: timedelta, as_json: bool) -> None:
    items = db.prepared()
    if as_json:
        emit_json(_listing_json(items, sla))
        return
    console = make_console(wide_when_piped=True)
    where = escape(db.display_url) + (
        f" (namespace {escape(db.namespace)})" if db.namespace else ""
    )
    if not items:
        console.print(f"No prepared transactions in {where}.")
        return
    over = 0
    table = Table()
    table.add_column("Name", overflow="fold")
    table.add_column("Database")
    table.add_column("Prepared at (UTC)")
    table.add_column("Age", justify="right")
    for p in items:
        age = p.age
        late = age is not None and age > sla
        over += late
        when = p.prepared_at
        prepared_at = when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if when else "-"
        # The marker keeps the highlight visible without colour (NO_COLOR, pipes).
        age_text = format_age(age) + (" > SLA" if late else "")
        table.add_row(
            escape(p.name),
            escape(p.database),
            prepared_at,
            age_text,
            style="bold red" if late else None,
        )
    # Title and summary as plain lines: a table title would wrap at the table's width.
    console.print(f"Prepared transactions in {where}:")
    console.print(table)
    late_text = f"[bold red]{over}[/]" if over else "none"
    console.print(f"{len(items)} prepared; {late_text} older than the {format_sla(sla)} SLA")


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


def _load_coordinator(
    ctx: click.Context, config: str | None, participants: tuple[str, ...], log_key: str | None
) -> Coordinator:
    """A Coordinator from ``--participant KEY=URL`` options and/or a TOML config file.

    The file (``--config`` or ``$TWOPHASE_CONFIG``) looks like::

        log = "orders"
        namespace = "shop"          # optional
        [participants]
        orders = "postgresql://app@db1/orders"
        billing = "mysql://app@db3/billing"
    """
    urls: dict[str, str] = {}
    namespace = ctx.ensure_object(Settings).namespace
    path = config or os.environ.get("TWOPHASE_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise click.UsageError(f"cannot read the config file {path}: {exc}") from exc
        urls.update({str(k): str(v) for k, v in doc.get("participants", {}).items()})
        log_key = log_key or doc.get("log")
        namespace = namespace or doc.get("namespace")
    for item in participants:
        key, sep, url = item.partition("=")
        if not sep or not key or not url:
            raise click.UsageError(f"--participant takes KEY=URL, got {item!r}")
        urls[key] = url
    if not urls:
        raise click.UsageError(
            "name the participant databases: --participant KEY=URL (repeat it) or --config FILE"
        )
    if log_key is None:
        raise click.UsageError("name the participant that keeps the decision log: --log KEY")
    dbs = {key: connect(url) for key, url in urls.items()}
    for db in dbs.values():
        ctx.call_on_close(db.close)
    return Coordinator(dbs, log=log_key, namespace=namespace)


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
    reached or an error occurred (run it again later).
    """
    coord = _load_coordinator(ctx, config, participants, log_key)
    console = make_console(wide_when_piped=True)
    if as_json:
        report = coord.recover(dry_run=dry_run)
        emit_json({"dry_run": dry_run, **report.as_dict()})
    else:
        with console.status("recovering: listing prepared branches on every participant..."):
            report = coord.recover(dry_run=dry_run)
        table = Table(title="dry run: nothing changed" if dry_run else "recovery")
        for column in ("global", "participant", "branch", "action"):
            table.add_column(column)
        shown = report.actions if verbose else report.actions[:_MAX_ROWS]
        for gtrid, participant, branch, action in shown:
            table.add_row(gtrid, participant, branch, action.replace("_", " "))
        if report.actions:
            console.print(table)
        if len(shown) < len(report.actions):
            console.print(f"... and {len(report.actions) - len(shown)} more (--verbose lists all)")
        console.print(
            f"committed {report.committed}, rolled back {report.rolled_back}, "
            f"waiting {report.waiting}, skipped {report.skipped}, in doubt {report.in_doubt}, "
            f"compensations {report.compensations}"
        )
        for error in report.errors:
            console.print(f"[red]error:[/] {error}")
    if report.errors or report.in_doubt:
        ctx.exit(1)


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
    """The decision and audit events of the global transaction NAME."""
    coord = _load_coordinator(ctx, config, participants, log_key)
    decision = coord.status(name)
    events = coord.history(name)
    if as_json:
        emit_json(
            {
                "name": name,
                "decision": decision.value,
                "events": [{**e, "at": iso(e["at"])} for e in events],
            }
        )
        return
    console = make_console(wide_when_piped=True)
    console.print(f"{name}: decision {decision.value}")
    table = Table()
    for column in ("at", "event", "participant", "branch", "outcome", "actor", "detail"):
        table.add_column(column)
    for e in events:
        table.add_row(
            iso(e["at"]) or "",
            *(str(e[c]) if e[c] is not None else "" for c in ("event", "participant", "branch")),
            *(str(e[c]) if e[c] is not None else "" for c in ("outcome", "actor", "detail")),
        )
    console.print(table)


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
