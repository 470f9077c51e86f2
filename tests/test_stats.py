"""Paired statistics: known exact values, the null, clear effects, and pooling seeds by item."""

import json
import random

import numpy as np
import pytest

from safedistill.eval.stats import (
    clustered_difference,
    mcnemar_exact,
    mde,
    newcombe_paired,
    paired_difference,
    rate_interval,
    reading,
    wilson,
)


def binary(n: int, ones: set[int]) -> dict[str, int]:
    return {f"item-{i}": int(i in ones) for i in range(n)}


@pytest.mark.parametrize(
    ("gained", "lost", "p"),
    [(3, 1, 0.625), (0, 0, 1.0), (5, 0, 0.0625), (6, 0, 0.03125), (10, 2, 0.0385742), (1, 1, 1.0)],
)
def test_mcnemar_exact_known_values(gained, lost, p):
    assert mcnemar_exact(gained, lost) == pytest.approx(p, abs=1e-6)
    assert mcnemar_exact(lost, gained) == pytest.approx(p, abs=1e-6)


def test_wilson_known_interval():
    # Wilson (1927) for 0/10 and 5/10, as printed by statsmodels' proportion_confint(method="wilson").
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert rate_interval([0] * 10) == pytest.approx((0.0, 0.27753), abs=1e-5)


def test_newcombe_known_interval():
    # Cavo et al. (2012) as worked in Fagerland, Lydersen & Laake, "Statistical Analysis of
    # Contingency Tables", ch. 8: table [[59, 6], [16, 80]], estimate -0.0621, 95% CI -0.1186 to -0.0046.
    first = np.array([1] * 59 + [1] * 6 + [0] * 16 + [0] * 80)
    second = np.array([1] * 59 + [0] * 6 + [1] * 16 + [0] * 80)
    lo, hi = newcombe_paired(second, first)
    assert (lo, hi) == pytest.approx((-0.1186, -0.0046), abs=1e-4)
    r = paired_difference(dict(enumerate(second)), dict(enumerate(first)))
    assert r["diff"] == pytest.approx(-0.0621, abs=1e-4)
    assert (r["lo"], r["hi"]) == (lo, hi)


def test_identical_inputs_are_no_difference():
    a = binary(60, {1, 5, 9})
    for values in (a, {k: v * 0.37 + 0.1 for k, v in a.items()}):
        r = paired_difference(values, dict(values))
        assert r["diff"] == 0
        assert r["lo"] <= 0 <= r["hi"]
        assert not r["significant"]
        assert r["p"] == 1.0
        assert r["mde"] > 0
        assert reading(r).startswith("not distinguishable at n = 60")


def test_all_zero_sd_never_makes_a_difference_real():
    # Every item 0 before and every item 0 after but one: one sd is 0, the old rule fired here.
    r = paired_difference(binary(60, set()), binary(60, {0}))
    assert not r["significant"]
    assert r["mde"] > 0.1
    # Continuous values constant on both sides: MDE from the prior spread, not 0.
    r = paired_difference({str(i): 3.0 for i in range(40)}, {str(i): 3.0 for i in range(40)})
    assert r["mde"] > 0 and not r["significant"]


def test_issue_example_three_of_sixty_against_one_is_noise():
    before = binary(60, {0, 1, 2})
    after = binary(60, {30})
    r = paired_difference(before, after)
    assert r["n"] == 60
    assert r["diff"] == pytest.approx(-2 / 60)
    assert r["method"] == "newcombe"
    assert r["mcnemar_p"] == pytest.approx(0.625)  # 1 gained, 3 lost
    assert r["p"] > 0.3  # Newcombe's own p, from the interval reported beside it
    assert r["lo"] < 0 < r["hi"]
    assert not r["significant"]
    assert "not distinguishable" in reading(r)


def test_large_clear_effect_is_significant_with_its_direction():
    before, after = binary(100, set()), binary(100, set(range(30)))
    up = paired_difference(before, after)
    assert up["significant"] and up["lo"] > 0 and up["p"] < 1e-6
    assert reading(up) == "up"
    down = paired_difference(after, before)
    assert down["significant"] and down["hi"] < 0 and reading(down) == "down"
    assert down["diff"] == pytest.approx(-0.3)


