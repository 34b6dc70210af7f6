"""Compressed wrapped transformers models: save, load, and what transformers itself can read.

A wrapped model (moekit.hf.wrap) is pruned, merged and quantised like a moekit model (its
HFMoEBlocks are MoELayers). Its saved form is a directory:

    config.json                 the transformers config
    moekit-compression.json     the versioned record of what was done (moekit.compress.record), plus
                                {"hf": {"counts": experts per layer, "transformers": bool, "weights": file}}
    model.safetensors           when transformers can hold the result (every layer pruned to one count,
      or                        nothing merged or quantised): an ordinary transformers checkpoint, its
    moekit-compressed.safetensors  config's expert count set to the new one; otherwise moekit's own file
                                (the wrapped model's state_dict: per-layer counts, merged experts'
                                expert_map_E, quantised codes and scales), which transformers does not
                                find, so `from_pretrained` fails instead of loading something else
    tokenizer files             when the source had a tokenizer

`load_hf(dir)` builds the transformers model from its config (random weights), wraps it, gives each
block the record's structure and loads the weights; `moekit eval | generate | analyze --hf DIR` do
this for such a directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.compress.record import restore
from moekit.errors import DataError, UsageError
from moekit.experts import ExpertBank
from moekit.layers.moe import moe_layers
from moekit.utils.io import atomic_dir, atomic_write_text

__all__ = ["RECORD", "count_field", "export_hf_dir", "is_compressed_hf", "load_hf", "save_hf", "transformers_can_hold"]

RECORD = "moekit-compression.json"
WEIGHTS = "moekit-compressed.safetensors"
KIND = "hf-compressed"  # ownership marker kind (moekit.utils.io)
# The expert-count field of the transformers MoE configs (Mixtral, Qwen-MoE / OLMoE, DeepSeek, ...).
_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def count_field(config: Any, before: int) -> str | None:
    """The name of `config`'s routed-expert count (the field holding `before`), None if none does."""
    return next((f for f in _COUNT_FIELDS if getattr(config, f, None) == before), None)


def transformers_can_hold(model: nn.Module) -> str | None:
    """None when a transformers checkpoint holds `model`'s compressed experts, else why not (one clause)."""
    layers = moe_layers(model)
    counts = [m.router.num_experts for m in layers]
    if len(set(counts)) > 1:
        return f"its layers keep different expert counts ({' '.join(map(str, counts))}) and a transformers config has one"
    if any(m.expert_map_E is not None for m in layers):
        return "its experts were merged (router experts mapped to fewer experts), which transformers' blocks cannot express"
    if any(not isinstance(m.experts, ExpertBank) for m in layers):
        return "its experts are quantised (moekit's group-wise int codes), which transformers' MoE checkpoints do not hold"
    if any(_own_selection_bias(m) for m in layers):
        return ("its routers carry a selection bias (aux-loss-free balancing) that the transformers blocks have no "
                "place for")
    return None


def _own_selection_bias(layer: nn.Module) -> bool:
    """Whether a wrapped layer's router holds a non-zero selection bias of moekit's own (one `update_bias` trained
    where the HF block has none; a block's own, DeepSeek-V3's, is one of its HF-named tensors)."""
    bias_E = getattr(layer.router, "e_score_correction_bias", None)
    return (bias_E is not None and "router.e_score_correction_bias" not in getattr(layer, "_hf_names", {})
            and bool(bias_E.any()))


def is_compressed_hf(path: str | os.PathLike) -> bool:
    return (Path(path) / RECORD).is_file()


def save_hf(model: nn.Module, record: dict[str, Any], out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write the compressed wrapped transformers `model` (module doc) with `record` into `out_dir`, as one
    atomic directory (absent, empty or one this function wrote). Returns the directory."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    layers = moe_layers(model)
    counts = [m.router.num_experts for m in layers]
    before = [s for s in record["steps"] if s["method"] == "prune"]
    why_not = transformers_can_hold(model)
    config = model.config
    field = count_field(config, before[0]["before"][0]) if before else None
    if why_not is None and before and field is None:
        why_not = f"{type(config).__name__} has no expert-count field moekit knows ({', '.join(_COUNT_FIELDS)})"
    record = {**record, "hf": {"counts": counts, "transformers": why_not is None,
                               "weights": "model.safetensors" if why_not is None else WEIGHTS,
                               "why_not_transformers": why_not}}
    with atomic_dir(out_dir, KIND, "moekit compress") as tmp:
        if why_not is None:
            if field is not None:
                setattr(config, field, counts[0])
            model.save_pretrained(tmp)  # an ordinary transformers checkpoint
        else:
            config.save_pretrained(tmp)
            state = {}
            seen: set[tuple[int, int]] = set()
            for name, t in model.state_dict().items():  # tied weights (embeddings / lm_head) once
                key = (t.untyped_storage().data_ptr(), t.storage_offset())
                if key in seen:
                    continue
                seen.add(key)
                state[name] = t.detach().contiguous()
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / RECORD, json.dumps(record, indent=1) + "\n")
    return out_dir


def load_hf(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(wrapped transformers model in eval mode, its tokenizer or None) from a directory `save_hf` wrote.
    Raises DataError for a damaged record or weights that do not fit it."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import moekit.hf

    path = Path(path)
    try:
        record = json.loads((path / RECORD).read_text())
        info = record["hf"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path / RECORD}: not a moekit compression record ({e})") from None
    if info.get("transformers"):
        model, tok = moekit.hf.load_pretrained(path)
    else:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        torch.manual_seed(0)
        model = moekit.hf.wrap(AutoModelForCausalLM.from_config(config).eval(), verify=False)
        # tokenizer.save_pretrained always writes tokenizer_config.json
        tok = (AutoTokenizer.from_pretrained(path, local_files_only=True)
               if (path / "tokenizer_config.json").is_file() else None)
    restore(model, record)
    if not info.get("transformers"):
        state = load_file(str(path / WEIGHTS))
        result = model.load_state_dict(state, strict=False)
        params = dict(model.named_parameters(remove_duplicate=False))
        loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
        missing = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded_ptrs]
        if missing or result.unexpected_keys:
            raise DataError(f"{path / WEIGHTS} does not fit its record: missing {missing[:4]}, unexpected "
                            f"{result.unexpected_keys[:4]}")
    got = [m.router.num_experts for m in moe_layers(model)]
    if got != info["counts"]:
        raise DataError(f"{path}: the loaded model has {got} experts per layer; its record says {info['counts']}")
    return model.eval(), tok


def export_hf_dir(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the compressed directory `path` as a plain transformers checkpoint in `out_dir` (an export
    directory: absent, empty or a moekit export). Raises UsageError, naming why, when transformers cannot
    hold it (per-layer counts, merged or quantised experts)."""
    from moekit.hf.export import KIND as EXPORT_KIND

    info = json.loads((Path(path) / RECORD).read_text()).get("hf", {})
    if not info.get("transformers"):
        raise UsageError(f"moekit export: {path} cannot be written as a transformers checkpoint: "
                         f"{info.get('why_not_transformers')}; moekit eval | generate | analyze --hf {path} run it")
    model, tok = load_hf(path)
    with atomic_dir(out_dir, EXPORT_KIND, "moekit export") as tmp:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    return Path(out_dir)
