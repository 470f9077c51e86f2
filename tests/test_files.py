"""files.py: strict JSON on disk and the same permissions for atomic and plain writes."""

from __future__ import annotations

import json
import os
import stat

import pytest

from safedistill.files import append_jsonl, atomic_write_text, write_json, write_jsonl


def strict_load(text: str):
    def reject(token: str):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=reject)


def test_non_finite_floats_are_written_as_null(tmp_path):
    row = {"loss": float("nan"), "kl": float("inf"), "lr": -float("inf"), "ok": 1.5, "xs": [float("nan"), 2.0]}
    write_json(tmp_path / "a.json", row)
    write_jsonl(tmp_path / "b.jsonl", [row])
    append_jsonl(tmp_path / "c.jsonl", row)
    append_jsonl(tmp_path / "c.jsonl", {"step": 2})
    expected = {"loss": None, "kl": None, "lr": None, "ok": 1.5, "xs": [None, 2.0]}
    assert strict_load((tmp_path / "a.json").read_text()) == expected
    assert strict_load((tmp_path / "b.jsonl").read_text()) == expected
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert [strict_load(line) for line in lines] == [expected, {"step": 2}]


def test_atomic_writes_get_the_same_mode_as_plain_writes(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        write_json(tmp_path / "w.json", {})
        append_jsonl(tmp_path / "plain.jsonl", {})
        (tmp_path / "open.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["atomic.txt", "w.json", "plain.jsonl", "open.txt"], 0o644)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_read_log_drops_a_torn_last_line_only(tmp_path):
    from safedistill.errors import UserError
    from safedistill.files import read_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_log(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: malformed JSON line"):
        read_log(log)
    assert read_log(tmp_path / "absent.jsonl") == []
