"""Offloaded layers and generation: exact equality with resident runs, the budget, measured =
simulated hit rates, and the prefetch thread's shutdown."""

from __future__ import annotations

import _thread
import threading
import time
import warnings

import numpy as np
import pytest
import torch

from moekit.analysis.trace import TraceRecorder
from moekit.experts import ExpertBank
from moekit.models.generate import generate
from moekit.offload import ExpertStore, ExpertStoreError, offload, offloaded_generate, write_store
from moekit.offload.budget import plan_cache
from moekit.offload.cache import ExpertCache
from moekit.offload.generate import decode_loop

from .conftest import tiny_lm


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "moekit-prefetch"]


def _hot_counts(model) -> np.ndarray:
    """Use counts from a calibration run on another prompt (resident)."""
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), TraceRecorder(model, gate_lookahead=0) as rec:
        model(ids)
    trace = rec.to_trace()
    counts = np.zeros((trace.num_layers, trace.num_experts), dtype=np.int64)
    for s in trace.seqs:
        for layer in range(trace.num_layers):
            counts[layer] += np.bincount(s[layer][s[layer] >= 0], minlength=trace.num_experts)
    return counts


@pytest.mark.parametrize("dtype, activation, T", [
    (torch.float32, "swiglu", 12), (torch.float32, "gelu", 12),
    # bf16: native GEMMs (few rows per expert) and, without bf16 CPU instructions, fp32-computed ones
    # (many rows); the wider model makes the two round differently, so a wrong choice would show.
    (torch.bfloat16, "swiglu", 4), (torch.bfloat16, "swiglu", 100),
])
def test_offloaded_forward_is_bitwise_the_resident_one(tmp_path, dtype, activation, T):
    wide = {"d_model": 128, "d_expert": 256} if dtype == torch.bfloat16 else {}
    model = tiny_lm(activation=activation, dtype=dtype, **wide)
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
        store = write_store(model, tmp_path / "s")
        # Two experts per layer: a prefill needing all 8 runs as four cache steps.
        with offload(model, store, "25%", "lru") as rt:
            assert rt.plan.capacity == 2
            out = model(ids)
        assert torch.equal(out, ref)
    assert all(isinstance(layer.experts, ExpertBank) for layer in model.moe_layers())  # put back on close


POLICIES = ["lru", "lfu", "static", "predictive"]


@pytest.mark.parametrize("scope", ["layer", "shared"])
@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_generation_equals_resident_and_simulation_equals_measurement(model, prompt, policy, scope):
    ref = generate(model, prompt, 24)
    hot = _hot_counts(model) if policy == "static" else None
    budget = "50%" if scope == "layer" else "25%"
    r = offloaded_generate(model, prompt, 24, budget, policy, scope=scope, hot_set=hot)
    m = r.metrics
    assert torch.equal(r.ids_BT, ref)
    assert 0 < m["peak_resident_expert_bytes"] <= m["budget_bytes"]
    assert m["decode_tokens"] == 23 and m["requests"] == 23 * 3 * 2
    sim = m["simulated"]
    assert sim["hit_flags_equal_measured"] is True
    assert sim["policy_hit_rate"] == m["hit_rate"]
    assert m["hit_rate"] <= sim["bypass_min_hit_rate"] or policy == "predictive"
    if policy in ("lru", "lfu", "static"):  # demand policies keep the step: set-MIN bounds them
        assert m["hit_rate"] <= sim["set_min_hit_rate"]
    if policy == "predictive":
        assert m["prefetch_loads"] > 0
        assert (sim["prefetch_loads"], sim["useful_prefetches"], sim["wasted_prefetches"]) == (
            m["prefetch_loads"], m["useful_prefetches"], m["wasted_prefetches"])
        assert m["wasted_prefetch_bytes"] == m["wasted_prefetches"] * m["expert_bytes"]
        # A prefetched expert is loaded once: bytes moved >= the optimal (bypass-MIN) floor.
        assert m["bytes_moved_per_token"] >= sim["bypass_min_bytes_per_token"]
    else:
        assert m["prefetch_loads"] == 0
        assert m["bytes_moved_per_token"] == (m["requests"] - m["hits"]) * m["expert_bytes"] / 23
    assert m["decode_tokens_per_s"] == pytest.approx(m["decode_tokens"] / m["decode_s"])
    assert m["latency_p50_ms"] <= m["latency_p95_ms"]
    assert isinstance(model.moe_layers()[0].experts, ExpertBank)  # the caller's model is given back


def test_batch_of_two_with_steps_split_across_the_cache(model):
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = generate(model, prompt, 10)
    r = offloaded_generate(model, prompt, 10, 2 * model.moe_layers()[0].cfg.d_model * 48 * 3 * 4, "lru",
                           scope="shared")  # two experts in all: each batch step needs up to four
    assert torch.equal(r.ids_BT, ref)
    assert r.metrics["capacity_experts"] == 2 and r.metrics["simulated"]["hit_flags_equal_measured"]


