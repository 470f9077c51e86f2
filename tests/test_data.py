"""Built-in data, splits, user JSONL and hf: sources, and the reasoning problems (all offline)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from safedistill.data.packaged import Manifest
from safedistill.data.reasoning import (
    INSTRUCTION,
    extract_answer,
    generate_problems,
    is_correct,
)
from safedistill.data.schema import PromptRecord
from safedistill.data.sources import (
    NAMED_SOURCES,
    builtin_bytes,
    load_demonstrations,
    load_prompts,
    read_jsonl,
)
from safedistill.data.splits import split_records, take
from safedistill.errors import UserError

pytestmark = pytest.mark.usefixtures("isolated_cache")

AXES = {
    "strength": {"mild", "moderate", "strong"},
    "length": {"short", "medium", "long"},
    "framing": {"rule", "identity", "consequence", "example", "instruction"},
    "specificity": {"generic", "category", "explicit"},
    "style": {"formal", "plain", "terse", "persona"},
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def records(n: int, prefix: str = "r") -> list[PromptRecord]:
    return [PromptRecord(f"{prefix}-{i:04d}", f"prompt {i}") for i in range(n)]


# ---- built-in sets -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "minimum"), [("overrefusal", 100), ("benign", 200)])
def test_builtin_prompt_sets(name, minimum):
    manifest = Manifest()
    recs = load_prompts(name, manifest)
    assert len(recs) >= minimum
    assert len({r.id for r in recs}) == len(recs)
    assert all(r.prompt.strip() and r.category and r.source == name for r in recs)
    assert len({r.category for r in recs}) >= 5
    (entry,) = manifest.entries
    assert entry.source == name and entry.count == len(recs)
    assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256)


def test_builtin_contexts():
    rows = [json.loads(line) for line in builtin_bytes("contexts.jsonl").decode().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["text"].strip() for r in rows)
    harmful = [r for r in rows if r["side"] == "harmful"]
    benign = [r for r in rows if r["side"] == "benign"]
    assert len(harmful) >= 30
    assert len(benign) >= 1
    assert {r["side"] for r in rows} == {"harmful", "benign"}
    for axis, allowed in AXES.items():
        values = Counter(r[axis] for r in harmful)
        assert len(values) >= 2, axis
        assert set(values) <= allowed, (axis, values)


def test_constitution_mentions_helpfulness():
    text = builtin_bytes("constitution.md").decode()
    assert len(text) > 500
    assert "helpful" in text.lower()
    assert "over-refusal" in text.lower()


def test_builtin_safety_demos():
    manifest = Manifest()
    demos = load_demonstrations("builtin:safety_demos", manifest)
    assert len(demos) >= 50
    assert all(d.prompt.strip() and d.response.strip() for d in demos)
    assert len({d.id for d in demos}) == len(demos)
    assert all(d.source == "builtin:safety_demos" for d in demos)
    assert manifest.entries[0].count == len(demos)


def test_unknown_builtin_demonstrations():
    with pytest.raises(UserError, match="no_such_set"):
        load_demonstrations("builtin:no_such_set")


def test_user_demonstrations(tmp_path):
    good = write_lines(
        tmp_path / "demos.jsonl",
        [json.dumps({"prompt": "Hi", "response": "Hello!", "reasoning": "greet"})],
    )
    (d,) = load_demonstrations(str(good))
    assert (d.prompt, d.response, d.reasoning, d.id) == ("Hi", "Hello!", "greet", "demo-0001")
    bad = write_lines(
        tmp_path / "bad.jsonl",
        [json.dumps({"prompt": "Hi", "response": "Hello!"}), json.dumps({"prompt": "Hi"})],
    )
    with pytest.raises(UserError, match=r"bad\.jsonl:2: missing non-empty 'response'"):
        load_demonstrations(str(bad))
    with pytest.raises(UserError, match="empty"):
        load_demonstrations(str(write_lines(tmp_path / "empty.jsonl", [])))


# ---- splits ------------------------------------------------------------------------------------


def test_split_deterministic_disjoint_covering():
    recs = records(500)
    train, held = split_records(recs, seed=3)
    train2, held2 = split_records(recs, seed=3)
    assert train == train2 and held == held2
    train_ids, held_ids = {r.id for r in train}, {r.id for r in held}
    assert not train_ids & held_ids
    assert train_ids | held_ids == {r.id for r in recs}
    assert len(train) + len(held) == len(recs)
    assert all(r.split == "train" for r in train) and all(r.split == "eval" for r in held)
    assert 0.12 < len(held) / len(recs) < 0.28  # eval_fraction 0.2
    # Order within each side follows the input.
    assert [r.id for r in train] == sorted(train_ids)


def test_split_eval_fraction():
    recs = records(1000)
    _, held = split_records(recs, seed=0, eval_fraction=0.5)
    assert 0.43 < len(held) / len(recs) < 0.57
    assert split_records(recs, eval_fraction=0.0)[1] == []
    assert split_records(recs, eval_fraction=1.0)[0] == []


def test_split_differs_across_seeds():
    recs = records(300)
    held = [{r.id for r in split_records(recs, seed=s)[1]} for s in range(3)]
    assert held[0] != held[1] and held[1] != held[2]


def test_split_stable_when_records_added():
    recs = records(300)
    side = {r.id: r.split for part in split_records(recs, seed=7) for r in part}
    more = records(300) + records(200, prefix="new")
    side_after = {r.id: r.split for part in split_records(more[::-1], seed=7) for r in part}
    assert all(side_after[i] == s for i, s in side.items())


def test_take_is_seeded():
    recs = records(100)
    a = take(recs, 10, seed=1)
    assert len(a) == 10
    assert a == take(recs, 10, seed=1)
    assert a != take(recs, 10, seed=2)
    assert set(r.id for r in a) <= {r.id for r in recs}
    assert len({r.id for r in a}) == 10
    assert take(recs, 5, seed=1) == a[:5]  # a larger limit extends a smaller one
    everything = take(recs, None, seed=1)
    assert sorted(r.id for r in everything) == [r.id for r in recs]
    assert everything != recs  # shuffled
    assert recs == records(100)  # input not mutated
    assert take(recs, 1000, seed=0) == take(recs, None, seed=0)


# ---- user JSONL --------------------------------------------------------------------------------


def test_user_jsonl_loads(tmp_path):
    path = write_lines(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"id": "a", "prompt": "First prompt", "category": "x"}),
            "",
            json.dumps({"instruction": "Second prompt"}),
            json.dumps({"goal": "Third prompt", "prompt": "   "}),
            json.dumps({"question": "Ünïcödé ’ prompt"}),
        ],
    )
    manifest = Manifest()
    recs = load_prompts(str(path), manifest)
    assert [r.prompt for r in recs] == [
        "First prompt",
        "Second prompt",
        "Third prompt",
        "Ünïcödé ’ prompt",
    ]
    assert recs[0].id == "a" and recs[0].category == "x"
    assert recs[1].id == "mine-0002"
    assert all(r.source == str(path) for r in recs)
    (entry,) = manifest.entries
    assert entry.count == 4 and entry.package == "user file"


def test_user_jsonl_malformed_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok"}), "{not json"])
    with pytest.raises(UserError) as e:
        load_prompts(str(path))
    assert f"{path}:2:" in str(e.value)
    assert "\n" not in str(e.value)


def test_user_jsonl_not_an_object(tmp_path):
    path = write_lines(tmp_path / "list.jsonl", [json.dumps({"prompt": "ok"}), "[1, 2]"])
    with pytest.raises(UserError, match=r"list\.jsonl:2: expected a JSON object"):
        load_prompts(str(path))


def test_user_jsonl_missing_prompt_field(tmp_path):
    path = write_lines(
        tmp_path / "noprompt.jsonl",
        [json.dumps({"prompt": "ok"}), json.dumps({"prompt": "ok"}), json.dumps({"text2": "x"})],
    )
    with pytest.raises(UserError) as e:
        load_prompts(str(path))
    assert f"{path}:3:" in str(e.value)
    assert "prompt" in str(e.value)


@pytest.mark.parametrize("lines", [[], ["", "   "]])
def test_user_jsonl_empty(tmp_path, lines):
    path = write_lines(tmp_path / "empty.jsonl", lines)
    with pytest.raises(UserError, match="empty"):
        load_prompts(str(path))


def test_user_jsonl_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_prompts(str(tmp_path / "absent.jsonl"))
    with pytest.raises(UserError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_unknown_source_lists_known_ones():
    with pytest.raises(UserError) as e:
        load_prompts("no-such-source")
    message = str(e.value)
    assert "no-such-source" in message
    for name in NAMED_SOURCES:
        assert name in message


# ---- hf: sources -------------------------------------------------------------------------------


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    rows = [{"id": f"q{i}", "prompt": f"question {i}", "category": "c"} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    manifest = Manifest()
    recs = load_prompts(f"hf:{tmp_path / 'ds'}", manifest)
    assert [(r.id, r.prompt, r.category) for r in recs] == [(f"q{i}", f"question {i}", "c") for i in range(5)]
    assert manifest.entries[0].count == 5


def test_hf_dataset_dict_split_from_disk(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"goal": "train goal"}]),
        test=datasets.Dataset.from_list([{"goal": "test goal 1"}, {"goal": "test goal 2"}]),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    recs = load_prompts(f"hf:{tmp_path / 'dd'}:test")
    assert [r.prompt for r in recs] == ["test goal 1", "test goal 2"]
    assert [r.prompt for r in load_prompts(f"hf:{tmp_path / 'dd'}")] == ["train goal"]


def test_hf_dataset_without_prompt_field(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"foo": "bar"}]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match="row 0"):
        load_prompts(f"hf:{tmp_path / 'ds'}")


# ---- reasoning problems ------------------------------------------------------------------------


def recompute(question: str) -> int:
    """The answer, recomputed from the question text alone."""
    if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question):
        a, op, b = int(m[1]), m[2], int(m[3])
        return {"+": a + b, "-": a - b, "*": a * b}[op]
    if m := re.search(r"has (\d+) \w+\. \w+ gets (\d+) more and then gives away (\d+)\.", question):
        return int(m[1]) + int(m[2]) - int(m[3])
    if m := re.search(r"buys (\d+) boxes with (\d+) \w+ in each box and already had (\d+)\.", question):
        return int(m[1]) * int(m[2]) + int(m[3])
    if m := re.search(r"shares (\d+) \w+ equally among (\d+) friends\.", question):
        total, friends = int(m[1]), int(m[2])
        assert total % friends == 0, question
        return total // friends
    raise AssertionError(f"unrecognised question: {question}")


def test_problems_are_seeded():
    a = generate_problems(30, seed=0)
    assert a == generate_problems(30, seed=0)
    b = generate_problems(30, seed=1)
    assert [p.question for p in a] != [p.question for p in b]
    assert generate_problems(10, seed=0) == a[:10]


def test_problem_levels_and_ids():
    problems = generate_problems(90, seed=5)
    assert Counter(p.level for p in problems) == {1: 30, 2: 30, 3: 30}
    assert [p.level for p in problems[:6]] == [1, 2, 3, 1, 2, 3]
    assert len({p.id for p in problems}) == 90
    assert all(p.prompt == f"{p.question} {INSTRUCTION}" for p in problems)
    only3 = generate_problems(12, seed=5, levels=(3,))
    assert {p.level for p in only3} == {3}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_problem_answers_are_correct(seed):
    problems = generate_problems(600, seed=seed)
    for p in problems:
        assert recompute(p.question) == p.answer, p
        assert p.answer >= 0
    # All three word-problem kinds occur.
    kinds = {re.search(r"gives away|boxes|shares", p.question)[0] for p in problems if p.level == 3}
    assert kinds == {"gives away", "boxes", "shares"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", 42),
        ("answer: -3", -3),
        ("Answer: 1,234 apples", 1234),
        ("It is 3.5 in total", 3.5),
        ("2 + 3 = 5", 5),
        ("The answer is 7, not 8", 7),
        ("First 5 then 6. The answer is 12 apples, and 3 left over. Answer is 9", 9),
        ("No numbers here.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "answer", "ok"),
    [
        ("The answer is 12.", 12, True),
        ("12.0", 12, True),
        ("So she has 13 apples.", 12, False),
        ("I don't know.", 12, False),
        ("", 0, False),
        ("The answer is 0", 0, True),
    ],
)
def test_is_correct(text, answer, ok):
    assert is_correct(text, answer) is ok


def test_user_jsonl_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt": "ok"}).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(UserError) as e:
        load_prompts(str(path))
    assert f"{path}:2: not UTF-8 text (byte 0xe9 at column 16)" in str(e.value)
    assert "\n" not in str(e.value)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "ok"}).encode() + b"\n")
    assert [r.prompt for r in load_prompts(str(bom))] == ["ok"]
