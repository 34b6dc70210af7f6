"""Saving and loading adapters: a directory in PEFT's layout.

  DIR/adapter_config.json        the config (`to_dict()`: type, version, method, fields), the adapted
                                 module names, and for plain LoRA PEFT's own fields (peft_type "LORA",
                                 r, lora_alpha, lora_dropout, target_modules, bias "none", task_type),
                                 meant for `peft.PeftModel.from_pretrained` (untested: PEFT is not a
                                 dependency)
                                 LoRA on fused MoE experts adds target_parameters (PEFT's field for 3-D
                                 expert weights) and expert_adapter; a shared expert adapter gets no
                                 PEFT fields (PEFT has no such adapter)
  DIR/adapter_model.safetensors  every adapter tensor (parameters and persistent buffers such as FlyLoRA's
                                 frozen projection or a router's selection bias), keyed as PEFT keys
                                 them: "base_model.model.<module name>.<tensor name>", e.g.
                                 base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight; expert
                                 banks as PEFT's ParamWrapper (moekit.adapters.experts), e.g.
                                 base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight

The directory is written whole or not at all (a temporary sibling, then one rename) and carries
moekit's ownership marker (kind "adapter"): a directory moekit did not write is never overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.adapters.config import AdapterConfig
from moekit.adapters.model import adapter_config, adapter_layers, add_adapters, remove_adapters
from moekit.errors import DataError
from moekit.utils.io import atomic_dir, check_writable_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
KIND = "adapter"


def _layer_keys(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """PEFT key -> (adapter layer, key in the layer's `adapter_state`, tensor) of every adapter tensor."""
    keys = {}
    for name, layer in adapter_layers(model):
        for key, value in layer.adapter_state().items():
            keys[f"{PREFIX}{name}.{key}"] = (layer, key, value)
    if not keys:
        raise DataError(f"{type(model).__name__} has no adapters to save")
    return keys


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of `model` under its PEFT key (the base layers' weights excluded)."""
    return {key: value for key, (_, _, value) in _layer_keys(model).items()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the state") -> None:
    """Copy `state` (keys as `adapter_state_dict`) into the model's adapters. DataError naming the first
    missing, unexpected or misshapen tensor."""
    expected = _layer_keys(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this model's adapters do not"
        raise DataError(f"{source} does not fit the model's adapters: it {what} ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected)")
    per_layer: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
    for key, (layer, own_key, target) in expected.items():
        value = state[key]
        if value.shape != target.shape:
            raise DataError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
        per_layer.setdefault(id(layer), (layer, {}))[1][own_key] = value
    for layer, layer_state in per_layer.values():
        layer.load_adapter_state(layer_state)


def _config_json(model: nn.Module) -> dict:
    cfg = adapter_config(model)
    d = cfg.to_dict()
    d["modules"] = [name for name, _ in adapter_layers(model)]
    if cfg.method == "lora":
        d["target_parameters"] = d["target_parameters"] or None  # PEFT's "no parameter targets"
        # PEFT's own fields, where PEFT can express the adapter (not one LoRA shared by all experts):
        # PeftModel.from_pretrained reads this directory (untested: PEFT is not a dependency).
        if not (cfg.target_parameters and cfg.expert_adapter == "shared"):
            d.update(peft_type="LORA", task_type="CAUSAL_LM", bias="none", fan_in_fan_out=False,
                     modules_to_save=None, base_model_name_or_path=None, inference_mode=True)
    return d


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapters to `directory` (absent, empty or an earlier adapter directory).
    Raises NotOwnedError for a directory moekit did not write."""
    directory = Path(directory)
    check_writable_dir(directory, KIND, "save_adapters")  # before computing anything
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    config = _config_json(model)
    with atomic_dir(directory, KIND, "save_adapters") as tmp:  # whole or not at all
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def read_adapter_config(directory: str | os.PathLike) -> tuple[AdapterConfig, list[str]]:
    """(config, adapted module names) of a saved adapter directory (DataError if damaged or missing)."""
    path = Path(directory) / CONFIG_NAME
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        modules = d.pop("modules")
        for key in ("peft_type", "task_type", "bias", "fan_in_fan_out", "modules_to_save",
                    "base_model_name_or_path", "inference_mode"):
            d.pop(key, None)
        return AdapterConfig.from_dict(d), list(modules)
    except FileNotFoundError:
        raise DataError(f"{directory} is not an adapter directory (no {CONFIG_NAME}); expected the output of "
                        "save_adapters") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is damaged or not a moekit adapter config ({type(e).__name__}: {e})") from None


def read_adapter_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise DataError(f"{directory} has no {WEIGHTS_NAME}") from None
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise DataError(f"{path} is damaged ({type(e).__name__}: {e})") from None


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the saved adapters to `model` (same base architecture) and load their tensors. Returns
    `model`. DataError when the directory's modules or tensors do not fit the model."""
    cfg, modules = read_adapter_config(directory)
    state = read_adapter_state(directory)
    add_adapters(model, cfg)
    try:
        names = [name for name, _ in adapter_layers(model)]
        if names != modules:
            extra = sorted(set(names) - set(modules)) or sorted(set(modules) - set(names))
            raise DataError(f"{directory} adapts other modules than this model's targets give (e.g. {extra[:1]}); "
                            "was it saved from another architecture?")
        load_adapter_state(model, state, str(directory))
    except BaseException:
        remove_adapters(model)  # the model is left as it came
        raise
    return model
