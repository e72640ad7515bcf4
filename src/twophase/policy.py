"""Access control: which principal may begin, commit or roll back which names.

A :class:`Policy` is a list of rules. Each rule names principals, actions and transaction
names as shell-style patterns (``*``, ``?``, ``[abc]``; case-sensitive) and an effect::

    policy = Policy([
        Rule(principals=["billing-*"], actions=["begin", "commit"], names=["billing:*"]),
        Rule(principals=["oncall"], actions=["commit", "rollback", "recover"], names=["*"]),
        Rule(principals=["*"], actions=["rollback"], names=["billing:audit-*"], effect="deny"),
    ])

An action is allowed when at least one ``allow`` rule matches and no ``deny`` rule does;
everything else is denied (default deny). Names are matched in full, namespace included
(``billing:invoice-42``). ``recover`` and ``reap`` act on whatever is in doubt, so they are
checked against the name ``*``: only rules whose names include the pattern ``*`` grant them.

The check runs before any SQL. A denial raises ``PermissionDenied`` and is audited. The
database keeps its own, independent rule on top: only the role that prepared a transaction
(or a superuser) may finish it; see docs/security.md.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from .errors import PermissionDenied

#: Every action a policy can grant.
ACTIONS = frozenset({"begin", "commit", "rollback", "recover", "reap", "prune"})
_EFFECTS = ("allow", "deny")
_RULE_KEYS = {"principals", "actions", "names", "effect"}


@dataclass(frozen=True)
class Rule:
    """Principals x actions x name patterns -> allow or deny."""

    principals: tuple[str, ...]
    actions: frozenset[str]
    names: tuple[str, ...]
    effect: str = "allow"

    def __init__(
        self,
        principals: Iterable[str],
        actions: Iterable[str],
        names: Iterable[str] = ("*",),
        effect: str = "allow",
    ) -> None:
        p, a = _patterns(principals, "principals"), _patterns(actions, "actions")
        n = _patterns(names, "names")
        unknown = sorted(set(a) - ACTIONS - {"*"})
        if unknown:
            raise ValueError(
                f"unknown action(s) {unknown} in a policy rule; use any of {sorted(ACTIONS)} or '*'"
            )
        if effect not in _EFFECTS:
            raise ValueError(f"a rule's effect must be 'allow' or 'deny', got {effect!r}")
        object.__setattr__(self, "principals", p)
        object.__setattr__(self, "actions", frozenset(ACTIONS if "*" in a else a))
        object.__setattr__(self, "names", n)
        object.__setattr__(self, "effect", effect)

    def matches(self, principal: str, action: str, name: str) -> bool:
        """Whether this rule speaks about the request."""
        return (
            action in self.actions
            and any(fnmatchcase(principal, p) for p in self.principals)
            and any(fnmatchcase(name, n) for n in self.names)
        )


class Policy:
    """An ordered set of rules; see the module docstring for how they combine."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        for rule in rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"a Policy takes Rule objects, got {type(rule).__name__}")
        self.rules = tuple(rules)

    def __repr__(self) -> str:
        return f"<Policy {len(self.rules)} rules>"

    def allows(self, principal: str | None, action: str, name: str) -> bool:
        """True if ``principal`` may do ``action`` on ``name``."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {sorted(ACTIONS)}")
        if principal is None:
            return False
        allowed = False
        for rule in self.rules:
            if rule.matches(principal, action, name):
                if rule.effect == "deny":
                    return False
                allowed = True
        return allowed

    def check(self, principal: str | None, action: str, name: str) -> None:
        """Raise ``PermissionDenied`` unless :meth:`allows`."""
        if self.allows(principal, action, name):
            return
        if principal is None:
            raise PermissionDenied(
                f"{action} of {name!r} denied: no principal is set and a policy is in force; "
                "pass principal= to connect() or wrap the call in "
                "twophase.context(principal=...)"
            )
        raise PermissionDenied(
            f"{action} of {name!r} denied to principal {principal!r} by the access policy; "
            "add a rule that allows it, or act as a principal that has one"
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "policy") -> Policy:
        """A policy from ``{"rule": [{"principals": [...], "actions": [...], ...}, ...]}``."""
        if not isinstance(data, Mapping) or set(data) - {"rule"}:
            raise ValueError(
                f"{source}: expected only a 'rule' list at the top level "
                "([[rule]] tables in TOML), got keys "
                f"{sorted(data) if isinstance(data, Mapping) else type(data).__name__}"
            )
        raw = data.get("rule", [])
        if not isinstance(raw, list):
            raise ValueError(f"{source}: 'rule' must be a list of tables")
        rules = []
        for n, item in enumerate(raw, 1):
            if not isinstance(item, Mapping):
                raise ValueError(f"{source}: rule {n} must be a table")
            extra = set(item) - _RULE_KEYS
            missing = {"principals", "actions"} - set(item)
            if extra or missing:
                raise ValueError(
                    f"{source}: rule {n}: "
                    + (f"unknown key(s) {sorted(extra)}; " if extra else "")
                    + (f"missing {sorted(missing)}; " if missing else "")
                    + f"a rule has {sorted(_RULE_KEYS)}"
                )
            try:
                rules.append(Rule(**item))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{source}: rule {n}: {exc}") from None
        return cls(rules)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """A policy from a TOML (``[[rule]]`` tables) or JSON file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read the policy file {str(p)!r}: {exc}") from None
        try:
            data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            kind = "JSON" if p.suffix == ".json" else "TOML"
            raise ValueError(f"{p}: not valid {kind}: {exc}") from None
        return cls.from_dict(data, source=str(p))


def _patterns(values: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    out = tuple(values)
    if not out or not all(isinstance(v, str) and v for v in out):
        raise ValueError(f"a rule's {what} must be a non-empty list of non-empty strings")
    return out
