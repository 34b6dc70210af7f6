"""Find transformers v5 sparse MoE blocks by the role of their parts, and read their routing rule.

Legend: T tokens, D model dim, E routed experts, F expert hidden dim, K experts per token, X = 2F
(gated experts) or F.

A block is any module with an `experts` child holding the routed experts' weights (stacked, or a
ModuleList/ModuleDict of dense MLP modules: Switch Transformers), or with two children holding one
stacked (E, ., .) weight each (JetMoE's parallel experts), and then, found by role rather than by
child name:
  router         the one other child whose own `weight` is (E, D), or that holds one Linear(D, E)
                 (`gate`, `router`, `gate.wg`, `router.layer`, a Linear subclass); an optional logit
                 `bias` (E,) (gpt-oss) and a selection bias (DeepSeek-V3's `e_score_correction_bias`)
                 in it or held by the block (MiniMax-M2, LFM2-MoE: passed to the router's forward).
                 A lone Linear(D, R) with R > E: columns E.. are zero-computation experts, read from
                 what the experts' forward does with a token sent there (LongCat-Flash's identities)
  shared expert  a child MLP with Linear up_proj / down_proj and gate_proj or none, or a fused
                 gate_up_proj, biases allowed (`shared_expert`, `shared_experts`, `shared_mlp`,
                 Nemotron-H's ReLU^2 MLP), its activation read from its own output; optionally gated
                 by a Linear(D, 1) child (Qwen2-MoE)
  latent pair    Linear(D, l) and Linear(l, D) children around experts that work in l dims (Nemotron-H; l = D
                 too: the only two Linear(D, D) children, in the block's order)
  output norm    a child with one (D,) `weight` and an epsilon (A.X-K1's post_mlp_layernorm)
  output bias    a (D,) Parameter of the block itself (JetMoE)
  children without tensors (activations, dropout, nn.Identity) hold nothing to bind.
Blocks whose parts match but whose forward is something else are named in UNEXPRESSED (refused) and
NOT_FFN_MOE (left alone: JetMoE's mixture of attention).
The experts' storage is read into an `ExpertLayout` (transposed, interleaved, separate, flat or listed
stacks, spare rows, per-expert biases) and their activation by value (`moekit.ops.ffn.Activation`:
SiLU, GELU, ReLU, ..., gpt-oss's clamped SwiGLU), so a family is a configuration of moekit's pieces,
not a code path; the block probe in `moekit.hf.wrap` checks the whole reading.

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
Where the router runs its gate linear (the model dtype or fp32: `RouterConfig.gate_dtype`) is read from its own
call on a bf16 copy, by the dtype of the matmul of its (E, D) weight (`hf_gate_dtype`).
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
from moekit.routers.base import RouterInputNorm


class UnsupportedBlockError(UsageError):  # a UsageError is a ValueError, as before
    """A transformers MoE block whose structure or routing rule moekit cannot run exactly."""


# Families whose transformers forward moekit is tested against, logits and greedy generation (tests/hf).
TESTED_BLOCKS = ("MixtralSparseMoeBlock", "OlmoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock",
                 "DeepseekV3MoE", "GptOssMLP", "Llama4TextMoe", "GraniteMoeMoE", "JambaSparseMoeBlock")

# Blocks refused by class, where a structural reading would find the parts but the forward does something
# else (each reason checked against the installed transformers 5.x source).
UNEXPRESSED: dict[str, str] = {}

# Blocks whose transformers 5.x forward is not what the model's authors run: moekit runs the authors' rule, checks
# the block's router and experts part by part (not against the block's own output), and `wrap` warns once.
DIVERGENT = {
    "NllbMoeSparseMLP": "the wrapped NllbMoeSparseMLP blocks run NLLB-MoE's top-2 as fairseq and transformers 4.x do "
                        "(each token through its two experts), which differs from transformers 5.x's NllbMoeExperts "
                        "(only experts 0 and 1 run there: it dispatches by the values of the top-1 mask)",
}

# Modules with the parts of a sparse block that are not an FFN MoE: left as transformers runs them (wrap
# does not touch them; docs/hf.md lists them).
NOT_FFN_MOE = {
    "JetMoeMoA": "JetMoE's mixture of attention: its experts are per-head query and output projections that the "
                 "attention calls (map, then reduce around the attention), not an FFN",
    "JetMoeAttention": "the attention holding JetMoE's mixture of attention (JetMoeMoA)",
}

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
    # moekit router attribute -> HF tensor, or a module holding HF tensors (`input_norm`, see _router_parts)
    router_tensors: dict[str, Any] = field(default_factory=dict)
    latent: tuple[nn.Linear, nn.Linear] | None = None  # (D -> l, l -> D) around the routed experts
    output_bias: nn.Parameter | None = None  # (D,) added to the block's output
    output_norm: nn.Module | None = None  # an RMSNorm of the block's output (its `weight` (D,) is bound)
    reads_padding_mask: bool = False  # its router drops the padding tokens of the mask the block is passed (NLLB)
    latent_norm: nn.Module | None = None  # an RMSNorm of the experts' latent input (its `weight` (l,) is bound)
    expert_output_norm: nn.Module | None = None  # the experts' RMSNorm of each expert's output (`weight` bound)
    shared_bank: nn.Module | None = None  # S stacked shared experts the router weights (their stacks are bound)

    @property
    def expert_weight(self) -> torch.Tensor:
        """One of the experts' weights (its device, dtype, and whether it is on the meta device)."""
        first = next(iter(self.bank.values()))
        return first if isinstance(first, torch.Tensor) else next(first.parameters())

    @property
    def class_name(self) -> str:
        return type(self.block).__name__


def looks_like_moe_block(module: nn.Module) -> bool:
    """A module with an `experts` child holding weights: a v5 sparse MoE block, supported or not.
    moekit's own layers are not transformers blocks."""
    if isinstance(module, MoELayer) or type(module).__name__ in NOT_FFN_MOE:
        return False
    experts = getattr(module, "experts", None)
    if isinstance(experts, MoELayer):  # a decoder layer whose experts child moekit wraps (hf/inline.py)
        return False
    if not isinstance(experts, nn.Module):
        return _parallel_experts(module) is not None or _embedding_experts(module) is not None
    return any(p.dim() >= 2 for p in experts.parameters())


def _embedding_experts(block: nn.Module) -> int | None:
    """E, for a block whose experts are rows of two embedding tables (E, D) picked by product keys: a Linear
    child scoring 2 x floor(sqrt(E)) keys (DOGE's cross-domain MoE, PEER-style single-neuron experts)."""
    tables = [c for c in block.children() if isinstance(c, nn.Embedding)]
    if len(tables) < 2 or len({tuple(t.weight.shape) for t in tables}) != 1:
        return None
    E = tables[0].num_embeddings
    keys = 2 * int(E ** 0.5)
    return E if any(isinstance(c, nn.Linear) and c.out_features == keys for c in block.children()) else None


