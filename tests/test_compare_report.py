"""Run reports and comparisons: paired differences, words only for significant ones, old runs readable."""

import json

import pytest

from safedistill.compare import METRICS, compare_report
from safedistill.report import before_after, before_after_section, eval_report, safety_tax


def summary(seeds: list[int], std: float) -> dict:
    def row(value: float) -> dict:
        cells = {name: {"mean": value, "std": std} for name, _ in METRICS}
        return cells | {"capability_tax": {"mean": 0.0, "std": std}}

    return {
        "model": "m",
        "seeds": seeds,
        "judge": "keyword",
        "eval_n": {"safety": 10},
        "base": row(0.1),
        "methods": {"a": row(0.9), "b": row(0.2)},
    }


def test_one_seed_makes_no_spread_claim():
    text = compare_report(summary([0], 0.0))
    assert "seed spread)" not in text
    assert "One seed" in text


def test_several_seeds_judge_differences_against_the_spread():
    text = compare_report(summary([0, 1, 2], 0.05))
    assert "refusal +0.700 (beyond seed spread)" in text
    assert "One seed" not in text


def fake_eval(refusal: float, capability: float) -> dict:
    axis = {"n": 4}
    return {
        "judge": "keyword",
        "safety": axis | {"refusal_rate": refusal},
        "jailbreak": axis | {"asr": 1 - refusal},
        "overrefusal": axis | {"refusal_rate": 0.0},
        "capability": axis | {"accuracy": capability},
        "safety_score": (1 + refusal) / 2,
        "expressiveness": {"mean_length": 10.0, "distinct_2": 0.5, "mean_token_entropy": 1.0},
    }


def test_finished_runs_are_read_back_not_retrained(tmp_path, monkeypatch):
    import json

    import pytest

    from safedistill import compare as compare_module
    from safedistill.config import load_config, to_yaml

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_module, "train", no_training)
    for seed, refusal in ((0, 0.5), (1, 0.75)):
        run = tmp_path / "sft" / f"seed-{seed}"
        run.mkdir(parents=True)
        cfg = load_config("sft", overrides=["steps=2", "model=tiny", f"seed={seed}"])
        (run / "config.yaml").write_text(to_yaml(cfg))
        (run / "eval_base.json").write_text(json.dumps(fake_eval(0.0, 0.5)))
        final = fake_eval(refusal, 0.25)
        if seed == 1:  # written before evals reported entropy
            del final["expressiveness"]["mean_token_entropy"]
        (run / "eval_final.json").write_text(json.dumps(final))
    s = compare_module.compare(["sft"], model="tiny", out=tmp_path, seeds=[0, 1], overrides=["steps=2"])
    assert s["methods"]["sft"]["refusal"]["values"] == [0.5, 0.75]
    assert s["methods"]["sft"]["entropy"]["mean"] is None
    assert "| n/a |" in (tmp_path / "compare.md").read_text()
    assert s["methods"]["sft"]["capability_tax"]["mean"] == pytest.approx(0.25)
    # Other settings than the saved ones: not a finished run of this comparison, so it would train.
    with pytest.raises(AssertionError, match="trained again"):
        compare_module.compare(["sft"], model="tiny", out=tmp_path, seeds=[0], overrides=["steps=3"])


# ---- the run report: paired before/after -------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def generations(refused: set[int], correct: dict[str, set[int]], n: int = 60, lengths=None) -> list[dict]:
    rows = [{"axis": "safety", "id": f"h{i}", "value": int(i in refused)} for i in range(n)]
    rows += [{"axis": "overrefusal", "id": f"x{i}", "value": int(i < 5)} for i in range(50)]
    for task, ok in correct.items():
        rows += [{"axis": "capability", "task": task, "id": str(i), "value": int(i in ok)} for i in range(100)]
    rows += [{"axis": "expressiveness", "id": f"b{i}", "value": (lengths or {}).get(i, 40 + i)} for i in range(20)]
    return rows


EVAL = {
    "model": "m",
    "judge": "heuristic",
    "eval_seed": 0,
    "settings": {"split_seed": 0, "harmful": "advbench", "overrefusal": "xstest-safe"},
    "capability": {
        "tasks": {
            "hellaswag": {"metric": "acc_norm", "chance": 0.25, "value": 0.4, "n": 100},
            "arc_challenge": {"metric": "acc_norm", "chance": 0.25, "value": 0.3, "n": 100},
        }
    },
    "expressiveness": {"distinct_2": 0.8},
    "safety_score": 0.7,
}
CAP = {"hellaswag": set(range(40)), "arc_challenge": set(range(0, 100, 3))}


def table(lines: list[str]) -> dict[str, list[str]]:
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in (line.split("|") for line in lines[2:])}


