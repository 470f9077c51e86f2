"""Rollouts with vLLM (GPU), behind the same call as `rollout.generate`, on TRL's colocate pattern.

TRL maintains colocated vLLM generation against vLLM's releases (trl/generation/vllm_generation.py,
`VLLMGeneration`, mode "colocate"); this module follows the same steps:

- one engine per training process, in that process: `distributed_executor_backend=
  "external_launcher"` keeps vLLM's V1 engine core in-process (no worker processes), which is what
  makes `llm.llm_engine.model_executor.driver_worker` exist; RANK, LOCAL_RANK, WORLD_SIZE and a
  rendezvous address are set first, as TRL does;
- before each rollout the student's weights are pushed one tensor at a time into
  `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights`, under the base
  model's own state_dict names (vLLM maps those onto its fused qkv/gate_up layers): no peft
  `base_model.model.` prefix, no `.base_layer`, no separate LoRA tensors;
- LoRA: each adapted weight is pushed as W + scale * B @ A. TRL gets this by `merge_adapter()`,
  pushing, then `unmerge_adapter()`; here the merged tensor is computed beside the model instead
  (the same values, but the training weights are never written: with bf16 base weights a
  merge/unmerge round trip does not give W back bit for bit, and under FSDP2 it would write into
  shards);
- under FSDP2 the parameters are DTensor shards: each is gathered with `full_tensor()` (every
  process pushes the same names in the same order, so the all-gathers match);
- sleep mode: between rollouts the engine sleeps, so the optimizer step has the memory; it wakes
  its weights before the push and its KV cache before generating. Level 1 (weights kept in host
  memory, KV cache dropped), not TRL's level 2: level 2 discards the weights and TRL restores them
  with `collective_rpc("reload_weights")` from disk, which has overwritten pushed weights (TRL
  issue 5312); level 1 costs host memory the size of the model and cannot serve stale weights.

This path has NOT run on any machine of this project: vLLM cannot be installed here (it pins its
own torch and needs CUDA). What is tested without it is the weight mapping (names and merged
values, also with FSDP2 DTensors) and the fallback to transformers when vllm is missing.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models import resolve_model, weights_dtype
from .rollout import GenerationStats, Rollout, SamplingSettings, check_fits, encode_prompts, finish, stop_token_ids


@dataclass(frozen=True)
class VLLMOptions:
    """What the engine is built from: the run's model, its precision, memory share and seed. The
    engine holds bf16 weights where the GPU has bf16 (as `dtype: auto`) or under bf16 autocast."""

    model: str
    precision: str = "fp32"
    gpu_memory_utilization: float = 0.3
    seed: int = 0


def vllm_missing() -> str | None:
    """Why vLLM cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def vllm_generate_or_none(model: str, *, precision: str, gpu_memory_utilization: float, seed: int):
    """A generate function backed by vLLM, or None (with a one-line note) when it cannot run here."""
    why = vllm_missing()
    if why:
        print(
            f"note: rollout_backend=vllm but {why} (vllm needs CUDA and a torch it supports); "
            "rolling out with transformers instead",
            file=sys.stderr,
        )
        return None
    return VLLMGenerate(VLLMOptions(model, precision, gpu_memory_utilization, seed))


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard gathered to the whole tensor (FSDP2); plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _unwrap(model):
    """The module under DistributedDataParallel and the base model under peft."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora_layers(base) -> dict[str, torch.nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def merged_weight(layer) -> torch.Tensor:
    """W + scale * B @ A over the layer's active adapters, in W's dtype (summed in float32)."""
    from peft.tuners.lora import Linear

    if not isinstance(layer, Linear):
        raise UserError(f"rollout_backend=vllm: cannot merge a LoRA {type(layer).__name__} (only Linear layers)")
    weight = _full(layer.base_layer.weight)
    merged = weight.float()
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter):
            raise UserError("rollout_backend=vllm: DoRA adapters are not supported")
        a, b = _full(layer.lora_A[adapter].weight).float(), _full(layer.lora_B[adapter].weight).float()
        delta = (b @ a) * layer.scaling[adapter]
        merged = merged + (delta.T if layer.fan_in_fan_out else delta)
    return merged.to(weight.dtype)


def vllm_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every entry of the base model's state_dict, under that name, with the LoRA
    merged in; one tensor at a time, gathered when sharded (FSDP2)."""
    base = _unwrap(model)
    lora = _lora_layers(base)
    merged_done: set[str] = set()
    for name, tensor in base.state_dict(keep_vars=True).items():
        owner, _, leaf = name.rpartition(".")
        if ".lora_" in name or "original_module" in name:
            continue  # adapter tensors (merged below) and modules_to_save's frozen originals
        clean = name.replace(".base_layer", "").replace(".modules_to_save.default", "")
        layer_name = owner.removesuffix(".base_layer")
        if layer_name in lora and leaf == "weight":
            if layer_name not in merged_done:
                merged_done.add(layer_name)
                with torch.no_grad():
                    yield clean, merged_weight(lora[layer_name])
            continue
        yield clean, _full(tensor.detach())