def test_dynamic_topp_router(prompt):
    model = tiny_lm(kind="topp", p=0.5)
    ref = generate(model, prompt, 16)
    r = offloaded_generate(model, prompt, 16, "25%", "predictive")
    assert torch.equal(r.ids_BT, ref) and r.metrics["simulated"]["hit_flags_equal_measured"]


def test_sampling_matches_resident_sampling(model, prompt):
    ref = generate(model, prompt, 12, temperature=0.8, top_p=0.9, seed=5)
    r = offloaded_generate(model, prompt, 12, "25%", "lru", temperature=0.8, top_p=0.9, seed=5)
    assert torch.equal(r.ids_BT, ref)


def test_release_frees_the_resident_experts(model, prompt, tmp_path):
    ref = generate(model, prompt, 8)
    r = offloaded_generate(model, prompt, 8, "50%", "lru", store_dir=tmp_path / "s", release=True)
    assert torch.equal(r.ids_BT, ref)
    layer = model.moe_layers()[0]
    assert not isinstance(layer.experts, ExpertBank)  # nothing to put back: the weights are gone
    with pytest.raises(RuntimeError, match="runtime is closed"), torch.no_grad():
        model(prompt)


def test_run_dir_store_is_written_once_and_model_built_without_experts(tiny_run, prompt):
    from moekit.train import load_trained

    run = tiny_run
    resident, _, _ = load_trained(run)
    ref = generate(resident, prompt, 10)
    r = offloaded_generate(run, prompt, 10, "50%", "lfu")
    assert torch.equal(r.ids_BT, ref)
    manifest = run / "expert-store" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    r2 = offloaded_generate(run, prompt, 10, "50%", "predictive")  # reuses the store
    assert torch.equal(r2.ids_BT, ref) and manifest.stat().st_mtime_ns == stamp


