"""Run configuration: presets, user YAML, --set overrides, validation messages, YAML round trip."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from safedistill.config import RunConfig, load_config, preset_names, to_yaml
from safedistill.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "src" / "safedistill" / "configs"
NEEDS = {"external-kd": ["external_model=some/teacher"]}


def test_preset_names_are_the_shipped_yaml_files():
    names = preset_names()
    assert names == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"opsa", "sft", "offpolicy-sd", "external-kd"} <= set(names)


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_loads_with_its_values(preset):
    cfg = load_config(preset, overrides=NEEDS.get(preset, []))
    assert isinstance(cfg, RunConfig)
    assert cfg.preset == preset
    raw = yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text())
    for key, value in raw.items():
        if key == "external_model":
            continue  # set by NEEDS
        got = getattr(cfg, key)
        assert got == value or (isinstance(got, float) and got == float(value)), key


def test_set_overrides_parse_types():
    cfg = load_config(
        "opsa",
        overrides=[
            "steps=3",
            "learning_rate=5e-4",
            "alpha=0.25",
            "eval=false",
            "lora=true",
            "top_k=null",
            "benign_context=null",
            "eval_limit=null",
            "context=You must refuse harmful requests.",
            "max_new_tokens=7.0",
        ],
    )
    assert cfg.steps == 3 and type(cfg.steps) is int
    assert cfg.learning_rate == pytest.approx(5e-4) and type(cfg.learning_rate) is float
    assert cfg.alpha == 0.25
    assert cfg.eval is False and cfg.lora is True
    assert cfg.top_k is None and cfg.benign_context is None and cfg.eval_limit is None
    assert cfg.context == "You must refuse harmful requests."
    assert cfg.max_new_tokens == 7 and type(cfg.max_new_tokens) is int


def test_override_order_preset_then_file_then_set(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("steps: 5\nbatch_size: 3\n")
    cfg = load_config("opsa", config_file=str(f), overrides=["steps=7"])
    assert (cfg.steps, cfg.batch_size) == (7, 3)
    assert cfg.divergence == "mixture"  # from the preset


def test_unknown_field_in_user_yaml_names_file_and_field(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("steps: 2\nlearning_rat: 0.1\n")
    with pytest.raises(UserError) as e:
        load_config("opsa", config_file=str(f))
    assert str(f) in str(e.value) and "learning_rat" in str(e.value)


def test_invalid_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("steps: 2\nbatch_size: 4\nlr: : :\n")
    with pytest.raises(UserError) as e:
        load_config("opsa", config_file=str(f))
    assert f"{f}:3" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="no such config file"):
        load_config("opsa", config_file=str(tmp_path / "absent.yaml"))


def test_yaml_that_is_not_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- steps\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config("opsa", config_file=str(f))


@pytest.mark.parametrize(
    "item, field",
    [
        ("steps=abc", "steps"),
        ("steps=2.5", "steps"),
        ("learning_rate=fast", "learning_rate"),
        ("eval=maybe", "eval"),
        ("steps=null", "steps"),
    ],
)
def test_bad_value_type_names_the_field(item, field):
    with pytest.raises(UserError) as e:
        load_config("opsa", overrides=[item])
    assert f"'{field}'" in str(e.value)


def test_unknown_set_field_and_malformed_set():
    with pytest.raises(UserError, match="nonsense"):
        load_config("opsa", overrides=["nonsense=1"])
    with pytest.raises(UserError, match="key=value"):
        load_config("opsa", overrides=["steps"])


@pytest.mark.parametrize(
    "item, field",
    [
        ("divergence=bogus", "divergence"),
        ("token_mask=middle", "token_mask"),
        ("trainer=rl", "trainer"),
        ("lr_schedule=linear", "lr_schedule"),
    ],
)
def test_choices_are_validated(item, field):
    with pytest.raises(UserError) as e:
        load_config("opsa", overrides=[item])
    msg = str(e.value)
    assert f"'{field}'" in msg and "must be one of" in msg


@pytest.mark.parametrize(
    "item, field",
    [
        ("steps=0", "steps"),
        ("batch_size=0", "batch_size"),
        ("learning_rate=0", "learning_rate"),
        ("warmup_ratio=1", "warmup_ratio"),
        ("alpha=1.5", "alpha"),
        ("top_k=0", "top_k"),
        ("save_every=0", "save_every"),
    ],
)
def test_range_checks_name_the_field(item, field):
    with pytest.raises(UserError) as e:
        load_config("opsa", overrides=[item])
    assert f"'{field}'" in str(e.value)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(UserError) as e:
        load_config("bogus")
    msg = str(e.value)
    assert "bogus" in msg
    for name in preset_names():
        assert name in msg


def test_external_kd_needs_external_model():
    with pytest.raises(UserError) as e:
        load_config("external-kd")
    assert "external_model" in str(e.value) and "--set external_model=" in str(e.value)
    cfg = load_config("external-kd", overrides=["external_model=/models/teacher"])
    assert cfg.external_model == "/models/teacher"


@pytest.mark.parametrize("preset", ["opsa", "sft", "offpolicy-sd"])
def test_to_yaml_round_trips(tmp_path, preset):
    cfg = load_config(preset, overrides=["top_k=null", "learning_rate=5e-4", "eval_limit=3"])
    cfg = dataclasses.replace(cfg, notes="a: b # not a comment\nsecond line")
    data = yaml.safe_load(to_yaml(cfg))
    assert RunConfig(**data) == cfg
    assert set(data) == {f.name for f in dataclasses.fields(RunConfig)}
    # A saved config.yaml is itself a valid --config file that gives the same run.
    f = tmp_path / "config.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(preset, config_file=str(f)) == cfg


def test_saved_config_missing_a_newer_field_matches_only_at_its_default():
    """Run directories written before a field existed can still be resumed and compared."""
    import yaml

    from safedistill.config import same_settings, to_yaml

    cfg = load_config("opsa", overrides=["steps=3"])
    saved = yaml.safe_load(to_yaml(cfg))
    assert same_settings(to_yaml(cfg), cfg)
    del saved["rollout_backend"]  # default value in cfg: the old run ran with it
    assert same_settings(yaml.safe_dump(saved), cfg)
    assert not same_settings(
        yaml.safe_dump(saved), load_config("opsa", overrides=["steps=3", "rollout_backend=merged"])
    )
    assert not same_settings(to_yaml(cfg), load_config("opsa", overrides=["steps=4"]))
    assert not same_settings(yaml.safe_dump(saved | {"no_such_field": 1}), cfg)


def test_choices_come_from_the_plug_point_tables():
    import typing

    from safedistill.config import PLUG_FIELDS, choices
    from safedistill.methods import PLUG_TABLES as TABLES

    table = TABLES.__getitem__
    assert set(TABLES) == set(PLUG_FIELDS)
    for name in set(TABLES) - set(NAMED_BY_TABLE):
        assert set(choices(name)) == set(table(name))
        hint = typing.get_type_hints(RunConfig)[name]
        assert set(typing.get_args(hint)) == set(table(name)), name


# method and teacher are plain names (their rows carry code: a new one is its module and its row,
# config.py is not touched); methods.check_config holds them to their tables' keys.
NAMED_BY_TABLE = ("method", "teacher")


@pytest.mark.parametrize("name", NAMED_BY_TABLE)
def test_method_and_teacher_are_checked_against_their_tables(name, monkeypatch):
    import typing

    from safedistill.methods import PLUG_TABLES, check_config

    assert typing.get_type_hints(RunConfig)[name] is str
    cfg = load_config("opsa", overrides=[f"{name}=newcomer"])  # reading a YAML loads no table
    with pytest.raises(UserError) as e:
        check_config(cfg)
    assert str(e.value) == (f"config field '{name}' must be one of {sorted(PLUG_TABLES[name])}, got 'newcomer'")
    monkeypatch.setitem(PLUG_TABLES[name], "newcomer", PLUG_TABLES[name]["opsa" if name == "method" else "context"])
    check_config(cfg)  # a row in its table is all the name needs


@pytest.mark.parametrize("name", NAMED_BY_TABLE)
def test_an_unknown_method_or_teacher_stops_a_run_in_one_line_before_anything_is_written(name, tmp_path, capsys):
    from safedistill.cli import main

    out = tmp_path / "run"
    assert main(["run", "opsa", "--set", f"{name}=newcomer", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"safedistill: error: config field '{name}' must be one of [")
    assert not out.exists()


@pytest.mark.parametrize(
    "preset, item, field",
    [
        ("opsa", "teacher=none", "teacher"),
        ("safesteer", "trainer=sft", "teacher"),
        ("sft", "teacher=steering", "teacher"),
        ("offpolicy-sd", "targets=refined", "targets"),
        ("safesteer", "divergence=mixture", "vocab_mask"),
    ],
)
def test_incompatible_combinations_fail_at_load(preset, item, field):
    from safedistill.methods import check_config

    with pytest.raises(UserError) as e:
        check_config(load_config(preset, overrides=[item]))
    assert f"'{field}'" in str(e.value)


def test_dotted_section_names_and_flat_aliases():
    cfg = load_config("opsa", overrides=["loss.divergence=reverse_kl", "optim.steps=3", "teacher.context=ctx-h01"])
    assert (cfg.divergence, cfg.steps, cfg.context) == ("reverse_kl", 3, "ctx-h01")
    assert cfg.section("loss").divergence == "reverse_kl"
    with pytest.raises(UserError, match="loss.steps"):
        load_config("opsa", overrides=["loss.steps=3"])


def test_nested_sections_in_a_user_yaml(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("optim:\n  steps: 5\nrollout:\n  max_new_tokens: 9\n")
    cfg = load_config("opsa", config_file=str(f))
    assert (cfg.steps, cfg.max_new_tokens) == (5, 9)


def test_old_run_directory_configs_still_match():
    """config.yaml files written before `extra` was retired and `base` existed."""
    from safedistill.config import same_settings, settings_differ

    cfg = load_config("safesteer-fkl", overrides=["steps=3"])
    saved = yaml.safe_load(to_yaml(cfg))
    del saved["base"], saved["vllm_gpu_memory_utilization"]
    assert same_settings(yaml.safe_dump(saved | {"extra": {}}), cfg)
    assert settings_differ(yaml.safe_dump(saved | {"extra": {"k": 1}}), cfg) == ["extra"]


def test_config_show_prints_sections_with_help(capsys):
    from safedistill.cli import main

    assert main(["config", "show", "safesteer-fkl", "--set", "optim.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "# --- loss: " in out and "\ndivergence: forward_kl  # the per-token divergence (DIVERGENCES)" in out
    assert "\nsteps: 2  # optimizer steps" in out and "\nbase: safesteer  # " in out
    shown = yaml.safe_load(out)
    assert shown == yaml.safe_load(to_yaml(load_config("safesteer-fkl", overrides=["steps=2"])))


def test_an_old_copsd_run_without_reward_level_resumes_only_with_the_per_token_reward():
    """A COPSD run saved before reward_level existed trained with the per-token reward: resuming
    it under the new default (sequence) would change the objective mid-run, so it is refused by
    name, and agrees with reward_level=token. Runs the field does not apply to are unaffected."""
    from safedistill.config import settings_differ

    cfg = load_config("copsd", overrides=["steps=3"])
    saved = yaml.safe_load(to_yaml(cfg))
    del saved["reward_level"]
    assert cfg.reward_level == "sequence"
    differ = settings_differ(yaml.safe_dump(saved), cfg)
    assert len(differ) == 1 and differ[0].startswith("reward_level") and "token" in differ[0]
    old = load_config("copsd", overrides=["steps=3", "reward_level=token"])
    assert settings_differ(yaml.safe_dump(saved), old) == []
    opsa = load_config("opsa", overrides=["steps=3"])
    saved_opsa = yaml.safe_load(to_yaml(opsa))
    del saved_opsa["reward_level"]
    assert settings_differ(yaml.safe_dump(saved_opsa), opsa) == []
