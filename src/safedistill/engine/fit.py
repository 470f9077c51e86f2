"""The one optimisation loop: the trainer and COPSD's Cross-SFT cold start both run it.

A step function maps (model, batch, step, micro) to (loss, metrics); `fit` owns batching,
gradient accumulation, the loss weights that make several processes compute what one does,
clipping, the divergence guard and the optimizer step, and yields each finished step so the
caller logs and checkpoints as it needs.

Across processes: a step reports `loss_tokens`, the token count its loss is a mean over; the
counts are summed over processes (one all-reduce per micro-batch, which also carries the
non-finite flag), and each process weights its mean by world * count / total, so the gradient
that DDP or FSDP2 averages is the gradient of the global token mean, exact for uneven shards
(TRL's DistillationTrainer normalises the same way). With one process the weight is 1."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import faults
from ..errors import RunDiverged
from .distributed import Processes

# (model, batch, step, micro[, epoch]) -> (loss, metrics); epoch only when fit takes passes > 1.
# metrics["loss_tokens"]: how many tokens the loss is a mean over (absent: weighted as one).
StepFn = Callable[..., tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class Batching:
    """What picks a step's examples: `batch_size` per micro-batch, `grad_accum` micro-batches."""

    batch_size: int
    grad_accum: int
    seed: int


def batch_for_step(items: Sequence, step: int, micro: int, batching) -> list:
    """Deterministic in (seed, step): a fresh seeded permutation per epoch, so a resumed run
    sees exactly the batches the uninterrupted one would have. `batching` needs batch_size,
    grad_accum and seed (a Batching or the run config)."""
    per_step = batching.batch_size
    start = (step * batching.grad_accum + micro) * per_step
    epoch, offset = divmod(start, len(items))
    order = list(range(len(items)))
    random.Random(batching.seed * 7919 + epoch).shuffle(order)
    picked = []
    while len(picked) < per_step:
        if offset >= len(order):
            epoch, offset = epoch + 1, 0
            order = list(range(len(items)))
            random.Random(batching.seed * 7919 + epoch).shuffle(order)
        picked.append(items[order[offset]])
        offset += 1
    return picked


@dataclass
class StepDone:
    step: int  # 0-based index of the step just taken
    logs: list[dict]  # one metrics dict per micro-batch
    grad_norm: float
    seconds: float
    lr: float | None = None  # the learning rate this step's update used (before the scheduler moved it)


def _finite(params) -> bool:
    return all(bool(torch.isfinite(_local(p)).all()) for p in params)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly FSDP2-sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def fit(
    model,
    step_fn: StepFn,
    data: Sequence,
    optimizer,
    batching: Batching,
    *,
    steps: int,
    max_grad_norm: float,
    scheduler=None,
    procs: Processes | None = None,
    start: int = 0,
    desc: str = "training",
    progress: bool = True,
    passes: int = 1,
) -> Iterator[StepDone]:
    """Steps `start` .. `steps`-1; each yields once its optimizer updates are done. `passes` > 1
    takes that many updates on each step's batches, calling step_fn(..., epoch) with epoch 0..
    passes-1 (the step function reuses what it drew at epoch 0); the scheduler moves once per
    step. A non-finite loss or gradient on any process raises RunDiverged on every process before
    the update, a non-finite weight after it: the caller then saves nothing more, so no
    checkpoint holds the bad step."""
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        logs: list[dict] = []
        norms: list[float] = []
        lr = optimizer.param_groups[0]["lr"]
        for epoch in range(passes):
            logs += _accumulate(model, step_fn, data, step, batching, procs, epoch if passes > 1 else None)
            norms.append(_update(params, optimizer, max_grad_norm, step, procs))
        faults.point("step")
        if scheduler is not None:
            scheduler.step()
        losses = [d["loss"] for d in logs if "loss" in d]
        bar.set_postfix(loss=f"{sum(losses) / len(losses):.3f}")
        yield StepDone(step, logs, sum(norms) / len(norms), time.perf_counter() - t0, lr)
    bar.close()


def _accumulate(model, step_fn: StepFn, data: Sequence, step: int, batching, procs, epoch: int | None) -> list[dict]:
    """The step's micro-batches, forward and backward (gradients summed, / grad_accum)."""
    logs = []
    for micro in range(batching.grad_accum):
        batch = batch_for_step(data, step, micro, batching)
        args = (model, procs.shard(batch) if procs else batch, step, micro) + (() if epoch is None else (epoch,))
        with procs.accumulating(model, micro == batching.grad_accum - 1) if procs else contextlib.nullcontext():
            loss, info = step_fn(*args)
            weight = _weigh(loss, info, step, procs)
            (loss * weight / batching.grad_accum if weight != 1 else loss / batching.grad_accum).backward()
        logs.append(info)
    return logs


def _weigh(loss: torch.Tensor, info: dict, step: int, procs) -> float:
    """This process's loss weight (see the module doc) after the collective divergence check; sets
    info["loss"] to the global token mean. Raises on every process if any has a non-finite loss."""
    value = float(loss.detach())
    if procs is None or not procs.group:
        if not math.isfinite(value):
            raise RunDiverged(step + 1, f"the loss is {value}")
        return 1.0
    count = float(info.get("loss_tokens", 1))
    bad = not math.isfinite(value)
    total, n_bad, weighted = procs.sum([count, float(bad), 0.0 if bad else value * count])
    if n_bad:
        raise RunDiverged(step + 1, f"the loss is {value if bad else 'non-finite on another process'}")
    key = "loss" if "loss" in info else "reuse_loss" if "reuse_loss" in info else None
    if key:
        info[key] = weighted / total if total else 0.0
    return procs.world * count / total if total else 0.0


def _update(params, optimizer, max_grad_norm: float, step: int, procs) -> float:
    """Clip, one optimizer update; the gradient norm before clipping. Gradients are already
    synchronised (DDP/FSDP2), so the norm is the same on every process."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):
        raise RunDiverged(step + 1, f"the gradient norm is {float(grad_norm)}")
    optimizer.step()
    bad = not _finite(params)
    if procs.any(bad) if procs else bad:  # FSDP2: each process checks its own shard
        raise RunDiverged(step + 1, "the update made some weights non-finite", from_weights=False)
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)
