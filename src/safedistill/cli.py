"""`safedistill` command line. Bad input exits 2 with one line naming the problem."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

from . import __version__, console
from .config import DgrSettings, choices, preset_names
from .errors import RunDiverged, UserError
from .files import WriteFailed

DESCRIPTION = """\
Make a small language model refuse harmful requests without losing its usefulness, by
(self-)distillation, and measure the cost: safety, over-refusal and capability before and after.

Start here:
  safedistill config show opsa                    the settings a preset runs with
  safedistill run opsa --out runs/opsa            train, evaluate before/after, write report.md
  safedistill eval --out runs/base                evaluate a model (or --adapter) as it is
  safedistill compare sft opsa --out runs/cmp     several presets over seeds: one table

Bad input exits 2 with one line; a diverged run exits 3; a write the disk refuses (full,
read-only) exits 4; Ctrl-C or SIGTERM exits 130/143 and `run ... --resume` continues from the
last checkpoint. Run `safedistill COMMAND --help` for details.
"""


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every help text that has one; the description keeps its line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default  # 0 is a default worth showing (seeds), though 0 == False
        if (
            "default" in text
            or action.required
            or default is None
            or default is False
            or default in ([], argparse.SUPPRESS)
        ):
            return text
        return super()._get_help_string(action)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: the same cleanup, then exit 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def check_out(out: str, *, directory: bool = True) -> Path:
    """`--out` must be (or become) a writable directory (a writable file when directory=False),
    checked before anything is loaded or written."""
    path = Path(out).expanduser()
    if path.is_symlink() and not path.exists():
        raise UserError(f"--out {out}: a symbolic link to {os.readlink(path)}, which does not exist")
    if directory and path.exists() and not path.is_dir():
        raise UserError(f"--out {out}: exists and is a file, not a directory")
    if not directory and path.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name")
    probe = path if directory else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out {out}: {probe} is a file, not a directory")
    target = path if path.exists() else probe
    if not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
        raise UserError(f"--out {out}: {target} is not writable")
    return path


def check_out_not_run(out: str, command: str, writes: str) -> Path:
    """check_out for a command whose files share names with a training run's: a run directory is
    refused, so that nothing of the run is written over."""
    from .rundir import is_run

    path = check_out(out)
    if is_run(path):
        raise UserError(
            f"--out {out}: a training run directory; {command} would replace its {writes}, so give {command} a "
            f"directory of its own (e.g. {Path(out) / command})"
        )
    return path


def _eval_settings(args: argparse.Namespace):
    """`eval`'s eval section and sources from its flags (its own defaults: every item, the default
    basket), every one checked before the model is loaded."""
    from .config import EvalSection, device_problem
    from .data.rephrase import check_rephraser
    from .data.sources import load_prompts
    from .eval.evaluate import EvalSources, capability_basket, generalization_styles, parse_axes, safety_token_ids
    from .models import check_adapter, check_model

    settings = EvalSection(
        eval_overrefusal=args.overrefusal,
        eval_generalization=args.generalization,
        capability=args.capability,
        eval_limit=args.limit,
        eval_seed=args.seed,
        judge=args.judge,
        eval_batch_size=args.batch_size,
        eval_axes=args.axes,
        eval_rephraser=args.rephraser,
    )
    sources = EvalSources(harmful=args.harmful, safety_tokens=args.safety_tokens)
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    parse_axes(settings.eval_axes)
    check_rephraser(settings.eval_rephraser)
    generalization_styles(settings.eval_generalization)
    capability_basket(settings)
    problem = device_problem(args.device)
    if problem:
        raise UserError(f"--device {args.device}: {problem}")
    check_model(args.model)
    if args.adapter is not None:
        check_adapter(args.adapter, args.model)
    for source in (args.harmful, args.overrefusal):
        load_prompts(source)
    if sources.safety_tokens:
        safety_token_ids(sources.safety_tokens)
    return settings, sources


def _eval(args: argparse.Namespace) -> None:
    import torch

    from .eval import base_cache
    from .eval.drift import Reference, adapter_disabled
    from .eval.evaluate import evaluate, parse_axes
    from .eval.judging import load_judge
    from .files import atomic_write_text, write_json, write_jsonl
    from .models import load_model, resolve_device
    from .report.report import eval_report

    out = check_out_not_run(args.out, "eval", "report.md")
    torch.manual_seed(args.seed)
    settings, sources = _eval_settings(args)
    model, tok = load_model(args.model, adapter=args.adapter, device=resolve_device(args.device))
    judge = load_judge(args.judge)
    # Drift compares the adapter's model with the base: the same model with the adapter disabled.
    drift = args.adapter and "drift" in parse_axes(settings.eval_axes)
    reference = Reference(lambda: adapter_disabled(model)) if drift else None

    def compute() -> tuple[dict, list[dict]]:
        return evaluate(
            model,
            tok,
            judge,
            settings,
            sources,
            model_name=args.model,
            adapter=args.adapter,
            progress=console.bars(),
            reference=reference,
        )

    # The same model files, adapter, settings, items, judge and code as an earlier eval or a run's
    # base evaluation: the same files, copied from the cache (eval/base_cache.py).
    inputs = (
        None
        if args.no_cache
        else base_cache.eval_inputs(model, args.model, args.adapter, judge, args.judge, settings, sources)
    )
    results, generations, hit = base_cache.evaluate_cached(compute, inputs, out, base_cache.EVAL_REUSED, "evaluation")
    if hit is not None:
        results = {**results, "adapter": args.adapter}  # the key has the adapter's files, not its path
    write_jsonl(out / "generations.jsonl", generations)
    write_json(out / "eval.json", results)
    report = eval_report(results, generations, note=base_cache.reuse_line(out, base_cache.EVAL_REUSED, "evaluation"))
    atomic_write_text(out / "report.md", report)
    print(report.split("\n## Data")[0])
    print(f"wrote {out}/eval.json, generations.jsonl, report.md")


def _run(args: argparse.Namespace) -> None:
    from .config import load_config
    from .report.report import answer_block
    from .rundir import check_out_dir
    from .train import train

    check_out_dir(check_out(args.out))
    cfg = load_config(args.preset, config_file=args.config, overrides=[*args.set, *_cli_overrides(args)])
    result = train(cfg, Path(args.out), resume=args.resume, progress=console.bars())
    if result["base"] and result["final"]:
        answer = answer_block(Path(args.out), result["base"], result["final"])
        print("\n".join(line for line in answer if not line.startswith("![")).rstrip())
    print(f"wrote {args.out}/report.md")


def _cli_overrides(args: argparse.Namespace) -> list[str]:
    """--model/--device as overrides applied last, only when given, so a --config file's or
    --set's value otherwise stands."""
    return [f"{name}={getattr(args, name)}" for name in ("model", "device") if getattr(args, name, None) is not None]


