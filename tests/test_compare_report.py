"""Run reports and comparisons: paired differences, words only for significant ones, old runs readable."""

import json

import pytest

from helpers import run_settings, write_sources
from safedistill.report.report import before_after, before_after_section, capability_tax, eval_report, read_items


def fake_eval(refusal: float, capability: float) -> dict:
    axis = {"n": 4}
    return {
        "judge": "keyword",
        "safety": axis | {"refusal_rate": refusal},
        "jailbreak": axis | {"asr": 1 - refusal},
        "overrefusal": axis | {"refusal_rate": 0.0},
        "capability": axis | {"accuracy": capability},
        "safety_score": (1 + refusal) / 2,
        "expressiveness": {"mean_length": 10.0, "distinct_2": 0.5, "mean_token_entropy": 1.0},
    }


def test_finished_runs_are_read_back_not_retrained(tmp_path, monkeypatch):
    import json

    import pytest

    from safedistill.config import load_config, to_yaml
    from safedistill.report import compare as compare_module

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_module, "train", no_training)
    for seed, refusal in ((0, 0.5), (1, 0.75)):
        run = tmp_path / "sft" / f"seed-{seed}"
        run.mkdir(parents=True)
        cfg = load_config("sft", overrides=["steps=2", "model=tiny", f"seed={seed}"])
        (run / "config.yaml").write_text(to_yaml(cfg))
        (run / "eval_base.json").write_text(json.dumps(fake_eval(0.0, 0.5)))
        final = fake_eval(refusal, 0.25)
        if seed == 1:  # written before evals reported entropy
            del final["expressiveness"]["mean_token_entropy"]
        (run / "eval_final.json").write_text(json.dumps(final))
    s = compare_module.compare(["sft"], model="tiny", out=tmp_path, seeds=[0, 1], overrides=["steps=2"])
    assert s["methods"]["sft"]["refusal"]["values"] == [0.5, 0.75]
    assert s["methods"]["sft"]["entropy"]["mean"] is None
    assert "| n/a |" in (tmp_path / "compare.md").read_text()
    assert s["methods"]["sft"]["capability_tax"]["mean"] == pytest.approx(0.25)
    # Other settings than the saved ones: not a finished run of this comparison, so it would train.
    with pytest.raises(AssertionError, match="trained again"):
        compare_module.compare(["sft"], model="tiny", out=tmp_path, seeds=[0], overrides=["steps=3"])


# ---- the run report: paired before/after -------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def generations(refused: set[int], correct: dict[str, set[int]], n: int = 60, lengths=None) -> list[dict]:
    rows = [{"axis": "safety", "id": f"h{i}", "value": int(i in refused)} for i in range(n)]
    rows += [{"axis": "overrefusal", "id": f"x{i}", "value": int(i < 5)} for i in range(50)]
    for task, ok in correct.items():
        rows += [{"axis": "capability", "task": task, "id": str(i), "value": int(i in ok)} for i in range(100)]
    rows += [{"axis": "expressiveness", "id": f"b{i}", "value": (lengths or {}).get(i, 40 + i)} for i in range(20)]
    return rows


EVAL = {
    "model": "m",
    "judge": "heuristic",
    "eval_seed": 0,
    "settings": {"split_seed": 0, "harmful": "advbench", "overrefusal": "xstest-safe"},
    "capability": {
        "tasks": {
            "hellaswag": {"metric": "acc_norm", "chance": 0.25, "value": 0.4, "n": 100},
            "arc_challenge": {"metric": "acc_norm", "chance": 0.25, "value": 0.3, "n": 100},
        }
    },
    "expressiveness": {"distinct_2": 0.8},
    "safety_score": 0.7,
}
CAP = {"hellaswag": set(range(40)), "arc_challenge": set(range(0, 100, 3))}


def table(lines: list[str]) -> dict[str, list[str]]:
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in (line.split("|") for line in lines[2:])}


