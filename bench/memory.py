"""Peak memory of the default model's OPSA step (issue 22): weights dtype fp32 vs bf16, LoRA vs
full-parameter, gradient checkpointing off vs on; one fresh process per setting (CPU: resident set
size; CUDA: max allocated), and from those numbers the largest model that fits one 80 GB GPU.

Each process loads smollm2-135m-instruct as train() does (load dtype, LoRA or a frozen teacher
copy, trained parameters as fp32 master weights, gradient checkpointing), builds the OPSA step
(opsa preset: mixture divergence over the teacher's top-512, batch 8, 48 new tokens, contexts
ctx-h04 / ctx-b01 on 4 + 4 advbench / benign train prompts) and takes two optimizer steps. Step 1
allocates AdamW's state; step 2 is measured: its peak above the memory held when it started is the
step's transient (activations, logits, gradients, rollout KV cache).

    flock /tmp/safedistill-cpu.lock python bench/memory.py            # 8 settings, one process each
    python bench/memory.py --one fp32,lora,0                           # one setting (what each child runs)

Writes bench/results/memory-<device>.json; docs/performance.md ("Memory") has the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "bench" / "results"
SETTINGS = [(d, m, g) for d in ("fp32", "bf16") for m in ("lora", "full") for g in (0, 1)]
GIB = 2**30

# Shapes of the models the estimate is made for: (name, params, layers, hidden, vocab).
TARGETS = [
    ("Qwen2.5-0.5B", 0.49e9, 24, 896, 151936),
    ("Qwen2.5-1.5B", 1.54e9, 28, 1536, 151936),
    ("Qwen2.5-3B", 3.09e9, 36, 2048, 151936),
    ("Qwen2.5-7B", 7.62e9, 28, 3584, 152064),
    ("Llama-3.1-8B", 8.03e9, 32, 4096, 128256),
    ("Qwen2.5-14B", 14.7e9, 48, 5120, 152064),
    ("Qwen2.5-32B", 32.8e9, 64, 5120, 152064),
    ("Llama-3.1-70B", 70.6e9, 80, 8192, 128256),
]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(spec: str) -> dict:
    """One setting, in this process."""
    import torch

    from safedistill.config import load_config
    from safedistill.data.sources import load_prompts
    from safedistill.data.splits import split_records, take
    from safedistill.engine.memory import peak_memory_mb, reset_peak_memory
    from safedistill.eval.judging import load_judge
    from safedistill.models import LoraSettings, add_lora, load_model, load_options, prepare_student, resolve_device
    from safedistill.teachers import ContextTeacher, FrozenBase, Item
    from safedistill.teachers.context import context_text, load_contexts
    from safedistill.train import OnPolicyStep

    dtype, mode, ckpt = spec.split(",")
    lora = mode == "lora"
    overrides = [f"dtype={dtype}", f"lora={lora}", f"gradient_checkpointing={bool(int(ckpt))}", "context=ctx-h04"]
    overrides.append("diagnostics_every=0")  # the collapse probe is no part of the step
    cfg = load_config("opsa", overrides=overrides)
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    rss0 = rss_mib()
    model, tok = load_model(cfg.model, device=device, **load_options(cfg.section("model"), device))
    n_params = sum(p.numel() for p in model.parameters())
    if lora:
        model = add_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    library = load_contexts("builtin")
    contexts = {"harmful": context_text("ctx-h04", library), "benign": context_text(cfg.benign_context, library)}
    teacher = ContextTeacher(FrozenBase(model, share_weights=lora), tok, contexts)
    model = prepare_student(model, cfg.section("model"))
    step_fn = OnPolicyStep(cfg, tok, teacher, load_judge(cfg.judge))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    train_h, _ = split_records(load_prompts("advbench"), seed=0)
    train_b, _ = split_records(load_prompts("benign"), seed=0)
    items = [Item(r.id, r.prompt, "harmful") for r in take(train_h, 4, seed=0)]
    items += [Item(r.id, r.prompt, "benign") for r in take(train_b, 4, seed=0)]
    rss_model = rss_mib()
    figures = {}
    for step in range(2):
        reset_peak_memory(device)
        held = rss_mib() if device == "cpu" else torch.cuda.memory_allocated() / 2**20
        t0 = time.perf_counter()
        loss, info = step_fn(model, items, step, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak = peak_memory_mb(device)
        figures[step] = {"held_mib": held, "peak_mib": peak, "seconds": time.perf_counter() - t0, **info}
    last = figures[1]
    prompt_tokens = sum(len(tok(it.prompt)["input_ids"]) for it in items)  # rough: without the chat template
    return {
        "setting": spec,
        "dtype": dtype,
        "mode": mode,
        "gradient_checkpointing": bool(int(ckpt)),
        "device": device,
        "params": n_params,
        "trainable": sum(p.numel() for p in params),
        "rss_start_mib": rss0,
        "rss_model_mib": rss_model,
        "held_step2_mib": last["held_mib"],
        "peak_step2_mib": last["peak_mib"],
        "transient_step2_mib": last["peak_mib"] - last["held_mib"],
        "peak_step1_mib": figures[0]["peak_mib"],
        "response_tokens": last["tokens"],
        "prompt_tokens_approx": prompt_tokens,
        "seconds_step2": last["seconds"],
        "loss_step2": last["loss"],
    }


def estimate(rows: list[dict]) -> list[dict]:
    """Largest target that fits 80 GB (72 GB usable: CUDA context, allocator slack) per setting, from
    bytes per parameter (weights, teacher copy, fp32 master, grads, AdamW) and the measured
    transient per token, split into a vocabulary part (response tokens x V) and a layer part (all
    tokens x L x H): the layer part is what gradient checkpointing removes (measured as the
    difference), the rest is taken as the vocabulary part."""
    ref = {r["setting"]: r for r in rows}
    base_lh, base_v = 30 * 576, 49152
    out = []
    for r in rows:
        lora, bf16 = r["mode"] == "lora", r["dtype"] == "bf16"
        w = 2 if bf16 else 4
        # frozen weights (student base or teacher copy) + trained fp32 master + grads + AdamW moments
        bytes_per_param = w if lora else w + 4 + 4 + 8
        no_ckpt = ref[f"{r['dtype']},{r['mode']},0"]
        ckpt = ref[f"{r['dtype']},{r['mode']},1"]
        layer_part = max(no_ckpt["transient_step2_mib"] - ckpt["transient_step2_mib"], 0.0)
        vocab_part = ckpt["transient_step2_mib"]
        tokens = r["response_tokens"]
        per_tok_vocab = vocab_part * 2**20 / max(tokens, 1) / base_v  # bytes per response token per vocab entry
        per_tok_layer = layer_part * 2**20 / max(tokens, 1) / base_lh  # per response token per L*H (scaled as such)
        # The workload the estimate is for: 8 rollouts of 512 new tokens (the papers' length).
        workload = 8 * 512
        fits = []
        for name, n, layers, hidden, vocab in TARGETS:
            layers_kept = 2 if r["gradient_checkpointing"] else layers  # recomputed one layer at a time
            act = workload * (per_tok_vocab * vocab + per_tok_layer * layers_kept * hidden)
            adapters = n * r["trainable"] / r["params"] * 16 if lora else 0  # fp32 adapter, grad, AdamW
            total = n * bytes_per_param + act + adapters
            fits.append({"model": name, "gib": round(total / GIB, 1), "fits": total <= 72 * GIB})
        largest = next((f for f in reversed(fits) if f["fits"]), None)  # TARGETS grow in size
        out.append(
            {
                "setting": r["setting"],
                "bytes_per_param": bytes_per_param,
                "act_bytes_per_response_token_at_135m": round((vocab_part + layer_part) * 2**20 / max(tokens, 1)),
                "largest_fitting": largest["model"] if largest else "none",
                "targets": fits,
            }
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help="dtype,lora|full,0|1: run one setting in this process and print its JSON")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one)), flush=True)
        return 0
    rows = []
    for dtype, mode, ckpt in SETTINGS:
        spec = f"{dtype},{mode},{ckpt}"
        proc = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{spec}: failed\n{proc.stderr[-2000:]}", flush=True)
            return 1
        rows.append(json.loads(line[7:]))
        r = rows[-1]
        print(
            f"{spec}: start {r['rss_start_mib']:.0f} MiB, model {r['rss_model_mib']:.0f}, held {r['held_step2_mib']:.0f}, "
            f"peak {r['peak_step2_mib']:.0f} (transient {r['transient_step2_mib']:.0f}), "
            f"{r['response_tokens']} response tokens, {r['seconds_step2']:.1f} s",
            flush=True,
        )
    fits = estimate(rows)
    for f in fits:
        print(f"{f['setting']}: {f['bytes_per_param']} B/param, largest on 80 GB: {f['largest_fitting']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = rows[0]["device"]
    (RESULTS / f"memory-{device}.json").write_text(json.dumps({"runs": rows, "estimate": fits}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