def _config_show(args: argparse.Namespace) -> None:
    from .config import load_config, show
    from .methods import PLUG_TABLES, check_config

    cfg = load_config(args.preset, config_file=args.config, overrides=[*args.set, *_cli_overrides(args)])
    check_config(cfg)
    print(f"# safedistill {__version__}: resolved config of preset {args.preset}", end="")
    print(f" + {args.config}" if args.config else "", end="")
    print(f" + --set {' '.join(args.set)}" if args.set else "")
    print(show(cfg, PLUG_TABLES), end="")


def _flip_rate(args: argparse.Namespace) -> None:
    """The same two-stage search a run with context=auto makes (rank, then confirm the top three
    on other train prompts), on its own."""
    from .config import load_config
    from .data.train import TrainSplits
    from .eval.judging import load_judge
    from .files import write_json
    from .models import load_model, resolve_device
    from .searches.context import flip_rate_lines, search_contexts, search_prompts
    from .teachers.context import load_contexts

    check_out_not_run(args.out, "flip-rate", "flip_rates.json")
    cfg = load_config(
        "opsa",
        overrides=[
            f"harmful_source={args.harmful}",
            f"contexts={args.contexts}",
            f"context_search_prompts={args.limit}",
            f"context_confirm_prompts={args.confirm}",
            f"seed={args.seed}",
        ],
    )
    library = load_contexts(cfg.contexts)
    teacher = cfg.section("teacher")
    prompts = search_prompts(teacher, TrainSplits(cfg.harmful_source, cfg.benign_source, cfg.split_seed), [], cfg.seed)
    model, tok = load_model(args.model, device=resolve_device("auto"))
    judge = load_judge(args.judge)
    search = search_contexts(
        model, tok, judge, prompts, library, tokens=teacher.context_search_tokens, progress=console.bars()
    )
    write_json(Path(args.out) / "flip_rates.json", search)
    print("\n".join(flip_rate_lines(search)))
    print(f"wrote {args.out}/flip_rates.json")