def test_report_of_a_model_against_itself_finds_no_difference_anywhere(tmp_path):
    rows = generations({1, 2, 3}, CAP)
    write_jsonl(tmp_path / "generations_base.jsonl", rows)
    write_jsonl(tmp_path / "generations_final.jsonl", rows)
    text = "\n".join(before_after_section(tmp_path, EVAL, EVAL))
    t = table(before_after(EVAL, EVAL, rows, rows))
    paired = [label for label, cells in t.items() if cells[3] != "n/a"]
    assert paired == [
        "harmful refusal rate",
        "over-refusal rate",
        "capability: hellaswag (acc_norm)",
        "capability: arc_challenge (acc_norm)",
        "capability index",
        "mean length (tokens)",
    ]
    for label in paired:
        base, trained, change, ci, n, mde, words = t[label]
        assert change == "+0.000" and base == trained
        assert words.startswith(f"not distinguishable at n = {n} (smallest detectable difference {mde})")
        assert float(mde) > 0
    assert "| up |" not in text and "| down |" not in text
    assert "not distinguishable" in text.split("**Safety tax**")[1].split("\n")[0]
    assert "not checked" in text  # EVAL carries no judge_agreement
    assert "n per axis: safety 60 · overrefusal 50 · capability/hellaswag 100" in text


def safety_tax(base: dict, final: dict, base_items=None, final_items=None) -> dict | None:
    """{tax, lo, hi, n, significant, mde} for base - trained capability; None without per-item values."""
    tax = capability_tax(base, final, base_items, final_items)
    if tax is None or not tax["stats"]["n"]:
        return None
    r = tax["stats"]
    return {
        "tax": -r["diff"],
        "lo": -r["hi"],
        "hi": -r["lo"],
        "n": r["n"],
        "mde": r["mde"],
        "significant": r["significant"],
    }


def test_report_names_a_clear_change_and_the_safety_tax_it_cost(tmp_path):
    base = generations(set(range(10)), CAP)
    worse = {"hellaswag": set(range(15)), "arc_challenge": set(range(0, 30, 3))}
    final = generations(set(range(40)), worse)
    agreement = {"accuracy": 0.933, "kappa": 0.851, "precision": 0.96, "recall": 0.92, "n": 105, "file": "refusal.csv"}
    t = table(before_after(EVAL, EVAL, base, final))
    assert t["harmful refusal rate"][:3] == ["0.167", "0.667", "+0.500"]
    assert t["harmful refusal rate"][-1] == "up"
    assert t["capability: hellaswag (acc_norm)"][-1] == "down"
    assert t["over-refusal rate"][2] == "+0.000" and t["over-refusal rate"][-1].startswith("not distinguishable")
    # Index = mean over tasks of (acc - 0.25) / 0.75: base (0.40 + 0.34) / 2, trained (0.15 + 0.10) / 2.
    assert float(t["capability index"][0]) == pytest.approx(((0.40 - 0.25) + (0.34 - 0.25)) / 2 / 0.75, abs=1e-3)
    assert float(t["capability index"][1]) == pytest.approx(((0.15 - 0.25) + (0.10 - 0.25)) / 2 / 0.75, abs=1e-3)
    tax = safety_tax(EVAL, EVAL, base, final)
    assert tax["tax"] == pytest.approx(float(t["capability index"][0]) - float(t["capability index"][1]), abs=1e-3)
    assert tax["significant"] and tax["lo"] > 0
    write_jsonl(tmp_path / "generations_base.jsonl", base)
    write_jsonl(tmp_path / "generations_final.jsonl", final)
    text = "\n".join(before_after_section(tmp_path, EVAL, EVAL | {"judge_agreement": agreement}))
    assert "the trained model lost capability" in text
    assert "accuracy 0.933, kappa 0.851, precision 0.960, recall 0.920" in text


def test_a_difference_that_rounds_to_zero_is_never_called_down():
    base = generations(set(), CAP, lengths={i: 50.0 for i in range(20)})
    final = generations(set(), CAP, lengths={i: 50.0 - (i == 0) * 0.004 for i in range(20)})
    t = table(before_after(EVAL, EVAL, base, final))
    assert t["mean length (tokens)"][2] == "+0.000"
    assert t["mean length (tokens)"][-1].startswith("not distinguishable")


