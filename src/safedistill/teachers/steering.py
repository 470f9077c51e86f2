"""The steering teacher and the two interventions it and its search use: the hook that adds a
vector at one layer's input, and directional ablation. The direction and its (layer, scale) are
found by searches/steering.py.

Works on any decoder whose layers sit at `model.model.layers` (Llama, Qwen2/3, Mistral, Gemma),
also behind a peft wrapper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..engine.rollout import encode_prompts
from ..engine.scoring import response_logits
from ..errors import UserError
from ..models import chat_text
from .base import Item


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (unwrapping peft)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"{type(inner).__name__}: steering needs a decoder exposing model.model.layers")
    return layers


@contextlib.contextmanager
def steer(model, layer: int, vector: torch.Tensor, scale: float = 1.0) -> Iterator:
    """Adds `scale * vector` to the input of decoder layer `layer` at every position while the
    context is open; the hook is removed on exit, also when the body raises."""
    block = decoder_layers(model)[layer]
    param = next(block.parameters())
    delta = (scale * vector.to(torch.float64)).to(device=param.device, dtype=param.dtype)

    def hook(module, args, kwargs):
        if args:
            return (args[0] + delta.to(args[0].dtype), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] + delta.to(kwargs["hidden_states"].dtype)
        return args, kwargs

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def _ablated(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    u = unit.to(device=x.device, dtype=x.dtype)
    return x - (x @ u).unsqueeze(-1) * u


@contextlib.contextmanager
def ablate(model, direction: torch.Tensor) -> Iterator:
    """Projects `direction` out of the residual stream at every layer and position while open: each
    decoder layer's input, its attention output and its MLP output, as the refusal-direction code
    does (so no write into the stream carries the direction). Hooks are removed on exit."""
    unit = direction.to(torch.float64)
    unit = unit / (unit.norm() + 1e-8)
    handles = []

    def pre(module, args, kwargs):
        if args:
            return (_ablated(args[0], unit), *args[1:]), kwargs
        kwargs["hidden_states"] = _ablated(kwargs["hidden_states"], unit)
        return args, kwargs

    def post(module, args, output):
        if isinstance(output, tuple):
            return (_ablated(output[0], unit), *output[1:])
        return _ablated(output, unit)

    try:
        for block in decoder_layers(model):
            attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
            if attn is None or mlp is None:
                raise UserError(f"{type(block).__name__}: ablation needs decoder layers with self_attn and mlp")
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(attn.register_forward_hook(post))
            handles.append(mlp.register_forward_hook(post))
        yield model
    finally:
        for h in handles:
            h.remove()


class SteeringTeacher:
    """Base model with `scale * vector` added at one layer's input (activation steering). It sees
    the same prompt as the student (a rewritten prompt's original with augment_teacher=original);
    only the hidden states differ."""

    def __init__(self, base, tokenizer, *, layer: int, vector: torch.Tensor, scale: float = 1.0):
        self.base, self.tokenizer, self.reference = base, tokenizer, base
        self.layer, self.vector, self.scale = layer, vector, scale

    @torch.no_grad()
    def logits(self, student, items: Sequence[Item], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        prompts = encode_prompts(self.tokenizer, [chat_text(self.tokenizer, it.teacher_view) for it in items])
        with self.base.weights(student) as model, steer(model, self.layer, self.vector, self.scale):
            logits, _ = response_logits(model, prompts, responses, pad_id=self.tokenizer.pad_token_id)
        return logits
