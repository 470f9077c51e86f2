"""SafeSteer's selection of S as the authors' code (Anjingkun/SafeSteer, get_safe_tokens, vote)
does it; each test fails if one of its five details regresses: the floor before each position's
top-k, H positions, full-length samples with end-of-turn positions skipped, "<|" tokens out, and
the harmless validation prompts kept only where the unsteered model does not refuse."""

import dataclasses

import pytest
import torch

from helpers import BENIGN
from safedistill.config import RunConfig, load_config
from safedistill.engine.rollout import encode_prompts
from safedistill.models import chat_text, load_model
from safedistill.searches.steering import (
    SAMPLES,
    banned_token_ids,
    choose_safety_tokens,
    end_of_turn_ids,
    forced_samples,
    horizon_logprobs,
    last_logprobs,
    published_vote,
    refusal_score,
    refusal_token_ids,
    select_safety_tokens,
)


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return load_model(str(make_tiny_model("llama", seed=5, num_hidden_layers=3)))


def steering_of(model, scale=4.0):
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return (1, vec, scale)


def with_logit_bias(model, ids, value: float):
    """The model's lm_head with `value` added to the logits of `ids` (a real Linear with a bias)."""
    old = model.lm_head
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.zero_()
        new.bias[list(ids)] = value
    model.lm_head = new
    return old


def log_probs(logits: list[list[float]]) -> torch.Tensor:
    return torch.tensor(logits, dtype=torch.float32).log_softmax(-1)


def test_floor_is_applied_before_each_positions_top_k():
    # token 0 has by far the largest log-ratio but a steered probability under the floor: it must
    # not take one of the 3 votes of the position (the published code sets it to -inf first)
    lp_b = log_probs([[-40.0, 0, 0, 0, 0, 0, 0, 0]]).unsqueeze(0)  # [N=1, H=1, V=8]
    lp_s = log_probs([[-25.0, 3, 2, 1, 0.5, 0, 0, 0]]).unsqueeze(0)
    assert lp_s[0, 0, 0].exp() < 1e-8
    no_banned = torch.zeros(8, dtype=torch.bool)
    picked, info = published_vote(lp_s, lp_b, [7], no_banned, min_prob=1e-8, k=8, vote_top=3)
    assert [t["id"] for t in picked] == [1, 2, 3]  # floor after the vote would give only 1, 2
    assert info["excluded_below_floor"] == 1 and info["min_prob"] == 1e-8
    # with the floor off, token 0 takes its vote and token 3 loses it
    picked, _ = published_vote(lp_s, lp_b, [7], no_banned, min_prob=0.0, k=8, vote_top=3)
    assert [t["id"] for t in picked] == [0, 1, 2]


def test_positions_from_the_unsteered_end_of_turn_on_are_skipped():
    eot = 7
    base = [[0.0] * 8 for _ in range(3)]
    base[1][eot] = 10.0  # row 0: the unsteered greedy choice is end-of-turn at position 1
    steered_row0 = [[0, 0, 0, 0, 5, 0, 0, 0], [0, 0, 0, 0, 0, 9, 0, 0], [0, 0, 0, 0, 0, 9, 0, 0]]
    steered_row1 = [[0, 0, 0, 0, 5, 0, 0, 0]] * 3
    lp_b = torch.stack([log_probs(base), log_probs([[0.0] * 8] * 3)])
    lp_s = torch.stack([log_probs(steered_row0), log_probs(steered_row1)])
    picked, info = published_vote(lp_s, lp_b, [eot], torch.zeros(8, dtype=torch.bool), min_prob=0.0, k=3, vote_top=1)
    # position 2 of row 0 is skipped too (at OR after the end of turn), so token 5 never votes
    assert [(t["id"], t["votes"]) for t in picked] == [(4, 4)]
    assert info["positions_total"] == 6 and info["positions_scored"] == 4
    assert info["positions_skipped_end_of_turn"] == 2
    # mean probabilities are over the kept positions only
    expected = (lp_s[0, 0, 4].exp() + 3 * lp_s[1, 0, 4].exp()) / 4
    assert picked[0]["mean_steered_prob"] == pytest.approx(float(expected))