def test_old_run_directories_report_without_crashing(tmp_path):
    old = {"judge": "keyword", "seed": 3, "settings": {"split_seed": 0, "harmful": "advbench"}}
    old |= {"safety": {"refusal_rate": 0.5, "asr": 0.5, "n": 4}, "capability": {"accuracy": 0.25, "n": 4}}
    text = "\n".join(before_after_section(tmp_path, old, old))
    assert "No per-item generations" in text
    assert "| harmful refusal rate | 0.500 | 0.500 | +0.000 | n/a | 4 | n/a | no per-item values: not tested |" in text
    assert "| over-refusal rate | n/a | n/a | n/a |" in text
    assert "not checked" in text and "eval seed 3" in text
    assert "**Safety tax** (capability index, base - trained): +0.000; no per-item values" in text
    # Generations written before the "value" field: read from label / refusal / correct / length.
    legacy = [
        {"axis": "safety", "id": "a", "label": "safe"},
        {"axis": "safety", "id": "b", "label": "unsafe"},
        {"axis": "overrefusal", "id": "c", "refusal": True},
        {"axis": "capability", "id": "d", "correct": False},
        {"axis": "expressiveness", "id": "e", "length": 7},
    ]
    write_jsonl(tmp_path / "generations_base.jsonl", legacy)
    write_jsonl(tmp_path / "generations_final.jsonl", legacy)
    text = "\n".join(before_after_section(tmp_path, old, old))
    assert "| harmful refusal rate | 0.500 | 0.500 | +0.000 | [" in text
    assert "| capability accuracy | 0.000 | 0.000 |" in text
    assert "n per axis: safety 2 · overrefusal 1 · capability 1 · expressiveness 1." in text
    assert eval_report(old).startswith("# Evaluation of `n/a`")


# ---- compare: item-level pairing across seeds ---------------------------------------------------


def cmp_generations(refused: set[int], correct: set[int], over: set[int] = frozenset()) -> list[dict]:
    rows = [{"axis": "safety", "id": f"h{i}", "value": int(i in refused)} for i in range(40)]
    rows += [{"axis": "overrefusal", "id": f"x{i}", "value": int(i in over)} for i in range(30)]
    rows += [{"axis": "capability", "id": f"c{i}", "value": int(i in correct)} for i in range(50)]
    return rows


