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
`norm_topk_prob`, `routed_scaling_factor`, `num_group`/`n_group`, `topk_group`), then the model config
(`num_experts_per_tok`, `norm_topk_prob`, `scoring_func`, ...). Settings no attribute states (whether
the chosen weights are renormalised; softmax or sigmoid scores) are then read from the router's own
output on a probe input, where it returns its choice ((logits, weights, indices), or dense (T, E)
scores). Rules still ambiguous after that (the routing weight applied to the experts' input, Llama 4)
become ordered alternatives that `moekit.hf.wrap` checks against the block's own forward; one that
reproduces it exactly is kept, and a block none reproduces is refused, never run differently.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
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
    own = [n for n, t in itertools.chain(block.named_parameters(recurse=False), block.named_buffers(recurse=False))
           if t is not selection_bias]
    if own:
        raise refuse(f"it holds tensors {own} directly that are no selection bias (E,) moekit knows")

    # --- shared expert (always on), optionally sigmoid-gated
    width = 0
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
    if shared_gate is not None and (shared is None or shared_gate.bias is not None):
        raise refuse("its shared-expert gate is not a Linear(D, 1) without bias gating a shared expert")

    config = getattr(experts, "config", None) or getattr(block, "config", None) or model_config
    router = _router_config(block, gate, config, selection_bias is not None)
    n_shared = getattr(config, "n_shared_experts", None) or 1
    cfg = MoEConfig(d_model=D, d_expert=Fdim, num_experts=E, router=router, activation=activation.name,
                    activation_limit=activation.limit, activation_alpha=activation.alpha,
                    activation_up_offset=activation.up_offset,
                    num_shared_experts=n_shared if shared is not None else 0, d_shared=width or None,
                    shared_gate=shared_gate is not None, backend=backend)
    try:
        with warnings.catch_warnings():  # a first reading, settled below; not a setting the user chose
            warnings.simplefilter("ignore")
            cfg.validate()
    except ValueError as e:
        raise refuse(f"its routing rule ({router.describe()}) is not one moekit can run: {e}") from e
    spec = BlockSpec(block, gate, router_weight, router_bias, selection_bias, experts, bank, layout, activation,
                     shared, shared_gate, cfg)
    _read_rule_from_router(spec)
    return spec


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
    # On the CPU explicitly: under a `with torch.device("meta")` construction the probe would be meta, with no values.
    x = torch.linspace(-6, 6, 49, device="cpu")
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
    alpha = next((v for v in (getattr(experts, "alpha", None), getattr(config, "swiglu_alpha", None))
                  if isinstance(v, int | float)), None)
    g = torch.Generator().manual_seed(0)
    scale = max(3.0, 2.0 * float(limit or 0))
    h = torch.randn(7, 2 * Fdim, generator=g, device="cpu") * scale  # CPU even under torch.device("meta")
    try:
        with torch.no_grad():
            want = apply_gate(h)
    except Exception as e:
        raise refuse(f"its experts' gating could not be probed ({type(e).__name__}: {e})") from None
    base = _GATED_OF.get(_value_activation(act))
    names = [base] if base else []
    names += [n for n in GATED_ACTIVATIONS if n not in names]
    settings = [(None, 1.0, 0.0)]
    if limit is not None:
        settings += [(float(limit), 1.0, 0.0), (float(limit), 1.0, 1.0)]
        if alpha is not None:
            settings += [(float(limit), float(alpha), 1.0), (float(limit), float(alpha), 0.0)]
    for name, (lim, a, off) in itertools.product(names, settings):
        if a != 1.0 and name != "swiglu":
            continue
        cand = Activation(name, lim, a, off, layout.interleaved)
        got = cand(h)
        if got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5):
            return cand
    raise refuse(f"its experts' gating ({type(experts).__name__}: act {type(act).__name__}) matches none of moekit's "
                 f"gated activations ({', '.join(GATED_ACTIVATIONS)}, with the clamp settings it states: "
                 f"limit={limit}, alpha={alpha}) on a probe")


def _router_config(block: nn.Module, gate: nn.Module, config: Any, has_selection_bias: bool) -> RouterConfig:
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
    return RouterConfig(
        kind="topk",
        k=int(k),
        score=score,
        normalize=bool(read(("norm_topk_prob",), ("norm_topk_prob",), True)),
        routed_scaling_factor=float(read(("routed_scaling_factor", "router_scaling_factor"),
                                         ("routed_scaling_factor", "router_scaling_factor"), 1.0)),
        n_group=n_group,
        topk_group=topk_group,
        # NOTE: Mixtral jitters the router *and* expert input in training; moekit jitters the router
        # input only (Switch Transformer). Inference is unaffected.
        jitter=float(read(("jitter_noise",), ("router_jitter_noise",), 0.0)),
    )


