"""Several training processes compute what one process computes (CPU, gloo, torchrun, a tiny
random model, fp32, temperature 1): DDP and FSDP2 against one process over 3 steps (losses,
gradient norms, final weights, evaluation; LoRA, and full-parameter under FSDP2 with the teacher
loaded and sharded), 5 prompts over 2 processes (uneven shards), a run
interrupted after step 2 and resumed on 2 processes (from 2 and from 1), and a NaN on one
process stopping both with exit 3. One torchrun launch trains all the 2-process runs (about
a minute on 2 cores); the NaN test is a second, short launch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_model, compact_tokenizer
from helpers import run_settings, train_until_killed, write_sources
from safedistill.config import load_config
from safedistill.engine.distributed import Processes, Shard
from safedistill.train import train

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
# fp32 on one machine: what differs between process counts is the order of float sums.
ATOL, RTOL = 1e-6, 1e-5
TIMING = ("step_seconds", "tokens_per_s", "rollout_tokens_per_s", "wall_time", "t_rollout", "t_teacher", "t_student")
# Evaluation figures computed from the weights (token entropies, the drift axis's ratio of two
# small divergences) carry the weights' float noise amplified; judgements and texts are exact.
EVAL_RTOL = 1e-3
EVAL = {"eval": True, "eval_limit": 1, "capability": "arithmetic:1", "eval_generalization": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "SAFEDISTILL_FAULT": ""}


def test_single_process_needs_no_process_group():
    procs = Processes("cpu")
    assert (procs.world, procs.rank, procs.is_main, procs.mode, procs.group) == (1, 0, True, "none", False)
    assert procs.shard([1, 2, 3]) == [1, 2, 3]
    assert procs.sum([2.0, 1.0]) == [2.0, 1.0] and not procs.any(False)


def test_shards_split_a_batch_deterministically_and_completely():
    procs = Processes("cpu")
    procs.world = 3
    shards = []
    for rank in range(3):
        procs.rank = rank
        shards.append(procs.shard(list(range(8))))
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert [s.positions for s in shards] == shards  # each item's place in the whole batch
    assert isinstance(shards[0], Shard)


def test_each_answer_samples_from_its_own_seed_whatever_the_batching(tiny_dir):
    """What makes N processes draw the rollouts one does: an answer's draws depend on its seed
    (rollout.item_seed of seed, step, global index) only, not on its batch or neighbours."""
    from safedistill.engine.rollout import SamplingSettings, generate, item_seed
    from safedistill.models import chat_text, load_model

    model, tok = load_model(tiny_dir, device="cpu")
    prompts = [chat_text(tok, p) for p in ("Write a poem.", "Explain photosynthesis step by step.", "Hi", "Paris?")]
    seeds = [item_seed(0, 3, i) for i in range(4)]

    def sample(index: list[int], batch_size: int) -> list[list[int]]:
        s = SamplingSettings(max_new_tokens=10, temperature=1.0, batch_size=batch_size, seeds=[seeds[i] for i in index])
        return [r.response_ids for r in generate(model, tok, [prompts[i] for i in index], s, progress=False)[0]]

    whole = sample([0, 1, 2, 3], 4)
    assert sample([0, 2], 2) + sample([1, 3], 1) == [whole[0], whole[2], whole[1], whole[3]]  # two "processes"
    assert sample([3, 2, 1, 0], 3) == whole[::-1]
    assert len({item_seed(0, 3, i) for i in range(100)} | {item_seed(0, 4, i) for i in range(100)}) == 200
    other = SamplingSettings(
        max_new_tokens=10, temperature=1.0, batch_size=4, seeds=[item_seed(1, 3, i) for i in range(4)]
    )
    assert [r.response_ids for r in generate(model, tok, prompts, other, progress=False)[0]] != whole


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A tiny model whose logits are far enough from uniform that the loss and its gradient are
    sizeable (init 0.2), the prompts, and the run settings every run here shares."""
    root = tmp_path_factory.mktemp("dist")
    tok = compact_tokenizer()
    model = build_model("llama", tok, seed=0, max_position_embeddings=8192, initializer_range=0.2)
    model.save_pretrained(root / "model", safe_serialization=True)
    tok.save_pretrained(root / "model")
    sources = write_sources(root / "data")
    base = run_settings(
        str(root / "model"),
        sources,
        steps=3,
        batch_size=4,
        max_new_tokens=8,
        temperature=1.0,
        top_k=64,
        save_every=2,
        learning_rate=1e-3,
        diagnostics_every=0,
        device="cpu",
        **EVAL,
    )
    return root, base


