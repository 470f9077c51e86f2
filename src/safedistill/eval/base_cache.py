"""The base model evaluated once: a finished evaluation kept under the cache directory, keyed by
everything that determines it, and reused by every run, seed and compare that would write the
same file.

The key hashes the model's files (weights, config, tokenizer; an adapter's files too), the eval
settings, the items themselves (every prompt and capability item as loaded, the S ids, the data
files' sha256), the judge (its name and, for a model judge, its files), the code (package version
plus the source files the evaluation runs, listed in CODE) and where it runs (torch and
transformers versions, device, dtype, CPU threads). An input that cannot be hashed (a hub model
not in the local cache) turns the cache off for that call: a reuse is never a guess.

Entries live in `<cache dir>/evals/<key>/` (eval.json, generations.jsonl, inputs.json: what was
hashed and which run first wrote it); `safedistill cache clear` removes them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from ..files import cache_dir, dumps, read_log, sha256_file, write_json, write_jsonl

# Sources whose code decides what an evaluation writes (relative to the package). A test checks
# that importing the evaluation loads no other safedistill module.
CODE = (
    "__init__.py",
    "errors.py",
    "files.py",
    "console.py",
    "config.py",  # the eval section: a field settings_record would miss still changes the key
    "models.py",
    "eval",
    "data",
    "engine/__init__.py",
    "engine/decode.py",
    "engine/rollout.py",
    "engine/scoring.py",
)


def entries_dir() -> Path:
    """Where cached evaluations live."""
    return cache_dir() / "evals"


_file_hashes: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within the process (a compare run
    hashes the same 500 MB of weights once)."""
    real = path.resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _file_hashes:
        _file_hashes[key] = sha256_file(real)
    return _file_hashes[key]


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of a model folder's top-level files (what the loaders
    read: weights, config, tokenizer, adapter)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f"{path.name}\0{file_digest(path)}\n".encode())
    return h.hexdigest()


def model_digest(name: str) -> str | None:
    """The digest of a model's files by name (bundled alias, local folder or cached hub id), or
    None when its files cannot be found locally."""
    from ..models import resolve_model

    try:
        path = Path(resolve_model(name))
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure to find the files means: do not cache
        return None
    return folder_digest(path)


def judge_digest(spec: str) -> str | None:
    """The judge's name, and for a model judge the digest of its files."""
    from .judging import OFFLINE_JUDGES

    if spec in OFFLINE_JUDGES:
        return spec
    _, sep, target = spec.partition(":")
    digest = model_digest(target if sep else spec)
    return None if digest is None else f"{spec}@{digest}"