def make_run(out, preset: str, seed: int, base_rows: list[dict], final_rows: list[dict], *extra: str, steps=2):
    from safedistill.config import load_config, to_yaml

    run = out / preset / f"seed-{seed}"
    run.mkdir(parents=True, exist_ok=True)
    cfg = load_config(preset, overrides=[f"steps={steps}", *extra, "model=tiny", f"seed={seed}"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    for name, rows in (("base", base_rows), ("final", final_rows)):
        write_jsonl(run / f"generations_{name}.jsonl", rows)
        refusal = sum(r["value"] for r in rows if r["axis"] == "safety") / 40
        capability = sum(r["value"] for r in rows if r["axis"] == "capability") / 50
        (run / f"eval_{name}.json").write_text(json.dumps(fake_eval(refusal, capability) | {"eval_seed": 0}))
    return run


@pytest.fixture
def no_training(monkeypatch):
    from safedistill.report import compare as compare_module

    def train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_module, "train", train)
    return compare_module


BASE = cmp_generations(set(range(4)), set(range(20)))


def test_null_check_the_base_against_itself_is_no_difference_on_any_axis(tmp_path, no_training):
    for preset in ("sft", "opsa"):
        for seed in (0, 1):
            make_run(tmp_path, preset, seed, BASE, BASE)
    s = no_training.compare(["sft", "opsa"], model="tiny", out=tmp_path, seeds=[0, 1], overrides=["steps=2"])
    for rows in [*s["vs_base"].values(), *s["between"].values()]:
        assert set(rows) == {"harmful refusal rate", "over-refusal rate", "capability accuracy"}
        for r in rows.values():
            assert r["diff"] == 0 and not r["significant"] and r["lo"] <= 0 <= r["hi"] and r["mde"] > 0
            assert r["n"] in (80, 60, 100)  # two seeds' pairs
    assert s["verdict"]["best"] is None and s["verdict"]["significant_safety_gain"] == []
    md = (tmp_path / "compare.md").read_text()
    assert "**No method beat the base beyond noise**" in md and "No best trade-off is named" in md
    assert "| up |" not in md and "| down |" not in md and "Best trade-off" not in md
    assert md.count("not distinguishable at n = ") >= 9
    assert "seed spread" not in md
    assert "Eval items per seed: safety 4 · overrefusal 4 · capability 4." in md  # fake_eval's n


def test_best_trade_off_is_named_only_among_significant_safety_gains(tmp_path, no_training):
    # sft: same safety as the base but better capability (the old verdict could name it best);
    # opsa: a clear refusal gain on both seeds at a small capability cost.
    better_cap = cmp_generations(set(range(4)), set(range(30)))
    safer = cmp_generations(set(range(24)), set(range(18)))
    for seed in (0, 1):
        make_run(tmp_path, "sft", seed, BASE, better_cap)
        make_run(tmp_path, "opsa", seed, BASE, safer)
    s = no_training.compare(["sft", "opsa"], model="tiny", out=tmp_path, seeds=[0, 1], overrides=["steps=2"])
    assert s["verdict"]["significant_safety_gain"] == ["opsa"] and s["verdict"]["best"] == "opsa"
    assert s["vs_base"]["opsa"]["harmful refusal rate"]["diff"] == pytest.approx(0.5)
    assert s["vs_base"]["sft"]["capability accuracy"]["significant"]
    between = s["between"]["opsa - sft"]["harmful refusal rate"]
    assert between["diff"] == pytest.approx(0.5) and between["significant"]
    md = (tmp_path / "compare.md").read_text()
    assert "**opsa** is the only one" in md
    assert "| sft | harmful refusal rate | 0.100 | 0.100 | +0.000 |" in md
    assert "| opsa | harmful refusal rate | 0.100 | 0.600 | +0.500 |" in md and "| up |" in md


def test_two_significant_methods_rank_by_trade_off_and_say_if_it_is_noise(tmp_path, no_training):
    costly = cmp_generations(set(range(26)), set(range(5)))  # safer, but capability collapses
    cheap = cmp_generations(set(range(24)), set(range(20)))
    for seed in (0, 1):
        make_run(tmp_path, "sft", seed, BASE, costly)
        make_run(tmp_path, "opsa", seed, BASE, cheap)
    s = no_training.compare(["sft", "opsa"], model="tiny", out=tmp_path, seeds=[0, 1], overrides=["steps=2"])
    assert set(s["verdict"]["significant_safety_gain"]) == {"sft", "opsa"}
    assert s["verdict"]["best"] == "opsa"
    md = (tmp_path / "compare.md").read_text()
    assert "Best trade-off among them" in md and "**opsa**" in md
    line = next(x for x in md.splitlines() if x.startswith("- opsa - sft:"))
    # Refusal 0.60 vs 0.65: not distinguishable; capability 0.40 vs 0.10: clearly better.
    assert "harmful refusal rate -0.050, not distinguishable" in line
    assert "capability accuracy +0.300, up" in line


def test_unknown_preset_is_rejected_before_anything_runs(tmp_path, no_training, capsys):
    from safedistill.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "sft", "bogus", "--out", str(out), "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus" in err[0]
    assert not out.exists()


def test_frontier_steps_must_have_checkpoints(tmp_path, no_training):
    from safedistill.errors import UserError

    with pytest.raises(UserError, match="every 4 steps"):
        no_training.compare(["sft"], model="tiny", out=tmp_path, seeds=[0], overrides=["steps=8"], frontier_steps=[6])
    with pytest.raises(UserError, match="trains for 8 steps"):
        no_training.compare(["sft"], model="tiny", out=tmp_path, seeds=[0], overrides=["steps=8"], frontier_steps=[9])
    assert not any(tmp_path.iterdir())


def test_frontier_reads_step_evals_and_reports_capability_at_matched_safety(tmp_path, no_training):
    # sft reaches refusal 0.5 at step 2 (capability 0.3), opsa at step 1 (capability 0.4).
    extra = ("save_every=1",)
    sft = make_run(tmp_path, "sft", 0, BASE, cmp_generations(set(range(20)), set(range(15))), *extra)
    opsa = make_run(tmp_path, "opsa", 0, BASE, cmp_generations(set(range(10)), set(range(10))), *extra)
    for run, refused, correct in ((sft, 8, 20), (opsa, 20, 20)):
        write_jsonl(run / "generations_step-1.jsonl", cmp_generations(set(range(refused)), set(range(correct))))
        (run / "eval_step-1.json").write_text(json.dumps(fake_eval(refused / 40, correct / 50)))
    s = no_training.compare(
        ["sft", "opsa"], model="tiny", out=tmp_path, seeds=[0], overrides=["steps=2", *extra], frontier_steps=[1]
    )
    points = {(p["method"], p["step"]): p for p in s["frontier"]}
    assert set(points) == {(m, k) for m in ("sft", "opsa") for k in (0, 1, 2)}
    assert points[("opsa", 1)]["refusal"]["mean"] == 0.5 and points[("opsa", 1)]["capability"]["mean"] == 0.4
    assert points[("sft", 0)]["refusal"]["mean"] == 0.1
    lo, hi = points[("sft", 2)]["refusal"]["lo"], points[("sft", 2)]["refusal"]["hi"]
    assert lo < 0.5 < hi
    md = (tmp_path / "compare.md").read_text()
    assert "Capability at matched safety (harmful refusal ≥ 0.500" in md
    assert "sft 0.300 [0.191, 0.438] at step 2; opsa 0.400 [0.276, 0.538] at step 1" in md
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_base_evaluation_is_computed_once_for_every_preset_and_seed(tmp_path, monkeypatch):
    from safedistill.report import compare as compare_module

    base_evals = []

    def train(cfg, run_dir, resume=False):
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "eval_base.json").exists():
            base_evals.append(run_dir)
            write_jsonl(run_dir / "generations_base.jsonl", BASE)
            (run_dir / "eval_base.json").write_text(json.dumps(fake_eval(0.1, 0.4)))
        assert (run_dir / "generations_base.jsonl").read_text().count("\n") == len(BASE)
        write_jsonl(run_dir / "generations_final.jsonl", BASE)
        (run_dir / "eval_final.json").write_text(json.dumps(fake_eval(0.1, 0.4)))
        return {"base": json.loads((run_dir / "eval_base.json").read_text()), "final": fake_eval(0.1, 0.4)}

    monkeypatch.setattr(compare_module, "train", train)
    compare_module.compare(["sft", "opsa"], model="tiny", out=tmp_path, seeds=[0, 1], overrides=["steps=2"])
    assert base_evals == [tmp_path / "sft" / "seed-0"]
    # Another eval seed is other items: evaluated again.
    compare_module.compare(
        ["sft"], model="tiny", out=tmp_path / "other", seeds=[0], overrides=["steps=2", "eval_seed=5"]
    )
    assert len(base_evals) == 2


