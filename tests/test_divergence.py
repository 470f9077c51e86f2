"""Tests for safedistill.losses.divergence against direct float64 reference computations."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from safedistill.losses.divergence import DIVERGENCES, masked_mean, per_token_divergence, token_stats
from safedistill.losses.masks import first_k_mask, top_fraction_mask

B, T, V = 2, 5, 11
TOL = dict(atol=1e-5, rtol=1e-4)
FULL_KINDS = ("reverse_kl", "forward_kl", "jsd", "mixture")


def sampled_kl(s, t, tokens):
    """The sampled-token reverse-KL estimate a step logs (token_stats' token_kl)."""
    return token_stats(s, t, tokens)["token_kl"]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = (2 * torch.randn(B, T, V, generator=g)).requires_grad_()
    t = 2 * torch.randn(B, T, V, generator=g)
    return s, t


# ---- independent references (float64, explicit loops) ----------------------------------------


def probs(x):
    x = x.detach().double()
    e = (x - x.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def kl_list(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def per_pos(fn, ps, pt):
    """Apply fn(p_student_list, p_teacher_list) at every (b, t) -> float64 [B, T]."""
    out = torch.zeros(ps.shape[:2], dtype=torch.float64)
    for b, t in itertools.product(range(ps.shape[0]), range(ps.shape[1])):
        out[b, t] = fn(ps[b, t].tolist(), pt[b, t].tolist())
    return out


def ref_rev(p, q):
    return kl_list(p, q)


def ref_fwd(p, q):
    return kl_list(q, p)


def ref_jsd(beta):
    def fn(p, q):
        m = [beta * qi + (1 - beta) * pi for pi, qi in zip(p, q, strict=True)]
        return beta * kl_list(q, m) + (1 - beta) * kl_list(p, m)

    return fn


def ref_mix(alpha):
    return lambda p, q: alpha * kl_list(q, p) + (1 - alpha) * kl_list(p, q)


def with_top_k(fn, k):
    """Reference top-k + tail: teacher's k most likely ids, then one bucket for the rest."""

    def wrapped(p, q):
        ids = sorted(range(len(q)), key=lambda v: -q[v])[:k]
        pk = [p[v] for v in ids] + [1 - sum(p[v] for v in ids)]
        qk = [q[v] for v in ids] + [1 - sum(q[v] for v in ids)]
        return fn(pk, qk)

    return wrapped


def div(s, t, kind, **kw):
    return per_token_divergence(s, t, kind, **kw)


# ---- full-vocabulary divergences --------------------------------------------------------------


def test_reverse_and_forward_kl_match_kl_div_and_loop(logits):
    s, t = logits
    ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    rev_ref = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)  # KL(p_S || p_T)
    fwd_ref = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)  # KL(p_T || p_S)
    rev, fwd = div(s, t, "reverse_kl"), div(s, t, "forward_kl")
    assert rev.shape == fwd.shape == (B, T)
    torch.testing.assert_close(rev.double(), rev_ref.detach(), **TOL)
    torch.testing.assert_close(fwd.double(), fwd_ref.detach(), **TOL)
    ps, pt = probs(s), probs(t)
    torch.testing.assert_close(rev.double(), per_pos(ref_rev, ps, pt), **TOL)
    torch.testing.assert_close(fwd.double(), per_pos(ref_fwd, ps, pt), **TOL)
    assert not torch.allclose(rev, fwd, atol=1e-2)  # the two directions really differ here


def test_jsd_endpoints_follow_trl_gkd_convention(logits):
    s, t = logits
    torch.testing.assert_close(div(s, t, "jsd", beta=0.0), div(s, t, "forward_kl"))
    torch.testing.assert_close(div(s, t, "jsd", beta=1.0), div(s, t, "reverse_kl"))


def test_jsd_interior_matches_explicit_formula(logits):
    s, t = logits
    ps, pt = probs(s), probs(t)
    for beta in (0.5, 0.2, 0.9):
        got = div(s, t, "jsd", beta=beta).double()
        torch.testing.assert_close(got, per_pos(ref_jsd(beta), ps, pt), **TOL)
    # the interior formula tends to 0 at the endpoints (why TRL special-cases beta in {0, 1})
    assert div(s, t, "jsd", beta=1e-6).abs().max() < 1e-4 < div(s, t, "forward_kl").min()
    # symmetric JSD is bounded by log 2
    assert (div(s, t, "jsd", beta=0.5) <= math.log(2) + 1e-6).all()


def test_mixture_is_alpha_forward_plus_rest_reverse(logits):
    s, t = logits
    ps, pt = probs(s), probs(t)
    for alpha in (0.0, 0.3, 1.0):
        got = div(s, t, "mixture", alpha=alpha).double()
        torch.testing.assert_close(got, per_pos(ref_mix(alpha), ps, pt), **TOL)


@pytest.mark.parametrize("kind", FULL_KINDS)
def test_non_negative_and_zero_when_equal(logits, kind):
    s, t = logits
    assert (div(s, t, kind, beta=0.3) >= -1e-6).all()
    assert (div(s, t, kind, beta=0.3) > 1e-3).any()
    assert (div(s, t, kind, top_k=3) >= -1e-6).all()
    same = s.detach().clone()
    torch.testing.assert_close(div(s, same, kind), torch.zeros(B, T), atol=1e-6, rtol=0)
    torch.testing.assert_close(div(s, same + 3.0, kind), torch.zeros(B, T), atol=1e-5, rtol=0)


def test_teacher_gets_no_gradient(logits):
    s, t = logits
    t = t.clone().requires_grad_()
    for kind in DIVERGENCES:
        out = div(s, t, kind, tokens=torch.zeros(B, T, dtype=torch.long))
        out.sum().backward()
        assert t.grad is None
        assert s.grad is not None and s.grad.abs().sum() > 0
        s.grad = None


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_float32_output_for_bfloat16_inputs(logits, kind):
    s, t = logits
    sb = s.detach().bfloat16().requires_grad_()
    tb = t.bfloat16()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    out = div(sb, tb, kind, tokens=tokens)
    assert out.dtype == torch.float32
    # equals the float32 computation on the (bf16-rounded) logits
    ref = div(sb.detach().float(), tb.float(), kind, tokens=tokens)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert sb.grad.dtype == torch.bfloat16
    assert sampled_kl(sb, tb, tokens).dtype == torch.float32
    assert masked_mean(out.bfloat16(), torch.ones(B, T)).dtype == torch.float32
    if kind != "sampled":
        assert div(sb, tb, kind, top_k=4).dtype == torch.float32


# ---- top-k with tail bucket -------------------------------------------------------------------


@pytest.mark.parametrize("kind", FULL_KINDS)
def test_top_k_covering_vocab_equals_full(logits, kind):
    s, t = logits
    full = div(s, t, kind, beta=0.3, alpha=0.7)
    torch.testing.assert_close(div(s, t, kind, beta=0.3, alpha=0.7, top_k=V), full)
    torch.testing.assert_close(div(s, t, kind, beta=0.3, alpha=0.7, top_k=V + 5), full)


@pytest.mark.parametrize(
    ("kind", "fn"),
    [
        ("reverse_kl", ref_rev),
        ("forward_kl", ref_fwd),
        ("jsd", ref_jsd(0.3)),
        ("mixture", ref_mix(0.7)),
    ],
)
def test_top_k_tail_bucket_matches_hand_computation(logits, kind, fn):
    s, t = logits
    ps, pt = probs(s), probs(t)
    for k in (1, 3, V - 1):
        got = div(s, t, kind, beta=0.3, alpha=0.7, top_k=k)
        torch.testing.assert_close(got.double(), per_pos(with_top_k(fn, k), ps, pt), **TOL)
        # merging outcomes can only lose information: never above the full divergence
        assert (got <= div(s, t, kind, beta=0.3, alpha=0.7) + 1e-5).all()
        got.sum().backward()
        assert torch.isfinite(s.grad).all()
        s.grad = None
    assert not torch.allclose(div(s, t, kind, top_k=3), div(s, t, kind), atol=1e-3)


def test_top_k_tail_is_exact_when_tiny():
    # student puts ~1e-12 on the tail: 1 - sum(top) is 0 in float32, the log of it is not
    s = torch.zeros(1, 1, V)
    s[..., 0] = 30.0
    t = torch.zeros(1, 1, V)
    t[..., 0] = math.log(V - 1)  # teacher: half the mass on id 0, half on the rest
    got = div(s.requires_grad_(), t, "forward_kl", top_k=1)
    log_tail_s = math.log(V - 1) - 30.0 - math.log1p((V - 1) * math.exp(-30.0))
    log_top_s = -math.log1p((V - 1) * math.exp(-30.0))
    want = 0.5 * (math.log(0.5) - log_top_s) + 0.5 * (math.log(0.5) - log_tail_s)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_zero_probability_entries_give_finite_values_and_grads(logits):
    # teachers may mask vocabulary ids with -inf: p_T = 0 there must add 0, not NaN
    s, t = logits
    t = t.clone()
    t[..., [2, 7]] = float("-inf")
    ps, pt = probs(s), probs(t)
    for kw, fn in ((dict(), ref_fwd), (dict(top_k=V - 2), with_top_k(ref_fwd, V - 2))):
        got = div(s, t, "forward_kl", **kw)  # with top_k=V-2 the teacher's tail is empty
        torch.testing.assert_close(got.double(), per_pos(fn, ps, pt), **TOL)
        got.sum().backward()
        assert torch.isfinite(s.grad).all()
        s.grad = None
    assert torch.isfinite(div(s, t, "jsd", beta=0.5)).all()


# ---- SafeSteer vocabulary subset --------------------------------------------------------------


def test_vocab_ids_is_unrenormalised_partial_reverse_kl(logits):
    s, t = logits
    ids = torch.tensor([0, 3, 4, 9])
    ps, pt = probs(s), probs(t)
    want = torch.zeros(B, T, dtype=torch.float64)
    for b, i in itertools.product(range(B), range(T)):
        want[b, i] = sum(ps[b, i, v] * math.log(ps[b, i, v] / pt[b, i, v]) for v in ids.tolist())
    got = div(s, t, "reverse_kl", vocab_ids=ids)
    torch.testing.assert_close(got.double(), want, **TOL)
    # NOT renormalised: differs from the KL between the distributions restricted to the subset
    renorm = F.kl_div(
        F.log_softmax(t[..., ids].double(), -1),
        F.log_softmax(s[..., ids].double(), -1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    assert not torch.allclose(got.double(), renorm.detach(), atol=1e-3)
    torch.testing.assert_close(div(s, t, "reverse_kl", vocab_ids=torch.arange(V)), div(s, t, "reverse_kl"))
    # partial sums can be negative, so this is a loss term, not a divergence
    assert (got < 0).any()


def test_vocab_ids_forward_kl_is_the_unrenormalised_partial_sum_the_other_way(logits):
    s, t = logits
    ids = torch.tensor([1, 2, 7])
    ps, pt = probs(s), probs(t)
    want = torch.zeros(B, T, dtype=torch.float64)
    for b, i in itertools.product(range(B), range(T)):
        want[b, i] = sum(pt[b, i, v] * math.log(pt[b, i, v] / ps[b, i, v]) for v in ids.tolist())
    torch.testing.assert_close(div(s, t, "forward_kl", vocab_ids=ids).double(), want, **TOL)
    torch.testing.assert_close(div(s, t, "forward_kl", vocab_ids=torch.arange(V)), div(s, t, "forward_kl"))


# ---- sampled-token score-function estimator ---------------------------------------------------


def test_sampled_value_and_sampled_kl(logits):
    s, t = logits
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    ls = F.log_softmax(s.detach().double(), -1).gather(-1, tokens[..., None])[..., 0]
    lt = F.log_softmax(t.double(), -1).gather(-1, tokens[..., None])[..., 0]
    got = div(s, t, "sampled", tokens=tokens)
    torch.testing.assert_close(got.double(), (ls - lt) * ls, **TOL)
    est = sampled_kl(s, t, tokens)
    assert not est.requires_grad
    torch.testing.assert_close(est.double(), ls - lt, **TOL)
    # E_{y~p_S}[log p_S(y) - log p_T(y)] = reverse KL, by enumeration over y
    ps = probs(s)
    mean = sum(ps[..., y] * sampled_kl(s, t, torch.full((B, T), y)).double() for y in range(V))
    torch.testing.assert_close(mean, div(s, t, "reverse_kl").double(), **TOL)


def test_sampled_gradient_equals_reverse_kl_gradient_in_expectation(logits):
    s, t = logits
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    (want,) = torch.autograd.grad(masked_mean(div(s, t, "reverse_kl"), mask), s)
    ps = probs(s).float()
    expected = torch.zeros_like(s)
    for y in range(V):  # the grad at (b, t) only depends on the token at (b, t)
        loss = masked_mean(div(s, t, "sampled", tokens=torch.full((B, T), y)), mask)
        (g,) = torch.autograd.grad(loss, s)
        expected += ps[..., y : y + 1] * g
    torch.testing.assert_close(expected, want, atol=1e-6, rtol=1e-4)
    assert want.abs().sum() > 1e-2
    assert (want[0, 3:] == 0).all()


def test_sampled_over_s_is_zero_off_s_and_its_expected_gradient_settles_at_the_teacher(logits):
    """The S-restricted sampled-token reverse KL: the surrogate only where the sampled token is in
    S, whose expected gradient is that of sum_{v in S} p (log p/q) - p."""
    s, t = logits
    ids = torch.tensor([1, 4, 7])
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    got = div(s, t, "sampled", tokens=tokens, vocab_ids=ids)
    in_s = torch.isin(tokens, ids)
    assert (got[~in_s] == 0).all() and in_s.any() and (~in_s).any()
    torch.testing.assert_close(got[in_s], div(s, t, "sampled", tokens=tokens)[in_s])
    ps = probs(s).float()
    expected = torch.zeros_like(s)
    for y in range(V):
        (g,) = torch.autograd.grad(div(s, t, "sampled", tokens=torch.full((B, T), y), vocab_ids=ids).sum(), s)
        expected += ps[..., y : y + 1] * g
    lp, lq = F.log_softmax(s, -1)[..., ids], F.log_softmax(t, -1)[..., ids]
    (want,) = torch.autograd.grad((lp.exp() * (lp - lq) - lp.exp()).sum(), s)
    torch.testing.assert_close(expected, want, atol=1e-6, rtol=1e-4)


def test_s_losses_fixed_points_teacher_over_e_and_teacher():
    """Gradient descent on free logits: the unnormalised reverse KL over S drives p_v to q_v / e;
    the S-restricted sampled-token reverse KL (exact expected gradient) drives p_v to q_v."""
    q = torch.tensor([0.30, 0.20, 0.25, 0.15, 0.10])
    ids = torch.tensor([0, 2])
    teacher = q.log().view(1, 1, -1)
    ends = {}
    for kind in ("reverse_kl", "sampled"):
        z = torch.zeros(1, 1, 5, requires_grad=True)
        opt = torch.optim.SGD([z], lr=0.5)
        for _ in range(3000):
            opt.zero_grad()
            if kind == "reverse_kl":
                loss = div(z, teacher, "reverse_kl", vocab_ids=ids).sum()
            else:  # E_{y ~ p}[surrogate(y)], enumerated
                p = F.softmax(z, -1).detach()
                loss = sum(
                    p[0, 0, y] * div(z, teacher, "sampled", tokens=torch.full((1, 1), y), vocab_ids=ids).sum()
                    for y in range(5)
                )
            loss.backward()
            opt.step()
        ends[kind] = F.softmax(z.detach(), -1)[0, 0, ids]
    torch.testing.assert_close(ends["reverse_kl"], q[ids] / math.e, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(ends["sampled"], q[ids], atol=1e-4, rtol=1e-3)


# ---- input validation -------------------------------------------------------------------------


def test_errors(logits):
    s, t = logits
    tok = torch.zeros(B, T, dtype=torch.long)
    bad = [
        dict(kind="kl"),
        dict(kind="sampled"),
        dict(kind="jsd", vocab_ids=torch.tensor([1, 2])),
        dict(kind="reverse_kl", vocab_ids=torch.tensor([1, V])),
        dict(kind="reverse_kl", vocab_ids=torch.tensor([[1, 2]])),
        dict(kind="reverse_kl", vocab_ids=torch.tensor([1, 2]), top_k=3),
        dict(kind="sampled", tokens=tok[:, :3]),
        dict(kind="sampled", tokens=tok.float()),
        dict(kind="sampled", tokens=tok, top_k=3),
        dict(kind="jsd", beta=1.5),
        dict(kind="mixture", alpha=-0.1),
        dict(kind="forward_kl", top_k=0),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            per_token_divergence(s, t, **kw)
    with pytest.raises(ValueError, match="unknown divergence"):
        per_token_divergence(s, t, "kl")
    with pytest.raises(ValueError, match="tokens"):
        per_token_divergence(s, t, "sampled")
    for tt in (t[:, :3], t[..., :5], t[0]):
        with pytest.raises(ValueError, match="shape"):
            per_token_divergence(s, tt, "reverse_kl")
    with pytest.raises(ValueError):
        sampled_kl(s, t[:, :3], tok)
    with pytest.raises(ValueError):
        masked_mean(torch.zeros(B, T), torch.ones(B, T + 1))


# ---- masks and reduction ----------------------------------------------------------------------


def test_masked_mean_ignores_garbage_padding(logits):
    s, t = logits
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float32)
    garbage = s.detach().clone()
    garbage[mask == 0] = float("nan")
    rev = div(garbage, t, "reverse_kl")
    assert torch.isnan(rev[mask == 0]).all()
    ref = per_pos(ref_rev, probs(s), probs(t))
    want = ref[mask == 1].sum() / 6  # token-level mean, not a mean of per-sequence means
    assert masked_mean(rev, mask).item() == pytest.approx(want.item(), rel=1e-5)
    assert masked_mean(rev, mask.bool()).item() == pytest.approx(want.item(), rel=1e-5)
    # huge finite garbage: same value, and no gradient reaches the padded positions
    big = s.detach().clone()
    big[mask == 0] = 1e4 * torch.randn(4, V)
    big.requires_grad_()
    loss = masked_mean(div(big, t, "reverse_kl"), mask)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert (big.grad[mask == 0] == 0).all() and (big.grad[mask == 1] != 0).any()


def test_masked_mean_weights_and_empty_mask():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert masked_mean(v, m).item() == pytest.approx((1 + 3 + 6) / 3)
    empty = masked_mean(v, torch.zeros_like(m))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert (v.grad == 0).all()


def test_top_fraction_mask_threshold():
    scores = torch.tensor([[0.1, 0.9, 0.5, 2.0, 0.5], [3.0, 0.2, 0.6, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0, 1], [0, 1, 1, 1, 0]])
    got = top_fraction_mask(scores, mask, threshold=0.5)
    want = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)  # strictly above, and never outside the mask


def test_top_fraction_mask_fraction():
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(3, 8, generator=g, requires_grad=True)
    mask = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 0, 0, 0], [0] * 8])
    got = top_fraction_mask(scores, mask, fraction=0.25)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert got[0].sum() == 2 and got[1].sum() == 1 and got[2].sum() == 0  # >= 1 if non-empty
    for row in range(2):
        valid = mask[row].bool()
        k = int(got[row].sum())
        top = scores[row].detach().masked_fill(~valid, -1).topk(k).indices
        assert torch.equal(got[row].nonzero().flatten().sort().values, top.sort().values)
    assert torch.equal(top_fraction_mask(scores, mask, fraction=1.0), mask.float())
    assert torch.equal(top_fraction_mask(scores, mask, fraction=1e-12).sum(1), torch.tensor([1.0, 1, 0]))
    # rounding: 0.07 * 100 is 7.000000000000001 in floating point but must select 7, not 8
    big = top_fraction_mask(torch.rand(1, 100, generator=g), torch.ones(1, 100), fraction=0.07)
    assert big.sum() == 7
    # valid positions with -inf/NaN scores still outrank padding
    odd = torch.tensor([[9.0, float("-inf"), float("nan")]])
    got = top_fraction_mask(odd, torch.tensor([[0, 1, 1]]), fraction=1.0)
    assert torch.equal(got, torch.tensor([[0.0, 1.0, 1.0]]))


