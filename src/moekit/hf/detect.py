"""Find transformers v5 sparse MoE blocks by the role of their parts, and read their routing rule.

Legend: T tokens, D model dim, E routed experts, F expert hidden dim, K experts per token, X = 2F
(gated experts) or F.

A block is any module with an `experts` child holding the routed experts' weights, and then, found by
role rather than by child name:
  router         the one other child whose own `weight` is (E, D), or that holds one Linear(D, E)
                 (`gate`, `router`, `gate.wg`, `router.layer`, a Linear subclass); an optional logit
                 `bias` (E,) (gpt-oss) and a selection bias (DeepSeek-V3's `e_score_correction_bias`)
                 in it or held by the block (MiniMax-M2, LFM2-MoE: passed to the router's forward)
  shared expert  a child MLP with Linear gate_proj / up_proj / down_proj without bias (`shared_expert`,
                 `shared_experts`, `shared_mlp`), optionally gated by a Linear(D, 1) child (Qwen2-MoE)
The experts' storage is read into an `ExpertLayout` (transposed, interleaved, separate or flat stacks,
per-expert biases) and their activation by value (`moekit.ops.ffn.Activation`: SiLU, GELU, ReLU, ...,
gpt-oss's clamped SwiGLU), so a family is a configuration of moekit's pieces, not a code path.

The routing rule comes from what the router's forward uses: its own attributes first (`top_k`,
`norm_topk_prob`, `routed_scaling_factor`, `num_group`/`n_group`, `topk_group`, `norm_min`), then the model
config (`num_experts_per_tok`, `norm_topk_prob`, `scoring_func`, `moe_normalize_expert_weights`,
`moe_norm_min`, ...); an integer (V, K) table in the router makes it a hash router (DeepSeek-V4's
`tid2eid`). Settings no attribute states (renormalised or not; softmax or sigmoid; a group scored by its
best expert or its best two; the selection bias added to the scores or the logits; SparseMixer) are then
read from the router's own output on a probe input (a non-zero selection bias, token ids for a hash
router), where it returns its choice ((logits, weights, indices), or dense (T, E) scores); a reading whose
weights are one constant times the router's is kept with that constant as the block's own scale after
combining (`router_weight_scale`). Rules still ambiguous after that (the routing weight applied to the
experts' input, Llama 4) become ordered alternatives that `moekit.hf.wrap` checks against the block's own
forward; one that reproduces it exactly is kept, and a block none reproduces is refused, never run
differently. A shared expert is checked by value on inputs large enough to reach any clamp.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moekit.config import GATED_ACTIVATIONS, MoEConfig, RouterConfig
from moekit.errors import UsageError
from moekit.experts.bank import STANDARD, ExpertLayout
from moekit.layers.moe import MoELayer
from moekit.ops.ffn import ACTIVATIONS, Activation


class UnsupportedBlockError(UsageError):  # a UsageError is a ValueError, as before
    """A transformers MoE block whose structure or routing rule moekit cannot run exactly."""


# Families whose transformers forward moekit is tested against, logits and greedy generation (tests/hf).
TESTED_BLOCKS = ("MixtralSparseMoeBlock", "OlmoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock",
                 "DeepseekV3MoE", "GptOssMLP", "Llama4TextMoe", "GraniteMoeMoE", "JambaSparseMoeBlock")

# Block-held selection biases (DeepSeek-V3's rule with the bias outside the router).
_SELECTION_BIAS_NAMES = ("e_score_correction_bias", "expert_bias")
PROBE_TOKENS = 16
# The router alone is probed on more tokens (an E x D gate: cheap), so that rules that agree on most tokens
# (a group scored by its best expert or its best two) are told apart.
ROUTER_PROBE_TOKENS = 256


@dataclass
class BlockSpec:
    """A transformers MoE block as moekit reads it: its parts, the HF tensors for moekit's expert bank,
    and the equivalent MoEConfig (with `alternatives`: other readings, in order, for the probe)."""

    block: nn.Module
    gate: nn.Module  # the router module the block calls
    router_weight: nn.Parameter
    router_bias: nn.Parameter | None
    selection_bias: torch.Tensor | None
    experts: nn.Module
    bank: dict[str, torch.Tensor]  # ExpertBank attribute -> the HF Parameter
    layout: ExpertLayout
    activation: Activation
    shared: nn.Module | None
    shared_gate: nn.Linear | None
    cfg: MoEConfig
    alternatives: list[MoEConfig] = field(default_factory=list)
    # moekit's combine weights / the HF router's own: a scale the block applies to the combined experts'
    # output instead of in its router (Beam's routed_scaling_factor; the privacy filter's 1/K then x K).
    router_weight_scale: float = 1.0
    model_config: Any = None  # the model's config, where the block and its experts hold none
    router_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # moekit router attribute -> HF tensor

    @property
    def class_name(self) -> str:
        return type(self.block).__name__


def looks_like_moe_block(module: nn.Module) -> bool:
    """A module with an `experts` child holding weights: a v5 sparse MoE block, supported or not.
    moekit's own layers are not transformers blocks."""
    experts = getattr(module, "experts", None)
    if isinstance(module, MoELayer) or not isinstance(experts, nn.Module):
        return False
    return any(p.dim() >= 2 for p in experts.parameters())


