"""Fault injection: a tiny run is killed with SIGKILL at each phase (base evaluation, context
search, a training step, a checkpoint write, saving the trained model, the final evaluation),
then resumed with `--resume`; its final adapter, metrics and evaluations must equal those of an
uninterrupted run. Torn files a kill can leave (a half-written metrics line, a `step-N.partial`
checkpoint) are part of it. The runs are real subprocesses; SAFEDISTILL_FAULT picks the point
(safedistill/faults.py). About 2 min of CPU in all (3 min wall on a busy 2-core machine)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import write_sources
from safedistill.errors import RunDiverged, UserError
from safedistill.files import _file_mode
from safedistill.train import EntropyGuard, degeneration

# A tiny run that passes through every phase: context=auto ranks the built-in contexts.
SETTINGS = {
    "n_harmful": 4,
    "n_benign": 2,
    "batch_size": 2,
    "max_new_tokens": 6,
    "lora_r": 4,
    "steps": 4,
    "save_every": 2,
    "eval_limit": 1,
    "capability": "arithmetic:1",
    "eval_generalization": "",
    "diagnostics_every": 0,
    "context": "auto",
    "context_search_prompts": 2,
    "context_confirm_prompts": 2,
    "context_search_tokens": 4,
}
# Figures that measure time (and memory), not the computation.
TIMING = ("step_seconds", "tokens_per_s", "rollout_tokens_per_s", "wall_time", "t_rollout", "t_teacher", "t_student")
TIMING += ("peak_memory_mb",)  # a measurement of the process, not of the computation


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    harmful, benign = write_sources(tmp_path_factory.mktemp("data"))
    args = ["--model", str(tiny_dir), "--set", f"harmful_source={harmful}", "--set", f"benign_source={benign}"]
    for key, value in SETTINGS.items():
        args += ["--set", f"{key}={value}"]
    return args


def run(args: list[str], out: Path, *, fault: str | None = None, resume: bool = False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAFEDISTILL_FAULT": fault or ""}
    cmd = [sys.executable, "-m", "safedistill.cli", "run", "opsa", *args, "--out", str(out), "-q"]
    return subprocess.run(cmd + (["--resume"] if resume else []), env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run(setup, out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def untimed(obj):
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in TIMING and k not in ("timing", "seconds", "adapter")}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def steps(out: Path) -> list[dict]:
    return untimed([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])


def assert_same_run(out: Path, reference: Path) -> None:
    ours, theirs = (
        load_file(out / "final" / "adapter_model.safetensors"),
        load_file(reference / "final" / "adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    assert all(ours[k].equal(theirs[k]) for k in ours), "the resumed adapter differs"
    assert steps(out) == steps(reference)
    for name in ("eval_base.json", "eval_final.json", "flip_rates.json"):
        assert untimed(json.loads((out / name).read_text())) == untimed(json.loads((reference / name).read_text()))
    assert not list(out.rglob("*.partial"))


PHASES = {
    "base-eval": [],  # killed after the generations, before eval_base.json
    "context-search": [],  # the ranking done, flip_rates.json not yet written
    "step:3": ["checkpoints/step-2"],  # after the update, before its metrics line
    "checkpoint:2": ["checkpoints/step-2", "checkpoints/step-4.partial"],  # step-4 written, not renamed
    "final-save": ["final", "checkpoints/step-4"],
    "final-eval": ["final", "generations_final.jsonl"],  # before eval_final.json
}


@pytest.mark.parametrize("fault", list(PHASES))
def test_kill_then_resume_equals_an_uninterrupted_run(setup, reference, tmp_path, fault):
    out = tmp_path / "run"
    killed = run(setup, out, fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    for left in PHASES[fault]:
        assert (out / left).exists(), left
    if fault.startswith("step"):
        # A kill mid-append leaves a torn last line; resume drops it and redoes that step.
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"loss": 0.1, "student_ent')
    resumed = run(setup, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(out, reference)


def test_a_run_that_never_took_a_step_does_not_block_the_fixed_command(setup, tmp_path):
    out = tmp_path / "run"
    broken = [*setup, "--set", "judge=keywords"]
    failed = run(broken, out)
    assert failed.returncode == 2 and "did you mean keyword" in failed.stderr
    assert not out.exists()  # checked before anything was written
    killed = run(setup, out, fault="base-eval")  # config.yaml written, no step taken
    assert killed.returncode == -9
    other = [*setup, "--set", "seed=1"]
    again = run(other, out, fault="context-search")
    assert again.returncode == -9, again.stderr[-2000:]
    assert "seed: 1" in (out / "config.yaml").read_text()


# ---- the divergence guard --------------------------------------------------------------------------


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    args = [*setup, "--set", "learning_rate=1e30", "--set", "save_every=1", "--set", "warmup_ratio=0.3"]
    args += ["--set", "context=ctx-h01", "--set", "eval=false"]
    done = run(args, out)
    assert done.returncode == 3, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("safedistill: training diverged at step 3: the loss is nan; kept checkpoints/step-1")
    assert "step-2 (the weights it started from) renamed step-2.bad" in line
    assert not (out / "final").exists() and not (out / "checkpoints" / "step-3").exists()
    for ckpt in (out / "checkpoints").iterdir():
        for name, tensor in load_file(ckpt / "trainable.safetensors").items():
            assert tensor.isfinite().all(), (ckpt.name, name)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert rows[-1] == {"step": 3, "diverged": "the loss is nan"}


def test_entropy_guard():
    ln_v = math.log(400)
    guard = EntropyGuard(0.95, 400, None)
    assert guard.check({"student_entropy": 1.2}) is None
    assert guard.check({"student_entropy": 0.9 * ln_v}) is None
    reason = guard.check({"student_entropy": ln_v})
    assert reason and "100% of ln V" in reason
    # A model that starts uniform (a random one) is not stopped; off is off.
    assert EntropyGuard(0.95, 400, {"student_entropy": ln_v}).check({"student_entropy": ln_v}) is None
    assert EntropyGuard(None, 400, None).check({"student_entropy": ln_v}) is None


def test_degeneration_is_named():
    ln_v = math.log(400)
    rows = [{"loss": 1.0, "student_entropy": 1.0, "grad_norm": 1.0}, {"loss": 2.0, "student_entropy": ln_v}]
    assert "entropy ended at" in degeneration(rows, 400, None)
    flat = [{"loss": 1.0, "student_entropy": 1.0, "grad_norm": 0.0}] * 3
    assert "gradient norm was 0" in degeneration(flat, 400, 0.95)
    assert degeneration([{"loss": 1.0, "student_entropy": 1.0, "grad_norm": 0.5}] * 3, 400, 0.95) is None
    assert str(RunDiverged(3, "the loss is nan")) == "training diverged at step 3: the loss is nan"


# ---- one process per run directory -----------------------------------------------------------------


def listing(out: Path) -> dict[str, float]:
    """Every file under `out` with its modification time: what a second process must not touch."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_second_process_on_a_run_directory_gets_one_line_and_exit_2(setup, reference, tmp_path):
    out, release = tmp_path / "run", tmp_path / "release"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SAFEDISTILL_FAULT": "step:2:wait",
        "SAFEDISTILL_WAIT_FILE": str(release),
    }
    cmd = [sys.executable, "-m", "safedistill.cli", "run", "opsa", *setup, "--out", str(out), "-q"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reached = Path(f"{release}.reached")
        for _ in range(3000):
            if reached.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert reached.exists(), first.communicate()[1][-2000:]
        before = listing(out)
        for resume in (False, True):
            second = run(setup, out, resume=resume)
            assert second.returncode == 2, second.stderr[-2000:]
            assert second.stderr.strip() == (
                f"safedistill: error: --out {out}: in use by another safedistill process (pid {first.pid}); "
                "wait for it to finish or choose another --out"
            )
        assert listing(out) == before  # the second process wrote nothing
        release.touch()
        _, err = first.communicate(timeout=300)
    finally:
        release.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    assert_same_run(out, reference)  # the first run's figures are those of a run alone
    again = run(setup, out, resume=True)  # the lock went with the first process
    assert again.returncode == 0, again.stderr[-2000:]


def test_the_lock_goes_with_a_killed_process(tmp_path):
    """flock: a SIGKILLed holder leaves the marker file but no lock, with no cleanup by hand."""
    from safedistill import rundir

    out = tmp_path / "run"
    code = f"from safedistill import rundir\nwith rundir.hold({str(out)!r}):\n    print('held', flush=True)\n    import time; time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rf"in use by another safedistill process \(pid {holder.pid}\)"
        with pytest.raises(UserError, match=busy), rundir.hold(out):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert (out / rundir.MARKER).exists()
    with rundir.hold(out), rundir.hold(out):  # nests in the holding process (compare, then train)
        busy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert busy.returncode == 1 and f"(pid {os.getpid()})" in busy.stderr
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # released when the outer block ended
    finally:
        holder.kill()
        holder.wait()


def test_a_run_directory_from_before_the_marker_resumes(setup, reference, tmp_path):
    import shutil

    from safedistill import rundir

    out = tmp_path / "run"
    killed = run(setup, out, fault="checkpoint:2")
    assert killed.returncode == -9
    (out / rundir.MARKER).unlink()  # as a run written by an older safedistill left it
    resumed = run(setup, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(out, reference)
    assert (out / rundir.MARKER).is_file()
    old = tmp_path / "old"
    shutil.copytree(reference, old)
    (old / rundir.MARKER).unlink()
    (old / "notes.txt").write_text("mine")  # beside a file no run writes it is not recognisably a run
    refused = run(setup, old, resume=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("(notes.txt is in the way); choose a new or empty directory")


# ---- a full disk -----------------------------------------------------------------------------------

# The writer safetensors uses, failing as it does on a full disk from its N-th file on.
FULL_DISK = """
import sys
import safetensors.torch
from safetensors import SafetensorError
from safedistill.cli import main

calls = []
real = safetensors.torch.save_file


def full(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) >= {nth}:
        raise SafetensorError(
            f"Error while serializing: I/O error: No space left on device (os error 28) at path {{filename!r}}"
        )
    return real(tensors, filename, metadata=metadata)


safetensors.torch.save_file = full
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_is_one_line_with_exit_4_and_resume_finishes(setup, reference, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", FULL_DISK.format(nth=3), "run", "opsa", *setup, "--out", str(out), "-q"]
    full = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 4, full.stderr[-2000:]
    err = full.stderr.strip().splitlines()
    assert len(err) == 1, err
    path = out / "checkpoints" / "step-4.partial" / "trainable.safetensors"
    assert err[0].startswith(f"safedistill: error: cannot write {path}: No space left on device (needs ")
    assert "free there); free some space, then rerun with --resume" in err[0]
    assert (out / "checkpoints" / "step-2").is_dir() and not (out / "final").exists()
    resumed = run(setup, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(out, reference)
    for path in out.rglob("*.safetensors"):
        assert path.stat().st_mode & 0o777 == _file_mode(), path  # as every other file (safetensors writes 0600)
