"""Methods are a table; a new one can be a preset alone (`sampled-opsa`, three lines over opsa)."""

import json
import math

from helpers import run_settings, write_sources
from safedistill.config import FIELDS, load_config
from safedistill.methods import METHODS
from safedistill.train import train


def test_every_preset_resolves_to_a_method():
    from safedistill.config import preset_names

    overrides = {"external-kd": ["external_model=x"]}
    names = {load_config(p, overrides=overrides.get(p, [])).method for p in preset_names()}
    assert names == set(METHODS)


def test_sampled_opsa_is_opsa_with_the_sampled_divergence_and_trains(tiny_dir, tmp_path):
    sampled, opsa = load_config("sampled-opsa"), load_config("opsa")
    assert sampled.method == "opsa" and sampled.base == "opsa"
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


def test_each_preset_names_its_method_and_old_run_dirs_agree_with_the_inferred_one():
    """`method:` is declared; a run directory saved before the field existed ran the method its
    (trainer, teacher | targets) named, so it still resumes (and a different method does not)."""
    import yaml

    from safedistill.config import preset_names, settings_differ, to_yaml

    overrides = {"external-kd": ["external_model=x"]}
    for preset in preset_names():
        cfg = load_config(preset, overrides=overrides.get(preset, []))
        saved = yaml.safe_load(to_yaml(cfg))
        del saved["method"]
        assert settings_differ(yaml.safe_dump(saved), cfg) == [], preset
    saved = yaml.safe_load(to_yaml(load_config("sft")))
    del saved["method"]
    differ = settings_differ(yaml.safe_dump(saved), load_config("dgr"))
    assert "method (added later; that run used method=sft)" in differ


def test_the_teacher_field_selects_the_class_through_its_row():
    import torch

    from conftest import compact_model, compact_tokenizer
    from safedistill.methods import make_teacher
    from safedistill.methods.base import Prepared
    from safedistill.teachers import ConstitutionTeacher, ContextTeacher, FrozenBase, SteeringTeacher

    tok = compact_tokenizer()
    base = FrozenBase(compact_model(tok), share_weights=False)
    inputs = {
        "context": ({"contexts": {"harmful": "Refuse.", "benign": None}}, ContextTeacher),
        "steering": ({"layer": 0, "vector": torch.zeros(32), "scale": 1.0}, SteeringTeacher),
        "constitution": ({"constitution": "Be safe.", "calibrated": None}, ConstitutionTeacher),
    }
    for name, (prepared, cls) in inputs.items():
        assert type(make_teacher(name, base, tok, Prepared(teacher=prepared))) is cls


def test_a_method_refuses_a_teacher_it_does_not_prepare_for():
    import pytest

    from safedistill.errors import UserError
    from safedistill.methods import check_config

    with pytest.raises(UserError, match="'teacher' needs layer, vector, scale, which method=opsa does not prepare"):
        check_config(load_config("opsa", overrides=["teacher=steering"]))
    with pytest.raises(UserError, match="'trainer' must be onpolicy for method=copsd"):
        check_config(load_config("copsd", overrides=["trainer=sft", "teacher=none", "targets=demonstrations"]))


def test_adding_a_teacher_is_a_class_and_a_table_row(tiny_dir, tmp_path, monkeypatch):
    """A newcomer's teacher (here: the context teacher reading only the harmful context, also on
    benign prompts) is one class and one TEACHERS row; OPSA prepares its contexts and the recipe
    builds it by name from `teacher:` (config.py is not touched: 2 files, and this test)."""
    from safedistill import train as recipe
    from safedistill.teachers import TEACHERS, ContextTeacher, TeacherKind

    class HarmfulContextEverywhere(ContextTeacher):
        def __init__(self, base, tok, *, contexts):
            super().__init__(base, tok, {"harmful": contexts["harmful"], "benign": contexts["harmful"]})

    monkeypatch.setitem(
        TEACHERS, "everywhere", TeacherKind("c_h on every prompt", True, (), HarmfulContextEverywhere, ("contexts",))
    )
    built = []
    real = recipe.OnPolicyStep.__init__

    def spy(self, cfg, tok, teacher, judge, **kw):
        built.append(teacher)
        real(self, cfg, tok, teacher, judge, **kw)

    monkeypatch.setattr(recipe.OnPolicyStep, "__init__", spy)
    sources = write_sources(tmp_path / "data")
    cfg = load_config("opsa", overrides=[*run_settings(tiny_dir, sources, steps=1), "teacher=everywhere"])
    train(cfg, tmp_path / "run", progress=False)
    (teacher,) = built
    assert type(teacher) is HarmfulContextEverywhere
    assert teacher.contexts["benign"] == teacher.contexts["harmful"] != ""


def test_a_run_dir_saved_before_method_existed_resumes(tiny_dir, tmp_path, monkeypatch):
    """An interrupted safesteer-context run whose config.yaml has no `method:` (written before the
    field existed: OPSA's preparation, inferred from teacher=context) resumes to the end."""
    import yaml

    from helpers import train_until_killed

    sources = write_sources(tmp_path / "data")
    settings = {"steps": 2, "rollouts_per_prompt": 2, "n_benign": 0, "steer_prompts": 3}
    settings |= {"safety_token_prompts": 2, "safety_tokens_k": 8, "diagnostics_every": 0}
    cfg = load_config("safesteer-context", overrides=run_settings(tiny_dir, sources, **settings))
    out = tmp_path / "run"
    train_until_killed(cfg, out, monkeypatch, at_call=2)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["method"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    train(cfg, out, resume=True, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_adding_a_method_with_its_own_step_is_a_module_and_a_row(tiny_dir, tmp_path, monkeypatch):
    """A newcomer's method (here: SFT on one fixed refusal per harmful training prompt, its own
    step writing refusals.json) is a prepare function and a METHODS row naming its sections, its
    files and its report section; train.py, report.py and config.py are not touched. (A real
    one adds a preset naming it.)"""
    from safedistill.data.schema import Demonstration
    from safedistill.files import write_json
    from safedistill.methods import Method, Prepared, prepared_files
    from safedistill.methods.base import training_items

    def prepare(s, data):
        items = [it for it in training_items(data, s.splits, s.seed) if it.group == "harmful"]
        targets = [Demonstration(it.prompt, "I can't help with that.", it.id) for it in items]
        write_json(s.out / "refusals.json", [t.id for t in targets])
        return Prepared(targets=targets)

    def section(out):
        return [f"## Fixed refusals: {len(json.loads((out / 'refusals.json').read_text()))}", ""]

    row = Method(
        "SFT on a fixed refusal", "sft", prepare, ("data",), (), ("demonstrations",), ("refusals.json",), (section,)
    )
    monkeypatch.setitem(METHODS, "refuse", row)
    assert "refusals.json" in prepared_files()
    sources = write_sources(tmp_path / "data")
    cfg = load_config("sft", overrides=[*run_settings(tiny_dir, sources, steps=1), "method=refuse"])
    train(cfg, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "refusals.json").read_text())  # its own step ran
    assert "## Fixed refusals: 4" in (tmp_path / "run" / "report.md").read_text()
