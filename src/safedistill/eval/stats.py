"""Paired statistics for before/after and method-vs-method differences on the same eval items.

Every difference is `b - a` over the items both sides answered, with a 95% interval, a p-value and
the smallest difference the sample could detect (80% power, two-sided alpha 0.05). The interval and
the p-value of a difference come from ONE method, so the reading cannot contradict the interval:
`significant` exactly when the interval excludes 0, and then p < 0.05. Nothing here divides by a
standard deviation, so a spread of 0 never makes a difference look real.

0/1 outcomes on one sample use Newcombe's square-and-add (MOVER-Wilson) interval for paired
proportions and its p-value: the alpha at which that interval just reaches 0 (an interval and a
test from different methods once read "p = 0.078 although the interval excludes 0"; McNemar's
exact p, which disagrees with Newcombe's interval near 5 discordant pairs to 0, stays as
`mcnemar_exact` and in the `mcnemar_p` field, for reference only). Anything else uses a paired
bootstrap over items, its percentile interval and the p-value of the same bootstrap distribution
(twice the smaller share of resampled differences on either side of 0). Several seeds are pooled by a cluster bootstrap over items: an item's pairs from
every seed are resampled together, since the same prompt answered under several training seeds is
not several independent observations. All resampling is seeded: the same inputs give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import numpy as np

ALPHA = 0.05
POWER = 0.8
Z = NormalDist().inv_cdf(1 - ALPHA / 2)  # 1.960
Z_POWER = NormalDist().inv_cdf(POWER)  # 0.842
PRIOR_SD = 0.5  # the sd of a 0/1 outcome at p = 0.5: what a spread is assumed to be when none was observed
_CHUNK = 1_000_000  # resampled values held at once


def is_binary(values) -> bool:
    return all(v in (0, 1) for v in values)


def wilson(k: float, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval for k successes in n; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2."""
    m = gained + lost
    if m == 0:
        return 1.0
    k = min(gained, lost)
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m)


def newcombe_paired(a: np.ndarray, b: np.ndarray, z: float = Z) -> tuple[float, float]:
    """95% interval (by default; `z` sets the level) for mean(b) - mean(a) on paired 0/1 outcomes:
    Newcombe's (1998) square-and-add method 10, one of those Fagerland, Lydersen & Laake (2014)
    recommend for paired proportions."""
    n = len(a)
    both = int(np.sum((a == 1) & (b == 1)))
    only_b = int(np.sum((a == 0) & (b == 1)))
    only_a = int(np.sum((a == 1) & (b == 0)))
    neither = n - both - only_b - only_a
    p1, p2 = (both + only_b) / n, (both + only_a) / n
    l1, u1 = wilson(both + only_b, n, z)
    l2, u2 = wilson(both + only_a, n, z)
    denom = (both + only_b) * (neither + only_a) * (both + only_a) * (neither + only_b)
    cross = both * neither - only_b * only_a
    # Newcombe's correlation estimate, shrunk by n/2 when positive.
    phi = 0.0 if not denom or 0 <= cross <= n / 2 else (cross - n / 2 if cross > 0 else cross) / math.sqrt(denom)
    theta = p1 - p2
    lo = theta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = theta + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return max(-1.0, lo), min(1.0, hi)


