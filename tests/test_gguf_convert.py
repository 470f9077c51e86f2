"""The GGUF -> safetensors conversion of bundled models, on a tiny GGUF written here: it keeps the
weights, and it leaves torch's global RNG where it found it (a first run that converts must give
the same numbers as a later run that finds the cache)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from safedistill.models import convert_gguf

HIDDEN, FF, HEADS, KV_HEADS = 16, 32, 2, 1
TOKENS = ["<s>", "</s>", "a", "b", "c", "ab", "Ġ"]


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A one-layer float32 llama GGUF with a 7-token BPE vocabulary; returns its tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    kv = KV_HEADS * HIDDEN // HEADS
    shapes = {
        "token_embd.weight": (len(TOKENS), HIDDEN),
        "output_norm.weight": (HIDDEN,),
        "output.weight": (len(TOKENS), HIDDEN),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": (kv, HIDDEN),
        "blk.0.attn_v.weight": (kv, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
        "blk.0.ffn_gate.weight": (FF, HIDDEN),
        "blk.0.ffn_up.weight": (FF, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FF),
    }
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_convert_gguf_keeps_weights_and_global_rng(tmp_path):
    from transformers import AutoModelForCausalLM

    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "model")
    assert torch.equal(torch.random.get_rng_state(), before)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    weights = model.state_dict()
    assert torch.equal(weights["model.embed_tokens.weight"], torch.from_numpy(tensors["token_embd.weight"]))
    assert torch.equal(weights["lm_head.weight"], torch.from_numpy(tensors["output.weight"]))
    assert torch.equal(
        weights["model.layers.0.mlp.down_proj.weight"], torch.from_numpy(tensors["blk.0.ffn_down.weight"])
    )
    assert (tmp_path / "model" / "tokenizer.json").is_file()


def test_conversion_draws_its_bar_only_on_a_terminal(tmp_path, capfd):
    """transformers' de-quantizing bar is a plain tqdm: a log file (no terminal) gets no redraws."""
    from safedistill import console

    write_tiny_gguf(tmp_path / "tiny.gguf")
    try:
        for tty, out in ((False, "quiet"), (True, "shown")):
            console.set_quiet(False, tty=tty)
            capfd.readouterr()
            convert_gguf(tmp_path / "tiny.gguf", tmp_path / out)
            err = capfd.readouterr().err
            assert ("de-quantizing GGUF tensors" in err) is tty, err[-300:]
    finally:
        console.set_quiet(False)


def test_conversion_reads_the_gguf_once_and_writes_the_same_files(tmp_path, monkeypatch):
    """transformers parses the file for the tokenizer, the config and the weights, and builds
    gguf's tensor-name table per submodule: one conversion makes each once (the slow part of a
    first run's conversion), and its files are byte for byte those of a conversion without that."""
    import contextlib

    from safedistill import models

    write_tiny_gguf(tmp_path / "tiny.gguf")
    made = {"readers": 0, "tables": 0}
    real_reader, real_table = gguf.GGUFReader, gguf.get_tensor_name_map

    def counted_reader(*args, **kwargs):
        made["readers"] += 1
        return real_reader(*args, **kwargs)

    def counted_table(*args):
        made["tables"] += 1
        return real_table(*args)

    monkeypatch.setattr(gguf, "GGUFReader", counted_reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counted_table)
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "once")
    assert made == {"readers": 1, "tables": 1}

    monkeypatch.setattr(models, "_gguf_read_once", contextlib.nullcontext)
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "each")
    assert made["readers"] >= 3 and made["tables"] > 2, made  # what the once-only reading saves
    files = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "once").iterdir())
    for name in files:
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "each" / name).read_bytes(), name
