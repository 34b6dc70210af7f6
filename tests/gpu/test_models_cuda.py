"""moekit.hf-wrapped transformers models on CUDA: wrapped = unwrapped (logits, greedy tokens), re-routing
to top-p equal to CPU, no host synchronisation inside moekit's MoE forward, and expert offload with the
cache on the GPU equal to resident generation.

Tiny random configs of the real transformers classes (`moekit.bench.hf.configs`, weights redrawn by
`moekit.bench.hf.build` so that routing scores do not tie). A family the installed transformers lacks is
skipped with its reason. MOEKIT_GPU_TEST_DEVICE=cpu: a CPU dry run of the test code (proves nothing about CUDA).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import moekit
import moekit.hf

DEVICE = os.environ.get("MOEKIT_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="needs a CUDA device (torch.cuda.is_available() is False)")]
ARCHS = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4"]
VOCAB = 128


def _model(arch: str) -> torch.nn.Module:
    """A tiny fp32 model of `arch` on the CPU (hidden 64, 8 experts of width 64, 2 layers), or a skip naming
    what the installed transformers lacks."""
    try:
        from moekit.bench import hf as bench_hf

        cfg = bench_hf.configs(d=64, f=64, e=8, layers=2, vocab=VOCAB)[arch]
        return bench_hf.build(cfg)
    except (ImportError, AttributeError, KeyError, ValueError) as e:
        import transformers

        pytest.skip(f"{arch}: transformers {transformers.__version__} cannot build it here: "
                    f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")


def _ids(batch=2, length=12, seed=1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, n=8):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_wrapped_model_on_cuda_equals_unwrapped_and_reroutes_like_cpu(arch):
    cpu_model = _model(arch)
    model = copy.deepcopy(cpu_model).to(DEVICE)
    ids = _ids().to(DEVICE)
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = _generate(model, ids)
    moekit.hf.wrap(model)
    layers = moekit.hf.wrapped_blocks(model)
    assert layers, f"{arch}: nothing wrapped"
    for layer in layers:
        for n, t in [*layer.named_parameters(), *layer.named_buffers()]:
            assert t.device.type == torch.device(DEVICE).type, f"{arch}: wrapped {n} on {t.device}"
    with torch.no_grad():
        logits = model(ids).logits
        gen = _generate(model, ids)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{arch} wrapped vs unwrapped: {m}")
    assert torch.equal(gen, ref_gen), f"{arch}: greedy tokens differ\nwrapped   {gen.tolist()}\nunwrapped {ref_gen.tolist()}"

    # Re-routing to top-p (ragged experts per token) on CUDA computes what it computes on CPU.
    moekit.hf.wrap(cpu_model)
    with torch.no_grad(), moekit.route(model, kind="topp", p=0.5), moekit.route(cpu_model, kind="topp", p=0.5):
        topp = model(ids).logits
        per_token = layers[0].routing_info().stats()["experts_per_token_hist"]
        topp_cpu = cpu_model(ids.cpu()).logits
    assert torch.isfinite(topp).all()
    assert not torch.allclose(topp, logits), f"{arch}: route(kind='topp') changed nothing"
    # per_token[j]: tokens given j experts; top-p gives tokens different numbers of experts.
    assert sum(1 for c in per_token if c) >= 2, f"{arch}: top-p gave every token the same number of experts: {per_token}"
    torch.testing.assert_close(topp.cpu(), topp_cpu, atol=1e-4, rtol=1e-4, msg=lambda m: f"{arch} top-p CUDA vs CPU: {m}")


def _error_on_sync_inside(layers):
    """Hooks that turn on torch.cuda.set_sync_debug_mode('error') for the duration of each wrapped MoE layer's
    forward only (transformers' own code around it may sync; that is not moekit's to fix)."""
    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error")))
        handles.append(layer.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("default")))
    return handles


def _expect_no_host_sync(run, dtype: torch.dtype) -> None:
    """Run `run` (which turns sync errors on around moekit's code); a host sync fails the test naming moekit's
    innermost line on the stack, except fp32 inside torch._grouped_mm itself: torch's CUDA kernel takes
    bfloat16 natively and runs other dtypes through a per-group fallback that may read the offsets on the
    host, which is torch's (imperative xfail naming the line; bf16 must pass)."""
    import traceback

    try:
        run()
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        ours = [f for f in traceback.extract_tb(e.__traceback__) if "/src/moekit/" in f.filename.replace("\\", "/")]
        where = f"{ours[-1].filename}:{ours[-1].lineno}: {ours[-1].line}" if ours else "(no moekit frame)"
        if dtype == torch.float32 and ours and "_grouped_mm" in (ours[-1].line or ""):
            pytest.xfail(f"fp32 torch._grouped_mm on CUDA syncs inside torch {torch.__version__} at {where}")
        raise AssertionError(f"host synchronisation in moekit's MoE forward ({dtype}) at {where}\n"
                             f"{''.join(traceback.format_exception(e)[-12:])}") from None
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is a CUDA notion")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_fixed_topk_moe_forward_never_syncs_with_the_host(arch, dtype):
    """Issue 14 item 4: no host synchronisation in the MoE forward (fixed top-k, prefill and decode-sized
    inputs, no padding mask). A sync raises RuntimeError inside the layer; the failure names moekit's line."""
    model = moekit.hf.wrap(_model(arch).to(DEVICE, dtype))
    layers = moekit.hf.wrapped_blocks(model)

    def run():
        handles = _error_on_sync_inside(layers)
        try:
            for ids in (_ids(2, 12), _ids(2, 1), _ids(1, 1)):  # prefill, then decode-sized batches
                ids = ids.to(DEVICE)
                model(ids)
        finally:
            for h in handles:
                h.remove()

    with torch.no_grad():
        model(_ids().to(DEVICE))  # warm-up (lazy init, kernel loading) outside the check
        torch.cuda.synchronize()
        _expect_no_host_sync(run, dtype)


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is a CUDA notion")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_plain_moe_layer_topk_forward_never_syncs(dtype):
    """The same check on a bare MoELayer (fixed top-k, dropless, eval): no model code around it."""
    layer = moekit.MoELayer(moekit.MoEConfig(d_model=64, d_expert=128, num_experts=8,
                                             router=moekit.RouterConfig(kind="topk", k=2))).eval().to(DEVICE, dtype)
    x = torch.randn(2, 16, 64, device=DEVICE, dtype=dtype)

    def run():
        torch.cuda.set_sync_debug_mode("error")
        layer(x)
        layer(x[:, :1])

    with torch.no_grad():
        layer(x)
        torch.cuda.synchronize()
        _expect_no_host_sync(run, dtype)


def test_offloaded_generation_with_gpu_cache_equals_resident(tmp_path):
    """Experts in a store on disk / CPU memory, the expert cache on the GPU (moekit.offload's cache lives on
    the model's device): greedy tokens equal resident generation on the same device, for two policies."""
    from moekit.hf.adapters import HFCausalLM
    from moekit.offload import offloaded_generate
    from moekit.offload.generate import decode_loop

    hf = moekit.hf.wrap(_model("mixtral").to(DEVICE))
    model = HFCausalLM(hf)
    prompt = _ids(1, 8).to(DEVICE)
    ref, _, _ = decode_loop(model, prompt, 8, record=False)
    assert ref.device.type == torch.device(DEVICE).type
    for policy in ("lru", "predictive"):
        r = offloaded_generate(model, prompt, 8, "34%", policy)
        assert torch.equal(r.ids_BT.to(ref.device), ref), f"offloaded ({policy}) tokens differ from resident"
        assert r.metrics["simulated"]["hit_flags_equal_measured"], policy
    # The cache is on the model's device while offloaded; the layers hold their resident experts again after.
    for layer in moekit.hf.wrapped_blocks(hf):
        assert layer.experts.gate_up_proj.device.type == torch.device(DEVICE).type