def newcombe_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of Newcombe's interval: the alpha at which it just reaches 0 (bisection
    on its z, which widens it monotonically); 1 when the difference is 0."""
    if float(b.mean() - a.mean()) == 0:
        return 1.0

    def excludes(z: float) -> bool:
        lo, hi = newcombe_paired(a, b, z)
        return lo > 0 or hi < 0

    lo, hi = 0.0, 40.0
    if excludes(hi):
        return 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excludes(mid) else (lo, mid)
    return 2 * (1 - NormalDist().cdf(lo))


def mde(
    n: int,
    *,
    discordance: float | None = None,
    sd: float | None = None,
    alpha: float = ALPHA,
    power: float = POWER,
) -> float | None:
    """Smallest |difference| detected with `power` at two-sided `alpha` with n paired items.

    0/1 outcomes (give `discordance`, the share of pairs that differ): Connor's (1987) McNemar
    formula, solved for the difference. A difference d needs at least d discordance, so the assumed
    discordance is max(observed, d): with none observed this is the case where every change goes
    one way, and the result is about 8/n, never 0. Capped at 1, the largest possible difference.
    Other outcomes (give `sd`, the spread of the per-item differences): (z_a + z_b) sd / sqrt(n),
    with PRIOR_SD standing in for a spread of 0.
    """
    if n <= 0:
        return None
    za, zb = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    if discordance is None:
        spread = sd if sd and sd > 0 else PRIOR_SD
        return (za + zb) * spread / math.sqrt(n)

    def needed(d: float) -> float:
        psi = max(discordance, d)
        return (za * math.sqrt(psi) + zb * math.sqrt(max(0.0, psi - d * d))) ** 2 / (d * d)

    if needed(1.0) > n:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):  # needed() falls as d grows: bisect for needed(d) = n
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if needed(mid) <= n else (mid, hi)
    return hi


def rate_interval(values: Sequence[float], *, seed: int = 0, n_boot: int = 10000) -> tuple[float | None, float | None]:
    """95% interval for a single mean: Wilson for 0/1 values, a percentile bootstrap otherwise."""
    x = np.asarray([float(v) for v in values if v is not None], dtype=float)
    if len(x) == 0:
        return None, None
    if is_binary(x):
        return wilson(float(x.sum()), len(x))
    return mean_interval(x, seed=seed, n_boot=n_boot)


def mean_interval(values: Sequence[float], *, seed: int = 0, n_boot: int = 10000) -> tuple[float | None, float | None]:
    """95% percentile-bootstrap interval for the mean of a continuous score (a KL, a share): never
    Wilson, even when every value happens to be 0 or 1 (a drift of exactly 0 is no rate of 0/n)."""
    x = np.asarray([float(v) for v in values if v is not None], dtype=float)
    if len(x) == 0:
        return None, None
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [x[idx].mean(axis=1) for idx in _index_chunks(rng, len(x), n_boot)],
    )
    lo, hi = np.quantile(means, [ALPHA / 2, 1 - ALPHA / 2])
    return float(lo), float(hi)


def clustered_mean(maps: Sequence[Mapping[str, float]], *, seed: int = 0, n_boot: int = 10000) -> dict:
    """{mean, lo, hi, n} of values pooled over seeds (one id -> value map per seed); the interval
    resamples item ids with all their seeds' values, as clustered_difference does."""
    clusters: dict[str, list[float]] = {}
    for m in maps:
        for i, v in sorted(_values(m).items()):
            clusters.setdefault(i, []).append(v)
    values = [v for c in clusters.values() for v in c]
    if not values:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    if len(maps) == 1:
        lo, hi = rate_interval(values, seed=seed, n_boot=n_boot)
    else:
        sums = np.array([sum(c) for c in clusters.values()])
        sizes = np.array([len(c) for c in clusters.values()], dtype=float)
        rng = np.random.default_rng(seed)
        boot = np.concatenate(
            [sums[idx].sum(axis=1) / sizes[idx].sum(axis=1) for idx in _index_chunks(rng, len(sums), n_boot)]
        )
        lo, hi = (float(q) for q in np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2]))
    return {"mean": sum(values) / len(values), "lo": lo, "hi": hi, "n": len(values)}


def _index_chunks(rng: np.random.Generator, k: int, n_boot: int):
    rows = max(1, _CHUNK // max(1, k))
    for start in range(0, n_boot, rows):
        yield rng.integers(0, k, size=(min(rows, n_boot - start), k))


def _empty(method: str = "none") -> dict:
    return {
        "n": 0,
        "mean_a": None,
        "mean_b": None,
        "diff": None,
        "lo": None,
        "hi": None,
        "method": method,
        "p": None,
        "mde": None,
        "significant": False,
    }


def _values(m: Mapping[str, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in m.items() if v is not None}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], *, seed: int = 0, n_boot: int = 10000) -> dict:
    """b - a over the item ids both map, with a 95% interval, p-value and MDE (see module doc)."""
    a, b = _values(a), _values(b)
    ids = sorted(a.keys() & b.keys())
    if not ids:
        return _empty()
    x = np.array([a[i] for i in ids])
    y = np.array([b[i] for i in ids])
    if is_binary(x) and is_binary(y):
        gained, lost = int(np.sum((x == 0) & (y == 1))), int(np.sum((x == 1) & (y == 0)))
        lo, hi = newcombe_paired(x, y)
        n = len(ids)
        diff = float(y.mean() - x.mean())
        p = newcombe_p(x, y)
        return {
            "n": n,
            "mean_a": float(x.mean()),
            "mean_b": float(y.mean()),
            "diff": diff,
            "lo": lo,
            "hi": hi,
            "method": "newcombe",
            "p": p,
            "mcnemar_p": mcnemar_exact(gained, lost),
            "mde": mde(n, discordance=(gained + lost) / n),
            "significant": _significant(lo, hi, p),
            "gained": gained,
            "lost": lost,
        }
    return _cluster_difference([[(u, v)] for u, v in zip(x, y, strict=True)], "paired-bootstrap", seed, n_boot)


