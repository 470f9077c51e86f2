"""COPSD: the constitution teacher, the clipped-reward objective, collapse diagnostics and the
Cross-SFT cold start, on the tiny random Llama."""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import cross_sft_of, run_settings, splits_of, train_until_killed, write_sources
from safedistill.config import load_config
from safedistill.engine import rollout as trainer_mod
from safedistill.engine.rollout import SamplingSettings, encode_prompts, generate
from safedistill.engine.scoring import response_logits
from safedistill.errors import UserError
from safedistill.eval.diagnostics import mean_entropy, text_stats
from safedistill.eval.judges import Verdict
from safedistill.losses.objectives import (
    clipped_reward,
    clipped_reward_objective,
    group_normalize,
    k3_kl,
    ppo_clipped_loss,
    sequence_advantages,
)
from safedistill.methods.base import training_items
from safedistill.methods.cross_sft import crossed_rows
from safedistill.models import chat_text, load_model
from safedistill.teachers import FrozenBase, Item
from safedistill.teachers.constitution import REQUEST_HEADER, ConstitutionTeacher, load_constitution, wrap
from safedistill.train import train


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("data"))


def make_cfg(model, sources, preset="copsd", **overrides):
    settings = {
        "steps": 3,
        "rollouts_per_prompt": 2,
        "benign_ratio": "null",
        "cross_sft_steps": 2,
        "cross_sft_batch_size": 4,
        "cross_sft_max_new_tokens": 8,
        "diagnostics_every": 2,
        "diagnostics_prompts": 2,
        **overrides,
    }
    return load_config(preset, overrides=run_settings(model, sources, **settings))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- constitution


def test_builtin_constitution_has_the_published_shape_and_user_files_load(tmp_path):
    text = load_constitution("builtin")
    for needle in ("risk", "Path A", "Refuse and redirect", "Path B", "Warn and guide", "Path C", "Assist fully"):
        assert needle in text, needle
    assert "Helpfulness" in text and "Completeness" in text
    own = tmp_path / "mine.md"
    own.write_text("Be kind.\n")
    assert load_constitution(str(own)) == "Be kind."
    with pytest.raises(UserError, match="no such file"):
        load_constitution(str(tmp_path / "missing.md"))
    (tmp_path / "empty.md").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        load_constitution(str(tmp_path / "empty.md"))


def test_constitution_teacher_scores_the_wrapped_prompt_with_a_cached_prefix(tiny_dir):
    model, tok = load_model(tiny_dir)
    constitution = load_constitution("builtin")
    teacher = ConstitutionTeacher(FrozenBase(model, share_weights=False), tok, constitution)
    items = [Item("a", "How do I boil an egg?", "benign"), Item("b", "Write malware.", "harmful")]
    responses = [[5, 6, 7], [8, 9]]
    got = teacher.logits(model, items, responses)
    assert teacher._kv  # the constitution prefix was cached
    wrapped = encode_prompts(tok, [chat_text(tok, wrap(constitution, it.prompt)) for it in items])
    want, mask = response_logits(model, wrapped, responses, pad_id=tok.pad_token_id)
    torch.testing.assert_close(got * mask[..., None], want * mask[..., None], atol=1e-4, rtol=1e-4)
    bare = encode_prompts(tok, [chat_text(tok, it.prompt) for it in items])
    plain, _ = response_logits(model, bare, responses, pad_id=tok.pad_token_id)
    assert not torch.allclose(got * mask[..., None], plain * mask[..., None], atol=1e-3)
    assert constitution in teacher.prompt_text(items[0]) and items[0].prompt in teacher.prompt_text(items[0])


def test_only_the_teacher_sees_the_constitution_in_a_run(tiny_dir, sources, tmp_path, monkeypatch):
    student_prompts, teacher_prompts = [], []
    real_generate = trainer_mod.generate
    real_logits = ConstitutionTeacher.logits

    def spy_generate(model, tok, prompts, *args, **kwargs):
        student_prompts.extend(prompts)
        return real_generate(model, tok, prompts, *args, **kwargs)

    def spy_logits(self, student, items, responses):
        teacher_prompts.extend(self.prompt_text(it) for it in items)
        return real_logits(self, student, items, responses)

    monkeypatch.setattr(trainer_mod, "generate", spy_generate)
    monkeypatch.setattr(ConstitutionTeacher, "logits", spy_logits)
    cfg = make_cfg(tiny_dir, sources, preset="constitutional-opsd", steps=1, diagnostics_every=0)
    train(cfg, tmp_path / "run", progress=False)
    assert student_prompts and teacher_prompts
    assert not any(REQUEST_HEADER in p for p in student_prompts)
    assert all(REQUEST_HEADER in p for p in teacher_prompts)


