#!/usr/bin/env python3
"""Generate twophase's sync modules from their async source (``_async/`` -> ``_sync/``).

The async code is the one source of truth; the sync twin is derived by a token-level rewrite
(drop ``await``/``async``, rename ``Async*`` names and the twin helpers), then formatted with
ruff. ``--check`` fails when a checked-in sync module differs from what would be generated,
so the two can never drift.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "twophase" / "_async"
DST = ROOT / "src" / "twophase" / "_sync"

# Names that do not follow the "strip a leading Async" rule.
RENAMES = {
    "_acompat": "_compat",
    "_async": "_sync",
    "aiomysql": "pymysql",
    "asynccontextmanager": "contextmanager",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "__aiter__": "__iter__",
    "__anext__": "__next__",
    "aclose": "close",
    "enter_async_context": "enter_context",
    "StopAsyncIteration": "StopIteration",
    "connect_async": "connect",
    "ARows": "Rows",
    "AFirst": "FirstRow",
    "AwaitableT": "T",
}

HEADER = (
    "# WARNING: generated from twophase/_async/{name} by tools/async_to_sync.py.\n"
    "# Edit the async source and run `python tools/async_to_sync.py`; CI checks they agree.\n"
)


def rename(name: str) -> str:
    """The sync twin of an async name."""
    if name in RENAMES:
        return RENAMES[name]
    if name.startswith("Async") and len(name) > 5 and name[5].isupper():
        return name[5:]
    if name.startswith("_Async") and len(name) > 6 and name[6].isupper():
        return "_" + name[6:]
    return name


def convert(source: str) -> str:
    """Rewrite one async module's text into its sync twin (before formatting)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    edits: list[tuple[tokenize.TokenInfo, str | None]] = []  # None: drop the token
    # ``Awaitable[X]`` becomes ``X``: the bracket depths whose closing bracket to drop.
    unwrap_depths: list[int] = []
    depth = 0
    skip_bracket = False
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        new: str | None = tok.string
        if tok.type == tokenize.OP and tok.string == "[":
            depth += 1
            if skip_bracket:
                skip_bracket = False
                new = None
        elif tok.type == tokenize.OP and tok.string == "]":
            depth -= 1
            if unwrap_depths and unwrap_depths[-1] == depth:
                unwrap_depths.pop()
                new = None
        elif tok.type == tokenize.NAME:
            if tok.string == "Awaitable" and nxt is not None and nxt.string == "[":
                unwrap_depths.append(depth)
                skip_bracket = True
                new = None
            elif tok.string == "await" or (
                tok.string == "async" and nxt is not None and nxt.string in ("def", "with", "for")
            ):
                new = None
            else:
                new = rename(tok.string)
        elif tok.type in (tokenize.STRING, tokenize.COMMENT):
            new = _rename_words(tok.string)
        edits.append((tok, new))
    return _untokenize(source, edits)


def _rename_words(text: str) -> str:
    word = ""
    result: list[str] = []
    for ch in text + "\0":
        if ch.isalnum() or ch == "_":
            word += ch
            continue
        if word:
            result.append(rename(word))
            word = ""
        result.append(ch)
    return "".join(result)[:-1]


def _untokenize(source: str, edits: list[tuple[tokenize.TokenInfo, str | None]]) -> str:
    # Copy the original text between tokens, except the blank that followed a dropped token.
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def offset(pos: tuple[int, int]) -> int:
        return starts[pos[0] - 1] + pos[1]

    out: list[str] = []
    prev_end = 0
    prev_dropped = False
    for tok, new in edits:
        if tok.type == tokenize.ENDMARKER:
            break
        gap = source[prev_end : offset(tok.start)]
        if not prev_dropped or "\n" in gap:
            out.append(gap)
        out.append(new or "")
        prev_end = offset(tok.end)
        prev_dropped = new is None
    out.append(source[prev_end:])
    return "".join(out)


def generate(path: Path) -> str:
    """The formatted sync twin of ``path``."""
    text = HEADER.format(name=path.name) + convert(path.read_text())
    ruff = [sys.executable, "-m", "ruff"]
    fixed = (
        subprocess.run(
            [
                *ruff,
                "check",
                "--fix-only",
                "--quiet",
                "--select",
                "I,F401",
                "--stdin-filename",
                str(DST / path.name),
                "-",
            ],
            input=text,
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        ).stdout
        or text
    )
    return subprocess.run(
        [*ruff, "format", "--quiet", "--stdin-filename", str(DST / path.name), "-"],
        input=fixed,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout


def main() -> int:
    """Write (or with --check, compare) every sync twin."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a sync module is stale")
    args = parser.parse_args()
    DST.mkdir(exist_ok=True)
    stale = []
    for src in sorted(SRC.glob("*.py")):
        target = DST / src.name
        text = generate(src)
        if args.check:
            if not target.exists() or target.read_text() != text:
                stale.append(target)
        else:
            target.write_text(text)
    if stale:
        for t in stale:
            print(f"stale: {t.relative_to(ROOT)} (run: python tools/async_to_sync.py)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
