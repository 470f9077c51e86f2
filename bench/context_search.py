"""What one step of OPSA's context search costs: the greedy answers of one context to a batch of
prompts (one batched decode sharing the context's KV prefix), at the sizes the search uses.

The weights are random, on the model's own config, tokenizer and chat template: the cost of a
decode does not depend on the weights, a random model never stops early (the worst case, and
close to the default model's answers of 24 tokens), and the real weights need not be loaded.

    python bench/context_search.py                       # smollm2-135m-instruct's shape, 2 threads
    python bench/context_search.py --model DIR --threads 4 --rows 12,24,36

Prints seconds per context for each batch size and the projected search: the ranking (every
harmful-side context on the ranking prompts) plus the confirmation (top 3 on the confirmation and
benign prompts) plus the two base passes. Run it under the shared CPU lock.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from safedistill.data.sources import load_prompts
from safedistill.data.splits import split_records
from safedistill.engine.rollout import SamplingSettings, generate
from safedistill.models import chat_text, load_tokenizer, resolve_model
from safedistill.teachers.context import load_contexts


def seconds_per_context(model, tok, prompts: list[str], contexts: list[str], tokens: int) -> float:
    settings = SamplingSettings(max_new_tokens=tokens, temperature=0.0, batch_size=len(prompts))
    times = []
    for ctx in contexts:
        texts = [chat_text(tok, p, system=ctx) for p in prompts]
        start = time.perf_counter()
        generate(model, tok, texts, settings, progress=False)
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias or directory (config and tokenizer)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24, help="context_search_tokens")
    ap.add_argument("--rank", type=int, default=24, help="context_search_prompts")
    ap.add_argument("--confirm", type=int, default=24, help="context_confirm_prompts")
    ap.add_argument("--repeats", type=int, default=3, help="contexts timed per batch size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tok = load_tokenizer(args.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    harmful = [r.prompt for r in split_records(load_prompts("advbench"), seed=0)[0]]
    benign = [r.prompt for r in split_records(load_prompts("benign"), seed=0)[0]]
    library = [c for c in load_contexts() if c.get("side", "harmful") == "harmful"]
    contexts = [c["text"] for c in library[: args.repeats]]
    n_benign = max(4, args.confirm // 2)
    sizes = {
        "old ranking (8 + 4)": harmful[:8] + benign[:4],
        f"ranking ({args.rank})": harmful[: args.rank],
        f"confirmation ({args.confirm} + {n_benign})": harmful[: args.confirm] + benign[:n_benign],
    }
    seconds = {}
    seconds_per_context(model, tok, harmful[:4], contexts[:1], args.tokens)  # warm-up
    for name, prompts in sizes.items():
        seconds[name] = seconds_per_context(model, tok, prompts, contexts, args.tokens)
        print(f"{name}: {seconds[name]:.2f} s per context")
    rank, confirm = seconds[f"ranking ({args.rank})"], seconds[f"confirmation ({args.confirm} + {n_benign})"]
    old = seconds["old ranking (8 + 4)"] * (len(library) + 1)
    new = rank * (len(library) + 2) + 3 * confirm
    print(f"projected search, {len(library)} contexts: {new:.0f} s (before the confirmation stage: {old:.0f} s)")


if __name__ == "__main__":
    main()