def test_special_and_template_tokens_are_excluded(make_tokenizer):
    tok = make_tokenizer()
    tok.add_tokens(["<|odd"])  # an ordinary (not special) token whose string contains "<|"
    odd = tok.convert_tokens_to_ids("<|odd")
    assert odd not in tok.all_special_ids
    banned = banned_token_ids(tok, len(tok) + 3)
    assert banned[odd] and all(banned[i] for i in tok.all_special_ids)
    plain = tok.convert_tokens_to_ids("The")
    assert not banned[plain] and int(banned.sum()) == len(tok.all_special_ids) + 1
    # a banned token with the largest log-ratio never gets a vote
    lp_b = log_probs([[0.0] * 6]).unsqueeze(0)
    lp_s = log_probs([[9.0, 1, 0, 0, 0, 0]]).unsqueeze(0)
    ban0 = torch.tensor([True] + [False] * 5)
    picked, _ = published_vote(lp_s, lp_b, [5], ban0, min_prob=0.0, k=6, vote_top=1)
    assert [t["id"] for t in picked] == [1]


def test_samples_are_forced_to_full_length_even_when_the_model_wants_to_stop(tiny):
    model, tok = tiny
    stops = end_of_turn_ids(tok, model)
    old = with_logit_bias(model, stops, 30.0)  # the model now ends its turn at once
    try:
        prompt = encode_prompts(tok, [chat_text(tok, BENIGN[0])])[0]
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        assert int(logits.argmax()) in stops
        samples = forced_samples(model, [prompt] * 5, 6, steering_of(model), stops, seed=0, pad=tok.pad_token_id)
    finally:
        model.lm_head = old
    assert [len(s) for s in samples] == [6] * 5
    assert not {t for s in samples for t in s} & set(stops)


