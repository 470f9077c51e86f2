"""Bad input found by trying the tool as a newcomer: each gives one line naming the problem (a
UserError, exit 2 from the CLI), before anything slow or anything written."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from helpers import run_settings, write_sources
from safedistill.cli import build_parser, main
from safedistill.errors import UserError
from safedistill.eval.judging import load_judge
from safedistill.models import check_hub_name, load_model, pretrained_kwargs


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    ("load", "name", "fix"),
    [
        (load_model, "smollm2-135m", "smollm2-135m-instruct"),
        (load_model, "smolm2-135m-instruct", "smollm2-135m-instruct"),
        (load_judge, "keywords", "keyword"),
        (load_judge, "heuristik", "heuristic"),
    ],
)
def test_typo_offline_says_did_you_mean_at_once(offline, load, name, fix):
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        load(name)
    assert time.perf_counter() - start < 2
    text = one_line(e)
    assert text.endswith(f"did you mean {fix}?") and name in text


def test_unknown_hub_id_offline_fails_at_once(offline):
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        check_hub_name("someorg/completely-different")
    assert time.perf_counter() - start < 2
    text = one_line(e)
    assert "hub is not reachable (offline)" in text and "did you mean" not in text


def test_unknown_model_type(tiny_llama_dir, tmp_path):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "lamma"}))
    with pytest.raises(UserError) as e:
        load_model(str(folder))
    assert f"{folder}/config.json: model_type 'lamma' is not known to transformers" in one_line(e)
    assert "did you mean llama?" in str(e.value)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: malformed JSON"):
        load_model(str(folder))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "adapter_config.json: malformed JSON"),
        ("[1, 2]", "adapter_config.json: not a peft adapter config"),
        ('{"peft_type": "LORA", "r": "sixteen", "target_modules": 5}', "could not apply the LoRA adapter"),
    ],
)
def test_malformed_adapter_config(tiny_llama_dir, tmp_path, text, message):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(UserError) as e:
        load_model(str(tiny_llama_dir), adapter=str(tmp_path))
    assert message in one_line(e)


def test_safetensors_folders_load_with_use_safetensors(tiny_llama_dir, tmp_path):
    assert pretrained_kwargs(str(tiny_llama_dir)) == {"use_safetensors": True}
    assert pretrained_kwargs("someorg/somemodel") == {}
    # A pickle beside the safetensors weights is never unpickled.
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    model, _ = load_model(str(folder))
    assert model.config.model_type == "llama"


# ---- the command line ----------------------------------------------------------------------------


def cli_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("safedistill: error: ")
    return err[0]


def test_version(capsys):
    from safedistill import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"safedistill {__version__}"


def all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


def test_every_argument_has_help_and_shows_its_default():
    parsers = list(all_parsers(build_parser()))
    assert len(parsers) > 8
    for parser in parsers:
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.dest} has no help"
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: [])" not in text
    eval_help = next(p for p in parsers if p.prog.endswith(" eval")).format_help()
    assert "(default: heuristic)" in eval_help and "overwrit" in eval_help
    assert "Start here" in build_parser().format_help()


@pytest.mark.parametrize(
    ("argv", "value"),
    [
        (["--set", "model=/my/model"], "/my/model"),
        (["--config", "CONFIG"], "/from/config"),
        (["--config", "CONFIG", "--set", "model=/my/model"], "/my/model"),
        (["--model", "/flag", "--set", "model=/my/model"], "/flag"),
        ([], "smollm2-135m-instruct"),
    ],
)
def test_model_override_order(tmp_path, capsys, argv, value):
    config = tmp_path / "c.yaml"
    config.write_text("model: /from/config\n")
    argv = [str(config) if a == "CONFIG" else a for a in argv]
    assert main(["config", "show", "opsa", *argv]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"] == value and shown["preset"] == "opsa"


def test_run_set_model_is_not_overridden_by_the_default(tmp_path, capsys):
    assert main(["run", "sft", "--out", str(tmp_path / "o"), "--set", "model=/no/such/model"]) == 2
    assert "/no/such/model" in cli_error(capsys)


def test_compare_bad_seeds(tmp_path, capsys):
    assert main(["compare", "sft", "--seeds", "a,b", "--out", str(tmp_path / "o")]) == 2
    assert "--seeds a,b: expected comma-separated integers" in cli_error(capsys)
    assert not (tmp_path / "o").exists()


OUT_COMMANDS = [
    ["eval"],
    ["run", "sft"],
    ["compare", "sft"],
    ["flip-rate"],
    ["refine"],
    ["steer"],
]


@pytest.mark.parametrize("command", OUT_COMMANDS, ids=lambda c: c[0])
def test_out_that_is_a_file(tmp_path, capsys, command):
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    start = time.perf_counter()
    assert main([*command, "--out", str(taken)]) == 2
    assert time.perf_counter() - start < 5  # before any model is loaded
    assert "exists and is a file" in cli_error(capsys)
    assert taken.read_text() == "mine\n"
    assert main([*command, "--out", str(taken / "sub")]) == 2
    assert "is a file, not a directory" in cli_error(capsys)


def test_judge_check_out_that_is_a_directory(tmp_path, capsys):
    assert main(["judge-check", "--out", str(tmp_path)]) == 2
    assert "is a directory" in cli_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["eval", "--out", str(locked / "o")]) == 2
    assert "is not writable" in cli_error(capsys)


@pytest.mark.skipif(not Path("/proc/sys").is_dir(), reason="needs a read-only file system")
def test_out_on_a_read_only_file_system(capsys):
    assert main(["run", "sft", "--out", "/proc/sys/safedistill-out"]) == 2
    assert "/proc/sys is not writable" in cli_error(capsys)


@pytest.mark.parametrize(
    ("command", "code", "words"),
    [
        ("run", 143, "terminated (SIGTERM); rerun with --resume"),
        ("compare", 143, "terminated (SIGTERM); rerun the same command"),
    ],
)
def test_sigterm_is_handled_like_ctrl_c(tmp_path, capsys, monkeypatch, command, code, words):
    from safedistill import cli

    def work(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(cli, f"_{command}", work)
    before = signal.getsignal(signal.SIGTERM)
    assert main([command, "sft", "--out", str(tmp_path / "o")]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("safedistill: ") and words in err and "\n" not in err
    assert signal.getsignal(signal.SIGTERM) == before


def test_ctrl_c_message_says_resume(tmp_path, capsys, monkeypatch):
    from safedistill import cli

    def work(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", work)
    assert main(["run", "sft", "--out", str(tmp_path / "o")]) == 130
    assert "interrupted; rerun with --resume" in capsys.readouterr().err


def test_diverged_run_exits_3_on_one_line(tmp_path, capsys, monkeypatch):
    from safedistill import cli
    from safedistill.errors import RunDiverged

    def work(args):
        raise RunDiverged(7, "the loss is nan", "kept checkpoints/step-4")

    monkeypatch.setattr(cli, "_run", work)
    assert main(["run", "sft", "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err.strip()
    assert err == "safedistill: training diverged at step 7: the loss is nan; kept checkpoints/step-4"


def test_fault_point_kills_at_the_nth_pass():
    import subprocess
    import sys

    code = "from safedistill import faults\nfor i in range(3):\n    faults.point('step')\n    print(i, flush=True)\n"
    env = {**os.environ, "SAFEDISTILL_FAULT": "step:2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and done.stdout.split() == ["0"]
    env["SAFEDISTILL_FAULT"] = "other"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["0", "1", "2"]


def test_bare_typo_fails_even_when_the_hub_is_reachable(monkeypatch):
    from safedistill import models

    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    with pytest.raises(UserError, match=r"keywords: unknown .*did you mean keyword\?"):
        load_judge("keywords")
    with pytest.raises(UserError, match="did you mean smollm2-135m-instruct"):
        check_hub_name("smollm2-135m")
    check_hub_name("gpt2")  # a legacy hub id far from every alias goes to the hub


def test_mistyped_context_id():
    from safedistill.teachers.context import check_context, load_contexts

    library = load_contexts("builtin")
    with pytest.raises(UserError, match=r"'ctx-h7' is not a context id .*did you mean ctx-h07\?"):
        check_context("context", "ctx-h7", library)
    with pytest.raises(UserError, match="needs more than one word"):
        check_context("context", "refuse", library)
    for fine in ("auto", "ctx-h01", "Refuse requests that could hurt someone.", None):
        check_context("context", fine, library)


@pytest.mark.parametrize("source", ["strongreject", "xstest-unsafe"])
def test_training_on_an_eval_benchmark_is_refused_before_anything_is_written(tmp_path, capsys, source):
    out = tmp_path / "o"
    assert main(["run", "opsa", "--out", str(out), "--set", f"harmful_source={source}"]) == 2
    message = cli_error(capsys)
    assert "harmful_source" in message and "evaluation benchmark" in message
    assert not out.exists()


def test_a_mistyped_cross_sft_seed_context_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "copsd", "--out", str(out), "--set", "cross_sft_seed_context=ctx-h7"]) == 2
    message = cli_error(capsys)
    assert "cross_sft_seed_context" in message and "did you mean ctx-h07" in message
    assert not out.exists()


# ---- what --out may be -----------------------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ({"config.yaml": "model: resnet50\nepochs: 3\n", "checkpoints/checkpoint-500/w.bin": "x"}, "config.yaml"),
        ({"final/weights.txt": "mine"}, "final/"),
        ({"notes.txt": "my notes"}, "notes.txt"),
    ],
    ids=["another-tools-run", "a-users-final", "a-users-notes"],
)
def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(tmp_path, capsys, files, named):
    out = tmp_path / "o"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = tree(out)
    start = time.perf_counter()
    assert main(["run", "sft", "--out", str(out), "--set", "steps=1"]) == 2
    assert time.perf_counter() - start < 5
    assert cli_error(capsys) == (
        f"safedistill: error: --out {out}: not empty and not a safedistill run ({named} is in the way); "
        "choose a new or empty directory"
    )
    assert tree(out) == before and not (out / ".safedistill-run").exists()


def test_only_the_runs_own_files_are_removed(tmp_path):
    from safedistill import rundir

    out = tmp_path / "o"
    for name in ("checkpoints/checkpoint-500/w.bin", "checkpoints/step-2.partial/x", "eval_base.json", "notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    removed = rundir.remove(out, rundir.before_first_step())
    assert removed == ["eval_base.json", "checkpoints"]
    assert tree(out) == {"checkpoints/checkpoint-500/w.bin": "x", "notes.txt": "x"}


def test_a_run_written_before_the_marker_is_still_a_run(tmp_path):
    from safedistill import rundir
    from safedistill.config import load_config, to_yaml

    out = tmp_path / "o"
    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(load_config("sft")))
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "training_curve.png").write_bytes(b"png")
    assert rundir.is_run(out)
    rundir.check_out_dir(out)
    (out / "notes.txt").write_text("mine")  # something a run does not write: not recognisably a run
    assert not rundir.is_run(out)
    with pytest.raises(UserError, match=r"notes\.txt is in the way"):
        rundir.check_out_dir(out)


@pytest.mark.parametrize("marker", [True, False], ids=["marked", "written-before-the-marker"])
def test_eval_refuses_a_run_directory(tmp_path, capsys, marker):
    from safedistill.config import load_config, to_yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config("sft")))
    (run / "report.md").write_text("# the run's before/after report\n")
    (run / "eval_base.json").write_text("{}")
    if marker:
        (run / ".safedistill-run").write_text("{}")
    before = tree(run)
    assert main(["eval", "--out", str(run), "--limit", "1"]) == 2
    assert cli_error(capsys) == (
        f"safedistill: error: --out {run}: a training run directory; eval would replace its report.md, so give "
        f"eval a directory of its own (e.g. {run / 'eval'})"
    )
    for command, writes in (
        ("flip-rate", "flip_rates.json"),
        ("steer", "steering.json and manifest.json"),
        ("refine", "refined.jsonl and shift.json"),
    ):
        assert main([command, "--out", str(run)]) == 2
        assert f"a training run directory; {command} would replace its {writes}" in cli_error(capsys)
    assert tree(run) == before


def test_eval_out_a_dangling_symlink(tmp_path, capsys):
    link = tmp_path / "o"
    link.symlink_to(tmp_path / "gone")
    assert main(["eval", "--out", str(link), "--limit", "1"]) == 2
    assert (
        cli_error(capsys)
        == f"safedistill: error: --out {link}: a symbolic link to {tmp_path / 'gone'}, which does not exist"
    )
    assert not (tmp_path / "gone").exists()


# ---- values refused at load, before anything is written --------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("top_p=0", "config field 'top_p' must be in (0, 1] (got 0.0)"),
        ("temperature=.inf", "config field 'temperature' must be a finite number >= 0 (0: greedy) (got inf)"),
        ("learning_rate=inf", "config field 'learning_rate' must be a finite number > 0 (got inf)"),
        ("learning_rate=0", "config field 'learning_rate' must be a finite number > 0 (got 0.0)"),
        ("n_harmful=-5", "config field 'n_harmful' must be >= 0 (got -5)"),
        ("n_benign=-1", "config field 'n_benign' must be >= 0 (got -1)"),
        ("lora_r=0", "config field 'lora_r' must be at least 1 (got 0)"),
        ("device=tpu", "config field 'device' is not a device name"),
        ("base=sft", "--set base=sft: 'base' is for presets"),
    ],
)
def test_out_of_range_values_are_refused_before_anything_is_written(tmp_path, capsys, setting, message):
    out = tmp_path / "o"
    assert main(["run", "opsa", "--out", str(out), "--set", setting]) == 2
    assert message in cli_error(capsys)
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.parametrize("command", [["run", "sft"], ["eval"], ["refine"]], ids=lambda c: c[0])
def test_a_device_this_torch_lacks(tmp_path, capsys, command):
    out = tmp_path / "o"
    assert main([*command, "--out", str(out), "--device", "cuda"]) == 2
    line = cli_error(capsys)
    assert "names a device this torch" in line and line.endswith(
        "(no cuda; use auto or cpu)" + ("" if command[0] != "run" else " (got 'cuda')")
    )
    assert not out.exists()


def test_a_config_file_that_is_not_utf8_or_sets_base(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"context: caf\xe9 au lait\n")
    assert main(["config", "show", "opsa", "--config", str(config)]) == 2
    assert cli_error(capsys) == f"safedistill: error: {config}: not UTF-8 text (byte 0xe9 at offset 12)"
    config.write_text("base: sft\nsteps: 3\n")
    assert main(["run", "opsa", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert f"{config}: field 'base' is for presets" in cli_error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("remove", "message"), [("tokenizer.json", "no tokenizer files"), ("model.safetensors", "no model weights")]
)
def test_a_model_folder_without_a_tokenizer_or_weights(tiny_llama_dir, tmp_path, capsys, remove, message):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    for path in folder.glob(remove.replace("model.", "*.")):
        path.unlink()
    out = tmp_path / "o"
    assert main(["run", "sft", "--out", str(out), "--model", str(folder)]) == 2
    assert cli_error(capsys) == f"safedistill: error: {folder}: {message}" + (
        " (*.safetensors or pytorch_model*.bin) beside config.json"
        if "weights" in message
        else " (tokenizer.json, tokenizer.model, vocab.json, spiece.model, vocab.txt) beside config.json"
    )
    assert not out.exists()
    assert main(["eval", "--out", str(out), "--model", str(folder)]) == 2
    assert message in cli_error(capsys)


def test_an_adapter_made_for_another_base_model_is_named(tiny_llama_dir, tmp_path, capsys):
    from safedistill.models import check_adapter

    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/other"})
    )
    check_adapter(str(adapter), str(tiny_llama_dir))
    err = capsys.readouterr().err.strip()
    assert err == (
        f"safedistill: warning: {adapter} was trained on org/other (adapter_config.json base_model_name_or_path), "
        f"not on {tiny_llama_dir}; its results on this model may mean nothing"
    )
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tiny_llama_dir)})
    )
    check_adapter(str(adapter), str(tiny_llama_dir))
    assert capsys.readouterr().err == ""


def test_compare_refuses_a_preset_given_twice(tmp_path, capsys):
    assert main(["compare", "opsa", "sft", "opsa", "--out", str(tmp_path / "o")]) == 2
    assert cli_error(capsys) == "safedistill: error: compare: preset opsa given more than once; name each preset once"
    assert not (tmp_path / "o").exists()


def test_quiet_before_the_command_seeds_show_0_and_presets_say_did_you_mean(tmp_path, capsys):
    assert main(["-q", "config", "show", "opsa"]) == 0
    capsys.readouterr()
    parsers = {p.prog: p for p in all_parsers(build_parser())}
    for prog, flag in (("safedistill eval", "--eval-seed SEED, --seed SEED"), ("safedistill flip-rate", "--seed SEED")):
        text = " ".join(parsers[prog].format_help().split())
        assert f"{flag} " in text and "(default: 0)" in text.rsplit(flag, 1)[1].split("--", 1)[0], prog
    assert main(["run", "ospa", "--out", str(tmp_path / "o")]) == 2
    assert cli_error(capsys).endswith("; did you mean opsa?")


def test_progress_bars_stay_off_when_stderr_is_no_terminal():
    from safedistill import console

    try:
        console.set_quiet(False, tty=False)
        assert console.bars() is False and not console.quiet()
        console.set_quiet(False, tty=True)
        assert console.bars() is True
        console.set_quiet(True, tty=True)
        assert console.bars() is False
    finally:
        console.set_quiet(False)


def test_a_run_called_as_compare_calls_it_draws_no_bars_into_a_log(tiny_dir, tmp_path, capfd):
    """compare calls train() with its default progress=True; stderr that is no terminal gets step
    lines, never carriage-return redraws of the rollout and step bars."""
    from safedistill import console
    from safedistill.config import load_config
    from safedistill.train import train

    cfg = load_config(
        "opsa", overrides=run_settings(tiny_dir, write_sources(tmp_path / "data"), steps=2, save_every=2, top_k=64)
    )
    try:
        console.set_quiet(False, tty=False)
        capfd.readouterr()
        train(cfg, tmp_path / "run")
        err = capfd.readouterr().err
    finally:
        console.set_quiet(False)
    assert "step 2/2" in err and "\r" not in err and "it/s" not in err