def test_top_fraction_mask_errors():
    x = torch.zeros(2, 3)
    for kw in (dict(), dict(fraction=0.5, threshold=0.1), dict(fraction=0.0), dict(fraction=1.5)):
        with pytest.raises(ValueError):
            top_fraction_mask(x, x, **kw)
    with pytest.raises(ValueError):
        top_fraction_mask(x, torch.zeros(2, 4), fraction=0.5)


def test_first_k_mask():
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]])
    got = first_k_mask(mask, 2)
    want = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    assert got.dtype == torch.float32
    assert torch.equal(got, want.float())
    assert torch.equal(first_k_mask(mask, 0), torch.zeros(4, 5))
    assert torch.equal(first_k_mask(mask.bool(), 10), mask.float())
    with pytest.raises(ValueError):
        first_k_mask(mask, -1)


def _reverse_kl_by_autograd(s, t):
    ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    return (ls.exp() * (ls - lt)).sum(-1)


@pytest.mark.parametrize("chunk", [3 * V, 10**6])  # several row chunks, and one
def test_fused_full_reverse_kl_matches_autograd_value_and_gradient(logits, monkeypatch, chunk):
    from safedistill.losses import divergence

    monkeypatch.setattr(divergence, "CHUNK_FLOATS", chunk)
    s, t = logits
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(1))
    got = divergence.full_reverse_kl(s, t)
    (grad,) = torch.autograd.grad((got * weights).sum(), s)
    s64 = s.detach().double().requires_grad_()
    want = _reverse_kl_by_autograd(s64, t)
    (want_grad,) = torch.autograd.grad((want * weights.double()).sum(), s64)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    torch.testing.assert_close(got.double(), want.detach(), **TOL)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-6, rtol=1e-4)
    # per_token_divergence takes the fused path for the full-vocabulary reverse KL
    torch.testing.assert_close(per_token_divergence(s, t, "reverse_kl"), got)


