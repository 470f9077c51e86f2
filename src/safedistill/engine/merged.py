"""Rollouts from a frozen copy of the student with its LoRA merged into the weights.

Decoding is a long chain of small matrix-vector products; with the adapter unmerged every
adapted projection adds two more tiny matmuls (and their dispatch) per token. The copy holds
W + scale * B @ A, recomputed from the untouched base weights before each rollout (no drift from
merge/unmerge round trips), so the samples come from the current student. With precision bf16
(or bf16 weights, `dtype`) the copy is stored in bf16: decoding reads half the bytes and needs no
per-op casts.

Costs one more copy of the weights in memory; LoRA runs only (full-parameter runs decode with the
student itself).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from .precision import resolve_precision
from .rollout import GenerationStats, Rollout, SamplingSettings, generate


def _lora_layers(student):
    from peft.tuners.lora import LoraLayer

    for name, module in student.named_modules():
        if isinstance(module, LoraLayer):
            yield name.removeprefix("base_model.model."), module


class MergedRollouts:
    """Callable like `rollout.generate`; keeps the merged copy between calls."""

    def __init__(self, precision: str = "fp32"):
        self.precision = precision
        self.copy = None
        self._targets: dict = {}

    @torch.no_grad()
    def refresh(self, student):
        if not hasattr(student, "get_base_model"):
            return student
        if self.copy is None:
            base = student.get_base_model().get_input_embeddings().weight.dtype  # the load dtype
            dtype = torch.bfloat16 if resolve_precision(self.precision, student.device) == "bf16" else base
            self.copy = copy.deepcopy(student).merge_and_unload().to(dtype).eval().requires_grad_(False)
            self._targets = dict(self.copy.named_modules())
        for name, layer in _lora_layers(student):
            weight = layer.base_layer.weight.detach().clone()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight += layer.get_delta_weight(adapter)
            self._targets[name].weight.copy_(weight)
        return self.copy

    def __call__(
        self, model, tokenizer, prompts: Sequence[str], settings: SamplingSettings, **kwargs
    ) -> tuple[list[Rollout], GenerationStats]:
        return generate(self.refresh(model), tokenizer, prompts, settings, **kwargs)