def _tiny_mixtral():
    """A tiny transformers Mixtral (vocabulary 64, 6 experts, top-2) with well-separated logits, and the generator
    that drew its weights (seeded 0), to draw prompts from."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=32, num_local_experts=6, num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():  # well-separated logits (the default init gives near-ties)
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 * p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1) + (p.dim() == 1))
    return hf, g


def test_hf_wrapped_model_offloaded_equals_resident(tmp_path):
    import moekit.hf
    from moekit.hf.adapters import HFCausalLM

    hf, g = _tiny_mixtral()
    model = HFCausalLM(moekit.hf.wrap(hf))
    prompt = torch.randint(0, 64, (1, 8), generator=g)
    head_rows = []  # positions the LM head computes logits for, per forward
    hook = hf.lm_head.register_forward_hook(lambda _m, args, _out: head_rows.append(args[0].shape[1]))
    with warnings.catch_warnings():  # the cache goes by the forward's own name (`past_key_values` goes in 5.40)
        warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
        ref, _, _ = decode_loop(model, prompt, 12, record=False)
    hook.remove()
    # the prefill computes the last position's logits only, as transformers' generate (logits_to_keep=1): before,
    # all 8 (resident --hf generation, moekit's loop since the newuser merge: a (1, T, V) tensor per prompt)
    assert head_rows == [1] * 12
    hf_ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ref, hf_ref)
    for policy in ("lru", "predictive"):
        r = offloaded_generate(model, prompt, 12, "34%", policy)
        assert torch.equal(r.ids_BT, ref)
        assert r.metrics["simulated"]["hit_flags_equal_measured"]


def test_batched_offloaded_generation_pads_finished_rows_as_transformers_generate():
    # Before: a row that had produced eos was filled with eos; transformers' generate fills it with its
    # generation_config's pad_token_id (the first eos id only when it has none).
    import moekit.hf
    from moekit.hf.adapters import HFCausalLM

    hf, g = _tiny_mixtral()
    prompt = torch.randint(2, 64, (2, 6), generator=g)  # no pad id (1) in it: no attention mask to infer
    free = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    eos = int(free[0, 7])  # row 0's second new token, which row 1 never produces: row 0 finishes early
    assert eos != 1 and eos not in free[1, 6:].tolist()
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = eos, 1
    ref = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assert ref.shape == (2, 16) and ref[0, 7] == eos and (ref[0, 8:] == 1).all()
    model = HFCausalLM(moekit.hf.wrap(hf))
    assert torch.equal(decode_loop(model, prompt, 10, eos_id=model.eos_ids(), record=False)[0], ref)
    for policy in ("lru", "predictive"):
        r = offloaded_generate(model, prompt, 10, "34%", policy, eos_id=model.eos_ids())
        assert torch.equal(r.ids_BT, ref)
    # an explicit pad_id wins; without a pad anywhere, the first eos id fills (transformers' fallback too)
    r = offloaded_generate(model, prompt, 10, "34%", eos_id=model.eos_ids(), pad_id=3)
    assert (r.ids_BT[0, 8:] == 3).all() and torch.equal(r.ids_BT[1], ref[1])
    hf.generation_config.pad_token_id = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: "Setting pad_token_id to eos_token_id"
        ref_eos = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assert (ref_eos[0, 8:] == eos).all()
    assert torch.equal(offloaded_generate(model, prompt, 10, "34%", eos_id=model.eos_ids()).ids_BT, ref_eos)


def test_budget_errors_surface_before_anything_runs(model, prompt):
    with pytest.raises(ValueError, match="leaves no room"):
        offloaded_generate(model, prompt, 4, "0%")
    with pytest.raises(ValueError, match="needs 2 experts"):
        offloaded_generate(model, prompt, 4, "10%")  # one expert per layer cache
    with pytest.raises(ValueError, match="needs a hot set"):
        offloaded_generate(model, prompt, 4, "50%", "static")
    assert isinstance(model.moe_layers()[0].experts, ExpertBank)


# ----------------------------------------------------------------------------- prefetch shutdown


def _corrupt(store_dir, layer, expert):
    import json

    m = json.loads((store_dir / "manifest.json").read_text())
    with open(store_dir / m["layers"][layer]["file"], "r+b") as f:
        f.seek(m["layers"][layer]["experts"][expert]["offset"] + 7)
        f.write(b"\x00\x01\x02")


def test_prefetch_error_stops_the_worker_and_names_the_expert(model, tmp_path, watchdog):
    store_dir = write_store(model, tmp_path / "s")
    _corrupt(store_dir, 1, 5)
    with ExpertStore(store_dir) as store:
        cache = ExpertCache(store, plan_cache("50%", store, "predictive"))
        worker = cache.worker
        try:  # the load of expert 5 fails in the background thread
            cache.prefetch(1, [5, 2])
        except ExpertStoreError:
            pass  # NOTE: a fast failure may already surface while expert 2 is being submitted
        worker._thread.join(10)
        assert not worker.alive
        with pytest.raises(ExpertStoreError, match="layer 1 expert 5"):
            cache.acquire(1, [2])
        with pytest.raises(ExpertStoreError, match="layer 1 expert 5"):
            cache.prefetch(2, [0])
        cache.close()  # no hang, no second error
    assert not _prefetch_threads()


def test_generation_with_a_corrupted_store_fails_cleanly(model, prompt, tmp_path, watchdog):
    store_dir = write_store(model, tmp_path / "s")
    for e in range(8):
        _corrupt(store_dir, 2, e)
    with pytest.raises(ExpertStoreError, match=r"layer 2 expert \d"):
        offloaded_generate(model, prompt, 8, "50%", "predictive", store_dir=store_dir)
    assert not _prefetch_threads()
    assert isinstance(model.moe_layers()[2].experts, ExpertBank)


def test_keyboard_interrupt_in_the_loop_stops_the_worker(model, prompt, watchdog):
    calls = []

    def interrupt(*_):
        calls.append(1)
        if len(calls) == 15:  # the 15th forward: a decode step, prefetches in flight
            raise KeyboardInterrupt

    handle = model.moe_layers()[1].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            offloaded_generate(model, prompt, 20, "50%", "predictive")
    finally:
        handle.remove()
    assert not _prefetch_threads()
    assert isinstance(model.moe_layers()[1].experts, ExpertBank)


def test_ctrl_c_while_waiting_on_a_slow_prefetch_does_not_hang(model, prompt, monkeypatch, watchdog):
    real = ExpertStore.read_into

    def slow(self, layer, expert, buf):
        if threading.current_thread().name == "moekit-prefetch":
            time.sleep(0.3)
        real(self, layer, expert, buf)

    monkeypatch.setattr(ExpertStore, "read_into", slow)
    timer = threading.Timer(1.0, _thread.interrupt_main)  # what Ctrl-C does to the main thread
    timer.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            offloaded_generate(model, prompt, 100, "25%", "predictive")
    finally:
        timer.cancel()
    assert time.perf_counter() - t0 < 30  # stopped within about one load, not after the whole run
    assert not _prefetch_threads()


@pytest.mark.parametrize("bad", [64, -1])
def test_prompt_ids_beyond_an_hf_models_vocabulary_are_refused_by_name(bad):
    # Before the check: transformers' embedding raised a raw IndexError from inside the decode loop.
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moekit.errors import UsageError
    from moekit.hf.adapters import HFCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    model = HFCausalLM(AutoModelForCausalLM.from_config(cfg).eval())
    with pytest.raises(UsageError, match=rf"^the prompt: token id\(s\) {bad} out of range; expected token ids in "
                                         r"\[0, 64\) \(the model's vocabulary\)$"):
        decode_loop(model, torch.tensor([[1, bad, 3]]), 2, record=False)
