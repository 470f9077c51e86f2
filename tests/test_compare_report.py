"""The comparison verdict may only speak of seed spread when there is more than one seed."""

from safedistill.compare import METRICS, compare_report


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
