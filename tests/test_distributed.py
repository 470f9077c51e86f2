"""Two training processes on CPU (gloo) through torchrun + accelerate end with identical weights;
only process 0 writes the run directory; one process keeps its behaviour (test_trainer.py)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import run_settings, write_sources
from safedistill.engine.distributed import Processes

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_needs_no_process_group():
    procs = Processes("cpu")
    assert (procs.world, procs.rank, procs.is_main, procs.accelerator) == (1, 0, True, None)
    assert procs.shard([1, 2, 3]) == [1, 2, 3]


def test_shards_split_a_batch_deterministically_and_completely():
    procs = Processes("cpu")
    procs.world = 3
    shards = []
    for rank in range(3):
        procs.rank = rank
        shards.append(procs.shard(list(range(8))))
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5]]


def test_two_cpu_processes_train_to_identical_weights(tiny_dir, tmp_path):
    harmful, benign = write_sources(tmp_path / "data")
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    dumps.mkdir()
    settings = run_settings(tiny_dir, (harmful, benign), steps=3, batch_size=4, top_k=64, save_every=2, device="cpu")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(TESTS / "ddp_worker.py"),
        str(out),
        str(dumps),
        *settings,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    seen = [json.loads((dumps / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3
    for a, b in zip(*seen, strict=True):  # each step's batch of 4 split 2 + 2, no prompt twice
        assert len(a) == len(b) == 2 and not set(a) & set(b)
    rank0, rank1 = load_file(dumps / "rank0.safetensors"), load_file(dumps / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)  # trained (B starts at zero)
    saved = load_file(out / "final" / "adapter_model.safetensors")
    for k in saved:
        assert torch.equal(saved[k], rank0[k]), k

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one row per step: process 1 wrote nothing
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
