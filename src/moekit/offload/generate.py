"""Generation under an expert-memory budget, with the figures of docs/offload.md.

    result = offloaded_generate(model_or_run, prompt_ids, 64, budget="25%", policy="predictive")
    result.ids_BT, result.metrics, result.trace

Stages:
  1. model and store (moekit.offload.load): a module (its experts are written to `store_dir`, or a
     temporary store), a moekit run directory (its store RUN/expert-store is written once and
     reused while the checkpoint is unchanged; the model is then built without its experts), or a
     store directory written from a moekit model;
  2. `offload` the model (OffloadRuntime), record the executed routing with TraceRecorder;
  3. the loop of moekit.models.generate (KV cache, same sampling), prefill timed apart from
     decode; transformers models step with their own cache (`cache`, `past_key_values` before 5.x renamed it);
  4. metrics: decode tokens/s = decoded tokens / decode time, p50/p95 per-token latency, hit rate,
     expert bytes moved per token, prefetch use, and the re-simulated hit rates of the same
     policy and of set-MIN / bypass-MIN on this run's trace (the policy's must equal the measured).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import resource
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from moekit.analysis.routing_trace import RoutingTrace
from moekit.analysis.trace import TraceRecorder
from moekit.models.generate import decode
from moekit.offload.budget import format_bytes
from moekit.offload.load import open_model_and_store, store_matches_model  # lived here before load.py
from moekit.offload.runtime import OffloadRuntime, expert_shape, offload, plan_offload
from moekit.offload.simulate import simulate_run
from moekit.offload.store import ExpertStore
from moekit.utils.ids import check_token_ids

__all__ = ["OffloadResult", "decode_loop", "offloaded_generate", "open_model_and_store", "store_matches_model"]


@dataclass
class OffloadResult:
    ids_BT: torch.Tensor  # prompt + generated tokens
    metrics: dict[str, Any]
    trace: RoutingTrace | None  # executed routing of every forward (prefill, then one per decode token)


# ----------------------------------------------------------------------------- model stepping


class _Stepper:
    """model(ids of the new positions) -> logits (B, T, V), with the model's own KV cache."""

    def __init__(self, model: nn.Module, batch: int, max_len: int):
        from moekit.hf.adapters import HFCausalLM  # transformers is imported only for HF models
        from moekit.models.lm import KVCache, MoELM

        self.model = model
        if isinstance(model, MoELM):
            param = next(p for p in model.parameters() if not p.is_meta)
            self.device = param.device
            self.cache = KVCache(model.cfg, batch, max_len, device=param.device, dtype=param.dtype)
            self.hf = None
            self.pad_id = None
            self.vocab_size = model.cfg.vocab_size
            if max_len > model.cfg.max_seq_len:
                raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds max_seq_len={model.cfg.max_seq_len}")
        else:
            self.hf = model.model if isinstance(model, HFCausalLM) else model
            self.vocab_size = self.hf.get_input_embeddings().num_embeddings
            # what transformers' generate fills a finished row with (None: its first eos id, as it does)
            self.pad_id = getattr(getattr(self.hf, "generation_config", None), "pad_token_id", None)
            self.device = next(p.device for p in model.parameters() if not p.is_meta)
            self.past = None
            # transformers 5.x renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40):
            # pass and read the cache under the name this model's forward takes.
            takes = inspect.signature(self.hf.forward).parameters
            self.cache_name = "cache" if "cache" in takes else "past_key_values"
            # The loop reads the last position's logits: the prefill computes no (B, T, V) logits (a long prompt
            # and a large vocabulary: gigabytes), as transformers' generate asks with logits_to_keep=1.
            self.keep = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}

    def __call__(self, ids_BT: torch.Tensor) -> torch.Tensor:
        if self.hf is None:
            return self.model(ids_BT, cache=self.cache)
        out = self.hf(input_ids=ids_BT, use_cache=True, **{self.cache_name: self.past}, **self.keep)
        self.past = out[self.cache_name]
        return out.logits


