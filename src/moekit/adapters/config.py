"""Adapter configs: one dataclass per method, registered with the module that implements it (as PEFT
pairs a method with its config). Configs validate (UsageError naming the field), round-trip through
JSON with a type field and a version stamp, and warn about unknown keys.

  method     config           what it adds to each targeted nn.Linear (W x + ...)
  lora       LoRAConfig       s * B A x                                   (arXiv 2106.09685)
  mixlora    MixLoRAConfig    sum over the router's picks e: w_e * s * B_e A_e x   (MoLA / MixLoRA)
  loramoe    LoRAMoEConfig    sum over all e: softmax(W_r x)_e * s * B_e A_e x     (arXiv 2312.09979)
  smora      SMoRAConfig      s * B (g(x) * A x), g: the router's picks among the r ranks (arXiv 2501.15103)
  flylora    FlyLoRAConfig    s * B (mask_k(A x + b) * A x), A frozen sparse random (FlyLoRA, NeurIPS 2025)

LoRAConfig(target_parameters=[...]) also puts LoRA on the stacked expert weights of moekit expert banks
(per expert or shared by all experts; moekit.adapters.experts).

s = lora_alpha / r (PEFT's scaling). Names follow PEFT: `r`, `lora_alpha`, `lora_dropout`,
`target_modules` (a module is targeted when its name equals an entry or ends with "." + the entry).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moekit.config import RouterConfig
from moekit.errors import UsageError

ADAPTER_CONFIG_VERSION = 1
EXPERT_ADAPTERS = ("per_expert", "shared")

_CONFIGS: dict[str, type[AdapterConfig]] = {}


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UsageError(f"{name}={value!r} is invalid; allowed: {allowed}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class AdapterConfig:
    """Fields every method has. `target_modules`: names of the nn.Linear modules to adapt, matched as
    PEFT does (equal to the module's full name, or its last dotted parts)."""

    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False  # whether the update is one fixed matrix (can fold into W)

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def validate(self) -> AdapterConfig:
        cls = type(self).__name__
        _check(_integer(self.r) and self.r >= 1, f"{cls}.r", self.r, "an integer >= 1")
        _check(_number(self.lora_alpha) and self.lora_alpha > 0, f"{cls}.lora_alpha", self.lora_alpha,
               "a finite number > 0")
        _check(_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, f"{cls}.lora_dropout",
               self.lora_dropout, "a number in [0, 1)")
        ok = (isinstance(self.target_modules, list | tuple)
              and (len(self.target_modules) > 0 or self.targets_parameters())
              and all(isinstance(t, str) and t.strip(".") for t in self.target_modules))
        _check(ok, f"{cls}.target_modules", self.target_modules, "a non-empty list of module names, e.g. "
               "['q_proj', 'v_proj']" + (" (or [] with target_parameters)" if self.method == "lora" else ""))
        self.target_modules = list(self.target_modules)
        return self

    def targets_parameters(self) -> bool:
        """Whether the config also targets stacked expert weights (`target_parameters`, LoRA only)."""
        return False

    def describe(self) -> str:
        return f"{self.method}(r={self.r}, lora_alpha={self.lora_alpha:g})"

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(d.get("router"), RouterConfig):
            d["router"] = d["router"].to_dict()
        return {"type": type(self).__name__, "version": ADAPTER_CONFIG_VERSION, "method": self.method, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """The config a `to_dict()` wrote, of the class its "method" names (UsageError for an unknown
        method or a newer version; unknown keys warn)."""
        d = dict(d)
        method = d.pop("method", cls.method or None)
        target = adapter_config_class(method) if cls is AdapterConfig or method != cls.method else cls
        d.pop("type", None)
        version = d.pop("version", ADAPTER_CONFIG_VERSION)
        if not _integer(version) or version > ADAPTER_CONFIG_VERSION:
            raise UsageError(f"{target.__name__} version {version!r} is newer than this moekit understands "
                             f"({ADAPTER_CONFIG_VERSION})")
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"{target.__name__}: ignoring unknown keys {unknown}", stacklevel=2)
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("router"), dict):
            kw["router"] = RouterConfig.from_dict(kw["router"])
        return target(**kw)