def call_router(spec: BlockSpec, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The HF router's own choice on fp32 `x_TD`, run on an fp32 copy of it (the gate is small: E x D):
    (weights (T, K) fp32, expert indices (T, K)), or None where its output does not state a choice
    (a router returning logits only: the block selects). Two conventions: (logits, weights, indices)
    (transformers v5) and dense (T, E) scores with zeros off the chosen experts (Llama 4)."""
    gate = copy.deepcopy(spec.gate).float()
    args = [x_TD]
    params = [p for p in inspect.signature(gate.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(params) >= 2 and spec.selection_bias is not None:
        args.append(spec.selection_bias.float())  # a selection bias the block holds and passes in
    try:
        with torch.no_grad():
            out = gate(*args)
    except Exception:
        return None
    if not isinstance(out, tuple) or not all(isinstance(t, torch.Tensor) for t in out):
        return None
    T, E = x_TD.shape[0], spec.cfg.num_experts
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


def _read_rule_from_router(spec: BlockSpec) -> None:
    """Settle what the attributes leave open (renormalisation, softmax or sigmoid) from the router's own
    choice on a probe, and list the readings still open (the weight on the experts' input) as
    alternatives for the block probe. Nothing is decided on meta tensors (no values to read)."""
    cfg = spec.cfg
    router = cfg.router
    readings = []
    for score, normalize in ((router.score, router.normalize), (router.score, not router.normalize),
                             ({"softmax": "sigmoid"}.get(router.score, "softmax"), router.normalize),
                             ({"softmax": "sigmoid"}.get(router.score, "softmax"), not router.normalize)):
        try:
            with warnings.catch_warnings():  # a candidate, not the user's setting (e.g. k=1 renormalised)
                warnings.simplefilter("ignore")
                r = dataclasses.replace(router, score=score, normalize=normalize).validate(cfg.num_experts)
        except ValueError:
            continue
        readings.append(r)
    if not spec.router_weight.is_meta:
        x_TD = torch.randn(PROBE_TOKENS, cfg.d_model, generator=torch.Generator().manual_seed(0))
        x_TD = x_TD.to(spec.router_weight.device)
        hf = call_router(spec, x_TD)
        if hf is not None:
            matching = [r for r in readings if router_matches(spec, r, x_TD, hf)]
            readings = matching or readings[:1]  # none: the first, which the probe then refuses with its reason
    configs = [dataclasses.replace(cfg, router=r, weight_on_input=w) for r in readings[:1] for w in (False, True)]
    configs += [dataclasses.replace(cfg, router=r) for r in readings[1:]]
    spec.cfg, spec.alternatives = configs[0], configs[1:]


def router_matches(spec: BlockSpec, router_cfg: RouterConfig, x_TD: torch.Tensor,
                   hf: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether moekit's router with `router_cfg` on the block's gate picks the same experts as the HF
    router's choice `hf` for every token of `x_TD`, with the same weights (fp32, 1e-5)."""
    from moekit.routers import router_class

    E, D = spec.cfg.num_experts, spec.cfg.d_model
    with torch.device("meta"):
        router = router_class(router_cfg.kind)(router_cfg, D, E)
    router.weight = spec.router_weight
    router.bias = spec.router_bias
    if spec.selection_bias is not None:
        router.e_score_correction_bias = spec.selection_bias
    else:
        router.e_score_correction_bias = torch.zeros(E, device=x_TD.device)
    with torch.no_grad():
        idx_TK, w_TK = router(x_TD).to_padded()
    hf_w_TK, hf_idx_TK = hf
    if idx_TK.shape != hf_idx_TK.shape:
        return False
    hf_order, order = hf_idx_TK.argsort(-1), idx_TK.argsort(-1)
    same_idx = (hf_idx_TK.gather(1, hf_order) == idx_TK.gather(1, order)).all()
    same_w = torch.allclose(hf_w_TK.gather(1, hf_order), w_TK.gather(1, order), rtol=1e-5, atol=1e-6)
    return bool(same_idx) and same_w
