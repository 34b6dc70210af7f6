"""Arithmetic on saved LoRAs: uniform (or weighted) merges and mixtures of LoRA experts built from them.

A LoRA here is its adapter state (`adapter_state_dict`, PEFT keys: "base_model.model.<module>.lora_A.weight"
(r, I) and ".lora_B.weight" (O, r)) plus its LoRAConfig; every LoRA of one library adapts the same
modules with the same r and lora_alpha.

  merge_loras      one LoRA of rank N*r: A = [A_1; ...; A_N], B = [w_1 B_1, ..., w_N B_N], so that
                   s * B A = sum_i w_i s B_i A_i exactly (uniform: w_i = 1/N); it can be merged into W
  load_mixture     a MixLoRA layer per module whose expert e is LoRA e, and a fresh router
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moekit.adapters.config import LoRAConfig, MixLoRAConfig
from moekit.adapters.model import AdapterSummary, adapter_layers, add_adapters, summary
from moekit.adapters.store import PREFIX
from moekit.errors import UsageError


def _modules(state: dict[str, torch.Tensor]) -> list[str]:
    suffix = ".lora_A.weight"
    return sorted(k[len(PREFIX):-len(suffix)] for k in state if k.startswith(PREFIX) and k.endswith(suffix))


def _check_library(loras: list[tuple[LoRAConfig, dict[str, torch.Tensor]]]) -> list[str]:
    if not loras:
        raise UsageError("a LoRA library needs at least one LoRA")
    cfg0, state0 = loras[0]
    modules = _modules(state0)
    for i, (cfg, state) in enumerate(loras):
        if cfg.method != "lora":
            raise UsageError(f"LoRA {i} is a {cfg.method} adapter; libraries hold plain LoRAs")
        if cfg.target_parameters:
            raise UsageError(f"LoRA {i} adapts stacked expert weights ({', '.join(cfg.target_parameters)}); libraries "
                             "hold LoRAs on linear layers (target_modules only)")
        if (cfg.r, cfg.lora_alpha) != (cfg0.r, cfg0.lora_alpha) or _modules(state) != modules:
            raise UsageError(f"LoRA {i} differs from LoRA 0 (r={cfg.r}, lora_alpha={cfg.lora_alpha}, "
                             f"{len(_modules(state))} modules vs r={cfg0.r}, lora_alpha={cfg0.lora_alpha}, "
                             f"{len(modules)} modules); a library's LoRAs share r, lora_alpha and modules")
    return modules


def merge_loras(loras: list[tuple[LoRAConfig, dict[str, torch.Tensor]]],
                weights: list[float] | None = None) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The weighted sum of the LoRAs' updates as one LoRA of rank N*r (weights default to 1/N: the
    uniform merge). Exact: its update is sum_i w_i * s * B_i A_i."""
    modules = _check_library(loras)
    N = len(loras)
    weights = [1.0 / N] * N if weights is None else list(weights)
    if len(weights) != N:
        raise UsageError(f"merge_loras: {len(weights)} weights for {N} LoRAs")
    cfg0 = loras[0][0]
    # rank N*r and alpha N*alpha keep the scaling alpha / r of every member
    cfg = dataclasses.replace(cfg0, r=N * cfg0.r, lora_alpha=N * cfg0.lora_alpha)
    state: dict[str, torch.Tensor] = {}
    for name in modules:
        a_key, b_key = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        state[a_key] = torch.cat([s[a_key] for _, s in loras], dim=0)
        state[b_key] = torch.cat([w * s[b_key] for w, (_, s) in zip(weights, loras, strict=True)], dim=1)
    return cfg, state


def load_mixture(model: nn.Module, loras: list[tuple[LoRAConfig, dict[str, torch.Tensor]]],
                 cfg: MixLoRAConfig | None = None, train_experts: bool = False) -> AdapterSummary:
    """Add a MixLoRA adapter to `model` whose expert e, in every adapted module, is LoRA e of `loras`
    (its A and B, same scaling); the routers start fresh. `cfg` gives the router and losses (its
    num_experts, r, lora_alpha and target_modules are taken from the library). Only the routers train
    unless `train_experts`. Returns the adapter summary."""
    modules = _check_library(loras)
    lora_cfg = loras[0][0]
    cfg = MixLoRAConfig() if cfg is None else cfg
    cfg = dataclasses.replace(cfg, num_experts=len(loras), r=lora_cfg.r, lora_alpha=lora_cfg.lora_alpha,
                              lora_dropout=lora_cfg.lora_dropout, target_modules=list(lora_cfg.target_modules))
    add_adapters(model, cfg)
    layers = dict(adapter_layers(model))
    if sorted(layers) != modules:
        raise UsageError(f"the library adapts {len(modules)} modules but this model's targets give {len(layers)}; "
                         "was it trained on another architecture?")
    with torch.no_grad():
        for name, layer in layers.items():
            for e, (_, state) in enumerate(loras):
                layer.lora_A[e].copy_(state[f"{PREFIX}{name}.lora_A.weight"])
                layer.lora_B[e].copy_(state[f"{PREFIX}{name}.lora_B.weight"])
            layer.lora_A.requires_grad_(train_experts)
            layer.lora_B.requires_grad_(train_experts)
    return summary(model)