def register_config(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a config available by its `method` name (duplicates raise)."""
    if not cls.method:
        raise TypeError(f"{cls.__name__} has no method name")
    if cls.method in _CONFIGS:
        raise ValueError(f"adapter method {cls.method!r} is already registered (by {_CONFIGS[cls.method].__name__})")
    _CONFIGS[cls.method] = cls
    return cls


def adapter_config_class(method: str | None) -> type[AdapterConfig]:
    if method not in _CONFIGS:
        raise UsageError(f"adapter method {method!r} is unknown; registered: {sorted(_CONFIGS)}")
    return _CONFIGS[method]


def adapter_methods() -> list[str]:
    return sorted(_CONFIGS)


@register_config
@dataclass
class LoRAConfig(AdapterConfig):
    """Plain LoRA (arXiv 2106.09685): W x + (lora_alpha / r) B A x, B initialised to zero."""

    method: ClassVar[str] = "lora"
    mergeable: ClassVar[bool] = True

    # LoRA on fused MoE experts (moekit.adapters.experts): stacked (E, O, I) weights of moekit expert banks,
    # named as PEFT's `target_parameters` ("experts.gate_up_proj", "experts.down_proj", "experts.up_proj";
    # matched as target_modules: the full parameter name, or its last dotted parts).
    target_parameters: list[str] = field(default_factory=list)
    # "per_expert": A (E, r, I), B (E, O, r), one pair per expert; "shared": one (r, I), (O, r) pair for all
    expert_adapter: str = "per_expert"

    def validate(self) -> LoRAConfig:
        if self.target_parameters is None:  # PEFT writes null for "no parameter targets"
            self.target_parameters = []
        ok = (isinstance(self.target_parameters, list | tuple)
              and all(isinstance(t, str) and t.strip(".") for t in self.target_parameters))
        _check(ok, "LoRAConfig.target_parameters", self.target_parameters, "a list of stacked expert weight names, "
               "e.g. ['experts.gate_up_proj', 'experts.down_proj']")
        self.target_parameters = list(self.target_parameters)
        super().validate()
        _check(self.expert_adapter in EXPERT_ADAPTERS, "LoRAConfig.expert_adapter", self.expert_adapter,
               f"one of {EXPERT_ADAPTERS}")
        # NOTE: as PEFT's ParamWrapper, which refuses lora_dropout for parameter targets.
        _check(not (self.target_parameters and self.lora_dropout), "LoRAConfig.lora_dropout", self.lora_dropout,
               "0 when target_parameters is set (LoRA on stacked expert weights takes no dropout, as in PEFT)")
        return self

    def targets_parameters(self) -> bool:
        return bool(self.target_parameters)

    def describe(self) -> str:
        if not self.target_parameters:
            return super().describe()
        return f"lora(r={self.r}, lora_alpha={self.lora_alpha:g}, experts={self.expert_adapter})"


@dataclass
class _RoutedConfig(AdapterConfig):
    """A config whose experts a moekit router picks; the router's aux losses are weighted here.

    load_balance_coef: the Switch balance loss (moekit.losses.load_balance_loss) of each layer;
    z_loss_coef: the router z-loss; router_aux_coef: each loss the router returns itself (e.g. top-p's
    entropy "dynamic" loss). The model's adapter loss sums the weighted losses over adapted layers.
    """

    router: RouterConfig = field(default_factory=lambda: RouterConfig(kind="topk", k=2))
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    router_aux_coef: float = 1e-4

    def _check_router(self, num_experts: int, what: str) -> None:
        cls = type(self).__name__
        _check(isinstance(self.router, RouterConfig), f"{cls}.router", self.router, "a moekit.RouterConfig")
        if self.router.carries_state():
            raise UsageError(f"{cls}.router.kind={self.router.kind!r} is invalid here: the router carries a state from "
                             f"one MoE layer to the next, and {what} are independent layers; allowed: a router that "
                             "carries no state")
        self.router.validate(num_experts)
        for name in ("load_balance_coef", "z_loss_coef", "router_aux_coef"):
            value = getattr(self, name)
            _check(_number(value) and value >= 0, f"{cls}.{name}", value, "a finite number >= 0")


@register_config
@dataclass
class MixLoRAConfig(_RoutedConfig):
    """Top-k (or any moekit routing rule) mixture of `num_experts` LoRA experts on each targeted linear
    (MoLA, arXiv 2402.08562; MixLoRA, arXiv 2404.15159): each layer has its own router over its input."""

    method: ClassVar[str] = "mixlora"

    num_experts: int = 4

    def validate(self) -> MixLoRAConfig:
        super().validate()
        _check(_integer(self.num_experts) and self.num_experts >= 1, "MixLoRAConfig.num_experts", self.num_experts,
               "an integer >= 1")
        self._check_router(self.num_experts, "mixtures of LoRA experts")
        return self

    def describe(self) -> str:
        return (f"mixlora(E={self.num_experts}, r={self.r}, lora_alpha={self.lora_alpha:g}, "
                f"router={self.router.kind}({self.router.describe()}))")


@register_config
@dataclass
class LoRAMoEConfig(AdapterConfig):
    """LoRAMoE (arXiv 2312.09979; reference code Ablustrund/LoRAMoE): `num_experts` LoRA experts mixed by a
    dense softmax gate `lora_route` (no top-k), and the localized balancing constraint

        blc_weight * cv^2( I * C )   per adapted linear, summed over them (the reference's `blcls`)

    I (B, E): gate weights summed over each sequence's positions; C: 1 + blc_alpha for the experts of a
    sample's own type and 1 - blc_alpha for the others (type 1 -> the first E/2 experts, type 0 -> the
    last E/2); cv^2 = var / mean^2 over all B*E entries. Types come from `moekit.adapters.task_types`;
    without them the constraint is 0, as in the reference. Defaults are the reference script's
    (run_loramoe.sh: 8 experts, r 4, alpha 32, dropout 0.05, blc_alpha = blc_weight = 0).
    """

    method: ClassVar[str] = "loramoe"

    r: int = 4
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    num_experts: int = 8
    blc_alpha: float = 0.0
    blc_weight: float = 0.0

    def validate(self) -> LoRAMoEConfig:
        super().validate()
        _check(_integer(self.num_experts) and self.num_experts >= 1, "LoRAMoEConfig.num_experts", self.num_experts,
               "an integer >= 1")
        _check(_number(self.blc_alpha) and 0 <= self.blc_alpha < 1, "LoRAMoEConfig.blc_alpha", self.blc_alpha,
               "a number in [0, 1)")
        _check(_number(self.blc_weight) and self.blc_weight >= 0, "LoRAMoEConfig.blc_weight", self.blc_weight,
               "a finite number >= 0")
        if self.blc_weight > 0:
            _check(self.num_experts % 2 == 0, "LoRAMoEConfig.num_experts", self.num_experts,
                   "an even number when blc_weight > 0 (the constraint splits the experts into two halves)")
        return self

    def describe(self) -> str:
        return (f"loramoe(E={self.num_experts}, r={self.r}, lora_alpha={self.lora_alpha:g}, "
                f"blc_alpha={self.blc_alpha:g}, blc_weight={self.blc_weight:g})")


@register_config
@dataclass
class SMoRAConfig(_RoutedConfig):
    """SMoRA (arXiv 2501.15103): one LoRA of rank r whose r ranks are the experts; a moekit router over
    the layer input picks ranks (default top-8 of 64) and its weights gate them.

    NOTE: the paper balances ranks with an auxiliary-loss-free selection bias; here the router is any
    moekit router and balance comes from `load_balance_coef` (the Switch loss over ranks).
    """

    method: ClassVar[str] = "smora"

    r: int = 64
    lora_alpha: float = 128.0
    router: RouterConfig = field(default_factory=lambda: RouterConfig(kind="topk", k=8))

    def validate(self) -> SMoRAConfig:
        super().validate()
        self._check_router(self.r, "SMoRA rank gates")
        return self

    def describe(self) -> str:
        return f"smora(r={self.r}, lora_alpha={self.lora_alpha:g}, router={self.router.kind}({self.router.describe()}))"


@register_config
@dataclass
class FlyLoRAConfig(AdapterConfig):
    """FlyLoRA (NeurIPS 2025; reference: the PEFT fork in gfyddha/FlyLoRA, `lora/layer.py`): A (r, in) is a
    frozen sparse random projection, each row with in // (r // k) non-zeros drawn from N(0, 1/r^2); the
    k ranks with the largest A x + b are active (implicit routing); only B trains. The balancing bias b
    moves by `bias_rate` * sign(mean count - count) after each optimiser step. Defaults are the
    reference script's (run_mmlu.sh: r 32, alpha 64, k 8, bias_u 1e-3, dropout 0). `seed` fixes A.
    """

    method: ClassVar[str] = "flylora"

    r: int = 32
    lora_alpha: float = 64.0
    k: int = 8
    bias_rate: float = 1e-3
    seed: int = 0

    def validate(self) -> FlyLoRAConfig:
        super().validate()
        _check(_integer(self.k) and 1 <= self.k <= self.r, "FlyLoRAConfig.k", self.k, f"an integer in [1, r={self.r}]")
        _check(_number(self.bias_rate) and self.bias_rate >= 0, "FlyLoRAConfig.bias_rate", self.bias_rate,
               "a finite number >= 0")
        _check(_integer(self.seed) and self.seed >= 0, "FlyLoRAConfig.seed", self.seed, "an integer >= 0")
        return self

    def describe(self) -> str:
        return f"flylora(r={self.r}, k={self.k}, lora_alpha={self.lora_alpha:g})"
