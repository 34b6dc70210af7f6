"""Configs are dataclasses: `validate()` raises ValueError naming the field and the allowed values,
`to_dict()`/`from_dict()` round-trip through JSON with a type field and a version stamp, and
parameter counts come without building a model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moekit.errors import UsageError

CONFIG_VERSION = 1

# Expert activations (their math: moekit.ops.ffn). Gated ones compute act(gate) * up.
GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "reglu")
ACTIVATIONS = (*GATED_ACTIVATIONS, "gelu", "gelu_tanh", "relu", "relu2", "silu")
# RMSNorm forms (moekit.ops.norm): r(x) * w, r(x) * (1 + w), r(x * (1 + w)).
NORM_FORMS = ("weight", "one_plus", "one_plus_input")
BACKENDS = ("auto", "grouped_mm")
BALANCE_SCOPES = ("micro", "global")
CAPACITY_SCOPES = ("sequence", "batch")
CAPACITY_PRIORITIES = ("token", "score")
# Where the router's gate linear runs (RouterConfig.gate_dtype): fp32, or the gate weight's dtype (the model's).
GATE_DTYPES = ("float32", "weight")


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise UsageError `NAME=VALUE is invalid; allowed: ALLOWED` unless `ok`."""
    if not ok:
        raise UsageError(f"{name}={value!r} is invalid; allowed: {allowed}")


