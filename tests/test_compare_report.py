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