def test_continuous_paired_bootstrap_finds_a_clear_shift_and_is_seeded():
    rng = random.Random(0)
    a = {str(i): rng.random() for i in range(200)}
    b = {k: v + 0.1 + rng.gauss(0, 0.2) for k, v in a.items()}
    r = paired_difference(a, b)
    assert r["method"] == "paired-bootstrap"
    assert r["significant"] and r["lo"] > 0.05 and r["hi"] < 0.16
    assert paired_difference(a, b) == r  # seeded: same inputs, same numbers
    assert paired_difference(a, b, seed=1)["lo"] != r["lo"]


def test_only_shared_items_pair_and_nothing_shared_is_not_a_result():
    a = {"x": 1, "y": 0, "z": 1}
    b = {"y": 1, "z": 1, "w": 0}
    assert paired_difference(a, b)["n"] == 2
    empty = paired_difference({"x": 1}, {"y": 1})
    assert empty["n"] == 0 and empty["diff"] is None and not empty["significant"]
    assert reading(empty) == "no paired items"
    json.dumps(empty)


def test_newcombe_interval_covers_the_true_difference():
    rng = random.Random(1)
    n, covered, reps = 50, 0, 400
    for _ in range(reps):
        # base refuses w.p. 0.3; training flips 20% of non-refusals to refusals and 5% the other way.
        a, b = {}, {}
        for i in range(n):
            a[str(i)] = int(rng.random() < 0.3)
            flip = rng.random() < (0.2 if a[str(i)] == 0 else 0.05)
            b[str(i)] = 1 - a[str(i)] if flip else a[str(i)]
        r = paired_difference(a, b)
        covered += r["lo"] <= 0.7 * 0.2 - 0.3 * 0.05 <= r["hi"]
    assert covered / reps >= 0.92


def test_mde_shrinks_with_n_and_grows_with_discordance():
    assert mde(60, discordance=0.0) == pytest.approx(0.126, abs=0.005)
    assert mde(60, discordance=0.3) > mde(60, discordance=0.05) > mde(600, discordance=0.05)
    assert mde(3, discordance=0.0) == 1.0
    assert mde(0, discordance=0.1) is None
    # Connor (1987): discordance 0.2 and difference 0.1 need about 155 pairs at 80% power.
    assert mde(155, discordance=0.2) == pytest.approx(0.1, abs=0.003)
    assert mde(100, sd=0.5) == pytest.approx((1.95996 + 0.84162) * 0.05, abs=1e-4)
    assert mde(100, sd=0.0) == mde(100, sd=0.5)


def test_a_detectable_difference_is_detected_about_eighty_percent_of_the_time():
    rng = random.Random(2)
    n, psi = 200, 0.2
    d = mde(n, discordance=psi)
    p_gain, p_loss = (psi + d) / 2, (psi - d) / 2
    hits = 0
    for _ in range(300):
        a, b = {}, {}
        for i in range(n):
            u = rng.random()
            a[str(i)], b[str(i)] = (0, 1) if u < p_gain else (1, 0) if u < p_gain + p_loss else (1, 1)
        hits += paired_difference(a, b)["significant"]
    assert 0.7 <= hits / 300 <= 0.9


def test_one_seed_pooled_is_the_paired_difference():
    a, b = binary(60, {0, 1, 2}), binary(60, {30})
    one = clustered_difference([(a, b)])
    assert {k: one[k] for k in ("n", "diff", "lo", "hi", "p", "mde")} == {
        k: paired_difference(a, b)[k] for k in ("n", "diff", "lo", "hi", "p", "mde")
    }


