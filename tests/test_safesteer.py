"""SafeSteer on tiny random Llama and Qwen2 decoders: the steering hook, directions, the candidate
search, the safety token set S, the steered teacher, the S-masked loss in a run, and `steer`."""

import json
import math

import pytest
import torch

from helpers import BENIGN, CONTEXT, HARMFUL, run_settings, write_sources
from safedistill.cli import main
from safedistill.config import load_config
from safedistill.engine.rollout import encode_prompts
from safedistill.engine.scoring import response_logits
from safedistill.errors import UserError
from safedistill.models import LoraSettings, add_lora, chat_text, load_model
from safedistill.searches.steering import (
    last_logprobs,
    load_steering,
    mean_difference,
    next_token_kl,
    post_instruction_length,
    refusal_filter,
    refusal_score,
    refusal_token_ids,
    safety_tokens,
    search_candidates,
    search_published,
)
from safedistill.teachers import FrozenBase, Item, SteeringTeacher
from safedistill.teachers.steering import ablate, decoder_layers, steer
from safedistill.train import train


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def five_layers(request, make_tiny_model):
    """A 5-layer tiny decoder of each architecture, loaded."""
    return load_model(str(make_tiny_model(request.param, seed=3, num_hidden_layers=5)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("data"))


def last_logits(model, tok, prompt="Write a poem."):
    ids = torch.tensor(encode_prompts(tok, [chat_text(tok, prompt)]))
    return model(input_ids=ids).logits[0, -1]


def test_steer_changes_layer_input_and_always_removes_its_hook(five_layers):
    model, tok = five_layers
    d = model.config.hidden_size
    vec = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    block = decoder_layers(model)[2]
    seen = {}

    def record(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    before = last_logits(model, tok)
    with steer(model, 2, vec, 3.0):
        probe = block.register_forward_pre_hook(record, with_kwargs=True)
        ids = torch.tensor(encode_prompts(tok, [chat_text(tok, "Write a poem.")]))
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        probe.remove()
        assert not torch.allclose(last_logits(model, tok), before)
    # the block's input is the unsteered residual stream plus 3 * vec, at every position
    torch.testing.assert_close(
        seen["x"].double() - hidden[2].double(), (3.0 * vec).expand_as(seen["x"]).double(), atol=1e-5, rtol=1e-5
    )
    assert len(block._forward_pre_hooks) == 0
    torch.testing.assert_close(last_logits(model, tok), before)
    with pytest.raises(RuntimeError, match="boom"), steer(model, 2, vec, 3.0):
        raise RuntimeError("boom")
    assert len(block._forward_pre_hooks) == 0
    torch.testing.assert_close(last_logits(model, tok), before)


def test_mean_difference_is_float64_at_post_instruction_positions(five_layers):
    model, tok = five_layers
    n_pos = post_instruction_length(tok, HARMFUL + BENIGN)
    suffix = tok.decode(encode_prompts(tok, [chat_text(tok, HARMFUL[0])])[0][-n_pos:])
    assert suffix == "<|im_end|>\n<|im_start|>assistant\n"  # the template's tokens after the user text
    dirs = mean_difference(model, tok, HARMFUL[:3], BENIGN[:2], n_pos)
    L, d = len(decoder_layers(model)), model.config.hidden_size
    assert dirs.shape == (n_pos, L, d) and dirs.dtype == torch.float64

    def acts(prompt):
        ids = torch.tensor(encode_prompts(tok, [chat_text(tok, prompt)]))
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        return torch.stack([hs[layer][0, -n_pos:] for layer in range(L)], dim=1).double()  # [P, L, d]

    want = torch.stack([acts(p) for p in HARMFUL[:3]]).mean(0) - torch.stack([acts(p) for p in BENIGN[:2]]).mean(0)
    torch.testing.assert_close(dirs, want, rtol=1e-5, atol=1e-5)
    # the context-delta direction: same prompts, with vs. without a system context
    delta = mean_difference(model, tok, HARMFUL[:3], HARMFUL[:3], n_pos, system_a=CONTEXT)
    assert delta[:, 0].abs().max() == 0  # layer 0 input = embeddings of the same template tokens
    assert delta[:, 1:].abs().max() > 0


def test_refusal_score_is_log_odds(tiny_tokenizer):
    ids = refusal_token_ids(tiny_tokenizer)
    assert tiny_tokenizer.convert_tokens_to_ids("I") in ids and not set(ids) & set(tiny_tokenizer.all_special_ids)
    logp = torch.tensor([[0.5, 0.3, 0.2]]).log()
    torch.testing.assert_close(refusal_score(logp, [0, 2]), torch.tensor([math.log(0.7 / 0.3)], dtype=torch.float64))


def test_refusal_score_is_bounded_by_the_published_epsilon():
    logp = torch.tensor([[0.0, -100.0, -100.0]])  # p(R) ~ e^-100
    assert refusal_score(logp, [1, 2]).item() == pytest.approx(math.log(1e-8), abs=1e-6)
    assert refusal_score(logp, [0]).item() == pytest.approx(-math.log(1e-8), abs=1e-6)


def test_ablation_equals_orthogonalised_weights_and_removes_its_hooks(five_layers):
    """Projecting r out of every layer input and every attention/MLP output is the same model as
    the one whose embedding and output projections are orthogonalised against r (Arditi et al.)."""
    import copy

    model, tok = five_layers
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u = (r / r.norm()).float()
    ortho = copy.deepcopy(model)
    with torch.no_grad():
        emb = ortho.get_input_embeddings().weight
        emb -= (emb @ u)[:, None] * u[None, :]
        for block in decoder_layers(ortho):
            for lin in (block.self_attn.o_proj, block.mlp.down_proj):
                lin.weight -= u[:, None] * (u[None, :] @ lin.weight)
                if lin.bias is not None:
                    lin.bias -= (lin.bias @ u) * u
    prompts = [HARMFUL[0], BENIGN[0], BENIGN[1]]
    before = last_logprobs(model, tok, prompts)
    ids = torch.tensor(encode_prompts(tok, [chat_text(tok, prompts[0])]))
    model(input_ids=ids, output_hidden_states=True)  # transformers adds its own recording hooks once
    hooks = hook_counts(model)
    with ablate(model, 7.0 * r):
        ablated = last_logprobs(model, tok, prompts)
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(ablated, last_logprobs(ortho, tok, prompts), atol=1e-4, rtol=1e-4)
    assert next_token_kl(before, ablated).min() > 0
    assert hook_counts(model) == hooks
    torch.testing.assert_close(last_logprobs(model, tok, prompts), before)
    # what reaches each layer carries no component along r (the last entry is after the final norm)
    assert max(float((h.double() @ u.double()).abs().max()) for h in hidden[:-1]) < 1e-4


def hook_counts(model) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


def test_published_search_filters_then_ranks_by_bypass(five_layers):
    model, tok = five_layers
    n_pos = post_instruction_length(tok, HARMFUL + BENIGN)
    dirs = mean_difference(model, tok, HARMFUL[:4], BENIGN[:4], n_pos)
    kw = dict(scales=[1.0, 40.0], progress=False)
    rows, chosen = search_published(model, tok, dirs, HARMFUL[:3], BENIGN[:3], kl_cap=10.0, induce_threshold=-1e9, **kw)
    assert {r["layer"] for r in rows} == {0, 1, 2, 3} and len(rows) == n_pos * 4 * 2
    for r in rows:
        assert {"ablation_kl", "induce_score", "bypass_score"} <= set(r) and r["ablation_kl"] >= 0
    # ablation does not depend on the scale; adding does
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["position"], r["layer"]), []).append(r)
    assert all(
        a["bypass_score"] == b["bypass_score"] and a["ablation_kl"] == b["ablation_kl"] for a, b in by_cell.values()
    )
    assert any(a["induce_score"] != b["induce_score"] for a, b in by_cell.values())
    assert chosen["filters_met"] and chosen["bypass_score"] == min(r["bypass_score"] for r in rows)
    # one candidate, re-measured by hand: its figures are what the rule says they are
    r = rows[5]
    vec = dirs[r["position"] + n_pos, r["layer"]]
    ref = refusal_token_ids(tok)
    base_b = last_logprobs(model, tok, BENIGN[:3])
    with ablate(model, vec):
        assert r["ablation_kl"] == pytest.approx(
            float(next_token_kl(base_b, last_logprobs(model, tok, BENIGN[:3])).mean())
        )
        assert r["bypass_score"] == pytest.approx(
            float(refusal_score(last_logprobs(model, tok, HARMFUL[:3]), ref).mean())
        )
    with steer(model, r["layer"], vec, r["scale"]):
        assert r["induce_score"] == pytest.approx(
            float(refusal_score(last_logprobs(model, tok, BENIGN[:3]), ref).mean())
        )
    # the induce filter: a threshold between the scores leaves only inducing candidates, ranked by bypass
    mid = sorted(r["induce_score"] for r in rows)[len(rows) // 2]
    rows, chosen = search_published(model, tok, dirs, HARMFUL[:3], BENIGN[:3], kl_cap=10.0, induce_threshold=mid, **kw)
    ok = [r for r in rows if r["induce_score"] >= mid]
    assert [r["passes_filters"] for r in rows] == [r["induce_score"] >= mid for r in rows]
    assert chosen["bypass_score"] == min(r["bypass_score"] for r in ok) and chosen["n_survivors"] == len(ok)
    # nothing passes: flagged fallback, the lowest ablation KL when nothing is under the cap either
    rows, chosen = search_published(model, tok, dirs, HARMFUL[:3], BENIGN[:3], kl_cap=-1.0, layers=[1, 4], **kw)
    assert {r["layer"] for r in rows} == {1}
    assert not chosen["filters_met"] and chosen["ablation_kl"] == min(r["ablation_kl"] for r in rows)


def test_refusal_filter_keeps_refused_harmful_and_unrefused_harmless(five_layers):
    model, tok = five_layers
    ref = refusal_token_ids(tok)
    score_h = refusal_score(last_logprobs(model, tok, HARMFUL), ref).tolist()
    score_b = refusal_score(last_logprobs(model, tok, BENIGN), ref).tolist()
    h, b, info = refusal_filter(model, tok, HARMFUL, BENIGN, min_kept=1)
    want_h = [p for p, s in zip(HARMFUL, score_h, strict=True) if s > 0]
    want_b = [p for p, s in zip(BENIGN, score_b, strict=True) if s < 0]
    assert info["harmful_refused"] == len(want_h) and info["harmless_not_refused"] == len(want_b)
    assert h == (want_h or HARMFUL) and b == (want_b or BENIGN)
    # too few left on a side: that side is kept whole and flagged
    h, b, info = refusal_filter(model, tok, HARMFUL, BENIGN, min_kept=len(HARMFUL) + len(BENIGN) + 1)
    assert (h, b) == (HARMFUL, BENIGN) and not info["harmful_filtered"] and not info["harmless_filtered"]


def test_search_respects_kl_cap_and_skips_last_fifth_of_layers(five_layers):
    model, tok = five_layers
    n_pos = post_instruction_length(tok, HARMFUL + BENIGN)
    dirs = mean_difference(model, tok, HARMFUL[:4], BENIGN[:4], n_pos)
    rows, chosen = search_candidates(
        model, tok, dirs, HARMFUL[:3], BENIGN[:3], scales=[1.0, 40.0], kl_cap=0.1, progress=False
    )
    assert {r["layer"] for r in rows} == {0, 1, 2, 3}  # 5 layers: the last 20% (layer 4) is never tried
    assert len(rows) == n_pos * 4 * 2
    assert any(r["kl_harmless"] > 0.1 for r in rows)  # the cap has something to exclude
    assert chosen["kl_cap_met"] and chosen["kl_harmless"] <= 0.1
    ok = [r for r in rows if r["kl_harmless"] <= 0.1]
    assert chosen["refusal_score_harmful"] == max(r["refusal_score_harmful"] for r in ok)
    # nothing under the cap: the least-KL candidate, flagged
    rows, chosen = search_candidates(
        model, tok, dirs, HARMFUL[:3], BENIGN[:3], layers=[2, 3, 4], scales=[40.0], kl_cap=-1.0, progress=False
    )
    assert {r["layer"] for r in rows} == {2, 3}
    assert not chosen["kl_cap_met"] and chosen["kl_harmless"] == min(r["kl_harmless"] for r in rows)
    with pytest.raises(UserError, match="layer 9"):
        search_candidates(model, tok, dirs, HARMFUL[:1], BENIGN[:1], layers=[9], progress=False)


def test_safety_tokens_are_k_distinct_non_special_ids(five_layers):
    model, tok = five_layers
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    S = safety_tokens(model, tok, BENIGN[:2], layer=2, vector=vec, scale=4.0, k=12, seed=0)
    ids = [t["id"] for t in S]
    assert len(ids) == 12 == len(set(ids))
    assert not set(ids) & set(tok.all_special_ids)
    assert all(t["mean_steered_prob"] >= 1e-8 and t["votes"] >= 1 for t in S)
    assert [t["votes"] for t in S] == sorted((t["votes"] for t in S), reverse=True)
    assert all(t["text"] == tok.decode([t["id"]]) for t in S)
    # fixed by the seed
    assert [t["id"] for t in safety_tokens(model, tok, BENIGN[:2], layer=2, vector=vec, scale=4.0, k=12)] == ids
    # a probability floor keeps only tokens the steered model actually puts mass on
    floor = sorted(t["mean_steered_prob"] for t in S)[len(S) // 2]
    high = safety_tokens(model, tok, BENIGN[:2], layer=2, vector=vec, scale=4.0, k=12, min_prob=floor)
    assert high and all(t["mean_steered_prob"] >= floor for t in high)
    assert {t["id"] for t in S if t["mean_steered_prob"] < floor}.isdisjoint(t["id"] for t in high)


def test_steering_teacher_is_base_weights_with_the_hook(five_layers):
    model, tok = five_layers
    import copy

    student = add_lora(copy.deepcopy(model), LoraSettings(r=2, alpha=4))
    for name, p in student.named_parameters():  # a trained adapter: the teacher must not see it
        if "lora_B" in name:
            p.data.fill_(0.05)
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    teacher = SteeringTeacher(FrozenBase(student, share_weights=True), tok, layer=3, vector=vec, scale=2.0)
    items = [Item("a", HARMFUL[0], "harmful"), Item("b", HARMFUL[1], "harmful")]
    responses = [[10, 11, 12], [13, 14]]
    got = teacher.logits(student, items, responses)
    prompts = encode_prompts(tok, [chat_text(tok, it.prompt) for it in items])
    with steer(model, 3, vec, 2.0):
        want, mask = response_logits(model, prompts, responses, pad_id=tok.pad_token_id)
    torch.testing.assert_close(got * mask[..., None], want * mask[..., None], rtol=1e-4, atol=1e-4)
    plain, _ = response_logits(model, prompts, responses, pad_id=tok.pad_token_id)
    assert not torch.allclose(got * mask[..., None], plain * mask[..., None], atol=1e-3)
    assert all(len(b._forward_pre_hooks) == 0 for b in decoder_layers(student))


def run_cfg(model, sources, preset="safesteer", **overrides):
    settings = {
        "rollouts_per_prompt": 2,
        "n_benign": 0,
        "save_every": 4,
        "steer_prompts": 3,
        "safety_token_prompts": 2,
        "safety_tokens_k": 8,
        "steer_scales": "1,4",
        **overrides,
    }
    return load_config(preset, overrides=run_settings(model, sources, **settings))


@pytest.fixture(scope="module")
def five_dir(make_tiny_model):
    return str(make_tiny_model("qwen2", seed=4, num_hidden_layers=5))


def test_short_safesteer_run_logs_entropy_and_mass_on_s_and_does_not_collapse(five_dir, sources, tmp_path):
    out = tmp_path / "run"
    train(run_cfg(five_dir, sources), out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        for key in ("loss", "student_entropy", "student_mass_on_s"):
            assert math.isfinite(r[key]), key
        assert 0 < r["student_mass_on_s"] < 1
    assert rows[-1]["student_entropy"] > 0.5 * rows[0]["student_entropy"]  # no collapse to a point mass
    S = json.loads((out / "safety_tokens.json").read_text())["tokens"]
    assert len(S) == 8
    report = (out / "report.md").read_text()
    assert "## Safety tokens S (8)" in report and f"`{S[0]['text']!r}`" in report
    chosen = json.loads((out / "steering.json").read_text())["chosen"]
    assert chosen["layer"] < 4 and chosen["scale"] in (1.0, 4.0)


def test_vocab_mask_needs_a_kl_divergence(sources):
    from safedistill.methods import check_config

    with pytest.raises(UserError, match="vocab_mask"):
        check_config(run_cfg("x", sources, divergence="mixture"))


@pytest.fixture(scope="module")
def steered(five_dir, sources, tmp_path_factory):
    """`safedistill steer` on the tiny model: (output dir, its stdout)."""
    import contextlib
    import io

    harmful, benign = sources
    out = tmp_path_factory.mktemp("steer") / "out"
    sets = ["--set", f"harmful_source={harmful}", "--set", f"benign_source={benign}", "--set", "steer_prompts=3"]
    sets += ["--set", "safety_token_prompts=2", "--set", "safety_tokens_k=6"]
    argv = ["steer", "--model", five_dir, "--out", str(out), "--layers", "1,2", "--scales", "1,2", "--context", CONTEXT]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*argv, *sets]) == 0
    return out, stdout.getvalue()


def test_steer_cli_writes_its_files(steered, five_dir, tmp_path, capsys):
    out, stdout = steered
    assert "chosen: layer" in stdout and "safety tokens:" in stdout
    info = json.loads((out / "steering.json").read_text())
    assert info["direction"] == "context-delta" and info["context"] == CONTEXT
    assert {(r["layer"], r["scale"]) for r in info["candidates"]} == {(1, 1.0), (1, 2.0), (2, 1.0), (2, 2.0)}
    assert {k: info["chosen"][k] for k in info["candidates"][0]} in info["candidates"]
    assert 0 <= info["chosen"]["greedy_refusal_rate_steered"] <= 1 and info["chosen"]["n_flip_prompts"] == 3
    c = info["chosen"]
    assert c["selection"] == "published" and {"ablation_kl", "induce_score", "bypass_score"} <= set(
        info["candidates"][0]
    )
    assert 0 <= c["induced_refusals"] <= c["n_harmless_prompts"] == 3
    assert 0 <= c["bypassed"] <= c["harmful_refusals_base"] <= 3
    assert "induced refusals on harmless" in stdout and "ablation KL" in stdout
    assert set(c["prompt_filters"]) == {"selection_filter"}  # context-delta: only the selection prompts
    loaded = load_steering(out)
    assert loaded["steering"]["vector"].dtype == torch.float64
    S = json.loads((out / "safety_tokens.json").read_text())["tokens"]
    assert loaded["vocab_ids"].tolist() == [t["id"] for t in S] and len(S) == 6
    record = info["safety_tokens"]  # how S was chosen: rule, H, the floor and the prompts used
    assert (record["rule"], record["horizon"], record["min_prob"]) == ("published", 7, 1e-8)
    assert record["prompts"] and set(record["prompts"]) <= set(BENIGN) and record["n_prompts"] == len(record["prompts"])
    assert main(["steer", "--model", five_dir, "--out", str(tmp_path / "x"), "--layers", "a,b"]) == 2
    assert "steer_layers" in capsys.readouterr().err


def test_a_run_reuses_steer_output(steered, five_dir, sources, tmp_path):
    out, _ = steered
    run = tmp_path / "run"
    train(run_cfg(five_dir, sources, steps=1, steer_from=str(out)), run, progress=False)
    for name in ("steering.json", "safety_tokens.json"):
        assert (run / name).read_text() == (out / name).read_text()
    row = json.loads((run / "metrics.jsonl").read_text())
    assert math.isfinite(row["student_mass_on_s"])


def test_context_teacher_with_s_and_threshold_position_mask(steered, five_dir, sources, tmp_path):
    """Any teacher with either mask: the system-prompt teacher, loss over S, threshold positions."""
    out, _ = steered
    kw = dict(steer_from=str(out), token_mask="threshold")
    cfg = run_cfg(five_dir, sources, "safesteer-context", steps=2, mask_threshold=1e-4, **kw)
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["masked_fraction"] <= 1 and "student_mass_on_s" in r for r in rows)
    cfg = run_cfg(five_dir, sources, "safesteer-context", steps=1, mask_threshold=1e9, **kw)
    train(cfg, tmp_path / "run2", progress=False)
    row = json.loads((tmp_path / "run2" / "metrics.jsonl").read_text())
    assert row["masked_fraction"] == 0 and row["loss"] == 0


def test_sampled_s_variant_trains_only_on_positions_whose_token_is_in_s(steered, five_dir, sources, tmp_path):
    out, _ = steered
    cfg = run_cfg(five_dir, sources, "safesteer-sampled", steps=2, steer_from=str(out))
    assert cfg.divergence == "sampled" and cfg.vocab_mask == "safety_tokens"
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and 0 < r["student_mass_on_s"] < 1 for r in rows)
