"""Several training processes (`torchrun --nproc_per_node N`, `accelerate launch`) on torch's own
wrappers, chosen by `parallel`: DistributedDataParallel (the student replicated, gradients
averaged in backward) or FSDP2 (`fully_shard` per decoder layer, then the root: parameters,
gradients and optimizer state sharded). Each process rolls out and scores its own share of every
batch; what makes N processes compute what one does lives in fit.py (global token count,
collective divergence guard) and rollout.py (per-item sampling seeds). Only process 0 writes files
and evaluates.

With one process and `parallel: none` nothing here touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import socket
from collections.abc import Iterator, Sequence

import torch

from ..errors import UserError

MODES = ("auto", "none", "ddp", "fsdp2")


def resolve_parallel(parallel: str, world: int) -> str:
    """auto: ddp under a launcher (WORLD_SIZE > 1), none otherwise."""
    if parallel == "auto":
        return "ddp" if world > 1 else "none"
    if parallel == "none" and world > 1:
        raise UserError(
            f"config field 'parallel' is none but {world} processes were launched (WORLD_SIZE={world}); "
            "use parallel: auto, ddp or fsdp2"
        )
    return parallel


class Shard(list):
    """A process's share of a batch; `positions` are its items' indices in the whole batch (the
    sampling seeds and the loss weights need where an item sits globally, not on this process)."""

    def __init__(self, items: Sequence, positions: Sequence[int]):
        super().__init__(items)
        self.positions = list(positions)


def positions(batch: Sequence) -> list[int]:
    """Each item's index in its step's whole batch (a plain list: it is the whole batch)."""
    return list(getattr(batch, "positions", range(len(batch))))


def unwrap(model):
    """The module under a DDP wrapper: rollouts, the adapter-off teacher and saving use it, so
    only the student's gradient pass goes through the wrapper (and its gradient hooks)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _fsdp_modules(module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


