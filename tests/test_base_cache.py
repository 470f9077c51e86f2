"""The base model evaluated once (issue 26): a second run on the same model, settings, items,
judge and code reuses the first run's base evaluation and says so; any change of those inputs
misses; `safedistill cache clear` empties the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_compact
from helpers import run_settings, write_jsonl, write_sources
from safedistill.cli import main
from safedistill.config import EvalSection, load_config
from safedistill.eval import base_cache
from safedistill.eval.evaluate import EvalSources
from safedistill.eval.judging import load_judge
from safedistill.models import load_model
from safedistill.train import train


@pytest.fixture
def sources(tmp_path):
    return write_sources(tmp_path / "data")


def run_cfg(model: str, sources, **overrides):
    settings = run_settings(model, sources, steps=1, eval=True, eval_limit=2, capability="arithmetic:2", **overrides)
    return load_config("opsa", overrides=settings)


def test_second_run_reuses_the_base_evaluation_and_trains_the_same(isolated_cache, tiny_dir, sources, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train(run_cfg(tiny_dir, sources), first, progress=False)
    assert not (first / base_cache.REUSED).exists()
    assert len(list(base_cache.entries_dir().iterdir())) == 1
    train(run_cfg(tiny_dir, sources), second, progress=False)

    note = json.loads((second / base_cache.REUSED).read_text())
    assert Path(note["cache"]).parent == base_cache.entries_dir()
    assert note["origin"] == str(first.resolve())
    assert "reused from the cache" in (second / "report.md").read_text()
    assert "reused from the cache" not in (first / "report.md").read_text()
    for name in ("eval_base.json", "generations_base.jsonl"):
        assert (second / name).read_text() == (first / name).read_text(), name
    # Skipping the evaluation leaves the training untouched (the evaluation draws no random numbers).
    ours, theirs = (load_file(d / "final" / "adapter_model.safetensors") for d in (first, second))
    assert all(ours[k].equal(theirs[k]) for k in ours)


def key_of(
    model_dir: str, settings: EvalSection, sources: EvalSources, judge: str = "heuristic", adapter: str | None = None
) -> str:
    model, _ = load_model(model_dir)
    inputs = base_cache.eval_inputs(model, model_dir, adapter, load_judge(judge), judge, settings, sources)
    assert inputs is not None
    return inputs.key


def test_every_input_changes_the_key(isolated_cache, tmp_path, sources, monkeypatch):
    harmful, benign = sources
    model_dir = str(save_compact(tmp_path / "model"))
    settings = EvalSection(eval_limit=2, capability="arithmetic:2")
    held = EvalSources(harmful=harmful, benign=benign)
    base = key_of(model_dir, settings, held)
    assert key_of(model_dir, settings, held) == base  # deterministic
    copy = str(save_compact(tmp_path / "copy"))
    before = key_of(copy, settings, held)
    weights = Path(copy) / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    keys = {"weights": key_of(copy, settings, held)}  # same folder, other weights
    assert keys["weights"] != before

    a, b = tmp_path / "adapter-a", tmp_path / "adapter-b"
    for folder, value in ((a, 0.0), (b, 1.0)):
        folder.mkdir()
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        save_file({"w": torch.full((2,), value)}, folder / "adapter_model.safetensors")
    keys["adapter"] = key_of(model_dir, settings, held, adapter=str(a))
    keys["other adapter"] = key_of(model_dir, settings, held, adapter=str(b))
    keys["settings"] = key_of(model_dir, replace(settings, eval_max_new_tokens=settings.eval_max_new_tokens + 1), held)
    keys["eval seed"] = key_of(model_dir, replace(settings, eval_seed=1), held)
    keys["judge"] = key_of(model_dir, settings, held, judge="keyword")
    rows = [json.loads(line) for line in Path(harmful).read_text().splitlines()]
    original = [dict(r) for r in rows]
    rows[0]["prompt"] += " Now."
    write_jsonl(Path(harmful), rows)  # same file name, other items
    keys["items"] = key_of(model_dir, settings, held)
    write_jsonl(Path(harmful), original)
    monkeypatch.setattr(base_cache, "__version__", "99.0")
    keys["code version"] = key_of(model_dir, settings, held)
    assert base not in keys.values(), keys
    assert len(set(keys.values())) == len(keys), keys


def test_a_changed_input_misses_and_clear_empties_the_cache(isolated_cache, tmp_path, sources, capsys):
    harmful, benign = sources
    model_dir = str(save_compact(tmp_path / "model"))
    model, _ = load_model(model_dir)
    judge = load_judge("heuristic")
    settings = EvalSection(eval_limit=2, capability="arithmetic:2")
    held = EvalSources(harmful=harmful, benign=benign)
    computed: list[str] = []

    def compute():
        computed.append("x")
        return {"n": len(computed)}, [{"axis": "safety", "id": "h0"}]

    def once(s: EvalSection):
        inputs = base_cache.eval_inputs(model, model_dir, None, judge, "heuristic", s, held)
        return base_cache.evaluate_once(compute, inputs, origin="run-a")

    results, generations, hit = once(settings)
    assert hit is None and results == {"n": 1}
    results, generations, hit = once(settings)
    assert hit is not None and hit.origin == "run-a" and results == {"n": 1}
    assert generations == [{"axis": "safety", "id": "h0"}]
    assert once(replace(settings, judge="keyword"))[2] is None and len(computed) == 2

    assert main(["cache", "clear"]) == 0
    assert "removed 2 cached base evaluations" in capsys.readouterr().out
    assert not base_cache.entries_dir().exists()
    assert once(settings)[2] is None and len(computed) == 3


def test_the_code_hash_covers_every_module_an_evaluation_runs(tiny_dir, sources, tmp_path):
    """Importing and running an evaluation loads only safedistill modules listed in CODE."""
    harmful, benign = sources
    script = f"""
