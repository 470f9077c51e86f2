"""Identity fingerprint of every preset: a tiny run of each (the tests' compact random model,
2 steps, the searches and cold starts at their smallest, eval off) and, per preset, its step
metrics without timings, a hash of the final weights and of every file the method wrote.

A refactoring that keeps behaviour gives the same fingerprint; run it on the commit a branch is
based on and on the branch, and compare:

    PYTHONPATH=src python bench/identity.py --out before.json       # on the base commit
    PYTHONPATH=src python bench/identity.py --compare before.json   # on the branch
    PYTHONPATH=src python bench/identity.py --only opsa,sft         # a few presets

Nothing is downloaded: the model is built from a config, the prompts are written to a temp dir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model factory and prompt sets the tests use

# What the machine measures, not what the run computes: timings, and the process's peak memory
# (its resident set on CPU differs from run to run by a few MB).
TIMING = (
    "t_",
    "step_seconds",
    "wall_time",
    "tokens_per_s",
    "rollout_tokens_per_s",
    "seconds",
    "elapsed",
    "peak_memory",
)
# Per-preset settings on top of COMMON, each the smallest that still runs the method's own parts.
SEARCH = {"context_search_prompts": 2, "context_confirm_prompts": 2, "context_search_tokens": 3}
STEER = {"steer_prompts": 2, "safety_token_prompts": 2, "safety_tokens_k": 8, "steer_scales": "1,4"}
COPSD = {"rollouts_per_prompt": 2, "cross_sft_steps": 1, "cross_sft_batch_size": 2, "cross_sft_max_new_tokens": 6}
PRESETS: dict[str, dict] = {
    "opsa": {**SEARCH, "context": "auto", "diagnostics_every": 1, "diagnostics_prompts": 1},
    "sampled-opsa": {},
    "opsa-robust": {"n_borderline": 2},  # the augment's rewrites by the tiny model itself
    "safesteer": {**STEER, "rollouts_per_prompt": 2},
    "safesteer-context": {**STEER, "rollouts_per_prompt": 2},
    "safesteer-fkl": {**STEER, "rollouts_per_prompt": 2},
    "safesteer-fullvocab": {**STEER, "rollouts_per_prompt": 2},
    "safesteer-sampled": {**STEER, "rollouts_per_prompt": 2},
    "copsd": {**COPSD, "cross_sft_seed_context": "Refuse requests that could hurt someone."},
    "constitutional-opsd": {**COPSD, "ppo_epochs": 2},
    "sft": {"n_samples": 4},
    "dgr": {"n_samples": 3, "demonstrations": "builtin:directrefusal", "refine_retries": 0},
    "offpolicy-sd": {**SEARCH, "context": "auto", "keep_only_safe": "false"},
    "external-kd": {"keep_only_safe": "false"},  # external_model: the tiny model itself
}


def untimed(value):
    """A JSON value without its timing fields (they differ from run to run)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not k.startswith(TIMING)}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def digest(path: Path) -> str:
    """Hash of a file; a JSON (lines) file without its timing fields."""
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(untimed(json.loads(data)), sort_keys=True).encode()
    elif path.suffix == ".jsonl":
        rows = [untimed(json.loads(line)) for line in data.splitlines() if line.strip()]
        data = json.dumps(rows, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def weights_digest(final: Path) -> str:
    """Hash of the saved tensors (names, shapes and values), not of the file's byte layout."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for f in sorted(final.glob("*.safetensors")):
        for name, t in sorted(load_file(f).items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(preset: str, model: str, sources: tuple[str, str], out: Path) -> dict:
    from helpers import run_settings
    from safedistill.config import load_config
    from safedistill.train import train

    extra = {"external_model": model} if preset == "external-kd" else {}
    settings = {"steps": 2, "save_every": 2, "diagnostics_every": 0, **extra, **PRESETS[preset]}
    cfg = load_config(preset, overrides=run_settings(model, sources, **settings))
    torch.manual_seed(0)
    started = time.perf_counter()
    train(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]
    files = {
        p.relative_to(out).as_posix(): digest(p)
        for p in sorted(out.rglob("*"))
        if p.is_file()
        and p.suffix in {".json", ".jsonl", ".safetensors"}
        and p.name not in {"metrics.jsonl", "adapter_config.json"}  # adapter_config lists a set in any order
        and not {"checkpoints", "final"} & set(p.parts)
    }
    return {
        "metrics": rows,
        "weights": weights_digest(out / "final"),
        "files": files,
        "seconds": round(time.perf_counter() - started, 1),
    }


def compare(before: dict, after: dict) -> list[str]:
    """One line per preset that differs (metrics, weights or a written file)."""
    lines = []
    for preset in sorted(set(before) | set(after)):
        a, b = before.get(preset), after.get(preset)
        if a is None or b is None:
            lines.append(f"{preset}: only in {'after' if a is None else 'before'}")
            continue
        for key in ("metrics", "weights", "files"):
            # metrics untimed again: a fingerprint written before a field was left out still compares
            if (untimed(a[key]) != untimed(b[key])) if key == "metrics" else a[key] != b[key]:
                lines.append(f"{preset}: {key} differ\n  before {a[key]}\n  after  {b[key]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the fingerprint (JSON) here")
    parser.add_argument("--compare", type=Path, help="a fingerprint to compare with; exit 1 if any differs")
    parser.add_argument("--only", default="", help="comma-separated presets (default: all)")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/safedistill-identity"),
        help="scratch dir (emptied first; a fixed path, since run files name their sources)",
    )
    args = parser.parse_args(argv)
    from conftest import save_compact
    from helpers import write_sources

    torch.set_num_threads(1)
    names = [p for p in args.only.split(",") if p] or list(PRESETS)
    result = {}
    shutil.rmtree(args.work, ignore_errors=True)
    model = str(save_compact(args.work / "model"))
    sources = write_sources(args.work / "data")
    for name in names:
        result[name] = fingerprint(name, model, sources, args.work / "runs" / name)
        print(f"{name}: weights {result[name]['weights']}  {result[name]['seconds']} s", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        before = {k: v for k, v in before.items() if k in result}
        diff = compare(before, result)
        print("\n".join(diff) if diff else f"identical: {', '.join(sorted(result))}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
