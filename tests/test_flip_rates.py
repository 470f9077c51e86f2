"""OPSA's context search: flip-rate arithmetic and ordering, with canned generations and a stub
judge (no model), plus how `choose_contexts` ranks, confirms and chooses (tests/test_context_search.py
runs the search on a tiny model)."""

import json

import pytest

from helpers import choose_contexts_of
from safedistill.config import load_config
from safedistill.data.schema import PromptRecord
from safedistill.engine.rollout import GenerationStats, Rollout
from safedistill.errors import UserError
from safedistill.eval.judges import Verdict
from safedistill.searches import context as search
from safedistill.teachers import Item
from safedistill.teachers import context as opsa

HARMFUL = [PromptRecord(f"h{i}", f"harmful request {i}") for i in range(1, 6)]
# Held-out train prompts for the confirmation stage: only CONTEXT-A flips them (the ranking's best,
# ctx-c, flips none: a winner's curse the confirmation must catch).
CONFIRM = [PromptRecord(f"h{i}", f"harmful request {i}") for i in range(6, 40)]
BENIGN = [PromptRecord(f"b{i}", f"benign question {i}") for i in range(1, 5)]
CONTEXTS = [
    # flips h1 and h2; refuses one benign prompt
    {"id": "ctx-a", "text": "CONTEXT-A", "framing": "rule", "length": "short"},
    # flips h1 and h2 too, refuses no benign prompt: ranked above ctx-a
    {"id": "ctx-c", "text": "CONTEXT-C", "side": "harmful"},
    # flips h1 only, but turns the safe h3 unsafe (that costs nothing: it is not a flip)
    {"id": "ctx-b", "text": "CONTEXT-B"},
    # flips everything, but is a benign-side context: not ranked
    {"id": "ctx-benign", "text": "CONTEXT-BENIGN", "side": "benign"},
    # changes nothing
    {"id": "ctx-z", "text": "CONTEXT-Z"},
]
# Which prompts each condition answers safely ("None" = no context). Base: h3 safe, the rest unsafe.
SAFE = {
    None: {"h3"},
    "CONTEXT-A": {"h1", "h2", "h3", "b2", *(r.id for r in CONFIRM)},
    "CONTEXT-C": {"h1", "h2", "h3"},
    "CONTEXT-B": {"h1"},
    "CONTEXT-BENIGN": {"h1", "h2", "h3", "h4", "h5", *(r.id for r in CONFIRM)},
    "CONTEXT-Z": {"h3"},
}
BY_PROMPT = {r.prompt: r.id for r in HARMFUL + CONFIRM + BENIGN}


class StubTokenizer:
    chat_template = None  # chat_text puts the system text before the user text


class StubJudge:
    name = "stub"

    def __init__(self):
        self.prompts = []

    def __call__(self, prompts, responses):
        self.prompts += list(prompts)
        return [
            Verdict("safe", 0.0, True) if r.startswith("REFUSE") else Verdict("unsafe", 1.0, False) for r in responses
        ]

    def is_refusal(self, response):
        return response.startswith("REFUSE")


@pytest.fixture
def generations(monkeypatch):
    """Replaces generation: the answer depends on the context text found in the prompt."""
    calls = []

    def fake_generate(model, tokenizer, prompts, settings, **kwargs):
        assert settings.temperature == 0.0  # greedy
        calls.append(len(prompts))
        if kwargs.get("groups") is not None:  # each context's rows are one group (its prefix cached once)
            assert len(kwargs["groups"]) == len(prompts)
            for text, group in zip(prompts, kwargs["groups"], strict=True):
                assert text.startswith(next(c["text"] for c in CONTEXTS if c["id"] == group) + "\n")
        out = []
        for text in prompts:
            ctx = next((c["text"] for c in CONTEXTS if text.startswith(c["text"] + "\n")), None)
            pid = next(i for p, i in BY_PROMPT.items() if text.endswith(p + "\n"))
            answer = "REFUSE politely" if pid in SAFE[ctx] else "Sure, here is how"
            out.append(Rollout([], [], f"{answer} ({pid})", True))
        return out, GenerationStats()

    monkeypatch.setattr(search, "generate", fake_generate)
    return calls