def code_digest() -> str:
    """Package version plus the sha256 of every source file in CODE."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(__version__.encode())
    for entry in CODE:
        files = sorted((root / entry).rglob("*.py")) if (root / entry).is_dir() else [root / entry]
        for path in files:
            h.update(f"{path.relative_to(root)}\0{file_digest(path)}\n".encode())
    return h.hexdigest()


def items_digest(judge, settings, sources) -> str:
    """sha256 of every item the evaluation will answer, as loaded (prompts, jailbreak templates,
    rephrasings, capability items, S), and the data files they came from."""
    from .capability import load_task_items
    from .evaluate import load_items

    items = load_items(judge, settings, sources)
    payload = {
        "harmful": [asdict(r) for r in items.harmful],
        "overrefusal": [asdict(r) for r in items.overrefusal],
        "benign": [asdict(r) for r in items.benign],
        "rephrased": {k: [asdict(r) for r in v] for k, v in items.rephrased.items()},
        "jailbreak": [asdict(r) for r in items.jailbreak],
        "basket": items.basket,
        "capability": {name: repr(load_task_items(name, n, settings.eval_seed, None)) for name, n in items.basket},
        "safety_ids": items.safety_ids,
        "manifest": items.manifest.to_list(),
        "agreement": items.agreement,
    }
    return hashlib.sha256(dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()


def runtime() -> dict:
    """Where the evaluation runs: results can differ in the last bits across these."""
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }


@dataclass(frozen=True)
class EvalInputs:
    """What determines an evaluation's files."""

    model: str  # the name, for the reader; the digest below is what counts
    model_digest: str
    adapter_digest: str | None
    device: str
    dtype: str
    judge: str
    settings: dict
    items: str
    code: str
    runtime: dict

    @property
    def key(self) -> str:
        return hashlib.sha256(dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


def eval_inputs(
    model, model_name: str, adapter: str | None, judge, judge_spec: str, settings, sources
) -> EvalInputs | None:
    """The inputs of evaluating `model` (loaded from `model_name`, with `adapter` if any) with the
    eval section `settings` on `sources` (eval/evaluate.py), or None when one cannot be hashed."""
    from .evaluate import settings_record

    weights = model_digest(model_name)
    adapter_hash = folder_digest(Path(adapter)) if adapter and Path(adapter).is_dir() else None
    judge_hash = judge_digest(judge_spec)
    if weights is None or judge_hash is None or (adapter and adapter_hash is None):
        return None
    param = next(model.parameters())
    device = str(param.device.type) + (f":{torch.cuda.get_device_name(param.device)}" if param.is_cuda else "")
    return EvalInputs(
        model=model_name,
        model_digest=weights,
        adapter_digest=adapter_hash,
        device=device,
        dtype=str(param.dtype),
        judge=judge_hash,
        settings=settings_record(settings, sources),
        items=items_digest(judge, settings, sources),
        code=code_digest(),
        runtime=runtime(),
    )


@dataclass
class Cached:
    """A cached evaluation: its results, generations and where it was first computed."""

    results: dict
    generations: list[dict]
    folder: Path
    origin: str | None


def lookup(inputs: EvalInputs) -> Cached | None:
    folder = entries_dir() / inputs.key
    try:
        meta = json.loads((folder / "inputs.json").read_text())
        if meta.get("inputs") != json.loads(dumps(asdict(inputs))):
            return None  # a key collision or a hand-edited entry: never reuse on a mismatch
        results = json.loads((folder / "eval.json").read_text())
        generations = read_log(folder / "generations.jsonl")
    except (OSError, ValueError):
        return None
    return Cached(results, generations, folder, meta.get("origin"))


def store(inputs: EvalInputs, results: dict, generations: list[dict], origin: str) -> Path:
    """Write an entry whole or not at all: built in a temporary folder, then renamed into place
    (a concurrent writer of the same key loses the race harmlessly)."""

    def write(tmp: Path) -> None:
        write_jsonl(tmp / "generations.jsonl", generations)
        write_json(tmp / "eval.json", results)
        write_json(tmp / "inputs.json", {"inputs": asdict(inputs), "origin": origin})

    return _publish(entries_dir(), inputs.key, write)


def _publish(root: Path, key: str, write: Callable[[Path], None]) -> Path:
    """`root/key`, written by `write` into a temporary folder beside it and renamed into place: an
    entry is whole or absent, and a failed write (disk full) leaves no half entry."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / key
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
    try:
        write(tmp)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def clear() -> tuple[int, int]:
    """Remove every cached evaluation and context search; returns how many of each there were."""
    counts = []
    for root in (entries_dir(), cache_dir() / "searches"):
        counts.append(
            sum(1 for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else 0
        )
        shutil.rmtree(root, ignore_errors=True)
    return counts[0], counts[1]


def evaluate_once(
    compute: Callable[[], tuple[dict, list[dict]]], inputs: EvalInputs | None, origin: str
) -> tuple[dict, list[dict], Cached | None]:
    """(results, generations, the cache entry reused or None): the cached evaluation for these
    inputs when there is one, else `compute()`, stored for the next caller."""
    if inputs is not None:
        hit = lookup(inputs)
        if hit is not None:
            return hit.results, hit.generations, hit
    results, generations = compute()
    if inputs is not None:
        store(inputs, results, generations, origin)
    return results, generations, None


REUSED = "eval_base_reused.json"  # in a run directory: where its base evaluation was reused from
EVAL_REUSED = "eval_reused.json"  # in a `safedistill eval` directory: the same note


def evaluate_cached(
    compute: Callable[[], tuple[dict, list[dict]]], inputs: EvalInputs | None, out: Path, note: str, what: str
) -> tuple[dict, list[dict], Cached | None]:
    """`evaluate_once` for a command writing into `out`: on a hit `out/note` names the entry and
    the directory that first computed it (the report quotes it) and the console says so; on a
    miss a stale note from an earlier call into the same directory is removed."""
    from .. import console

    results, generations, hit = evaluate_once(compute, inputs, origin=str(Path(out).resolve()))
    path = Path(out) / note
    if hit is None:
        path.unlink(missing_ok=True)
        return results, generations, None
    write_json(path, {"cache": str(hit.folder), "origin": hit.origin, "key": inputs.key if inputs else None})
    console.say(f"reused the {what} from {hit.folder} (first computed by {hit.origin or 'an earlier run'})")
    return results, generations, hit


def evaluate_base(
    compute: Callable[[], tuple[dict, list[dict]]],
    model,
    model_name: str,
    judge,
    judge_spec: str,
    settings,
    sources,
    out: Path,
) -> tuple[dict, list[dict]]:
    """A run's base evaluation, reused from the cache when one with the same inputs exists (the
    run directory then holds REUSED). Either way the random streams the training draws from are
    left as they were (greedy evaluation draws none; this makes sure)."""
    inputs = eval_inputs(model, model_name, None, judge, judge_spec, settings, sources)
    state = random.getstate()
    with torch.random.fork_rng():  # a hit and a miss leave the run's random streams alike
        results, generations, _ = evaluate_cached(compute, inputs, out, REUSED, "base evaluation")
    random.setstate(state)
    return results, generations


def reuse_line(out: Path, note: str = REUSED, what: str = "base evaluation") -> str | None:
    """The report's sentence on a reused evaluation, or None when it was computed here."""
    path = Path(out) / note
    if not path.is_file():
        return None
    note_data = json.loads(path.read_text())
    return (
        f"The {what} was reused from the cache (`{note_data['cache']}`), first computed by "
        f"`{note_data.get('origin') or 'an earlier run'}`: same model files, eval settings and items, judge and code."
    )


