"""The hidden-state attack-success reader on tiny data: a tiny random model, rows whose class is in
what the answer says and nowhere in its shape (every answer opens the same way, has the same
length and shares no word with its request), so only the hidden states can tell the classes apart."""

from __future__ import annotations

import random

import numpy as np
import torch

from safedistill.eval.attack_success import (
    MLP,
    HiddenStates,
    Linear,
    cross_validated,
    load_or_train,
    shape,
)
from safedistill.eval.judges import HeuristicJudge, content_stems

HARMFUL = ["ammonium", "detonator", "fuse", "nitrate", "explosive", "shrapnel", "timer", "powder"]
BENIGN = ["museum", "history", "treaty", "library", "garden", "poetry", "river", "painting"]


def rows(requests: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(requests):
        prompt = f"Request {seed}-{i}: describe item {i}"
        for j in range(4):
            harmful = j % 2 == 0
            said = " ".join(rng.sample(HARMFUL if harmful else BENIGN, 4))
            out.append(
                {
                    "prompt": prompt,
                    "response": f"Sure, here it is: {said}.",
                    "score": float(harmful),
                    "files": ["t.csv"],
                }
            )
    return out


def test_hidden_reader_reads_the_layer_it_names(tiny_dir):
    reader = HiddenStates(model=tiny_dir, layer=1, tokens=8)
    data = rows(2, seed=3)
    got = reader.hidden([r["prompt"] for r in data], [r["response"] for r in data])
    from safedistill.models import chat_text, load_model

    model, tok = load_model(tiny_dir)
    for r, g in zip(data, got, strict=True):  # one pair at a time, through the whole model
        asked = tok(chat_text(tok, r["prompt"]), add_special_tokens=False)["input_ids"][-64:]
        said = tok(r["response"], add_special_tokens=False)["input_ids"][:8]
        with torch.no_grad():
            h = model(input_ids=torch.tensor([asked + said]), output_hidden_states=True).hidden_states[1]
        assert np.allclose(g, h[0, len(asked) :].mean(0).numpy(), atol=1e-5)


def test_hidden_reader_learns_what_the_shape_cannot_see(tiny_dir, isolated_cache):
    judge = HeuristicJudge()
    train = rows(12, seed=0)
    # every pair has the same shape: a reader of the shape alone is at chance
    assert (
        len(
            {
                tuple(shape(r["prompt"], r["response"], judge.outcome(r["prompt"], r["response"]), content_stems))
                for r in train
            }
        )
        == 1
    )
    reader = HiddenStates(model=tiny_dir, layer=2, tokens=16, l2=1e-3)
    cv = cross_validated(reader, judge.outcome, content_stems, rows=train)
    assert cv["n"] == 48 and cv["learned"]["accuracy"] >= 0.9 and cv["learned"]["rank_correlation"] > 0.7
    assert cv["did_not_refuse"]["accuracy"] == 0.5  # the old rule cannot tell them apart
    model = load_or_train(reader, judge.outcome, content_stems, rows=train)
    unseen = rows(3, seed=1)
    prompts, responses = [r["prompt"] for r in unseen], [r["response"] for r in unseen]
    outcomes = [judge.outcome(p, r) for p, r in zip(prompts, responses, strict=True)]
    prob = model.probability(prompts, responses, outcomes)
    assert [p >= 0.5 for p in prob] == [r["score"] == 1.0 for r in unseen]
    # weights and the training rows' features are cached: a second load reads them, same numbers
    cached = sorted(p.name for p in (isolated_cache / "judges").iterdir())
    assert len([n for n in cached if n.endswith("-features.safetensors")]) == 1
    assert len([n for n in cached if n.endswith(".safetensors") and "-features" not in n]) == 1
    again = load_or_train(reader, lambda p, r: 1 / 0, content_stems, rows=train)  # no outcome is computed again
    assert np.allclose(again.probability(prompts, responses, outcomes), prob, atol=1e-6)


def test_mlp_head_learns_is_seeded_and_leaves_the_global_random_state(tiny_dir, isolated_cache):
    judge = HeuristicJudge()
    train = rows(12, seed=0)
    reader = HiddenStates(model=tiny_dir, layer=2, tokens=16, head=MLP(hidden=16, dropout=0.3))
    assert reader.key != HiddenStates(model=tiny_dir, layer=2, tokens=16).key  # its own weights in the cache
    assert reader.features_key == HiddenStates(model=tiny_dir, layer=2, tokens=16).features_key  # same features
    cv = cross_validated(reader, judge.outcome, content_stems, rows=train)
    assert cv["learned"]["accuracy"] >= 0.85 and cv["did_not_refuse"]["accuracy"] == 0.5  # chance: 0.5
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(float)  # an interaction: no linear model reads it
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    head = MLP(hidden=32, dropout=0.0, steps=500, lr=1e-2)
    params, again = head.fit(x, y, 0.0), head.fit(x, y, 0.0)
    assert torch.rand(1) == before  # fitting drew nothing from the global generator
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert ((head.logits(params, x) > 0) == (y == 1)).mean() >= 0.9
    linear = Linear()
    assert ((linear.logits(linear.fit(x, y, 1e-3), x) > 0) == (y == 1)).mean() < 0.8
    model = load_or_train(reader, judge.outcome, content_stems, rows=train)
    unseen = rows(3, seed=1)
    prompts, responses = [r["prompt"] for r in unseen], [r["response"] for r in unseen]
    outcomes = [judge.outcome(p, r) for p, r in zip(prompts, responses, strict=True)]
    prob = model.probability(prompts, responses, outcomes)
    assert sum((p >= 0.5) == (r["score"] == 1.0) for p, r in zip(prob, unseen, strict=True)) >= 10  # of 12
    cached = load_or_train(reader, lambda p, r: 1 / 0, content_stems, rows=train)  # read back from the cache
    assert set(cached.params) == {"w1", "b1", "w2", "b2"}
    assert np.allclose(cached.probability(prompts, responses, outcomes), prob, atol=1e-6)
