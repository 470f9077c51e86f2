"""Fault injection for the fault-injection tests: SAFEDISTILL_FAULT=NAME[:N] kills this process
with SIGKILL (no cleanup, like a power cut or the OOM killer) the N-th time (default 1st) the run
reaches point NAME. Unset, a point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

POINTS = ("base-eval", "context-search", "step", "checkpoint", "final-save", "final-eval")
_seen: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("SAFEDISTILL_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
