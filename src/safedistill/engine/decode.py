"""A lean decode step for Llama-style decoders: the same arithmetic as the transformers forward
for one new token per row, without its per-step machinery.

A decode step of a small model is hundreds of tiny ops; at batch 8 the transformers forward
spends more time building masks, growing the KV cache by concatenation (every step copies the
whole cache again), dispatching module hooks and packing outputs than in the matmuls. This step
keeps the KV cache in buffers allocated once per batch (written in place, read as a view of the
filled length), builds the mask once per step, and calls the model's own weights and attention
function in the order transformers does, so the logits are bit-for-bit those of `model(...)`:
greedy decoding gives the same tokens as `model.generate` (tests/test_decode.py, and on the
default model in bench/decode_check.py).

Which models: Llama and Qwen2 (no sliding-window layers), plain or with peft LoRA layers (those
run through their own module, as in the training forward), in eval mode and with no forward
hooks. Anything else returns None from `FastDecoder.of` and decodes with the transformers forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

from .scoring import _causal_lm

SUPPORTED = ("llama", "qwen2")


def _supported(lm) -> bool:
    config = getattr(lm, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED or getattr(config, "hidden_act", None) != "silu":
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    if getattr(config, "pretraining_tp", 1) != 1:
        return False
    inner = getattr(lm, "model", None)
    return all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))


def _hooked(model) -> bool:
    """Whether a forward hook could change what a module computes (a steering hook on a layer, a
    test's scripted logits): the step would bypass it, so the transformers forward runs."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _plain(module) -> bool:
    return type(module) is torch.nn.Linear


def _lora_parts(module) -> tuple[torch.nn.Linear, torch.nn.Linear | None, torch.nn.Linear | None, float]:
    """(base, A, B, scaling) of a peft LoRA Linear whose forward is base(x) + B(A(x)) * scaling
    (one plain adapter, no dropout at work, no variant); (base, None, None, 0) when its adapters
    are disabled or merged into the base weights; a ValueError for anything else (the module is
    then called as it is)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear or not _plain(module.base_layer):
        raise ValueError
    if module.disable_adapters and module.merged:  # peft would unmerge the weights first
        raise ValueError
    if module.disable_adapters or module.merged:  # merged: the base weights hold the adapter
        return module.base_layer, None, None, 0.0
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in module.lora_variant:
        raise ValueError
    name = active[0]
    a, b, drop = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    idle = isinstance(drop, torch.nn.Identity) or (isinstance(drop, torch.nn.Dropout) and not drop.training)
    same_dtype = a.weight.dtype == module.base_layer.weight.dtype
    if not (idle and same_dtype and _plain(a) and _plain(b) and a.bias is None and b.bias is None):
        raise ValueError
    return module.base_layer, a, b, module.scaling[name]


class _Proj:
    """A projection on a row-per-sequence input [B, in], as the matmuls its forward reaches: a
    plain nn.Linear is mm (addmm with a bias: what F.linear does with the flattened [B, 1, in]
    input), with the transposed weight taken once; a peft LoRA Linear adds B(A(x)) * scaling the
    same way, in peft's order; any other module is called on [B, 1, in] as transformers calls it."""

    __slots__ = ("weight_t", "bias", "a_t", "b_t", "scaling", "module")

    def __init__(self, module):
        self.module, self.a_t, self.b_t, self.scaling = module, None, None, 0.0
        base = module if _plain(module) else None
        if base is None:
            try:
                base, a, b, self.scaling = _lora_parts(module)
            except (ValueError, ImportError):
                base = None
            else:
                self.a_t, self.b_t = (a.weight.t(), b.weight.t()) if a is not None else (None, None)
        self.weight_t = base.weight.t() if base is not None else None
        self.bias = base.bias if base is not None else None
        if self.a_t is not None and self.weight_t.dtype == torch.float32:
            self.scaling = _scalar(self.scaling, self.weight_t.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is None:
            return self.module(x[:, None])[:, 0]
        out = torch.mm(x, self.weight_t) if self.bias is None else torch.addmm(self.bias, x, self.weight_t)
        if self.a_t is not None:
            out = out + torch.mm(torch.mm(x, self.a_t), self.b_t) * self.scaling
        return out


class _Group:
    """Projections that read the same input (q, k and v; gate and up) as one matmul over their
    weights side by side, split into each one's output: every output element is the same dot
    product in the same order as its own projection's matmul (the concatenation only adds columns;
    checked bit for bit against the transformers forward in tests/test_decode.py), in one call
    instead of three or two, which at batch 8 cost more in dispatch than in arithmetic. LoRA
    projections add their own B(A(x)) * scaling to their part, in peft's order (A matmuls fused
    the same way did not give the same bits: their parts are strided views).
    `of` returns None (each projection then runs alone) unless all are plain or all one-adapter LoRA
    with the same dtype and the same bias presence."""

    __slots__ = ("weight_t", "bias", "sizes", "lora_on", "lora")

    def __init__(self, projs: list[_Proj]):
        # [out, in] weights stacked, then transposed as a view: the layout nn.Linear's own weight
        # has, so the matmul runs the same kernel (a row-major [in, out] copy rounds differently)
        self.weight_t = torch.cat([p.weight_t.t() for p in projs]).t()
        self.bias = torch.cat([p.bias for p in projs]) if projs[0].bias is not None else None
        self.sizes = [p.weight_t.shape[1] for p in projs]
        self.lora_on = projs[0].a_t is not None
        self.lora = [(p.a_t, p.b_t, p.scaling) for p in projs]

    @classmethod
    def of(cls, projs: list[_Proj]) -> _Group | None:
        first = projs[0]
        if any(p.weight_t is None for p in projs):
            return None
        same = all(
            p.weight_t.dtype == first.weight_t.dtype
            and p.weight_t.device == first.weight_t.device
            and (p.bias is None) == (first.bias is None)
            and (p.a_t is None) == (first.a_t is None)
            for p in projs
        )
        return cls(projs) if same else None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = torch.mm(x, self.weight_t) if self.bias is None else torch.addmm(self.bias, x, self.weight_t)
        parts = list(out.split(self.sizes, dim=1))
        if self.lora_on:
            parts = [
                part + torch.mm(torch.mm(x, a_t), b_t) * scaling
                for part, (a_t, b_t, scaling) in zip(parts, self.lora, strict=True)
            ]
        return parts


def _scalar(value: float, device) -> torch.Tensor:
    """A float32 0-dim tensor: the same operand a Python number becomes in a float32 op, without
    wrapping it into a new tensor at every call."""
    return torch.tensor(value, dtype=torch.float32, device=device)


class _Norm:
    """LlamaRMSNorm / Qwen2RMSNorm's weight and epsilon, with its constants made once."""

    __slots__ = ("weight", "eps", "width")

    def __init__(self, norm):
        self.weight = norm.weight
        self.eps = _scalar(norm.variance_epsilon, norm.weight.device)
        self.width = _scalar(norm.weight.shape[-1], norm.weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The module's forward op for op: float32 square, mean (sum then divide, what mean()
        runs), rsqrt, scale (the casts are no-ops in float32)."""
        dtype = x.dtype
        h = x if dtype == torch.float32 else x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True).div_(self.width) + self.eps)
        return self.weight * (h if dtype == torch.float32 else h.to(dtype))


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = [-x2 * s1, x1 * s2] computed
    as [x2, x1] * [-s1, s2] (a sign flip is exact, so the products are the same bits)."""
    b, h, q, d = x.shape
    return (x * cos) + (x.view(b, h, q, 2, d // 2).flip(-2).view(b, h, q, d) * signed_sin)


class _Layer:
    __slots__ = (
        "q",
        "k",
        "v",
        "o",
        "gate",
        "up",
        "down",
        "qkv",
        "gate_up",
        "act",
        "ln1",
        "ln2",
        "heads",
        "kv_heads",
        "dim",
        "scale",
    )

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = (_Proj(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.gate, self.up, self.down = (_Proj(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
        self.qkv, self.gate_up = _Group.of([self.q, self.k, self.v]), _Group.of([self.gate, self.up])
        self.act = mlp.act_fn
        self.ln1, self.ln2 = _Norm(layer.input_layernorm), _Norm(layer.post_attention_layernorm)
        config = attn.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim, self.scale = attn.head_dim, attn.scaling


class FastDecoder:
    """Decode steps for one model; `start` takes a prefilled transformers cache for a batch."""

    def __init__(self, lm):
        self.lm = lm
        inner = lm.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, _Norm(inner.norm), inner.rotary_emb
        self.head = _Proj(lm.get_output_embeddings())
        self.layers = [_Layer(layer) for layer in inner.layers[: lm.config.num_hidden_layers]]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    @classmethod
    def of(cls, model) -> FastDecoder | None:
        """The decoder for `model` (under any peft/DDP wrappers), or None when its architecture is
        not one this step reproduces exactly."""
        lm = _causal_lm(model)
        if not _supported(lm) or lm.training or lm.config._attn_implementation != "sdpa" or _hooked(model):
            return None
        return cls(lm)

    def start(self, cache, new_tokens: int) -> None:
        """Copy a prefilled cache (transformers DynamicCache) into buffers with room for
        `new_tokens` more positions."""
        self.keys, self.values = [], []
        for layer in cache.layers[: len(self.layers)]:
            k, v = layer.keys, layer.values
            b, h, t, d = k.shape
            kb = k.new_empty(b, h, t + new_tokens, d)
            vb = v.new_empty(b, v.shape[1], t + new_tokens, v.shape[-1])
            kb[:, :, :t].copy_(k)
            vb[:, :, :t].copy_(v)
            self.keys.append(kb)
            self.values.append(vb)
        self.length = cache.layers[0].keys.shape[2]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the batch) of the cache: the rows still decoding."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the next token after `tokens` [B, 1] at `positions` [B, 1];
        `attention` [B, length + 1] is the padding mask over the cache and the new token.

        Attention as transformers' sdpa_attention_forward does it for one query: SDPA's grouped
        query attention where transformers uses it (no mask, on CPU and CUDA), else the query
        heads grouped by key/value head; a padding mask in the additive form SDPA makes of a
        boolean one."""
        t = self.length
        h = self.embed(tokens)
        cos, sin = self.rotary(h, position_ids=positions)
        half = cos.shape[-1] // 2
        cos = cos.unsqueeze(1)
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
        padded = not bool(attention.all())
        mask = None
        if padded and h.device.type == "cpu":  # the additive form SDPA makes of a boolean mask, made once
            mask = torch.zeros(attention.shape, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill_(attention == 0, float("-inf"))[:, None, None, :]
        elif padded:  # elsewhere the boolean mask transformers passes (kernel choice may depend on it)
            mask = attention.bool()[:, None, None, :]
        h = h[:, 0]
        b = h.shape[0]
        first = self.keys[0]
        gqa = use_gqa_in_sdpa(mask, first, self.values[0])  # transformers' own choice, as it makes it
        for layer, kb, vb in zip(self.layers, self.keys, self.values, strict=True):
            x = layer.ln1(h)
            q, k, v = layer.qkv(x) if layer.qkv is not None else (layer.q(x), layer.k(x), layer.v(x))
            q = _rope(q.view(b, 1, layer.heads, layer.dim).transpose(1, 2), cos, signed_sin)
            k = _rope(k.view(b, 1, layer.kv_heads, layer.dim).transpose(1, 2), cos, signed_sin)
            kb.narrow(2, t, 1).copy_(k)
            vb.narrow(2, t, 1).copy_(v.view(b, 1, layer.kv_heads, layer.dim).transpose(1, 2))
            keys, values = kb.narrow(2, 0, t + 1), vb.narrow(2, 0, t + 1)
            if layer.heads == layer.kv_heads:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.scale)
            elif gqa:
                out = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=layer.scale, enable_gqa=True
                )
            else:  # the query heads of each key/value head as that head's queries
                q = q.reshape(b, layer.kv_heads, layer.heads // layer.kv_heads, layer.dim)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.scale)
            h = h + layer.o(out.reshape(b, -1))
            x = layer.ln2(h)
            gate, up = layer.gate_up(x) if layer.gate_up is not None else (layer.gate(x), layer.up(x))
            h = h + layer.down(layer.act(gate) * up)
        self.length = t + 1
        return self.head(self.norm(h))
