"""Text generation with a KV cache: greedy, temperature and top-p (nucleus) sampling.

Works with any model callable `model(input_ids_BT, cache=cache) -> logits (B, T, V)` that
advances `cache.pos` (moekit's `MoELM`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from moekit.models.lm import KVCache, MoELM


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,). temperature 0 = greedy (argmax; ties -> lowest id)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sampling: temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1:
        # Nucleus sampling (Holtzman et al., arXiv 1904.09751): the smallest prefix of tokens by
        # probability whose mass reaches top_p; the rest are removed and the prefix renormalised.
        p_sorted_BV, idx_BV = probs_BV.sort(dim=-1, descending=True, stable=True)
        # the mass before each token: the cumsum shifted by one (cumsum - p rounds differently)
        before_BV = torch.nn.functional.pad(p_sorted_BV.cumsum(-1)[:, :-1], (1, 0))
        p_sorted_BV = p_sorted_BV.masked_fill(before_BV >= top_p, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, idx_BV, p_sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MoELM, prompt_ids_BT: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
             use_cache: bool = True, pad_id: int | None = None) -> torch.Tensor:
    """Continue each prompt by up to `max_new_tokens` tokens; returns prompt + new tokens (B, T + n).

    With `use_cache=False` every step re-runs the whole sequence (the reference the cached path is
    tested against). Generation stops early when every sequence has produced `eos_id`; a sequence that
    has is filled with `pad_id` (`eos_id` without one) until the others finish.
    """
    if prompt_ids_BT.dim() != 2 or prompt_ids_BT.shape[1] == 0:
        raise ValueError(f"generate: prompt must be (B, T) with T >= 1, got shape {tuple(prompt_ids_BT.shape)}")
    B, T = prompt_ids_BT.shape
    limit = model.cfg.max_seq_len
    if T + max_new_tokens > limit:
        raise ValueError(f"generate: prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={limit}")
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    generator = None if seed is None else torch.Generator(device=param.device).manual_seed(seed)
    cache = KVCache(model.cfg, B, T + max_new_tokens, device=param.device, dtype=param.dtype) if use_cache else None

    def step(new_ids_BT: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
        return model(new_ids_BT, cache=cache) if use_cache else model(ids_BT)

    try:
        return decode(step, prompt_ids_BT.to(param.device), max_new_tokens, temperature, top_p, generator, eos_id,
                      pad_id=pad_id)
    finally:
        model.train(was_training)


def decode(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prompt_ids_BT: torch.Tensor,
           max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, eos_id: int | Sequence[int] | None = None,
           before_step: Callable[[int], None] | None = None, step_seconds: list[float] | None = None,
           pad_id: int | None = None) -> torch.Tensor:
    """The sampling loop shared by every generator. `step(new_ids_BT, all_ids_BT)` returns the logits of
    the new positions (a cached model reads the first, an uncached one the second). `before_step(i)` runs
    before forward i (0 = the prompt); `step_seconds` receives each step's time, forward + sampling.
    `eos_id`: one id or several (a transformers model's `generation_config.eos_token_id` may list more than one);
    a sequence stops at the first of them it produces, and is filled with `pad_id` afterwards (the first eos id
    without one), as transformers' `generate` fills a finished row with its pad_token_id."""
    B = prompt_ids_BT.shape[0]
    eos_S = None if eos_id is None else torch.as_tensor(eos_id, dtype=torch.long, device=prompt_ids_BT.device).view(-1)
    if eos_S is not None and eos_S.numel() == 0:
        eos_S = None
    fill = None if eos_S is None else eos_S[0] if pad_id is None else pad_id
    ids_BT = prompt_ids_BT
    done_B = torch.zeros(B, dtype=torch.bool, device=ids_BT.device)
    new_BT = ids_BT
    for i in range(max_new_tokens):
        if before_step is not None:
            before_step(i)
        t0 = time.perf_counter()
        next_B = sample_next(step(new_BT, ids_BT)[:, -1], temperature, top_p, generator)
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - t0)
        if eos_S is not None:
            next_B = next_B.masked_fill(done_B, fill)
            done_B |= torch.isin(next_B, eos_S)
        ids_BT = torch.cat([ids_BT, next_B.unsqueeze(1)], dim=1)
        new_BT = next_B.unsqueeze(1)
        if eos_S is not None and bool(done_B.all()):
            break
    return ids_BT
