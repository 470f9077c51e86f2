"""Rollouts with vLLM (GPU), behind the same call as `rollout.generate`.

vLLM runs in this process next to the training model (colocated, as TRL's colocate mode). Before
each call the current student weights (LoRA merged in) are loaded into it, so the samples are
on-policy. Off by default (`rollout_backend: hf`); without vllm or a GPU the trainer falls back
to transformers' generate with a note.

Not exercised in CI (no GPU there): only the fallback is tested.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Sequence

import torch

from ..models import resolve_model
from .rollout import GenerationStats, Rollout, SamplingSettings, check_fits, encode_prompts, finish, stop_token_ids


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def vllm_generate_or_none(model: str, *, precision: str, gpu_memory_utilization: float, seed: int):
    """A generate function backed by vLLM, or None (with a note) when it cannot run here."""
    if not vllm_available():
        why = "vllm is not installed" if importlib.util.find_spec("vllm") is None else "no CUDA device"
        print(f"note: rollout_backend=vllm but {why}; rolling out with transformers instead", file=sys.stderr)
        return None
    return VLLMGenerate(model, precision=precision, gpu_memory_utilization=gpu_memory_utilization, seed=seed)


def merged_weights(model):
    """(name, tensor) pairs of the full weights as vLLM names them, LoRA merged in."""
    if not hasattr(model, "merge_adapter"):
        for name, p in model.named_parameters():
            yield name, p.data
        return
    model.merge_adapter()
    try:
        for name, p in model.named_parameters():
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if model.prefix in name or "original_module" in name:
                continue
            yield name.replace("modules_to_save.default.", ""), p.data
    finally:
        model.unmerge_adapter()


class VLLMGenerate:
    """Callable like `rollout.generate`; builds the engine on first use."""

    def __init__(self, model: str, *, precision: str, gpu_memory_utilization: float, seed: int):
        self.model, self.precision, self.gpu_memory_utilization, self.seed = (
            model,
            precision,
            gpu_memory_utilization,
            seed,
        )
        self.llm = None

    def _engine(self, model):
        if self.llm is None:
            from vllm import LLM

            self.llm = LLM(
                model=resolve_model(self.model),
                dtype="bfloat16" if self.precision != "fp32" else "float32",
                gpu_memory_utilization=float(self.gpu_memory_utilization),
                enable_prefix_caching=True,  # the chat template's system prefix is shared by every prompt
                seed=self.seed,
            )
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(merged_weights(model))
        self.llm.reset_prefix_cache()
        return self.llm

    @torch.no_grad()
    def __call__(
        self,
        model,
        tokenizer,
        prompts: Sequence[str],
        settings: SamplingSettings,
        *,
        names: Sequence[str] | None = None,
        desc: str = "generating",
        progress: bool = True,
    ) -> tuple[list[Rollout], GenerationStats]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        encoded = encode_prompts(tokenizer, prompts)
        check_fits(model, encoded, settings.max_new_tokens, names)
        stops = stop_token_ids(tokenizer, model)
        llm = self._engine(model)
        params = SamplingParams(
            n=1,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_new_tokens,
            seed=settings.seed,
            stop_token_ids=stops,
        )
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params, use_tqdm=progress)
        stats = GenerationStats(seconds=time.perf_counter() - t0)
        rollouts = [
            finish(ids, list(out.outputs[0].token_ids), stops, tokenizer, stats)
            for ids, out in zip(encoded, outs, strict=True)
        ]
        return rollouts, stats
