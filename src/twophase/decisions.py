"""The coordinator's log tables (decisions, compensations, expected branches) as SQL; no I/O.

One row per global transaction in ``twophase_decision`` arbitrates its fate. Its primary key
is the global name, so exactly one of these inserts can ever succeed for a name:

- the coordinator's commit decision (written inside the decision branch, or on its own),
- a recovery process's rolled-back *fence*, written once the deadline has passed.

A ``pending`` row is written up front only when the transaction waits for branches that
other processes prepare (their names cannot be derived, so recovery must find them here);
its decision is then an UPDATE from ``pending``, which again only one writer can win.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .dialects import Dialect
from .names import PG_GID_PREFIX, TxName

DECISIONS = "twophase_decision"
COMPENSATIONS = "twophase_compensation"
EXPECTED = "twophase_expected"

_REASON = 64  # the reason column's width
_JSON_PLAIN = re.compile(r"[A-Za-z0-9_.:#\-]*")  # needs no JSON escaping

Statement = tuple[str, tuple[Any, ...] | None]


@dataclass(frozen=True, slots=True)
class BranchRef:
    """Where a branch lives: participant key and the branch's outcome-record name."""

    participant: str
    record: str

    def as_json(self) -> list[str]:
        """Compact form stored in the decision row."""
        return [self.participant, self.record]


@dataclass(frozen=True, slots=True)
class PreparedBranch:
    """A branch known to be prepared (or expected to be), on one participant."""

    participant: str
    name: TxName


#: How many actions and errors a :class:`RecoveryReport` keeps as samples by default.
REPORT_SAMPLES = 1000


