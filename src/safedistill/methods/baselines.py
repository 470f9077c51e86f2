"""Targets for the SFT-style baselines.

- `sft`: external safety demonstrations (built-in set written by this project, or a JSONL file);
  with `demonstrations` and `n_samples` equal to a `dgr` run's, it is that run's baseline.
- `offpolicy-sd` (ThinkSafe-style): the context-conditioned base model's own generations on the
  same prompts as OPSA, kept on harmful prompts only where the judge calls them safe.
- `external-kd` (SafeChain-style): another model's generations on the same prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..data.schema import Demonstration
from ..data.sources import load_demonstrations
from ..errors import UserError
from ..files import write_jsonl
from ..models import chat_text, load_model
from ..rollout import SamplingSettings, generate


def demonstration_targets(cfg, manifest) -> list[Demonstration]:
    """cfg.demonstrations, limited to n_samples by a seeded shuffle (so 10 samples are a subset of 30)."""
    demos = load_demonstrations(
        cfg.demonstrations, manifest, harmful_source=cfg.harmful_source, split_seed=cfg.split_seed
    )
    return subset(demos, cfg.n_samples, cfg.seed)


def subset(demos: list[Demonstration], n: int | None, seed: int) -> list[Demonstration]:
    """At most n demonstrations by a seeded shuffle: for one seed, the first 10 are among the first 30."""
    if n is None:
        return list(demos)
    demos = list(demos)
    random.Random(seed).shuffle(demos)
    return demos[:n]


def generated_targets(cfg, model, tok, judge, items, contexts: dict, out: Path, *, progress: bool = True):
    """Generates once and writes targets.jsonl; a resumed run reads it back."""
    path = out / "targets.jsonl"
    if path.exists():
        return [Demonstration(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if cfg.targets == "external":
        gen_model, gen_tok = load_model(cfg.external_model, device=next(model.parameters()).device)
        texts = [chat_text(gen_tok, it.prompt) for it in items]
        source = f"external:{cfg.external_model}"
    else:
        gen_model, gen_tok = model, tok
        texts = [chat_text(tok, it.prompt, system=contexts.get(it.group)) for it in items]
        source = "teacher:context"
    settings = SamplingSettings(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
    )
    rollouts, _ = generate(gen_model, gen_tok, texts, settings, desc="targets", progress=progress)
    verdicts = judge([it.prompt for it in items], [r.text for r in rollouts])
    targets = []
    for it, r, v in zip(items, rollouts, verdicts, strict=True):
        keep = not cfg.keep_only_safe or it.group != "harmful" or v.label == "safe"
        if keep and r.text.strip():
            targets.append(Demonstration(it.prompt, r.text, it.id, None, source))
    if not targets:
        raise UserError("no generated target survived the judge; try another context or keep_only_safe=false")
    write_jsonl(path, [t.to_dict() for t in targets])
    return targets
