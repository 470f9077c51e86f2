"""Measured matmul peak (fp32 and bf16) of this machine, and each training phase's achieved
FLOP/s as a fraction of it.

Model FLOPs: 2N per token for a forward pass, 6N per token for forward + backward, N the
parameters that take part in matrix multiplies (every Linear, the output projection included;
the input embedding lookup is free). With LoRA the frozen weights need no weight gradients, so
the work actually done in a student step is nearer 4N per token; both fractions are printed.

Decoding is not FLOP-bound: each decode step reads every weight once for a handful of tokens, so
the rollout is rated against the weight-read floor instead (max_new_tokens steps x the weights'
bytes / the measured rate at which a batch-8 matmul streams a matrix too big for the caches).

    python bench/peak.py                      # peaks only
    python bench/peak.py --step bench/results/step-cpu.json   # plus the phases of a step.py run

Device auto-detected (CUDA when available). Writes bench/results/peak-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SHAPES = [(2048, 2048, 2048), (1024, 1024, 1024), (800, 576, 1536), (800, 1536, 576), (800, 576, 49152)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fastest_matmul(a: torch.Tensor, b: torch.Tensor, device: str, seconds: float) -> float:
    """Shortest time of a @ b, repeated for about `seconds` after a warm-up."""
    for _ in range(3):
        a @ b
    sync(device)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        dt = time.perf_counter() - t0
        spent += dt
        best = min(best, dt)
    return best


def matmul_flops(m: int, k: int, n: int, dtype: torch.dtype, device: str, seconds: float = 1.0) -> float:
    """Best-of FLOP/s of a [m,k]@[k,n] matmul."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    return 2 * m * k * n / fastest_matmul(a, b, device, seconds)


def weight_stream_rate(dtype: torch.dtype, device: str, seconds: float = 1.0, mbytes: int = 512) -> float:
    """Best-of bytes/s at which a batch-8 matmul reads a weight matrix too big for any cache: the
    regime of a decode step, whose time is the weights' bytes over this rate, not its FLOPs."""
    k = 576
    n = mbytes * 2**20 // (k * torch.finfo(dtype).bits // 8)
    w = torch.randn(k, n, device=device).to(dtype)
    x = torch.randn(8, k, device=device).to(dtype)
    return w.numel() * w.element_size() / fastest_matmul(x, w, device, seconds)


def measure_peaks(device: str, seconds: float) -> dict:
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        per_shape = {f"{m}x{k}x{n}": matmul_flops(m, k, n, dtype, device, seconds) for m, k, n in SHAPES}
        out[name] = {
            "peak_flops": max(per_shape.values()),
            "by_shape": per_shape,
            "weight_bytes_per_s": weight_stream_rate(dtype, device, seconds),
        }
    return out


def phase_fractions(step: dict, peaks: dict) -> list[dict]:
    """Per (trainer, phase) of a step.py result: achieved FLOP/s and its fraction of the peak."""
    rows = []
    n = step["settings"]["matmul_params"]
    for run in step["runs"]:
        precision = run.get("precision", "fp32")
        peak = peaks[precision]["peak_flops"]
        for phase, factor, lora_factor in (("rollout", 2, 2), ("teacher", 2, 2), ("student", 6, 4)):
            seconds, tokens = run["phases"].get(f"t_{phase}"), run["phases"].get(f"tokens_{phase}")
            if not seconds or not tokens:
                continue
            achieved = factor * n * tokens / seconds
            real = (lora_factor if step["settings"]["lora"] else factor) * n * tokens / seconds
            row = {}
            if phase == "rollout":
                # Every decode step reads all weights once; the longest response sets the steps.
                steps = step["settings"]["max_new_tokens"]
                nbytes = n * (2 if precision == "bf16" else 4)
                floor = steps * nbytes / peaks[precision]["weight_bytes_per_s"]
                row = {"weight_read_floor_seconds": floor, "fraction_of_weight_read_floor": floor / seconds}
            rows.append(
                {
                    **row,
                    "trainer": run["name"],
                    "precision": precision,
                    "phase": phase,
                    "tokens": tokens,
                    "seconds": seconds,
                    "model_flops_per_s": achieved,
                    "fraction_of_peak": achieved / peak,
                    "fraction_of_peak_work_done": real / peak,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per matmul shape")
    parser.add_argument("--step", default=None, help="a bench/step.py JSON result to rate against the peaks")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = measure_peaks(device, args.seconds)
    label = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {label}")
    print(f"{'precision':<10}{'peak GFLOP/s':>14}{'weights GB/s':>14}   best shape")
    for name, p in peaks.items():
        shape = max(p["by_shape"], key=p["by_shape"].get)
        print(f"{name:<10}{p['peak_flops'] / 1e9:>14.1f}{p['weight_bytes_per_s'] / 1e9:>14.1f}   {shape}")
    result = {"device": label, "threads": torch.get_num_threads(), "peaks": peaks}
    if args.step:
        step = json.loads(Path(args.step).read_text())
        rows = phase_fractions(step, peaks)
        result["phases"] = rows
        print(f"\nphases of {args.step} (N = {step['settings']['matmul_params'] / 1e6:.1f}M matmul parameters)")
        print(
            f"{'trainer':<32}{'phase':<9}{'prec':<6}{'GFLOP/s':>9}{'of peak':>9}{'(work done)':>13}"
            f"{'read floor s':>14}{'of floor':>10}"
        )
        for r in rows:
            floor = r.get("weight_read_floor_seconds")
            tail = f"{floor:>14.2f}{r['fraction_of_weight_read_floor']:>10.1%}" if floor else ""
            print(
                f"{r['trainer']:<32}{r['phase']:<9}{r['precision']:<6}{r['model_flops_per_s'] / 1e9:>9.1f}"
                f"{r['fraction_of_peak']:>9.1%}{r['fraction_of_peak_work_done']:>13.1%}{tail}"
            )
    out = Path(args.out) if args.out else RESULTS / f"peak-{'cuda' if device.startswith('cuda') else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