def _steer(args: argparse.Namespace) -> None:
    from .config import load_config
    from .data.packaged import Manifest
    from .data.train import TrainSplits
    from .eval.judging import load_judge
    from .files import write_json
    from .models import load_model, resolve_device
    from .searches.steering import SteeringSearch, describe_choice, search_steering

    check_out_not_run(args.out, "steer", "steering.json and manifest.json")
    sets = [f"steer_direction={args.direction}", f"seed={args.seed}"]
    for name, value in (
        ("model", args.model),
        ("steer_layers", args.layers),
        ("steer_scales", args.scales),
        ("context", args.context),
    ):
        if value is not None:
            sets.append(f"{name}={value}")
    cfg = load_config("safesteer", overrides=[*args.set, *sets])
    manifest = Manifest()
    model, tok = load_model(cfg.model, device=resolve_device(cfg.device))
    out = Path(args.out)
    splits = TrainSplits(cfg.harmful_source, cfg.benign_source, cfg.split_seed, manifest)
    search = SteeringSearch(cfg.section("steering"), cfg.section("teacher"), splits, cfg.seed, cfg.model)
    prepared = search_steering(search, model, tok, load_judge(cfg.judge), out, progress=console.bars())
    write_json(out / "manifest.json", manifest.to_list())
    import json

    chosen = json.loads((out / "steering.json").read_text())["chosen"]
    print(f"chosen: {describe_choice(chosen)}")
    print("safety tokens: " + " ".join(repr(t["text"]) for t in prepared["safety_tokens"]))
    print(f"wrote {out}/steering.json, steering_direction.safetensors, safety_tokens.json")


def _compare(args: argparse.Namespace) -> None:
    from .report.compare import compare, compare_report

    check_out(args.out)
    twice = sorted({p for p in args.presets if args.presets.count(p) > 1})
    if twice:
        raise UserError(f"compare: preset {', '.join(twice)} given more than once; name each preset once")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise UserError("--seeds needs at least one seed")
    try:
        steps = [int(s) for s in args.frontier_steps.split(",") if s.strip()] if args.frontier_steps else []
    except ValueError:
        raise UserError(f"--frontier-steps {args.frontier_steps}: expected comma-separated step numbers") from None
    summary = compare(
        args.presets,
        model=args.model,
        out=Path(args.out),
        seeds=seeds,
        config_file=args.config,
        overrides=args.set,
        frontier_steps=steps,
    )
    print(compare_report(summary))


