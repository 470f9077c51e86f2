"""What one decode step of the default model costs by batch size (FastDecoder, fp32, the KV cache
of `--length` prefilled tokens, half the rows left-padded so the masked path runs), to size
the evaluation's and the context search's batches to the hardware. Run it under the CPU lock.

    python bench/decode_batch.py                      # batches 32,64,96,128 at cache length 160
    python bench/decode_batch.py --batches 64,128 --length 250 --profile

Prints the median ms per step (10 steps after 2 warm-up steps) and ms per row; --profile adds
torch.profiler's op table for each batch (matmuls against attention).
"""

from __future__ import annotations

import argparse
import time

import torch

from safedistill.engine.decode import FastDecoder
from safedistill.engine.scoring import returned_cache
from safedistill.models import load_model


class Steps:
    """Decode steps of `model` on a batch of `rows` random prompts of `length` tokens."""

    def __init__(self, model, rows: int, length: int):
        ids = torch.randint(100, 40000, (rows, length))
        self.attention = torch.ones(rows, length, dtype=torch.long)
        self.attention[: rows // 2, :20] = 0
        positions = (self.attention.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=self.attention, position_ids=positions, use_cache=True, logits_to_keep=1
            )
        self.fast = FastDecoder.of(model)
        self.fast.start(returned_cache(out), 24)
        self.token, self.pos = out.logits[:, -1].argmax(-1)[:, None], positions[:, -1:] + 1

    @torch.no_grad()
    def __call__(self) -> None:
        self.attention = torch.cat([self.attention, self.attention.new_ones(self.attention.size(0), 1)], 1)
        self.token = self.fast.step(self.token, self.pos, self.attention).argmax(-1)[:, None]
        self.pos = self.pos + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", default="32,64,96,128")
    ap.add_argument("--length", type=int, default=160, help="prefilled tokens per row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    model.eval()
    torch.manual_seed(0)
    for rows in (int(x) for x in args.batches.split(",")):
        step = Steps(model, rows, args.length)
        times = []
        for _ in range(12):
            began = time.perf_counter()
            step()
            times.append(time.perf_counter() - began)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))
        ms = sorted(times[2:])[len(times[2:]) // 2] * 1e3
        print(f"batch {rows}, cache {args.length}: {ms:.1f} ms per step, {ms / rows:.2f} ms per row", flush=True)


if __name__ == "__main__":
    main()
