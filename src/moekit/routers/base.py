"""The routing contract: every router returns a ragged token -> expert assignment.

Legend: T tokens, D model dim, E experts, N assignments (N = T*K for top-k, varies
otherwise), K experts per token (K_max for a padded view).

A router maps `x_TD` to a `RouterOutput`:
  token_idx_N  (N,) int64   which token
  expert_idx_N (N,) int64   which expert
  weight_N     (N,) float   combine weight (fp32)
  scores_TE    (T, E) fp32  full router probabilities (for losses and analysis)
  logits_TE    (T, E) fp32  raw router logits
  aux          dict[str, Tensor]  auxiliary losses (returned, never global)
  extras       RouteExtras        router-specific extras in one typed place: null experts' probabilities
               and picks (AdaMoE: null picks are never in the assignment, they cost nothing and output
               nothing) and the routing state for the next layer (RMoE)
A RouterOutput is immutable (a frozen dataclass whose `aux` is a read-only `FrozenAux`): `keep` and
`dataclasses.replace` make new ones.

Padding is an encoding detail for analysis only (`to_padded`); dispatch reads the
ragged triples, so a token using one expert costs one expert's FLOPs.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from moekit.config import RouterConfig
from moekit.utils.counts import count_ids


class FrozenAux(Mapping):
    """A read-only name -> tensor mapping (the aux losses of a RouterOutput or RoutingInfo): a frozen
    dataclass holding a dict would still let `out.aux[name] = ...` change what every holder sees.
    Copies and pickles like the dict it wraps."""

    __slots__ = ("_d",)

    def __init__(self, items: Mapping[str, torch.Tensor] = ()):
        self._d = dict(items)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._d[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"FrozenAux({self._d!r})"

    def __reduce__(self):
        return (FrozenAux, (self._d,))


@dataclass(frozen=True)
class RouteExtras:
    """Router-specific parts of a RouterOutput (None where a router has none).

    null_scores_TM (T, M) fp32: probabilities of M parameter-free null experts (AdaMoE).
    null_picks_T   (T,) int64: picks of null experts per token (never dispatched).
    state: the routing state for the next MoE layer (RMoE's `RecurrentState`).
    shared_weight_TS (T, S) fp32: the weights of S router-weighted shared experts (router columns past
        the experts that every token takes; Inkling), which the layer's shared bank applies.
    """

    null_scores_TM: torch.Tensor | None = None
    null_picks_T: torch.Tensor | None = None
    state: Any = None
    shared_weight_TS: torch.Tensor | None = None

    def detached(self) -> RouteExtras:
        """Without autograd history, and without the state (RoutingInfo.router_state hands that on)."""
        null = None if self.null_scores_TM is None else self.null_scores_TM.detach()
        shared = None if self.shared_weight_TS is None else self.shared_weight_TS.detach()
        return dataclasses.replace(self, null_scores_TM=null, state=None, shared_weight_TS=shared)


NO_EXTRAS = RouteExtras()


@dataclass(frozen=True)
class RouterOutput:
    token_idx_N: torch.Tensor
    expert_idx_N: torch.Tensor
    weight_N: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor
    aux: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # A shared immutable default, not default_factory: torch.compile cannot trace the factory call.
    extras: RouteExtras = field(default=NO_EXTRAS)

    def __post_init__(self):
        if not isinstance(self.aux, FrozenAux) and not torch.compiler.is_compiling():
            # (inside torch.compile / torch.export the plain dict stays: dynamo cannot rebuild a FrozenAux that
            # leaves the graph in the layer's routing info)
            object.__setattr__(self, "aux", FrozenAux(self.aux))

    @property
    def num_tokens(self) -> int:
        return self.scores_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.scores_TE.shape[1]

    @property
    def num_assignments(self) -> int:
        return self.token_idx_N.numel()

    def counts_E(self) -> torch.Tensor:
        """Assignments per expert (int64)."""
        return count_ids(self.expert_idx_N, self.num_experts)

    def experts_per_token_T(self) -> torch.Tensor:
        """How many experts each token uses (int64; 0 is possible for expert choice or null experts)."""
        return count_ids(self.token_idx_N, self.num_tokens)

    def to_padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """View as padded `(T, K_max)` expert ids (-1 = padding) and weights (0 = padding), for analysis.

        Within a token, assignments keep their order in the ragged arrays.
        """
        T = self.num_tokens
        per_token_T = self.experts_per_token_T()
        K_max = int(per_token_T.max()) if T > 0 and self.num_assignments > 0 else 0
        idx_TK = torch.full((T, K_max), -1, dtype=torch.int64, device=self.token_idx_N.device)
        w_TK = torch.zeros((T, K_max), dtype=self.weight_N.dtype, device=self.weight_N.device)
        if self.num_assignments:
            order_N = torch.argsort(self.token_idx_N, stable=True)
            tok_N = self.token_idx_N[order_N]
            starts_T = torch.cumsum(per_token_T, 0) - per_token_T
            slot_N = torch.arange(tok_N.numel(), device=tok_N.device) - starts_T[tok_N]
            idx_TK[tok_N, slot_N] = self.expert_idx_N[order_N]
            w_TK[tok_N, slot_N] = self.weight_N[order_N].detach()
        return idx_TK, w_TK

    @staticmethod
    def from_topk(
        idx_TK: torch.Tensor, w_TK: torch.Tensor, scores_TE: torch.Tensor, logits_TE: torch.Tensor
    ) -> RouterOutput:
        """Build the ragged form of a dense top-k selection (token-major order)."""
        T, K = idx_TK.shape
        token_idx_N = torch.arange(T, device=idx_TK.device).repeat_interleave(K)
        return RouterOutput(token_idx_N, idx_TK.reshape(-1), w_TK.reshape(-1), scores_TE, logits_TE, {}, NO_EXTRAS)

    def keep(self, mask_N: torch.Tensor) -> RouterOutput:
        """A copy with only the assignments where `mask_N` is true."""
        return dataclasses.replace(self, token_idx_N=self.token_idx_N[mask_N],
                                   expert_idx_N=self.expert_idx_N[mask_N], weight_N=self.weight_N[mask_N])

    def detached(self) -> RouterOutput:
        """A copy without autograd history and without aux losses (what RoutingInfo keeps); itself when it has
        neither (immutable, so nothing can tell: inference keeps the router's output as it is)."""
        if (self.extras is NO_EXTRAS and not self.aux and not self.weight_N.requires_grad
                and not self.scores_TE.requires_grad and not self.logits_TE.requires_grad):
            return self
        return RouterOutput(self.token_idx_N, self.expert_idx_N, self.weight_N.detach(), self.scores_TE.detach(),
                            self.logits_TE.detach(), {}, self.extras.detached())


@dataclass(frozen=True)
class StepCounts:
    """One MoE layer's routing over an optimiser step (all micro-batches; summed over the ranks of the
    tracker's process group), handed to `Router.after_optimizer_step`.

    executed_E (E,) int64: executed assignments per expert (after capacity dropping).
    chosen_E   (E,) int64: the router's own choices per expert over valid tokens (before dropping).
    tokens: valid tokens routed.
    """

    executed_E: torch.Tensor
    chosen_E: torch.Tensor
    tokens: int


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One UserWarning per process and key (configs are validated many times)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def warn_if_k1_normalized(cfg: RouterConfig) -> None:
    """An explicit normalize=True with k = 1 makes every weight exactly 1.0: the task loss then gives
    the gate no gradient and only the aux losses train it (Switch Transformer uses the raw probability)."""
    if cfg.normalize and cfg.k == 1:
        warn_once("k1-normalize", "RouterConfig(normalize=True, k=1): a renormalised single weight is always "
                  "exactly 1.0, so the task loss gives the router no gradient (only aux losses train it); "
                  "leave normalize=None (raw probability, as Switch Transformer) unless this is intended")


class RouterInputNorm(nn.Module):
    """x_TD / rms(x_TD) * scale_D * multiplier, in fp32: transformers' Gemma4TextRouter's input (an RMS norm
    without weight, `eps` inside the root, then its learned `scale` (D,) and D^-0.5), before its gate.
    `scale` is the pretrained model's own Parameter (moekit.hf binds it; nothing is copied)."""

    def __init__(self, scale_D: nn.Parameter, eps: float, multiplier: float = 1.0):
        super().__init__()
        self.scale = scale_D
        self.eps = eps
        self.multiplier = multiplier

    def forward(self, x_TD: torch.Tensor, in_input_dtype: bool = False) -> torch.Tensor:
        """(T, D) fp32; with `in_input_dtype`, (T, D) in x_TD's dtype: the norm rounded to it, then scaled in it,
        as transformers' Gemma4TextRouter runs in a bf16 model (Gemma4RMSNorm returns `type_as(hidden_states)`)."""
        # the same operations in the same order as transformers' Gemma4RMSNorm and Gemma4TextRouter
        x32_TD = x_TD.float()
        normed_TD = x32_TD * torch.pow(x32_TD.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if in_input_dtype:  # the norm's `type_as(hidden_states)`, then the router's scaling in that dtype
            return normed_TD.to(x_TD.dtype) * self.scale * self.multiplier
        return normed_TD * self.scale.float() * self.multiplier

    def extra_repr(self) -> str:
        return f"d={self.scale.shape[0]}, eps={self.eps:g}, multiplier={self.multiplier:g}"


class Router(nn.Module):
    """Base class: a linear gate `weight` (E, D) (and optionally a logit `bias` (E,)) in the transformers
    layout plus a selection rule.

    Subclasses implement `select(logits_TE, x_TD, valid_T)`; the base computes fp32 logits (the linear in
    fp32, or in the weight's dtype with `cfg.gate_dtype` "weight": `gate_linear`). Each
    router is registered with its own config class (`moekit.routers.register(name, config=...)`),
    which answers what callers need to know about the rule (see `RouterConfig`).

    `expert_mask_E` (int8 (E,) or None; set by `moekit.mask_experts`): -1 disabled, +1 forced,
    0 free. The base applies "disabled" for every router whose logits go through `forward`;
    "forced" needs the selection rule to rank forced experts first (`RouterConfig.check_expert_mask`).

    `valid_T` (bool (T,) or None): which tokens are real. Token-choice rules pick per token, so
    padding cannot change another token's experts and the layer simply drops padding assignments
    afterwards; a rule whose choice for a token depends on the other tokens (expert choice) must
    exclude padding *before* it selects.

    `state`: the routing state handed from the previous MoE layer; routers that carry none ignore it.

    `expert_tensors` names the parameters and buffers that hold one row per routed expert (the gate
    rows, a selection bias): removing an expert (moekit.compress) removes its row from each.

    Two parts a pretrained router may have (transformers' Gemma 4; moekit's own routers have neither),
    kept across `moekit.route(kind=...)` by `adopt`: `input_norm` (a module, or None) transforms the
    router's input before the gate (`RouterInputNorm`), and `expert_scale` (E,) (or None) multiplies
    each pick's combine weight by its expert's scale, after the selection rule.

    Buffers named in `fp32_buffers` (routing state such as a selection bias) stay fp32 when the
    module is cast (`.to(torch.bfloat16)`, `.half()`): rounding them would re-route tokens and swallow
    small updates (transformers keeps DeepSeek-V3's `e_score_correction_bias` in fp32 the same way).
    """

    kind: ClassVar[str] = "base"
    config_class: ClassVar[type[RouterConfig]] = RouterConfig
    fp32_buffers: ClassVar[tuple[str, ...]] = ()
    # Parameters and buffers with one row (dim 0) per routed expert: what pruning removes with an expert.
    expert_tensors: ClassVar[tuple[str, ...]] = ("weight", "expert_scale")

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        cfg.validate(num_experts)
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)
        # An additive logit bias (E,) where a pretrained router has one (gpt-oss); moekit's own routers have none.
        self.register_parameter("bias", None)
        # Gemma 4's router parts (see the class doc); None for moekit's own routers.
        self.register_module("input_norm", None)
        self.register_parameter("expert_scale", None)
        self.expert_mask_E: torch.Tensor | None = None

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The gate's logits (T, E) fp32 for `x_TD` (T, D): see `gate_linear`."""
        return self.gate_linear(x_TD, self.weight, self.bias)

    def gate_linear(self, x_TD: torch.Tensor, w_XD: torch.Tensor, b_X: torch.Tensor | None) -> torch.Tensor:
        """x_TD @ w_XD^T + b_X as fp32 logits (T, X), in the dtype `cfg.gate_dtype` names: "float32" (moekit's
        default: gate math in fp32 whatever the model dtype, docs/routing.md "Precision"), or "weight": in the gate
        weight's dtype, then upcast, as transformers' routers that run `F.linear(hidden_states, self.weight)` in
        the model dtype (Mixtral, Qwen3-MoE, gpt-oss; their softmax then upcasts; HunYuan's, whose weight
        transformers builds in fp32, in fp32 until the model is cast): in bf16 the logits are rounded to bf16
        first, so exact ties pick the experts they pick there."""
        dtype = w_XD.dtype if self.cfg.gate_dtype == "weight" else torch.float32
        if x_TD.dtype != dtype:  # (.to() of a tensor already in that dtype still costs a call)
            x_TD = x_TD.to(dtype)
        if w_XD.dtype != dtype:
            w_XD = w_XD.to(dtype)
        if b_X is not None and b_X.dtype != dtype:
            b_X = b_X.to(dtype)
        logits_TX = torch.nn.functional.linear(x_TD, w_XD, b_X)
        return logits_TX if logits_TX.dtype == torch.float32 else logits_TX.float()

    def scaled(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """The logits times `cfg.logit_scale` (Muse Spark's router output multiplier; 1: unchanged)."""
        return logits_TE if self.cfg.logit_scale == 1.0 else logits_TE * self.cfg.logit_scale

    def jittered(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Switch Transformer input jitter in training: x * U(1 - eps, 1 + eps)."""
        if self.training and self.cfg.jitter > 0:
            eps = self.cfg.jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return x_TD

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None, state: Any = None,
                logit_bias_TE: torch.Tensor | None = None) -> RouterOutput:
        """`logit_bias_TE` (T, E) fp32 is added to the logits before selection (MoE++'s gating residual,
        arXiv 2410.07348, which the layer computes from the previous MoE layer's logits)."""
        x_TD = self.gate_input(self.jittered(x_TD))
        logits_TE = self.scaled(self.logits(x_TD))
        if logit_bias_TE is not None:
            logits_TE = logits_TE + logit_bias_TE
        if self.expert_mask_E is None:
            return self.scale_weights(self.select(logits_TE, x_TD, valid_T))
        # Expert masks (MoTE, arXiv 2502.11096): a disabled expert's logit is -inf before selection.
        # Columns past E (null experts) are never masked.
        disabled_E = self.expert_mask_E < 0
        disabled_X = nn.functional.pad(disabled_E, (0, logits_TE.shape[-1] - self.num_experts))
        route = self.select(logits_TE.masked_fill(disabled_X, float("-inf")), x_TD, valid_T)
        # Every rule gives a disabled expert zero weight, but some can still pick one (top-p with p=1,
        # min_k, fewer enabled experts than k): drop those picks so that a disabled expert never runs.
        return self.scale_weights(route.keep(~disabled_E[route.expert_idx_N]))

    def dense_choice(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The rule's choice for every token as dense tensors, for MoELayer's inference path: (idx_TK int64
        (T, K), w_TK fp32 (T, K) combine weights, scores_TE fp32, logits_TE fp32), the same values `forward`
        (no padding, state or logit bias) gives as a RouterOutput in token-major order; None where the rule
        does not give every token the same K experts without extras (the layer then calls `forward`).
        Default: None."""
        return None

    def dense_weights_descending(self) -> bool:
        """Whether `dense_choice`'s w_TK comes in descending order within each token, so a caller that needs that
        order (gpt-oss's block returns its weights so) need not sort them. Default: False."""
        return False

    def gate_input(self, x_TD: torch.Tensor) -> torch.Tensor:
        """What the gate reads: `x_TD`, or `input_norm(x_TD)` where the router has an input norm: in fp32, or
        in x_TD's dtype where the gate runs in the model dtype (`cfg.gate_dtype` "weight", see `RouterInputNorm`)."""
        if self.input_norm is None:
            return x_TD
        return self.input_norm(x_TD, in_input_dtype=self.cfg.gate_dtype == "weight")

    def scale_weights(self, route: RouterOutput) -> RouterOutput:
        """`route` with each pick's weight times its expert's `expert_scale` (Gemma 4's per_expert_scale,
        applied after the rule's own normalisation), or unchanged where the router has none."""
        if self.expert_scale is None:
            return route
        return dataclasses.replace(route, weight_N=route.weight_N * self.expert_scale.float()[route.expert_idx_N])

    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> RouterOutput:
        raise NotImplementedError

    def check_reroute(self, cfg: RouterConfig) -> None:
        """Raise UsageError where this router, given `cfg` (its own kind, fields changed by `moekit.route`), could
        not run it with the state it holds (e.g. a hash router's fixed table); routers reading every field at each
        forward accept any valid config."""

    def adopt(self, old: Router) -> None:
        """Take over `old`'s gate Parameter and expert mask (`moekit.route(kind=...)` builds a router of
        another kind around the same weights: nothing is copied). Routers extend it for state they share."""
        self.weight = old.weight
        if old.bias is not None:  # a pretrained logit bias belongs to the gate
            self.bias = old.bias
        if old.input_norm is not None:  # so do a pretrained input norm and per-expert scale (Gemma 4)
            self.input_norm = old.input_norm
        if old.expert_scale is not None:
            self.expert_scale = old.expert_scale
        self.expert_mask_E = old.expert_mask_E
        # A buffer this kind does not use (a pretrained selection bias under top-p, a hash table under top-k) stays
        # the model's: its state_dict, save_pretrained and the wrapped block's `original()` (unwrap, offload) still
        # hold it while the re-route is in force.
        for name, buf in old._buffers.items():
            if buf is not None and name not in self._buffers and name != "expert_mask_E" and not hasattr(self, name):
                self.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)

    # ---------------------------------------------------------------- losses
    def aux_losses(self, route: RouterOutput, valid_T: torch.Tensor | None,
                   batch_counts: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Router-specific losses over valid tokens (the layer adds the common ones).

        batch_counts: (chosen counts int64 (E,), valid tokens int64 ()) of the whole micro-batch when it
        is split over data-parallel ranks (moekit.parallel), else None (this call's own `route`). A loss
        whose f is a ratio of counts (not linear in the tokens) takes f from them, so that the ranks'
        losses average to the loss one process would compute over the whole micro-batch."""
        return {}

    def balance_assignment(self, route: RouterOutput,
                           valid_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(token_idx_N, expert_idx_N) that the balance losses' f counts: by default the router's own
        choices over valid tokens (`route`, before any capacity dropping: counting only executed
        assignments would let a collapsed router look balanced)."""
        return route.token_idx_N, route.expert_idx_N

    def balance_probs(self, route: RouterOutput) -> torch.Tensor:
        """P_TE of the balance losses (default: the router's probabilities `scores_TE`)."""
        return route.scores_TE

    # ---------------------------------------------------------------- once per optimiser step
    def after_optimizer_step(self, counts: StepCounts) -> None:
        """Stateful updates, once per optimiser step, with the step's counts (default: none)."""

    @classmethod
    def after_optimizer_step_all(cls, routers: list[Router], counts: list[StepCounts]) -> None:
        """The step update of every MoE layer of a model routed by this class, in layer order (called by
        moekit.train.balance). Default: each router's own `after_optimizer_step`; a rule whose state
        is shared by all layers (ReMoE's L1 coefficient) overrides this."""
        for router, c in zip(routers, counts, strict=True):
            router.after_optimizer_step(c)

    def _apply(self, fn, recurse=True):
        # Casts must not round routing state: keep the fp32 values, on the new device.
        kept = {name: self._buffers[name] for name in self.fp32_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return f"kind={self.kind}, d_model={self.d_model}, num_experts={self.num_experts}, {self.cfg.describe()}"
