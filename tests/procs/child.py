"""Child programs of tests/procs as real processes: their stdout lines on a queue, SIGKILL."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROCS = Path(__file__).parent
# Start-up of a child (interpreter, drivers, first connection) plus slack for a busy machine.
LINE_TIMEOUT = 30.0


class Child:
    """A child program of tests/procs whose stdout lines arrive on a queue."""

    def __init__(self, program: str, *args: str) -> None:
        # Closed in cleanup(): the child writes to it for as long as it lives.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(PROCS / program), *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        # A reader thread, so waiting for a line can time out instead of blocking forever.
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def wait_for(self, prefix: str) -> str:
        """The next stdout line starting with ``prefix``; fails if the child dies first."""
        try:
            while True:
                line = self._lines.get(timeout=LINE_TIMEOUT)
                if line is None:
                    self.proc.wait()
                    raise AssertionError(
                        f"child exited ({self.proc.returncode}) before {prefix!r}:\n"
                        + self.stderr()
                    )
                if line.startswith(prefix):
                    return line
        except queue.Empty:
            raise AssertionError(
                f"child printed no {prefix!r} within {LINE_TIMEOUT}s:\n{self.stderr()}"
            ) from None

    def sigkill(self) -> None:
        """A real crash: SIGKILL, then reap it and check it died of the signal."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        assert self.proc.returncode == -signal.SIGKILL, self.stderr()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@contextlib.contextmanager
def children() -> Iterator[Any]:
    """``start(program, *args)``; children still running at the end are killed (ours only)."""
    started: list[Child] = []

    def start(program: str, *args: str) -> Child:
        child = Child(program, *args)
        started.append(child)
        return child

    try:
        yield start
    finally:
        for child in started:
            child.cleanup()