# ---- the context search, computed once ----------------------------------------------------------
# The same idea for the context search that runs before step 1 (searches/context.py): its
# flip_rates.json depends on the model, the judge, the prompts, the contexts, the answer length and
# the code, and every run of a preset on the same model repeats it. Keyed by the model's parameter
# values themselves (whatever adapter or training they carry), so no file name can stand in.

SEARCH_CODE = ("searches/context.py", "teachers/context.py")
SEARCH_REUSED = "flip_rates_reused.json"  # in a run directory: where its context search came from


def searches_dir() -> Path:
    """Where cached searches live (`safedistill cache clear` removes them with the evaluations)."""
    return cache_dir() / "searches"


def params_digest(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) as the model holds them
    now: the base weights and any adapter or training applied to them."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        data = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{data.dtype}\0{tuple(data.shape)}\n".encode())
        if data.numel():
            h.update(data.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy
    return h.hexdigest()


def search_inputs(model, judge, payload: dict) -> dict | None:
    """What determines a context search: the model's values, device and dtype, the judge (offline
    judges only: a model judge's weights are not hashed here), `payload` (prompts, contexts,
    lengths), the code and the runtime; None (no caching) for a model judge or a hooked model."""
    from ..engine.decode import _hooked
    from .judging import OFFLINE_JUDGES

    if judge.name not in OFFLINE_JUDGES or _hooked(model):
        return None
    param = next(model.parameters())
    root = Path(__file__).resolve().parent.parent
    code = hashlib.sha256(code_digest().encode())
    for entry in SEARCH_CODE:
        code.update(f"{entry}\0{file_digest(root / entry)}\n".encode())
    return json.loads(
        dumps(
            {
                "weights": params_digest(model),
                "device": str(param.device),
                "dtype": str(param.dtype),
                "judge": judge.name,
                "payload": payload,
                "code": code.hexdigest(),
                "runtime": runtime(),
            },
            sort_keys=True,
            default=repr,
        )
    )


def search_once(compute: Callable[[], dict], inputs: dict | None, out: Path) -> dict:
    """The cached search for these inputs when there is one (`out/SEARCH_REUSED` then names it
    and the run that first computed it, and the console says so), else `compute()`, stored."""
    from .. import console

    note = Path(out) / SEARCH_REUSED
    if inputs is None:
        note.unlink(missing_ok=True)
        return compute()
    key = hashlib.sha256(dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    folder = searches_dir() / key
    try:
        meta = json.loads((folder / "inputs.json").read_text())
        if meta.get("inputs") == inputs:
            result = json.loads((folder / "result.json").read_text())
            write_json(note, {"cache": str(folder), "origin": meta.get("origin"), "key": key})
            console.say(f"reused the context search from {folder} (first computed by {meta.get('origin')})")
            return result
    except (OSError, ValueError):
        pass
    result = compute()
    note.unlink(missing_ok=True)

    def write(tmp: Path) -> None:
        write_json(tmp / "result.json", result)
        write_json(tmp / "inputs.json", {"inputs": inputs, "origin": str(Path(out).resolve())})

    _publish(searches_dir(), key, write)
    return result