def _refine(args: argparse.Namespace) -> None:
    import torch

    from .config import RolloutSettings, device_problem
    from .data.external import EXTERNAL_SETS
    from .data.sources import load_demonstrations
    from .eval.judging import load_judge
    from .methods.dgr import refine_dataset, settings_from, shift_lines
    from .methods.sft import subset
    from .models import load_model, resolve_device

    check_out_not_run(args.out, "refine", "refined.jsonl and shift.json")
    for name in ("n_samples", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.retries < 0:
        raise UserError(f"--retries must be >= 0, got {args.retries}")
    data = f"builtin:{EXTERNAL_SETS[0]}" if args.data == "builtin" else args.data
    # The same mapping from run-config fields to refinement settings as the dgr preset uses.
    settings = settings_from(
        DgrSettings(
            refine_retries=args.retries,
            refine_on_fail=args.on_fail,
            refine_template=args.template,
            refine_reasoning_template=args.reasoning_template,
        ),
        RolloutSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature),
        seed=args.seed,
    )
    problem = device_problem(args.device)
    if problem:
        raise UserError(f"--device {args.device}: {problem}")
    samples = load_demonstrations(data, harmful_source=args.harmful, split_seed=args.split_seed)
    samples = subset(samples, args.n_samples, args.seed)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, device=resolve_device(args.device))
    meta = {"model": args.model, "data": data, "judge": args.judge, "n_samples": args.n_samples}
    refine_dataset(model, tok, load_judge(args.judge), samples, settings, Path(args.out), meta, progress=console.bars())
    print("\n".join(shift_lines(json.loads((Path(args.out) / "shift.json").read_text()))))
    print(f"wrote {args.out}/refined.jsonl, shift.json")


def _judge_check(args: argparse.Namespace) -> None:
    from .eval.judge_check import (
        HARM,
        agreement,
        attack_success_agreement,
        format_agreement,
        format_attack_success,
        write_agreement,
    )
    from .eval.judging import load_judge

    if args.out:
        check_out(args.out, directory=False)
    judge = load_judge(args.judge)
    if args.file == HARM:
        result = attack_success_agreement(judge)
        print(format_attack_success(result))
    else:
        result = agreement(judge, file=args.file, details=args.out is not None)
        print(format_agreement(result))
    if args.out:
        write_agreement(result, Path(args.out))
        print(f"wrote {args.out}")


MODEL_HELP = "HF id, local directory, or a bundled alias (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct)"