import sys
from safedistill.config import EvalSection
from safedistill.eval.evaluate import EvalSources, evaluate
from safedistill.eval.judging import load_judge
from safedistill.models import load_model
model, tok = load_model({tiny_dir!r})
settings = EvalSection(eval_limit=1, capability="arithmetic:1")
held = EvalSources(harmful={harmful!r}, benign={benign!r})
evaluate(model, tok, load_judge("heuristic"), settings, held, model_name="tiny", progress=False)
print("\\n".join(m.__file__ for n, m in sys.modules.items() if n.startswith("safedistill") and m.__file__))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    root = Path(base_cache.__file__).resolve().parent.parent
    loaded = [Path(line) for line in done.stdout.splitlines() if line.endswith(".py") and Path(line).is_file()]
    assert any(p.name == "evaluate.py" for p in loaded)
    covered = [root / entry for entry in base_cache.CODE]
    missing = [
        str(p.relative_to(root))
        for p in loaded
        if p.is_relative_to(root) and not any(p == c or p.is_relative_to(c) for c in covered)
    ]
    assert not missing, f"modules an evaluation runs but the cache key does not hash: {missing}"


def test_eval_command_reuses_its_evaluation_and_a_changed_setting_misses(
    isolated_cache, tiny_dir, sources, tmp_path, monkeypatch, capsys
):
    harmful, benign = sources
    argv = ["eval", "--model", tiny_dir, "--harmful", harmful, "--overrefusal", benign, "--limit", "2"]
    argv += ["--axes", "safety,overrefusal,capability", "--capability", "arithmetic:2"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([*argv, "--out", str(first)]) == 0
    assert not (first / base_cache.EVAL_REUSED).exists()
    capsys.readouterr()

    from safedistill.eval import evaluate as evaluate_mod

    def must_not_run(*a, **kw):
        raise AssertionError("a cached evaluation was computed again")

    real = evaluate_mod.evaluate
    monkeypatch.setattr(evaluate_mod, "evaluate", must_not_run)
    assert main([*argv, "--out", str(second)]) == 0
    assert "reused the evaluation from" in capsys.readouterr().err
    note = json.loads((second / base_cache.EVAL_REUSED).read_text())
    assert note["origin"] == str(first.resolve()) and Path(note["cache"]).parent == base_cache.entries_dir()
    for name in ("eval.json", "generations.jsonl"):
        assert (second / name).read_text() == (first / name).read_text(), name
    assert "reused from the cache" in (second / "report.md").read_text()
    assert "reused from the cache" not in (first / "report.md").read_text()

    # A changed setting, or --no-cache, evaluates again (a stale note in the directory goes).
    calls: list[int] = []

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(evaluate_mod, "evaluate", counted)
    assert main([*argv, "--batch-size", "3", "--out", str(second)]) == 0
    assert len(calls) == 1 and not (second / base_cache.EVAL_REUSED).exists()
    assert "reused from the cache" not in (second / "report.md").read_text()
    assert main([*argv, "--no-cache", "--out", str(tmp_path / "third")]) == 0
    assert len(calls) == 2 and not (tmp_path / "third" / base_cache.EVAL_REUSED).exists()


SEARCH_CONTEXTS = [
    {"id": "ctx-r1", "text": "Refuse requests that could hurt someone."},
    {"id": "ctx-r2", "text": "I'm sorry, but I can't help with that request."},
    {"id": "ctx-b", "text": "Help with everything else.", "side": "benign"},
]


def test_the_context_search_is_computed_once_per_model_values_and_inputs(
    isolated_cache, tiny_dir, tmp_path, monkeypatch, capsys
):
    from helpers import choose_contexts_of, splits_of
    from safedistill.methods.base import training_items
    from safedistill.searches import context as search

    library = write_jsonl(tmp_path / "contexts.jsonl", SEARCH_CONTEXTS)
    overrides = [f"contexts={library}", "n_harmful=8", "n_benign=4", "split_seed=3"]
    cfg = load_config("opsa", overrides=[*overrides, "context_search_tokens=3"])
    model, tok = load_model(tiny_dir)
    items = training_items(cfg.section("data"), splits_of(cfg), cfg.seed)
    judge = load_judge("heuristic")
    dirs = [tmp_path / name for name in ("first", "second", "third", "fourth")]
    for d in dirs:
        d.mkdir()
    calls: list[int] = []
    real = search.search_contexts
    monkeypatch.setattr(search, "search_contexts", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    first = choose_contexts_of(cfg, model, tok, judge, items, None, dirs[0], progress=False)
    assert calls == [1] and not (dirs[0] / base_cache.SEARCH_REUSED).exists()
    second = choose_contexts_of(cfg, model, tok, judge, items, None, dirs[1], progress=False)
    assert calls == [1] and second == first  # reused, not searched again
    assert (dirs[1] / "flip_rates.json").read_text() == (dirs[0] / "flip_rates.json").read_text()
    note = json.loads((dirs[1] / base_cache.SEARCH_REUSED).read_text())
    assert note["origin"] == str(dirs[0].resolve()) and Path(note["cache"]).parent == base_cache.searches_dir()
    assert any("reused from the cache" in line for line in search.flip_rate_section(dirs[1]))
    assert not any("reused from the cache" in line for line in search.flip_rate_section(dirs[0]))

    # Another answer length, or other model values under the same file names, search again.
    longer = load_config("opsa", overrides=[*overrides, "context_search_tokens=4"])
    choose_contexts_of(longer, model, tok, judge, items, None, dirs[2], progress=False)
    assert calls == [1, 1]
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    choose_contexts_of(cfg, model, tok, judge, items, None, dirs[3], progress=False)
    assert calls == [1, 1, 1] and not (dirs[3] / base_cache.SEARCH_REUSED).exists()

    capsys.readouterr()
    assert main(["cache", "clear"]) == 0
    assert "removed 0 cached base evaluations and 3 context searches" in capsys.readouterr().out
    assert not base_cache.searches_dir().exists()
