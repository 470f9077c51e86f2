"""Checkpoints a run can resume from, losing at most the current step. Everything is safetensors
or JSON: nothing here unpickles, so a checkpoint from elsewhere cannot run code."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import faults
from ..errors import RunDiverged
from ..files import atomic_write_text, save_tensors

_NAME = re.compile(r"step-(\d+)")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: Path,
    *,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler,
    step: int,
    extra: dict | None = None,
) -> None:
    """Writes to `path.partial` then renames, so a kill mid-write leaves the previous one intact.
    `weights` and `optimizer_state` are full (gathered when sharded: engine/distributed.py), so a
    checkpoint does not depend on how many processes wrote it. Non-finite weights are never
    written: the last good checkpoint stays the latest."""
    bad = [name for name, t in weights.items() if not torch.isfinite(t).all()]
    if bad:
        raise RunDiverged(step, f"{len(bad)} weight tensors are non-finite (e.g. {bad[0]}); not saved")
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors({n: t.contiguous() for n, t in weights.items()}, tmp / "trainable.safetensors")
    tensors, scalars = {}, {}
    for idx, state in optimizer_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    save_tensors(tensors, tmp / "optimizer.safetensors")
    meta = {
        "step": step,
        "param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "python_random": _encode_random(random.getstate()),
        "extra": extra or {},
    }
    atomic_write_text(tmp / "state.json", json.dumps(meta))
    faults.point("checkpoint")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_weights(path: Path, model) -> None:
    """The checkpoint's trainable weights into an unwrapped, unsharded model (before DDP/FSDP2)."""
    params = dict(model.named_parameters())
    for name, value in load_file(path / "trainable.safetensors").items():
        params[name].data.copy_(value)


def load_training_state(path: Path, *, scheduler) -> tuple[dict, dict]:
    """(the optimizer's full state_dict, the saved metadata); restores the scheduler and the
    RNGs. Every process reads the same files, so all continue alike."""
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    scheduler.load_state_dict(meta["scheduler"])
    random.setstate(_decode_random(meta["python_random"]))
    return {"state": state, "param_groups": meta["param_groups"]}, meta


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> dict:
    """Restores weights, optimizer, scheduler and RNG of a single unwrapped model; returns the
    saved metadata."""
    load_weights(path, model)
    state, meta = load_training_state(path, scheduler=scheduler)
    optimizer.load_state_dict(state)
    return meta


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest complete `step-N` (a `step-N.partial` left by a kill mid-write is not one)."""
    found = [
        p for p in (run_dir / "checkpoints").glob("step-*") if _NAME.fullmatch(p.name) and (p / "state.json").exists()
    ]
    return max(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)), default=None)


def remove_partial(run_dir: Path) -> list[str]:
    """Deletes checkpoint (and final model) folders a kill left half-written; their names."""
    leftovers = [*(run_dir / "checkpoints").glob("*.partial"), *run_dir.glob("final.partial")]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in leftovers]


def _encode_random(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _decode_random(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])