def one_process(overrides: list[str], out: Path) -> Path:
    torch.set_num_threads(1)
    train(load_config("opsa", overrides=overrides), out, progress=False)
    return out


def steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_numbers(out: Path, reference: Path) -> None:
    """Losses, gradient norms, the other step figures, final weights and evaluations equal."""
    ours, theirs = steps(out), steps(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [1, 2, 3]  # process 1 logged nothing
    for a, b in zip(ours, theirs, strict=True):
        assert a["tokens"] == b["tokens"] and a["loss_tokens"] == b["loss_tokens"], (a["step"], out.name)
        for key in ("loss", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=RTOL, abs=ATOL), (a["step"], key, out.name)
    lora = (reference / "final" / "adapter_model.safetensors").exists()
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    w, ref = load_file(out / "final" / weights), load_file(reference / "final" / weights)
    assert w.keys() == ref.keys() and w
    for k in w:
        torch.testing.assert_close(w[k], ref[k], atol=ATOL, rtol=RTOL, msg=f"{out.name}: {k}")
    rel = {
        key: max(abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(ours, theirs, strict=True))
        for key in ("loss", "grad_norm")
    }
    dw = max(float((w[k] - ref[k]).abs().max()) for k in w)
    print(f"{out.name}: loss rel {rel['loss']:.1e}, grad norm rel {rel['grad_norm']:.1e}, weights max abs {dw:.1e}")
    for name in ("eval_base.json", "eval_final.json"):
        # Judgements, counts and texts exactly; figures computed from the weights (the
        # expressiveness axis's token entropy) to the same tolerance as the weights.
        assert_close_tree(*(untimed(json.loads((d / name).read_text())) for d in (out, reference)), name)
    answers = [
        [json.loads(x)["response"] for x in (d / "generations_final.jsonl").read_text().splitlines()]
        for d in (out, reference)
    ]
    assert answers[0] == answers[1] and answers[0]


def assert_close_tree(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert a == pytest.approx(b, rel=EVAL_RTOL, abs=ATOL), where
    else:
        assert a == b, where


def untimed(obj):
    if isinstance(obj, dict):
        skip = (*TIMING, "timing", "seconds", "adapter", "model")
        return {k: untimed(v) for k, v in obj.items() if k not in skip}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def torchrun(plan: list[dict], tmp: Path) -> None:
    (tmp / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), str(TESTS / "ddp_worker.py"), "runs", str(tmp / "plan.json")]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


def test_two_processes_compute_what_one_does(setting, tmp_path, monkeypatch):
    root, base = setting
    # Gradient accumulation (DDP's no_sync, FSDP2's set_requires_gradient_sync) in two of them.
    uneven = [*base, "batch_size=5", "grad_accum=2"]
    full = [*base, "lora=false", "learning_rate=1e-4", "grad_accum=2"]  # the teacher: a second model, FSDP2 shards
    ref = one_process(base, tmp_path / "ref")
    ref_uneven = one_process(uneven, tmp_path / "ref-uneven")
    ref_full = one_process(full, tmp_path / "ref-full")
    # One process interrupted in step 3 (after step 2's checkpoint), to be resumed by two.
    calls = train_until_killed(load_config("opsa", overrides=base), tmp_path / "from-one", monkeypatch, at_call=3)
    assert len(calls) == 3 and (tmp_path / "from-one" / "checkpoints" / "step-2").is_dir()
    runs = {
        "ddp": base + ["parallel=ddp"],
        "fsdp2": base + ["parallel=fsdp2"],
        "uneven": uneven + ["parallel=auto"],  # auto: ddp under torchrun
        "full": full + ["parallel=fsdp2"],
        "killed": base + ["parallel=fsdp2"],  # its step-2 checkpoint gathered from FSDP2 shards
    }
    plan = [{"out": str(tmp_path / name), "overrides": o, "resume": False} for name, o in runs.items()]
    plan[-1]["interrupt_at_call"] = 3
    # Checkpoints hold full tensors: FSDP2's resumes under DDP, one process's under FSDP2.
    plan.append({"out": str(tmp_path / "killed"), "overrides": base + ["parallel=ddp"], "resume": True})
    plan.append({"out": str(tmp_path / "from-one"), "overrides": base + ["parallel=fsdp2"], "resume": True})
    torchrun(plan, tmp_path)

    for name in ("ddp", "fsdp2", "killed", "from-one"):
        assert_same_numbers(tmp_path / name, ref)
    assert_same_numbers(tmp_path / "uneven", ref_uneven)
    assert_same_numbers(tmp_path / "full", ref_full)
    assert any(
        v.abs().max() > 1e-3 for k, v in load_file(ref / "final/adapter_model.safetensors").items() if "lora_B" in k
    )

    # Each process trained on its own share: 5 prompts split 3 + 2.
    seen = [json.loads((tmp_path / "uneven" / f"seen-rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(s) for s in seen[0]] == [3] * 6 and [len(s) for s in seen[1]] == [2] * 6
    assert all(a != b for a, b in zip(*seen, strict=True))
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-2", "step-3"]
    # The uneven shards are what the global token count is for: a mean of per-process means differs.
    rows = steps(tmp_path / "uneven")
    assert rows[0]["loss_tokens"] == 5 * 8


def test_a_nan_on_one_process_stops_both_with_exit_3(setting, tmp_path):
    root, base = setting
    out = tmp_path / "run"
    args = ["run", "opsa", "--out", str(out), "-q"]
    for item in [*base, "eval=false", "save_every=1", "steps=4"]:
        args += ["--set", item]
    port = free_port()
    procs = []
    for rank in (0, 1):
        rank_env = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, str(TESTS / "ddp_worker.py"), "cli", "1", "2", *args]
        procs.append(subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ended: dict[int, float] = {}
    deadline = time.time() + 600
    while len(ended) < 2 and time.time() < deadline:
        for rank, p in enumerate(procs):
            if rank not in ended and p.poll() is not None:
                ended[rank] = time.time()
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    errs = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], errs[0][-2000:] + errs[1][-2000:]
    nan_at = float((tmp_path / "nan-at.txt").read_text())
    print(f"both processes exited {max(ended.values()) - nan_at:.1f} s after the NaN")
    assert max(ended.values()) - nan_at < 30
    assert "training diverged at step 2" in errs[0] and "non-finite on another process" in errs[0]
    assert "training diverged at step 2: the loss is nan" in errs[1]
    for ckpt in (out / "checkpoints").iterdir():
        for name, tensor in load_file(ckpt / "trainable.safetensors").items():
            assert tensor.isfinite().all(), (ckpt.name, name)
    assert steps(out)[-1] == {"step": 2, "diverged": "the loss is non-finite on another process"}
    assert not (out / "checkpoints" / "step-2").exists() and not (out / "final").exists()


def test_parallel_none_under_a_launcher_is_refused(monkeypatch):
    from safedistill.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="parallel"):
        Processes("cpu", "none")


def test_merged_rollouts_are_refused_under_fsdp2():
    from safedistill.errors import UserError

    with pytest.raises(UserError, match="rollout_backend.*fsdp2"):
        load_config("opsa", overrides=["parallel=fsdp2", "rollout_backend=merged"])


def test_resume_before_the_first_checkpoint_redoes_the_logged_steps(tiny_dir, tmp_path, monkeypatch):
    """Steps logged but never checkpointed are dropped from metrics.jsonl and redone from step 1."""
    cfg = load_config("opsa", overrides=run_settings(tiny_dir, write_sources(tmp_path / "data"), steps=3, save_every=3))
    train_until_killed(cfg, tmp_path / "run", monkeypatch, at_call=3)
    assert [r["step"] for r in steps(tmp_path / "run")] == [1, 2]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    torch.set_num_threads(1)
    train(cfg, tmp_path / "run", resume=True, progress=False)
    assert [r["step"] for r in steps(tmp_path / "run")] == [1, 2, 3]
