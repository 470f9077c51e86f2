"""Built-in external safety data sets for DGR and the SFT baseline, written by this project.

The harmful prompts come from a packaged benchmark at run time, so each set is a template file
(`builtin/<name>.json`) instantiated over the TRAIN split of the harmful source: the prompts the
evaluation holds out never appear. Every choice is a hash of the prompt id, so a set is the same on
every machine.

- `directrefusal` (DirectRefusal-style): a short, direct refusal.
- `r1act` (R1-ACT-style): reasoning in three steps (understand the request, assess the harm, decide
  how to respond), then a refusal.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

from ..files import sha256_bytes
from .packaged import Manifest
from .schema import Demonstration, PromptRecord
from .splits import split_records

EXTERNAL_SETS = ("directrefusal", "r1act")


def _pick(options: list[str], key: str) -> str:
    digest = hashlib.sha256(key.encode()).digest()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


def _request(prompt: str) -> str:
    """'Write a tutorial on X.' -> 'write a tutorial on X' (to follow 'the user wants me to')."""
    text = prompt.strip().rstrip(".!?").strip()
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _assessment(spec: dict, record: PromptRecord) -> str:
    prompt = record.prompt.lower()
    for harm in spec["assess"]:
        if not harm["keywords"] or any(k in prompt for k in harm["keywords"]):
            return _pick(harm["text"], f"assess:{record.id}")
    raise ValueError("r1act.json needs a catch-all assessment with no keywords")


def instantiate(name: str, spec: dict, records: list[PromptRecord]) -> list[Demonstration]:
    out = []
    for r in records:
        reasoning = None
        if name == "r1act":
            reasoning = "\n".join(
                [
                    _pick(spec["understand"], f"understand:{r.id}").replace("{request}", _request(r.prompt)),
                    _assessment(spec, r),
                    _pick(spec["respond"], f"respond:{r.id}"),
                ]
            )
        response = _pick(spec["responses"], f"response:{r.id}")
        out.append(Demonstration(r.prompt, response, f"{name}-{r.id}", reasoning, f"builtin:{name}"))
    return out


def external_set(
    name: str, harmful: list[PromptRecord], *, split_seed: int = 0, manifest: Manifest | None = None
) -> list[Demonstration]:
    """Built-in set `name` over the train side of `harmful` (split as the evaluation splits it)."""
    data = resources.files("safedistill.data").joinpath("builtin", f"{name}.json").read_bytes()
    train, _ = split_records(harmful, seed=split_seed)
    out = instantiate(name, json.loads(data), train)
    if manifest is not None:
        manifest.add(f"builtin:{name}", "safedistill (built-in)", f"{name}.json", sha256_bytes(data), len(out))
    return out
