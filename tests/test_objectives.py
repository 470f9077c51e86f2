"""COPSD's objective on toy tensors: the sequence reward (and the length bonus it lets act), the
KL-to-base estimators and their directions, and sampled-token objectives scored at the rollout
temperature, each checked against an exact gradient."""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import run_settings, train_until_killed, write_sources
from safedistill.config import load_config
from safedistill.errors import UserError
from safedistill.losses.divergence import masked_mean, per_token_divergence
from safedistill.losses.objectives import (
    REF_KL_ESTIMATORS,
    Scored,
    clipped_reward_objective,
    divergence_objective,
    group_normalize,
    sequence_advantages,
    tempered,
)
from safedistill.train import train

TAU = 0.6


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(softmax a || softmax b) over the last dim."""
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    return (la.exp() * (la - lb)).sum(-1)


def unit(g: torch.Tensor) -> torch.Tensor:
    return g / g.norm()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- the sequence reward


def test_sequence_advantages_match_a_hand_computation():
    reward = torch.tensor([[1.0, 2.0, 9.0], [0.5, 0.5, 0.5], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = sequence_advantages(reward, mask, group_size=2)
    # group 1: R = 3, 1.5 -> +-1; group 2: R = 3, 3 -> std 0 -> 0 (eps, not 0/0)
    want = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, want, atol=1e-5, rtol=0)
    three = sequence_advantages(torch.tensor([[1.0], [2.0], [6.0]]), torch.ones(3, 1), group_size=3)
    r = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(three[:, 0], (r - 3) / (r.std(correction=0) + 1e-6))
    with pytest.raises(ValueError, match="at least 2"):
        sequence_advantages(reward, mask, group_size=1)


def bonus_gradients(level: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's gradient with the 0.02 bonus and without, on 2 groups of 4 rollouts of
    different lengths."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(8, 6, 11, generator=g), torch.randn(8, 6, 11, generator=g)
    tokens = torch.randint(0, 11, (8, 6), generator=g)
    mask = (torch.arange(6)[None] < torch.tensor([6, 3, 5, 2, 4, 6, 1, 3])[:, None]).float()
    grads = []
    for bonus in (0.02, 0.0):
        x = s.clone().requires_grad_(True)
        loss, _ = clipped_reward_objective(
            x, t, tokens, mask, group_size=4, bonus=bonus, kl_coef=0, temperature=TAU, reward_level=level
        )
        grads.append(torch.autograd.grad(masked_mean(loss, mask), x)[0])
    return grads[0], grads[1]


def test_the_length_bonus_changes_the_gradient_under_the_sequence_reward_only():
    with_bonus, without = bonus_gradients("sequence")
    assert relative(with_bonus, without) > 1e-3  # 6.6e-3 on this toy
    with_bonus, without = bonus_gradients("token")
    assert relative(with_bonus, without) < 1e-6  # the per-token bonus cancels (1.3e-8: float rounding)


def test_a_sequence_reward_with_one_rollout_per_prompt_is_refused_at_load():
    with pytest.raises(UserError, match="'rollouts_per_prompt'"):
        load_config("copsd", overrides=["rollouts_per_prompt=1"])
    assert load_config("copsd", overrides=["rollouts_per_prompt=1", "reward_level=token"]).reward_level == "token"
    assert load_config("copsd").reward_level == "sequence"
    with pytest.raises(UserError, match="'ppo_epochs'"):
        load_config("sft", overrides=["ppo_epochs=2"])


# --- the KL to the base


def toy_gradient(f, logits: torch.Tensor) -> torch.Tensor:
    x = logits.clone().requires_grad_(True)
    return torch.autograd.grad(f(x), x)[0]


@pytest.mark.parametrize("temperature", [1.0, TAU])
def test_ref_kl_estimators_have_the_expected_gradient_of_the_direction_they_name(temperature):
    """Enumerating the sampled token y ~ softmax(s / tau): k3's expected gradient is that of the
    forward KL(ref || student), full_reverse's that of the reverse KL(student || ref)."""
    s = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    ref = torch.tensor([0.0, 1.5, -0.5, 1.0, 0.5, -1.0])
    v = s.numel()
    p = (s / temperature).softmax(-1)

    def expected(name: str):
        def loss(x):
            student, reference = tempered(x.view(1, 1, v), temperature), tempered(ref.view(1, 1, v), temperature)
            total = 0.0
            for y in range(v):
                tokens = torch.tensor([[y]])
                logp = student.log_softmax(-1)[..., y]
                total = total + p[y] * REF_KL_ESTIMATORS[name].per_token(student, reference, tokens, logp).sum()
            return total

        return toy_gradient(loss, s)

    forward = toy_gradient(lambda x: kl(ref / temperature, x / temperature), s)
    reverse = toy_gradient(lambda x: kl(x / temperature, ref / temperature), s)
    assert relative(forward, reverse) > 0.1  # the two directions differ on this toy
    torch.testing.assert_close(expected("k3_forward"), forward, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(expected("full_reverse"), reverse, atol=1e-6, rtol=1e-5)


def test_the_full_reverse_term_in_the_objective_is_the_tempered_kl():
    g = torch.Generator().manual_seed(0)
    s, t, ref = (torch.randn(2, 3, 7, generator=g) for _ in range(3))
    tokens, mask = torch.randint(0, 7, (2, 3), generator=g), torch.ones(2, 3)
    for name in REF_KL_ESTIMATORS:
        _, stats = clipped_reward_objective(
            s, t, tokens, mask, group_size=2, ref_logits=ref, temperature=TAU, ref_kl=name
        )
        if name == "full_reverse":
            torch.testing.assert_close(stats["ref_kl"], kl(s / TAU, ref / TAU))
        assert (stats["ref_kl"] >= -1e-6).all()
    _, stats = clipped_reward_objective(s, t, tokens, mask, group_size=2, ref_logits=s, temperature=TAU)
    assert stats["ref_kl"].abs().max() < 1e-6  # zero at the base, at any temperature


# --- sampled-token objectives at the rollout temperature


def test_sampled_divergence_expected_gradient_is_exact_at_the_rollout_temperature():
    """Tokens drawn at tau: scored at tau, the surrogate's expected gradient is exactly that of
    KL(p_S^tau || p_T^tau); scored at 1 (before the fix) it is off both that and KL(p_S || p_T)."""
    s = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    t = torch.tensor([0.0, 1.5, -0.5, 1.0, 0.5, -1.0])
    v = s.numel()
    p = (s / TAU).softmax(-1)
    cfg = load_config("opsa", overrides=["divergence=sampled", f"temperature={TAU}"])

    def expected(fixed: bool) -> torch.Tensor:
        def loss(x):
            total = 0.0
            for y in range(v):
                tokens = torch.tensor([[y]])
                if fixed:
                    batch = Scored([[0]], [[y]], tokens, torch.ones(1, 1), x.view(1, 1, v), t.view(1, 1, v), None)
                    per_token, _ = divergence_objective(
                        cfg.section("loss"), cfg.section("rollout"), batch, None, None, 0
                    )
                else:
                    per_token = per_token_divergence(x.view(1, 1, v), t.view(1, 1, v), "sampled", tokens=tokens)
                total = total + p[y] * per_token.sum()
            return total

        return toy_gradient(loss, s)

    exact_tau = toy_gradient(lambda x: kl(x / TAU, t / TAU), s)
    exact_one = toy_gradient(lambda x: kl(x, t), s)
    assert relative(expected(True), exact_tau) < 1e-5
    old = expected(False)
    assert relative(old, exact_one) > 0.2 and relative(old, exact_tau) > 0.2  # 0.25 and 0.45 on this toy


def test_sequence_reward_expected_gradient_follows_the_tempered_sequence_kl():
    """A two-token toy policy (the second token's logits depend on the first), 200k sampled
    sequences at tau in one group, no clipping: the sequence reward's gradient points along
    grad KL(p_S^tau || p_T^tau) over sequences when scored at tau; scored at 1 it does not."""
    v, n = 4, 200_000
    g = torch.Generator().manual_seed(1)
    s1, s2, t1, t2 = (torch.randn(*shape, generator=g) * 1.5 for shape in [(v,), (v, v), (v,), (v, v)])
    y1 = torch.multinomial((s1 / TAU).softmax(-1), n, True, generator=g)
    y2 = torch.multinomial((s2[y1] / TAU).softmax(-1), 1, True, generator=g)[:, 0]
    tokens = torch.stack([y1, y2], 1)

    def rows(a1, a2):
        return torch.stack([a1.expand(n, v), a2[y1]], 1)

    def seq_kl(a1, a2, temp):
        l1, l2 = (a1 / temp).log_softmax(-1), (a2 / temp).log_softmax(-1)
        m1, m2 = (t1 / temp).log_softmax(-1), (t2 / temp).log_softmax(-1)
        lp, lq = l1[:, None] + l2, m1[:, None] + m2  # [y1, y2]
        return (lp.exp() * (lp - lq)).sum()

    def grad(f):
        a1, a2 = s1.clone().requires_grad_(True), s2.clone().requires_grad_(True)
        return torch.cat([x.flatten() for x in torch.autograd.grad(f(a1, a2), (a1, a2))])

    def estimate(temp):
        def loss(a1, a2):
            per_token, _ = clipped_reward_objective(
                rows(a1, a2), rows(t1, t2), tokens, torch.ones(n, 2), group_size=n, low=-100, high=100, bonus=0.0,
                kl_coef=0, temperature=temp, reward_level="sequence",
            )  # fmt: skip
            return per_token.sum() / n

        return grad(loss)

    exact_tau, exact_one = grad(lambda a1, a2: seq_kl(a1, a2, TAU)), grad(lambda a1, a2: seq_kl(a1, a2, 1.0))
    fixed, old = estimate(TAU), estimate(1.0)
    assert (unit(fixed) - unit(exact_tau)).norm() < 0.02  # 0.004: Monte Carlo noise
    assert (unit(old) - unit(exact_tau)).norm() > 0.08  # 0.13
    assert (unit(old) - unit(exact_one)).norm() > 0.2  # 0.34


def test_group_normalize_still_cancels_a_constant():
    values, mask = torch.randn(4, 5), torch.ones(4, 5)
    torch.testing.assert_close(group_normalize(values + 0.02, mask, 2), group_normalize(values, mask, 2))
    assert math.isfinite(float(group_normalize(torch.ones(2, 3), mask[:2, :3], 2).abs().max()))


# --- ppo_epochs: rollout reuse


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("data"))


