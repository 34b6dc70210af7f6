"""Find transformers v5 sparse MoE blocks by their structure and read their routing rule.

Legend: D model dim, E routed experts, F expert hidden dim, K experts per token.

A block is any module with
  gate      a router with `weight` (E, D) (and optionally DeepSeek-V3's `e_score_correction_bias` (E,))
  experts   the v5 stacked SwiGLU layout: gate_up_proj (E, 2F, D) = [gate; up], down_proj (E, D, F)
and optionally
  shared_expert / shared_experts   a SwiGLU MLP (gate_proj, up_proj, down_proj Linear, no bias)
  shared_expert_gate               Linear(D, 1): y += sigmoid(w_s . x) * shared(x)   (Qwen2-MoE)

The routing rule comes from what the router's forward uses: the router module's own attributes
first (`top_k`, `norm_topk_prob`, `routed_scaling_factor`, `num_group`/`n_group`, `topk_group`),
then the model config (`num_experts_per_tok`, `norm_topk_prob`, `scoring_func`, ...). Scores are
sigmoid when the config says so or when the router carries a selection bias (the DeepSeek-V3
family), softmax otherwise. `_FAMILY_RULES` holds the few settings no attribute states. Whatever
is read here is then checked against the block's own forward on a probe input (see wrap.py), so a
family whose rule moekit does not have is refused, not silently run differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import MoEConfig, RouterConfig
from moekit.errors import UsageError
from moekit.hf.private_api import default_apply_gate
from moekit.layers.moe import MoELayer


class UnsupportedBlockError(UsageError):  # a UsageError is a ValueError, as before
    """A transformers MoE block whose structure or routing rule moekit cannot run exactly."""


# Settings that no router attribute or config field states, by block class.
_FAMILY_RULES: dict[str, dict[str, Any]] = {
    # Mixtral's router always renormalises the top-k and has no norm_topk_prob flag.
    "MixtralSparseMoeBlock": {"normalize": True},
}

# Families whose transformers forward moekit is tested against, logits and greedy generation (tests/hf).
TESTED_BLOCKS = ("MixtralSparseMoeBlock", "OlmoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock",
                 "DeepseekV3MoE")

_BLOCK_CHILDREN = {"gate", "experts", "shared_expert", "shared_experts", "shared_expert_gate"}


@dataclass
class BlockSpec:
    """A transformers MoE block as moekit reads it: its parts and the equivalent MoEConfig."""

    block: nn.Module
    gate: nn.Module
    experts: nn.Module
    shared: nn.Module | None
    shared_gate: nn.Linear | None
    cfg: MoEConfig

    @property
    def class_name(self) -> str:
        return type(self.block).__name__


def looks_like_moe_block(module: nn.Module) -> bool:
    """A module with an `experts` child holding stacked (3-D) expert weights: a v5 sparse MoE block,
    supported or not. moekit's own layers are not transformers blocks."""
    experts = getattr(module, "experts", None)
    if isinstance(module, MoELayer) or not isinstance(experts, nn.Module):
        return False
    return any(p.dim() == 3 for p in experts.parameters(recurse=False))