def test_fused_reverse_kl_with_masked_teacher_entries_and_bf16(logits):
    from safedistill.losses.divergence import full_reverse_kl

    s, t = logits
    t = t.clone()
    t[..., :3] = float("-inf")  # entries the teacher rules out
    got = full_reverse_kl(s, t)
    (grad,) = torch.autograd.grad(got.sum(), s)
    assert torch.isfinite(grad).all()
    s16 = s.detach().bfloat16().requires_grad_()
    got16 = full_reverse_kl(s16, t)
    (grad16,) = torch.autograd.grad(got16.sum(), s16)
    assert got16.dtype == torch.float32 and grad16.dtype == torch.bfloat16
    torch.testing.assert_close(got16, full_reverse_kl(s16.detach().float(), t), **TOL)


def test_token_stats_match_direct_formulas(logits, monkeypatch):
    from safedistill.losses import divergence

    monkeypatch.setattr(divergence, "CHUNK_FLOATS", 2 * V)
    s, t = logits
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([1, 4, 7])
    got = divergence.token_stats(s, t, tokens, ids)
    ls, lt = F.log_softmax(s.detach().double(), -1), F.log_softmax(t.double(), -1)
    want = {
        "reverse_kl": _reverse_kl_by_autograd(s.detach(), t),
        "student_entropy": -(ls.exp() * ls).sum(-1),
        "teacher_entropy": -(lt.exp() * lt).sum(-1),
        "token_kl": (ls - lt).gather(-1, tokens[..., None]).squeeze(-1),
        "mass_on_ids": ls.exp()[..., ids].sum(-1),
        "teacher_mass_on_ids": lt.exp()[..., ids].sum(-1),
    }
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, **TOL, msg=name)
    assert "mass_on_ids" not in divergence.token_stats(s, t, tokens)