@dataclass
class RecoveryReport:
    """What one ``recover()`` pass found and did.

    The counts are exact. ``actions`` (global name, participant, branch, action) and
    ``errors`` are samples: the first ``samples`` of each are kept, and ``actions_omitted``
    / ``errors_omitted`` count the rest, so a pass over any number of in-doubt branches
    holds a bounded report.
    """

    committed: int = 0
    rolled_back: int = 0
    waiting: int = 0  # undecided branches still within their deadline
    skipped: int = 0  # held by another recovery process, or decided meanwhile
    in_doubt: int = 0  # the participant could not be reached; the next pass retries
    compensations: int = 0
    actions: list[tuple[str, str, str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    actions_omitted: int = 0
    errors_omitted: int = 0
    samples: int = REPORT_SAMPLES

    def add_action(self, gtrid: str, participant: str, branch: str, action: str) -> None:
        """Record an action (kept as a sample while there is room, else counted)."""
        if len(self.actions) < self.samples:
            self.actions.append((gtrid, participant, branch, action))
        else:
            self.actions_omitted += 1

    def add_error(self, error: str) -> None:
        """Record an error (kept as a sample while there is room, else counted)."""
        if len(self.errors) < self.samples:
            self.errors.append(error)
        else:
            self.errors_omitted += 1

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for JSON."""
        return {
            "committed": self.committed,
            "rolled_back": self.rolled_back,
            "waiting": self.waiting,
            "skipped": self.skipped,
            "in_doubt": self.in_doubt,
            "compensations": self.compensations,
            "actions": [
                {"gtrid": g, "participant": p, "branch": b, "action": a}
                for g, p, b, a in self.actions
            ],
            "actions_omitted": self.actions_omitted,
            "errors": self.errors,
            "errors_omitted": self.errors_omitted,
        }


def encode_branches(branches: list[BranchRef]) -> str:
    """The decision row's ``branches`` column."""
    parts = []
    for b in branches:
        if not (_JSON_PLAIN.fullmatch(b.participant) and _JSON_PLAIN.fullmatch(b.record)):
            return json.dumps([b.as_json() for b in branches], separators=(",", ":"))
        parts.append(f'["{b.participant}","{b.record}"]')
    # Names are made of characters JSON writes as they are: the same text as json.dumps,
    # without building an encoder for every global transaction.
    return f"[{','.join(parts)}]"


def decode_branches(text: str | None) -> list[BranchRef]:
    """Inverse of :func:`encode_branches`."""
    return [BranchRef(p, r) for p, r in json.loads(text or "[]")]


class DecisionLog:
    """SQL for the log tables in one database."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        q = dialect.sql.quote_ident
        self.decisions, self.compensations = q(DECISIONS), q(COMPENSATIONS)
        self.expected = q(EXPECTED)
        self._pg = dialect.name == "postgresql"

    def schema(self) -> tuple[str, ...]:
        """CREATE TABLE IF NOT EXISTS for the three tables."""
        if self._pg:
            return (
                f"CREATE TABLE IF NOT EXISTS {self.decisions} ("
                " gtrid varchar(64) PRIMARY KEY,"
                " outcome varchar(16) NOT NULL"
                "  CHECK (outcome IN ('pending', 'committed', 'rolled_back')),"
                " deadline bigint NOT NULL,"
                " branches text NOT NULL DEFAULT '[]',"
                " reason varchar(64),"
                " decided_at timestamptz NOT NULL DEFAULT now())",
                f"CREATE TABLE IF NOT EXISTS {self.compensations} ("
                " gtrid varchar(64) NOT NULL, seq int NOT NULL,"
                " handler varchar(64) NOT NULL, payload text NOT NULL,"
                " state varchar(16) NOT NULL DEFAULT 'pending',"
                " attempts int NOT NULL DEFAULT 0, error text,"
                " updated_at timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (gtrid, seq))",
                f"CREATE TABLE IF NOT EXISTS {self.expected} ("
                " participant varchar(64) NOT NULL, record varchar(128) NOT NULL,"
                " gtrid varchar(64) NOT NULL, deadline bigint NOT NULL,"
                " PRIMARY KEY (participant, record))",
            )
        name = "VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin"
        return (
            f"CREATE TABLE IF NOT EXISTS {self.decisions} ("
            f" gtrid {name} NOT NULL PRIMARY KEY,"
            " outcome VARCHAR(16) NOT NULL,"
            " deadline BIGINT NOT NULL,"
            " branches TEXT NOT NULL,"
            " reason VARCHAR(64),"
            " decided_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)"
            ") ENGINE=InnoDB",
            f"CREATE TABLE IF NOT EXISTS {self.compensations} ("
            f" gtrid {name} NOT NULL, seq INT NOT NULL,"
            " handler VARCHAR(64) NOT NULL, payload TEXT NOT NULL,"
            " state VARCHAR(16) NOT NULL DEFAULT 'pending',"
            " attempts INT NOT NULL DEFAULT 0, error TEXT,"
            " updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),"
            " PRIMARY KEY (gtrid, seq)) ENGINE=InnoDB",
            f"CREATE TABLE IF NOT EXISTS {self.expected} ("
            " participant VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,"
            " record VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,"
            f" gtrid {name} NOT NULL, deadline BIGINT NOT NULL,"
            " PRIMARY KEY (participant, record)) ENGINE=InnoDB",
        )

    # -- decisions ---------------------------------------------------------------------

    def commit_inline(self, gtrid: str, deadline: int, branches: list[BranchRef]) -> str:
        """The commit decision as literal SQL, to ride in the decision branch's COMMIT trip.

        Literals are safe here: the global name passed the naming rule, the deadline is an
        int, and the branch list is quoted by the dialect's literal quoting.
        """
        lit = self.dialect.literal
        return (
            f"INSERT INTO {self.decisions} (gtrid, outcome, deadline, branches) VALUES "
            f"({lit(gtrid)}, 'committed', {int(deadline)}, {lit(encode_branches(branches))})"
        )

    def decide(
        self,
        gtrid: str,
        outcome: str,
        deadline: int,
        branches: list[BranchRef],
        reason: str | None = None,
    ) -> Statement:
        """Insert a decision; a duplicate-key error means another writer decided first."""
        return (
            f"INSERT INTO {self.decisions} (gtrid, outcome, deadline, branches, reason) "
            "VALUES (%s, %s, %s, %s, %s)",
            (gtrid, outcome, deadline, encode_branches(branches), _cut(reason)),
        )

    def fence(self, gtrid: str, deadline: int, branches: list[BranchRef], reason: str) -> Statement:
        """Insert a rolled-back decision unless one exists (rowcount 1 when this one won)."""
        verb = "INSERT" if self._pg else "INSERT IGNORE"
        tail = " ON CONFLICT DO NOTHING" if self._pg else ""
        return (
            f"{verb} INTO {self.decisions} (gtrid, outcome, deadline, branches, reason) "
            f"VALUES (%s, 'rolled_back', %s, %s, %s){tail}",
            (gtrid, deadline, encode_branches(branches), _cut(reason)),
        )

    def settle_pending(self, gtrid: str, outcome: str, reason: str | None) -> Statement:
        """Turn a pending row into a decision (rowcount 1 when this writer won)."""
        now = "now()" if self._pg else "CURRENT_TIMESTAMP(6)"
        return (
            f"UPDATE {self.decisions} SET outcome = %s, reason = %s, decided_at = {now} "
            "WHERE gtrid = %s AND outcome = 'pending'",
            (outcome, _cut(reason), gtrid),
        )

    def lookup(self, gtrids: list[str], *, lock: bool = False) -> Statement:
        """Decision rows of ``gtrids``; with ``lock``, those no other session holds."""
        where, params = self._among("gtrid", gtrids)
        tail = " FOR UPDATE SKIP LOCKED" if lock else ""
        return (
            f"SELECT gtrid, outcome, deadline, branches, reason FROM {self.decisions} "
            f"WHERE {where}{tail}",
            params,
        )

    def lock(self, gtrids: list[str]) -> Statement:
        """Lock the decision rows of ``gtrids`` that no other session holds; their names."""
        where, params = self._among("gtrid", gtrids)
        return (f"SELECT gtrid FROM {self.decisions} WHERE {where} FOR UPDATE SKIP LOCKED", params)

    def _among(self, column: str, values: list[str]) -> tuple[str, tuple[Any, ...]]:
        """``column`` is one of ``values``: one array parameter on PostgreSQL (one statement
        text whatever the count, so the server parses it once per session), a list of
        placeholders on MariaDB (whose drivers inline them)."""
        if self._pg:
            return f"{column} = ANY(%s)", (list(values),)
        return f"{column} IN ({', '.join(['%s'] * len(values))})", tuple(values)

    def expired_pending(self, now: float, limit: int, prefix: str) -> Statement:
        """Pending rows (of names starting with ``prefix``) past their deadline that no other
        session holds."""
        return (
            f"SELECT gtrid, outcome, deadline, branches, reason FROM {self.decisions} "
            "WHERE outcome = 'pending' AND deadline < %s AND LEFT(gtrid, %s) = %s "
            "ORDER BY deadline LIMIT %s FOR UPDATE SKIP LOCKED",
            (now, len(prefix), prefix, limit),
        )

    def expect(self, participant: str, record: str, gtrid: str, deadline: int) -> Statement:
        """Remember that ``record`` on ``participant`` is a branch of ``gtrid``."""
        return (
            f"INSERT INTO {self.expected} (participant, record, gtrid, deadline) "
            "VALUES (%s, %s, %s, %s)",
            (participant, record, gtrid, deadline),
        )

    def expected_of(self, participant: str, records: list[str], prefix: str) -> Statement:
        """Which of ``records`` (prepared on ``participant``) are expected branches."""
        where, params = self._among("record", records)
        return (
            f"SELECT record, gtrid, deadline FROM {self.expected} WHERE participant = %s "
            f"AND {where} AND LEFT(gtrid, %s) = %s",
            (participant, *params, len(prefix), prefix),
        )

    # -- compensations -----------------------------------------------------------------

    def add_compensation(self, gtrid: str, seq: int, handler: str, payload: Any) -> Statement:
        """Record a compensation to run if the transaction ends rolled back."""
        return (
            f"INSERT INTO {self.compensations} (gtrid, seq, handler, payload) "
            "VALUES (%s, %s, %s, %s)",
            (gtrid, seq, handler, json.dumps(payload)),
        )

    def due_compensations(self, limit: int, prefix: str) -> Statement:
        """Pending compensations of rolled-back transactions, claimed with SKIP LOCKED."""
        ns = "AND LEFT(c.gtrid, %s) = %s "
        return (
            f"SELECT c.gtrid, c.seq, c.handler, c.payload, c.attempts "
            f"FROM {self.compensations} c JOIN {self.decisions} d ON d.gtrid = c.gtrid "
            f"WHERE c.state = 'pending' AND d.outcome = 'rolled_back' {ns}"
            "ORDER BY c.gtrid, c.seq LIMIT %s FOR UPDATE OF c SKIP LOCKED"
            if self._pg
            else f"SELECT c.gtrid, c.seq, c.handler, c.payload, c.attempts "
            f"FROM {self.compensations} c JOIN {self.decisions} d ON d.gtrid = c.gtrid "
            f"WHERE c.state = 'pending' AND d.outcome = 'rolled_back' {ns}"
            "ORDER BY c.gtrid, c.seq LIMIT %s FOR UPDATE SKIP LOCKED",
            (len(prefix), prefix, limit),
        )

    def finish_compensation(self, gtrid: str, seq: int, state: str, error: str | None) -> Statement:
        """Mark a compensation done (or failed, counting the attempt)."""
        now = "now()" if self._pg else "CURRENT_TIMESTAMP(6)"
        return (
            f"UPDATE {self.compensations} SET state = %s, error = %s, "
            f"attempts = attempts + 1, updated_at = {now} WHERE gtrid = %s AND seq = %s",
            (state, error, gtrid, seq),
        )

    def compensations_of(self, gtrid: str) -> Statement:
        """Every compensation of one transaction."""
        return (
            f"SELECT seq, handler, payload, state, attempts, error FROM {self.compensations} "
            "WHERE gtrid = %s ORDER BY seq",
            (gtrid,),
        )


def _cut(reason: str | None) -> str | None:
    return reason if reason is None or len(reason) <= _REASON else reason[: _REASON - 3] + "..."


# -- listing prepared branches, a page at a time ------------------------------------------


def prepared_page(dialect: Dialect, after: str, limit: int, prefix: str) -> Statement | None:
    """The next page of a participant's prepared twophase transactions that recovery
    looks at, after the gid ``after`` (``""``: from the start), at most ``limit``; None
    when the database cannot list them in pages (MariaDB's XA RECOVER lists all at once).

    Keyset paging in gid order: a branch prepared or finished meanwhile never makes the
    scan skip or repeat another, and the branches of one global transaction come
    together. Listed are the branches of global transactions in the namespace
    ``prefix`` (``"<ns>:"``, or ``""`` for all) and every plain name (in any namespace):
    one of those may be a branch another process prepared for an ``expect()``.
    """
    if dialect.name != "postgresql":
        return None
    gid_prefix = PG_GID_PREFIX + prefix
    # COLLATE "C": byte order for the sort and the cursor alike, whatever the database's
    # collation.
    return (
        "SELECT gid, prepared, database FROM pg_prepared_xacts "
        "WHERE database = current_database() AND left(gid, %s) = %s "
        "AND (strpos(gid, '#') = 0 OR left(gid, %s) = %s) "
        'AND gid COLLATE "C" > %s ORDER BY gid COLLATE "C" LIMIT %s',
        (len(PG_GID_PREFIX), PG_GID_PREFIX, len(gid_prefix), gid_prefix, after, limit),
    )
