"""The fast decode step (engine/decode.py) on a real model: the same tokens, and how much faster.

1. Greedy, batched as the evaluation decodes (left padding, shared-prefix cache): every token of
   rollout.generate with FastDecoder equals the transformers-forward loop's; sampled (T=1, same
   seed) too, since the logits are bit-identical.
2. Greedy, one prompt at a time: rollout.generate's tokens equal `model.generate`'s.
3. Time per decode step of both loops, per precision and batch size (run under the CPU lock).

    python bench/decode_check.py                      # smollm2-135m-instruct, fp32 checks, timings
    python bench/decode_check.py --prompts 8 --skip-timing
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safedistill.data.packaged import Manifest  # noqa: E402
from safedistill.engine import rollout  # noqa: E402
from safedistill.engine.rollout import SamplingSettings, generate, stop_token_ids  # noqa: E402
from safedistill.eval.evaluate import held_out  # noqa: E402
from safedistill.models import chat_text, load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@contextmanager
def transformers_loop():
    """Decode with the transformers forward at every step (the loop before FastDecoder)."""
    real = rollout.FastDecoder.of
    rollout.FastDecoder.of = staticmethod(lambda model: None)
    try:
        yield
    finally:
        rollout.FastDecoder.of = real


def eval_prompts(tok, n: int) -> list[str]:
    """Held-out AdvBench and the benign set, as the evaluation takes them."""
    manifest = Manifest()
    records = held_out("advbench", manifest, limit=n) + held_out("benign", manifest, limit=n)
    return [chat_text(tok, r.prompt) for r in records]


def ids_of(rollouts) -> list[list[int]]:
    return [r.response_ids for r in rollouts]


def batched_check(model, tok, prompts, max_new: int, batch: int) -> dict:
    out = {}
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        s = SamplingSettings(max_new_tokens=max_new, temperature=temperature, batch_size=batch, seed=7)
        fast = ids_of(generate(model, tok, prompts, s, progress=False)[0])
        with transformers_loop():
            slow = ids_of(generate(model, tok, prompts, s, progress=False)[0])
        same = sum(a == b for a, b in zip(fast, slow, strict=True))
        out[name] = {"prompts": len(prompts), "identical": same, "tokens": sum(len(a) for a in fast)}
    return out


def lora_check(model, tok, prompts, max_new: int, batch: int) -> dict:
    """The training rollout's case: a LoRA student (peft, B drawn at random as after training),
    sampled at the demo's temperature; the LoRA projections run inline in the fast step."""
    from safedistill.models import LoraSettings, add_lora

    student = add_lora(model, LoraSettings(r=16, alpha=32))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    student.eval()
    out = {}
    for name, temperature in (("greedy", 0.0), ("sampled_t0.6", 0.6)):
        s = SamplingSettings(max_new_tokens=max_new, temperature=temperature, batch_size=batch, seed=11)
        fast = ids_of(generate(student, tok, prompts, s, progress=False)[0])
        with transformers_loop():
            slow = ids_of(generate(student, tok, prompts, s, progress=False)[0])
        same = sum(a == b for a, b in zip(fast, slow, strict=True))
        out[name] = {"prompts": len(prompts), "identical": same, "tokens": sum(len(a) for a in fast)}
    student.unload()  # the plain model back, for the timings
    return out


def single_check(model, tok, prompts, max_new: int) -> dict:
    stops = stop_token_ids(tok, model)
    s = SamplingSettings(max_new_tokens=max_new, temperature=0.0, batch_size=1)
    same = tokens = 0
    for p in prompts:
        (r,), _ = generate(model, tok, [p], s, progress=False)
        ids = torch.tensor([r.prompt_ids])
        with torch.no_grad():
            ref = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tok.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        cut = next((k for k, t in enumerate(ref) if t in stops), len(ref))
        same += r.response_ids == ref[:cut]
        tokens += len(r.response_ids)
    return {"prompts": len(prompts), "identical": same, "tokens": tokens}


def step_time(model, tok, prompts, batch: int, max_new: int, fast: bool) -> dict:
    """Seconds per decoded position (all rows), best of two, with no early stop."""
    s = SamplingSettings(max_new_tokens=max_new, temperature=0.0, batch_size=batch)
    stops = rollout.stop_token_ids
    rollout.stop_token_ids = lambda tok, model=None: [-1]  # decode every position
    try:
        best = float("inf")
        for _ in range(2):
            if fast:
                _, stats = generate(model, tok, prompts[:batch], s, progress=False)
            else:
                with transformers_loop():
                    _, stats = generate(model, tok, prompts[:batch], s, progress=False)
            best = min(best, stats.seconds)
    finally:
        rollout.stop_token_ids = stops
    return {"seconds": best, "ms_per_step": 1000 * best / max_new}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=40, help="per source (AdvBench held-out, benign)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="the evaluation's batch size")
    parser.add_argument("--single", type=int, default=16, help="prompts checked against model.generate one by one")
    parser.add_argument("--timing", default="8,32", help="batch sizes to time ('' for none)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "decode-check-cpu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    prompts = eval_prompts(tok, args.prompts)
    result: dict = {"model": args.model, "threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens}
    result["batched_fp32"] = batched_check(model, tok, prompts, args.max_new_tokens, args.batch)
    result["single_fp32_vs_generate"] = single_check(model, tok, prompts[: args.single], args.max_new_tokens)
    result["lora_rollouts_fp32"] = lora_check(model, tok, prompts[:16], 48, 8)
    print(json.dumps(result, indent=1), flush=True)
    if not args.skip_timing and args.timing:
        result["timing"] = []
        for dtype in (torch.float32, torch.bfloat16):
            m = model.to(dtype)
            for batch in (int(b) for b in args.timing.split(",")):
                row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch}
                for name, fast in (("transformers", False), ("fast", True)):
                    row[name] = step_time(m, tok, prompts, batch, 48, fast)
                row["speedup"] = row["transformers"]["seconds"] / row["fast"]["seconds"]
                print(json.dumps(row), flush=True)
                result["timing"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
