"""DGR: the built-in external sets, refinement (keep / retry / fall back / drop), the shift measures,
template overrides, user-data errors, and a tiny `run dgr` that trains on the refined targets."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from helpers import write_jsonl, write_sources
from safedistill.cli import main
from safedistill.config import load_config
from safedistill.data.external import instantiate
from safedistill.data.schema import Demonstration, PromptRecord
from safedistill.data.sources import builtin_bytes, load_demonstrations, load_prompts
from safedistill.data.splits import split_records
from safedistill.engine.rollout import GenerationStats, Rollout, encode_prompts, stop_token_ids
from safedistill.errors import UserError
from safedistill.eval.judges import Verdict
from safedistill.methods import dgr
from safedistill.methods.sft import subset
from safedistill.models import chat_text, load_model

pytestmark = pytest.mark.usefixtures("isolated_cache")

FREE = "FREE answer here."


class ScriptedJudge:
    """Safe when the response contains 'SAFE'; counts the calls per prompt."""

    def __init__(self):
        self.calls = defaultdict(int)

    def __call__(self, prompts, responses):
        for p in prompts:
            self.calls[p] += 1
        return [Verdict("safe", 0.0, True) if "SAFE" in r else Verdict("unsafe", 1.0, False) for r in responses]


class FakeGenerate:
    """Stands in for rollout.generate: answers[prompt][k] on the k-th refinement of that prompt
    (reasoning[prompt][k] for reasoning prompts), FREE for bare prompts; records texts and settings."""

    def __init__(self, answers: dict, reasoning: dict | None = None):
        self.answers, self.reasoning = answers, reasoning or {}
        self.seen = defaultdict(int)
        self.calls = []

    def __call__(self, model, tok, texts, settings, **kw):
        self.calls.append((list(texts), settings))
        out = []
        for text in texts:
            thinking = "thinking" in text
            table = self.reasoning if thinking else self.answers
            key = next((p for p in table if f"Request: {p}\n" in text or f"<<{p}>>" in text), None)
            if key is None:
                reply = FREE
            else:
                reply = table[key][min(self.seen[(key, thinking)], len(table[key]) - 1)]
                self.seen[(key, thinking)] += 1
            out.append(Rollout([], tok(reply, add_special_tokens=False)["input_ids"], reply, True))
        return out, GenerationStats()


def demos(*prompts: str, reasoning: str | None = None) -> list[Demonstration]:
    return [Demonstration(p, f"external refusal to {p}.", f"d{i}", reasoning, "test") for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


# ---- built-in external sets --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["directrefusal", "r1act"])
def test_builtin_sets_use_train_prompts_only(name, tmp_path):
    harmful, _ = write_sources(tmp_path)
    records = load_prompts(harmful)
    train, held_out = split_records(records, seed=0)
    got = load_demonstrations(f"builtin:{name}", harmful_source=harmful, split_seed=0)
    assert {d.prompt for d in got} == {r.prompt for r in train}
    assert not {d.prompt for d in got} & {r.prompt for r in held_out}
    assert got == load_demonstrations(f"builtin:{name}", harmful_source=harmful, split_seed=0)
    assert all(d.response.strip() and d.source == f"builtin:{name}" for d in got)
    assert len({d.id for d in got}) == len(got)
    if name == "r1act":
        for d in got:
            lines = d.reasoning.splitlines()
            assert [line.split(":")[0] for line in lines] == [
                "Understanding the request",
                "Assessing the harm",
                "Deciding how to respond",
            ]
    else:
        assert all(d.reasoning is None for d in got)


def test_r1act_assessment_follows_the_prompt():
    spec = json.loads(builtin_bytes("r1act.json"))
    (bomb, other) = instantiate(
        "r1act",
        spec,
        [PromptRecord("x1", "Write a tutorial on how to make a bomb."), PromptRecord("x2", "Do the thing.")],
    )
    weapons = next(h for h in spec["assess"] if h["harm"] == "weapons")["text"]
    general = next(h for h in spec["assess"] if h["harm"] == "general")["text"]
    assert "write a tutorial on how to make a bomb" in bomb.reasoning
    assert any(t in bomb.reasoning for t in weapons)
    assert any(t in other.reasoning for t in general)


def test_subset_is_seeded_and_nested():
    items = demos(*[f"p{i}" for i in range(40)])
    small, large = subset(items, 10, 3), subset(items, 30, 3)
    assert small == large[:10] and small == subset(items, 10, 3)
    assert small != subset(items, 10, 4)
    assert subset(items, None, 3) == items


# ---- refinement --------------------------------------------------------------------------------


def test_refine_keeps_retries_falls_back_and_drops(tiny, monkeypatch):
    model, tok = tiny
    answers = {
        "first": ["SAFE at once."],
        "second": ["Sure, here it is.", "SAFE on retry."],
        "never": ["Sure.", "Sure again.", "Sure thrice.", "SAFE too late."],
        "empty": [""],
    }
    samples = demos(*answers)
    for on_fail in ("fallback", "drop"):
        fake, judge = FakeGenerate(answers), ScriptedJudge()
        monkeypatch.setattr(dgr, "generate", fake)
        s = dgr.RefineSettings(retries=2, on_fail=on_fail, temperature=0.9, seed=5)
        first, second, never, empty = dgr.refine(model, tok, judge, samples, s, progress=False)
        assert (first.status, first.attempts, first.sample.response) == ("refined", 1, "SAFE at once.")
        assert (second.status, second.attempts, second.sample.response) == ("refined", 2, "SAFE on retry.")
        assert second.sample.prompt == "second" and second.sample.id == samples[1].id
        assert never.status == ("fallback" if on_fail == "fallback" else "dropped") and never.attempts == 3
        assert never.sample == (samples[2] if on_fail == "fallback" else None)
        assert empty.status != "refined"  # an empty rewrite never counts, whatever the judge says
        assert judge.calls["first"] == 1 and judge.calls["second"] == 2 and judge.calls["never"] == 3
        # attempt 0 greedy over all samples, then sampled retries over the pending ones only
        assert [len(texts) for texts, _ in fake.calls] == [4, 3, 2]
        assert [st.temperature for _, st in fake.calls] == [0.0, 0.9, 0.9]
        assert len({st.seed for _, st in fake.calls}) == 3
    fake = FakeGenerate(answers)
    monkeypatch.setattr(dgr, "generate", fake)
    out = dgr.refine(model, tok, ScriptedJudge(), samples, dgr.RefineSettings(retries=0), progress=False)
    assert [o.status for o in out] == ["refined", "fallback", "fallback", "fallback"]


def test_refine_rewrites_reasoning_too(tiny, monkeypatch):
    model, tok = tiny
    fake = FakeGenerate({"q": ["SAFE reply."]}, reasoning={"q": ["My own thinking: this is harmful."]})
    monkeypatch.setattr(dgr, "generate", fake)
    (o,) = dgr.refine(model, tok, ScriptedJudge(), demos("q", reasoning="External thinking."), dgr.RefineSettings())
    assert o.status == "refined"
    assert (o.sample.reasoning, o.sample.response) == ("My own thinking: this is harmful.", "SAFE reply.")
    texts, settings = next((t, st) for t, st in fake.calls if "thinking" in t[0])
    assert settings.max_new_tokens == dgr.RefineSettings().reasoning_max_new_tokens
    assert "External thinking." in texts[0]
    # an empty reasoning rewrite fails the sample even when the response is safe
    fake = FakeGenerate({"q": ["SAFE reply."]}, reasoning={"q": [""]})
    monkeypatch.setattr(dgr, "generate", fake)
    (o,) = dgr.refine(model, tok, ScriptedJudge(), demos("q", reasoning="External thinking."), dgr.RefineSettings())
    assert o.status == "fallback" and o.sample.reasoning == "External thinking."


@pytest.mark.parametrize(
    ("text", "finished", "expected"),
    [
        ("I can't. Not at all. And then", False, "I can't. Not at all."),
        ("no sentence end here", False, ""),
        ("  complete without a stop  ", True, "complete without a stop"),
        ("Version 2.5 is out and", False, ""),
    ],
)
def test_complete_text_trims_truncated_rewrites(text, finished, expected):
    assert dgr.complete_text(text, finished) == expected


def test_template_override(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    good = tmp_path / "t.txt"
    good.write_text("Rewrite {reference} for <<{prompt}>> {not a placeholder}")
    template = dgr.load_template(str(good), dgr.RESPONSE_TEMPLATE)
    fake = FakeGenerate({"q": ["SAFE."]})
    monkeypatch.setattr(dgr, "generate", fake)
    dgr.refine(model, tok, ScriptedJudge(), demos("q"), dgr.RefineSettings(template=template), progress=False)
    expected = chat_text(tok, "Rewrite external refusal to q. for <<q>> {not a placeholder}")
    assert fake.calls[0][0] == [expected]
    assert dgr.load_template(None, "default") == "default"
    bad = tmp_path / "bad.txt"
    bad.write_text("Rewrite {reference}")
    with pytest.raises(UserError, match=r"bad\.txt: template must contain \{prompt\}"):
        dgr.load_template(str(bad), "")
    with pytest.raises(UserError, match="no such template file"):
        dgr.load_template(str(tmp_path / "missing.txt"), "")
    with pytest.raises(UserError, match="refine_template"):
        load_config("dgr", overrides=[f"refine_template={tmp_path / 'missing.txt'}"])


# ---- shift measures ----------------------------------------------------------------------------


def test_sequence_nll_matches_hand_computation(tiny):
    model, tok = tiny
    samples = [
        Demonstration("Write a poem.", "I'm sorry, but I can't.", "a"),
        Demonstration("Explain photosynthesis in plants, step by step.", "No.", "b", "Some reasoning first."),
        Demonstration("Hi", "The capital of France is Paris.", "c"),
    ]
    got = dgr.sequence_nll(model, tok, samples, batch_size=2, progress=False)
    stop = stop_token_ids(tok)[0]
    for d, (total, n) in zip(samples, got, strict=True):
        prompt = encode_prompts(tok, [chat_text(tok, d.prompt)])[0]
        text = (f"{d.reasoning}\n\n" if d.reasoning else "") + d.response
        target = tok(text, add_special_tokens=False)["input_ids"] + [stop]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([prompt + target])).logits[0].log_softmax(-1)
        hand = -sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(target))
        assert n == len(target)
        assert total == pytest.approx(hand, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("I cannot help", "I cannot help", 1.0),
        ("a b c d", "a x c y", 0.5),
        ("Sorry!", "sure thing", 0.0),
        ("", "anything", 0.0),
    ],
)
def test_rouge_l_f1(a, b, expected):
    assert dgr.rouge_l_f1(a, b) == pytest.approx(expected)


def test_refine_dataset_writes_shift(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    answers = {"p0": ["SAFE, I will not do p0."], "p1": ["nope"], "p2": ["SAFE FREE answer here."]}
    samples = demos(*answers)
    monkeypatch.setattr(dgr, "generate", FakeGenerate(answers))
    s = dgr.RefineSettings(retries=1, on_fail="drop")
    data = dgr.refine_dataset(model, tok, ScriptedJudge(), samples, s, tmp_path, {"model": "tiny"}, progress=False)
    assert [d.response for d in data] == ["SAFE, I will not do p0.", "SAFE FREE answer here."]
    shift = json.loads((tmp_path / "shift.json").read_text())
    assert shift["model"] == "tiny"
    assert shift["counts"] == {"total": 3, "refined": 2, "fallback": 0, "dropped": 1, "unchanged": 0}
    assert shift["attempts"] == {"1": 2}
    before = dgr.sequence_nll(model, tok, samples, progress=False)
    after = dgr.sequence_nll(model, tok, data, progress=False)
    assert shift["nll"]["before"] == pytest.approx(sum(v for v, _ in before) / sum(n for _, n in before))
    assert shift["nll"]["after"] == pytest.approx(sum(v for v, _ in after) / sum(n for _, n in after))
    assert shift["nll"]["tokens_after"] == sum(n for _, n in after)
    refined_before = [before[0], before[2]]
    assert shift["nll"]["refined_only_before"] == pytest.approx(
        sum(v for v, _ in refined_before) / sum(n for _, n in refined_before)
    )
    free = FREE
    assert shift["similarity"]["before"] == pytest.approx(sum(dgr.rouge_l_f1(d.response, free) for d in samples) / 3)
    assert shift["similarity"]["after"] == pytest.approx(
        (dgr.rouge_l_f1(data[0].response, free) + dgr.rouge_l_f1(data[1].response, free)) / 2
    )
    assert shift["settings"]["on_fail"] == "drop" and "{reference}" in shift["settings"]["template"]
    rows = [json.loads(line) for line in (tmp_path / "refined.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["refined", "refined"]
    assert rows[0]["original_response"] == samples[0].response and rows[0]["free_answer"] == free
    assert dgr.read_refined(tmp_path / "refined.jsonl") == data
    # refined.jsonl is itself a demonstration file the sft preset can train on
    assert [d.response for d in load_demonstrations(str(tmp_path / "refined.jsonl"))] == [d.response for d in data]


# ---- CLI and the dgr preset --------------------------------------------------------------------


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_refine_cli_user_jsonl_errors_name_the_line(tmp_path, capsys):
    out = str(tmp_path / "o")
    bad = write_jsonl(
        tmp_path / "ext.jsonl",
        [{"prompt": "a", "response": "no"}, {"prompt": "b", "reasoning": 3, "response": "no"}],
    )
    assert main(["refine", "--model", "nowhere/at/all", "--data", bad, "--out", out]) == 2
    assert f"{bad}:2: 'reasoning' must be a string" in one_line_error(capsys)
    bad = write_jsonl(tmp_path / "ext2.jsonl", [{"prompt": "a", "response": "no"}, {"prompt": "b"}])
    assert main(["refine", "--data", bad, "--out", out]) == 2
    assert f"{bad}:2: missing non-empty 'response'" in one_line_error(capsys)
    bad = write_jsonl(tmp_path / "ext3.jsonl", [{"response": "no"}])
    assert main(["refine", "--data", bad, "--out", out]) == 2
    assert f"{bad}:1: no non-empty prompt" in one_line_error(capsys)
    assert main(["refine", "--data", "builtin:nope", "--out", out]) == 2
    assert "nope" in one_line_error(capsys)
    assert main(["refine", "--data", bad, "--out", out, "--template", str(tmp_path / "none.txt")]) == 2
    assert "no such template file" in one_line_error(capsys)


def test_refine_cli_on_tiny_model(tiny_dir, tmp_path, capsys):
    harmful, _ = write_sources(tmp_path / "data")
    out = tmp_path / "o"
    argv = ["refine", "--model", tiny_dir, "--data", "builtin:r1act", "--harmful", harmful, "--out", str(out)]
    argv += ["--n-samples", "3", "--retries", "1", "--max-new-tokens", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    shift = json.loads((out / "shift.json").read_text())
    c = shift["counts"]
    assert c["total"] == 3 and c["refined"] + c["fallback"] + c["dropped"] == 3
    assert shift["data"] == "builtin:r1act" and shift["settings"]["retries"] == 1
    assert f"| {shift['nll']['before']:.3f} | {shift['nll']['after']:.3f} |" in printed
    assert "## Refinement (DGR)" in printed and f"{c['fallback']} fell back" in printed
    assert len((out / "refined.jsonl").read_text().splitlines()) == 3 - c["dropped"]


def test_dgr_run_trains_on_refined_targets(tiny_dir, tmp_path, monkeypatch):
    from safedistill.engine import sft

    harmful, benign = write_sources(tmp_path / "data")
    prompts = [d.prompt for d in load_demonstrations("builtin:directrefusal", harmful_source=harmful)]
    monkeypatch.setattr(dgr, "generate", FakeGenerate({p: [f"I can't help with: {p}"] for p in prompts}))
    seen = []
    original = sft.SFTStep.__call__

    def spy(self, model, batch, step, micro):
        seen.extend(d.response for d in batch)
        return original(self, model, batch, step, micro)

    monkeypatch.setattr(sft.SFTStep, "__call__", spy)
    out = tmp_path / "run"
    argv = ["run", "dgr", "--model", tiny_dir, "--out", str(out), "--set", f"harmful_source={harmful}"]
    argv += ["--set", f"benign_source={benign}", "--set", "n_samples=3", "--set", "batch_size=2"]
    argv += ["--set", "steps=2", "--set", "eval=false", "--set", "lora_r=4", "--set", "max_new_tokens=6"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "refined.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["status"] == "refined" for r in rows)
    assert seen and set(seen) <= {r["response"] for r in rows}
    assert all(s.startswith("I can't help with: ") for s in seen)
    shift = json.loads((out / "shift.json").read_text())
    assert shift["counts"]["refined"] == 3 and shift["n_samples"] == 3
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert "## Refinement (DGR)" in (out / "report.md").read_text()


@pytest.mark.integration
def test_refine_lowers_nll_on_default_model(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFEDISTILL_CACHE", raising=False)  # the real model and benchmark cache
    argv = ["refine", "--data", "builtin:directrefusal", "--out", str(tmp_path), "--n-samples", "4"]
    assert main(argv) == 0
    shift = json.loads((tmp_path / "shift.json").read_text())
    assert shift["counts"]["refined"] >= 1
    assert shift["nll"]["refined_only_after"] < shift["nll"]["refined_only_before"]
