"""s/step and tokens/s of the OPSA trainer at 1 and N processes on the same global batch, with DDP
and FSDP2, and each process's peak memory: `safedistill run` itself under torchrun (no eval, a
fixed context), so the figures are the trainer's own (metrics.jsonl's step_seconds, tokens_per_s
over all processes), the first step a warm-up.

    python bench/scale.py --tiny                         # smoke run on a tiny random model (seconds)
    python bench/scale.py                                # smollm2-135m-instruct, batch 8, 48 new tokens
    python bench/scale.py --processes 1,2,4 --parallel ddp,fsdp2 --model DIR_OR_HF_ID --lora false

The CPU threads are shared: each of N processes gets cores / N threads (the 1-process run all of
them), so on a CPU the table shows the cost of splitting, not a speed-up; it is meant for GPUs
(one per process). Writes bench/results/scale-<device>[-tiny].json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(memory_dir: str, args: list[str]) -> int:
    """One process: `safedistill run ARGS`, then its peak memory to MEMORY_DIR/rank{N}.json."""
    import torch

    from safedistill import cli

    code = cli.main(args)
    peak = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    rank = os.environ.get("RANK", "0")
    Path(memory_dir, f"rank{rank}.json").write_text(json.dumps(peak))
    return code


def tiny_model(path: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_model, compact_tokenizer

    tok = compact_tokenizer()
    build_model("llama", tok, seed=0, max_position_embeddings=8192, initializer_range=0.2).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_sources(directory: Path) -> list[str]:
    """The tests' prompt files: a tiny run needs no benchmark download."""
    from helpers import write_sources

    harmful, benign = write_sources(directory)
    return [f"harmful_source={harmful}", f"benign_source={benign}", "n_harmful=6", "n_benign=4"]


def run_one(processes: int, parallel: str, settings: list[str], work: Path, threads: int) -> dict:
    out, memory = work / f"{parallel}-{processes}", work / f"{parallel}-{processes}-memory"
    memory.mkdir(parents=True)
    args = ["run", "opsa", "--out", str(out), "-q"]
    for item in [*settings, f"parallel={parallel}"]:
        args += ["--set", item]
    cmd = [sys.executable]
    if processes > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port())]
    cmd += [str(Path(__file__).resolve()), "--worker", str(memory), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{parallel} x {processes} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    peaks = [json.loads((memory / f"rank{r}.json").read_text()) for r in range(processes)]
    return {
        "processes": processes,
        "parallel": parallel,
        "threads_per_process": threads,
        "s_per_step": statistics.mean(r["step_seconds"] for r in timed),
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in timed),
        "t_rollout": statistics.mean(r["t_rollout"] for r in timed),
        "t_teacher": statistics.mean(r["t_teacher"] for r in timed),
        "t_student": statistics.mean(r["t_student"] for r in timed),
        "losses": [r["loss"] for r in rows],
        "peak_memory_mb": peaks,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2], sys.argv[3:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", default="1,2", help="comma-separated process counts")
    p.add_argument("--parallel", default="ddp,fsdp2", help="wrappers for the runs with more than one process")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (smoke run)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run; the first is a warm-up")
    p.add_argument("--batch", type=int, default=8, help="prompts per step, over all processes")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lora", default="true")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    counts = [int(x) for x in a.processes.split(",")]
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = tiny_model(work / "tiny") if a.tiny else a.model
        sources = tiny_sources(work / "data") if a.tiny else []
        settings = [
            *sources,
            f"model={model}",
            f"device={a.device}",
            f"steps={a.steps}",
            f"batch_size={a.batch}",
            f"max_new_tokens={a.max_new_tokens}",
            f"lora={a.lora}",
            "eval=false",
            "diagnostics_every=0",
            "context=ctx-h04",
            "temperature=1.0",
            f"save_every={a.steps}",
        ]
        if not a.tiny:
            settings += ["n_harmful=16", "n_benign=8"]
        results = []
        for n in counts:
            for parallel in ["none"] if n == 1 else a.parallel.split(","):
                threads = max(1, cores // n) if a.device == "cpu" else 1
                print(f"running {parallel} x {n} ...", file=sys.stderr, flush=True)
                results.append(run_one(n, parallel, settings, work, threads))
    device = "cuda" if a.device.startswith("cuda") else "cpu"
    path = ROOT / "bench" / "results" / f"scale-{device}{'-tiny' if a.tiny else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "tiny" if a.tiny else a.model, "batch": a.batch, "max_new_tokens": a.max_new_tokens}
    meta.update(steps=a.steps, lora=a.lora, device=a.device, cores=cores)
    path.write_text(json.dumps({"settings": meta, "runs": results}, indent=1) + "\n")
    print("| processes | parallel | s/step | tokens/s | rollout s | teacher s | student s | peak RSS MB per process |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rss = ", ".join(f"{m['max_rss_mb']:.0f}" for m in r["peak_memory_mb"])
        print(
            f"| {r['processes']} | {r['parallel']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['t_rollout']:.2f} | {r['t_teacher']:.2f} | {r['t_student']:.2f} | {rss} |"
        )
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