def _command(
    sub, common: argparse.ArgumentParser, name: str, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """One subcommand: its help line, its description (the help line as a sentence when none), -q."""
    text = textwrap.fill(description or help[0].upper() + help[1:] + ".", width=100)
    return sub.add_parser(name, help=help, description=text, parents=[common], formatter_class=_Help)


def _add_eval(sub, common: argparse.ArgumentParser) -> None:
    """`safedistill eval`."""
    e = _command(
        sub,
        common,
        "eval",
        "measure a model's safety and capability side by side",
        "Measure a model's safety (harmful prompts refused, with rephrasings), over-refusal and capability. "
        "Answers are greedy: up to 64 new tokens for the safety, jailbreak and over-refusal prompts (refusals "
        "show early), 96 for the expressiveness prompts; multiple-choice tasks are scored by log-likelihood, "
        "gsm8k and ifeval generate up to 384 and 512 tokens. Without --limit every held-out item is used and "
        "the basket's own sizes (default: 3,300 capability items; --limit 40 --capability demo for a quick "
        "look). Writes eval.json, generations.jsonl and report.md into --out, overwriting those files.",
    )
    e.add_argument("--model", default="smollm2-135m-instruct", help=MODEL_HELP)
    e.add_argument("--adapter", help="LoRA adapter directory to apply on top of --model (e.g. RUN/final)")
    e.add_argument(
        "--out", required=True, help="directory for eval.json, generations.jsonl, report.md (overwrites them)"
    )
    _add_eval_items(e)
    e.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    e.add_argument(
        "--no-cache",
        action="store_true",
        help="evaluate even when the cache holds this evaluation (same model files, adapter, settings, items, "
        "judge and code; `safedistill cache clear` empties it), and do not store it",
    )
    e.set_defaults(func=_eval)


def _add_eval_items(e: argparse.ArgumentParser) -> None:
    """`safedistill eval`'s flags that choose what is asked and how it is judged."""
    e.add_argument(
        "--limit",
        type=int,
        help="at most N items per axis and per capability task (default: the whole held-out set and every task)",
    )
    e.add_argument(
        "--judge", default="heuristic", help="heuristic, heuristic-hidden, keyword, or a judge model (see judge-check)"
    )
    e.add_argument(
        "--capability",
        default="default",
        help="capability basket: default, demo, or TASK[:N],... of hellaswag, arc_challenge, piqa, winogrande, "
        "truthfulqa_mc1, boolq, openbookqa, gsm8k, ifeval, arithmetic (sizes in the README)",
    )
    e.add_argument(
        "--generalization",
        default="past_tense,hypothetical",
        help="rephrasings of the harmful prompts, reported beside them ('' for none)",
    )
    e.add_argument(
        "--eval-seed", "--seed", dest="seed", type=int, default=0, help="which items are taken (fixed across runs)"
    )
    e.add_argument(
        "--harmful",
        default="advbench",
        help="advbench (its held-out split, as runs use), strongreject, xstest-unsafe, harmbench, ... or a JSONL path",
    )
    e.add_argument(
        "--overrefusal",
        default="xstest-safe",
        help="xstest-safe (XSTest's 250), overrefusal (built-in) or a JSONL path",
    )
    e.add_argument("--batch-size", type=int, default=128, help="prompts decoded together")
    axes = "safety,generalization,jailbreak,overrefusal,capability,expressiveness,drift"  # eval/evaluate.py AXES
    e.add_argument("--axes", default="all", help=f"all, or a subset of {axes} (drift needs --adapter)")
    e.add_argument("--rephraser", default="rule", help="rule, model (shipped rewrites, then --model) or model:NAME")
    e.add_argument(
        "--safety-tokens",
        help="a `safedistill steer` output dir: also report the model's probability mass on its S along the "
        "answers to the harmful prompts",
    )


def _add_run(sub, common: argparse.ArgumentParser) -> None:
    """`safedistill run`."""
    r = _command(
        sub,
        common,
        "run",
        "train with a preset, evaluate before and after, write a report",
        "Train with a preset (see `safedistill config show PRESET`), evaluate the base and the trained model, "
        "and write report.md, metrics.jsonl, checkpoints/ and final/ into --out. Settings: the preset, then "
        "--config, then each --set, then --model/--device when given.",
    )
    r.add_argument("preset", help="one of " + ", ".join(preset_names()) + " (configs/*.yaml)")
    r.add_argument("--model", help=MODEL_HELP + " (default: the preset's, smollm2-135m-instruct)")
    r.add_argument("--device", help="auto, cpu, cuda, ... (default: the preset's, auto)")
    r.add_argument("--out", required=True, help="run directory; must not hold another run unless --resume")
    r.add_argument("--config", help="a YAML file overriding the preset")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field (repeatable)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.set_defaults(func=_run)


def _add_config(sub, common: argparse.ArgumentParser) -> None:
    """`safedistill config show`."""
    g = _command(
        sub, common, "config", "show the resolved settings of a preset", "Print a preset's resolved settings as YAML."
    )
    g_sub = g.add_subparsers(dest="config_command", required=True, metavar="ACTION", help="show")
    show = g_sub.add_parser(
        "show",
        help="print every field of the resolved config",
        description="Print every field a run would use: the preset, then --config, then each --set, "
        "then --model/--device.",
        parents=[common],
        formatter_class=_Help,
    )
    show.add_argument("preset", help="one of " + ", ".join(preset_names()))
    show.add_argument("--model", help="as run --model (default: the preset's)")
    show.add_argument("--device", help="as run --device (default: the preset's)")
    show.add_argument("--config", help="a YAML file overriding the preset")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field")
    show.set_defaults(func=_config_show)


def _add_flip_rate(sub, common: argparse.ArgumentParser) -> None:
    """`safedistill flip-rate`."""
    f = _command(sub, common, "flip-rate", "rank candidate safety contexts by teacher flip rate")
    f.add_argument("--model", default="smollm2-135m-instruct", help=MODEL_HELP)
    f.add_argument("--out", required=True, help="directory for flip_rates.json")
    f.add_argument("--contexts", default="builtin", help="builtin or a JSONL file (id, text, side)")
    f.add_argument("--harmful", default="advbench", help="harmful source (its train split is used)")
    f.add_argument("--limit", type=int, default=24, help="harmful train prompts every context is ranked on")
    f.add_argument("--confirm", type=int, default=24, help="other train prompts the top three are confirmed on")
    f.add_argument("--judge", default="heuristic", help="heuristic, keyword, or a judge model")
    f.add_argument("--seed", type=int, default=0, help="which prompts are taken")
    f.set_defaults(func=_flip_rate)


def _add_refine(sub, common: argparse.ArgumentParser) -> None:
    """`safedistill refine`."""
    d = _command(sub, common, "refine", "DGR: rewrite external safety data in the target model's own words")
    d.add_argument("--model", default="smollm2-135m-instruct", help=MODEL_HELP)
    d.add_argument("--data", default="builtin", help="builtin (= builtin:directrefusal), builtin:NAME or a JSONL file")
    d.add_argument("--out", required=True, help="directory for refined.jsonl and shift.json")
    d.add_argument("--n-samples", type=int, help="refine at most N samples (seeded subset; default: all)")
    dgr = DgrSettings()  # the run config's dgr section: one place for these defaults and choices
    d.add_argument("--retries", type=int, default=dgr.refine_retries, help="sampled retries after the greedy rewrite")
    d.add_argument(
        "--on-fail",
        choices=list(choices("refine_on_fail")),
        default=dgr.refine_on_fail,
        help="when every rewrite fails the judge",
    )
    d.add_argument("--template", help="response refinement prompt file with {prompt} and {reference}")
    d.add_argument("--reasoning-template", help="reasoning refinement prompt file with {prompt} and {reference}")
    d.add_argument("--max-new-tokens", type=int, default=64, help="per response (twice that for reasoning)")
    d.add_argument("--temperature", type=float, default=0.7, help="for the retries")
    d.add_argument("--judge", default="keyword", help="heuristic, keyword, or a judge model")
    d.add_argument("--harmful", default="advbench", help="harmful source the built-in sets are built over")
    d.add_argument("--split-seed", type=int, default=0, help="the built-in sets use the train side of this split")
    d.add_argument("--seed", type=int, default=0, help="sampling and subset seed")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    d.set_defaults(func=_refine)


def _add_steer(sub, common: argparse.ArgumentParser) -> None:
    """`safedistill steer`."""
    st = _command(sub, common, "steer", "find a refusal steering direction and the safety token set S")
    st.add_argument("--model", help=MODEL_HELP + " (default: the safesteer preset's)")
    st.add_argument("--out", required=True, help="directory for steering.json, the direction, safety_tokens.json")
    st.add_argument(
        "--direction",
        default="context-delta",
        choices=["context-delta", "harmful-harmless"],
        help="how the direction is found",
    )
    st.add_argument("--layers", help="comma-separated layers to search (default: all but the last 20%%)")
    st.add_argument("--scales", help="comma-separated scales to try (default 1.0)")
    st.add_argument("--context", help="context-delta: the safety context (built-in id, text, or auto)")
    st.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field")
    st.set_defaults(func=_steer)


def _add_compare(sub, common: argparse.ArgumentParser) -> None:
    """`safedistill compare`."""
    c = _command(
        sub,
        common,
        "compare",
        "several presets over several seeds: one table and one plot",
        "Run each preset with each seed (reusing finished runs in --out; rerun the same command to continue "
        "an interrupted comparison), then compare every method with the base model item by item.",
    )
    c.add_argument("presets", nargs="+", help="presets to run (" + ", ".join(preset_names()) + ")")
    c.add_argument("--model", help=MODEL_HELP + " (default: each preset's, smollm2-135m-instruct)")
    c.add_argument("--out", required=True, help="directory for PRESET/seed-N/ runs, compare.json and the plot")
    c.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    c.add_argument("--config", help="a YAML file applied to every preset")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field of every preset")
    c.add_argument(
        "--frontier-steps",
        help="also evaluate each run's checkpoints at these steps (e.g. 8,16; multiples of save_every) "
        "for the safety-capability frontier",
    )
    c.set_defaults(func=_compare)


def _add_judge_check(sub, common: argparse.ArgumentParser) -> None:
    """`safedistill judge-check`."""
    j = _command(sub, common, "judge-check", "a judge's agreement with pyrit's human refusal labels")
    j.add_argument(
        "--judge", default="heuristic", help="heuristic, heuristic-hidden, keyword, llamaguard:ID, harmbench:ID, ..."
    )
    j.add_argument(
        "--file",
        default="refusal.csv",
        help="refusal.csv (development), refusal_extra.csv, uncensorbench (reference answers), a CSV path, or "
        "harm (attack success against pyrit's harm/*.csv human scores)",
    )
    j.add_argument("--out", help="write the figures and per-row predictions to this JSON file")
    j.set_defaults(func=_judge_check)


def _cache_clear(args: argparse.Namespace) -> None:
    from .eval import base_cache

    n, searches = base_cache.clear()
    print(
        f"removed {n} cached base evaluation{'s' * (n != 1)} and {searches} context search{'es' * (searches != 1)} "
        f"from {base_cache.entries_dir().parent}"
    )


def _add_cache(sub, common: argparse.ArgumentParser) -> None:
    """`safedistill cache clear`."""
    c = _command(
        sub,
        common,
        "cache",
        "the cache of base evaluations and context searches (every run on the same model and settings reuses one)",
    )
    what = c.add_subparsers(dest="action", required=True, metavar="ACTION", help="what to do with it")
    clear = what.add_parser(
        "clear", help="remove every cached base evaluation and context search (models and data wheels stay)"
    )
    clear.set_defaults(func=_cache_clear)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, then one small function per subcommand, in --help order."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars, banners or step lines; warnings and results only"
    )
    p = argparse.ArgumentParser(prog="safedistill", description=DESCRIPTION, formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Also before the command (`safedistill -q run ...`); its own dest, as a subcommand's default would reset it.
    p.add_argument("-q", "--quiet", dest="quiet_all", action="store_true", help="as COMMAND -q")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do (below)")
    for add in (
        _add_eval,
        _add_run,
        _add_config,
        _add_flip_rate,
        _add_refine,
        _add_steer,
        _add_compare,
        _add_judge_check,
        _add_cache,
    ):
        add(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = args.quiet or args.quiet_all
    console.set_quiet(args.quiet)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args.func(args)
    except UserError as e:
        print(f"safedistill: error: {e}", file=sys.stderr)
        return 2
    except RunDiverged as e:
        print(f"safedistill: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        failed = e if isinstance(e, WriteFailed) else WriteFailed(e.errno, Path(e.filename or "."))
        hint = ""
        if args.command == "run" and e.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = f"; free some space, then rerun with --resume to continue from the last checkpoint in {args.out}"
        print(f"safedistill: error: {failed.line()}{hint}", file=sys.stderr)
        return 4
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        if args.command == "run":
            hint = f"; rerun with --resume to continue from the last checkpoint in {args.out}"
        elif args.command == "compare":
            hint = "; rerun the same command to continue (finished runs are reused)"
        else:
            hint = ""
        print(f"safedistill: {how}{hint}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