def setting(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A dataclass field with its help text (the command line's `--SECTION.FIELD` help) and, for an
    enumeration, its allowed values (the flag's choices)."""
    metadata = {"help": help, **({"choices": tuple(choices)} if choices is not None else {})}
    return field(default=default, metadata=metadata)


def check_fields(cfg: Any, name: str | None = None) -> None:
    """Check every field of the dataclass `cfg` against its annotation: the type (bool, int, float,
    str, None where the annotation allows it) and, for floats, finiteness -- a NaN or infinite
    setting trains silently to NaN. A field that may be non-finite says so with
    `field(metadata={"nonfinite": True})`. Nested config dataclasses are left to their own
    `validate()`. Raises UsageError naming `Class.field` (`name.field` when `name` is given).
    """
    cls = name or type(cfg).__name__
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kinds = {t.strip() for t in annotation.split("|")}
        name = f"{cls}.{f.name}"
        if value is None:
            require("None" in kinds, name, value, f"a value of type {annotation}")
        elif "bool" in kinds:
            require(isinstance(value, bool), name, value, "true or false")
        elif "int" in kinds:
            require(isinstance(value, numbers.Integral) and not isinstance(value, bool), name, value, "an integer")
        elif "float" in kinds:
            require(isinstance(value, numbers.Real) and not isinstance(value, bool), name, value, "a number")
            require(f.metadata.get("nonfinite", False) or math.isfinite(value), name, value, "a finite number")
        elif "str" in kinds:
            require(isinstance(value, str), name, value, "a string")


class Config:
    """Base of moekit's dataclass configs: `to_dict()` / `from_dict()` round-trip JSON with a type field
    and a version stamp (nested configs as their own dicts); `from_dict` refuses another type or a newer
    version and warns about (and ignores) keys it does not know. Subclasses are dataclasses with a
    `validate()` that raises UsageError naming `Class.field` (see `require`, `check_fields`)."""

    VERSION: ClassVar[int] = CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            d[f.name] = value.to_dict() if isinstance(value, Config) else copy.deepcopy(value)
        return {"type": type(self).__name__, "version": self.VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return cls(**cls.known_fields(d))

    @classmethod
    def known_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The fields of `d` (a `to_dict()` of this class) that `cls` has, after checking type and version."""
        d = dict(d)
        typ = d.pop("type", cls.__name__)
        if typ != cls.__name__:
            raise ValueError(f"config type {typ!r} cannot be read as {cls.__name__}")
        version = d.pop("version", cls.VERSION)
        if version > cls.VERSION:
            raise ValueError(f"{cls.__name__} version {version} is newer than this moekit understands ({cls.VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=3)
        return {k: v for k, v in d.items() if k in names}


ROUTER_CONFIG_VERSION = 2  # 1: one RouterConfig holding every router's fields (still read)

# The fields of the version-1 RouterConfig, which held every router's fields: a version-1 file carries all
# of them, and the ones the file's kind does not use are dropped silently when it is read.
V1_ROUTER_FIELDS = frozenset((
    "kind", "k", "score", "normalize", "routed_scaling_factor", "n_group", "topk_group", "bias_update_rate",
    "bias_recenter", "jitter", "ec_capacity_factor", "allow_causal_leak", "p", "min_k", "max_k", "n_null",
    "k_schedule", "k_schedule_steps", "gru_dim", "select_rule"))

_ROUTER_CONFIGS: dict[str, type[RouterConfig]] = {}  # kind -> config class, filled by moekit.routers.registry
# Imports the router files (which register themselves) on the first look-up: `moekit/__init__.py` sets it, so
# that `import moekit` stays cheap (no torch) while `RouterConfig(kind=...)` always finds every router.
_router_loader: Any = None


def set_router_loader(load) -> None:
    """Call `load()` (which must register every router) before the first look-up of a router kind."""
    global _router_loader
    _router_loader = load


def _registered() -> dict[str, type[RouterConfig]]:
    global _router_loader
    if _router_loader is not None:
        load, _router_loader = _router_loader, None  # once, and not again while it runs
        load()
    return _ROUTER_CONFIGS


@dataclass
class RouterConfig(Config):
    """How tokens pick experts: the base of every router's own config.

    `kind` names a registered router (`moekit.registered_routers()`); each router file defines its
    config as a subclass holding that router's fields, registered together with the router
    (`moekit.routers.register(name, config=...)`). `RouterConfig(kind="topp", p=0.4)` returns the
    registered subclass (here `TopPConfig`); a field the kind does not have is refused (UsageError).
    `jitter` (every router): multiply the router input by U(1 - eps, 1 + eps) in training.
    `logit_scale` (every router): multiply the logits by this before the router's rule reads them (Muse
    Spark's `output_multiplier`); a re-route (`convert`) keeps it, as it is part of the gate.
    `gate_dtype` (every router): "float32" (default) runs the gate linear in fp32 whatever the model dtype;
    "weight" runs it in the gate weight's dtype (bf16 in a bf16 model) and upcasts the logits to fp32 after, as
    the transformers routers that call `F.linear(hidden_states, self.weight)` in the model dtype do (Mixtral,
    Qwen3-MoE; `moekit.hf.wrap` reads it from each router). In fp32 both are the same. A re-route keeps it.

    The capability methods below are what the layer, models, offload, export and the trainer ask a
    router config instead of switching on its kind; a router overrides those that differ from the
    defaults. JSON: `{"type": "RouterConfig", "version": 2, "kind": ..., <the kind's fields>}`;
    `from_dict` dispatches on "kind" and still reads version 1 (the union of every router's fields).
    Field errors name `RouterConfig.FIELD`, whichever kind.
    """

    VERSION: ClassVar[int] = ROUTER_CONFIG_VERSION

    kind: str = setting("topk", "router: how tokens pick experts (moekit info lists them)")
    jitter: float = setting(0.0, "multiply the router input by U(1 - eps, 1 + eps) in training (0 = off)")
    logit_scale: float = setting(1.0, "multiply the router logits by this before scoring (Muse Spark's "
                                      "output_multiplier; 1 = off)")
    gate_dtype: str = setting("float32", "dtype of the gate linear: float32 whatever the model dtype, or the gate "
                                         "weight's dtype, logits upcast to fp32 after (transformers' Mixtral, Qwen3-MoE)",
                              choices=GATE_DTYPES)
    router_losses: ClassVar[tuple[str, ...]] = ()  # every router-specific aux loss this router may return
    # Fields counted in experts (k, min_k, a capacity factor, null experts): fine_grained(m) multiplies them.
    expert_count_fields: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, *args, **kwargs):
        if cls is not RouterConfig:
            return object.__new__(cls)
        return object.__new__(router_config_for(kwargs.get("kind", args[0] if args else "topk"), kwargs))

    def __setattr__(self, name, value):
        # The kind is the config's class: assigning another kind (cfg.kind = "topk" on a TopPConfig)
        # would leave the other kind's fields behind, so it is refused here, at the assignment.
        if name == "kind":
            own = type(self).__dataclass_fields__["kind"].default
            if value != own:
                raise UsageError(f"RouterConfig.kind={value!r} does not match {type(self).__name__} (kind {own!r}); "
                                 "build RouterConfig(kind=..., ...), or change the kind with "
                                 "RouterConfig.convert(kind, ...) or moekit.route(model, kind=...)")
        super().__setattr__(name, value)

    # ----------------------------------------------------------------- capabilities (defaults)
    def describe(self) -> str:
        """The settings that define the selection rule, for repr and logs (`kind` not included, nor `gate_dtype`:
        where the gate rounds, not the rule)."""
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                         if f.name not in ("kind", "jitter", "gate_dtype")
                         and not (f.name == "logit_scale" and self.logit_scale == 1.0))

    def check(self, num_experts: int) -> None:
        """Raise UsageError for settings this router cannot honour with `num_experts` (override)."""

    def num_params(self, d_model: int, num_experts: int) -> int:
        """Router parameters of one layer (default: a linear gate (E, D))."""
        return num_experts * d_model

    def expected_experts_per_token(self, num_experts: int) -> float:
        """Experts per token for active-parameter counts (a dynamic router's worst case or its balance value)."""
        raise NotImplementedError(f"{type(self).__name__}.expected_experts_per_token")

    def min_resident_experts(self, num_experts: int) -> int:
        """The least number of a layer's experts an offload cache must hold at once (one token's experts;
        default: the expected count, rounded up)."""
        return max(1, math.ceil(self.expected_experts_per_token(num_experts)))

    def fixed_experts_per_token(self) -> bool:
        """Whether every token uses exactly `expected_experts_per_token` experts in evaluation."""
        return False

    def fine_grained(self, m: int) -> RouterConfig:
        """The config for DeepSeekMoE segmentation into m times more, m times narrower experts: every
        field the router counts in experts (`expert_count_fields`: k, min_k, max_k, null experts, an
        expert-choice capacity factor) times m, so the active expert width per token stays the same."""
        return dataclasses.replace(self, **{name: getattr(self, name) * m for name in self.expert_count_fields
                                            if getattr(self, name) is not None})

    def score_function(self) -> str:
        """How the router turns logits into probabilities: "softmax" (default) or "sigmoid"."""
        return "softmax"

    def updates_selection_bias(self) -> bool:
        """Whether the router trains an aux-loss-free selection bias from each step's expert counts."""
        return False

    def weighted_shared_slots(self) -> int:
        """S: router columns past the experts that weight S always-on shared experts per token (Inkling's
        router-weighted shared experts; default 0: the shared experts, if any, are unweighted)."""
        return 0

    def learned_weight_scale(self) -> bool:
        """Whether the router multiplies its weights by a learned scalar of its own (Inkling's `global_scale`)."""
        return False

    def expert_groups(self) -> int:
        """Groups of consecutive experts the selection rule ranks as units (group-limited routing; default 1):
        renumbering experts (moekit.dispatch.placement.permute_experts_) must move whole groups."""
        return 1

    def min_enabled_experts(self) -> int:
        """Experts a token must be able to choose from (expert masks keep at least this many enabled)."""
        return 1

    def check_expert_mask(self, mask_E) -> None:
        """Raise ValueError if the router cannot honour the int8 expert mask `mask_E` (-1 disabled, +1
        forced; see moekit.mask_experts). Default: disabling is applied by `Router.forward`; forcing
        needs a selection rule that ranks forced experts first, which this one does not."""
        if bool((mask_E > 0).any()):
            raise ValueError(f"router kind {self.kind!r}, whose selection rule does not rank forced experts "
                             "first; allowed with routers that do (e.g. kind='topk'): disable experts instead, or "
                             "route(kind='topk') first")

    def normalizes(self) -> bool:
        """Whether a token's combine weights are renormalised over its picks (default: no). The layer
        renormalises over the picks that are not zero experts when this is true (MoE++, arXiv 2410.07348)."""
        return False

    def carries_state(self) -> bool:
        """Whether the router reads a routing state handed from the previous MoE layer (RMoE)."""
        return False

    def routes_on_token_ids(self) -> bool:
        """Whether the router picks experts from the token ids (hash routing), which the model hands each MoE
        layer as its `router_state`."""
        return False

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raise UsageError where the router cannot take every token id of a model with `vocab_size` ids
        (override: hash routing's table)."""

    def build_shared_module(self):
        """A module shared by every MoE layer and owned by the model (None: no such module)."""
        return None

    def shared_module_params(self) -> int:
        """Parameters of `build_shared_module()`, counted once per model."""
        return 0

    def initial_state(self, shared):
        """The routing state handed to the first MoE layer, from the model's shared module (None: the
        router carries no state)."""
        return None

    def is_causal(self) -> bool:
        """False when a token's experts depend on other tokens (later ones included)."""
        return True

    def accepts_causal_leak(self) -> bool:
        """Whether the config accepts training a non-causal router in a causal LM."""
        return False

    def hf_routing(self) -> dict[str, Any] | None:
        """The transformers routing settings equal to this rule (keys num_experts_per_tok, scoring_func,
        norm_topk_prob, n_group, topk_group, routed_scaling_factor, selection_bias; softmax_after_topk where the rule
        may be gpt-oss's softmax over the top-k logits), or None when no
        transformers model routes this way (export refuses)."""
        return None

    def aux_loss_names(self) -> tuple[str, ...]:
        """Names of the router-specific losses a training forward returns with this config (the layer adds
        the common ones)."""
        return self.router_losses

    def aux_loss_coefs(self) -> dict[str, float]:
        """Coefficients a trainer gives the router's own losses when its config names none (e.g. a loss
        the router already scales by an adaptive coefficient of its own takes 1.0)."""
        return {}

    # ----------------------------------------------------------------- validation and JSON
    def validate(self, num_experts: int) -> RouterConfig:
        check_fields(self, "RouterConfig")
        require(0 <= self.jitter < 1, "RouterConfig.jitter", self.jitter, "a float in [0, 1)")
        require(math.isfinite(self.logit_scale) and self.logit_scale > 0, "RouterConfig.logit_scale",
                self.logit_scale, "a float > 0")
        require(self.gate_dtype in GATE_DTYPES, "RouterConfig.gate_dtype", self.gate_dtype, f"one of {GATE_DTYPES}")
        try:
            self.check(num_experts)
        except ValueError as e:  # a bad setting, so a usage error
            if isinstance(e, UsageError):
                raise
            raise UsageError(str(e)) from None
        return self

    def convert(self, kind: str, **changes) -> RouterConfig:
        """This config as router `kind`: the fields both kinds have keep their values, `changes` are
        applied, the rest take the new kind's defaults. A field `kind` does not have raises UsageError."""
        sub = router_config_for(kind, changes)
        names = {f.name for f in dataclasses.fields(sub)}
        if self.score_function() != "softmax" and "score" not in names:
            # Its probabilities would silently become a softmax over the same logits: another model.
            raise UsageError(f"RouterConfig(kind={kind!r}) scores experts with a softmax and has no `score` field, so "
                             f"this score={self.score_function()!r} rule cannot be converted to it; kinds that keep the score: "
                             f"{sorted(k for k, c in _ROUTER_CONFIGS.items() if 'score' in c.__dataclass_fields__)}")
        kept = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}
        return sub(**{**kept, **changes, "kind": kind})

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "type": "RouterConfig"}  # every kind reads back through RouterConfig

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterConfig:
        d = dict(d)
        typ = d.pop("type", "RouterConfig")
        if typ != "RouterConfig":
            raise ValueError(f"config type {typ!r} cannot be read as RouterConfig")
        version = d.pop("version", ROUTER_CONFIG_VERSION)
        if version > ROUTER_CONFIG_VERSION:
            raise ValueError(f"RouterConfig version {version} is newer than this moekit understands "
                             f"({ROUTER_CONFIG_VERSION})")
        sub = router_config_class(d.get("kind", "topk"))
        names = {f.name for f in dataclasses.fields(sub)}
        # Version 1 held every router's fields: those of other routers are expected, not unknown.
        ignorable = V1_ROUTER_FIELDS if version == 1 else frozenset()
        unknown = sorted(set(d) - names - ignorable)
        if unknown:
            warnings.warn(f"RouterConfig(kind={sub.kind!r}): ignoring unknown keys {unknown}", stacklevel=2)
        return sub(**{k: v for k, v in d.items() if k in names})


def add_router_config(kind: str, cls: type[RouterConfig]) -> None:
    """Make `cls` the config of router `kind` (called by `moekit.routers.register`)."""
    if kind in _ROUTER_CONFIGS:
        raise ValueError(f"router config {kind!r} is already registered (by {_ROUTER_CONFIGS[kind].__name__})")
    _ROUTER_CONFIGS[kind] = cls


def router_config_class(kind: str) -> type[RouterConfig]:
    """The config class of router `kind` (UsageError naming the registered kinds if there is none)."""
    registered = _registered()
    if kind not in registered:
        raise UsageError(f"RouterConfig.kind: unknown router {kind!r}; registered: {sorted(registered)}")
    return registered[kind]


def router_config_for(kind: str, fields) -> type[RouterConfig]:
    """The config class of router `kind`, which must have every field named in `fields` (UsageError
    naming those it lacks and the ones it has)."""
    sub = router_config_class(kind)
    names = {f.name for f in dataclasses.fields(sub)}
    wrong = sorted(set(fields) - names)
    if wrong:
        raise UsageError(f"RouterConfig(kind={kind!r}): {', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} "
                         f"not apply to this router; its fields: {', '.join(sorted(names))}")
    return sub


def router_fields() -> dict[str, dataclasses.Field]:
    """Every registered router config's fields by name (the first registered owner's definition)."""
    out: dict[str, dataclasses.Field] = {}
    for sub in _registered().values():
        for f in dataclasses.fields(sub):
            out.setdefault(f.name, f)
    return out


@dataclass
class MoEConfig(Config):
    """One MoE feed-forward layer.

    d_expert is one routed expert's hidden width F. Shared experts are one always-on FFN of width
    d_shared (default num_shared_experts * d_expert, as DeepSeek builds it), optionally scaled by
    a sigmoid gate (Qwen2-MoE). capacity_factor=None is dropless; a float caps each expert at
    ceil(capacity_factor * N / E) assignments in training and drops (and counts) the overflow.
    Capacity is a training device: in eval mode (evaluation, generation) nothing is dropped unless
    eval_capacity_factor (None = dropless) asks for it, so a sequence's output never depends on
    the other sequences of its batch and the KV-cached path equals the full forward.
    expert_capacity=C is Switch Transformers' own rule as transformers runs it (arXiv 2101.03961): in
    each sequence (a (B, T, D) input's rows; a (T, D) input is one sequence), an expert takes the
    first C of the tokens routed to it, in token order, in training and eval alike; the rest drop.
    capacity_scope="batch" is GShard's top-2 rule as fairseq runs it for NLLB-MoE (arXiv 2006.16668,
    2207.04672): over the whole flattened batch, every token's first choice ranks before any second
    choice (choices ordered by weight), and within a choice tokens go in order (capacity_priority
    "token") or by their top score, highest first (batch prioritized routing, arXiv 2106.05974); C is
    expert_capacity, or K * ceil(T / E) without one (T every token of the call, padding included), and
    in eval mode ceil(eval_capacity_fraction * T) where that is set. capacity_renormalize rescales each
    token's kept weights to sum to 1 after dropping (fairseq's default; its
    normalize_gate_prob_before_dropping is the opposite). expert_dropout=p is NLLB-MoE's
    moe_token_dropout as transformers runs it: in training, dropout p on every expert output; in eval,
    the experts' output times 1 - p. expert_hidden_dropout=p: dropout on each expert's hidden activations in
    training (the dropout inside Switch Transformers' and NLLB-MoE's expert MLPs).
    balance_scope: "micro" computes the load-balancing loss's expert frequencies f per micro-batch
    (most frameworks' default); "global" accumulates them over the micro-batches of an optimiser
    step and all data-parallel ranks (arXiv 2501.11873).
    activation: the experts' (and shared experts') activation, one of ACTIVATIONS (moekit.ops.ffn);
    activation_limit / activation_alpha / activation_up_offset: the clamped SwiGLU of gpt-oss (limit
    7, alpha 1.702, up offset 1) or DeepSeek-V4 (limit only), on the routed experts' gated activation;
    activation_clamp_after: the gate's clamp after its activation (Step-3.7), not before;
    shared_activation_limit: the shared expert's clamp (None: none), with the routed experts' other clamp
    settings (DeepSeek-V4 clamps both at swiglu_limit; Step-3.7 at its own limits).
    shared_activation: the shared expert's own activation (None: the routed experts'); Aria's, HY-V4's and
    GLM-5-Next's routed experts are always SiLU-gated while their shared expert follows hidden_act.
    weight_on_input: the combine weight scales each expert's *input* instead of its output (Llama 4);
    the same for linear experts, not for gated ones.

    Layer architectures (moekit.layers.moe explains each):
    iterations=C: Chain-of-Experts (arXiv 2506.18945), the expert bank applied C times in sequence,
        one router per iteration, with an inner residual; iteration_shared re-applies the shared
        experts in every iteration (else once, to the layer input).
    zero_experts / copy_experts / constant_experts: MoE++ zero-computation experts (arXiv 2410.07348;
        LongCat-Flash's "zero experts" are copy experts) beside the FFN experts, chosen by the same
        router over num_experts + their number; gating_residual adds a learned map of the previous MoE
        layer's router logits to this layer's (MoE++ pathway-aware routing).
    latent_dim=l: routed experts work in l dims between a shared D->l and l->D projection (NVIDIA
        LatentMoE, transformers' nemotron_h `fc1_latent_proj`/`fc2_latent_proj`); router and shared
        experts stay in D. latent_norm_eps: an RMSNorm (latent_norm_form, moekit.ops.norm) of the
        experts' l-dim input after the D->l projection (Muse Spark's `pre_expert_norm`).
    expert_output_norm_eps: an RMSNorm (expert_output_norm_form) of every routed expert's output, before
        its combine weight (Muse Spark's `post_expert_norm`, one weight shared by the experts); row-wise
        on the N assignments' outputs.
    pregated: the router reads the previous MoE layer's input (Pre-gated MoE, arXiv 2308.12066), so
        a layer's experts are known one layer ahead.
    """

    d_model: int = setting(32, "model width D (always the LM's d_model)")
    d_expert: int = setting(64, "hidden width F of one routed expert")
    num_experts: int = setting(4, "routed experts E per MoE layer")
    router: RouterConfig = field(default_factory=RouterConfig)
    activation: str = setting("swiglu", "expert FFN activation", choices=ACTIVATIONS)
    activation_limit: float | None = setting(None, "clamp of the gated activation (gpt-oss 7.0; None = none)")
    activation_alpha: float = setting(1.0, "sigmoid slope of the clamped SwiGLU (gpt-oss 1.702)")
    activation_up_offset: float = setting(0.0, "added to the up projection in the clamped SwiGLU (gpt-oss 1)")
    activation_clamp_after: bool = setting(False, "clamp the gate after its activation, not before (Step-3.7)")
    shared_activation_limit: float | None = setting(None, "the shared expert's clamp, with the routed experts' "
                                                    "clamp settings (DeepSeek-V4, Step-3.7; None = no clamp)")
    shared_activation: str | None = setting(None, "the shared expert's own activation (None = the routed "
                                            "experts'; Aria: GeGLU shared, SwiGLU routed)")
    activation_softcap_gate: float | None = setting(None, "gate softcap of Inkling2's softcapped SwiGLU (None = none; "
                                                          "set with activation_softcap_up)")
    activation_softcap_up: float | None = setting(None, "up softcap of Inkling2's softcapped SwiGLU (None = none)")
    num_shared_experts: int = setting(0, "always-on shared experts (one FFN of width d_shared; 0 = none)")
    d_shared: int | None = setting(None, "width of the shared expert FFN (None = num_shared_experts * "
                                   "d_expert)")
    shared_gate: bool = setting(False, "scale the shared expert by a sigmoid gate (Qwen2-MoE)")
    weight_on_input: bool = setting(False, "the combine weight scales each expert's input, not its output "
                                           "(Llama 4)")
    capacity_factor: float | None = setting(None, "cap each expert at ceil(factor * N / E) assignments in "
                                            "training, dropping the overflow (None = dropless)")
    eval_capacity_factor: float | None = setting(None, "the same cap in eval mode (None = dropless)")
    expert_capacity: int | None = setting(None, "a fixed cap per expert and sequence, first tokens first, in "
                                          "training and eval (Switch Transformers; None = off)")
    capacity_scope: str = setting("sequence", "where expert_capacity counts: per sequence, first tokens first "
                                  "(Switch), or over the batch, first choices before second ones (GShard/NLLB; "
                                  "C = K*ceil(T/E) when expert_capacity is None)", choices=CAPACITY_SCOPES)
    capacity_priority: str = setting("token", "order of tokens within a choice under capacity_scope='batch': "
                                     "token order, or top score first (batch prioritized routing)",
                                     choices=CAPACITY_PRIORITIES)
    eval_capacity_fraction: float | None = setting(None, "capacity_scope='batch' in eval mode: C = ceil(fraction * "
                                                   "T) (fairseq moe_eval_capacity_token_fraction; None = as training)")
    capacity_renormalize: bool = setting(False, "renormalise each token's kept weights to sum 1 after capacity "
                                                "dropping (fairseq top2gating)")
    expert_dropout: float = setting(0.0, "dropout on expert outputs in training, output scale 1 - p in eval "
                                         "(NLLB-MoE moe_token_dropout)")
    expert_hidden_dropout: float = setting(0.0, "dropout on the experts' hidden activations in training (Switch, "
                                                "NLLB-MoE expert MLPs)")
    backend: str = setting("auto", "expert GEMMs: auto (grouped kernel where available, else a loop) or "
                           "grouped_mm", choices=BACKENDS)
    balance_scope: str = setting("micro", "load-balancing frequencies per micro-batch, or global over the "
                                 "optimiser step and ranks (arXiv 2501.11873)", choices=BALANCE_SCOPES)
    iterations: int = setting(1, "Chain-of-Experts iterations C: the expert bank applied C times in the layer, "
                              "each iteration with its own router (arXiv 2506.18945; 1 = a plain layer)")
    iteration_shared: bool = setting(True, "re-apply the shared experts in every Chain-of-Experts iteration")
    zero_experts: int = setting(0, "zero-computation experts whose output is 0 (MoE++ arXiv 2410.07348)")
    copy_experts: int = setting(0, "zero-computation experts whose output is their input (MoE++; LongCat-Flash)")
    constant_experts: int = setting(0, "zero-computation experts whose output mixes the input with a trained "
                                       "vector (MoE++)")
    gating_residual: bool = setting(False, "add the previous MoE layer's router logits to this layer's (MoE++)")
    output_bias: bool = setting(False, "a learned (D,) bias added to the layer's output (JetMoE)")
    output_norm_eps: float | None = setting(None, "RMSNorm the layer's output with this epsilon (A.X-K1; "
                                                  "None = no norm)")
    latent_norm_eps: float | None = setting(None, "RMSNorm the routed experts' latent input (after the D->latent "
                                                  "projection) with this epsilon (Muse Spark; None = no norm)")
    latent_norm_form: str = setting("weight", "form of the latent-input RMSNorm (moekit.ops.norm)",
                                    choices=NORM_FORMS)
    expert_output_norm_eps: float | None = setting(None, "RMSNorm each routed expert's output, before its combine "
                                                         "weight, with this epsilon (Muse Spark; None = no norm)")
    expert_output_norm_form: str = setting("weight", "form of the per-expert output RMSNorm (moekit.ops.norm)",
                                           choices=NORM_FORMS)
    latent_dim: int | None = setting(None, "routed experts work in a latent width: shared D->latent and "
                                           "latent->D projections around the bank (None = off)")
    pregated: bool = setting(False, "the router reads the previous MoE layer's input, so experts are known a "
                                    "layer ahead (Pre-gated MoE arXiv 2308.12066)")

    def __post_init__(self):
        if isinstance(self.router, dict):
            self.router = RouterConfig.from_dict(self.router)
        if self.backend == "reference":
            # The reference loop is the test oracle (moekit.ops.reference.moe_reference), not a backend.
            warnings.warn("MoEConfig.backend='reference' is no longer a layer backend (the reference loop is the "
                          "test oracle, moekit.ops.reference.moe_reference); using 'auto'", UserWarning, stacklevel=3)
            self.backend = "auto"

    @property
    def shared_width(self) -> int:
        if self.num_shared_experts == 0:
            return 0
        return self.d_shared if self.d_shared is not None else self.num_shared_experts * self.d_expert

    def validate(self) -> MoEConfig:
        check_fields(self)
        require(self.d_model >= 1, "MoEConfig.d_model", self.d_model, "an integer >= 1")
        require(self.d_expert >= 1, "MoEConfig.d_expert", self.d_expert, "an integer >= 1")
        require(self.num_experts >= 1, "MoEConfig.num_experts", self.num_experts, "an integer >= 1")
        require(self.activation in ACTIVATIONS, "MoEConfig.activation", self.activation, f"one of {ACTIVATIONS}")
        gated = self.activation in GATED_ACTIVATIONS
        require(self.activation_limit is None or (gated and self.activation_limit > 0), "MoEConfig.activation_limit",
                self.activation_limit, "None, or a float > 0 with a gated activation")
        require(self.activation_alpha == 1.0 or (self.activation == "swiglu" and self.activation_alpha > 0),
                "MoEConfig.activation_alpha", self.activation_alpha, "1.0, or a float > 0 with activation='swiglu'")
        require(self.activation_up_offset == 0.0 or gated, "MoEConfig.activation_up_offset",
                self.activation_up_offset, "0.0 unless the activation is gated")
        require(not self.activation_clamp_after or self.activation_limit is not None,
                "MoEConfig.activation_clamp_after", self.activation_clamp_after, "false unless activation_limit is set")
        shared_gated = (self.shared_activation or self.activation) in GATED_ACTIVATIONS
        require(self.shared_activation_limit is None or (gated and shared_gated and self.shared_activation_limit > 0),
                "MoEConfig.shared_activation_limit", self.shared_activation_limit,
                "None, or a float > 0 with gated activations")
        require(self.shared_activation is None or self.shared_activation in ACTIVATIONS,
                "MoEConfig.shared_activation", self.shared_activation, f"None or one of {ACTIVATIONS}")
        caps = (self.activation_softcap_gate, self.activation_softcap_up)
        require(caps == (None, None) or (None not in caps and min(caps) > 0 and self.activation == "swiglu"
                                         and self.activation_limit is None),
                "MoEConfig.activation_softcap_gate", self.activation_softcap_gate,
                "None (with activation_softcap_up None), or two caps > 0 with activation='swiglu' and no "
                "activation_limit")
        require(self.num_shared_experts >= 0, "MoEConfig.num_shared_experts", self.num_shared_experts,
               "an integer >= 0")
        require(self.d_shared is None or self.d_shared >= 1, "MoEConfig.d_shared", self.d_shared,
               "None or an integer >= 1")
        require(self.capacity_factor is None or self.capacity_factor > 0, "MoEConfig.capacity_factor",
               self.capacity_factor, "None (dropless) or a float > 0")
        require(self.eval_capacity_factor is None or self.eval_capacity_factor > 0, "MoEConfig.eval_capacity_factor",
               self.eval_capacity_factor, "None (dropless in eval mode) or a float > 0")
        require(self.output_norm_eps is None or self.output_norm_eps > 0, "MoEConfig.output_norm_eps",
                self.output_norm_eps, "None or a float > 0")
        require(self.latent_norm_eps is None or (self.latent_norm_eps > 0 and self.latent_dim is not None),
                "MoEConfig.latent_norm_eps", self.latent_norm_eps, "None, or a float > 0 with latent_dim set")
        require(self.expert_output_norm_eps is None or self.expert_output_norm_eps > 0,
                "MoEConfig.expert_output_norm_eps", self.expert_output_norm_eps, "None or a float > 0")
        for name in ("latent_norm_form", "expert_output_norm_form"):
            require(getattr(self, name) in NORM_FORMS, f"MoEConfig.{name}", getattr(self, name),
                    f"one of {NORM_FORMS}")
        require(self.expert_capacity is None or self.expert_capacity >= 1, "MoEConfig.expert_capacity",
                self.expert_capacity, "None or an integer >= 1")
        require(self.capacity_scope in CAPACITY_SCOPES, "MoEConfig.capacity_scope", self.capacity_scope,
                f"one of {CAPACITY_SCOPES}")
        require(self.capacity_priority in CAPACITY_PRIORITIES and (self.capacity_priority == "token"
                                                                   or self.capacity_scope == "batch"),
                "MoEConfig.capacity_priority", self.capacity_priority,
                f"one of {CAPACITY_PRIORITIES} ('score' with capacity_scope='batch')")
        require(self.eval_capacity_fraction is None or (self.eval_capacity_fraction > 0
                                                        and self.capacity_scope == "batch"),
                "MoEConfig.eval_capacity_fraction", self.eval_capacity_fraction,
                "None, or a float > 0 with capacity_scope='batch'")
        require(not self.capacity_renormalize or self.capacity_scope == "batch" or self.expert_capacity is not None,
                "MoEConfig.capacity_renormalize", self.capacity_renormalize,
                "false unless a capacity rule is on (expert_capacity or capacity_scope='batch')")
        require(0.0 <= self.expert_dropout < 1.0, "MoEConfig.expert_dropout", self.expert_dropout,
                "a float in [0, 1)")
        require(0.0 <= self.expert_hidden_dropout < 1.0, "MoEConfig.expert_hidden_dropout", self.expert_hidden_dropout,
                "a float in [0, 1)")
        require(self.backend in BACKENDS, "MoEConfig.backend", self.backend, f"one of {BACKENDS}")
        require(self.balance_scope in BALANCE_SCOPES, "MoEConfig.balance_scope", self.balance_scope,
               f"one of {BALANCE_SCOPES}")
        require(1 <= self.iterations <= 8, "MoEConfig.iterations", self.iterations, "an integer in [1, 8]")
        for name in ("zero_experts", "copy_experts", "constant_experts"):
            require(getattr(self, name) >= 0, f"MoEConfig.{name}", getattr(self, name), "an integer >= 0")
        require(self.latent_dim is None or self.latent_dim >= 1, "MoEConfig.latent_dim", self.latent_dim,
                "None or an integer >= 1")
        require((self.num_zero_compute == 0 and self.iterations == 1) or self.balance_scope == "micro",
                "MoEConfig.balance_scope", self.balance_scope,
                "'micro' with zero-computation experts or Chain-of-Experts iterations")
        # Step updates (a selection bias) count the E FFN experts; zero-computation columns have no counts.
        require(self.num_zero_compute == 0 or not self.router.updates_selection_bias(),
                "RouterConfig", self.router.describe(),
                "no aux-loss-free selection bias (bias_update_rate 0) with zero-computation experts")
        S = self.router.weighted_shared_slots()
        require(S == 0 or (S == self.num_shared_experts and self.num_zero_compute == 0 and self.iterations == 1
                           and not self.shared_gate and shared_gated),
                "RouterConfig.shared_slots", S, f"0, or num_shared_experts={self.num_shared_experts} router-weighted "
                "gated shared experts, without zero-computation experts, iterations or a shared gate")
        stateful = self.router.carries_state()
        for name, on in (("iterations", self.iterations > 1), ("gating_residual", self.gating_residual),
                         ("pregated", self.pregated)):
            require(not (on and stateful), f"MoEConfig.{name}", getattr(self, name),
                    f"its default with router kind {self.router.kind!r}, which carries a routing state across layers")
        self.router.validate(self.router_slots)
        return self

    @property
    def num_zero_compute(self) -> int:
        """Zero-computation experts (zero + copy + constant): router columns past num_experts."""
        return self.zero_experts + self.copy_experts + self.constant_experts

    @property
    def router_slots(self) -> int:
        """X: the columns each router scores (FFN experts, then zero, copy and constant experts, then the
        columns weighting router-weighted shared experts)."""
        return self.num_experts + self.num_zero_compute + self.router.weighted_shared_slots()

    @property
    def expert_dim(self) -> int:
        """The width routed experts read and write: latent_dim, else d_model."""
        return self.latent_dim if self.latent_dim is not None else self.d_model

    def fine_grained(self, m: int) -> MoEConfig:
        """DeepSeekMoE fine-grained segmentation (arXiv 2401.06066): m*E experts of width F/m and
        m*k of them per token, so total and active parameters stay the same."""
        require(m >= 1 and self.d_expert % m == 0, "fine_grained(m)", m, f"a divisor of d_expert={self.d_expert}")
        return dataclasses.replace(self, num_experts=self.num_experts * m, d_expert=self.d_expert // m,
                                   router=self.router.fine_grained(m))

    # Parameter counts, without building anything.
    def _expert_params(self) -> int:
        mats = 3 if self.activation in GATED_ACTIVATIONS else 2
        return mats * self.expert_dim * self.d_expert

    def expert_flops(self) -> int:
        """Multiply-adds x 2 of one token through one routed FFN expert (zero-computation experts: 0)."""
        return 2 * self._expert_params()

    def _layer_extra_params(self) -> int:
        """Parameters of the layer options: latent projections, constant experts, the gating-residual map,
        the output bias and norm."""
        latent = 2 * self.d_model * self.latent_dim if self.latent_dim is not None else 0
        constant = self.constant_experts * 3 * self.d_model  # a vector v and a (2, D) mixing gate each
        residual = self.router_slots ** 2 if self.gating_residual else 0
        out = self.d_model * (int(self.output_bias) + int(self.output_norm_eps is not None))
        norms = self.expert_dim * (int(self.latent_norm_eps is not None) + int(self.expert_output_norm_eps is not None))
        return latent + constant + residual + out + norms

    def _shared_params(self) -> int:
        if self.num_shared_experts == 0:
            return 0
        mats = 3 if self.activation in GATED_ACTIVATIONS else 2
        S = self.router.weighted_shared_slots()
        if S:  # S router-weighted shared experts, d_shared (else d_expert) wide each
            return S * mats * self.d_model * (self.d_shared or self.d_expert)
        return mats * self.d_model * self.shared_width + (self.d_model if self.shared_gate else 0)

    def _router_params(self) -> int:
        return self.iterations * self.router.num_params(self.d_model, self.router_slots)

    def num_params(self) -> int:
        return (self._router_params() + self.num_experts * self._expert_params() + self._shared_params()
                + self._layer_extra_params())

    def expected_experts_per_token(self) -> float:
        """Experts per token used for active-parameter counts (the router's own count: dynamic routers
        give their worst case or their value at balance; measure the real average with
        `routing_info().stats()`)."""
        # Zero-computation experts take their share of the picks at balance (as AdaMoE's null experts);
        # Chain-of-Experts runs the routed experts once per iteration.
        per_iteration = self.router.expected_experts_per_token(self.router_slots)
        return self.iterations * per_iteration * self.num_experts / self.router_slots

    def num_active_params(self) -> int:
        """Parameters one token uses on average (router + expected experts + shared)."""
        active = self.expected_experts_per_token() * self._expert_params()
        return int(round(self._router_params() + active + self._shared_params() + self._layer_extra_params()))
