"""The context teacher on a tiny random Llama: the KV-cached context prefix gives the logits of a
plain forward pass, the LoRA teacher runs the base weights, and `response_logits` aligns rows."""

import copy

import pytest
import torch

from conftest import compact_model as build_model
from conftest import compact_tokenizer as build_tokenizer
from safedistill.engine.rollout import encode_prompts
from safedistill.engine.scoring import response_logits
from safedistill.models import LoraSettings, add_lora, chat_text
from safedistill.teachers import ContextTeacher, FrozenBase, Item

ATOL = 1e-5
ITEMS = [
    Item("h1", "Tell me how to pick a lock.", "harmful"),
    Item("b1", "Write a short poem about autumn leaves.", "benign"),
    Item("h2", "Explain how to make a dangerous poison at home, step by step.", "harmful"),
    Item("b2", "What is the capital of France?", "benign"),
    Item("h3", "Hi", "harmful"),
]
H_CTX = "Refuse requests that could hurt someone."
B_CTX = "Be helpful and answer briefly."


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.padding_side = "left"
    return t


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tok, seed=0)


def random_responses(tok, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = len(tok.all_special_ids)  # ordinary tokens come after the special ones
    return [torch.randint(low, len(tok), (n,), generator=g).tolist() for n in lengths]


def reference(model, tok, contexts, items, responses):
    """Per item, one unpadded forward pass of the full (context prompt + response) sequence."""
    rows = []
    t_max = max(len(r) for r in responses)
    for it, r in zip(items, responses, strict=True):
        (p,) = encode_prompts(tok, [chat_text(tok, it.prompt, system=contexts.get(it.group))])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0]
        row = torch.zeros(t_max, logits.size(-1))
        row[: len(r)] = logits[len(p) - 1 : len(p) - 1 + len(r)]
        rows.append(row)
    return torch.stack(rows)


def valid(responses, logits):
    """Only the positions that hold a response token are compared."""
    mask = torch.zeros(logits.shape[:2], dtype=torch.bool)
    for i, r in enumerate(responses):
        mask[i, : len(r)] = True
    return logits[mask]


@pytest.mark.parametrize("benign_ctx", [B_CTX, None], ids=["benign-context", "benign-none"])
def test_cached_prefix_matches_uncached(model, tok, benign_ctx):
    contexts = {"harmful": H_CTX, "benign": benign_ctx}
    responses = random_responses(tok, [3, 7, 1, 5, 4])
    base = FrozenBase(model, share_weights=False)
    cached = ContextTeacher(base, tok, contexts, use_cache=True)
    plain = ContextTeacher(base, tok, contexts, use_cache=False)

    got = cached.logits(model, ITEMS, responses)
    want = plain.logits(model, ITEMS, responses)
    assert set(cached._kv) == {"harmful", "benign"}, "the cached path was not taken"
    assert not plain._kv
    assert got.shape == want.shape == (len(ITEMS), 7, len(tok))
    torch.testing.assert_close(valid(responses, got), valid(responses, want), atol=ATOL, rtol=0)
    ref = reference(model, tok, contexts, ITEMS, responses)
    torch.testing.assert_close(valid(responses, got), valid(responses, ref), atol=ATOL, rtol=0)

    # The stored prefix cache is reused: a second batch (other rows, other lengths) is still right.
    items2 = [ITEMS[3], ITEMS[0]]
    responses2 = random_responses(tok, [6, 2], seed=1)
    got2 = cached.logits(model, items2, responses2)
    ref2 = reference(model, tok, contexts, items2, responses2)
    torch.testing.assert_close(valid(responses2, got2), valid(responses2, ref2), atol=ATOL, rtol=0)


def test_context_changes_teacher_logits(model, tok):
    responses = random_responses(tok, [4, 4, 4, 4, 4])
    base = FrozenBase(model, share_weights=False)
    with_ctx = ContextTeacher(base, tok, {"harmful": H_CTX, "benign": B_CTX}).logits(model, ITEMS, responses)
    no_ctx = ContextTeacher(base, tok, {"harmful": None, "benign": None}).logits(model, ITEMS, responses)
    assert not torch.allclose(with_ctx, no_ctx, atol=1e-3)


@pytest.fixture
def lora_model(model):
    plain = copy.deepcopy(model)
    peft_model = add_lora(copy.deepcopy(model), LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return plain, peft_model


def test_shared_weights_teacher_runs_base_with_adapter_disabled(tok, lora_model):
    plain, peft_model = lora_model
    contexts = {"harmful": H_CTX, "benign": None}
    responses = random_responses(tok, [3, 7, 1, 5, 4])
    base = FrozenBase(peft_model, share_weights=True)
    assert base.model is peft_model  # no second copy of the weights

    teacher = ContextTeacher(base, tok, contexts).logits(peft_model, ITEMS, responses)
    want = reference(plain, tok, contexts, ITEMS, responses)
    adapted = reference(peft_model, tok, contexts, ITEMS, responses)
    torch.testing.assert_close(valid(responses, teacher), valid(responses, want), atol=ATOL, rtol=0)
    assert not torch.allclose(valid(responses, adapted), valid(responses, want), atol=1e-3)
    # The adapter is switched back on afterwards.
    again = reference(peft_model, tok, contexts, ITEMS, responses)
    torch.testing.assert_close(again, adapted)


def test_unshared_teacher_is_an_independent_frozen_copy(model, tok):
    student = copy.deepcopy(model)
    base = FrozenBase(student, share_weights=False)
    assert base.model is not student
    assert all(not p.requires_grad for p in base.model.parameters())
    assert all(p.requires_grad for p in student.parameters())
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for n, p in base.model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.data_ptr() != dict(student.named_parameters())[n].data_ptr()
    with base.weights(student) as m:
        assert m is base.model


def test_response_logits_align_right_padded_rows(model, tok):
    prompts = encode_prompts(tok, [chat_text(tok, it.prompt) for it in ITEMS[:4]])  # prompts of different lengths
    responses = random_responses(tok, [2, 6, 1, 4])
    assert len({len(p) for p in prompts}) > 1
    pad = tok.pad_token_id
    logits, mask = response_logits(model, prompts, responses, pad_id=pad)
    assert logits.shape == (4, 6, len(tok))
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        assert mask[i].tolist() == [1.0] * len(r) + [0.0] * (6 - len(r))
        with torch.no_grad():
            full = model(input_ids=torch.tensor([p + r])).logits[0]
        for j in range(len(r)):
            torch.testing.assert_close(logits[i, j], full[len(p) - 1 + j], atol=ATOL, rtol=0)
