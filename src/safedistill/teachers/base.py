"""The Teacher protocol, and the pieces every kind of teacher is built from.

A teacher scores the student's rollouts token by token: `logits(student, items, responses)`
returns its logits [B, T, V] at the response positions, aligned with the student's. It names its
`reference`, the frozen original model (COPSD's KL term pulls toward it). A teacher that reads a
different prompt than the student also exposes `prompt_text(item)` (the collapse probe samples
it). With LoRA the frozen weights are the student's with the adapter disabled (no second copy);
with full-parameter training they are a second model loaded from the student's path (sharded
like the student under FSDP2), or a copy made before training starts where no path is given.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..engine.distributed import gathered
from ..engine.rollout import encode_prompts
from ..engine.scoring import common_prefix, prefix_kv, response_logits


@dataclass(frozen=True)
class Item:
    """One training prompt; `group` picks the teacher's context (harmful or benign side).
    `teacher_prompt`, when set, is the request the teacher reads instead of `prompt` (augment_teacher
    = original: a rewritten prompt's train original, privileged like the context)."""

    id: str
    prompt: str
    group: str
    teacher_prompt: str | None = None

    @property
    def teacher_view(self) -> str:
        return self.prompt if self.teacher_prompt is None else self.teacher_prompt


class Weights(Protocol):
    def weights(self, student) -> contextlib.AbstractContextManager: ...


@runtime_checkable
class Teacher(Protocol):
    reference: Weights

    def logits(self, student, items: Sequence[Item], responses: Sequence[Sequence[int]]) -> torch.Tensor: ...


@runtime_checkable
class PromptedTeacher(Protocol):
    """What a teacher that reads its own prompt also exposes: the frozen weights it runs and that
    prompt (the collapse probe samples the teacher through them)."""

    base: Weights

    def prompt_text(self, item: Item) -> str: ...


class FrozenBase:
    """Runs the frozen base weights: the adapter switched off, or a separate frozen model:
    `frozen` (loaded from the model's path, placed as the student is: replicated, or FSDP2
    shards gathered while it runs), else a copy taken at construction (never of a sharded model:
    the trainer passes `frozen`)."""

    def __init__(self, model, *, share_weights: bool, frozen=None):
        self.share = share_weights
        if share_weights:
            self.model = model
        else:
            self.model = (frozen if frozen is not None else copy.deepcopy(model)).eval().requires_grad_(False)

    @contextlib.contextmanager
    def weights(self, student) -> Iterator:
        if self.share:
            with student.disable_adapter():
                yield student
        else:
            with gathered(self.model):
                yield self.model


class FrozenModel:
    """FrozenBase's interface over a separate frozen model (e.g. the Cross-SFT teacher)."""

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)

    @contextlib.contextmanager
    def weights(self, student) -> Iterator:
        yield self.model


class PrefixTeacher:
    """A frozen model reading its own prompt (`prompt_text`, for subclasses). The part of that
    prompt shared by every prompt of a group (a system context, a constitution) has the same KV
    cache for every batch, since the weights are frozen: it is computed once and reused."""

    def __init__(self, base, tokenizer, *, reference=None, use_cache: bool = True):
        self.base, self.tokenizer, self.use_cache = base, tokenizer, use_cache
        self.reference = reference if reference is not None else base
        self._prefix: dict[str, list[int]] = {}
        self._kv: dict[str, object] = {}

    def prompt_text(self, item: Item) -> str:
        raise NotImplementedError

    def prefix(self, group: str) -> list[int]:
        """Token ids every prompt of `group` starts with (two probe prompts' common prefix)."""
        if group not in self._prefix:
            probes = [self.prompt_text(Item("", x, group)) for x in ("A", "B")]
            self._prefix[group] = common_prefix(encode_prompts(self.tokenizer, probes))
        return self._prefix[group]

    @torch.no_grad()
    def logits(self, student, items: Sequence[Item], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        prompts = encode_prompts(self.tokenizer, [self.prompt_text(it) for it in items])
        t_max = max(1, max(len(r) for r in responses))
        out: torch.Tensor | None = None
        with self.base.weights(student) as model:
            for group in dict.fromkeys(it.group for it in items):
                rows = [i for i, it in enumerate(items) if it.group == group]
                logits = self._group_logits(model, group, [prompts[i] for i in rows], [responses[i] for i in rows])
                if out is None:
                    out = logits.new_zeros(len(items), t_max, logits.size(-1))
                out[rows, : logits.size(1)] = logits
        assert out is not None
        return out

    def _group_logits(self, model, group: str, prompts: list[list[int]], responses: list) -> torch.Tensor:
        pad = self.tokenizer.pad_token_id
        prefix = self.prefix(group)
        if not (self.use_cache and len(prefix) > 1 and all(p[: len(prefix)] == prefix for p in prompts)):
            return response_logits(model, prompts, responses, pad_id=pad)[0]
        if group not in self._kv:
            self._kv[group] = prefix_kv(model, prefix)
        suffixes = [p[len(prefix) :] for p in prompts]
        return response_logits(model, suffixes, responses, pad_id=pad, prefix_cache=self._kv[group])[0]