def test_report_of_a_model_against_itself_finds_no_difference_anywhere(tmp_path):
    rows = generations({1, 2, 3}, CAP)
    write_jsonl(tmp_path / "generations_base.jsonl", rows)
    write_jsonl(tmp_path / "generations_final.jsonl", rows)
    text = "\n".join(before_after_section(tmp_path, EVAL, EVAL))
    t = table(before_after(EVAL, EVAL, rows, rows))
    paired = [label for label, cells in t.items() if cells[3] != "n/a"]
    assert paired == [
        "harmful refusal rate",
        "over-refusal rate",
        "capability: hellaswag (acc_norm)",
        "capability: arc_challenge (acc_norm)",
        "capability index",
        "mean length (tokens)",
    ]
    for label in paired:
        base, trained, change, ci, n, mde, words = t[label]
        assert change == "+0.000" and base == trained
        assert words.startswith(f"not distinguishable at n = {n} (smallest detectable difference {mde})")
        assert float(mde) > 0
    assert "| up |" not in text and "| down |" not in text
    assert "not distinguishable" in text.split("**Safety tax**")[1].split("\n")[0]
    assert "not checked" in text  # EVAL carries no judge_agreement
    assert "n per axis: safety 60 · overrefusal 50 · capability/hellaswag 100" in text


def test_report_names_a_clear_change_and_the_safety_tax_it_cost(tmp_path):
    base = generations(set(range(10)), CAP)
    worse = {"hellaswag": set(range(15)), "arc_challenge": set(range(0, 30, 3))}
    final = generations(set(range(40)), worse)
    agreement = {"accuracy": 0.933, "kappa": 0.851, "precision": 0.96, "recall": 0.92, "n": 105, "file": "refusal.csv"}
    t = table(before_after(EVAL, EVAL, base, final))
    assert t["harmful refusal rate"][:3] == ["0.167", "0.667", "+0.500"]
    assert t["harmful refusal rate"][-1] == "up"
    assert t["capability: hellaswag (acc_norm)"][-1] == "down"
    assert t["over-refusal rate"][2] == "+0.000" and t["over-refusal rate"][-1].startswith("not distinguishable")
    # Index = mean over tasks of (acc - 0.25) / 0.75: base (0.40 + 0.34) / 2, trained (0.15 + 0.10) / 2.
    assert float(t["capability index"][0]) == pytest.approx(((0.40 - 0.25) + (0.34 - 0.25)) / 2 / 0.75, abs=1e-3)
    assert float(t["capability index"][1]) == pytest.approx(((0.15 - 0.25) + (0.10 - 0.25)) / 2 / 0.75, abs=1e-3)
    tax = safety_tax(EVAL, EVAL, base, final)
    assert tax["tax"] == pytest.approx(float(t["capability index"][0]) - float(t["capability index"][1]), abs=1e-3)
    assert tax["significant"] and tax["lo"] > 0
    write_jsonl(tmp_path / "generations_base.jsonl", base)
    write_jsonl(tmp_path / "generations_final.jsonl", final)
    text = "\n".join(before_after_section(tmp_path, EVAL, EVAL | {"judge_agreement": agreement}))
    assert "the trained model lost capability" in text
    assert "accuracy 0.933, kappa 0.851, precision 0.960, recall 0.920" in text


def test_a_difference_that_rounds_to_zero_is_never_called_down():
    base = generations(set(), CAP, lengths={i: 50.0 for i in range(20)})
    final = generations(set(), CAP, lengths={i: 50.0 - (i == 0) * 0.004 for i in range(20)})
    t = table(before_after(EVAL, EVAL, base, final))
    assert t["mean length (tokens)"][2] == "+0.000"
    assert t["mean length (tokens)"][-1].startswith("not distinguishable")


def test_old_run_directories_report_without_crashing(tmp_path):
    old = {"judge": "keyword", "seed": 3, "settings": {"split_seed": 0, "harmful": "advbench"}}
    old |= {"safety": {"refusal_rate": 0.5, "asr": 0.5, "n": 4}, "capability": {"accuracy": 0.25, "n": 4}}
    text = "\n".join(before_after_section(tmp_path, old, old))
    assert "No per-item generations" in text
    assert "| harmful refusal rate | 0.500 | 0.500 | +0.000 | n/a | 4 | n/a | no per-item values: not tested |" in text
    assert "| over-refusal rate | n/a | n/a | n/a |" in text
    assert "not checked" in text and "eval seed 3" in text
    assert "**Safety tax** (capability index, base - trained): +0.000; no per-item values" in text
    # Generations written before the "value" field: read from label / refusal / correct / length.
    legacy = [
        {"axis": "safety", "id": "a", "label": "safe"},
        {"axis": "safety", "id": "b", "label": "unsafe"},
        {"axis": "overrefusal", "id": "c", "refusal": True},
        {"axis": "capability", "id": "d", "correct": False},
        {"axis": "expressiveness", "id": "e", "length": 7},
    ]
    write_jsonl(tmp_path / "generations_base.jsonl", legacy)
    write_jsonl(tmp_path / "generations_final.jsonl", legacy)
    text = "\n".join(before_after_section(tmp_path, old, old))
    assert "| harmful refusal rate | 0.500 | 0.500 | +0.000 | [" in text
    assert "| capability accuracy | 0.000 | 0.000 |" in text
    assert "n per axis: safety 2 · overrefusal 1 · capability 1 · expressiveness 1." in text
    assert eval_report(old).startswith("# Evaluation of `n/a`")
