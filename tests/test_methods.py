"""Methods are a table; a new one can be a preset alone (`sampled-opsa`, three lines over opsa)."""

import json
import math

from helpers import run_settings, write_sources
from safedistill.config import FIELDS, load_config
from safedistill.methods import METHODS, method_name
from safedistill.train import train


def test_every_preset_resolves_to_a_method():
    from safedistill.config import preset_names

    overrides = {"external-kd": ["external_model=x"]}
    names = {method_name(load_config(p, overrides=overrides.get(p, []))) for p in preset_names()}
    assert names == set(METHODS)


def test_sampled_opsa_is_opsa_with_the_sampled_divergence_and_trains(tiny_dir, tmp_path):
    sampled, opsa = load_config("sampled-opsa"), load_config("opsa")
    assert method_name(sampled) == "opsa" and sampled.base == "opsa"
    assert {k for k in FIELDS if getattr(sampled, k) != getattr(opsa, k)} == {"preset", "base", "divergence"}
    sources = write_sources(tmp_path / "data")
    cfg = load_config("sampled-opsa", overrides=run_settings(tiny_dir, sources, steps=2, diagnostics_every=0))
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert "divergence: sampled" in (tmp_path / "run" / "config.yaml").read_text()


def test_every_teacher_kind_follows_the_protocol():
    import torch

    from conftest import compact_model, compact_tokenizer
    from safedistill.teachers import (
        ConstitutionTeacher,
        ContextTeacher,
        FrozenBase,
        PromptedTeacher,
        SteeringTeacher,
        Teacher,
    )

    tok = compact_tokenizer()
    base = FrozenBase(compact_model(tok), share_weights=False)
    context = ContextTeacher(base, tok, {"harmful": "Refuse.", "benign": None})
    constitution = ConstitutionTeacher(base, tok, "Be safe.", reference="original")
    steering = SteeringTeacher(base, tok, layer=0, vector=torch.zeros(32))
    assert all(isinstance(t, Teacher) for t in (context, constitution, steering))
    assert isinstance(context, PromptedTeacher) and isinstance(constitution, PromptedTeacher)
    assert not isinstance(steering, PromptedTeacher)  # reads the student's prompt
    assert context.reference is base and steering.reference is base and constitution.reference == "original"