def test_identical_seeds_pool_to_the_same_item_evidence_not_three_times_more():
    # Three seeds that answered alike carry the evidence of one: the pooled interval must not
    # shrink by sqrt(3) as it would if the 3 x 100 pairs were treated as independent.
    a, b = binary(100, set(range(10))), binary(100, set(range(18)))
    one = paired_difference(a, b)
    pooled = clustered_difference([(a, b)] * 3)
    assert pooled["method"] == "cluster-bootstrap" and pooled["seeds"] == 3 and pooled["clusters"] == 100
    assert pooled["n"] == 300
    assert pooled["diff"] == pytest.approx(one["diff"])
    assert pooled["mde"] == pytest.approx(one["mde"])
    assert pooled["p"] < 0.05 and one["p"] < 0.05  # 8 gained, none lost: both read "up"
    width = pooled["hi"] - pooled["lo"]
    assert width > 0.8 * (one["hi"] - one["lo"])
    independent = clustered_difference(
        [({f"{s}-{k}": v for k, v in a.items()}, {f"{s}-{k}": v for k, v in b.items()}) for s in range(3)]
    )
    assert independent["clusters"] == 300
    assert independent["hi"] - independent["lo"] < 0.75 * width


def test_seeds_that_disagree_pool_to_their_average():
    a = binary(100, set())
    gain, loss = binary(100, set(range(20))), {k: 0 for k in a}
    pooled = clustered_difference([(a, gain), (a, loss)])
    assert pooled["diff"] == pytest.approx(0.1)
    assert pooled["mean_a"] == 0 and pooled["mean_b"] == pytest.approx(0.1)
    both_gain = clustered_difference([(a, gain), (a, gain)])
    assert both_gain["significant"] and both_gain["diff"] == pytest.approx(0.2)
    assert clustered_difference([(a, gain), (a, loss)], seed=3) != clustered_difference([(a, gain), (a, loss)], seed=4)
    assert clustered_difference([(a, gain), (a, loss)]) == pooled


def test_rate_interval_continuous_bootstrap():
    rng = random.Random(0)
    x = [rng.gauss(5, 1) for _ in range(400)]
    lo, hi = rate_interval(x)
    assert lo < sum(x) / len(x) < hi
    assert hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.2)
    assert rate_interval([]) == (None, None)


def test_figure_keeps_significant_digits_only_for_tiny_values():
    from safedistill.eval.stats import figure

    assert figure(0.4567) == "0.457" and figure(0.25, signed=True) == "+0.250"
    assert figure(-0.0) == "0.000" and figure(0.0, signed=True) == "+0.000"
    assert figure(-1.4e-17, signed=True) == "+0.000"  # float noise, not a figure
    assert figure(1.0189e-4) == "0.000102" and figure(3.09e-05) == "3.09e-05"
    assert figure(-7.1e-05, signed=True) == "-7.1e-05"


def test_tiny_masses_print_their_digits_in_reports():
    from safedistill.report.report import fmt, fmt_ci, fmt_diff

    small = {"diff": 4.5e-05, "mean_a": 1.02e-04, "mean_b": 1.47e-04, "significant": False}
    assert fmt_diff(small) == "+4.5e-05" and fmt(1.02e-04) == "0.000102"
    assert fmt_ci(-9.4e-05, 2.1e-04) == "[-9.4e-05, +0.00021]"
    rate = {"diff": 1e-4, "mean_a": 0.5, "mean_b": 0.5001, "significant": False}
    assert fmt_diff(rate) == "+0.000"  # between ordinary figures, a difference under 0.0005 rounds away


@pytest.mark.parametrize("n", [30, 60, 100])
def test_the_reading_and_the_interval_never_disagree(n):
    # Issue 24: "not distinguishable (p = 0.078 although the interval excludes 0)". Each difference
    # takes its interval and p from one method, so significant <=> interval excludes 0 <=> p < 0.05,
    # also at 5 discordant pairs to 0, where McNemar's exact p (0.0625) and Newcombe's interval disagree.
    for gained in range(12):
        for lost in range(12):
            a = {i: int(i < lost) for i in range(n)}
            b = {i: int(lost <= i < lost + gained) for i in range(n)}
            r = paired_difference(a, b)
            assert r["significant"] == (r["lo"] > 0 or r["hi"] < 0) == (r["p"] < 0.05), (gained, lost, r)
    rng = random.Random(3)
    for _ in range(50):
        x = {str(i): rng.random() for i in range(n)}
        y = {k: v + rng.gauss(0.05, 0.3) for k, v in x.items()}
        r = paired_difference(x, y)
        assert r["significant"] == (r["lo"] > 0 or r["hi"] < 0) == (r["p"] < 0.05)
    assert "although" not in reading(paired_difference(binary(n, set()), binary(n, set(range(5)))))
