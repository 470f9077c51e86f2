"""Teachers score the student's rollouts token by token. The context teacher is the frozen base
model with a privileged context as its system message; the student never sees the context.

With LoRA the teacher is the same model with the adapter disabled (no second copy of the weights);
with full-parameter training it is a frozen copy made before training starts.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .models import chat_text
from .rollout import encode_prompts
from .scoring import common_prefix, prefix_kv, response_logits


@dataclass(frozen=True)
class Item:
    """One training prompt; `group` picks the teacher's context (harmful or benign side)."""

    id: str
    prompt: str
    group: str


class FrozenBase:
    """Runs the frozen base weights: the adapter switched off, or a copy taken at construction."""

    def __init__(self, model, *, share_weights: bool):
        self.share = share_weights
        self.model = model if share_weights else copy.deepcopy(model).eval().requires_grad_(False)

    @contextlib.contextmanager
    def weights(self, student) -> Iterator:
        if self.share:
            with student.disable_adapter():
                yield student
        else:
            yield self.model


class ContextTeacher:
    """Base model + per-group context (e.g. c_h on harmful prompts, c_b on benign ones). The
    context prefix is the same for every prompt of a group, so its KV cache is computed once
    (the base weights are frozen) and reused for every batch."""

    def __init__(
        self,
        base: FrozenBase,
        tokenizer,
        contexts: dict[str, str | None],
        *,
        use_cache: bool = True,
    ):
        self.base = base
        self.tokenizer = tokenizer
        self.contexts = contexts
        self.use_cache = use_cache
        self._prefix: dict[str, list[int]] = {}
        self._kv: dict[str, object] = {}
        for group, ctx in contexts.items():
            a, b = encode_prompts(tokenizer, [chat_text(tokenizer, x, system=ctx) for x in ("A", "B")])
            self._prefix[group] = common_prefix([a, b])

    def prompt_text(self, item: Item) -> str:
        return chat_text(self.tokenizer, item.prompt, system=self.contexts.get(item.group))

    @torch.no_grad()
    def logits(self, student, items: Sequence[Item], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """Teacher logits [B, T, V] at the response positions, aligned with the student's."""
        prompts = encode_prompts(self.tokenizer, [self.prompt_text(it) for it in items])
        pad = self.tokenizer.pad_token_id
        t_max = max(1, max(len(r) for r in responses))
        out: torch.Tensor | None = None
        with self.base.weights(student) as model:
            for group in dict.fromkeys(it.group for it in items):
                rows = [i for i, it in enumerate(items) if it.group == group]
                prefix = self._prefix[group]
                cached = self.use_cache and len(prefix) > 1 and all(prompts[i][: len(prefix)] == prefix for i in rows)
                if cached:
                    if group not in self._kv:
                        self._kv[group] = prefix_kv(model, prefix)
                    suffixes = [prompts[i][len(prefix) :] for i in rows]
                    logits, _ = response_logits(
                        model,
                        suffixes,
                        [responses[i] for i in rows],
                        pad_id=pad,
                        prefix_cache=self._kv[group],
                    )
                else:
                    logits, _ = response_logits(
                        model, [prompts[i] for i in rows], [responses[i] for i in rows], pad_id=pad
                    )
                if out is None:
                    out = logits.new_zeros(len(items), t_max, logits.size(-1))
                out[rows, : logits.size(1)] = logits
        assert out is not None
        return out


class SteeringTeacher:
    """Base model with `scale * vector` added at one layer's input (activation steering). It sees
    the same prompt as the student; only the hidden states differ."""

    def __init__(self, base: FrozenBase, tokenizer, *, layer: int, vector: torch.Tensor, scale: float = 1.0):
        self.base, self.tokenizer = base, tokenizer
        self.layer, self.vector, self.scale = layer, vector, scale

    @torch.no_grad()
    def logits(self, student, items: Sequence[Item], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        from .steering import steer

        prompts = encode_prompts(self.tokenizer, [chat_text(self.tokenizer, it.prompt) for it in items])
        with self.base.weights(student) as model, steer(model, self.layer, self.vector, self.scale):
            logits, _ = response_logits(model, prompts, responses, pad_id=self.tokenizer.pad_token_id)
        return logits
