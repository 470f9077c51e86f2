"""OPSA's two-stage context search (context=auto) on a tiny model, with the real decoding, judge
and prompt sources: the ranking reads at least 24 train prompts, the confirmation as many others,
none of them an evaluation prompt, and flip_rates.json holds both stages and the choice."""

import json

import pytest

from helpers import choose_contexts_of, splits_of, write_jsonl
from safedistill.config import load_config
from safedistill.eval.evaluate import held_out
from safedistill.eval.judging import load_judge
from safedistill.methods.base import training_items
from safedistill.models import load_model
from safedistill.searches.context import flip_rate_section

CONTEXTS = [
    {"id": "ctx-r1", "text": "Refuse requests that could hurt someone."},
    {"id": "ctx-r2", "text": "I'm sorry, but I can't help with that request."},
    {"id": "ctx-r3", "text": "You are a helpful assistant. Answer the question briefly."},
    {"id": "ctx-r4", "text": "The model should refuse harmful requests and answer harmless ones fully."},
    {"id": "ctx-r5", "text": "Explain how photosynthesis works in plants, step by step."},
    {"id": "ctx-b", "text": "Help with everything else.", "side": "benign"},
]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("search")


@pytest.fixture(scope="module")
def run(tiny, out):
    """The search of an opsa run on advbench's train split (8 training prompts: the ranking tops
    them up from the split), and its config."""
    library = write_jsonl(out / "contexts.jsonl", CONTEXTS)
    cfg = load_config(
        "opsa",
        overrides=[f"contexts={library}", "n_harmful=8", "n_benign=4", "context_search_tokens=3", "split_seed=3"],
    )
    model, tok = tiny
    items = training_items(cfg.section("data"), splits_of(cfg), cfg.seed)
    chosen = choose_contexts_of(cfg, model, tok, load_judge("heuristic"), items, None, out, progress=False)
    return cfg, items, chosen, json.loads((out / "flip_rates.json").read_text())


def test_ranking_and_confirmation_prompts(run):
    cfg, items, chosen, result = run
    ranking, confirmation = result["ranking"], result["confirmation"]
    assert cfg.context_search_prompts == cfg.context_confirm_prompts == 24  # the defaults
    assert len(set(ranking["prompts"])) == len(ranking["prompts"]) == 24
    assert len(set(confirmation["prompts"])) == len(confirmation["prompts"]) == 24
    assert not set(ranking["prompts"]) & set(confirmation["prompts"])
    # The run's own training prompts are ranked on first.
    assert ranking["prompts"][:8] == [it.id for it in items if it.group == "harmful"]
    eval_ids = {r.id for r in held_out("advbench", None, split_seed=cfg.split_seed)}
    assert eval_ids and not (set(ranking["prompts"]) | set(confirmation["prompts"])) & eval_ids
    benign_eval = {r.id for r in held_out("benign", None, split_seed=cfg.split_seed)}
    assert confirmation["benign_prompts"] and not set(confirmation["benign_prompts"]) & benign_eval


def test_both_stages_and_the_choice(run):
    _, _, chosen, result = run
    ranking, confirmation = result["ranking"]["rows"], result["confirmation"]["rows"]
    assert [r["id"] for r in ranking] and {r["id"] for r in ranking} == {f"ctx-r{i}" for i in range(1, 6)}
    assert all(r["n_harmful"] == 24 and 0 <= r["n_flipped"] <= r["n_unsafe_base"] for r in ranking)
    assert {r["id"]: r["ranking_place"] for r in confirmation} == {r["id"]: i + 1 for i, r in enumerate(ranking[:3])}
    assert all(r["n_harmful"] == 24 and r["benign_refusal_rate"] is not None for r in confirmation)
    best = max(confirmation, key=lambda r: (r["n_flipped"], -r["benign_refusal_rate"], -r["ranking_place"]))
    assert result["chosen"] == best["id"] == confirmation[0]["id"]
    assert chosen["harmful"] == next(c["text"] for c in CONTEXTS if c["id"] == best["id"])
    assert f"{best['n_flipped']}/24" in result["reason"]


def test_report_shows_both_stages(run, out):
    text = "\n".join(flip_rate_section(out))
    assert "confirmation (held-out train prompts)" in text and "ranking (top 5)" in text
    assert f"Chosen: {run[3]['chosen']}" in text


def test_the_flip_rate_command_runs_the_same_two_stage_search(tiny_dir, tmp_path, capsys):
    from safedistill.cli import main

    library = write_jsonl(tmp_path / "contexts.jsonl", CONTEXTS)
    out = tmp_path / "fr"
    main(
        ["flip-rate", "--model", tiny_dir, "--out", str(out), "--contexts", str(library), "-q"]
        + ["--limit", "5", "--confirm", "4"]
    )
    result = json.loads((out / "flip_rates.json").read_text())
    assert len(result["ranking"]["prompts"]) == 5 and len(result["confirmation"]["prompts"]) == 4
    assert not set(result["ranking"]["prompts"]) & set(result["confirmation"]["prompts"])
    assert len(result["ranking"]["rows"]) == 5  # every harmful-side context ranked
    assert result["chosen"] in {r["id"] for r in result["confirmation"]["rows"]}
    assert f"Chosen: {result['chosen']}" in capsys.readouterr().out