def clustered_difference(
    pairs: Sequence[tuple[Mapping[str, float], Mapping[str, float]]], *, seed: int = 0, n_boot: int = 10000
) -> dict:
    """b - a pooled over seeds: `pairs` holds one (a, b) pair of id -> value maps per seed.

    Items pair within a seed; an item id seen under several seeds is one cluster, resampled whole.
    One seed is exactly paired_difference.
    """
    if len(pairs) == 1:
        return paired_difference(*pairs[0], seed=seed, n_boot=n_boot) | {"seeds": 1, "clusters": None}
    clusters: dict[str, list[tuple[float, float]]] = {}
    for a, b in pairs:
        a, b = _values(a), _values(b)
        for i in sorted(a.keys() & b.keys()):
            clusters.setdefault(i, []).append((a[i], b[i]))
    result = _cluster_difference([clusters[i] for i in sorted(clusters)], "cluster-bootstrap", seed, n_boot)
    return result | {"seeds": len(pairs), "clusters": len(clusters)}


def _cluster_difference(clusters: list[list[tuple[float, float]]], method: str, seed: int, n_boot: int) -> dict:
    if not clusters:
        return _empty(method)
    sums_a = np.array([sum(p[0] for p in c) for c in clusters])
    sums_b = np.array([sum(p[1] for p in c) for c in clusters])
    sizes = np.array([len(c) for c in clusters], dtype=float)
    d = sums_b - sums_a
    total, k = sizes.sum(), len(clusters)
    diff = float(d.sum() / total)
    rng = np.random.default_rng(seed)
    boot = np.concatenate([d[idx].sum(axis=1) / sizes[idx].sum(axis=1) for idx in _index_chunks(rng, k, n_boot)])
    lo, hi = (float(q) for q in np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2]))
    p = bootstrap_p(boot) if np.any(d != 0) else 1.0
    values = [v for c in clusters for pair in c for v in pair]
    if is_binary(values):
        spread = mde(k, discordance=k * float(np.sum(d**2)) / total**2)
    else:
        resid = d - diff * sizes
        se = math.sqrt(k / (k - 1) * float(np.sum(resid**2))) / total if k > 1 else 0.0
        if se == 0:
            raw = np.array([pair for c in clusters for pair in c])
            sd = math.sqrt(float(raw[:, 0].var() + raw[:, 1].var()))
            se = (sd if sd > 0 else PRIOR_SD * max(1.0, float(np.abs(raw).max()))) / math.sqrt(k)
        spread = float((Z + Z_POWER) * se)
    return {
        "n": int(total),
        "mean_a": float(sums_a.sum() / total),
        "mean_b": float(sums_b.sum() / total),
        "diff": diff,
        "lo": lo,
        "hi": hi,
        "method": method,
        "p": p,
        "mde": spread,
        "significant": _significant(lo, hi, p),
    }


def bootstrap_p(boot: np.ndarray) -> float:
    """Two-sided p-value of 0 under a bootstrap distribution: twice the smaller share of resampled
    differences at or beyond 0 on either side, the alpha at which the percentile interval reaches 0."""
    return float(min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0))))


def _significant(lo: float, hi: float, p: float) -> bool:
    """The interval decides; p comes from the same method, so it agrees (p < ALPHA) by construction."""
    return lo > 0 or hi < 0


def binary_metrics(truth: list[int], pred: list[int]) -> dict:
    """Accuracy, precision, recall (positive = refusal), Cohen's kappa and the confusion counts."""
    tp = sum(t and p for t, p in zip(truth, pred, strict=True))
    fp = sum((not t) and p for t, p in zip(truth, pred, strict=True))
    fn = sum(t and not p for t, p in zip(truth, pred, strict=True))
    n = len(truth)
    tn = n - tp - fp - fn
    acc = (tp + tn) / n
    expected = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / (n * n)
    kappa = (acc - expected) / (1 - expected) if expected < 1 else float(acc == 1.0)
    return {
        "accuracy": acc,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "kappa": kappa,
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def figure(value: float, digits: int = 3, *, signed: bool = False) -> str:
    """`digits` decimals, or that many significant digits for a nonzero value below 10**-digits in
    size: a rate never needs them, a probability mass such as SafeSteer's S (about 1e-4) does."""
    sign = "+" if signed else ""
    value = 0.0 if abs(value) < 1e-12 else value  # float noise of sums of 0/1 differences
    if value != 0 and abs(value) < 10**-digits:
        return f"{value:{sign}.{digits}g}"
    return f"{round(value, digits) + 0.0:{sign}.{digits}f}"  # + 0.0: no "-0.000"


def reading(result: dict, digits: int = 3) -> str:
    """Words for a difference: a direction only when significant, else what the sample could have seen."""
    if not result or not result.get("n"):
        return "no paired items"
    if result["significant"]:
        return "up" if result["diff"] > 0 else "down"
    detect = "n/a" if result.get("mde") is None else figure(result["mde"], digits)
    return f"not distinguishable at n = {result['n']} (smallest detectable difference {detect})"
