"""The SFT step (cross-entropy on the response tokens only) shared by the SFT methods and the
Cross-SFT cold start, and the NLL of SFT targets under a model (DGR's distribution shift)."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..data.schema import Demonstration
from ..models import chat_text
from .distributed import is_sharded
from .rollout import encode_prompts, stop_token_ids
from .scoring import response_logits


def target_ids(tok, d: Demonstration, stop: int) -> list[int]:
    """What an SFT target is: reasoning (if any), a blank line, the response, then the stop token
    (none after a target cut at its generator's token limit: the answer did not end there)."""
    text = (f"{d.reasoning}\n\n" if d.reasoning else "") + d.response
    return tok(text, add_special_tokens=False)["input_ids"] + ([] if d.truncated else [stop])


class SFTStep:
    def __init__(self, tok):
        self.tok = tok
        self.stop = stop_token_ids(tok)[0]

    def target_ids(self, d: Demonstration) -> list[int]:
        return target_ids(self.tok, d, self.stop)

    def response_logits(self, model, prompts: list[list[int]], targets: list[list[int]]):
        # Under FSDP2 every process runs the same forwards: no shard-dependent prefix pass.
        return response_logits(
            model, prompts, targets, pad_id=self.tok.pad_token_id, share_prefix=not is_sharded(model)
        )

    def state(self) -> dict:
        """Nothing beyond the weights travels in checkpoints."""
        return {}

    def load(self, state: dict) -> None:
        return None

    def __call__(self, model, batch: list[Demonstration], step: int, micro: int) -> tuple[torch.Tensor, dict]:
        t0 = time.perf_counter()
        model.train()
        prompts = encode_prompts(self.tok, [chat_text(self.tok, d.prompt) for d in batch])
        targets = [self.target_ids(d) for d in batch]
        logits, mask = self.response_logits(model, prompts, targets)
        labels = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
        for i, t in enumerate(targets):
            labels[i, : len(t)] = torch.tensor(t)
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        n_tok = int(mask.sum())
        with torch.no_grad():  # for the divergence guard: a destroyed model is uniform (ln V)
            logp = logits.detach().float().log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1)
        return loss, {
            "loss": loss.item(),
            "student_entropy": float((entropy * mask).sum() / mask.sum()),
            "tokens": n_tok,
            "loss_tokens": float(n_tok),
            "target_length": n_tok / len(batch),
            "t_student": time.perf_counter() - t0,
        }


@torch.no_grad()
def sequence_nll(model, tok, samples: list[Demonstration], *, batch_size: int = 8, progress=True) -> list[tuple]:
    """(summed NLL in nats, token count) of each sample's SFT target given its chat-formatted prompt."""
    model.eval()
    stop = stop_token_ids(tok)[0]
    out = []
    for start in tqdm(range(0, len(samples), batch_size), desc="nll", disable=not progress, leave=False):
        batch = samples[start : start + batch_size]
        prompts = encode_prompts(tok, [chat_text(tok, d.prompt) for d in batch])
        targets = [target_ids(tok, d, stop) for d in batch]
        logits, mask = response_logits(model, prompts, targets, pad_id=tok.pad_token_id)
        logp = logits.float().log_softmax(-1)
        for i, t in enumerate(targets):
            picked = logp[i, : len(t)].gather(-1, torch.tensor(t, device=logp.device).unsqueeze(-1))
            out.append((float(-picked.sum()), len(t)))
    return out