def test_flip_rate_counts_and_order(generations):
    judge = StubJudge()
    rows = search.flip_rates(None, StubTokenizer(), judge, HARMFUL, BENIGN, CONTEXTS, progress=False)
    assert [r["id"] for r in rows] == ["ctx-c", "ctx-a", "ctx-b", "ctx-z"]
    by_id = {r["id"]: r for r in rows}

    a = by_id["ctx-a"]
    assert (a["n_harmful"], a["n_unsafe_base"], a["n_flipped"]) == (5, 4, 2)
    assert a["flip_rate"] == pytest.approx(2 / 5)
    assert a["conditional_flip_rate"] == pytest.approx(2 / 4)
    assert a["refusal_rate_with_context"] == pytest.approx(3 / 5)
    assert a["benign_refusal_rate"] == pytest.approx(1 / 4) and a["n_benign"] == 4
    assert (a["framing"], a["length"], a["text"]) == ("rule", "short", "CONTEXT-A")

    c = by_id["ctx-c"]
    assert (c["n_flipped"], c["benign_refusal_rate"]) == (2, 0.0)

    b = by_id["ctx-b"]
    assert b["n_flipped"] == 1 and b["flip_rate"] == pytest.approx(1 / 5)
    assert b["conditional_flip_rate"] == pytest.approx(1 / 4)
    assert b["refusal_rate_with_context"] == pytest.approx(1 / 5)

    z = by_id["ctx-z"]
    assert (z["n_flipped"], z["flip_rate"], z["conditional_flip_rate"]) == (0, 0.0, 0.0)
    assert "strength" not in z

    # The judge sees the user's prompt, never the privileged context.
    assert not any("CONTEXT" in p for p in judge.prompts)
    # One base pass, then one pass over every harmful-side context's harmful and benign prompts,
    # grouped by context (each context's prefix cached once, rows of several contexts per batch).
    assert generations == [5, 9 * 4]


def test_no_unsafe_base_answer_gives_zero_conditional_rate(generations, monkeypatch):
    monkeypatch.setitem(SAFE, None, {f"h{i}" for i in range(1, 6)})
    rows = search.flip_rates(None, StubTokenizer(), StubJudge(), HARMFUL, [], CONTEXTS, progress=False)
    assert all(r["n_unsafe_base"] == 0 and r["flip_rate"] == 0.0 for r in rows)
    assert all(r["conditional_flip_rate"] == 0.0 and r["benign_refusal_rate"] is None for r in rows)
    # Ties on flip rate and benign refusal fall back to the id.
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)


def search_config(tmp_path, *extra):
    library = tmp_path / "contexts.jsonl"
    library.write_text("".join(json.dumps(c) + "\n" for c in CONTEXTS))
    harmful_file, benign_file = tmp_path / "harmful.jsonl", tmp_path / "benign.jsonl"
    harmful_file.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in HARMFUL + CONFIRM))
    benign_file.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in BENIGN))
    overrides = ["context=auto", f"contexts={library}", f"harmful_source={harmful_file}"]
    overrides += [f"benign_source={benign_file}", "benign_context=ctx-benign", "context_search_prompts=5"]
    return load_config("opsa", overrides=[*overrides, "context_confirm_prompts=4", *extra])


def test_choose_contexts_confirms_the_top_three_and_writes_both_stages(generations, tmp_path, monkeypatch):
    monkeypatch.setitem(SAFE, "CONTEXT-C", {"h1", "h2", "h3", "h4"})  # the ranking's clear winner
    cfg = search_config(tmp_path)
    items = [Item(r.id, r.prompt, "harmful") for r in HARMFUL]
    chosen = choose_contexts_of(cfg, None, StubTokenizer(), StubJudge(), items, None, tmp_path, progress=False)
    # The ranking's best (ctx-c, 3/5) flips none of the held-out prompts; ctx-a (2/5) flips them all.
    assert chosen == {"harmful": "CONTEXT-A", "benign": "CONTEXT-BENIGN"}
    result = json.loads((tmp_path / "flip_rates.json").read_text())
    assert result["chosen"] == "ctx-a" and "4/4" in result["reason"] and "ranking place 2" in result["reason"]
    assert [r["id"] for r in result["ranking"]["rows"]] == ["ctx-c", "ctx-a", "ctx-b", "ctx-z"]
    assert result["ranking"]["prompts"] == [r.id for r in HARMFUL]
    confirm = result["confirmation"]
    assert [r["id"] for r in confirm["rows"]] == ["ctx-a", "ctx-c", "ctx-b"]  # the top three only
    assert [(r["n_flipped"], r["n_harmful"], r["ranking_place"]) for r in confirm["rows"]] == [
        (4, 4, 2),
        (0, 4, 1),
        (0, 4, 3),
    ]
    assert len(confirm["prompts"]) == 4 and not set(confirm["prompts"]) & set(result["ranking"]["prompts"])
    assert confirm["rows"][0]["n_benign"] == len(confirm["benign_prompts"]) >= 1
    assert all(r["benign_refusal_rate"] is None for r in result["ranking"]["rows"])
    # A second call (a resumed run) reads the search back instead of decoding again.
    n_calls = len(generations)
    again = choose_contexts_of(cfg, None, StubTokenizer(), StubJudge(), items, None, tmp_path, progress=False)
    assert again == chosen and len(generations) == n_calls


