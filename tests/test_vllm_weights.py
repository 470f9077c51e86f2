"""The vLLM rollout path without vLLM (it cannot be installed here): the weights pushed into the
engine carry the base model's state_dict names and values, with the LoRA merged in as
W + scale * B @ A, also from FSDP2 DTensor shards; the push follows TRL's colocate steps; without
vllm the trainer falls back to transformers with one line."""

import copy
import os
import socket
import types

import pytest
import torch

from safedistill.engine.rollout import SamplingSettings, generate
from safedistill.engine.vllm import VLLMGenerate, VLLMOptions, vllm_generate_or_none, vllm_weights
from safedistill.models import LoraSettings, add_lora, load_model


@pytest.fixture
def student(tiny_dir):
    """A LoRA student whose B matrices are non-zero (as after training), and its untouched base."""
    base, tok = load_model(tiny_dir)
    names = dict(base.state_dict())
    torch.manual_seed(1)
    model = add_lora(copy.deepcopy(base), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return model, base, names, tok


def test_full_parameter_push_is_the_state_dict(tiny_dir):
    model, _ = load_model(tiny_dir)
    pushed = dict(vllm_weights(model))
    state = model.state_dict()
    assert list(pushed) == list(state)
    assert all(torch.equal(pushed[k], state[k]) for k in state)


def test_lora_push_uses_base_names_and_merged_values(student):
    model, base, names, _ = student
    pushed = dict(vllm_weights(model))
    assert list(pushed) == list(names)  # no base_model.model., .base_layer or lora_ tensors
    scale = 8 / 4
    adapted = 0
    for name, value in pushed.items():
        layer = name.removesuffix(".weight").split(".")[-1]
        if layer in LoraSettings().target_modules:
            owner = model.get_base_model().get_submodule(name.removesuffix(".weight"))
            a, b = owner.lora_A["default"].weight, owner.lora_B["default"].weight
            expected = names[name] + scale * b.detach() @ a.detach()
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)
            assert not torch.allclose(value, names[name])
            adapted += 1
        else:
            assert torch.equal(value, names[name])
    assert adapted == 2 * 7  # two layers, seven projections each
    merged = copy.deepcopy(model).merge_and_unload().state_dict()  # peft's own merge agrees
    assert all(torch.allclose(pushed[k], merged[k], atol=1e-6) for k in names)
    # the training weights were only read
    assert all(torch.equal(p, names[n]) for n, p in model.get_base_model().state_dict().items() if n in names)


class _Engine:
    """What VLLMGenerate touches of vllm.LLM in colocate mode, over a real model: load_weights
    copies each tensor by name (unknown names fail, as in vLLM's loaders); calls are recorded."""

    def __init__(self, model):
        self.calls: list[str] = []
        self.model = model
        target = self.model

        def load_weights(weights):
            state = target.state_dict()
            for name, tensor in weights:
                self.calls.append("load")
                state[name].copy_(tensor)  # KeyError on a name the model does not have

        target.load_weights = load_weights
        runner = types.SimpleNamespace(model=target)
        worker = types.SimpleNamespace(model_runner=runner)
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))

    def wake_up(self, tags):
        self.calls.append(f"wake:{','.join(tags)}")

    def reset_prefix_cache(self):
        self.calls.append("reset")


def test_pushed_engine_model_decodes_like_the_merged_student(student, tiny_dir):
    model, _, names, tok = student
    fresh, _ = load_model(tiny_dir)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    engine = _Engine(fresh)
    gen = VLLMGenerate(VLLMOptions(tiny_dir))
    gen.llm = engine
    assert gen.push(model) == len(names)
    assert engine.calls[0] == "wake:weights" and engine.calls[-1] == "reset"
    settings = SamplingSettings(max_new_tokens=8, temperature=0.0)
    prompts = ["Explain how photosynthesis works.", "Write a short poem."]
    ours, _ = generate(engine.model, tok, prompts, settings, progress=False)
    theirs, _ = generate(copy.deepcopy(model).merge_and_unload(), tok, prompts, settings, progress=False)
    assert [r.response_ids for r in ours] == [r.response_ids for r in theirs]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_fsdp2_shards_are_gathered_into_full_tensors(student):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model, _, names, _ = student
    expected = dict(vllm_weights(model))
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port()}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert isinstance(next(model.parameters()), DTensor)
        pushed = dict(vllm_weights(model))
        assert not any(isinstance(t, DTensor) for t in pushed.values())
        assert list(pushed) == list(names)
        assert all(torch.allclose(pushed[k], expected[k], atol=1e-6) for k in names)
    finally:
        torch.distributed.destroy_process_group()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_without_vllm_the_note_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert vllm_generate_or_none("smollm2-135m-instruct", precision="fp32", gpu_memory_utilization=0.3, seed=0) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vllm is not installed" in err and "transformers" in err