def read_block(block: nn.Module, model_config: Any = None, backend: str = "auto") -> BlockSpec:
    """Check the block's structure and read its routing rule; raise UnsupportedBlockError naming the
    class and what moekit cannot run."""
    name = type(block).__name__

    def refuse(why: str) -> UnsupportedBlockError:
        return UnsupportedBlockError(f"moekit.hf cannot wrap {name}: {why}")

    experts = block.experts
    if isinstance(experts, nn.ModuleList | nn.ModuleDict):
        raise refuse(f"its experts are a {type(experts).__name__} of separate MLP modules (modulelist_experts); "
                     "moekit's expert bank runs stacked (E, ., .) weights")
    bank, layout, E, D, Fdim, gated = _read_bank(experts, refuse)
    activation = _read_activation(experts, gated, layout, Fdim, refuse)

    # --- the other children, by role
    gate = shared = shared_gate = None
    router_weight = router_bias = None
    for child_name, child in block.named_children():
        if child is experts:
            continue
        if isinstance(child, nn.Linear) and child.out_features == 1 and child.in_features == D:
            shared_gate = child
            continue
        if all(isinstance(getattr(child, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            shared = child
            continue
        found = _router_weight(child, E, D)
        if found is None:
            raise refuse(f"its child `{child_name}` ({type(child).__name__}) is neither a router (weight (E={E}, "
                         f"D={D})), a shared expert (gate_proj/up_proj/down_proj) nor a shared-expert gate "
                         "Linear(D, 1); moekit's MoELayer has no place for it")
        if gate is not None:
            raise refuse(f"it has two routers (`{child_name}` and another child with a weight (E, D))")
        gate, (router_weight, router_bias) = child, found
    if gate is None:
        raise refuse(f"it has no router: no child with a weight (E={E}, D={D}) or a Linear(D, E)")

    # --- selection bias: in the router (DeepSeek-V3, ERNIE) or held by the block (MiniMax-M2, LFM2-MoE)
    selection_bias = None
    for holder in (gate, block):
        for n, t in itertools.chain(holder.named_buffers(), holder.named_parameters()):
            if holder is block and "." in n:
                continue  # the block's own tensors only; its children are read above
            if n.rpartition(".")[2] in _SELECTION_BIAS_NAMES and t.numel() == E:
                selection_bias = t
    # --- a token id -> experts table (V, K) of integers in the router: hash routing (DeepSeek-V4's `tid2eid`)
    tables = [t for t in gate.buffers() if not t.dtype.is_floating_point and t.dim() == 2 and t.shape[1] <= E]
    hash_table = tables[0] if len(tables) == 1 else None
    own = [n for n, t in itertools.chain(block.named_parameters(recurse=False), block.named_buffers(recurse=False))
           if t is not selection_bias]
    if own:
        raise refuse(f"it holds tensors {own} directly that are no selection bias (E,) moekit knows")

    # --- shared expert (always on), optionally sigmoid-gated
    width, shared_limit = 0, None
    if shared is not None:
        lin = [getattr(shared, n) for n in ("gate_proj", "up_proj", "down_proj")]
        shared_fn = getattr(shared, "act_fn", None) or getattr(shared, "activation_fn", None)
        shared_act = _GATED_OF.get(_value_activation(shared_fn))
        if any(m.bias is not None for m in lin) or shared_act is None:
            raise refuse(f"its shared expert {type(shared).__name__} is not a gated MLP (gate_proj, up_proj, "
                         "down_proj Linear without bias and an activation moekit has)")
        if shared_act != activation.name:
            raise refuse(f"its shared expert's activation ({shared_act}) differs from its experts' "
                         f"({activation.name}); moekit's MoELayer uses one")
        width = lin[1].out_features
        shared_limit = _shared_clamp_by_value(shared, shared_act, activation, refuse)
    if shared_gate is not None and (shared is None or shared_gate.bias is not None):
        raise refuse("its shared-expert gate is not a Linear(D, 1) without bias gating a shared expert")

    config = getattr(experts, "config", None) or getattr(block, "config", None) or model_config
    router = _router_config(block, gate, config, selection_bias is not None, hash_table)
    n_shared = getattr(config, "n_shared_experts", None) or 1
    cfg = MoEConfig(d_model=D, d_expert=Fdim, num_experts=E, router=router, activation=activation.name,
                    activation_limit=activation.limit, activation_alpha=activation.alpha,
                    activation_up_offset=activation.up_offset, activation_clamp_after=activation.clamp_after,
                    num_shared_experts=n_shared if shared is not None else 0, d_shared=width or None,
                    shared_activation_limit=shared_limit,
                    shared_gate=shared_gate is not None, backend=backend)
    try:
        with warnings.catch_warnings():  # a first reading, settled below; not a setting the user chose
            warnings.simplefilter("ignore")
            cfg.validate()
    except ValueError as e:
        raise refuse(f"its routing rule ({router.describe()}) is not one moekit can run: {e}") from e
    spec = BlockSpec(block, gate, router_weight, router_bias, selection_bias, experts, bank, layout, activation,
                     shared, shared_gate, cfg, model_config=model_config,
                     router_tensors={} if hash_table is None else {"tid2eid": hash_table})
    _read_rule_from_router(spec)
    return spec


def _shared_clamp_by_value(shared: nn.Module, gated: str, routed: Activation, refuse) -> float | None:
    """The shared expert's clamp (None: none) with which moekit's down(act(gate x) * up x) reproduces its forward
    on a probe large enough to reach any clamp (DeepSeek-V4 and Step-3.7 clamp their shared experts; a random
    model's small activations never would): none, its own `limit`, or the routed experts' limit, each with the
    routed experts' other clamp settings. Refused when none does. Run in the weights' own dtype; nothing is
    probed on meta tensors (no clamp is read there)."""
    g, u, d = shared.gate_proj, shared.up_proj, shared.down_proj
    own = getattr(shared, "limit", None)
    own = float(own) if isinstance(own, int | float) and math.isfinite(own) and own > 0 else None
    if g.weight.is_meta:
        return own
    gen = torch.Generator().manual_seed(0)
    x_TD = torch.randn(8, g.in_features, generator=gen).to(device=g.weight.device, dtype=g.weight.dtype)
    low = g.weight.dtype in (torch.bfloat16, torch.float16)
    with torch.no_grad():
        reach = torch.cat([g(x_TD), u(x_TD)], dim=-1).abs().amax().float().clamp(min=1e-6)
        x_TD = x_TD * (64.0 / reach).to(x_TD.dtype)  # pre-activations up to +-64
        want = shared(x_TD)
        for limit in dict.fromkeys((None, own, routed.limit)):
            act = Activation(gated) if limit is None else dataclasses.replace(routed, limit=limit, interleaved=False)
            got = d(act.glu(g(x_TD), u(x_TD)))
            tol = 5e-2 if low else 1e-4
            if isinstance(want, torch.Tensor) and want.shape == got.shape and torch.allclose(
                    got.float(), want.float(), rtol=tol, atol=tol * float(want.float().abs().amax())):
                return limit
    raise refuse(f"its shared expert {type(shared).__name__} computes something other than down({gated}(gate, up)) "
                 f"on large inputs{f' (it clamps at limit={own:g})' if own else ''}, with no clamp or the routed "
                 f"experts' clamp settings ({routed.describe()}) at its limit")


def _router_weight(child: nn.Module, E: int, D: int) -> tuple[nn.Parameter, nn.Parameter | None] | None:
    """(weight (E, D), logit bias (E,) or None) of a router module: its own weight, or the weight of the
    one Linear(D, E) inside it (`gate.wg`, `router.layer`, `router.classifier`)."""
    own = child._parameters.get("weight")
    if isinstance(own, nn.Parameter) and tuple(own.shape) == (E, D):
        bias = child._parameters.get("bias")
        return own, bias if isinstance(bias, nn.Parameter) and bias.numel() == E else None
    inner = [m for m in child.modules() if isinstance(m, nn.Linear) and (m.out_features, m.in_features) == (E, D)]
    if len(inner) == 1:
        return inner[0].weight, inner[0].bias
    return None


def _read_bank(experts: nn.Module, refuse) -> tuple[dict, ExpertLayout, int, int, int, bool]:
    """The experts' tensors for moekit's ExpertBank, their layout, and E, D, F, gated."""
    params = dict(experts.named_parameters())
    leaf = {n.rpartition(".")[2]: p for n, p in params.items()}
    # Flags set by transformers' @use_experts_implementation.
    if getattr(experts, "has_post_expert_norm", False):
        raise refuse("its experts normalise every expert's output (has_post_expert_norm); moekit's expert "
                     "bank has no per-expert output norm")
    zero = getattr(experts, "zero_expert_num", 0) or 0
    if zero or any(isinstance(m, nn.Identity) for m in experts.children()):
        raise refuse(f"its experts include {zero or 'some'} zero-computation (identity) experts, which moekit's expert "
                     "bank does not have (identity_experts)")
    gate_up, up, down = leaf.get("gate_up_proj"), leaf.get("up_proj"), leaf.get("down_proj")
    bank: dict[str, torch.Tensor] = {}
    if gate_up is not None and down is not None and gate_up.dim() == down.dim() == 3:
        E = gate_up.shape[0]
        # standard: gate_up (E, 2F, D), down (E, D, F); transposed: gate_up (E, D, 2F), down (E, F, D).
        # The two cannot both fit one pair of shapes; the decorator's flag, where there is one, decides.
        flag = getattr(experts, "is_transposed", None)
        out_t = bool(flag) if flag is not None else tuple(down.shape) == (E, gate_up.shape[2] // 2, gate_up.shape[1])
        D = gate_up.shape[1] if out_t else gate_up.shape[2]
        two_F = gate_up.shape[2] if out_t else gate_up.shape[1]
        Fdim = two_F // 2
        want_down = (E, Fdim, D) if out_t else (E, D, Fdim)
        if two_F % 2 or tuple(down.shape) != want_down:
            raise refuse(f"expert shapes gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)} are "
                         "neither (E, 2F, D), (E, D, F) nor the transposed (E, D, 2F), (E, F, D)")
        interleaved = getattr(experts, "is_concatenated", True) is False
        bank.update(gate_up_proj=gate_up, down_proj=down)
        gated, layout = True, ExpertLayout(in_transposed=out_t, out_transposed=out_t, interleaved=interleaved)
        X = two_F
    elif up is not None and down is not None and up.dim() == down.dim() == 3 and gate_up is None:
        # Non-gated experts (has_gate=False): up_proj (E, F, D), down_proj (E, D, F).
        E, Fdim, D = up.shape
        if tuple(down.shape) != (E, D, Fdim) or getattr(experts, "is_transposed", False):
            raise refuse(f"non-gated expert shapes up_proj {tuple(up.shape)}, down_proj {tuple(down.shape)} are not "
                         "(E, F, D), (E, D, F)")
        bank.update(up_proj=up, down_proj=down)
        gated, layout, X = False, STANDARD, Fdim
    elif all(leaf.get(n) is not None and leaf[n].dim() == 2 for n in ("w1", "v1", "w2")):
        # Flat 2-D stacks (DBRX, MegaBlocks' naming): w1 gate, v1 up (E*F, D), w2 down (E*F, D) used as h @ w2.
        w1, v1, w2 = leaf["w1"], leaf["v1"], leaf["w2"]
        E = int(getattr(experts, "num_experts", 0) or getattr(experts, "moe_num_experts", 0))
        if not E or w1.shape != v1.shape or w1.shape != w2.shape or w1.shape[0] % E:
            raise refuse(f"its flat expert stacks w1 {tuple(w1.shape)}, v1 {tuple(v1.shape)}, w2 {tuple(w2.shape)} are "
                         "not three (E*F, D) matrices of a known expert count")
        D, Fdim = w1.shape[1], w1.shape[0] // E
        bank.update(gate_proj=w1, up_proj=v1, down_proj=w2)
        gated, layout, X = True, ExpertLayout(split=True, flat=True), 2 * Fdim
    else:
        raise refuse(f"its experts ({type(experts).__name__}) are not in a stacked layout moekit reads "
                     "(gate_up_proj + down_proj, up_proj + down_proj, or flat w1/v1/w2)")
    b_in, b_out = leaf.get("gate_up_proj_bias", leaf.get("up_proj_bias")), leaf.get("down_proj_bias")
    if b_in is not None or b_out is not None:
        if b_in is None or b_out is None or tuple(b_in.shape) != (E, X) or tuple(b_out.shape) != (E, D):
            raise refuse(f"its expert biases are not (E, X={X}) and (E, D={D})")
        bank.update(in_proj_bias=b_in, down_proj_bias=b_out)
        layout = dataclasses.replace(layout, bias=True)
    unused = sorted(n for n, p in params.items() if not any(p is t for t in bank.values()))
    if unused:
        raise refuse(f"its experts hold tensors {unused} that moekit's expert bank has no place for")
    return bank, layout, E, D, Fdim, gated


def _value_activation(act: Any) -> str | None:
    """The non-gated activation name ("silu", "gelu", ...) whose function `act` computes, checked by value
    (None if none matches)."""
    if not callable(act):
        return None
    x = torch.linspace(-6, 6, 49)
    try:
        y = act(x)
    except Exception:  # an activation that cannot take a plain fp32 tensor is not one moekit knows
        return None
    for name in ACTIVATIONS:
        if name not in GATED_ACTIVATIONS and isinstance(y, torch.Tensor) and y.shape == x.shape \
                and torch.allclose(y, Activation(name)(x), atol=1e-6, rtol=1e-5):
            return name
    return None


# The gated activation whose gate function is a non-gated one.
_GATED_OF = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}


def _read_activation(experts: nn.Module, gated: bool, layout: ExpertLayout, Fdim: int, refuse) -> Activation:
    """The experts' activation, checked by value on a probe: the experts' own gating (`_apply_gate`, which
    transformers' decorator and families such as gpt-oss define) or their `act_fn`."""
    act = next((getattr(experts, n) for n in ("act_fn", "activation_fn", "act") if callable(getattr(experts, n, None))),
               None)
    if act is None:
        mlp = getattr(experts, "mlp", None)
        act = getattr(mlp, "activation_fn", None) or getattr(mlp, "act_fn", None)
    if not gated:
        name = _value_activation(act)
        if name is None:
            raise refuse(f"its experts' activation {type(act).__name__} is none moekit has ({ACTIVATIONS})")
        return Activation(name)
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is None:
        if act is None:
            raise refuse(f"its experts ({type(experts).__name__}) have no activation moekit can read")

        def apply_gate(h):
            gate, up = h.chunk(2, dim=-1)
            return act(gate) * up
    # Clamp settings where the experts or their config state them (gpt-oss: limit, alpha; DeepSeek-V4: limit).
    config = getattr(experts, "config", None)
    limit = next((v for v in (getattr(experts, "limit", None), getattr(experts, "swiglu_limit", None),
                              getattr(config, "swiglu_limit", None)) if isinstance(v, int | float)), None)
    if limit is not None and not math.isfinite(limit):
        limit = None  # Step-3.7 states "no clamp" as an infinite limit
    alpha = next((v for v in (getattr(experts, "alpha", None), getattr(config, "swiglu_alpha", None))
                  if isinstance(v, int | float)), None)
    g = torch.Generator().manual_seed(0)
    scale = max(3.0, 2.0 * float(limit or 0))
    h = torch.randn(7, 2 * Fdim, generator=g) * scale
    try:
        with torch.no_grad():
            want = apply_gate(h)
    except Exception as e:
        raise refuse(f"its experts' gating could not be probed ({type(e).__name__}: {e})") from None
    base = _GATED_OF.get(_value_activation(act))
    names = [base] if base else []
    names += [n for n in GATED_ACTIVATIONS if n not in names]
    settings = [(None, 1.0, 0.0, False)]
    if limit is not None:
        settings += [(float(limit), 1.0, 0.0, False), (float(limit), 1.0, 1.0, False),
                     (float(limit), 1.0, 0.0, True)]  # the last: clamped after the activation (Step-3.7)
        if alpha is not None:
            settings += [(float(limit), float(alpha), 1.0, False), (float(limit), float(alpha), 0.0, False)]
    for name, (lim, a, off, after) in itertools.product(names, settings):
        if a != 1.0 and name != "swiglu":
            continue
        cand = Activation(name, lim, a, off, layout.interleaved, after)
        got = cand(h)
        if got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5):
            return cand
    raise refuse(f"its experts' gating ({type(experts).__name__}: act {type(act).__name__}) matches none of moekit's "
                 f"gated activations ({', '.join(GATED_ACTIVATIONS)}, with the clamp settings it states: "
                 f"limit={limit}, alpha={alpha}) on a probe")


def _router_config(block: nn.Module, gate: nn.Module, config: Any, has_selection_bias: bool,
                   hash_table: torch.Tensor | None = None) -> RouterConfig:
    def read(gate_names: tuple[str, ...], config_names: tuple[str, ...], default: Any) -> Any:
        for obj, names in ((gate, gate_names), (block, gate_names), (config, config_names)):
            for n in names:
                value = getattr(obj, n, None) if obj is not None else None
                if value is not None:
                    return value
        return default

    score = read((), ("scoring_func",), "sigmoid" if has_selection_bias else "softmax")
    n_group = int(read(("num_group", "n_group"), ("n_group",), 1))
    topk_group = int(read(("topk_group",), ("topk_group",), 1))
    if read(("topk_method",), ("topk_method",), None) == "greedy":
        n_group = topk_group = 1  # DeepSeek-V2's plain top-k: the group fields are set but unused
    k = read(("top_k", "moe_topk"), ("num_experts_per_tok", "moe_topk", "moe_top_k"), 2)
    if hash_table is not None:  # Hash Layers (arXiv 2106.04426): the experts come from the table, the weights from the gate
        return RouterConfig(kind="hash", k=hash_table.shape[1], vocab_size=hash_table.shape[0], score=score,
                            normalize=bool(read(("norm_topk_prob",), ("norm_topk_prob",), True)),
                            routed_scaling_factor=float(read(("routed_scaling_factor",), ("routed_scaling_factor",),
                                                             1.0)))
    # DBRX divides by the chosen weights' p-norm (p = moe_normalize_expert_weights, None: not at all).
    has_p = any(hasattr(obj, "moe_normalize_expert_weights") for obj in (gate, block, config) if obj is not None)
    normalize_p = read(("moe_normalize_expert_weights",), ("moe_normalize_expert_weights",), None)
    normalize = bool(read(("norm_topk_prob",), ("norm_topk_prob",), True)) if not has_p else normalize_p is not None
    return RouterConfig(
        kind="topk",
        k=int(k),
        score=score,
        normalize=normalize,
        normalize_p=float(normalize_p or 1.0),
        # ERNIE 4.5 divides by clamp(sum, min=moe_norm_min).
        normalize_min=float(read(("norm_min",), ("moe_norm_min",), 0.0)),
        routed_scaling_factor=float(read(("routed_scaling_factor", "router_scaling_factor"),
                                         ("routed_scaling_factor", "router_scaling_factor"), 1.0)),
        n_group=n_group,
        topk_group=topk_group,
        # NOTE: Mixtral jitters the router *and* expert input in training; moekit jitters the router
        # input only (Switch Transformer). Inference is unaffected.
        jitter=float(read(("jitter_noise",), ("router_jitter_noise",), 0.0)),
    )


def call_router(spec: BlockSpec, x_TD: torch.Tensor,
                selection_bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The HF router's own choice on fp32 `x_TD`, run on an fp32 copy of it (the gate is small: E x D):
    (weights (T, K) fp32, expert indices (T, K)), or None where its output does not state a choice
    (a router returning logits only: the block selects). Two conventions: (logits, weights, indices)
    (transformers v5) and dense (T, E) scores with zeros off the chosen experts (Llama 4).
    `selection_bias_E` (E,) fp32, where given, takes the place of the block's selection bias (in the
    copy, or as the argument a block-held bias is passed as): a probe value, the model's is untouched."""
    gate = copy.deepcopy(spec.gate).float()
    E = spec.cfg.num_experts
    if selection_bias_E is not None:
        with torch.no_grad():
            for n, t in itertools.chain(gate.named_buffers(), gate.named_parameters()):
                if n.rpartition(".")[2] in _SELECTION_BIAS_NAMES and t.numel() == E:
                    t.copy_(selection_bias_E.reshape(t.shape))
    args = [x_TD]
    params = [p for p in inspect.signature(gate.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(params) >= 2 and params[1].name == "input_ids":
        args.append(probe_token_ids(spec, x_TD.shape[0], x_TD.device))  # a hash router (DeepSeek-V4)
    elif len(params) >= 2 and spec.selection_bias is not None:
        # a selection bias the block holds and passes in
        args.append((spec.selection_bias if selection_bias_E is None else selection_bias_E).float())
    try:
        with torch.no_grad():
            out = gate(*args)
    except Exception:
        return None
    if not isinstance(out, tuple) or not all(isinstance(t, torch.Tensor) for t in out):
        return None
    T = x_TD.shape[0]
    if len(out) == 3:
        _, w_TK, idx_TK = out
        if idx_TK.dtype.is_floating_point or idx_TK.shape != w_TK.shape or idx_TK.shape[0] != T:
            return None
        return w_TK.float(), idx_TK.long()
    if len(out) == 2 and tuple(out[0].shape) == (T, E):
        scores_TE = out[0].float()
        k = spec.cfg.router.k
        w_TK, idx_TK = scores_TE.topk(k, dim=-1)
        if not bool(((scores_TE != 0).sum(-1) == k).all()):
            return None
        return w_TK, idx_TK
    return None


def _router_readings(spec: BlockSpec) -> list[RouterConfig]:
    """The routing rules the attributes leave possible, the attributes' own reading first: softmax or
    sigmoid, renormalised or not, a group scored by its best expert or its best two (where there are
    groups), the selection bias added to the scores or to the logits (where there is one)."""
    router, E = spec.cfg.router, spec.cfg.num_experts
    other = {"softmax": "sigmoid"}.get(router.score, "softmax")
    scorings = ((router.score, router.normalize), (router.score, not router.normalize),
                (other, router.normalize), (other, not router.normalize))
    if router.routes_on_token_ids():  # a hash table picks the experts: only the weights' rule is open
        return [r for score, normalize in scorings
                if (r := _valid(dataclasses.replace(router, score=score, normalize=normalize), E)) is not None]
    groups = (None, "other") if router.n_group > 1 else (None,)
    bias_on = ("scores", "logits") if spec.selection_bias is not None else ("scores",)
    readings = []
    for (score, normalize), group, on in itertools.product(scorings, groups, bias_on):
        r = dataclasses.replace(router, score=score, normalize=normalize, selection_bias_on=on)
        if group == "other":  # the rule the score function does not default to
            r.group_score = {"max": "top2_sum", "top2_sum": "max"}[r.group_rule()]
        if (r := _valid(r, E)) is not None:
            readings.append(r)
    # Phi-3.5-MoE's SparseMixer, its band from the router's `router_jitter_noise` (which Mixtral uses as input
    # jitter instead), its input jitter from `input_jitter_noise`.
    eps = _read_setting(spec, ("router_jitter_noise",), ("router_jitter_noise",), None)
    if eps is not None:
        jitter = float(_read_setting(spec, ("input_jitter_noise",), ("input_jitter_noise",), 0.0))
        with contextlib.suppress(ValueError):
            readings.append(RouterConfig(kind="sparsemixer", k=router.k, jitter_eps=float(eps),
                                         jitter=jitter).validate(E))
    return readings


def _valid(router: RouterConfig, num_experts: int) -> RouterConfig | None:
    """`router` if it validates with `num_experts`, else None (a candidate reading, not the user's setting:
    its warnings, e.g. k=1 renormalised, are not shown)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return router.validate(num_experts)
    except ValueError:
        return None


def _read_setting(spec: BlockSpec, gate_names: tuple[str, ...], config_names: tuple[str, ...], default: Any) -> Any:
    """A routing setting: the router's attribute, the block's, then the model config's (the first not None)."""
    config = getattr(spec.experts, "config", None) or getattr(spec.block, "config", None) or spec.model_config
    for obj, names in ((spec.gate, gate_names), (spec.block, gate_names), (config, config_names)):
        for n in names:
            value = getattr(obj, n, None) if obj is not None else None
            if value is not None:
                return value
    return default


def _read_rule_from_router(spec: BlockSpec) -> None:
    """Settle what the attributes leave open (renormalisation, softmax or sigmoid, the group score, where
    the selection bias is added, a scale the block applies after combining) from the router's own choice
    on a probe, and list the readings still open (the weight on the experts' input) as alternatives for
    the block probe. Nothing is decided on meta tensors (no values to read)."""
    cfg = spec.cfg
    readings = _router_readings(spec)
    scale = 1.0
    if not spec.router_weight.is_meta:
        gen = torch.Generator().manual_seed(0)
        x_TD = torch.randn(ROUTER_PROBE_TOKENS, cfg.d_model, generator=gen)
        x_TD = x_TD.to(spec.router_weight.device)
        bias_E = None
        if spec.selection_bias is not None:
            # A random model's selection bias is zero, which cannot tell where the bias is added: probe with
            # one the size of the logits' spread (the same value on both sides).
            spread = torch.nn.functional.linear(x_TD, spec.router_weight.float()).std()
            bias_E = torch.randn(cfg.num_experts, generator=gen).to(x_TD.device) * spread
        hf = call_router(spec, x_TD, bias_E)
        if hf is not None:
            # In order, up to the first reading that reproduces the router (a large model's gate is
            # E x D per layer: no reading is run after that one).
            scaled = []
            for r in readings:
                c = router_weight_ratio(spec, r, x_TD, hf, bias_E)
                if c == 1.0:
                    scaled = [(r, 1.0)]
                    break
                if c is not None:  # the same experts, the weights a constant times the router's: the block rescales
                    scaled.append((r, c))
            if scaled:
                scale = scaled[0][1]
                readings = [r for r, c in scaled if abs(c - scale) <= 1e-5 * scale]
            else:
                readings = readings[:1]  # none: the first, which the probe then refuses with its reason
    configs = [dataclasses.replace(cfg, router=r, weight_on_input=w) for r in readings[:1] for w in (False, True)]
    configs += [dataclasses.replace(cfg, router=r) for r in readings[1:]]
    spec.cfg, spec.alternatives, spec.router_weight_scale = configs[0], configs[1:], scale


def probe_token_ids(spec: BlockSpec, num_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Token ids (num_tokens,) int64 for a probe of a block that reads them (hash routing): drawn from a seeded
    generator over the vocabulary its table maps (the model config's, else 2 ids)."""
    table = spec.router_tensors.get("tid2eid")
    vocab = table.shape[0] if table is not None else int(getattr(spec.model_config, "vocab_size", 2) or 2)
    return torch.randint(0, vocab, (num_tokens,), generator=torch.Generator().manual_seed(0)).to(device)


def router_weight_ratio(spec: BlockSpec, router_cfg: RouterConfig, x_TD: torch.Tensor,
                        hf: tuple[torch.Tensor, torch.Tensor], selection_bias_E: torch.Tensor | None = None
                        ) -> float | None:
    """moekit's combine weights / the HF router's, where moekit's router with `router_cfg` on the block's
    gate picks the same experts as the HF router's choice `hf` for every token of `x_TD` and its weights
    are one constant times the HF ones (fp32, 1e-5): 1.0 for the same weights, None otherwise.
    `selection_bias_E`: the probe's selection bias (see `call_router`; default the block's own)."""
    from moekit.routers import router_class

    E, D = spec.cfg.num_experts, spec.cfg.d_model
    with torch.device("meta"):
        router = router_class(router_cfg.kind)(router_cfg, D, E)
    router.weight = spec.router_weight
    router.bias = spec.router_bias
    for name, tensor in spec.router_tensors.items():
        setattr(router, name, tensor)
    if selection_bias_E is not None:
        router.e_score_correction_bias = selection_bias_E
    elif spec.selection_bias is not None:
        router.e_score_correction_bias = spec.selection_bias
    else:
        router.e_score_correction_bias = torch.zeros(E, device=x_TD.device)
    router.eval()  # the rule itself (a training-mode router may sample, SparseMixer)
    ids = probe_token_ids(spec, x_TD.shape[0], x_TD.device) if router_cfg.routes_on_token_ids() else None
    with torch.no_grad():
        idx_TK, w_TK = router(x_TD, state=ids).to_padded()
    hf_w_TK, hf_idx_TK = hf
    if idx_TK.shape != hf_idx_TK.shape:
        return None
    hf_order, order = hf_idx_TK.argsort(-1), idx_TK.argsort(-1)
    if not bool((hf_idx_TK.gather(1, hf_order) == idx_TK.gather(1, order)).all()):
        return None
    hf_w_TK, w_TK = hf_w_TK.gather(1, hf_order), w_TK.gather(1, order)
    if torch.allclose(hf_w_TK, w_TK, rtol=1e-5, atol=1e-6):
        return 1.0
    total = float(hf_w_TK.sum())
    c = float(f"{float(w_TK.sum()) / total:.6g}") if total > 0 else 0.0  # 2.0, not 1.9999998
    return c if c > 0 and torch.allclose(hf_w_TK * c, w_TK, rtol=1e-5, atol=1e-6) else None


def router_matches(spec: BlockSpec, router_cfg: RouterConfig, x_TD: torch.Tensor,
                   hf: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether moekit's router with `router_cfg` on the block's gate picks the same experts as the HF
    router's choice `hf` for every token of `x_TD`, with the same weights times the block's
    `router_weight_scale` (fp32, 1e-5)."""
    c = router_weight_ratio(spec, router_cfg, x_TD, hf)
    return c is not None and abs(c - spec.router_weight_scale) <= 1e-5 * spec.router_weight_scale
