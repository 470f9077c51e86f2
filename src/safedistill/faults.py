"""Fault injection for the fault-injection tests: SAFEDISTILL_FAULT=NAME[:N] kills this process
with SIGKILL (no cleanup, like a power cut or the OOM killer) the N-th time (default 1st) the run
reaches point NAME; SAFEDISTILL_FAULT=NAME[:N]:wait instead pauses there, with the run's lock
held, until the file SAFEDISTILL_WAIT_FILE exists (it writes SAFEDISTILL_WAIT_FILE.reached
first), so a test can act on a run mid-way. Unset, a point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

POINTS = ("base-eval", "context-search", "step", "checkpoint", "final-save", "final-eval")
_seen: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("SAFEDISTILL_FAULT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    nth, _, action = rest.partition(":")
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != int(nth or 1):
        return
    if action == "wait":
        release = Path(os.environ["SAFEDISTILL_WAIT_FILE"])
        Path(f"{release}.reached").write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    os.kill(os.getpid(), signal.SIGKILL)
