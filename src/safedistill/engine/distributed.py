"""Several training processes (`torchrun --nproc_per_node N`, `accelerate launch`): accelerate
sets up the process group (gloo on CPU, nccl on GPUs) and the per-process device; each process
rolls out and scores its own share of every batch, gradients are averaged across processes before
the optimizer step (data parallel, as DDP does), so every process holds the same weights. Only
process 0 writes files and evaluates.

With one process (no launcher) nothing here touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

from ..errors import UserError


class Processes:
    """The process group as the trainer sees it: rank, world size, data shards, gradient sync."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = None
        self.rank = 0
        self.device = device
        if self.world > 1:
            from accelerate import Accelerator
            from accelerate.utils import DistributedType

            acc = Accelerator(cpu=torch.device(device).type == "cpu")
            if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                raise UserError(
                    "accelerate config: FSDP/DeepSpeed sharding is not supported yet (each process rolls out with "
                    "the full weights); use plain multi-process data parallel"
                )
            self.accelerator, self.rank, self.world = acc, acc.process_index, acc.num_processes
            self.device = str(acc.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check(self, batch_size: int) -> None:
        if batch_size < self.world:
            raise UserError(
                f"config field 'batch_size' ({batch_size}) must be at least the number of processes ({self.world})"
            )

    def shard(self, batch: Sequence) -> list:
        """This process's deterministic share of a batch (every world-th item from its rank)."""
        return list(batch[self.rank :: self.world])

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Process 0 runs the block (and writes its caches) before the others read them."""
        if self.accelerator is None:
            yield
        else:
            with self.accelerator.main_process_first():
                yield

    def broadcast_(self, params: Sequence[torch.Tensor]) -> None:
        """Process 0's values everywhere (same start even if initialisation drew differently)."""
        if self.accelerator is None:
            return
        for p in params:
            torch.distributed.broadcast(p.data, src=0)

    def average_gradients_(self, params: Sequence[torch.Tensor]) -> None:
        """Mean gradient over processes, in one flat all-reduce."""
        if self.accelerator is None:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def average_metrics(self, row: dict) -> dict:
        """Means over processes of the numeric metrics; token counts are summed."""
        if self.accelerator is None:
            return row
        keys = [k for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)]
        values = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        out = dict(row)
        for k, v in zip(keys, values.cpu().tolist(), strict=True):
            out[k] = v if k == "tokens" else v / self.world
        return out
