"""Small file helpers: atomic writes so an interrupted run never leaves half-written results, and
strict JSON (a non-finite float is written as null) so any JSON parser reads what a run wrote."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _file_mode() -> int:
    """The mode open() would give a new file (0644 under the usual umask); mkstemp gives 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON: non-finite floats become null instead of the bare NaN that parsers reject."""
    return json.dumps(finite(obj), ensure_ascii=False, allow_nan=False, **kwargs)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps(row) + "\n")


def read_log(path: Path) -> list[dict]:
    """Rows of an append-only JSONL log (metrics.jsonl). A kill mid-append leaves a torn last
    line: it is dropped (its step is redone on resume); a bad line before the end is an error."""
    from .errors import UserError

    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise UserError(f"{path}:{n}: malformed JSON line in the run log") from None
    return rows


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where fetched wheels and converted weights live; SAFEDISTILL_CACHE overrides."""
    root = os.environ.get("SAFEDISTILL_CACHE") or Path.home() / ".cache" / "safedistill"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


class WriteFailed(OSError):
    """A write the disk refused (full, read-only, over quota): the CLI's one line and exit 4 name
    the path and, for a full disk, the space the write needed and the space that was free."""

    def __init__(self, code: int, path: Path, needed: int | None = None):
        super().__init__(code, os.strerror(code), str(path))
        self.needed = needed

    def line(self) -> str:
        text = f"cannot write {self.filename}: {self.strerror}"
        if self.errno in (errno.ENOSPC, errno.EDQUOT):
            free = _free_bytes(Path(self.filename))
            needs = f"needs {_size(self.needed)}, " if self.needed else ""
            text += f" ({needs}{_size(free)} free there)" if free is not None else ""
        return text


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def write_failed(e: Exception, path: Path, needed: int | None = None) -> WriteFailed | None:
    """The WriteFailed a low-level write error stands for (safetensors' errors carry the OS error
    only in their text, "... (os error 28)"), or None when `e` is no OS write error."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(e))
        code = int(found.group(1)) if found else None
    if code is None:
        return None
    return WriteFailed(code, path, needed)


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file with the mode other files get (it writes 0600) and a failed write
    as one WriteFailed naming the file and the bytes it needed."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except Exception as e:
        failed = write_failed(e, path, tensor_bytes(tensors))
        if failed is None:
            raise
        raise failed from None
    os.chmod(path, _file_mode())


def share_modes(folder: Path) -> None:
    """Give the files a library wrote into `folder` (safetensors: 0600) the usual mode."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            os.chmod(path, _file_mode())