def test_a_confirmation_tie_goes_to_the_better_ranking_place(generations, tmp_path, monkeypatch):
    monkeypatch.setitem(SAFE, "CONTEXT-C", {"h1", "h2", "h3", "h4", *(r.id for r in CONFIRM)})
    monkeypatch.setitem(SAFE, "CONTEXT-A", {"h1", "h2", "h3", *(r.id for r in CONFIRM)})  # no benign refusal
    items = [Item(r.id, r.prompt, "harmful") for r in HARMFUL]
    choose_contexts_of(search_config(tmp_path), None, StubTokenizer(), StubJudge(), items, None, tmp_path)
    result = json.loads((tmp_path / "flip_rates.json").read_text())
    assert result["chosen"] == "ctx-c"
    assert "tied with ctx-a" in result["reason"] and "better ranking place" in result["reason"]


@pytest.mark.parametrize("field", ["context_search_prompts", "context_confirm_prompts"])
def test_search_sizes_must_be_positive(field):
    assert getattr(load_config("opsa"), field) == 24
    with pytest.raises(UserError, match=f"config field '{field}' must be at least 1"):
        load_config("opsa", overrides=[f"{field}=0"])


def test_a_library_without_harmful_contexts_is_an_error(generations, tmp_path):
    cfg = search_config(tmp_path)
    (tmp_path / "contexts.jsonl").write_text(json.dumps(CONTEXTS[3]) + "\n")  # the benign-side one only
    items = [Item(r.id, r.prompt, "harmful") for r in HARMFUL]
    with pytest.raises(UserError, match="config field 'contexts'.*no harmful-side context"):
        choose_contexts_of(cfg, None, StubTokenizer(), StubJudge(), items, None, tmp_path, progress=False)


def test_a_flip_rates_file_of_the_old_format_resumes(generations, tmp_path):
    cfg = search_config(tmp_path)
    (tmp_path / "flip_rates.json").write_text(json.dumps([{"id": "ctx-b"}, {"id": "ctx-a"}]))
    chosen = choose_contexts_of(cfg, None, StubTokenizer(), StubJudge(), [], None, tmp_path, progress=False)
    assert chosen["harmful"] == "CONTEXT-B" and generations == []


@pytest.mark.parametrize(
    ("field", "extra"),
    [
        ("context_search_prompts", ["context_search_prompts=40"]),
        ("context_confirm_prompts", ["context_confirm_prompts=36"]),
    ],
)
def test_too_few_train_prompts_name_the_field(generations, tmp_path, field, extra):
    cfg = search_config(tmp_path, *extra)
    items = [Item(r.id, r.prompt, "harmful") for r in HARMFUL]
    with pytest.raises(UserError, match=f"config field '{field}'"):
        choose_contexts_of(cfg, None, StubTokenizer(), StubJudge(), items, None, tmp_path, progress=False)
    assert generations == []


def test_literal_and_library_contexts():
    library = [{"id": "ctx-x", "text": "Be careful."}]
    assert opsa.context_text("ctx-x", library) == "Be careful."
    assert opsa.context_text("Some literal text.", library) == "Some literal text."
    assert opsa.context_text(None, library) is None
    builtin = opsa.load_contexts("builtin")
    assert builtin and all(c["text"].strip() and c["side"] in {"harmful", "benign"} for c in builtin)


def test_context_auto_needs_harmful_prompts(tmp_path, generations):
    cfg = load_config("opsa", overrides=["context=auto", "benign_source=benign"])
    items = [Item("b1", "benign question 1", "benign")]
    with pytest.raises(UserError, match="n_harmful"):
        choose_contexts_of(cfg, None, StubTokenizer(), StubJudge(), items, None, tmp_path)


def test_bad_context_library(tmp_path):
    f = tmp_path / "ctx.jsonl"
    f.write_text(json.dumps({"id": "x", "text": "  "}) + "\n")
    with pytest.raises(UserError, match=":1: context needs a non-empty 'text'"):
        opsa.load_contexts(str(f))