def ppo_cfg(tiny_dir, sources, ppo_epochs: int):
    settings = dict(steps=2, objective="clipped_reward", rollouts_per_prompt=2, ppo_clip=0.01, diagnostics_every=0)
    return load_config("opsa", overrides=run_settings(tiny_dir, sources, ppo_epochs=ppo_epochs, **settings))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ppo_runs(tiny_dir, sources, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    for n in (1, 2):
        train(ppo_cfg(tiny_dir, sources, n), runs / f"epochs{n}", progress=False)
    return runs / "epochs1", runs / "epochs2"


def test_ppo_epochs_reuse_the_rollouts_so_the_ratio_moves_and_the_clip_acts(ppo_runs):
    one, two = (metrics(run) for run in ppo_runs)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    assert all(r["clip_fraction"] == 0 and r["ppo_ratio_dev"] == 0 and "reuse_loss" not in r for r in one)
    assert all(r["clip_fraction"] > 0 and r["ppo_ratio_dev"] > 0 and math.isfinite(r["reuse_loss"]) for r in two)
    # The first update of a step is the ppo_epochs=1 update; the second starts from moved weights.
    for key in ("loss", "tokens", "student_entropy", "mean_kl", "reward_mean"):
        assert two[0][key] == one[0][key], key
    assert two[0]["reuse_loss"] != two[0]["loss"] and two[1]["loss"] != one[1]["loss"]


def test_resume_with_ppo_epochs_redoes_only_the_interrupted_step(tiny_dir, sources, ppo_runs, tmp_path, monkeypatch):
    cfg, out = ppo_cfg(tiny_dir, sources, 2), tmp_path / "killed"
    calls = train_until_killed(cfg, out, monkeypatch, 4)  # step 2, its second update
    assert [c[-1] for c in calls] == [0, 1, 0, 1] and [r["step"] for r in metrics(out)] == [1]
    train(cfg, out, resume=True, progress=False)
    got, want = metrics(out), metrics(ppo_runs[1])
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "reuse_loss", "clip_fraction", "ppo_ratio_dev"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_a_run_with_the_full_reverse_kl_to_the_base(tiny_dir, sources, tmp_path):
    settings = dict(steps=2, objective="clipped_reward", rollouts_per_prompt=2, ref_kl_estimator="full_reverse")
    cfg = load_config("opsa", overrides=run_settings(tiny_dir, sources, diagnostics_every=0, **settings))
    train(cfg, tmp_path / "run", progress=False)
    first, second = metrics(tmp_path / "run")
    assert first["ref_kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts at the base
    assert second["ref_kl"] > 1e-6 and math.isfinite(second["loss"])  # one update moved the student off it
