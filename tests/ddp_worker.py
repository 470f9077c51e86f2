"""One process of the 2-process test in test_distributed.py (run by torchrun): trains, then
writes this process's LoRA weights to DUMP_DIR/rank{N}.safetensors before any merge and the
prompt ids it trained on per step to DUMP_DIR/rank{N}.json."""

import json
import os
import sys
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from safedistill import train as trainer
from safedistill.config import load_config

captured = {}
real_add_lora = trainer.add_lora


def add_lora(model, settings):
    captured["model"] = real_add_lora(model, settings)
    return captured["model"]


def save_model(model, tok, out_dir):
    dump(model)
    real_save_model(model, tok, out_dir)


def dump(model):
    state = {k: v.detach().contiguous().clone() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, Path(sys.argv[2]) / f"rank{os.environ['RANK']}.safetensors")


def step_call(self, model, batch, step, micro):
    seen.append([it.id for it in batch])
    return real_call(self, model, batch, step, micro)


seen: list = []
real_call = trainer.OnPolicyStep.__call__
trainer.OnPolicyStep.__call__ = step_call
real_save_model = trainer.save_model
trainer.add_lora = add_lora
trainer.save_model = save_model  # process 0 only: it alone saves
torch.set_num_threads(1)
trainer.train(load_config("opsa", overrides=sys.argv[3:]), Path(sys.argv[1]), progress=False)
if os.environ["RANK"] != "0":
    dump(captured["model"])
(Path(sys.argv[2]) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