def test_h_positions_the_first_answer_position_and_one_after_each_sampled_token(tiny):
    model, tok = tiny
    steering = steering_of(model)
    prompts = encode_prompts(tok, [chat_text(tok, p) for p in BENIGN[:2]])
    sampled = forced_samples(model, prompts, 3, steering, end_of_turn_ids(tok, model), seed=1, pad=tok.pad_token_id)
    lp_s, lp_b = horizon_logprobs(model, prompts, sampled, steering, pad=tok.pad_token_id)
    assert lp_s.shape[:2] == lp_b.shape[:2] == (2, 4)  # H = 4 from 3 sampled tokens
    from safedistill.teachers.steering import steer

    with torch.no_grad():
        for i, (p, s) in enumerate(zip(prompts, sampled, strict=True)):
            full = torch.tensor([p + s])
            base = model(input_ids=full).logits[0].float().log_softmax(-1)
            with steer(model, *steering):
                steered = model(input_ids=full).logits[0].float().log_softmax(-1)
            first = len(p) - 1  # the first answer position ... the position after the last sampled token
            torch.testing.assert_close(lp_b[i], base[first:], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(lp_s[i], steered[first:], atol=1e-4, rtol=1e-4)
    S, info = select_safety_tokens(model, tok, BENIGN[:2], steering, k=5, horizon=4)
    assert info["positions_total"] == 2 * SAMPLES * 4 and info["horizon"] == 4 and info["rule"] == "published"
    assert info["positions_scored"] + info["positions_skipped_end_of_turn"] == info["positions_total"]
    assert len(S) == 5 and not {t["id"] for t in S} & set(tok.all_special_ids)
    assert not any("<|" in tok.convert_ids_to_tokens(t["id"]) for t in S)
    # the legacy rule scores H-1 positions per non-empty sample and keeps its old record
    _, legacy = select_safety_tokens(model, tok, BENIGN[:2], steering, k=5, horizon=4, rule="legacy")
    assert legacy["rule"] == "legacy" and legacy["positions_scored"] <= 2 * SAMPLES * 3


def test_validation_prompts_are_those_the_unsteered_model_does_not_refuse(tiny):
    model, tok = tiny
    defaults = load_config("safesteer")
    assert (defaults.safety_token_prompts, defaults.safety_token_horizon) == (32, 7)
    assert defaults.safety_token_rule == "published" and RunConfig().safety_token_rule == "published"
    refusal = refusal_token_ids(tok)
    scores = refusal_score(last_logprobs(model, tok, BENIGN), refusal).tolist()
    middle = sorted(scores)[3:5]
    assert middle[0] < middle[1]
    shift = -(middle[0] + middle[1]) / 2  # adding b to the refusal logits adds b to the log-odds
    old = with_logit_bias(model, refusal, shift)
    try:
        shifted = refusal_score(last_logprobs(model, tok, BENIGN), refusal).tolist()
        refused = [p for p, s in zip(BENIGN, shifted, strict=True) if s > 0]
        assert len(refused) == 4
        cfg = dataclasses.replace(RunConfig(), safety_tokens_k=4, safety_token_horizon=3)
        _, info = choose_safety_tokens(cfg.section("steering"), cfg.seed, model, tok, BENIGN, steering_of(model))
        assert info["prompts"] == [p for p in BENIGN if p not in refused] and info["n_prompts"] == 4
        assert info["prompt_filter"] == {"harmless_not_refused": 4, "harmless_total": 8, "harmless_filtered": True}
        legacy = dataclasses.replace(cfg, safety_token_rule="legacy")
        _, info = choose_safety_tokens(legacy.section("steering"), legacy.seed, model, tok, BENIGN, steering_of(model))
        assert info["prompts"] == BENIGN and "prompt_filter" not in info
    finally:
        model.lm_head = old


def test_sampling_takes_the_generation_configs_top_k_as_hf_generate_does(tiny):
    # the authors' generate(do_sample=True, temperature=1, top_p=1) keeps the model's top-k (HF's
    # default 50) and repetition penalty: with top_k = 1 the forced samples are the greedy path
    model, tok = tiny
    steering, stops = steering_of(model), end_of_turn_ids(tok, model)
    prompt = encode_prompts(tok, [chat_text(tok, BENIGN[1])])[0]
    saved = model.generation_config.top_k
    model.generation_config.top_k = 1
    try:
        samples = forced_samples(model, [prompt] * 3, 4, steering, stops, seed=7, pad=tok.pad_token_id)
    finally:
        model.generation_config.top_k = saved
    from safedistill.teachers.steering import steer

    greedy = list(prompt)
    with torch.no_grad(), steer(model, *steering):
        for _ in range(4):
            logits = model(input_ids=torch.tensor([greedy])).logits[0, -1]
            logits[stops] = float("-inf")
            greedy.append(int(logits.argmax()))
    assert samples == [greedy[len(prompt) :]] * 3
    assert model.generation_config.repetition_penalty in (None, 1.0)


def test_an_unset_top_k_is_hfs_default_50_as_the_authors_transformers_4_had_it(tiny):
    # transformers 5 leaves unset generation fields None; the authors' transformers 4 call sampled
    # with top-k 50 there, and a model's own value (0 = off included) wins
    from safedistill.searches.steering import generation_defaults

    model, _ = tiny
    saved = (model.generation_config.top_k, model.generation_config.repetition_penalty)
    try:
        model.generation_config.top_k, model.generation_config.repetition_penalty = None, None
        assert generation_defaults(model) == {"top_k": 50, "repetition_penalty": 1.0}
        model.generation_config.top_k, model.generation_config.repetition_penalty = 0, 1.05
        assert generation_defaults(model) == {"top_k": 0, "repetition_penalty": 1.05}
    finally:
        model.generation_config.top_k, model.generation_config.repetition_penalty = saved