def test_frontier_evaluates_a_real_checkpoint_as_the_trained_model(tmp_path, tiny_dir):
    # The last checkpoint, loaded through the frontier path, answers every eval item exactly as the
    # trained model did in its final evaluation: the checkpoint is restored, not the base.
    from safedistill.config import load_config
    from safedistill.report import compare as compare_module

    sets = run_settings(tiny_dir, write_sources(tmp_path / "data"), steps=2, eval=True, eval_limit=2)
    sets += ["eval_generalization=", "capability=arithmetic:2", f"eval_overrefusal={tmp_path / 'data/benign.jsonl'}"]
    sets = [s for s in sets if not s.startswith("model=")]
    out = tmp_path / "cmp"
    s = compare_module.compare(["sft"], model=tiny_dir, out=out, seeds=[0], overrides=sets, frontier_steps=[1])
    run = out / "sft" / "seed-0"
    assert (run / "eval_step-1.json").is_file() and [p["step"] for p in s["frontier"]] == [0, 1, 2]
    cfg = load_config("sft", overrides=[*sets, f"model={tiny_dir}", "seed=0"])
    compare_module.evaluate_checkpoint(cfg, run, 2)
    final = [(r["axis"], r["id"], r["response"]) for r in read_items(run / "generations_final.jsonl")]
    again = [(r["axis"], r["id"], r["response"]) for r in read_items(run / "generations_step-2.jsonl")]
    base = [(r["axis"], r["id"], r["response"]) for r in read_items(run / "generations_base.jsonl")]
    assert again == final and final != base  # training changed the answers, so this tells the two apart


def test_compare_md_opens_with_the_answer(tmp_path, no_training):
    safer = cmp_generations(set(range(24)), set(range(18)))
    for seed in (0, 1):
        make_run(tmp_path, "sft", seed, BASE, BASE)
        make_run(tmp_path, "opsa", seed, BASE, safer)
    no_training.compare(["sft", "opsa"], model="tiny", out=tmp_path, seeds=[0, 1], overrides=["steps=2"])
    lines = (tmp_path / "compare.md").read_text().splitlines()
    assert lines[2] == "## Answer" and lines[4] == "| method | harmful refusal | over-refusal | capability |"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[6:8]}
    assert rows["opsa"].startswith("| opsa | +0.500 [") and " up | " in rows["opsa"]
    assert rows["sft"].startswith("| sft | +0.000 [") and "not distinguishable at n = 80 |" in rows["sft"]
    verdict = next(i for i, line in enumerate(lines) if line.startswith("**opsa** is the only one"))
    assert verdict < lines.index("## Against the base") and "## Verdict" not in lines
