"""`safedistill` command line. Bad input exits 2 with one line naming the problem."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import preset_names
from .errors import UserError


def _eval(args: argparse.Namespace) -> None:
    import torch

    from .data.sources import load_prompts
    from .evaluate import EvalSettings, capability_basket, evaluate, generalization_styles
    from .files import write_json, write_jsonl
    from .judges import load_judge
    from .models import load_model, resolve_device
    from .report import eval_report

    torch.manual_seed(args.seed)
    settings = EvalSettings(
        harmful=args.harmful,
        overrefusal=args.overrefusal,
        generalization=args.generalization,
        capability=args.capability,
        limit=args.limit,
        seed=args.seed,
        judge=args.judge,
        batch_size=args.batch_size,
    )
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    generalization_styles(settings.generalization)  # bad input fails before the model is loaded
    capability_basket(settings)
    for source in (args.harmful, args.overrefusal):
        load_prompts(source)
    model, tok = load_model(args.model, adapter=args.adapter, device=resolve_device(args.device))
    judge = load_judge(args.judge)
    results, generations = evaluate(model, tok, judge, settings, model_name=args.model, adapter=args.adapter)
    out = Path(args.out)
    write_jsonl(out / "generations.jsonl", generations)
    write_json(out / "eval.json", results)
    report = eval_report(results, generations)
    (out / "report.md").write_text(report)
    print(report.split("\n## Data")[0])
    print(f"wrote {out}/eval.json, generations.jsonl, report.md")


def _run(args: argparse.Namespace) -> None:
    from .config import load_config
    from .report import before_after_section
    from .trainer import train

    cfg = load_config(args.preset, config_file=args.config, overrides=[*args.set, f"model={args.model}"])
    result = train(cfg, Path(args.out), resume=args.resume)
    if result["base"] and result["final"]:
        print("\n".join(before_after_section(Path(args.out), result["base"], result["final"])))
    print(f"wrote {args.out}/report.md")


def _flip_rate(args: argparse.Namespace) -> None:
    from .data.sources import load_prompts
    from .data.splits import split_records, take
    from .files import write_json
    from .judges import load_judge
    from .methods.opsa import flip_rates, load_contexts
    from .models import load_model, resolve_device

    contexts = load_contexts(args.contexts)
    harmful = take(split_records(load_prompts(args.harmful), seed=0)[0], args.limit, seed=args.seed)
    benign = take(
        split_records(load_prompts("benign"), seed=0)[0],
        max(4, args.limit // 2),
        seed=args.seed + 1,
    )
    model, tok = load_model(args.model, device=resolve_device("auto"))
    rows = flip_rates(model, tok, load_judge(args.judge), harmful, benign, contexts)
    write_json(Path(args.out) / "flip_rates.json", rows)
    print("| context | flip rate | conditional | benign refusal | framing | length |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['id']} | {r['flip_rate']:.2f} | {r['conditional_flip_rate']:.2f} | "
            f"{r['benign_refusal_rate']:.2f} | {r.get('framing', '')} | {r.get('length', '')} |"
        )
    print(f"wrote {args.out}/flip_rates.json")


def _steer(args: argparse.Namespace) -> None:
    from .config import load_config
    from .data.packaged import Manifest
    from .files import write_json
    from .judges import load_judge
    from .methods.safesteer import describe_choice, search_steering
    from .models import load_model, resolve_device

    sets = [f"model={args.model}", f"steer_direction={args.direction}", f"seed={args.seed}"]
    for name, value in (("steer_layers", args.layers), ("steer_scales", args.scales), ("context", args.context)):
        if value is not None:
            sets.append(f"{name}={value}")
    cfg = load_config("safesteer", overrides=[*args.set, *sets])
    manifest = Manifest()
    model, tok = load_model(cfg.model, device=resolve_device(cfg.device))
    out = Path(args.out)
    prepared = search_steering(cfg, model, tok, load_judge(cfg.judge), manifest, out)
    write_json(out / "manifest.json", manifest.to_list())
    import json

    chosen = json.loads((out / "steering.json").read_text())["chosen"]
    print(f"chosen: {describe_choice(chosen)}")
    print("safety tokens: " + " ".join(repr(t["text"]) for t in prepared["safety_tokens"]))
    print(f"wrote {out}/steering.json, steering_direction.safetensors, safety_tokens.json")


def _compare(args: argparse.Namespace) -> None:
    from .compare import compare, compare_report

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
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
    import dataclasses

    import torch

    from .config import RunConfig
    from .data.external import EXTERNAL_SETS
    from .data.sources import load_demonstrations
    from .judges import load_judge
    from .methods.baselines import subset
    from .methods.dgr import refine_dataset, settings_from, shift_lines
    from .models import load_model, resolve_device

    for name in ("n_samples", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.retries < 0:
        raise UserError(f"--retries must be >= 0, got {args.retries}")
    data = f"builtin:{EXTERNAL_SETS[0]}" if args.data == "builtin" else args.data
    # The same mapping from run-config fields to refinement settings as the dgr preset uses.
    settings = settings_from(
        dataclasses.replace(
            RunConfig(),
            refine_retries=args.retries,
            refine_on_fail=args.on_fail,
            refine_template=args.template,
            refine_reasoning_template=args.reasoning_template,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
    )
    samples = load_demonstrations(data, harmful_source=args.harmful, split_seed=args.split_seed)
    samples = subset(samples, args.n_samples, args.seed)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, device=resolve_device(args.device))
    meta = {"model": args.model, "data": data, "judge": args.judge, "n_samples": args.n_samples}
    refine_dataset(model, tok, load_judge(args.judge), samples, settings, Path(args.out), meta)
    print("\n".join(shift_lines(json.loads((Path(args.out) / "shift.json").read_text()))))
    print(f"wrote {args.out}/refined.jsonl, shift.json")


def _judge_check(args: argparse.Namespace) -> None:
    from .eval.judge_check import agreement, format_agreement, write_agreement
    from .judges import load_judge

    result = agreement(load_judge(args.judge), file=args.file, details=args.out is not None)
    print(format_agreement(result))
    if args.out:
        write_agreement(result, Path(args.out))
        print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safedistill", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="measure a model's safety and capability side by side")
    e.add_argument("--model", required=True, help="HF id, local directory, or smollm2-135m-instruct")
    e.add_argument("--adapter", help="LoRA adapter directory to apply on top of --model")
    e.add_argument("--out", required=True, help="directory for eval.json, generations.jsonl, report.md")
    e.add_argument("--limit", type=int, help="at most N items per axis and per capability task")
    e.add_argument("--judge", default="heuristic", help="heuristic, keyword, or a judge model (see judge-check)")
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
    e.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    e.set_defaults(func=_eval)

    r = sub.add_parser("run", help="train with a preset, evaluate before and after, write a report")
    r.add_argument("preset", help="one of " + ", ".join(preset_names()) + " (configs/*.yaml)")
    r.add_argument("--model", default="smollm2-135m-instruct")
    r.add_argument("--out", required=True)
    r.add_argument("--config", help="a YAML file overriding the preset")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.set_defaults(func=_run)

    f = sub.add_parser("flip-rate", help="rank candidate safety contexts by teacher flip rate")
    f.add_argument("--model", default="smollm2-135m-instruct")
    f.add_argument("--out", required=True)
    f.add_argument("--contexts", default="builtin", help="builtin or a JSONL file (id, text, side)")
    f.add_argument("--harmful", default="advbench", help="harmful source (its train split is used)")
    f.add_argument("--limit", type=int, default=32, help="harmful prompts to decode")
    f.add_argument("--judge", default="keyword")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_flip_rate)

    d = sub.add_parser("refine", help="DGR: rewrite external safety data in the target model's own words")
    d.add_argument("--model", default="smollm2-135m-instruct")
    d.add_argument("--data", default="builtin", help="builtin (= builtin:directrefusal), builtin:NAME or a JSONL file")
    d.add_argument("--out", required=True, help="directory for refined.jsonl and shift.json")
    d.add_argument("--n-samples", type=int, help="refine at most N samples (seeded subset)")
    d.add_argument("--retries", type=int, default=2, help="sampled retries after the greedy rewrite")
    d.add_argument("--on-fail", choices=["fallback", "drop"], default="fallback")
    d.add_argument("--template", help="response refinement prompt file with {prompt} and {reference}")
    d.add_argument("--reasoning-template", help="reasoning refinement prompt file with {prompt} and {reference}")
    d.add_argument("--max-new-tokens", type=int, default=64, help="per response (twice that for reasoning)")
    d.add_argument("--temperature", type=float, default=0.7, help="for the retries")
    d.add_argument("--judge", default="keyword")
    d.add_argument("--harmful", default="advbench", help="harmful source the built-in sets are built over")
    d.add_argument("--split-seed", type=int, default=0, help="the built-in sets use the train side of this split")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto")
    d.set_defaults(func=_refine)
    st = sub.add_parser("steer", help="find a refusal steering direction and the safety token set S")
    st.add_argument("--model", default="smollm2-135m-instruct")
    st.add_argument("--out", required=True, help="directory for steering.json, the direction, safety_tokens.json")
    st.add_argument("--direction", default="context-delta", choices=["context-delta", "harmful-harmless"])
    st.add_argument("--layers", help="comma-separated layers to search (default: all but the last 20%%)")
    st.add_argument("--scales", help="comma-separated scales to try (default 1.0)")
    st.add_argument("--context", help="context-delta: the safety context (built-in id, text, or auto)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field")
    st.set_defaults(func=_steer)

    c = sub.add_parser("compare", help="several presets over several seeds: one table and one plot")
    c.add_argument("presets", nargs="+")
    c.add_argument("--model", default="smollm2-135m-instruct")
    c.add_argument("--out", required=True)
    c.add_argument("--seeds", default="0,1,2")
    c.add_argument("--config", help="a YAML file applied to every preset")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument(
        "--frontier-steps",
        help="also evaluate each run's checkpoints at these steps (e.g. 8,16; multiples of save_every) "
        "for the safety-capability frontier",
    )
    c.set_defaults(func=_compare)

    j = sub.add_parser("judge-check", help="a judge's agreement with pyrit's human refusal labels")
    j.add_argument("--judge", default="heuristic", help="heuristic, keyword, llamaguard:ID, harmbench:ID, ...")
    j.add_argument(
        "--file",
        default="refusal.csv",
        help="refusal.csv (development), refusal_extra.csv, uncensorbench (reference answers), or a CSV path",
    )
    j.add_argument("--out", help="write the figures and per-row predictions to this JSON file")
    j.set_defaults(func=_judge_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"safedistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safedistill: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
