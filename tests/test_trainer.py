"""Training runs on a tiny random Llama (offline, a few steps each): metrics, checkpoints,
determinism, resume, every loss and mask, the SFT baselines and full-parameter training."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import HARMFUL, run_settings, train_until_killed, write_jsonl, write_sources
from safedistill import train as trainer_mod
from safedistill.config import load_config
from safedistill.errors import UserError
from safedistill.models import chat_text, load_model
from safedistill.train import OnPolicyStep, train


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("data"))


def make_cfg(model, sources, preset="opsa", **overrides):
    settings = {"batch_size": 3, "top_k": 64, **overrides}
    return load_config(preset, overrides=run_settings(model, sources, **settings))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def ref_run(tiny_dir, sources, tmp_path_factory):
    """opsa, 4 uninterrupted steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp("runs") / "ref"
    train(make_cfg(tiny_dir, sources), out, progress=False)
    return out


def test_opsa_run_trains_and_writes_its_files(ref_run):
    rows = metrics(ref_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in (
            "loss",
            "mean_kl",
            "masked_fraction",
            "rollout_length",
            "tokens_per_s",
            "wall_time",
        ):
            assert key in r and math.isfinite(r[key]), key
        assert r["masked_fraction"] == 1.0  # token_mask=all
        assert 0 < r["rollout_length"] <= 6 + 1  # max_new_tokens plus the stop token
    assert [r["wall_time"] for r in rows] == sorted(r["wall_time"] for r in rows)

    weights = adapter(ref_run)
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and len(weights) == 2 * len(lora_b)
    # LoRA's B matrices start at zero: any non-zero entry is a trained update.
    assert all(v.abs().sum() > 0 for v in lora_b.values())
    final = {p.name for p in (ref_run / "final").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= final
    assert not any(p.suffix in {".bin", ".pt", ".pth", ".pkl"} for p in ref_run.rglob("*"))

    ckpts = sorted((ref_run / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == [f"step-{i}" for i in (1, 2, 3, 4)]
    for ckpt in ckpts:
        files = list(ckpt.iterdir())
        assert files and all(f.suffix in {".safetensors", ".json"} for f in files), files
    # The last checkpoint holds the final weights.
    trainable = load_file(ckpts[-1] / "trainable.safetensors")
    assert {name.replace(".default", "") for name in trainable} == set(weights)
    for name, value in trainable.items():
        torch.testing.assert_close(value, weights[name.replace(".default", "")], atol=0, rtol=0)

    assert (ref_run / "config.yaml").exists() and (ref_run / "report.md").exists()
    assert (ref_run / "kl_by_position.png").exists()
    kl = json.loads((ref_run / "kl_by_position.json").read_text())
    assert len(kl) == 6 + 1 and kl[0] > 0


def test_same_seed_same_numbers_other_seed_differs(tiny_dir, sources, ref_run, tmp_path):
    again = tmp_path / "again"
    train(make_cfg(tiny_dir, sources), again, progress=False)
    assert [r["loss"] for r in metrics(again)] == [r["loss"] for r in metrics(ref_run)]
    assert [r["mean_kl"] for r in metrics(again)] == [r["mean_kl"] for r in metrics(ref_run)]
    a, b = adapter(ref_run), adapter(again)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    other = tmp_path / "seed1"
    train(make_cfg(tiny_dir, sources, seed=1), other, progress=False)
    assert [r["loss"] for r in metrics(other)] != [r["loss"] for r in metrics(ref_run)]
    c = adapter(other)
    assert any(not torch.allclose(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    "save_every, kill_at_call",
    [(1, 3), (2, 4)],
    ids=["killed-after-checkpoint", "killed-with-a-step-past-the-checkpoint"],
)
def test_resume_after_interrupt_matches_uninterrupted_run(
    tiny_dir,
    sources,
    ref_run,
    tmp_path,
    monkeypatch,
    save_every,
    kill_at_call,
):
    cfg = make_cfg(tiny_dir, sources, save_every=save_every)
    out = tmp_path / "killed"
    train_until_killed(cfg, out, monkeypatch, kill_at_call)
    assert len(metrics(out)) == kill_at_call - 1
    assert not (out / "final").exists()

    with pytest.raises(UserError, match="already holds a run"):
        train(cfg, out, progress=False)
    with pytest.raises(UserError, match="differs"):
        train(make_cfg(tiny_dir, sources, save_every=save_every, steps=5), out, resume=True)

    train(cfg, out, resume=True, progress=False)
    rows, ref_rows = metrics(out), metrics(ref_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r, ref in zip(rows, ref_rows, strict=True):
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-9)
    a, b = adapter(ref_run), adapter(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    kl_a = json.loads((ref_run / "kl_by_position.json").read_text())
    kl_b = json.loads((out / "kl_by_position.json").read_text())
    assert kl_b == pytest.approx(kl_a, rel=1e-5, abs=1e-9)


def test_resume_of_a_finished_run_changes_nothing(tiny_dir, sources, ref_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(ref_run, out)
    before = adapter(out)
    train(make_cfg(tiny_dir, sources), out, resume=True, progress=False)
    assert len(metrics(out)) == 4
    after = adapter(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "overrides",
    [
        {"divergence": "reverse_kl"},
        {"divergence": "forward_kl"},
        {"divergence": "jsd", "beta": 0.3},
        {"divergence": "mixture", "alpha": 0.7},
        {"divergence": "sampled"},
        {"divergence": "mixture", "top_k": "null"},
        {"token_mask": "first_k", "mask_k": 2},
        {"token_mask": "top_fraction", "mask_fraction": 0.2},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_every_divergence_and_token_mask_gives_a_finite_loss(
    tiny_dir,
    sources,
    tmp_path,
    overrides,
):
    cfg = make_cfg(tiny_dir, sources, steps=1, batch_size=4, **overrides)
    train(cfg, tmp_path / "run", progress=False)
    (row,) = metrics(tmp_path / "run")
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    if cfg.token_mask == "all":
        assert row["masked_fraction"] == 1.0
    else:
        assert 0 < row["masked_fraction"] < 1
    if cfg.divergence in {"reverse_kl", "forward_kl", "jsd", "mixture"}:
        assert row["loss"] >= 0
    if cfg.divergence == "reverse_kl" and cfg.token_mask == "all" and cfg.top_k is None:
        assert row["loss"] == pytest.approx(row["mean_kl"], rel=1e-5)


def test_first_k_mask_keeps_two_tokens_per_rollout(tiny_dir, sources, tmp_path):
    cfg = make_cfg(tiny_dir, sources, steps=1, batch_size=4, token_mask="first_k", mask_k=2, temperature=0)
    train(cfg, tmp_path / "run", progress=False)
    (row,) = metrics(tmp_path / "run")
    # masked fraction = sum(min(2, len)) / sum(len); all rollouts are longer than 2 here.
    assert row["rollout_length"] > 2
    assert row["masked_fraction"] == pytest.approx(2 / row["rollout_length"])


def test_sft_on_demonstrations_lowers_the_loss(tiny_dir, tmp_path):
    demo_rows = [
        {"prompt": HARMFUL[0], "response": "I'm sorry, but I can't help with that."},
        {"prompt": HARMFUL[1], "response": "I cannot assist with that request."},
        {"prompt": "What is the capital of France?", "response": "Paris."},
        {"prompt": "Write a poem about leaves.", "reasoning": "Autumn, short.", "response": "Leaves fall."},
    ]
    demos = write_jsonl(tmp_path / "demos.jsonl", demo_rows)
    cfg = load_config(
        "sft",
        overrides=[
            f"model={tiny_dir}",
            f"demonstrations={demos}",
            "batch_size=4",
            "steps=8",
            "learning_rate=1e-2",
            "lr_schedule=constant",
            "warmup_ratio=0",
            "lora_r=8",
            "eval=false",
            "save_every=8",
        ],
    )
    out = tmp_path / "sft"
    train(cfg, out, progress=False)
    rows = metrics(out)
    losses = [r["loss"] for r in rows]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.2, losses
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 6, losses
    assert rows[0]["tokens"] == rows[-1]["tokens"]  # the same four demonstrations every step

    # Step 1's loss (LoRA B starts at zero: the base model) is the token-averaged cross-entropy of
    # reasoning + response + end-of-turn after the chat prompt, and nothing else.
    model, tok = load_model(tiny_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    nll, n = 0.0, 0
    for d in demo_rows:
        prompt = tok(chat_text(tok, d["prompt"]), add_special_tokens=False)["input_ids"]
        text = (f"{d['reasoning']}\n\n" if "reasoning" in d else "") + d["response"]
        target = tok(text, add_special_tokens=False)["input_ids"] + [end]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0]
        pred = logits[len(prompt) - 1 : len(prompt) - 1 + len(target)]
        nll += torch.nn.functional.cross_entropy(pred, torch.tensor(target), reduction="sum").item()
        n += len(target)
    assert rows[0]["tokens"] == n
    assert rows[0]["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert not (out / "kl_by_position.json").exists()


@pytest.mark.parametrize("keep_only_safe", [False, True])
def test_offpolicy_sd_writes_its_targets(tiny_dir, sources, tmp_path, keep_only_safe):
    cfg = make_cfg(
        tiny_dir,
        sources,
        preset="offpolicy-sd",
        steps=1,
        batch_size=2,
        keep_only_safe=str(keep_only_safe).lower(),
        judge="keyword",  # the assertion below is about the keyword judge; the default judge calls gibberish off-topic
    )
    out = tmp_path / "offpolicy"
    train(cfg, out, progress=False)
    targets = [json.loads(line) for line in (out / "targets.jsonl").read_text().splitlines()]
    assert targets and all(t["response"].strip() for t in targets)
    assert all(t["source"] == "teacher:context" for t in targets)
    harmful = {p for p in HARMFUL}
    n_harmful = sum(t["prompt"] in harmful for t in targets)
    if keep_only_safe:
        # A random model never refuses, so the keyword judge drops every harmful-prompt target.
        assert n_harmful == 0 and len(targets) >= 1
    else:
        assert n_harmful >= 1
    assert len(metrics(out)) == 1


def test_offpolicy_sd_targets_cut_at_the_token_limit_get_no_stop_token(tiny_dir, sources, tmp_path):
    """A teacher answer cut by max_new_tokens did not end there: training it with a stop token
    would teach the student to stop mid-sentence (as Cross-SFT, which already left it out)."""
    from safedistill.data.schema import Demonstration
    from safedistill.engine.sft import SFTStep

    cfg = make_cfg(
        tiny_dir, sources, preset="offpolicy-sd", steps=1, batch_size=2, keep_only_safe="false", max_new_tokens=3
    )
    out = tmp_path / "offpolicy-cut"
    train(cfg, out, progress=False)
    targets = [Demonstration(**json.loads(line)) for line in (out / "targets.jsonl").read_text().splitlines()]
    _, tok = load_model(tiny_dir)
    step = SFTStep(tok)
    # A random model almost never emits its stop token within 3 tokens: the targets are cut.
    assert any(t.truncated for t in targets)
    for t in targets:
        ids = step.target_ids(t)
        assert (ids[-1] == step.stop) == (not t.truncated)
        assert len(ids) == len(tok(t.response, add_special_tokens=False)["input_ids"]) + (not t.truncated)


def test_full_parameter_training_keeps_a_frozen_teacher_copy(
    tiny_dir,
    sources,
    tmp_path,
    monkeypatch,
):
    teachers = []
    real_init = OnPolicyStep.__init__

    def spy_init(self, cfg, tok, teacher, judge):
        teachers.append(teacher)
        real_init(self, cfg, tok, teacher, judge)

    monkeypatch.setattr(trainer_mod.OnPolicyStep, "__init__", spy_init)
    cfg = make_cfg(tiny_dir, sources, steps=1, lora="false", learning_rate=1e-3)
    out = tmp_path / "full"
    train(cfg, out, progress=False)

    (teacher,) = teachers
    assert teacher.base.share is False
    original = load_file(Path(tiny_dir) / "model.safetensors")
    trained = load_file(out / "final" / "model.safetensors")
    frozen = dict(teacher.base.model.named_parameters())
    assert all(not p.requires_grad for p in frozen.values())
    changed = 0
    for name, value in original.items():
        torch.testing.assert_close(frozen[name].detach(), value, atol=0, rtol=0)
        changed += not torch.equal(trained[name], value)
    assert changed > len(original) // 2  # every parameter trains, the teacher's stay put
    assert not (out / "final" / "adapter_model.safetensors").exists()
    (row,) = metrics(out)
    assert math.isfinite(row["loss"])


def test_eval_items_follow_the_eval_seed_not_the_training_seed(tiny_dir, sources):
    """Base and trained models of every training seed answer the same eval items (issue 12)."""
    from safedistill.data.packaged import Manifest
    from safedistill.eval.evaluate import held_out

    def items(**overrides) -> list[str]:
        settings, held = trainer_mod.eval_settings(make_cfg(tiny_dir, sources, eval_limit=3, **overrides))
        taken = {"split_seed": held.split_seed, "limit": settings.eval_limit, "seed": settings.eval_seed}
        return [r.id for r in held_out(held.harmful, Manifest(), **taken)]

    assert trainer_mod.eval_settings(make_cfg(tiny_dir, sources, seed=1))[0].eval_seed == 0
    assert items(seed=0) == items(seed=1) == items(seed=7)
    assert items(eval_seed=1) != items(eval_seed=0)


def test_a_runs_evaluation_is_its_eval_section(tiny_dir, sources):
    """The evaluator takes the run's eval section itself (no copy filled by hand), and the
    sources and S its items are held out from follow the data and steering fields; eval.json's
    settings record (the base cache's key) holds every field that decides the evaluation."""
    import dataclasses

    from safedistill.config import EvalSection
    from safedistill.eval.evaluate import EvalSources, settings_record

    overrides = {"eval_limit": 7, "eval_seed": 3, "split_seed": 2, "capability": "arithmetic:4", "eval_axes": "safety"}
    overrides |= {"eval_overrefusal": "overrefusal", "eval_generalization": "past_tense", "judge": "keyword"}
    overrides |= {"eval_rephraser": "model", "steer_from": "runs/steer", "eval_batch_size": 5}
    cfg = make_cfg(tiny_dir, sources, **overrides)
    settings, held = trainer_mod.eval_settings(cfg)
    assert type(settings) is EvalSection and settings == cfg.section("eval")
    assert held == EvalSources(cfg.harmful_source, cfg.benign_source, cfg.split_seed, safety_tokens=cfg.steer_from)
    record = settings_record(settings, held)
    switches = {"eval", "diagnostics_every", "diagnostics_prompts"}  # the run's, not the evaluation's
    values = [getattr(settings, f.name) for f in dataclasses.fields(EvalSection) if f.name not in switches]
    values += dataclasses.astuple(held)
    assert sorted(map(repr, record.values())) == sorted(map(repr, values))  # each field once, none left out
    assert (record["limit"], record["seed"], record["batch_size"], record["safety_tokens"]) == (7, 3, 5, "runs/steer")
    assert cfg.batch_size == 3 and settings.eval_batch_size == 5  # the eval's batch is not the training batch


@pytest.mark.parametrize(
    "field, value",
    [("capability", "hellaswag:10,nonsense"), ("capability", "piqa:0"), ("eval_generalization", "future_tense")],
)
def test_bad_eval_fields_fail_at_config_time(tiny_dir, sources, field, value):
    from safedistill.methods import check_config

    with pytest.raises(UserError, match=f"'{field}'"):
        check_config(make_cfg(tiny_dir, sources, **{field: value}))
