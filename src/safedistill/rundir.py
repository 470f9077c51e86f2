"""A run directory: the marker that makes a folder a safedistill run, the lock one process holds
on it for the run's life, and the names of the files a run writes. Those names are the only ones
a run ever deletes, and a folder without the marker is a run only when nothing else is in it.

The lock is an OS lock (flock) on the marker file: the kernel drops it when the process exits in
any way (a crash, SIGKILL, the OOM killer), so a stale lock never needs cleaning up by hand.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from .errors import UserError

MARKER = ".safedistill-run"

# What a run writes before its first step, besides its method's preparation (the METHODS rows'
# files, methods.prepared_files; augment.jsonl and harmful_filter.jsonl are the recipe's, for every method); a run that
# never got there may be replaced (these, and only these, are deleted then).
BEFORE_FIRST_STEP = (
    "eval_base.json",
    "generations_base.jsonl",
    "eval_base_reused.json",  # eval/base_cache.REUSED: where a reused base evaluation came from
    "manifest.json",
    "augment.jsonl",
    "harmful_filter.jsonl",  # methods/base.complied_filter: the harmful prompts scored, for any method
    "checkpoints",
)
# Everything else a run (or `compare` in a run) writes: the step log, the trained model and
# what is measured and reported after; patterns in fnmatch form.
AFTER_FIRST_STEP = (
    "config.yaml",
    "metrics.jsonl",
    "kl_by_position.json",
    "final",
    "final.partial",
    "report.md",
    "eval_*.json",
    "generations_*.jsonl",
    "*.png",
    ".*.tmp",  # files.atomic_write_text's temporaries, left by a kill mid-write
)


def before_first_step() -> tuple[str, ...]:
    """The names a run that never took a step may have written: the recipe's and every method's."""
    from .methods import prepared_files

    return (*BEFORE_FIRST_STEP, *prepared_files())


def run_files() -> tuple[str, ...]:
    """Every name (or fnmatch pattern) a run writes at the top of its directory."""
    return (MARKER, *before_first_step(), *AFTER_FIRST_STEP)


def own(name: str) -> bool:
    """Whether a top-level entry named `name` is one a run writes."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in run_files())


def is_run(out: Path) -> bool:
    """A safedistill run directory: its marker, or (runs written before the marker existed) a
    safedistill config.yaml with nothing beside it that a run does not write."""
    out = Path(out)
    return (out / MARKER).is_file() or _legacy_run(out)


def _legacy_run(out: Path) -> bool:
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    ours = isinstance(saved, dict) and {"preset", "model", "harmful_source", "trainer"} <= saved.keys()
    return ours and all(own(p.name) for p in out.iterdir())


def check_out_dir(out: Path) -> None:
    """`out` may be trained into: absent, empty, or a safedistill run. Anything else is refused
    naming an entry in the way, before anything is written."""
    out = Path(out)
    if not out.is_dir() or is_run(out):
        return
    entries = sorted(out.iterdir(), key=lambda p: (own(p.name), p.is_dir(), p.name))
    if entries:
        name = entries[0].name + ("/" if entries[0].is_dir() else "")
        raise UserError(
            f"--out {out}: not empty and not a safedistill run ({name} is in the way); choose a new or empty directory"
        )


_held: dict[Path, int] = {}  # run directories this process holds, with their nesting depth


@contextmanager
def hold(out: Path) -> Iterator[None]:
    """The run directory's exclusive lock for the life of the block (and of the process: the
    kernel drops it on any exit). A second process gets one line naming the holder's pid; in the
    holding process it nests (`compare` holds a run while `train` runs in it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path = out / MARKER
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _holder(path)
            raise UserError(
                f"--out {out}: in use by another safedistill process{f' (pid {holder})' if holder else ''}; "
                "wait for it to finish or choose another --out"
            ) from None
        from . import __version__

        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"safedistill": __version__, "pid": os.getpid()}) + "\n").encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove(out: Path, names: Iterable[str]) -> list[str]:
    """Deletes the run's own entries `names` in `out` (a `checkpoints/` folder only down to the
    step folders a run writes, so nothing a run did not write goes); the names removed."""
    removed = []
    for name in names:
        path = Path(out) / name
        if name == "checkpoints" and path.is_dir():
            for step in path.glob("step-*"):
                shutil.rmtree(step)
            if not any(path.iterdir()):
                path.rmdir()
            removed.append(name)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(name)
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(name)
    return removed
