"""GPU-ready single process (issue 22), checked on CPU with tiny random models: the weights'
dtype, fp32 master weights for what is trained, gradient checkpointing, the attention
implementation, and peak memory in metrics.jsonl."""

import json

import pytest
import torch
import yaml

from helpers import run_settings, write_sources
from safedistill.config import RunConfig, load_config, settings_differ, to_yaml
from safedistill.engine.memory import peak_memory_mb, reset_peak_memory, step_peak_memory_mb
from safedistill.engine.scoring import recomputes_layers, response_logits, shared_prefix_length
from safedistill.errors import UserError
from safedistill.models import LoraSettings, add_lora, load_model, load_options, prepare_student, weights_dtype
from safedistill.train import train


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("data"))


def model_section(**fields):
    return RunConfig(**fields).section("model")


def test_auto_dtype_is_fp32_on_cpu_and_bf16_is_honoured():
    assert weights_dtype("auto", "cpu") == "fp32"  # CPU runs keep their numbers
    assert load_options(model_section(), "cpu") == {"dtype": torch.float32, "attn_implementation": "sdpa"}
    assert load_options(model_section(dtype="bf16"), "cpu")["dtype"] == torch.bfloat16


def test_bf16_weights_train_a_lora_step_with_fp32_adapters(tiny_dir):
    model, tok = load_model(tiny_dir, **load_options(model_section(dtype="bf16"), "cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = prepare_student(add_lora(model, LoraSettings(r=4, alpha=8)), model_section(dtype="bf16"))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    before = {n: p.detach().clone() for n, p in trained.items()}
    opt = torch.optim.AdamW(trained.values(), lr=1e-2)
    prompts = [tok("Explain how photosynthesis works.")["input_ids"]] * 2
    model.train()
    for _ in range(2):  # B starts at 0: the second step moves A too
        logits, mask = response_logits(model, prompts, [[5, 6, 7], [8, 9]], pad_id=tok.pad_token_id)
        loss = (logits.float().logsumexp(-1) * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in trained.values())
    assert all(not torch.equal(before[n], p) for n, p in trained.items())
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)


def test_full_parameter_student_keeps_fp32_master_weights(tiny_dir):
    model, _ = load_model(tiny_dir, dtype=torch.bfloat16)
    model = prepare_student(model.requires_grad_(True), model_section(dtype="bf16"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def _loss_and_grads(tiny_dir, checkpointing: bool):
    torch.manual_seed(0)
    model, tok = load_model(tiny_dir)
    model = prepare_student(
        add_lora(model, LoraSettings(r=4, alpha=8)), model_section(gradient_checkpointing=checkpointing)
    )
    for n, p in model.named_parameters():  # B = 0 at init would give A no gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    calls = []
    mlp = model.get_base_model().model.layers[0].mlp  # called inside the checkpointed forward
    hook = mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    # Two prompts sharing their first tokens: without checkpointing that prefix runs once, cached.
    system = "<|im_start|>system\nYou are a helpful assistant. Answer the question briefly.<|im_end|>\n"
    prompts = [tok(f"{system}{x}")["input_ids"] for x in ("Explain photosynthesis.", "Write a poem.")]
    assert shared_prefix_length(prompts) > 0
    logits, mask = response_logits(model, prompts, [[5, 6, 7], [8, 9]], pad_id=tok.pad_token_id)
    assert recomputes_layers(model) is checkpointing
    loss = (torch.log_softmax(logits, -1)[..., 11] * mask).sum() / mask.sum()
    forwards = len(calls)
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(calls) - forwards  # layer calls during the backward


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_dir):
    loss, grads, replays = _loss_and_grads(tiny_dir, False)
    loss_ckpt, grads_ckpt, replays_ckpt = _loss_and_grads(tiny_dir, True)
    assert (replays, replays_ckpt) == (0, 1)  # the layer really ran again in the backward
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_ckpt.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_model_config(tiny_dir, impl):
    model, _ = load_model(tiny_dir, **load_options(model_section(attn_implementation=impl), "cpu"))
    assert model.config._attn_implementation == impl


def test_unknown_or_unavailable_attention_is_one_line(tiny_dir, sources, tmp_path):
    with pytest.raises(UserError) as bad:
        load_config("opsa", overrides=run_settings(tiny_dir, sources, attn_implementation="flash"))
    assert "attn_implementation" in str(bad.value) and "\n" not in str(bad.value)
    cfg = load_config("opsa", overrides=run_settings(tiny_dir, sources, attn_implementation="flash_attention_2"))
    with pytest.raises(UserError) as missing:  # no flash-attn and no CUDA device here: refused before any write
        train(cfg, tmp_path / "run", progress=False)
    assert "flash-attn" in str(missing.value) and "\n" not in str(missing.value)
    assert not (tmp_path / "run").exists()


def test_old_run_dirs_agree_on_cpu_with_the_default_dtype():
    saved = yaml.safe_load(to_yaml(RunConfig(device="cpu")))
    for name in ("dtype", "attn_implementation", "gradient_checkpointing"):
        del saved[name]
    old = yaml.safe_dump(saved)
    assert settings_differ(old, RunConfig(device="cpu")) == []
    assert settings_differ(old, RunConfig(device="cpu", dtype="bf16")) == ["dtype"]


def test_peak_memory_rises_with_a_large_allocation():
    if not reset_peak_memory("cpu"):
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    base = peak_memory_mb("cpu")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert peak_memory_mb("cpu") >= base + 60
    del block
    step_peak_memory_mb("cpu")  # reads, then starts a new peak at the current (lower) RSS
    assert peak_memory_mb("cpu") < base + 60


def test_metrics_rows_carry_peak_memory_and_bf16_runs_train(tiny_dir, sources, tmp_path):
    overrides = run_settings(tiny_dir, sources, steps=2, batch_size=2, dtype="bf16", gradient_checkpointing=True)
    cfg = load_config("opsa", overrides=overrides)
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["peak_memory_mb"] > 50 for r in rows)  # the process's RSS: torch alone is more
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