def _launcher_env() -> None:
    """What `external_launcher` reads: this process's rank and a rendezvous address (torchrun sets
    them; a single process gets rank 0 of 1 and a free local port), as TRL's colocate mode does."""
    dist = torch.distributed
    up = dist.is_available() and dist.is_initialized()
    os.environ.setdefault("RANK", str(dist.get_rank() if up else 0))
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size() if up else 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def request_seeds(settings: SamplingSettings, n: int) -> list[int]:
    """One sampling seed per prompt: the settings' per-item seeds where it has them, else derived
    from its seed and the prompt's place (one stream per prompt, as vLLM seeds each request)."""
    seeds = getattr(settings, "seeds", None)
    if seeds:
        return [int(s) for s in seeds]
    return [(settings.seed * 1_000_003 + i) % 2**31 for i in range(n)]


class VLLMGenerate:
    """Callable like `rollout.generate`; builds the engine on first use and pushes the student's
    weights before every call."""

    SLEEP_LEVEL = 1

    def __init__(self, options: VLLMOptions):
        self.options = options
        self.llm = None

    def _build(self):
        from vllm import LLM

        _launcher_env()
        o = self.options
        bf16 = weights_dtype("auto", "cuda") == "bf16" or o.precision != "fp32"
        self.llm = LLM(
            model=resolve_model(o.model),
            dtype="bfloat16" if bf16 else "float32",
            gpu_memory_utilization=float(o.gpu_memory_utilization),
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=1,
            seed=int(os.environ["RANK"]),  # per-request seeds below decide the samples
            enable_sleep_mode=True,
            enable_prefix_caching=True,  # the chat template's system prefix is shared by every prompt
            max_num_batched_tokens=4096,  # TRL: vLLM's profiler misjudges memory with its larger default
        )
        self.llm.sleep(level=self.SLEEP_LEVEL)

    def push(self, model) -> int:
        """Wake the engine's weights and load the student's into it; returns how many tensors."""
        self.llm.wake_up(tags=["weights"])
        target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        count = 0
        for name, tensor in vllm_weights(model):
            target.load_weights([(name, tensor)])
            count += 1
        self.llm.reset_prefix_cache()
        return count

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

        encoded = encode_prompts(tokenizer, prompts)
        check_fits(model, encoded, settings.max_new_tokens, names)
        stops = stop_token_ids(tokenizer, model)
        if self.llm is None:
            self._build()
        self.push(model)
        self.llm.wake_up(tags=["kv_cache"])
        params = [
            SamplingParams(
                n=1,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_new_tokens,
                seed=seed,
                stop_token_ids=stops,
            )
            for seed in request_seeds(settings, len(encoded))
        ]
        t0 = time.perf_counter()
        try:
            outs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=progress)
        finally:
            self.llm.sleep(level=self.SLEEP_LEVEL)
        stats = GenerationStats(seconds=time.perf_counter() - t0)
        rollouts = [
            finish(ids, list(out.outputs[0].token_ids), stops, tokenizer, stats)
            for ids, out in zip(encoded, outs, strict=True)
        ]
        return rollouts, stats