@torch.no_grad()
def decode_loop(model: nn.Module, prompt_ids_BT: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                top_p: float = 1.0, seed: int | None = None, eos_id: int | list[int] | None = None,
                runtime: OffloadRuntime | None = None, record: bool = True,
                pad_id: int | None = None) -> tuple[torch.Tensor, dict, RoutingTrace | None]:
    """moekit.models.generate's loop, timed: prompt + new tokens (B, T + n), timings, routing trace.
    With `runtime`, tells it which forward is the prefill and which are decode steps. A row that has
    produced an `eos_id` is filled with `pad_id`; by default a transformers model's
    `generation_config.pad_token_id` (as its own `generate`), else the first eos id."""
    if prompt_ids_BT.dim() != 2 or prompt_ids_BT.shape[1] == 0:
        raise ValueError(f"prompt must be (B, T) with T >= 1, got shape {tuple(prompt_ids_BT.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, T = prompt_ids_BT.shape
    was_training = model.training
    model.eval()
    step = _Stepper(model, B, T + max_new_tokens)
    # Once, before decoding: an HF model's embedding raises a raw IndexError for an id beyond it.
    check_token_ids(prompt_ids_BT, step.vocab_size, "the prompt", "the model's vocabulary", host=True)
    generator = None if seed is None else torch.Generator(device=step.device).manual_seed(seed)
    seconds: list[float] = []

    def before_step(i: int) -> None:
        if runtime is not None:
            runtime.begin_forward("prefill" if i == 0 else "decode")

    rec = TraceRecorder(model, gate_lookahead=0) if record else None
    try:
        with rec if rec is not None else contextlib.nullcontext():
            ids_BT = decode(lambda new_BT, _all_BT: step(new_BT), prompt_ids_BT.to(step.device), max_new_tokens,
                            temperature, top_p, generator, eos_id, before_step=before_step, step_seconds=seconds,
                            pad_id=step.pad_id if pad_id is None else pad_id)
    finally:
        model.train(was_training)
    trace = rec.to_trace({"source": "offloaded_generate"}) if rec is not None else None
    return ids_BT, {"prefill_s": seconds[0], "latencies_s": seconds[1:], "batch": B, "prompt_tokens": T}, trace


# ----------------------------------------------------------------------------- the run


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def offloaded_generate(model_or_run: nn.Module | str | os.PathLike, prompt_ids: torch.Tensor | list[int],
                       max_new_tokens: int, budget: str | int | float = "25%", policy: str = "lru", *,
                       scope: str = "layer", store_dir: str | os.PathLike | None = None, hot_set=None,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       eos_id: int | list[int] | None = None, pad_id: int | None = None, verify: str = "first",
                       release: bool = False, simulate: bool = True, log=None) -> OffloadResult:
    """Generate with at most `budget` bytes of expert weights resident (see the module doc).

    model_or_run: a model (MoELM, moekit.hf.HFCausalLM or a wrapped transformers model), a moekit
        run directory, or an expert store written from a moekit model.
    budget, policy, scope, hot_set, verify: see `moekit.offload.offload`.
    release: free the given model's resident expert weights for good (the CLI does; by default
        the model gets its experts back afterwards).
    eos_id, pad_id: a row stops at an eos id and is then filled with pad_id (see `decode_loop`).
    Greedy output (temperature 0) equals fully resident generation token for token.
    """
    prompt_BT = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt_BT.dim() == 1:
        prompt_BT = prompt_BT.unsqueeze(0)
    # The budget, policy and hot set are checked before a store is written (and again against the store).
    model, store_path, temporary = open_model_and_store(
        model_or_run, store_dir, log, before_write=lambda m: plan_offload(m, expert_shape(m), budget, policy, scope,
                                                                         hot_set))
    owns_model = not isinstance(model_or_run, nn.Module)
    try:
        with ExpertStore(store_path, verify=verify) as store, \
                offload(model, store, budget, policy, scope, hot_set=hot_set, release=release or owns_model) as rt:
            ids_BT, timing, trace = decode_loop(model, prompt_BT, max_new_tokens, temperature=temperature,
                                                top_p=top_p, seed=seed, eos_id=eos_id, runtime=rt, record=True,
                                                pad_id=pad_id)
            metrics = run_metrics(rt, timing, trace, simulate=simulate)
            metrics["store"] = str(store_path) if not temporary else "(temporary)"
    finally:
        if temporary:
            shutil.rmtree(store_path.parent, ignore_errors=True)
    return OffloadResult(ids_BT, metrics, trace)


def run_metrics(rt: OffloadRuntime, timing: dict, trace: RoutingTrace | None, simulate: bool = True) -> dict[str, Any]:
    """The figures of one run (module doc); `simulate` adds the re-simulated hit rates."""
    plan, cache = rt.plan, rt.cache
    dec, pre = cache.stats["decode"], cache.stats["prefill"]
    lat = timing["latencies_s"]
    B = timing["batch"]
    decode_tokens = len(lat) * B
    decode_s = float(sum(lat))
    S = plan.expert_nbytes
    loaded_bytes = dec.loaded_nbytes
    wasted_bytes = dec.wasted_prefetches * S
    load_time = dec.load_s + dec.prefetch_load_s + pre.load_s + pre.prefetch_load_s
    all_loaded = dec.loaded_nbytes + pre.loaded_nbytes
    m: dict[str, Any] = {
        "policy": plan.policy, "scope": plan.scope,
        "budget_bytes": plan.budget_nbytes, "budget_fraction": plan.budget_nbytes / plan.total_nbytes,
        "capacity_experts": plan.capacity, "caches": plan.num_caches, "hot_capacity": plan.hot_capacity,
        "expert_bytes": S, "total_expert_bytes": plan.total_nbytes,
        "batch": B, "prompt_tokens": timing["prompt_tokens"], "decode_tokens": decode_tokens,
        "prefill_s": timing["prefill_s"], "decode_s": decode_s,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
        "latency_p50_ms": 1e3 * _percentile(lat, 50), "latency_p95_ms": 1e3 * _percentile(lat, 95),
        "hit_rate": dec.hits / dec.requests if dec.requests else float("nan"),
        "prefill_hit_rate": pre.hits / pre.requests if pre.requests else float("nan"),
        "requests": dec.requests, "hits": dec.hits, "demand_loads": dec.demand_loads,
        "prefetch_loads": dec.prefetch_loads, "useful_prefetches": dec.useful_prefetches,
        "wasted_prefetches": dec.wasted_prefetches, "late_prefetches": dec.late_prefetches,
        "bytes_moved_per_token": loaded_bytes / decode_tokens if decode_tokens else float("nan"),
        "wasted_prefetch_bytes": wasted_bytes,
        "prefill_bytes_moved": pre.loaded_nbytes,
        "stall_s": dec.stall_s, "load_s": dec.load_s, "prefetch_load_s": dec.prefetch_load_s,
        "load_bandwidth_bytes_per_s": all_loaded / load_time if load_time > 0 else float("nan"),
        "peak_resident_expert_bytes": cache.peak_resident_nbytes,
        # Everything resident besides the cached experts: latent projections and the like count here.
        "dense_bytes": sum(p.numel() * p.element_size() for p in rt.model.parameters() if not p.is_meta),
        "peak_rss_bytes": peak_rss_bytes(),
        "decode_stats": dec.as_dict(), "prefill_stats": pre.as_dict(),
    }
    # The simulators count equal slots over router expert ids: a store of experts of different sizes
    # (mixed widths) or of merged layers has neither, so its run is not re-simulated.
    exact = rt.store.uniform and all(m is None for m in rt.store.expert_maps)
    if simulate and trace is not None and not exact:
        m["simulated_skipped"] = "experts of different sizes or merged layers: the simulators assume neither"
    if simulate and trace is not None and exact:
        sim = simulate_run(trace, B, plan, hot_keys=[sorted(c.hot) for c in cache.caches],
                           predictions=rt.predictions)
        measured = [np.array(h, dtype=bool) for h, _ in cache.request_log()]
        equal = len(measured) == len(sim["flags"]["policy"]) and all(
            a.shape == b.shape and bool((a == b).all()) for a, b in zip(measured, sim["flags"]["policy"], strict=True))
        dec_tokens = max(decode_tokens, 1)
        m["simulated"] = {
            "policy_hit_rate": sim["policy_hit_rate"],
            "set_min_hit_rate": sim["set_min_hit_rate"],
            "bypass_min_hit_rate": sim["bypass_min_hit_rate"],
            "hit_flags_equal_measured": equal,
            "min_bytes_per_token": (sim["set_min_decode_requests"] - sim["set_min_decode_hits"]) * S / dec_tokens,
            "bypass_min_bytes_per_token":
                (sim["bypass_min_decode_requests"] - sim["bypass_min_decode_hits"]) * S / dec_tokens,
        }
        if plan.policy == "predictive":
            m["simulated"].update({k: sim[k] for k in ("prefetch_loads", "useful_prefetches", "wasted_prefetches")})
    return m


def format_metrics(m: dict[str, Any]) -> str:
    """A short human-readable summary of `run_metrics`."""
    lines = [
        f"offload: {m['policy']} cache ({'per layer' if m['scope'] == 'layer' else 'shared'}), budget "
        f"{format_bytes(m['budget_bytes'])} ({m['budget_fraction']:.1%} of {format_bytes(m['total_expert_bytes'])}), "
        f"{m['capacity_experts']} experts per cache",
        f"  prefill {m['prompt_tokens']} tokens: {1e3 * m['prefill_s']:.1f} ms; decode {m['decode_tokens']} tokens: "
        f"{m['decode_tokens_per_s']:.2f} tokens/s, latency p50 {m['latency_p50_ms']:.2f} ms, p95 {m['latency_p95_ms']:.2f} ms",
        f"  hit rate {m['hit_rate']:.4f} (prefill {m['prefill_hit_rate']:.4f}); expert bytes moved per token "
        f"{format_bytes(m['bytes_moved_per_token'])}; wasted prefetch {format_bytes(m['wasted_prefetch_bytes'])}",
        f"  peak resident experts {format_bytes(m['peak_resident_expert_bytes'])}; peak RSS {format_bytes(m['peak_rss_bytes'])}",
    ]
    s = m.get("simulated")
    if s:
        lines.append(f"  simulated on this run's trace: {m['policy']} {s['policy_hit_rate']:.4f} "
                     f"({'equals' if s['hit_flags_equal_measured'] else 'DIFFERS FROM'} the measured), set-MIN "
                     f"{s['set_min_hit_rate']:.4f}, bypass-MIN {s['bypass_min_hit_rate']:.4f}; MIN floor "
                     f"{format_bytes(s['min_bytes_per_token'])} per token")
    return "\n".join(lines)
