"""Put adapters into a model, and what a model with adapters can do (summary, losses, merging).

Works on any module whose targeted layers are `torch.nn.Linear`: transformers causal LMs (Llama,
Qwen2, ...) and moekit's own models (attention projections, dense FFNs). Plain LoRA also targets the
stacked expert weights of moekit expert banks (`LoRAConfig.target_parameters`; moekit MoE layers and
transformers MoE models wrapped by moekit.hf.wrap; see moekit.adapters.experts). PEFT's conventions:

  add_adapters(model, cfg)   wrap each targeted nn.Linear in the method's layer (`base_layer` keeps the
                             original module), freeze every other parameter; a target that matches no
                             module, or a module that is not an nn.Linear, is refused with its name
  aux_loss(model)            the adapters' weighted aux losses of the last forward, summed over layers
  after_optimizer_step(model)  routing state updates (selection biases, k schedules), once per step
  merge / unmerge            fold plain LoRA into the base weights and back (bit-exact: the original
                             weights are kept while merged); merge_and_unload drops the adapters
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moekit.adapters.config import AdapterConfig
from moekit.adapters.experts import BANK_PARAMS, ExpertLoRA
from moekit.adapters.layer import AdapterLayer, layer_class
from moekit.errors import UsageError
from moekit.experts import ExpertBank

# What `adapter_layers` finds: adapters on linear layers, and LoRA on expert banks.
ADAPTER_MODULES = (AdapterLayer, ExpertLoRA)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _linear_kinds(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name})


def find_targets(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Full names of the modules `target_modules` selects (PEFT's rule: equal to an entry, or ending in
    "." + entry). UsageError naming the entry that matches nothing, or the module that is not an
    nn.Linear."""
    names = [name for name, _ in model.named_modules() if name]
    found: list[str] = []
    for target in target_modules:
        hits = [n for n in names if _matches(n, target)]
        if not hits:
            raise UsageError(f"target_modules: {target!r} matches no module of {type(model).__name__}; its linear "
                             f"layers are named {', '.join(_linear_kinds(model)) or '(none)'}")
        found.extend(h for h in hits if h not in found)
    for name in found:
        module = model.get_submodule(name)
        if isinstance(module, ADAPTER_MODULES):
            raise UsageError(f"target_modules: {name} already has a {module.cfg.method} adapter; remove_adapters() "
                             "first")
        if isinstance(module, ExpertBank):
            raise UsageError(f"target_modules: {name} is a moekit ExpertBank (stacked expert weights), not a "
                             "torch.nn.Linear; target its weights with LoRAConfig(target_parameters=['experts."
                             "gate_up_proj', 'experts.down_proj'])")
        if not isinstance(module, nn.Linear):
            raise UsageError(f"target_modules: {name} is a {type(module).__name__}, not a torch.nn.Linear; adapters "
                             f"wrap linear layers (here: {', '.join(_linear_kinds(model)) or '(none)'})")
    return found


