"""SFT targets a model writes instead of scoring rollouts: another model (`external-kd`,
SafeChain-style) or the context-conditioned base model itself (`offpolicy-sd`, ThinkSafe-style),
generating on the training prompts; on harmful prompts only answers the judge calls safe are kept
(keep_only_safe). The SFT step then trains on them; a target cut at max_new_tokens is marked
`truncated` and gets no stop token (as Cross-SFT's answers), else SFT would teach the student to stop
mid-sentence where the generator's budget ran out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.schema import Demonstration
from ..engine.rollout import SamplingSettings, generate
from ..errors import UserError
from ..files import write_jsonl
from ..models import chat_text, load_model

if TYPE_CHECKING:
    from ..config import DataSettings, RolloutSettings

FILES = ("targets.jsonl",)  # in a run directory


def generated_targets(
    data: DataSettings,
    rollout: RolloutSettings,
    seed: int,
    model,
    tok,
    judge,
    items,
    contexts: dict,
    out: Path,
    *,
    progress: bool = True,
):
    """Generates once (sampled as the rollouts are) and writes targets.jsonl; a resumed run reads it back."""
    path = out / "targets.jsonl"
    if path.exists():
        return [Demonstration(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if data.targets == "external":
        gen_model, gen_tok = load_model(data.external_model, device=next(model.parameters()).device)
        texts = [chat_text(gen_tok, it.prompt) for it in items]
        source = f"external:{data.external_model}"
    else:
        gen_model, gen_tok = model, tok
        texts = [chat_text(tok, it.prompt, system=contexts.get(it.group)) for it in items]
        source = "teacher:context"
    settings = SamplingSettings.of_run(rollout, seed=seed)
    rollouts, _ = generate(gen_model, gen_tok, texts, settings, desc="targets", progress=progress)
    verdicts = judge([it.prompt for it in items], [r.text for r in rollouts])
    targets = []
    for it, r, v in zip(items, rollouts, verdicts, strict=True):
        keep = not data.keep_only_safe or it.group != "harmful" or v.safe_target
        if keep and r.text.strip():
            targets.append(Demonstration(it.prompt, r.text, it.id, None, source, it.group, truncated=not r.finished))
    if not targets:
        raise UserError("no generated target survived the judge; try another context or keep_only_safe=false")
    write_jsonl(path, [t.to_dict() for t in targets])
    return targets
