import signal

import pytest
import torch

import moekit
from moekit.ops import grouped

_LAYER_FIELDS = {"num_shared_experts", "balance_scope", "shared_gate", "capacity_factor", "eval_capacity_factor",
                 "backend", "activation", "num_experts", "d_expert", "d_shared", "d_model"}


# A suite started under `nohup` (or any parent that ignores SIGINT) inherits SIGINT as ignored, and Python
# then installs no KeyboardInterrupt handler: the Ctrl-C tests would test nohup, not moekit. Restore the
# interactive disposition (children started from here inherit it too).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _same_paths_on_every_machine(monkeypatch):
    """The "loop_numpy" rule reads the machine (CPU vendor, numpy's BLAS and its thread count, `grouped.CPU_NUMPY_BLAS`):
    tests take its machine part as absent, so that every machine runs the same GEMM paths; a test of the rule sets it
    (tests/ops/test_grouped.py tests the real reading)."""
    monkeypatch.setattr(grouped, "numpy_blas_streams_faster", lambda: False)


@pytest.fixture
def make_cfg():
    """Factory for the canonical tiny config (d_model 32, E 4, k 2); keyword args override
    MoEConfig fields or RouterConfig fields by name."""

    def make(**kw) -> moekit.MoEConfig:
        layer_kw = {k: kw.pop(k) for k in list(kw) if k in _LAYER_FIELDS}
        base = {"d_model": 32, "d_expert": 64, "num_experts": 4}
        return moekit.MoEConfig(**{**base, **layer_kw}, router=moekit.RouterConfig(**kw))

    return make


class ReferenceTwin(torch.nn.Module):
    """A MoELayer's twin (a deep copy: same config and weights, its own gradients) whose routed experts run
    the reference loop, `moekit.ops.reference.moe_reference`, over the layer's own routing and dispatch
    plan: the test oracle of the grouped path (permute, expert GEMMs, combine)."""

    def __init__(self, layer: moekit.MoELayer):
        super().__init__()
        import copy

        self.layer = copy.deepcopy(layer)

    def forward(self, x, padding_mask=None, router_state=None):
        from moekit.dispatch import make_plan
        from moekit.ops.reference import moe_reference

        layer = self.layer
        x_TD = x.reshape(-1, layer.cfg.d_model)
        valid_T = None if padding_mask is None else padding_mask.reshape(-1).to(torch.bool)
        route = layer.router(x_TD, valid_T=valid_T, state=router_state)
        if valid_T is not None:
            route = route.keep(valid_T[route.token_idx_N])
        capacity = layer.cfg.capacity_factor if layer.training else layer.cfg.eval_capacity_factor
        plan = make_plan(route.token_idx_N, route.expert_idx_N, route.weight_N, layer.cfg.num_experts, capacity)
        y_TD = moe_reference(x_TD, plan.token_N, plan.expert_N, plan.weight_N, layer.experts)
        if layer.shared_experts is not None:
            shared_TD = layer.shared_experts(x_TD)
            if layer.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(layer.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        return y_TD.view(x.shape)


@pytest.fixture(scope="session")
def reference_twin():
    """Factory: `reference_twin(layer)` -> the layer's ReferenceTwin (the oracle of the grouped path)."""
    return ReferenceTwin


@pytest.fixture(scope="session")
def join_within():
    """`join_within(processes, timeout_s) -> indices still alive`: wait for worker processes at most
    timeout_s in all, then kill the ones left (a hang fails a test instead of blocking the suite)."""
    import time

    def join(processes, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [i for i, p in enumerate(processes) if p.is_alive()]
        for i in alive:
            processes[i].kill()
        return alive

    return join


def _save_hf(model: torch.nn.Module, path):
    """`model` with its router and expert weights redrawn N(0, 0.1) (transformers' init leaves routers at zero: every
    score would tie), saved with save_pretrained to `path`; returns `path`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or "experts" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def save_hf():
    """save_hf(model, path) -> path: see `_save_hf`."""
    return _save_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny OLMoE checkpoint (softmax top-2 of 4 experts, 2 layers, vocabulary 300 with bos/eos/pad 256/257/258),
    byte-level ids (no tokenizer saved): the `--hf` CLI tests' model."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, eos_token_id=257,
                      pad_token_id=258, bos_token_id=256)
    return _save_hf(OlmoeForCausalLM(cfg), tmp_path_factory.mktemp("hf") / "olmoe")

