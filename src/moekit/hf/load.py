"""Load a local transformers checkpoint directory and wrap it (the CLI's entry point)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moekit.errors import UsageError
from moekit.hf.version import check_transformers_version
from moekit.hf.wrap import wrap

# Files any of transformers' tokenizer formats ships (fast json, sentencepiece, BPE vocab).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_pretrained(path: str | Path, dtype: torch.dtype | str | None = None, *, backend: str = "auto",
                    verify: bool = True) -> tuple[nn.Module, object | None]:
    """`AutoModelForCausalLM.from_pretrained(path)` from a local directory (never the network), wrapped
    with `moekit.hf.wrap`; returns (model, tokenizer), tokenizer None when the directory has none.

    dtype: None keeps transformers' default; a torch.dtype, or a string such as "bfloat16" or "auto".
    """
    check_transformers_version()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"moekit.hf.load_pretrained(): {str(path)!r} is not a directory; expected a local "
                                "checkpoint directory (config.json + weights), e.g. one written by save_pretrained")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"moekit.hf.load_pretrained(): {str(path)!r} has no config.json, so it is not a "
                                "transformers checkpoint directory")
    if (path / "moekit-compression.json").is_file() and not (path / "model.safetensors").is_file():
        raise UsageError(f"moekit.hf.load_pretrained(): {str(path)!r} was written by moekit compress in moekit's own "
                         "format (transformers cannot hold its experts); load it with moekit.compress.hf.load_hf")
    _check_causal_lm(path)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return wrap(model, backend=backend, verify=verify), tokenizer


def _check_causal_lm(path: Path) -> None:
    """UsageError naming the model type where AutoModelForCausalLM cannot load the directory (an unknown type; an
    encoder-decoder such as Switch Transformers or NLLB-MoE), instead of transformers' message listing every
    causal-LM config class (thousands of characters)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    where = f"moekit.hf.load_pretrained(): {str(path)!r}"
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except ValueError as e:  # an unknown model_type (an invalid JSON file is transformers' own one-line OSError)
        if "model type" not in str(e) and "model_type" not in str(e):
            raise
        import json

        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (ValueError, AttributeError):
            raise e from None
        if model_type is None:
            raise UsageError(f"{where}: its config.json has no model_type; expected a transformers checkpoint's "
                             "config.json (written by save_pretrained), which names its model type") from None
        raise UsageError(f"{where} has model_type {model_type!r}, which transformers {transformers.__version__} does "
                         "not know; expected a model type of the installed transformers") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        archs = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
        raise UsageError(f"{where} holds a {config.model_type} model ({archs}), which is not a causal language model; "
                         "expected a checkpoint AutoModelForCausalLM loads (wrap other models in Python: "
                         "moekit.hf.wrap(model))")
