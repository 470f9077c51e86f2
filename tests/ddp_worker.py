"""One process of the multi-process tests in test_distributed.py (started by torchrun, or by the
test itself with RANK/WORLD_SIZE set).

`ddp_worker.py runs PLAN.json`: joins the process group (gloo) once, then trains every run the
plan lists ({"out", "overrides", "resume"}) in it, one after the other, so one launch serves
several assertions; process 0 writes each run directory, and every process writes the prompt ids
it trained on to OUT/seen-rank{N}.json. A run with "interrupt_at_call": N is stopped by a
KeyboardInterrupt on every process at the N-th step call (as Ctrl-C would), before the next run.

`ddp_worker.py cli NAN_RANK NAN_STEP ARGS...`: `safedistill run ARGS...` exactly as the command
line runs it (its exit code), with the loss of process NAN_RANK made NaN at step NAN_STEP
(1-based); that process first writes the time to OUT/nan-at.txt.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

from safedistill import train as trainer

torch.set_num_threads(1)
RANK = int(os.environ["RANK"])
real_call = trainer.OnPolicyStep.__call__


def main_runs(plan: list[dict]) -> None:
    from safedistill.config import load_config

    torch.distributed.init_process_group("gloo")
    for run in plan:
        seen: list = []

        def step_call(self, model, batch, step, micro, epoch=0, seen=seen, stop=run.get("interrupt_at_call")):  # noqa: B008
            seen.append([it.id for it in batch])
            if len(seen) == stop:
                raise KeyboardInterrupt
            return real_call(self, model, batch, step, micro, epoch)

        trainer.OnPolicyStep.__call__ = step_call
        out = Path(run["out"])
        try:
            trainer.train(load_config("opsa", overrides=run["overrides"]), out, resume=run["resume"], progress=False)
        except KeyboardInterrupt:
            assert run.get("interrupt_at_call")
        (out / f"seen-rank{RANK}.json").write_text(json.dumps(seen))
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main_cli(nan_rank: int, nan_step: int, args: list[str]) -> int:
    from safedistill import cli

    out = Path(args[args.index("--out") + 1])

    def step_call(self, model, batch, step, micro, epoch=0):
        loss, info = real_call(self, model, batch, step, micro, epoch)
        if nan_rank == RANK and step + 1 == nan_step:
            (out.parent / "nan-at.txt").write_text(str(time.time()))
            loss = loss * float("nan")
        return loss, info

    trainer.OnPolicyStep.__call__ = step_call
    return cli.main(args)


if __name__ == "__main__":
    if sys.argv[1] == "runs":
        main_runs(json.loads(Path(sys.argv[2]).read_text()))
    else:
        sys.exit(main_cli(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