def read_block(block: nn.Module, model_config: Any = None, backend: str = "auto") -> BlockSpec:
    """Check the block's structure and read its routing rule; raise UnsupportedBlockError naming the
    class and what moekit cannot run."""
    name = type(block).__name__

    def refuse(why: str) -> UnsupportedBlockError:
        return UnsupportedBlockError(f"moekit.hf cannot wrap {name}: {why}")

    children = {n for n, _ in block.named_children()}
    unknown = sorted(children - _BLOCK_CHILDREN)
    if unknown:
        raise refuse(f"it has submodules {unknown} that moekit's MoELayer has no place for "
                     f"(known: {sorted(_BLOCK_CHILDREN)})")
    own = [n for n, _ in block.named_parameters(recurse=False)]
    if own:
        raise refuse(f"it holds parameters {own} directly")
    gate, experts = getattr(block, "gate", None), block.experts
    if not isinstance(gate, nn.Module) or not isinstance(getattr(gate, "weight", None), torch.Tensor):
        raise refuse("it has no router `gate` with a `weight` (E, D)")

    # --- experts: the stacked SwiGLU layout, nothing else
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == down.dim() == 3):
        raise refuse(f"its experts ({type(experts).__name__}) are not in the stacked gate_up_proj (E, 2F, D) / "
                     "down_proj (E, D, F) layout")
    E, two_F, D = gate_up.shape
    Fdim = two_F // 2
    if two_F % 2 or tuple(down.shape) != (E, D, Fdim):
        raise refuse(f"expert shapes gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)} are not "
                     "(E, 2F, D), (E, D, F)")
    # Flags set by transformers' @use_experts_implementation: the layouts moekit's ExpertBank reads.
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False}
    odd = {k: getattr(experts, k) for k, want in flags.items() if getattr(experts, k, want) != want}
    if odd:
        raise refuse(f"its experts use {odd}; moekit runs concatenated [gate; up] SwiGLU experts without bias")
    # The decorator's silu(gate) * up; a family with its own `_apply_gate` computes something else.
    if getattr(type(experts), "_apply_gate", default_apply_gate) is not default_apply_gate:
        raise refuse(f"{type(experts).__name__} defines its own gating (_apply_gate), not silu(gate) * up")
    if not _is_silu(getattr(experts, "act_fn", None)):
        raise refuse(f"its experts' activation {type(getattr(experts, 'act_fn', None)).__name__} is not SiLU")
    if tuple(gate.weight.shape) != (E, D):
        raise refuse(f"router weight {tuple(gate.weight.shape)} does not match {E} experts of width {D}")

    # --- shared expert (always on), optionally sigmoid-gated
    shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
    width = 0
    if shared is not None:
        lin = [getattr(shared, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        swiglu = all(isinstance(m, nn.Linear) and m.bias is None for m in lin)
        if not swiglu or not _is_silu(getattr(shared, "act_fn", None)):
            raise refuse(f"its shared expert {type(shared).__name__} is not a SwiGLU MLP (gate_proj, up_proj, "
                         "down_proj Linear without bias, SiLU)")
        width = lin[1].out_features
    shared_gate = getattr(block, "shared_expert_gate", None)
    if shared_gate is not None and not (isinstance(shared_gate, nn.Linear) and shared_gate.out_features == 1
                                        and shared_gate.bias is None and shared is not None):
        raise refuse("its shared_expert_gate is not a Linear(D, 1) without bias gating a shared expert")

    config = getattr(experts, "config", None) or getattr(block, "config", None) or model_config
    router = _router_config(block, gate, config)
    n_shared = getattr(config, "n_shared_experts", None) or 1
    cfg = MoEConfig(d_model=D, d_expert=Fdim, num_experts=E, router=router, activation="swiglu",
                    num_shared_experts=n_shared if shared is not None else 0, d_shared=width or None,
                    shared_gate=shared_gate is not None, backend=backend)
    try:
        cfg.validate()
    except ValueError as e:
        raise refuse(f"its routing rule ({router.describe()}) is not one moekit can run: {e}") from e
    return BlockSpec(block, gate, experts, shared, shared_gate, cfg)


def _router_config(block: nn.Module, gate: nn.Module, config: Any) -> RouterConfig:
    rules = _FAMILY_RULES.get(type(block).__name__, {})

    def read(gate_names: tuple[str, ...], config_names: tuple[str, ...], default: Any) -> Any:
        for obj, names in ((gate, gate_names), (block, gate_names), (config, config_names)):
            for n in names:
                value = getattr(obj, n, None) if obj is not None else None
                if value is not None:
                    return value
        return default

    has_bias = isinstance(getattr(gate, "e_score_correction_bias", None), torch.Tensor)
    score = read((), ("scoring_func",), "sigmoid" if has_bias else "softmax")
    n_group = int(read(("num_group", "n_group"), ("n_group",), 1))
    topk_group = int(read(("topk_group",), ("topk_group",), 1))
    if read(("topk_method",), ("topk_method",), None) == "greedy":
        n_group = topk_group = 1  # DeepSeek-V2's plain top-k: the group fields are set but unused
    return RouterConfig(
        kind="topk",
        k=int(read(("top_k",), ("num_experts_per_tok",), 2)),
        score=score,
        normalize=bool(rules.get("normalize", read(("norm_topk_prob",), ("norm_topk_prob",), True))),
        routed_scaling_factor=float(read(("routed_scaling_factor",), ("routed_scaling_factor",), 1.0)),
        n_group=n_group,
        topk_group=topk_group,
        # NOTE: Mixtral jitters the router *and* expert input in training; moekit jitters the router
        # input only (Switch Transformer). Inference is unaffected.
        jitter=float(read(("jitter_noise",), ("router_jitter_noise",), 0.0)),
    )


def _is_silu(act: Any) -> bool:
    """Checked by value, so any module or function computing SiLU counts."""
    if not callable(act):
        return False
    x = torch.linspace(-6, 6, 25)
    try:
        return torch.allclose(act(x), F.silu(x), atol=1e-6)
    except Exception:  # an activation that cannot take a plain fp32 tensor is not one moekit knows
        return False
