"""Configs are dataclasses: `validate()` raises ValueError naming the field and the allowed values,
`to_dict()`/`from_dict()` round-trip through JSON with a type field and a version stamp, and
parameter counts come without building a model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

from moekit.errors import UsageError

CONFIG_VERSION = 1

SCORES = ("softmax", "sigmoid")
ACTIVATIONS = ("swiglu", "gelu")
BACKENDS = ("auto", "grouped_mm", "reference")
SELECT_RULES = ("topk", "topp")
BALANCE_SCOPES = ("micro", "global")


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UsageError(f"{name}={value!r} is invalid; allowed: {allowed}")


def check_fields(cfg: Any) -> None:
    """Check every field of the dataclass `cfg` against its annotation: the type (bool, int, float,
    str, None where the annotation allows it) and, for floats, finiteness -- a NaN or infinite
    setting trains silently to NaN. A field that may be non-finite says so with
    `field(metadata={"nonfinite": True})`. Nested config dataclasses are left to their own
    `validate()`. Raises UsageError naming `Class.field`.
    """
    cls = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kinds = {t.strip() for t in annotation.split("|")}
        name = f"{cls}.{f.name}"
        if value is None:
            _check("None" in kinds, name, value, f"a value of type {annotation}")
        elif "bool" in kinds:
            _check(isinstance(value, bool), name, value, "true or false")
        elif "int" in kinds:
            _check(isinstance(value, numbers.Integral) and not isinstance(value, bool), name, value, "an integer")
        elif "float" in kinds:
            _check(isinstance(value, numbers.Real) and not isinstance(value, bool), name, value, "a number")
            _check(f.metadata.get("nonfinite", False) or math.isfinite(value), name, value, "a finite number")
        elif "str" in kinds:
            _check(isinstance(value, str), name, value, "a string")


def _from_dict(cls, d: dict[str, Any]):
    d = dict(d)
    typ = d.pop("type", cls.__name__)
    if typ != cls.__name__:
        raise ValueError(f"config type {typ!r} cannot be read as {cls.__name__}")
    version = d.pop("version", CONFIG_VERSION)
    if version > CONFIG_VERSION:
        raise ValueError(f"{cls.__name__} version {version} is newer than this moekit understands ({CONFIG_VERSION})")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=3)
    return {k: v for k, v in d.items() if k in names}


@dataclass
class RouterConfig:
    """How tokens pick experts. `kind` names a registered router (see `moekit.routers`).

    Fields used by `topk` (the Mixtral / OLMoE / Qwen / DeepSeek family):
      k, score ("softmax"|"sigmoid"), normalize (renormalise the chosen weights; transformers'
      `norm_topk_prob`; None = the rule's default, see `normalizes()`),
      routed_scaling_factor, n_group/topk_group (group-limited
      selection), bias_update_rate (gamma of aux-loss-free balancing; 0 disables the bias),
      bias_recenter (keep sum(bias)=0), jitter (multiply the router input by U(1-eps, 1+eps) in
      training).
    Fields used by `topp` (arXiv 2403.07652): p (cumulative-probability threshold), min_k, max_k
    (optional cap), normalize.
    Fields used by `null` (AdaMoE, arXiv 2406.13233): n_null parameter-free null experts, k (top-k
    over E + n_null), normalize (over the chosen real experts; default True).
    Fields used by `random` (SMoE-Dropout, arXiv 2303.01610): min_k, max_k (None = E),
    k_schedule ("linear"|"cosine"|"exponential"|"multistep"), k_schedule_steps; k = inference k.
    Fields used by `expert_choice`: ec_capacity_factor (each expert takes
    round(ec_capacity_factor*T/E) tokens), allow_causal_leak.
    Fields used by `recurrent` (RMoE, arXiv 2408.06793): gru_dim (hidden size of the GRU shared by
    all layers), select_rule ("topk"|"topp": the selection applied to the GRU's logits, with that
    rule's own fields).
    """

    kind: str = "topk"
    k: int = 2
    score: str = "softmax"
    normalize: bool | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    bias_update_rate: float = 0.0
    bias_recenter: bool = False
    jitter: float = 0.0
    ec_capacity_factor: float = 2.0
    allow_causal_leak: bool = False
    p: float = 0.4
    min_k: int = 1
    max_k: int | None = None
    n_null: int = 0
    k_schedule: str = "linear"
    k_schedule_steps: int = 1000
    gru_dim: int = 256
    select_rule: str = "topk"

    def normalizes(self) -> bool:
        """Whether the chosen experts' weights are renormalised: `normalize` when set, else the rule's
        default — top-p: no (arXiv 2403.07652 uses the raw probabilities); top-k and null experts: yes
        for k > 1, and no for k = 1, where a renormalised weight is always exactly 1 and the gate
        would learn nothing from the task loss (Switch Transformer, arXiv 2101.03961, uses the raw
        probability)."""
        if self.normalize is not None:
            return self.normalize
        rule = self.select_rule if self.kind == "recurrent" else self.kind
        return rule != "topp" and self.k > 1

    def validate(self, num_experts: int) -> RouterConfig:
        from moekit.routers import router_class  # late import: routers depend on this module

        check_fields(self)
        try:
            cls = router_class(self.kind)
        except ValueError as e:
            raise UsageError(str(e)) from None
        _check(self.score in SCORES, "RouterConfig.score", self.score, f"one of {SCORES}")
        _check(self.k >= 1, "RouterConfig.k", self.k, f"an integer in [1, num_experts={num_experts}]")
        _check(self.routed_scaling_factor > 0, "RouterConfig.routed_scaling_factor",
               self.routed_scaling_factor, "a float > 0")
        _check(self.n_group >= 1 and num_experts % self.n_group == 0, "RouterConfig.n_group", self.n_group,
               f"a divisor of num_experts={num_experts}")
        _check(1 <= self.topk_group <= self.n_group, "RouterConfig.topk_group", self.topk_group,
               f"an integer in [1, n_group={self.n_group}]")
        _check(self.bias_update_rate >= 0, "RouterConfig.bias_update_rate", self.bias_update_rate, "a float >= 0")
        _check(0 <= self.jitter < 1, "RouterConfig.jitter", self.jitter, "a float in [0, 1)")
        _check(0 < self.p <= 1, "RouterConfig.p", self.p, "a float in (0, 1]")
        _check(1 <= self.min_k <= num_experts, "RouterConfig.min_k", self.min_k,
               f"an integer in [1, num_experts={num_experts}]")
        _check(self.max_k is None or self.min_k <= self.max_k <= num_experts, "RouterConfig.max_k", self.max_k,
               f"None or an integer in [min_k={self.min_k}, num_experts={num_experts}]")
        _check(self.n_null >= 0, "RouterConfig.n_null", self.n_null, "an integer >= 0")
        _check(self.ec_capacity_factor > 0, "RouterConfig.ec_capacity_factor", self.ec_capacity_factor,
               "a float > 0")
        _check(self.gru_dim >= 1, "RouterConfig.gru_dim", self.gru_dim, "an integer >= 1")
        _check(self.select_rule in SELECT_RULES, "RouterConfig.select_rule", self.select_rule,
               f"one of {SELECT_RULES}")
        try:
            cls.check_config(self, num_experts)
        except ValueError as e:  # routers' own checks: a bad setting, so a usage error
            if isinstance(e, UsageError):
                raise
            raise UsageError(str(e)) from None
        return self

    def describe(self) -> str:
        if self.kind == "recurrent":
            inner = dataclasses.replace(self, kind=self.select_rule).describe()
            return f"gru_dim={self.gru_dim}, select_rule={self.select_rule}, {inner}"
        if self.kind == "expert_choice":
            return f"ec_capacity_factor={self.ec_capacity_factor}"
        if self.kind == "topp":
            cap = f", max_k={self.max_k}" if self.max_k is not None else ""
            return f"p={self.p}, min_k={self.min_k}{cap}, normalize={self.normalizes()}"
        parts = [f"k={self.k}", f"score={self.score}", f"normalize={self.normalizes()}"]
        if self.kind == "null":
            parts.append(f"n_null={self.n_null}")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"scale={self.routed_scaling_factor}")
        if self.n_group > 1:
            parts.append(f"groups={self.topk_group}/{self.n_group}")
        if self.bias_update_rate > 0:
            parts.append(f"bias_update_rate={self.bias_update_rate}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterConfig:
        return cls(**_from_dict(cls, d))


@dataclass
class MoEConfig:
    """One MoE feed-forward layer.

    d_expert is one routed expert's hidden width F. Shared experts are one always-on FFN of width
    d_shared (default num_shared_experts * d_expert, as DeepSeek builds it), optionally scaled by
    a sigmoid gate (Qwen2-MoE). capacity_factor=None is dropless; a float caps each expert at
    ceil(capacity_factor * N / E) assignments in training and drops (and counts) the overflow.
    Capacity is a training device: in eval mode (evaluation, generation) nothing is dropped unless
    eval_capacity_factor (None = dropless) asks for it, so a sequence's output never depends on
    the other sequences of its batch and the KV-cached path equals the full forward.
    balance_scope: "micro" computes the load-balancing loss's expert frequencies f per micro-batch
    (most frameworks' default); "global" accumulates them over the micro-batches of an optimiser
    step and all data-parallel ranks (arXiv 2501.11873).
    """

    d_model: int = 32
    d_expert: int = 64
    num_experts: int = 4
    router: RouterConfig = field(default_factory=RouterConfig)
    activation: str = "swiglu"
    num_shared_experts: int = 0
    d_shared: int | None = None
    shared_gate: bool = False
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    backend: str = "auto"
    balance_scope: str = "micro"

    def __post_init__(self):
        if isinstance(self.router, dict):
            self.router = RouterConfig.from_dict(self.router)

    @property
    def shared_width(self) -> int:
        if self.num_shared_experts == 0:
            return 0
        return self.d_shared if self.d_shared is not None else self.num_shared_experts * self.d_expert

    def validate(self) -> MoEConfig:
        check_fields(self)
        _check(self.d_model >= 1, "MoEConfig.d_model", self.d_model, "an integer >= 1")
        _check(self.d_expert >= 1, "MoEConfig.d_expert", self.d_expert, "an integer >= 1")
        _check(self.num_experts >= 1, "MoEConfig.num_experts", self.num_experts, "an integer >= 1")
        _check(self.activation in ACTIVATIONS, "MoEConfig.activation", self.activation, f"one of {ACTIVATIONS}")
        _check(self.num_shared_experts >= 0, "MoEConfig.num_shared_experts", self.num_shared_experts,
               "an integer >= 0")
        _check(self.d_shared is None or self.d_shared >= 1, "MoEConfig.d_shared", self.d_shared,
               "None or an integer >= 1")
        _check(self.capacity_factor is None or self.capacity_factor > 0, "MoEConfig.capacity_factor",
               self.capacity_factor, "None (dropless) or a float > 0")
        _check(self.eval_capacity_factor is None or self.eval_capacity_factor > 0, "MoEConfig.eval_capacity_factor",
               self.eval_capacity_factor, "None (dropless in eval mode) or a float > 0")
        _check(self.backend in BACKENDS, "MoEConfig.backend", self.backend, f"one of {BACKENDS}")
        _check(self.balance_scope in BALANCE_SCOPES, "MoEConfig.balance_scope", self.balance_scope,
               f"one of {BALANCE_SCOPES}")
        if self.backend == "grouped_mm":
            from moekit.ops.grouped import grouped_mm_available

            _check(grouped_mm_available(), "MoEConfig.backend", self.backend,
                   "'auto' or 'reference' (torch._grouped_mm is missing from this torch build)")
        self.router.validate(self.num_experts)
        return self

    def fine_grained(self, m: int) -> MoEConfig:
        """DeepSeekMoE fine-grained segmentation (arXiv 2401.06066): m*E experts of width F/m and
        m*k of them per token, so total and active parameters stay the same."""
        _check(m >= 1 and self.d_expert % m == 0, "fine_grained(m)", m, f"a divisor of d_expert={self.d_expert}")
        router = dataclasses.replace(self.router, k=self.router.k * m)
        return dataclasses.replace(self, num_experts=self.num_experts * m, d_expert=self.d_expert // m,
                                   router=router)

    # Parameter counts, without building anything.
    def _expert_params(self) -> int:
        mats = 3 if self.activation == "swiglu" else 2
        return mats * self.d_model * self.d_expert

    def _shared_params(self) -> int:
        if self.num_shared_experts == 0:
            return 0
        mats = 3 if self.activation == "swiglu" else 2
        return mats * self.d_model * self.shared_width + (self.d_model if self.shared_gate else 0)

    def _router_params(self) -> int:
        if self.router.kind == "recurrent":
            # per-layer W1 (d -> gru_dim) and W2 (gru_dim -> E); the shared GRU belongs to the model
            return self.router.gru_dim * (self.d_model + self.num_experts)
        rows = self.num_experts + (self.router.n_null if self.router.kind == "null" else 0)
        bias = self.num_experts if self.router.kind == "random" else 0
        return rows * self.d_model + bias

    def num_params(self) -> int:
        return self._router_params() + self.num_experts * self._expert_params() + self._shared_params()

    def expected_experts_per_token(self) -> float:
        """Experts per token used for active-parameter counts. Dynamic routers choose per token:
        top-p counts its cap (max_k, else all E) as the worst case; measure the real average with
        `routing_info().stats()`."""
        if self.router.kind == "expert_choice":
            return float(min(self.num_experts, self.router.ec_capacity_factor))
        rule = self.router.select_rule if self.router.kind == "recurrent" else self.router.kind
        if rule == "topp":
            return float(self.router.max_k or self.num_experts)
        if self.router.kind == "null":
            # real experts per token at balance: k * E / (E + n_null)  (AdaMoE)
            return self.router.k * self.num_experts / (self.num_experts + self.router.n_null)
        return float(min(self.router.k, self.num_experts))

    def num_active_params(self) -> int:
        """Parameters one token uses on average (router + expected experts + shared)."""
        active = self.expected_experts_per_token() * self._expert_params()
        return int(round(self._router_params() + active + self._shared_params()))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["router"] = self.router.to_dict()
        return {"type": type(self).__name__, "version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        kw = _from_dict(cls, d)
        if "router" in kw:
            kw["router"] = RouterConfig.from_dict(kw["router"])
        return cls(**kw)