def _parallel_experts(block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """A block without an `experts` child whose experts are two children holding one stacked weight each,
    (E, X, D) in and (E, D, F) out (JetMoE's JetMoeParallelExperts `input_linear`, `output_linear`)."""
    single = [c for c in block.children() if len(list(c.parameters())) == 1 and next(c.parameters()).dim() == 3]
    pairs = [(a, b) for a in single for b in single if a is not b]
    for a, b in pairs:
        (E, X, D), (E2, D2, Fdim) = next(a.parameters()).shape, next(b.parameters()).shape
        if E == E2 and D == D2 and X in (Fdim, 2 * Fdim) and len(pairs) == 2:
            return a, b
    return None


def read_block(block: nn.Module, model_config: Any = None, backend: str = "auto") -> BlockSpec:
    """Check the block's structure and read its routing rule; raise UnsupportedBlockError naming the
    class and what moekit cannot run."""
    name = type(block).__name__

    def refuse(why: str) -> UnsupportedBlockError:
        return UnsupportedBlockError(f"moekit.hf cannot wrap {name}: {why}")

    if name in UNEXPRESSED:
        raise refuse(UNEXPRESSED[name])
    if not isinstance(getattr(block, "experts", None), nn.Module) and _embedding_experts(block) is not None:
        raise refuse(f"its {_embedding_experts(block)} experts are single neurons, rows of two embedding tables picked "
                     "by product keys (two top-k over sqrt(E) keys each, then a top-k of their sums); moekit's experts "
                     "are FFNs chosen by one linear router")
    parallel = None if isinstance(getattr(block, "experts", None), nn.Module) else _parallel_experts(block)
    hidden_dropout = 0.0  # the experts' own dropout on their hidden activations (listed MLP modules)
    experts = block if parallel is not None else block.experts
    if parallel is not None:
        bank, layout, E, Din, Fdim, gated = _read_parallel(*parallel)
        activation = _read_activation(block, gated, layout, Fdim, refuse)
    elif isinstance(experts, nn.ModuleList | nn.ModuleDict):
        bank, layout, E, Din, Fdim, activation, hidden_dropout = _read_listed(experts, refuse)
    else:
        bank, layout, E, Din, Fdim, gated = _read_bank(experts, refuse)
        activation = _read_activation(experts, gated, layout, Fdim, refuse)

    # --- the other children, by role. Children without tensors (nn.Identity, dropout, an activation module)
    # hold nothing to bind; what they do is checked by the block probe.
    children = [(n, c) for n, c in block.named_children()
                if c is not experts and any(True for _ in itertools.chain(c.parameters(), c.buffers()))
                and not any(c is p for p in parallel or ())]
    attention = [n for n, c in children if type(c).__name__.endswith("Attention")]
    if attention:
        raise refuse(f"its experts sit inside a decoder layer (it also holds the attention `{attention[0]}`), whose own "
                     "forward routes and combines them with its dense MLP and norms; there is no separate MoE block "
                     "module for moekit to replace with a MoELayer")
    latent = _latent_projections([c for _, c in children], Din)
    D = Din if latent is None else latent[0].in_features
    gate = shared = shared_gate = output_norm = latent_norm = shared_bank = None
    router_weight = router_bias = None
    gate_name = ""
    for child_name, child in children:
        if shared_bank is None and _weighted_shared_bank(child, D) is not None:
            shared_bank = child  # always-on experts the router weights per token (Inkling)
            continue
        if latent is not None and any(child is m for m in latent):
            continue
        if latent is not None and latent_norm is None and _norm_eps(child, Din) is not None:
            latent_norm = child  # an RMSNorm of the experts' latent input (Muse Spark): the block probe checks where
            continue
        if isinstance(child, nn.Linear) and child.out_features == 1 and child.in_features == D:
            shared_gate = child
            continue
        if _is_mlp(child):
            shared = child
            continue
        if _norm_eps(child, D) is not None and output_norm is None:
            output_norm = child  # applied to the block's output: the block probe checks that it is
            continue
        found = _router_weight(child, E, D)
        if found is None:
            unexpressed = _unexpressed_child(child_name, child, E)
            if unexpressed:
                raise refuse(unexpressed)
            raise refuse(f"its child `{child_name}` ({type(child).__name__}) is neither a router (weight (E={E}, "
                         f"D={D})), a shared expert (up_proj/down_proj [+ gate_proj] Linear), a shared-expert gate "
                         "Linear(D, 1) nor a latent projection pair Linear(D, l), Linear(l, D); moekit's MoELayer "
                         "has no place for it")
        if gate is not None:
            raise refuse(f"it has two routers, `{gate_name}` and `{child_name}` (each a child with a weight (R, D={D}), "
                         f"R >= E={E}); moekit's MoELayer has one")
        gate, gate_name, (router_weight, router_bias) = child, child_name, found
    if gate is None:
        raise refuse(f"it has no router: no child with a weight (E={E}, D={D}) or a Linear(D, E)")
    # Router columns past the E experts: zero-computation experts, read from what the experts do with them.
    R = router_weight.shape[0]
    S = 0 if shared_bank is None else shared_bank.gate_proj.shape[0]
    if S and R != E + S:
        raise refuse(f"its router scores {R} columns for {E} experts and {S} router-weighted shared experts "
                     f"({type(shared_bank).__name__}); moekit's shared_slots are the E + S columns")
    zero, copy_ = _zero_compute_columns(experts, E, R, Din, refuse) if R > E + S else (0, 0)

    # --- selection bias: in the router (DeepSeek-V3, ERNIE) or held by the block (MiniMax-M2, LFM2-MoE)
    selection_bias = None
    for holder in (gate, block):
        for n, t in itertools.chain(holder.named_buffers(), holder.named_parameters()):
            if holder is block and "." in n:
                continue  # the block's own tensors only; its children are read above
            if n.rpartition(".")[2] in _SELECTION_BIAS_NAMES and t.numel() == R - S:
                selection_bias = t
    # --- a token id -> experts table (V, K) of integers in the router: hash routing (DeepSeek-V4's `tid2eid`)
    tables = [t for t in gate.buffers() if not t.dtype.is_floating_point and t.dim() == 2 and t.shape[1] <= E]
    hash_table = tables[0] if len(tables) == 1 else None
    # A (D,) Parameter of the block itself: a bias on the block's output (JetMoE); the probe checks where it goes.
    output_bias = next((p for p in block.parameters(recurse=False) if tuple(p.shape) == (D,)), None)
    own = [n for n, t in itertools.chain(block.named_parameters(recurse=False), block.named_buffers(recurse=False))
           if t is not selection_bias and t is not output_bias]
    if own:
        raise refuse(f"it holds tensors {own} directly that are no selection bias (E,) moekit knows")

    # --- shared expert (always on, reading the D-dim input), optionally sigmoid-gated; its Linear modules
    # (biases included) are bound as they are
    width, shared_limit, shared_act = 0, None, None
    if shared is not None:
        width, shared_limit, shared_act = _read_shared(shared, activation, refuse)
    if shared_gate is not None and (shared is None or shared_gate.bias is not None):
        raise refuse("its shared-expert gate is not a Linear(D, 1) without bias gating a shared expert")

    # An RMSNorm the experts apply to each expert's output (Muse Spark's post_expert_norm); its form and the
    # latent norm's are read by value.
    expert_norm = None if parallel is not None or isinstance(experts, nn.ModuleList | nn.ModuleDict) else \
        next((c for c in experts.children() if _norm_eps(c, Din) is not None), None)
    latent_form = None if latent_norm is None else _norm_form(latent_norm, Din, refuse)
    expert_form = None if expert_norm is None else _norm_form(expert_norm, Din, refuse)
    config = getattr(experts, "config", None) or getattr(block, "config", None) or model_config
    router = _router_config(block, gate, config, selection_bias is not None, hash_table)
    n_shared = getattr(config, "n_shared_experts", None) or 1
    # A (1,) Parameter of the router: a learned scale of its weights (Inkling's `global_scale`); the probe checks.
    scales = [t for t in gate.parameters() if tuple(t.shape) == (1,)]
    router_tensors = {} if hash_table is None else {"tid2eid": hash_table}
    if S or scales:
        if len(scales) > 1 or router.routes_on_token_ids():
            raise refuse(f"its router holds {len(scales)} scalar Parameter(s) (a learned scale) or weights "
                         f"{S} shared expert(s), with {'hash' if router.routes_on_token_ids() else 'top-k'} routing; "
                         "moekit's top-k router has one learned scale of its weights (learned_scale) and shared_slots")
        router = dataclasses.replace(router, shared_slots=S, learned_scale=bool(scales))
        if scales:
            router_tensors["global_scale"] = scales[0]
    if S:  # S stacked shared experts (gate_proj, up_proj (S, F, D), down_proj (S, D, F)), their act_fn by value
        name = _GATED_OF.get(_value_activation(getattr(shared_bank, "act_fn", None)))
        if name is None:
            raise refuse(f"the activation of its router-weighted shared experts ({type(shared_bank).__name__}) is "
                         "none of moekit's gated activations")
        n_shared, width = S, shared_bank.gate_proj.shape[1]
        shared_act = None if name == activation.name else name
    cfg = MoEConfig(d_model=D, d_expert=Fdim, num_experts=E, router=router, activation=activation.name,
                    activation_limit=activation.limit, activation_alpha=activation.alpha,
                    activation_up_offset=activation.up_offset, activation_clamp_after=activation.clamp_after,
                    activation_softcap_gate=activation.softcap and activation.softcap[0],
                    activation_softcap_up=activation.softcap and activation.softcap[1],
                    num_shared_experts=n_shared if shared is not None or S else 0, d_shared=width or None,
                    shared_activation_limit=shared_limit, shared_activation=shared_act,
                    shared_gate=shared_gate is not None, zero_experts=zero, copy_experts=copy_,
                    latent_dim=Din if latent is not None else None, **_capacity(gate, experts, config, refuse),
                    output_bias=output_bias is not None,
                    output_norm_eps=None if output_norm is None else _norm_eps(output_norm, D),
                    latent_norm_eps=None if latent_norm is None else _norm_eps(latent_norm, Din),
                    latent_norm_form=latent_form or "weight",
                    expert_output_norm_eps=None if expert_norm is None else _norm_eps(expert_norm, Din),
                    expert_output_norm_form=expert_form or "weight", backend=backend,
                    expert_hidden_dropout=hidden_dropout)
    try:
        with warnings.catch_warnings():  # a first reading, settled below; not a setting the user chose
            warnings.simplefilter("ignore")
            cfg.validate()
    except ValueError as e:
        raise refuse(f"its routing rule ({router.describe()}) is not one moekit can run: {e}") from e
    spec = BlockSpec(block, gate, router_weight, router_bias, selection_bias, experts, bank, layout, activation,
                     shared, shared_gate, cfg, model_config=model_config,
                     router_tensors={**router_tensors,
                                     **_router_parts(gate, (router_weight, router_bias, selection_bias), R, D)},
                     latent=latent, output_bias=output_bias, output_norm=output_norm,
                     latent_norm=latent_norm, expert_output_norm=expert_norm, shared_bank=shared_bank,
                     reads_padding_mask=_router_reads_padding_mask(gate, E, D))
    # Where the router runs its gate (in the model dtype or fp32): read from its own call before the rule, so that
    # every reading (the alternatives included) carries it.
    spec.cfg = dataclasses.replace(spec.cfg, router=dataclasses.replace(spec.cfg.router, gate_dtype=hf_gate_dtype(spec)))
    _read_rule_from_router(spec)
    return spec


def _router_parts(gate: nn.Module, known: tuple, R: int, D: int) -> dict[str, Any]:
    """The router's Parameters beside its gate, bias and selection bias, by shape (Gemma 4's router): a (D,)
    scale of its input, after an RMS norm whose epsilon the router (or a child of it) holds, times its
    `scalar_root_size` (D^-0.5; 1 without one) -> `input_norm`; an (R,) per-expert scale of the combine
    weights -> `expert_scale`. The router probe checks the reading; anything else stays unread (and is
    refused as a tensor with no place)."""
    ids = {id(t) for t in known if t is not None}
    rest = [p for p in gate.parameters() if id(p) not in ids]
    scale_D = [p for p in rest if tuple(p.shape) == (D,)]
    scale_R = [p for p in rest if tuple(p.shape) == (R,)]
    if R == D or len(scale_D) > 1 or len(scale_R) > 1:
        return {}  # which is which is not read from the shapes
    parts: dict[str, Any] = {}
    eps = next((v for m in gate.modules() for v in (getattr(m, n, None) for n in ("eps", "variance_epsilon"))
                if isinstance(v, float)), None)
    if scale_D and eps is not None:
        parts["input_norm"] = RouterInputNorm(scale_D[0], eps, float(getattr(gate, "scalar_root_size", 1.0)))
    if scale_R:
        parts["expert_scale"] = scale_R[0]
    return parts


def _required_args(module: nn.Module) -> list[str]:
    """The names of the positional arguments `module.forward` requires."""
    return [p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


def _weighted_shared_bank(child: nn.Module, D: int) -> int | None:
    """S, for a child holding S stacked gated experts, gate_proj and up_proj (S, F, D) and down_proj (S, D, F),
    and nothing else, whose forward takes per-token weights beside the input (Inkling's InklingSharedExperts,
    weighted by its router); else None."""
    params = dict(child.named_parameters())
    if set(params) != {"gate_proj", "up_proj", "down_proj"} or len(_required_args(child)) != 2:
        return None
    g, u, d = params["gate_proj"], params["up_proj"], params["down_proj"]
    if g.dim() != 3 or g.shape != u.shape or g.shape[2] != D or tuple(d.shape) != (g.shape[0], D, g.shape[1]):
        return None
    return g.shape[0]


def _unexpressed_child(child_name: str, child: nn.Module, E: int) -> str | None:
    """The exact feature a block child has that moekit's MoELayer does not express, for the refusal message
    (None: no feature recognised). Read by role: stacked always-on experts weighted by the router in a
    storage other than Inkling's (`_weighted_shared_bank`), and a router that is an MLP or carries a state
    across layers (ZAYA1's router)."""
    kind = type(child).__name__
    stacks = [n for n, p in child.named_parameters(recurse=False) if p.dim() == 3]
    extra = _required_args(child)[1:]
    if stacks and extra:
        S = child.get_parameter(stacks[0]).shape[0]
        return (f"its child `{child_name}` ({kind}) holds {S} stacked always-on expert(s) whose forward takes per-token "
                f"weights from the router (`{extra[0]}`), with tensors {sorted(n for n, _ in child.named_parameters())}; "
                "moekit's router-weighted shared experts (RouterConfig.shared_slots) are exactly gate_proj, up_proj "
                "(S, F, D) and down_proj (S, D, F)")
    linears = [m for m in child.modules() if isinstance(m, nn.Linear)]
    scorer = [m for m in linears if m.out_features in (E, E + 1)]
    if scorer and len(linears) > 1:
        state = [a for a in list(inspect.signature(child.forward).parameters)[1:] if "state" in a]
        skip = " (E + 1: a skip class)" if scorer[0].out_features == E + 1 else ""
        return (f"its router `{child_name}` ({kind}) "
                + (f"carries a state across layers (its forward adds the previous layer's `{state[0]}` and returns "
                   "its own for the next) and " if state else "")
                + f"is an MLP of {len(linears)} Linear layers scoring {scorer[0].out_features} classes{skip}; "
                "moekit's top-k routers score the layer's input with one linear gate (E, D) and keep no state")
    return None


def _norm_eps(child: nn.Module, D: int) -> float | None:
    """The epsilon of an RMSNorm-like child (one Parameter, `weight` (D,), and an epsilon attribute), else None.
    Whether it computes an RMSNorm where moekit applies it is left to the block probe."""
    params = dict(child.named_parameters())
    eps = next((v for v in (getattr(child, n, None) for n in ("variance_epsilon", "eps")) if isinstance(v, float)), None)
    if list(params) != ["weight"] or tuple(params["weight"].shape) != (D,) or any(True for _ in child.buffers()):
        return None
    return eps


def _norm_form(child: nn.Module, width: int, refuse) -> str:
    """Which of moekit's RMSNorm forms (moekit.ops.norm: r(x) w, r(x) (1 + w), r(x (1 + w))) the norm child
    computes, read on a probe with a random weight in a copy of it (a weight of 0 or 1 would make forms agree)."""
    from moekit.ops.norm import NORM_FORMS, FormRMSNorm

    if child.weight.is_meta:
        raise refuse(f"the form of its RMSNorm {type(child).__name__} (w, 1 + w, or scaling the input) cannot be read "
                     "on meta tensors (load the weights first)")
    g = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(child).float().eval()
    x_NW = torch.randn(8, width, generator=g, dtype=torch.float32).to(child.weight.device)
    with torch.no_grad():
        probe.weight.copy_(1.0 + 0.5 * torch.randn(width, generator=g, dtype=torch.float32))
        want = probe(x_NW)
        for form in NORM_FORMS:
            ours = FormRMSNorm(width, _norm_eps(child, width), form).to(x_NW.device)
            ours.weight.copy_(probe.weight)
            if isinstance(want, torch.Tensor) and want.shape == x_NW.shape and \
                    torch.allclose(ours(x_NW), want.float(), rtol=1e-5, atol=1e-5):
                return form
    raise refuse(f"its RMSNorm {type(child).__name__} computes none of moekit's forms r(x) w, r(x) (1 + w), "
                 "r(x (1 + w)) on a probe")


def _is_mlp(child: nn.Module) -> bool:
    """A dense MLP: Linear down_proj, and Linear up_proj with a Linear gate_proj or none (non-gated), or one
    fused Linear gate_up_proj ([gate; up])."""
    gate = getattr(child, "gate_proj", None)
    if not isinstance(getattr(child, "down_proj", None), nn.Linear):
        return False
    if isinstance(getattr(child, "gate_up_proj", None), nn.Linear):
        return getattr(child, "up_proj", None) is None and gate is None
    return isinstance(getattr(child, "up_proj", None), nn.Linear) and (gate is None or isinstance(gate, nn.Linear))


def shared_forward(shared: nn.Module, act: Activation, x_TD: torch.Tensor) -> torch.Tensor:
    """A dense MLP's output computed by moekit from its Linear modules (the SharedExpert forward)."""
    fused = getattr(shared, "gate_up_proj", None)
    if fused is not None:
        return shared.down_proj(act(fused(x_TD)))
    if getattr(shared, "gate_proj", None) is not None:
        return shared.down_proj(act.glu(shared.gate_proj(x_TD), shared.up_proj(x_TD)))
    return shared.down_proj(act(shared.up_proj(x_TD)))


def _read_shared(shared: nn.Module, activation: Activation, refuse) -> tuple[int, float | None, str | None]:
    """(width, clamp limit or None, own activation name or None) of the shared expert: it runs the experts'
    activation, plain or clamped at the experts' limit (MiniMax-M3-VL) or at its own `limit` (DeepSeek-V4,
    Step-3.7), with the experts' other clamp settings, or else an activation of its own, plain (Aria, HY-V4,
    GLM-5-Next: SiLU-gated routed experts, a shared expert following hidden_act; GLM-5-Next's clamped at the
    same limit), read from its own output on a probe large enough to reach any clamp (a random model's small
    activations never would); on meta tensors, its `act_fn` by value and its own limit."""
    gated = getattr(shared, "gate_proj", None) is not None or getattr(shared, "gate_up_proj", None) is not None
    width = shared.down_proj.in_features
    same = Activation(activation.name).gated == gated  # the experts' activation is a candidate
    own = next((v for v in (getattr(shared, n, None) for n in ("limit", "swiglu_limit")) if v is not None), None)
    own = float(own) if isinstance(own, int | float) and math.isfinite(own) and own > 0 else None
    weight = shared.down_proj.weight
    if weight.is_meta:  # no values: the activation its act_fn computes, by value
        shared_fn = getattr(shared, "act_fn", None) or getattr(shared, "activation_fn", None)
        value = _value_activation(shared_fn)
        name = _GATED_OF.get(value) if gated else value
        if name is None:
            raise refuse(f"its shared expert's activation ({type(shared_fn).__name__}) is none of moekit's "
                         f"{'gated ' if gated else ''}activations {ACTIVATIONS}")
        return width, own if gated else None, None if name == activation.name else name
    # Candidates in order: the experts' activation, plain then clamped; then every other activation of the
    # shared expert's kind, plain.
    candidates: list[tuple[Activation, float | None, str | None]] = []
    if same:
        candidates.append((Activation(activation.name), None, None))
        if gated and activation.softcap is None:
            candidates += [(dataclasses.replace(activation, limit=lim, interleaved=False), lim, None)
                           for lim in dict.fromkeys((own, activation.limit)) if lim is not None]
    limits = [lim for lim in dict.fromkeys((own, activation.limit)) if lim is not None] \
        if gated and activation.softcap is None and activation.alpha == 1.0 else []
    for n in ACTIVATIONS:
        if n != activation.name and (n in GATED_ACTIVATIONS) == gated:
            candidates.append((Activation(n), None, n))
            candidates += [(dataclasses.replace(activation, name=n, limit=lim, interleaved=False), lim, n)
                           for lim in limits]
    x_TD = torch.randn(8, shared.down_proj.out_features, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x_TD = x_TD.to(weight.device, weight.dtype)
    tol = 5e-2 if weight.dtype in (torch.bfloat16, torch.float16) else 1e-4
    was = shared.training
    shared.eval()
    found = []  # (error, index, candidate) of the candidates within tolerance
    try:
        with torch.no_grad():
            first = getattr(shared, "gate_up_proj", None) or getattr(shared, "gate_proj", None) or shared.up_proj
            x_TD = x_TD * (64.0 / first(x_TD).abs().amax().float().clamp(min=1e-6)).to(x_TD.dtype)  # up to +-64
            want = shared(x_TD)
            if isinstance(want, torch.Tensor):
                want = want.float()
                for i, (act, limit, name) in enumerate(candidates):
                    got = shared_forward(shared, act, x_TD).float()
                    if got.shape != want.shape:
                        continue
                    err = float((got - want).abs().amax()) / max(float(want.abs().amax()), 1e-12)
                    if torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().amax())):
                        if name is None:  # the experts' own activation first, as the block most likely runs it
                            return width, limit, None
                        found.append((err, i, limit, name))
    finally:
        shared.train(was)
    if found:  # the closest of the others (GELU and its tanh form differ by ~1e-3 at most)
        _, _, limit, name = min(found)
        return width, limit, name
    plain = Activation(activation.name)
    raise refuse(f"its shared expert {type(shared).__name__} computes neither {plain.describe()}, the experts' "
                 f"clamp settings ({activation.describe()}) at its limit"
                 f"{f' or its own (limit={own:g})' if own else ''}, nor any other "
                 f"{'gated ' if gated else ''}activation of moekit's {ACTIVATIONS} on a probe")


def _latent_projections(children: list[nn.Module], Din: int) -> tuple[nn.Linear, nn.Linear] | None:
    """The block's latent projections (NVIDIA LatentMoE, transformers' nemotron_h): the one pair of Linear
    children D -> l and l -> D around experts that read and write l = Din dims; None without one.
    With l = D (nemotron_h's moe_latent_size == hidden_size: two real Linear(D, D), not nn.Identity) the
    pair is the only two Linear(D, D) children, in the order the block registers them (fc1 before fc2)."""
    fc1 = [c for c in children if isinstance(c, nn.Linear) and c.out_features == Din and c.in_features != Din]
    fc2 = [c for c in children if isinstance(c, nn.Linear) and c.in_features == Din and c.out_features != Din]
    pairs = [(a, b) for a in fc1 for b in fc2 if a.in_features == b.out_features]
    if not pairs:
        # NOTE: same shapes, so the order is the registration order; the block probe in `moekit.hf.wrap`
        # refuses the block if its forward applies them the other way round.
        square = [c for c in children if isinstance(c, nn.Linear) and c.in_features == c.out_features == Din]
        pairs = [tuple(square)] if len(square) == 2 else []
    return pairs[0] if len(pairs) == 1 else None


def _zero_compute_columns(experts: nn.Module, E: int, R: int, Din: int, refuse) -> tuple[int, int]:
    """(zero, copy): the router scores R > E columns; what the experts' forward does with a token sent to
    each column past E, read on a probe: output 0 is a zero expert, the input itself a copy
    (identity) expert (LongCat-Flash's "zero-computation experts"). MoE++'s order is zeros, then copies."""
    weight = next(iter(experts.parameters()))
    if weight.is_meta:
        raise refuse(f"its router scores {R} columns and its experts hold {E}; what columns {E}..{R - 1} compute "
                     "cannot be read on meta tensors (load the weights first)")
    n = R - E
    x_ND = torch.randn(n, Din, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(weight.device, weight.dtype)
    # Each token picks its column twice with weight 1/2 each (some expert loops need k > 1): exactly x or 0.
    idx_N2 = torch.arange(E, R, device=weight.device).view(n, 1).expand(n, 2)
    try:
        with torch.no_grad():
            y_ND = experts(x_ND, idx_N2, torch.full((n, 2), 0.5, device=weight.device, dtype=weight.dtype))
    except Exception as e:
        raise refuse(f"its router scores {R} columns and its experts hold {E}; calling the experts "
                     f"({type(experts).__name__}) on columns {E}..{R - 1} failed ({type(e).__name__}: {e})") from None
    kinds = []
    for j in range(n):
        if torch.equal(y_ND[j], x_ND[j]):
            kinds.append("copy")
        elif not bool(y_ND[j].any()):
            kinds.append("zero")
        else:
            raise refuse(f"its router column {E + j} (past its {E} experts) is neither a zero nor an identity "
                         "(copy) expert; moekit's zero-computation experts are those (and MoE++ constants)")
    if kinds != sorted(kinds, key=("zero", "copy").index):
        raise refuse(f"its zero-computation columns are ordered {kinds}; moekit's MoELayer takes zero experts "
                     "before copy experts")
    return kinds.count("zero"), kinds.count("copy")


def _router_weight(child: nn.Module, E: int, D: int) -> tuple[nn.Parameter, nn.Parameter | None] | None:
    """(weight (R, D), logit bias (R,) or None) of a router module: its own weight, or the weight of the
    one Linear(D, R) inside it (`gate.wg`, `router.layer`, `router.classifier`). R = E, or more where
    the router also scores zero-computation experts (read by `_zero_compute_columns`)."""
    def fits(shape, exact: bool) -> bool:
        return len(shape) == 2 and shape[1] == D and (shape[0] == E if exact else shape[0] > E)

    for exact in (True, False):
        own = child._parameters.get("weight")
        if isinstance(own, nn.Parameter) and fits(tuple(own.shape), exact):
            bias = child._parameters.get("bias")
            return own, bias if isinstance(bias, nn.Parameter) and bias.numel() == own.shape[0] else None
        linears = [m for m in child.modules() if isinstance(m, nn.Linear)]
        inner = [m for m in linears if fits((m.out_features, m.in_features), exact)]
        if len(inner) == 1 and (exact or len(linears) == 1):  # more columns: only a lone Linear is a gate
            return inner[0].weight, inner[0].bias
    return None


def _read_parallel(w_in: nn.Module, w_out: nn.Module) -> tuple[dict, ExpertLayout, int, int, int, bool]:
    """JetMoE-style parallel experts: one (E, X, D) and one (E, D, F) weight, X = 2F ([gate; up]) or F."""
    a, b = next(w_in.parameters()), next(w_out.parameters())
    E, X, D = a.shape
    Fdim = b.shape[2]
    gated = X == 2 * Fdim
    return {"gate_up_proj" if gated else "up_proj": a, "down_proj": b}, STANDARD, E, D, Fdim, gated


def _read_listed(experts: nn.Module, refuse) -> tuple[dict, ExpertLayout, int, int, int, Activation, float]:
    """Experts as separate dense MLP modules (Switch Transformers, NLLB-MoE): each one Linear D -> F, an
    activation, one Linear F -> D, and at most one dropout (on the hidden activations, as both families run it;
    its p is returned for MoEConfig.expert_hidden_dropout). The bank holds these Linear modules in place
    (ExpertLayout(listed=True)); the experts' module's own forward is checked on expert 0, in eval mode."""
    mlps = list(experts.children())
    mlps = [m for m in mlps if any(True for _ in m.parameters())]
    lin = [[c for c in m.children() if isinstance(c, nn.Linear)] for m in mlps]
    if not mlps or any(len(pair) != 2 for pair in lin):
        raise refuse(f"its experts ({type(experts).__name__}) are separate modules that are not each one dense MLP of "
                     "two Linear layers (a gated MLP per module is not read; moekit reads gated experts stacked)")
    first_in, first_out = lin[0]
    D, Fdim = first_in.in_features, first_in.out_features
    bias = first_in.bias is not None
    for m, (a, b) in zip(mlps, lin, strict=True):
        if (a.in_features, a.out_features, b.in_features, b.out_features) != (D, Fdim, Fdim, D) or \
                {a.bias is not None, b.bias is not None} != {bias} or \
                sum(p.numel() for p in m.parameters()) != sum(p.numel() for p in (*a.parameters(), *b.parameters())):
            raise refuse(f"its separate expert modules ({type(m).__name__}) are not all Linear(D={D}, F={Fdim}) then "
                         f"Linear(F, D){' with biases' if bias else ''} and nothing else with weights")
    act = next((getattr(mlps[0], n) for n in ("act", "act_fn", "activation_fn") if callable(getattr(mlps[0], n, None))),
               None)
    name = _value_activation(act)
    if name is None:
        raise refuse(f"its experts' activation {type(act).__name__} is none moekit has ({ACTIVATIONS})")
    activation = Activation(name)
    x_ND = torch.randn(4, D, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(first_in.weight.device,
                                                                            first_in.weight.dtype)
    if not first_in.weight.is_meta:
        was = mlps[0].training
        mlps[0].eval()
        with torch.no_grad():
            want = mlps[0](x_ND)
            got = first_out(activation(first_in(x_ND)))
        mlps[0].train(was)
        if not torch.allclose(want, got, atol=1e-5, rtol=1e-5):
            raise refuse(f"its expert module {type(mlps[0]).__name__} does not compute Linear-activation-Linear "
                         f"({name}) on a probe")
    drops = {float(d.p) for m in mlps for d in m.modules() if isinstance(d, nn.Dropout) and d.p > 0}
    if len(drops) > 1 or any(sum(isinstance(d, nn.Dropout) and d.p > 0 for d in m.modules()) > 1 for m in mlps):
        raise refuse(f"its expert modules ({type(mlps[0]).__name__}) hold more than one dropout setting {sorted(drops)}; "
                     "moekit's experts have one, on the hidden activations")
    bank = {"in_proj": nn.ModuleList(a for a, _ in lin), "out_proj": nn.ModuleList(b for _, b in lin)}
    return bank, ExpertLayout(listed=True, bias=bias), len(mlps), D, Fdim, activation, next(iter(drops), 0.0)


def _read_bank(experts: nn.Module, refuse) -> tuple[dict, ExpertLayout, int, int, int, bool]:
    """The experts' tensors for moekit's ExpertBank, their layout, and E, D, F, gated."""
    params = dict(experts.named_parameters())
    leaf = {n.rpartition(".")[2]: p for n, p in params.items()}
    gate_up, up, down = leaf.get("gate_up_proj"), leaf.get("up_proj"), leaf.get("down_proj")
    bank: dict[str, torch.Tensor] = {}
    if gate_up is not None and down is not None and gate_up.dim() == down.dim() == 3:
        # E from the output stack: an input stack may hold spare rows (LongCat-Flash's, for identity experts)
        E, spare = down.shape[0], gate_up.shape[0] - down.shape[0]
        # standard: gate_up (E, 2F, D), down (E, D, F); transposed: gate_up (E, D, 2F), down (E, F, D).
        # The two cannot both fit one pair of shapes; the decorator's flag, where there is one, decides.
        flag = getattr(experts, "is_transposed", None)
        out_t = bool(flag) if flag is not None else tuple(down.shape) == (E, gate_up.shape[2] // 2, gate_up.shape[1])
        D = gate_up.shape[1] if out_t else gate_up.shape[2]
        two_F = gate_up.shape[2] if out_t else gate_up.shape[1]
        Fdim = two_F // 2
        want_down = (E, Fdim, D) if out_t else (E, D, Fdim)
        if two_F % 2 or tuple(down.shape) != want_down or spare < 0:
            raise refuse(f"expert shapes gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)} are "
                         "neither (E, 2F, D), (E, D, F) nor the transposed (E, D, 2F), (E, F, D)")
        interleaved = getattr(experts, "is_concatenated", True) is False
        bank.update(gate_up_proj=gate_up, down_proj=down)
        gated, layout = True, ExpertLayout(in_transposed=out_t, out_transposed=out_t, interleaved=interleaved,
                                           spare=spare)
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
    # An RMSNorm child of the experts normalises each expert's output (Muse Spark's post_expert_norm, which
    # @use_experts_implementation flags has_post_expert_norm): read by read_block, checked by the block probe.
    norms = {id(p) for c in experts.children() if _norm_eps(c, D) is not None for p in c.parameters()}
    unused = sorted(n for n, p in params.items() if not any(p is t for t in bank.values()) and id(p) not in norms)
    if unused:
        raise refuse(f"its experts hold tensors {unused} that moekit's expert bank has no place for")
    return bank, layout, E, D, Fdim, gated


def _value_activation(act: Any) -> str | None:
    """The non-gated activation name ("silu", "gelu", ...) whose function `act` computes, checked by value
    (None if none matches)."""
    if not callable(act):
        return None
    # On the CPU explicitly: under a `with torch.device("meta")` construction the probe would be meta, with no values.
    x = torch.linspace(-6, 6, 49, device="cpu", dtype=torch.float32)
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
    act = next((getattr(experts, n) for n in ("act_fn", "activation_fn", "act", "activation")
                if callable(getattr(experts, n, None))), None)
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
    h = torch.randn(7, 2 * Fdim, generator=g, device="cpu", dtype=torch.float32) * scale  # CPU even under torch.device("meta")
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
    caps = tuple(getattr(config, n, None) for n in ("mlp_gate_softcap", "mlp_up_softcap"))
    candidates = [Activation(name, lim, a, off, layout.interleaved, after)
                  for name, (lim, a, off, after) in itertools.product(names, settings) if a == 1.0 or name == "swiglu"]
    if all(isinstance(c, int | float) and c > 0 for c in caps):  # Inkling2's softcapped SwiGLU, as its config states
        candidates.append(Activation("swiglu", interleaved=layout.interleaved, softcap=(float(caps[0]), float(caps[1]))))
    for cand in candidates:
        got = cand(h)
        if got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5):
            return cand
    raise refuse(f"its experts' gating ({type(experts).__name__}: act {type(act).__name__}) matches none of moekit's "
                 f"gated activations ({', '.join(GATED_ACTIVATIONS)}, with the clamp settings it states: "
                 f"limit={limit}, alpha={alpha}) on a probe")


def _capacity(gate: nn.Module, experts: nn.Module, config: Any, refuse) -> dict[str, Any]:
    """The MoEConfig capacity settings the router states: Switch Transformers' `expert_capacity` (per sequence);
    GShard top-2 gating as fairseq runs it for NLLB-MoE (a `moe_eval_capacity_token_fraction` router: over the
    batch, first choices first; `batch_prioritized_routing`, `normalize_router_prob_before_dropping`) and NLLB's
    `moe_token_dropout` on the expert outputs. The model config's `expert_capacity` comes first: transformers'
    NLLB router overwrites its own attribute with the eval capacity of its last eval forward."""
    value = getattr(gate, "expert_capacity", None)
    if hasattr(gate, "expert_capacity") and hasattr(config, "expert_capacity"):
        value = config.expert_capacity
    out: dict[str, Any] = {"expert_capacity": value if isinstance(value, int) and not isinstance(value, bool) else None}
    fraction = getattr(gate, "moe_eval_capacity_token_fraction", None)
    if not isinstance(fraction, int | float):
        return out
    policy = getattr(gate, "second_expert_policy", "all")
    if policy not in ("all", "sampling") and getattr(gate, "normalize_router_prob_before_dropping", False):
        # the policy that keeps the next best at random (TopKConfig.second_expert; its name is also a router kind's)
        raise refuse(f"its router's second_expert_policy={policy!r} with normalize_router_prob_before_dropping weights "
                     "the kept second expert by its raw probability and the first by its normalised one (transformers); "
                     "fairseq normalises both: moekit runs neither exactly")
    router_dtype = getattr(gate, "dtype", torch.float32)
    if router_dtype != torch.float32:
        raise refuse(f"its router computes its softmax in {router_dtype} (router_dtype); moekit's gate math is fp32")
    dropout = getattr(experts, "moe_token_dropout", None)  # transformers 5.x: on the experts; 4.x: on the block
    return {**out, "capacity_scope": "batch", "eval_capacity_fraction": float(fraction) if fraction > 0 else None,
            "capacity_priority": "score" if getattr(gate, "batch_prioritized_routing", False) else "token",
            "capacity_renormalize": not getattr(gate, "normalize_router_prob_before_dropping", False),
            "expert_dropout": float(dropout or 0.0)}


def _router_reads_padding_mask(gate: nn.Module, E: int, D: int) -> bool:
    """Whether the router's forward takes a padding mask (4-D, as NLLB-MoE's layers pass their attention mask)
    and gives the tokens it masks no expert: read on a copy of it, 4 tokens with the first masked (False on
    meta tensors, where the deferred probe reads the block again)."""
    params = [p for p in inspect.signature(gate.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    weight = next(gate.parameters(), None)
    if len(params) < 2 or "mask" not in params[1].name or weight is None or weight.is_meta:
        return False
    probe = copy.deepcopy(gate).float().eval()
    x_TD = torch.randn(4, D, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(weight.device)
    mask = torch.zeros(1, 1, 4, 4, device=weight.device, dtype=torch.float32)
    mask[..., 0] = torch.finfo(mask.dtype).min  # key 0 is padding
    try:
        with torch.no_grad():
            out = probe(x_TD, mask)
    except Exception:
        return False
    w_TE = next((t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)
                 and t.is_floating_point() and tuple(t.shape) == (4, E)), None)
    return w_TE is not None and not bool(w_TE[0].any()) and bool(w_TE[1:].ne(0).any(-1).all())


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
    # GShard top-2 gating's second-expert policy (NLLB-MoE's `second_expert_policy`; "all": the next best)
    policy = read(("second_expert_policy",), ("second_expert_policy",), "all")
    return RouterConfig(
        kind="topk",
        k=int(k),
        score=score,
        second_expert="top" if policy == "all" else policy,
        normalize=normalize,
        normalize_p=float(normalize_p or 1.0),
        # ERNIE 4.5 divides by clamp(sum, min=moe_norm_min).
        normalize_min=float(read(("norm_min",), ("moe_norm_min",), 0.0)),
        routed_scaling_factor=float(read(("routed_scaling_factor", "router_scaling_factor", "route_scale"),
                                         ("routed_scaling_factor", "router_scaling_factor"), 1.0)),
        n_group=n_group,
        topk_group=topk_group,
        # NOTE: Mixtral jitters the router *and* expert input in training; moekit jitters the router
        # input only (Switch Transformer). Inference is unaffected.
        jitter=float(read(("jitter_noise",), ("router_jitter_noise",), 0.0)),
        # Muse Spark's router multiplies its logits (its own attribute only: configs use the name otherwise too).
        logit_scale=float(read(("output_multiplier",), (), 1.0)),
    )


def call_router(spec: BlockSpec, x_TD: torch.Tensor,
                selection_bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The HF router's own choice on fp32 `x_TD`, run on an fp32 copy of it (the gate is small: E x D):
    (weights (T, K) fp32, expert indices (T, K)), or None where its output does not state a choice
    (a router returning logits only: the block selects). Two conventions: (logits, weights, indices)
    (transformers v5) and dense (T, E) scores with zeros off the chosen experts (Llama 4).
    `selection_bias_E` (E,) fp32, where given, takes the place of the block's selection bias (in the
    copy, or as the argument a block-held bias is passed as): a probe value, the model's is untouched."""
    run = router_caller(spec, selection_bias_E=selection_bias_E)
    out = run(x_TD)
    T, E = x_TD.shape[0], spec.cfg.router_slots
    if isinstance(out, tuple) and len(out) == 5 and isinstance(out[3], list):
        return _grouped_choice(out, T, E)
    if not isinstance(out, tuple) or not all(isinstance(t, torch.Tensor) for t in out):
        return None
    if len(out) == 3 and not out[0].dtype.is_floating_point and tuple(out[0].shape) == (T, E) and \
            tuple(out[1].shape) == (T, 1):
        # (one-hot dispatch mask (T, E), the chosen weight (T, 1), logits (T, E)): Switch Transformers' top-1.
        # A token its capacity dropped has an empty mask row: its choice is the logits' argmax.
        kept_T = out[0].sum(-1) == 1
        idx_T1 = torch.where(kept_T[:, None], out[0].argmax(-1, keepdim=True), out[2].argmax(-1, keepdim=True))
        if not bool((out[0].sum(-1) <= 1).all()) or not bool((idx_T1 == out[2].argmax(-1, keepdim=True)).all()):
            return None
        return out[1].float(), idx_T1
    if len(out) == 3 and not out[0].dtype.is_floating_point and all(tuple(t.shape) == (T, E) for t in out):
        # (top-1 mask (T, E), combine weights (T, E) with zeros off the chosen experts, logits): NLLB-MoE's top-2.
        w_TE = out[1].float()
        picks_T = w_TE.ne(0).sum(-1)
        if not bool((picks_T == picks_T[0]).all()):
            # its capacity dropped some (an eval capacity fraction < 1): one token at a time, where none drops
            w_TE = torch.cat([run(x_TD[t:t + 1])[1].float() for t in range(T)])
            picks_T = w_TE.ne(0).sum(-1)
        if not bool((picks_T == picks_T[0]).all()):
            return None
        return w_TE.topk(int(picks_T[0]), dim=-1)
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


def _grouped_choice(out: tuple, T: int, E: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weights (T, K) fp32, indices (T, K)) from JetMoE's grouped router output (index_sorted_experts (T K,):
    the flattened choice's positions sorted by expert, batch_index, batch_gates (T K,) in that order, expert_size:
    a list of E counts, logits), or None where it is not that."""
    order_N, _, gates_N, sizes_E, _ = out
    if not (isinstance(order_N, torch.Tensor) and isinstance(gates_N, torch.Tensor)) or len(sizes_E) != E:
        return None
    N = order_N.numel()
    if T == 0 or N % T or gates_N.numel() != N or sum(sizes_E) != N:
        return None
    experts_N = torch.repeat_interleave(torch.arange(E, device=order_N.device),
                                        torch.tensor(sizes_E, device=order_N.device))
    idx_N = torch.empty(N, dtype=torch.int64, device=order_N.device)
    w_N = torch.empty(N, dtype=torch.float32, device=order_N.device)
    idx_N[order_N], w_N[order_N] = experts_N, gates_N.float()
    return w_N.view(T, N // T), idx_N.view(T, N // T)


def _router_readings(spec: BlockSpec) -> list[RouterConfig]:
    """The routing rules the attributes leave possible, the attributes' own reading first: softmax or
    sigmoid, renormalised or not, a group scored by its best expert or its best two (where there are
    groups), the selection bias added to the scores or to the logits (where there is one)."""
    router, E = spec.cfg.router, spec.cfg.router_slots
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
    # Last, gpt-oss's rule (a softmax over the top k of the logits): the same experts and weights as the
    # renormalised top k of the softmax but where probabilities tie (underflow, or a near-zero init whose
    # logits differ by ~1e-10), which only picking on the logits reproduces.
    readings += [after for r in list(readings) if getattr(r, "softmax_after_topk", True) is False
                 and r.score == "softmax" and r.normalizes()
                 and (after := _valid(dataclasses.replace(r, softmax_after_topk=True), E)) is not None]
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
        x_TD = torch.randn(ROUTER_PROBE_TOKENS, cfg.d_model, generator=gen, dtype=torch.float32)
        x_TD = x_TD.to(spec.router_weight.device)
        bias_E = None
        if spec.selection_bias is not None:
            # A random model's selection bias is zero, which cannot tell where the bias is added: probe with
            # one the size of the logits' spread (the same value on both sides).
            spread = torch.nn.functional.linear(x_TD, spec.router_weight.float()).std()
            bias_E = torch.randn(cfg.router_slots, generator=gen, dtype=torch.float32).to(x_TD.device) * spread
        hf = call_router(spec, x_TD, bias_E)
        if hf is not None and hf[1].shape[-1] != cfg.router.k and 1 <= hf[1].shape[-1] <= cfg.router_slots:
            # no attribute states k (Switch Transformers' top-1 router): the router's own choice does
            spec.cfg = cfg = dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, k=int(hf[1].shape[-1])))
            readings = _router_readings(spec)
        if hf is not None:
            # In order, up to the first reading that reproduces the router (a large model's gate is
            # E x D per layer: no reading is run after that one).
            scaled = []
            for r in readings:
                c = router_weight_ratio(spec, r, x_TD, hf, bias_E)
                if c == 1.0:
                    scaled = [(_bitwise_reading(spec, r, x_TD, hf, bias_E), 1.0)]
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


def router_caller(spec: BlockSpec, dtype: torch.dtype = torch.float32,
                  selection_bias_E: torch.Tensor | None = None):
    """run(x_TD) -> the HF router's raw output on `x_TD` (T, D), or None where the call raises; run on one copy
    of the router in `dtype` (the gate is small: E x D; the model's own gate is untouched), in eval mode.
    The input is cast to `dtype`; a hash router gets probe token ids, a selection bias the block holds and
    passes in is passed (in `dtype`). A sampled second expert (NLLB's "sampling", "random"; in eval too) is
    set to the deterministic "all". `selection_bias_E` (E,), where given, takes the place of the block's
    selection bias (see call_router)."""
    gate = copy.deepcopy(spec.gate).to(dtype).eval()  # the rule itself (no jitter, no training-mode capacity)
    if getattr(gate, "second_expert_policy", "all") != "all":
        # the probe compares the deterministic rule ("all", moekit's second_expert="top"); the draws are
        # checked by their distribution in tests
        gate.second_expert_policy = "all"
    E = spec.cfg.router_slots  # router columns: the experts and any zero-computation ones
    if selection_bias_E is not None:
        with torch.no_grad():
            for n, t in itertools.chain(gate.named_buffers(), gate.named_parameters()):
                if n.rpartition(".")[2] in _SELECTION_BIAS_NAMES and t.numel() == E:
                    t.copy_(selection_bias_E.reshape(t.shape))
    params = [p for p in inspect.signature(gate.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]

    def run(x_TD: torch.Tensor):
        args = [x_TD.to(dtype)]
        if len(params) >= 2 and params[1].name == "input_ids":
            args.append(probe_token_ids(spec, x_TD.shape[0], x_TD.device))  # a hash router (DeepSeek-V4)
        elif len(params) >= 2 and spec.selection_bias is not None:
            # a selection bias the block holds and passes in
            args.append((spec.selection_bias if selection_bias_E is None else selection_bias_E).to(dtype))
        try:
            with torch.no_grad():
                return gate(*args)
        except Exception:
            return None

    return run


# The calls a router's gate may run as (F.linear, which nn.Linear calls, or a matmul / einsum of the weight)
_MATMULS = frozenset((torch.nn.functional.linear, torch.matmul, torch.mm, torch.addmm, torch.einsum, torch.bmm,
                      torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm))


class _GateMatmulDtypes(torch.overrides.TorchFunctionMode):
    """Records the output dtype of every matmul-like call (`_MATMULS`) that one of whose tensors has the gate's shape
    (E, D) or its transpose and that succeeds: the dtype the router runs its gate in, whatever it casts on the way
    (`.float()`, `.type(torch.float32)`, `.to(self.weight.dtype)`)."""

    def __init__(self, shape: tuple[int, int]):
        super().__init__()
        self.shapes = (shape, shape[::-1])
        self.dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS and isinstance(out, torch.Tensor) and any(
                isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes for t in (*args, *(kwargs or {}).values())):
            self.dtypes.append(out.dtype)
        return out


def hf_gate_dtype(spec: BlockSpec) -> str:
    """The `RouterConfig.gate_dtype` of the HF router: "weight" where it runs its gate linear in the model dtype
    (`F.linear(hidden_states, self.weight)`: Mixtral, Qwen3-MoE, OLMoE, gpt-oss, ...; HunYuan's in its weight's
    dtype), "float32" where it upcasts first (`F.linear(hidden_states.type(torch.float32),
    self.weight.type(torch.float32))`: DeepSeek-V2/V3, GLM-4.5, ERNIE 4.5, ...). Read from the router's own call on
    a bf16 copy of it and a bf16 probe input: "weight" where the first matmul of its (E, D) weight gives bf16, so no
    family needs a table entry (meta tensors carry dtypes: a model built on the meta device reads the same).
    "float32" otherwise: that matmul gives fp32, or the call fails (Inkling 2 upcasts its input and not its weight,
    which transformers keeps in fp32), or the router cannot be called alone (moekit's own rule). The input is
    (T, D), or (1, T, D) for a router that takes the batch dims (AFMoE's)."""
    x_TD = torch.randn(3, spec.cfg.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x_TD = x_TD.to(spec.router_weight.device)
    run = router_caller(spec, torch.bfloat16)
    for x in (x_TD, x_TD[None]):
        seen = _GateMatmulDtypes(tuple(spec.router_weight.shape))
        with seen:
            run(x)
        if seen.dtypes:
            return "weight" if seen.dtypes[0] == torch.bfloat16 else "float32"
    return "float32"


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
    aligned = _same_experts(hf, *_reading_choice(spec, router_cfg, x_TD, selection_bias_E))
    if aligned is None:
        return None
    hf_w_TK, w_TK = aligned
    if torch.allclose(hf_w_TK, w_TK, rtol=1e-5, atol=1e-6):
        return 1.0
    total = float(hf_w_TK.sum())
    c = float(f"{float(w_TK.sum()) / total:.6g}") if total > 0 else 0.0  # 2.0, not 1.9999998
    return c if c > 0 and torch.allclose(hf_w_TK * c, w_TK, rtol=1e-5, atol=1e-6) else None


def _bitwise_reading(spec: BlockSpec, router_cfg: RouterConfig, x_TD: torch.Tensor,
                     hf: tuple[torch.Tensor, torch.Tensor], selection_bias_E: torch.Tensor | None) -> RouterConfig:
    """`router_cfg` (a reading that reproduces the HF router within 1e-5), or its softmax-after-top-k form
    where that one reproduces it bit for bit and `router_cfg` does not (gpt-oss: a softmax over the k chosen
    logits, not the renormalised top k of the softmax)."""
    if getattr(router_cfg, "softmax_after_topk", True):  # already that form, or a rule without it
        return router_cfg
    after = _valid(dataclasses.replace(router_cfg, softmax_after_topk=True), spec.cfg.router_slots)
    if after is None:
        return router_cfg

    def exact(cfg: RouterConfig) -> bool:
        aligned = _same_experts(hf, *_reading_choice(spec, cfg, x_TD, selection_bias_E))
        return aligned is not None and torch.equal(aligned[0].float(), aligned[1])

    return after if not exact(router_cfg) and exact(after) else router_cfg


def _same_experts(hf: tuple[torch.Tensor, torch.Tensor], idx_TK: torch.Tensor,
                  w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(hf_w_TK, w_TK), each token's weights in the order of its expert ids, where moekit's choice (idx_TK, w_TK)
    picks the same experts as the HF router's `hf` (weights, indices) for every token; None otherwise."""
    hf_w_TK, hf_idx_TK = hf
    if idx_TK.shape != hf_idx_TK.shape:
        return None
    hf_order, order = hf_idx_TK.argsort(-1), idx_TK.argsort(-1)
    if not bool((hf_idx_TK.gather(1, hf_order) == idx_TK.gather(1, order)).all()):
        return None
    return hf_w_TK.gather(1, hf_order), w_TK.gather(1, order)


def _reading_choice(spec: BlockSpec, router_cfg: RouterConfig, x_TD: torch.Tensor,
                    selection_bias_E: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """moekit's choice (idx_TK, w_TK) with `router_cfg` on the block's gate for the probe tokens x_TD."""
    from moekit.routers import router_class

    E, D = spec.cfg.router_slots, spec.cfg.d_model
    if getattr(router_cfg, "second_expert", "top") != "top":  # the deterministic rule, as `call_router` probes it
        router_cfg = dataclasses.replace(router_cfg, second_expert="top")
    # the rule free of rounding: `call_router` runs an fp32 copy of the HF router, so the gate runs in fp32 here too
    router_cfg = dataclasses.replace(router_cfg, gate_dtype="float32")
    with torch.device("meta"):
        router = router_class(router_cfg.kind)(router_cfg, D, E)
    router.eval()  # a training-mode router would jitter its input (Switch's router_jitter_noise)
    router.weight = spec.router_weight
    router.bias = spec.router_bias
    for name, tensor in spec.router_tensors.items():
        setattr(router, name, tensor)
    if selection_bias_E is not None:
        router.e_score_correction_bias = selection_bias_E
    elif spec.selection_bias is not None:
        router.e_score_correction_bias = spec.selection_bias
    else:
        router.e_score_correction_bias = torch.zeros(E, device=x_TD.device, dtype=torch.float32)
    router.eval()  # the rule itself (a training-mode router may sample, SparseMixer)
    ids = probe_token_ids(spec, x_TD.shape[0], x_TD.device) if router_cfg.routes_on_token_ids() else None
    with torch.no_grad():
        return router(x_TD, state=ids).to_padded()


def router_matches(spec: BlockSpec, router_cfg: RouterConfig, x_TD: torch.Tensor,
                   hf: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether moekit's router with `router_cfg` on the block's gate picks the same experts as the HF
    router's choice `hf` for every token of `x_TD`, with the same weights times the block's
    `router_weight_scale` (fp32, 1e-5)."""
    c = router_weight_ratio(spec, router_cfg, x_TD, hf)
    return c is not None and abs(c - spec.router_weight_scale) <= 1e-5 * spec.router_weight_scale