@contextlib.contextmanager
def gathered(module) -> Iterator:
    """FSDP2 parameters gathered for a phase without gradient (rollout, teacher scores, probes):
    one all-gather per sharded module on entry, none in the forwards inside, so processes may run
    different numbers of forwards (prompts finish at different lengths) without a hang. A no-op
    for a module that is not sharded, and inside an enclosing `gathered`."""
    shards = _fsdp_modules(module)
    if not shards or getattr(module, "_safedistill_gathered", False):
        yield
        return
    for m in shards:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    module._safedistill_gathered = True
    try:
        yield
    finally:
        module._safedistill_gathered = False
        for m in shards:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def decoder_layers(model) -> list:
    """The transformer blocks FSDP2 shards one by one: the classes transformers names in
    `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, ...)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The process group as the trainer sees it: rank, world size, wrapping, data shards and the
    few collectives the trainer needs (sums of counts and flags, gathered state)."""

    def __init__(self, device: str, parallel: str = "auto", timeout_minutes: float = 240.0):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.mode = resolve_parallel(parallel, self.world)
        self.rank = 0
        self.device = device
        self.group = False
        self.owned = False  # whether this object started the process group (and ends it)
        if self.mode == "none":
            return
        import torch.distributed as dist

        cpu = torch.device(device).type == "cpu"
        if not cpu and torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = f"cuda:{local}"
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            if self.world == 1:  # parallel: fsdp2 | ddp in one process without a launcher
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(_free_port()))
                os.environ.setdefault("RANK", "0")
            # The others wait at a barrier while process 0 evaluates: the timeout covers that.
            dist.init_process_group(
                backend="gloo" if cpu else "nccl",
                timeout=datetime.timedelta(minutes=timeout_minutes),
                world_size=self.world,
                rank=int(os.environ.get("RANK", "0")),
            )
            self.owned = True
        self.group = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check(self, batch_size: int) -> None:
        if batch_size < self.world:
            raise UserError(
                f"config field 'batch_size' ({batch_size}) must be at least the number of processes ({self.world})"
            )

    def shard(self, batch: Sequence) -> Shard:
        """This process's deterministic share of a batch (every world-th item from its rank)."""
        index = list(range(self.rank, len(batch), self.world))
        return Shard([batch[i] for i in index], index)

    def barrier(self) -> None:
        if self.group:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Process 0 runs the block (and writes its caches) before the others read them."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self) -> None:
        """Ends the process group this object started (one a caller set up stays)."""
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.owned = False

    # ---- wrapping -------------------------------------------------------------------------

    def wrap(self, model):
        """The student for the fit loop: DDP around it, or FSDP2 shards of it (in place: the
        returned module is the same object), or the model itself. LoRA is already added, and
        every process holds the same weights (same path, same seed for the adapter's init; DDP
        broadcasts process 0's at construction anyway)."""
        if self.mode == "ddp":
            ids = [torch.device(self.device).index] if torch.device(self.device).type == "cuda" else None
            # No buffer sync in forward: it is a collective in every forward, and processes run
            # different numbers of forwards (the shared prompt prefix depends on the shard).
            ddp = torch.nn.parallel.DistributedDataParallel
            newer = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters  # torch >= 2.13
            no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
            return ddp(model, device_ids=ids, **no_sync)
        if self.mode == "fsdp2":
            return self.shard_model(model)
        return model

    def shard_model(self, model):
        """FSDP2: each decoder layer, then the root (whatever is left: embeddings, norm, head)."""
        if self.mode != "fsdp2":
            return model
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model

    @contextlib.contextmanager
    def accumulating(self, model, sync: bool) -> Iterator[None]:
        """A micro-batch's backward: gradients synchronised only on the last of a step (DDP's
        no_sync, FSDP2's set_requires_gradient_sync)."""
        if self.mode == "ddp" and not sync:
            with model.no_sync():
                yield
        elif self.mode == "fsdp2":
            model.set_requires_gradient_sync(sync)
            yield
        else:
            yield

    # ---- collectives ----------------------------------------------------------------------

    def sum(self, values: Sequence[float]) -> list[float]:
        """Elementwise sum over processes (float64), one all-reduce; the values themselves alone."""
        if not self.group:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on some process; every process gets the same answer."""
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def _comm_device(self) -> str:
        return self.device if torch.device(self.device).type == "cuda" else "cpu"

    def average_metrics(self, row: dict) -> dict:
        """Means over processes of the numeric metrics; counts (tokens, loss_tokens) are summed,
        and `loss` is already the global token mean (fit.py), so averaging keeps it."""
        if not self.group:
            return row
        keys = [k for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)]
        out = dict(row)
        for k, v in zip(keys, self.sum([row[k] for k in keys]), strict=True):
            out[k] = v if k in ("tokens", "loss_tokens") else v / self.world
        return out

    def summed_state(self, state: dict) -> dict:
        """A step's state (sums per process, e.g. KL by position) summed over processes."""
        if not self.group:
            return state
        out = {}
        for key, value in state.items():
            flat = value if isinstance(value, list) else [value]
            total = self.sum(flat)
            out[key] = total if isinstance(value, list) else total[0]
        return out

    # ---- full state for checkpoints and the final model -----------------------------------

    def full_state(self, model, *, trainable_only: bool) -> dict[str, torch.Tensor]:
        """Parameter name -> full tensor on CPU (gathered under FSDP2: every process must call
        this; only process 0 gets the tensors, the others an empty dict)."""
        module = unwrap(model)
        if self.mode == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not self.is_main:
                return {}
        else:
            full = {n: p.detach() for n, p in module.named_parameters()}
        wanted = {n for n, p in module.named_parameters() if p.requires_grad or not trainable_only}
        return {n: t.detach().cpu().contiguous().clone() for n, t in full.items() if n in wanted}

    def optimizer_state(self, model, optimizer) -> dict:
        """The optimizer's state_dict with full tensors, keyed by parameter index as torch's own
        (the same on any number of processes). Under FSDP2 every process must call this."""
        if self.mode != "fsdp2":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        module = unwrap(model)
        full = get_optimizer_state_dict(
            module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.is_main:
            return {}
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        index = {n: i for i, n in enumerate(names)}
        state = {index[n]: s for n, s in full["state"].items()}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        """Every process loads the full state (what optimizer_state returned); FSDP2 keeps its shard."""
        if self.mode != "fsdp2":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        module = unwrap(model)
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        full = {
            "state": {names[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
        }
        set_optimizer_state_dict(module, optimizer, full, options=StateDictOptions(full_state_dict=True))
