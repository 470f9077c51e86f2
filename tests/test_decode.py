"""engine/decode.FastDecoder: every decode step's logits equal the transformers forward's bit for
bit (Llama, Qwen2 with q/k/v biases, a peft LoRA student, padded and unpadded batches, fp32 and
bf16), so greedy generation gives model.generate's tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model
from safedistill.engine.decode import FastDecoder
from safedistill.engine.rollout import SamplingSettings, generate, stop_token_ids
from safedistill.engine.scoring import cache_arg, returned_cache
from safedistill.models import LoraSettings, add_lora, chat_text

USERS = [
    "Write a short poem about autumn leaves.",
    "What is 12 + 7?",
    "Explain how photosynthesis works in plants, in simple words for a child, step by step.",
    "Hi",
]


def lora_student(tok):
    model = add_lora(build_model("llama", tok), LoraSettings(r=4, alpha=8))
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a trained adapter does not
            p.data.normal_(0, 0.3)
    return model.eval()


MODELS = {
    "llama": lambda tok: build_model("llama", tok),
    "qwen2": lambda tok: build_model("qwen2", tok, seed=1),
    "llama-lora": lora_student,
    "llama-bf16": lambda tok: build_model("llama", tok).to(torch.bfloat16),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("padded", [True, False])
@torch.no_grad()
def test_every_step_equals_the_transformers_forward(name, padded, tiny_tokenizer):
    tok = tiny_tokenizer
    model = MODELS[name](tok)
    fast = FastDecoder.of(model)
    assert fast is not None
    ids = [tok(chat_text(tok, u), add_special_tokens=False)["input_ids"] for u in USERS]
    if not padded:
        ids = [i[:6] for i in ids]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])
    attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    assert bool((attention == 0).any()) == padded
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    cache = returned_cache(out)
    fast.start(cache, 12)
    token, pos = out.logits[:, -1].argmax(-1)[:, None], positions[:, -1:]
    for _ in range(12):
        pos = pos + 1
        attention = torch.cat([attention, attention.new_ones(len(ids), 1)], dim=1)
        ours = fast.step(token, pos, attention)
        ref = model(
            input_ids=token, attention_mask=attention, position_ids=pos, use_cache=True, **cache_arg(model, cache)
        )
        cache = returned_cache(ref)
        assert torch.equal(ours, ref.logits[:, -1]), name
        token = ours.argmax(-1)[:, None]


def test_lora_layers_run_inline_and_follow_a_disabled_adapter(tiny_tokenizer):
    """The LoRA student's projections are computed inline (base + B(A(x)) * scaling, not through
    the peft module); with the adapter disabled (the frozen-base teacher) or merged into the base
    weights (the final evaluation) as the base alone: all give the transformers forward's logits."""
    tok = tiny_tokenizer
    model = lora_student(tok)
    ids = torch.tensor([tok(chat_text(tok, USERS[0]), add_special_tokens=False)["input_ids"]])
    for state in ("on", "disabled", "merged"):
        if state == "merged":
            model.merge_adapter()
        with model.disable_adapter() if state == "disabled" else torch.no_grad(), torch.no_grad():
            fast = FastDecoder.of(model)
            assert fast is not None and fast.layers[0].q.weight_t is not None
            assert (fast.layers[0].q.a_t is None) == (state != "on")
            out = model(input_ids=ids, use_cache=True)
            cache = returned_cache(out)
            fast.start(cache, 2)
            token, pos = out.logits[:, -1].argmax(-1)[:, None], torch.tensor([[ids.shape[1]]])
            attention = torch.ones(1, ids.shape[1] + 1, dtype=torch.long)
            ref = model(input_ids=token, position_ids=pos, attention_mask=attention, **cache_arg(model, cache))
            assert torch.equal(fast.step(token, pos, attention), ref.logits[:, -1])


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-lora"])
def test_greedy_generate_gives_model_generate_tokens(name, tiny_tokenizer):
    tok = tiny_tokenizer
    model = MODELS[name](tok)
    prompts = [chat_text(tok, u) for u in USERS]
    settings = SamplingSettings(max_new_tokens=16, temperature=0.0, batch_size=4)
    ours, _ = generate(model, tok, prompts, settings, progress=False)
    stops = stop_token_ids(tok, model)
    for r in ours:
        ids = torch.tensor([r.prompt_ids])
        ref = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        cut = next((k for k, t in enumerate(ref) if t in stops), len(ref))  # the stop token is not kept
        assert r.response_ids == ref[:cut] and r.finished == (cut < len(ref))


def test_unsupported_models_decode_with_the_transformers_forward(tiny_tokenizer):
    tok = tiny_tokenizer
    sliding = build_model("qwen2", tok, seed=1, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert FastDecoder.of(sliding) is None
    training = build_model("llama", tok).train()
    assert FastDecoder.of(training) is None
    prompts = [chat_text(tok, u) for u in USERS[:2]]
    rollouts, _ = generate(sliding.eval(), tok, prompts, SamplingSettings(max_new_tokens=4), progress=False)
    assert all(len(r.response_ids) > 0 for r in rollouts)