# --- objective


def test_clipped_reward_and_group_normalisation_match_a_hand_computation():
    t = torch.tensor([[-1.0, -10.0, 0.0], [-2.0, -0.5, -9.0]])
    s = torch.tensor([[-2.0, -1.0, -8.0], [-1.0, -1.0, -1.0]])
    r = clipped_reward(t, s)
    # log-ratios 1, -9 -> -3, 8 -> 5, -1, 0.5, -8 -> -3; plus 0.02
    torch.testing.assert_close(r, torch.tensor([[1.02, -2.98, 5.02], [-0.98, 0.52, -2.98]]))

    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    adv = group_normalize(values, mask, group_size=2)
    # one group of five tokens 1..5: mean 3, population std sqrt(2); padding gives 0
    want = (torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 3.0]]) - 3) / (math.sqrt(2) + 1e-6) * mask
    torch.testing.assert_close(adv, want)
    per_row = group_normalize(values, mask, group_size=1)
    torch.testing.assert_close(per_row[1, :2], torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="groups of 2"):
        group_normalize(values[:1], mask[:1], group_size=2)


def test_ppo_clip_gives_no_gradient_outside_the_clip_range():
    old = torch.zeros(1, 4)
    # ratios e^0.5 (above 1.2), e^-0.5 (below 0.8), e^0.1, e^-0.1
    logp = torch.tensor([[0.5, -0.5, 0.1, -0.1]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    ppo_clipped_loss(logp, old, adv, clip=0.2).sum().backward()
    g = logp.grad[0]
    assert g[0] == 0 and g[1] == 0  # clipped side of the min: no push further out
    torch.testing.assert_close(g[2:], torch.tensor([-math.exp(0.1), math.exp(-0.1)]))
    # With the advantage's sign flipped the unclipped term is the min: gradient flows back inward.
    logp.grad = None
    ppo_clipped_loss(logp, old, -adv, clip=0.2).sum().backward()
    assert logp.grad[0, 0] != 0 and logp.grad[0, 1] != 0


def test_k3_kl_and_the_full_objective():
    assert float(k3_kl(torch.tensor(0.3), torch.tensor(0.3))) == 0.0
    d = -0.7
    assert float(k3_kl(torch.tensor(0.0), torch.tensor(d))) == pytest.approx(math.exp(d) - d - 1)

    torch.manual_seed(0)
    s = torch.randn(4, 3, 11, requires_grad=True)
    t, ref = torch.randn(4, 3, 11), torch.randn(4, 3, 11)
    tokens = torch.randint(0, 11, (4, 3))
    mask = torch.ones(4, 3)
    logp = s.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    reward = (t.log_softmax(-1).gather(-1, tokens[..., None])[..., 0] - logp).clamp(-3, 5) + 0.02
    kl = k3_kl(logp, ref.log_softmax(-1).gather(-1, tokens[..., None])[..., 0])
    for level, adv in (
        ("token", group_normalize(reward.detach(), mask, 2)),
        ("sequence", sequence_advantages(reward.detach(), mask, 2)),
    ):
        loss, stats = clipped_reward_objective(
            s, t, tokens, mask, group_size=2, ref_logits=ref, kl_coef=0.005, reward_level=level
        )
        # At the rollout policy the ratio is 1: loss = -A + 0.005 * KL
        torch.testing.assert_close(loss, -adv + 0.005 * kl)
    torch.testing.assert_close(stats["reward"], reward.detach())
    assert not stats["clipped"].any()
    loss.sum().backward()
    assert s.grad.abs().sum() > 0


# --- diagnostics


def test_diagnostics_numbers_on_known_inputs():
    stats = text_stats(["a b a b", "c"], [4, 2])
    assert stats["length"] == 3.0
    assert stats["distinct_1"] == pytest.approx(3 / 5)  # a, b, c among 5 words
    assert stats["distinct_2"] == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    v = 7
    logits = torch.zeros(2, 3, v)
    logits[1, 0, 0] = 1e4  # a one-hot position: entropy 0
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert mean_entropy(logits, mask) == pytest.approx(2 * math.log(v) / 3, rel=1e-5)


# --- Cross-SFT


class AlternatingJudge:
    """'safe' for every other answer, in call order; never a refusal."""

    name = "alternating"

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, responses):
        out = []
        for _ in responses:
            out.append(Verdict("safe" if self.calls % 2 == 0 else "unsafe", 0.0, False))
            self.calls += 1
        return out

    def is_refusal(self, response):
        return False


def test_crossed_rows_keep_judged_safe_harmful_answers_and_own_benign_answers(tiny_dir, sources):
    model, tok = load_model(tiny_dir)
    cfg = make_cfg(tiny_dir, sources, cross_sft_samples=1, cross_sft_max_new_tokens=5)
    items = [Item(f"h{i}", p, "harmful") for i, p in enumerate(["Write malware.", "Hurt someone.", "Rob a bank."])]
    items += [Item("b0", "How do I boil an egg?", "benign"), Item("b1", "Name a cat.", "benign")]
    constitution = "Be safe and helpful."
    rows = crossed_rows(cross_sft_of(cfg), model, tok, AlternatingJudge(), items, constitution, progress=False)
    harmful = [r for r in rows if r["group"] == "harmful"]
    # Verdicts alternate safe, unsafe, safe over the three harmful tries: h0 and h2 are kept.
    assert [r["id"] for r in harmful] == ["h0", "h2"]
    assert all(r["source"] == "constitution" and r["judge"] == "safe" for r in harmful)
    settings = SamplingSettings(
        max_new_tokens=5, temperature=cfg.temperature, top_p=cfg.top_p, batch_size=16, seed=cfg.seed * 31 + 5
    )
    under, _ = generate(model, tok, [chat_text(tok, wrap(constitution, it.prompt)) for it in items[:3]], settings)
    assert [r["response"] for r in harmful] == [under[0].text, under[2].text]
    plain, _ = generate(model, tok, [chat_text(tok, it.prompt) for it in items[3:]], settings)
    benign = [r for r in rows if r["group"] == "benign"]
    assert [r["response"] for r in benign] == [x.text for x in plain if x.text.strip()]
    assert all(r["source"] == "own-answer" for r in benign)
    assert all(r["input"] == wrap(constitution, r["prompt"]) for r in rows)


@pytest.fixture(scope="module")
def copsd_run(tiny_dir, sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "copsd"
    train(make_cfg(tiny_dir, sources, judge="keyword"), out, progress=False)  # the keyword judge: see below
    return out


def test_copsd_run_writes_crossed_set_diagnostics_and_plot(copsd_run):
    rows = [json.loads(line) for line in (copsd_run / "crossed.jsonl").read_text().splitlines()]
    assert rows and all(REQUEST_HEADER in r["input"] for r in rows)
    # A random model never refuses: the keyword judge keeps no harmful answer, only benign ones.
    assert {r["group"] for r in rows} == {"benign"}
    assert (copsd_run / "cross_sft" / "adapter_model.safetensors").exists()
    sft = [json.loads(line) for line in (copsd_run / "cross_sft_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft] == [1, 2]
    m = metrics(copsd_run)
    assert [r["step"] for r in m] == [1, 2, 3]
    for r in m:
        for key in ("student_entropy", "teacher_entropy", "rollout_distinct_2", "reward_mean", "ref_kl"):
            assert math.isfinite(r[key]), key
    probed = [r["step"] for r in m if "diag_teacher_length" in r]
    assert probed == [1, 3]  # every 2 steps from the first, and the last
    first = m[0]
    for who in ("student", "teacher"):
        for key in ("length", "distinct_1", "distinct_2", "overrefusal", "entropy"):
            assert math.isfinite(first[f"diag_{who}_{key}"]), (who, key)
    # At step 1 the student is the base model and the teacher the Cross-SFT copy: they differ.
    assert first["diag_student_entropy"] != first["diag_teacher_entropy"]
    assert (copsd_run / "collapse.png").stat().st_size > 1000
    report = (copsd_run / "report.md").read_text()
    assert "## Collapse diagnostics" in report and "Cross-SFT cold start: 0/4 harmful" in report


def test_copsd_resume_matches_the_uninterrupted_run(tiny_dir, sources, copsd_run, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_dir, sources, judge="keyword")  # as copsd_run, the run it must match
    out = tmp_path / "killed"
    train_until_killed(cfg, out, monkeypatch, 3)
    train(cfg, out, resume=True, progress=False)
    got, want = metrics(out), metrics(copsd_run)
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a.get("diag_teacher_length") == b.get("diag_teacher_length")
    assert (out / "crossed.jsonl").read_text() == (copsd_run / "crossed.jsonl").read_text()


def test_clipped_reward_objective_runs_with_the_context_teacher(tiny_dir, sources, tmp_path):
    cfg = make_cfg(
        tiny_dir,
        sources,
        preset="opsa",
        steps=1,
        objective="clipped_reward",
        context="Refuse requests that could hurt someone.",
        diagnostics_every=0,
    )
    train(cfg, tmp_path / "run", progress=False)
    (row,) = metrics(tmp_path / "run")
    assert math.isfinite(row["loss"]) and row["ref_kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts at the base
    assert "diag_student_length" not in row


def test_benign_ratio_sets_the_benign_count(sources):
    harmful, benign = sources
    cfg = load_config(
        "copsd",
        overrides=[f"harmful_source={harmful}", f"benign_source={benign}", "n_harmful=4", "benign_ratio=0.5"],
    )
    from safedistill.data.packaged import Manifest

    items = training_items(cfg.section("data"), splits_of(cfg, Manifest()), cfg.seed)
    assert sum(it.group == "harmful" for it in items) == 4 and sum(it.group == "benign" for it in items) == 4
    with pytest.raises(UserError, match="benign_ratio"):
        load_config("copsd", overrides=["benign_ratio=1.0"])


def test_eval_response_entropy_is_the_token_weighted_mean(tiny_dir):
    from safedistill.data.schema import PromptRecord
    from safedistill.eval.evaluate import response_entropy

    model, tok = load_model(tiny_dir)
    records = [PromptRecord(f"p{i}", p) for i, p in enumerate(["Name a cat.", "How do I boil an egg?", "Hi"])]
    settings = SamplingSettings(max_new_tokens=5, temperature=1.0, seed=3)
    rollouts, _ = generate(model, tok, [chat_text(tok, r.prompt) for r in records], settings)
    got = response_entropy(model, tok, records, rollouts, batch_size=2)
    total, n = 0.0, 0
    for r, x in zip(records, rollouts, strict=True):
        ids = x.response_ids or [tok.pad_token_id]
        logits, mask = response_logits(
            model, encode_prompts(tok, [chat_text(tok, r.prompt)]), [ids], pad_id=tok.pad_token_id
        )
        total += mean_entropy(logits, mask) * len(ids)
        n += len(ids)
    assert got == pytest.approx(total / n, rel=1e-5)
    assert 0 < got < math.log(len(tok)) + 1e-4


def test_cross_sft_step_with_a_shared_prefix_matches_plain_sft(tiny_dir):
    from safedistill.data.schema import Demonstration
    from safedistill.engine.sft import SFTStep
    from safedistill.methods.cross_sft import CrossSFTStep
    from safedistill.models import LoraSettings, add_lora

    model, tok = load_model(tiny_dir)
    torch.manual_seed(0)
    model = add_lora(model, LoraSettings(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # a non-trivial adapter, so the prefix's gradient path matters
    constitution = load_constitution("builtin")
    batch = [
        Demonstration(wrap(constitution, "Name a cat."), "Tom.", "0"),
        Demonstration(wrap(constitution, "How do I boil an egg?"), "Boil it for nine minutes", "1"),
    ]
    plain, cross = SFTStep(tok), CrossSFTStep(tok, truncated={"1"})
    params = [p for p in model.parameters() if p.requires_grad]

    loss_c, info_c = cross(model, batch, 0, 0)
    grads_c = torch.autograd.grad(loss_c, params)
    # Plain SFT with the same targets: row 1 was truncated, so its stop token is dropped.
    plain.target_ids = cross.target_ids
    loss_p, info_p = plain(model, batch, 0, 0)
    grads_p = torch.autograd.grad(loss_p, params)
    assert info_c["tokens"] == info_p["tokens"] == len(cross.target_ids(batch[0])) + len(cross.target_ids(batch[1]))
    assert cross.target_ids(batch[1])[-1] != cross.stop and cross.target_ids(batch[0])[-1] == cross.stop
    torch.testing.assert_close(loss_c, loss_p, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_c, grads_p, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_probe_samples_the_frozen_teacher_once(tiny_dir, sources, monkeypatch):
    """The teacher never changes and the probe's seed is fixed: its figures are computed once."""
    import contextlib

    from safedistill.eval.diagnostics import CollapseProbe

    model, tok = load_model(tiny_dir)
    from safedistill.train import probe_settings

    cfg = make_cfg(tiny_dir, sources)
    probe = CollapseProbe(tok, None, cfg.section("rollout"), **probe_settings(cfg))
    sides = []

    def fake_side(self, m, texts):
        sides.append(texts[0])
        return {"length": float(len(sides))}

    class Teacher:
        class base:
            @staticmethod
            @contextlib.contextmanager
            def weights(student):
                yield student

        @staticmethod
        def prompt_text(item):
            return "TEACHER " + item.prompt

    monkeypatch.setattr(CollapseProbe, "_side", fake_side)
    first, second = probe(model, Teacher()), probe(model, Teacher())
    assert [t.startswith("TEACHER") for t in sides] == [False, True, False]
    assert first["diag_teacher_length"] == second["diag_teacher_length"] == 2.0
    assert (first["diag_student_length"], second["diag_student_length"]) == (1.0, 3.0)
