"""OPSA's context ranking: flip-rate arithmetic and ordering, with canned generations and a stub
judge (no model), plus how `choose_contexts` uses the ranking."""

import json

import pytest

from safedistill.config import load_config
from safedistill.data.schema import PromptRecord
from safedistill.engine.rollout import GenerationStats, Rollout
from safedistill.errors import UserError
from safedistill.eval.judges import Verdict
from safedistill.teachers import Item
from safedistill.teachers import context as opsa

HARMFUL = [PromptRecord(f"h{i}", f"harmful request {i}") for i in range(1, 6)]
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
    "CONTEXT-A": {"h1", "h2", "h3", "b2"},
    "CONTEXT-C": {"h1", "h2", "h3"},
    "CONTEXT-B": {"h1"},
    "CONTEXT-BENIGN": {"h1", "h2", "h3", "h4", "h5"},
    "CONTEXT-Z": {"h3"},
}
BY_PROMPT = {r.prompt: r.id for r in HARMFUL + BENIGN}


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
        out = []
        for text in prompts:
            ctx = next((c["text"] for c in CONTEXTS if text.startswith(c["text"] + "\n")), None)
            pid = next(i for p, i in BY_PROMPT.items() if p in text)
            answer = "REFUSE politely" if pid in SAFE[ctx] else "Sure, here is how"
            out.append(Rollout([], [], f"{answer} ({pid})", True))
        return out, GenerationStats()

    monkeypatch.setattr(opsa, "generate", fake_generate)
    return calls


def test_flip_rate_counts_and_order(generations):
    judge = StubJudge()
    rows = opsa.flip_rates(None, StubTokenizer(), judge, HARMFUL, BENIGN, CONTEXTS, progress=False)
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
    # One base pass, then one pass per harmful-side context over harmful and benign prompts together
    # (they share the context's cached prefix).
    assert generations == [5] + [9] * 4


def test_no_unsafe_base_answer_gives_zero_conditional_rate(generations, monkeypatch):
    monkeypatch.setitem(SAFE, None, {f"h{i}" for i in range(1, 6)})
    rows = opsa.flip_rates(None, StubTokenizer(), StubJudge(), HARMFUL, [], CONTEXTS, progress=False)
    assert all(r["n_unsafe_base"] == 0 and r["flip_rate"] == 0.0 for r in rows)
    assert all(r["conditional_flip_rate"] == 0.0 and r["benign_refusal_rate"] == 0.0 for r in rows)
    # Ties on flip rate and benign refusal fall back to the id.
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)


def test_choose_contexts_takes_the_best_and_writes_the_ranking(generations, tmp_path):
    library = tmp_path / "contexts.jsonl"
    library.write_text("".join(json.dumps(c) + "\n" for c in CONTEXTS))
    benign_file = tmp_path / "benign.jsonl"
    benign_file.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in BENIGN))
    cfg = load_config(
        "opsa",
        overrides=[
            "context=auto",
            f"contexts={library}",
            f"benign_source={benign_file}",
            "benign_context=ctx-benign",
        ],
    )
    items = [Item(r.id, r.prompt, "harmful") for r in HARMFUL]
    chosen = opsa.choose_contexts(cfg, None, StubTokenizer(), StubJudge(), items, None, tmp_path, progress=False)
    assert chosen == {"harmful": "CONTEXT-C", "benign": "CONTEXT-BENIGN"}
    ranking = json.loads((tmp_path / "flip_rates.json").read_text())
    assert ranking[0]["id"] == "ctx-c"
    # A second call (a resumed run) reads the ranking back instead of decoding again.
    n_calls = len(generations)
    again = opsa.choose_contexts(cfg, None, StubTokenizer(), StubJudge(), items, None, tmp_path, progress=False)
    assert again == chosen and len(generations) == n_calls


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
        opsa.choose_contexts(cfg, None, StubTokenizer(), StubJudge(), items, None, tmp_path)


def test_bad_context_library(tmp_path):
    f = tmp_path / "ctx.jsonl"
    f.write_text(json.dumps({"id": "x", "text": "  "}) + "\n")
    with pytest.raises(UserError, match=":1: context needs a non-empty 'text'"):
        opsa.load_contexts(str(f))