def _bank_weights(model: nn.Module) -> list[str]:
    """Distinct "<module>.<weight>" endings of the expert-bank weights of `model` (for error messages)."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, ExpertBank):
            for p in BANK_PARAMS:
                short = f"{name.rsplit('.', 1)[-1]}.{p}"
                if getattr(m, p) is not None and short not in found:
                    found.append(short)
    return found


def find_parameter_targets(model: nn.Module, target_parameters: list[str]) -> dict[str, list[str]]:
    """{expert bank name: [weight names]} that `target_parameters` selects (PEFT's rule for its
    `target_parameters`: the parameter's full name equals an entry or ends with "." + entry). UsageError
    naming the entry that matches no parameter, or the module whose matched parameter is not a moekit
    expert bank's stacked weight (e.g. an unwrapped transformers experts module)."""
    params = [(module_name, p, m) for module_name, m in model.named_modules()
              for p, _ in m.named_parameters(recurse=False, prefix="")]
    found: dict[str, list[str]] = {}
    for target in target_parameters:
        hits = [(n, p, m) for n, p, m in params if _matches(f"{n}.{p}" if n else p, target)]
        if not hits:
            banks = _bank_weights(model)
            raise UsageError(f"target_parameters: {target!r} matches no parameter of {type(model).__name__}; "
                             + (f"its expert banks' weights are {', '.join(banks)}" if banks else
                                "it has no moekit expert bank (a transformers MoE model needs moekit.hf.wrap(model) "
                                "first)"))
        for name, p, module in hits:
            if isinstance(module, ADAPTER_MODULES):
                raise UsageError(f"target_parameters: {name} already has a {module.cfg.method} adapter; "
                                 "remove_adapters() first")
            if not isinstance(module, ExpertBank) or p not in BANK_PARAMS:
                hint = (" (a transformers experts module: wrap the model with moekit.hf.wrap(model) first)"
                        if getattr(module, p).dim() == 3 else "")
                raise UsageError(f"target_parameters: {name}.{p} is a parameter of {name} ({type(module).__name__}), "
                                 f"not a stacked weight of a moekit ExpertBank{hint}")
            if p not in found.setdefault(name, []):
                found[name].append(p)
    return found


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer | ExpertLoRA]]:
    """(name, layer) of every adapter layer (on a linear layer or an expert bank), in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTER_MODULES)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_adapters(model: nn.Module, cfg: AdapterConfig) -> AdapterSummary:
    """Wrap the targeted linear layers of `model` (in place) and freeze every non-adapter parameter.

    With `LoRAConfig.target_parameters`, each expert bank holding a targeted stacked weight is replaced by
    an ExpertLoRA (per-expert or shared adapters on those weights).

    Returns the summary (`str()` of it reads "lora(r=8, lora_alpha=16) on 8 modules (...)", and for expert
    banks "LoRA on 128 of 128 experts in 24 layers"). Raises UsageError for an invalid config, an unknown
    target, a target that is not an nn.Linear (or an expert bank's stacked weight), or a model that
    already has adapters.
    """
    cfg.validate()
    if adapter_layers(model):
        raise UsageError(f"add_adapters: {type(model).__name__} already has adapters; remove_adapters() first")
    targets = find_targets(model, cfg.target_modules)
    banks = find_parameter_targets(model, cfg.target_parameters) if cfg.targets_parameters() else {}
    cls = layer_class(cfg.method)
    for p in model.parameters():
        p.requires_grad_(False)
    for index, name in enumerate(targets):
        layer = cls(model.get_submodule(name), cfg, index)
        _set_submodule(model, name, layer.train(model.training))  # new modules follow the model's mode
    for index, (name, params) in enumerate(banks.items(), start=len(targets)):
        layer = ExpertLoRA(model.get_submodule(name), cfg, params, index)
        _set_submodule(model, name, layer.train(model.training))
    return summary(model)


def remove_adapters(model: nn.Module) -> None:
    """Put the original linear layers back (unmerging first); their parameters stay frozen."""
    for name, layer in adapter_layers(model):
        if layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)


@dataclass
class AdapterSummary:
    method: str
    describe: str
    modules: list[str]
    trainable: int
    total: int
    experts_adapted: int = 0  # experts whose stacked weights carry LoRA, summed over expert banks
    experts_total: int = 0  # experts of every expert bank of the model
    expert_layers: int = 0  # expert banks with LoRA
    expert_weights: tuple[str, ...] = ()  # the adapted stacked weights (gate_up_proj, down_proj, ...)

    @property
    def kinds(self) -> Counter:
        return Counter(name.rsplit(".", 1)[-1] for name in self.modules)

    @property
    def num_blocks(self) -> int:
        """Distinct numbered blocks (the first integer in each module path) holding adapters."""
        blocks = {m.group(1) for name in self.modules if (m := re.search(r"(?:^|\.)(\d+)\.", name))}
        return len(blocks)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(self.kinds.items()))
        where = f" in {self.num_blocks} layers" if self.num_blocks else ""
        share = 100.0 * self.trainable / max(self.total, 1)
        experts = (f"LoRA on {self.experts_adapted} of {self.experts_total} experts in {self.expert_layers} layers "
                   f"({', '.join(self.expert_weights)})")
        if not self.expert_layers:
            what = f" on {len(self.modules)} modules ({kinds}){where}"
        elif self.expert_layers == len(self.modules):
            what = f": {experts}"
        else:
            what = f" on {len(self.modules)} modules ({kinds}){where}; {experts}"
        return f"{self.describe}{what}; trainable {self.trainable:,} of {self.total:,} parameters ({share:.2f}%)"


def summary(model: nn.Module) -> AdapterSummary:
    layers = adapter_layers(model)
    if not layers:
        raise UsageError(f"{type(model).__name__} has no adapters")
    cfg = layers[0][1].cfg
    unique = {id(p): p for p in model.parameters()}.values()
    banks = [layer for _, layer in layers if isinstance(layer, ExpertLoRA)]
    return AdapterSummary(cfg.method, cfg.describe(), [name for name, _ in layers],
                          sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique),
                          experts_adapted=sum(b.num_experts for b in banks),
                          experts_total=sum(m.num_experts for m in model.modules() if isinstance(m, ExpertBank)),
                          expert_layers=len(banks),
                          expert_weights=tuple(p for p in BANK_PARAMS if any(p in b.targets for b in banks)))


def adapter_config(model: nn.Module) -> AdapterConfig:
    layers = adapter_layers(model)
    if not layers:
        raise UsageError(f"{type(model).__name__} has no adapters")
    return layers[0][1].cfg


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum over adapter layers of each layer's weighted aux losses from the last forward (a zero
    tensor when there are none: plain LoRA, FlyLoRA, inference)."""
    total = None
    for _, layer in adapter_layers(model):
        value = layer.aux_loss()
        if value is not None:
            total = value if total is None else total + value
    if total is None:
        param = next(model.parameters())
        return torch.zeros((), device=param.device)
    return total


@torch.no_grad()
def after_optimizer_step(model: nn.Module) -> None:
    """Call once after each optimiser step: selection biases and k schedules move (FlyLoRA's bias,
    routers' aux-loss-free bias and k schedules in MixLoRA / SMoRA)."""
    for _, layer in adapter_layers(model):
        layer.after_optimizer_step()


@contextlib.contextmanager
def task_types(model: nn.Module, types_B: torch.Tensor) -> Iterator[None]:
    """LoRAMoE's sample types (0 or 1 per sequence of the batch) for the forwards inside the block, which
    the localized balancing constraint reads."""
    types_B = torch.as_tensor(types_B)
    if types_B.dim() != 1 or not bool(((types_B == 0) | (types_B == 1)).all()):
        raise UsageError(f"task_types: expected a 1-D tensor of 0s and 1s (one per sequence), got {types_B.tolist()}")
    layers = [layer for _, layer in adapter_layers(model) if hasattr(layer, "task_types_B")]
    if not layers:
        raise UsageError("task_types: the model has no LoRAMoE adapters")
    for layer in layers:
        layer.task_types_B = types_B
    try:
        yield
    finally:
        for layer in layers:
            layer.task_types_B = None


def _tied(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (plain LoRA only; other methods depend on the input).
    UsageError for an unmergeable method or a weight shared with another module (tied embeddings)."""
    layers = adapter_layers(model)
    if not layers:
        raise UsageError(f"merge: {type(model).__name__} has no adapters")
    tied = _tied(model)
    for name, layer in layers:
        for weight in layer.base_weights():
            owners = tied.get(id(weight), [])
            if len(owners) > 1:
                raise UsageError(f"merge: {name}'s weight is shared with "
                                 f"{', '.join(o for o in owners if not o.startswith(name))} (tied weights); merging "
                                 "would change those too")
        layer.delta_weight()  # refuses unmergeable methods before anything changes
    for _, layer in layers:
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Restore the base weights a `merge` changed, bit for bit."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace each adapter layer by its (now updated) linear layer: a plain model again,
    with no copy of the original weights kept. Returns `model`."""
    merge(model)
    for name, layer in adapter_layers(model):
        _set_submodule(model, name, layer.unload())
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the block (adapters skipped, weights untouched)."""
    layers = [layer for _, layer in adapter_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before, strict=True):
            layer.disabled = was
