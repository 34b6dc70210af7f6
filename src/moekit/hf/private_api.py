"""The private transformers names moekit.hf relies on, in one place, without a silent fallback.

transformers promises nothing about names that start with `_`; moekit.hf uses the few below because
no public name does the same job. Each is imported (or read) here and nowhere else, with no `None`
fallback: if a transformers release drops one, `import moekit.hf` (or the call that needs it) fails
with an error naming it, instead of a feature quietly switching off. tests/hf/test_private_api.py
imports each of them and checks that they still do what moekit.hf assumes.

  transformers.utils.output_capturing.OutputRecorder     the record specs of `output_router_logits=True`
  transformers.utils.output_capturing._active_collector  the outputs being collected by this forward
  transformers.integrations.moe._default_apply_gate      the experts' silu(gate) * up, to recognise it
  PreTrainedModel._can_record_outputs (class attribute)  which module outputs a model can record
  PretrainedConfig._experts_implementation_internal      the experts implementation a config selects
  GenerationMixin._optimize_model_for_decode             generate()'s switch to 'batched_mm' while decoding
                                                         on GPUs (a no-op on wrapped models)
  PreTrainedModel._init_weights                          the per-module initialisation (re-initialises wrapped
                                                         blocks through their original modules)
  PreTrainedModel._output_capturing_hooks_installed      set once transformers has hooked the modules whose
  and its hooks' name `output_capturing_hook`            outputs it records (cleared by unwrap, see below)
  transformers.trainer_pt_utils.get_parameter_names      the Trainer's weight-decay name walk (named_children +
                                                         _parameters): a wrapped layer answers it with HF names
"""

from __future__ import annotations

import importlib
from typing import Any

import transformers

from moekit.hf.version import SUPPORTED_TRANSFORMERS

__all__ = ["CAPTURE_FLAG", "DECODE_SWITCH", "INIT_HOOK", "INIT_WALK", "PRIVATE_ATTRIBUTES", "PRIVATE_SYMBOLS", "OutputRecorder", "active_collector", "default_apply_gate",
           "experts_implementation", "forget_output_capturing", "record_specs", "set_experts_implementation",
           "trainer_parameter_names"]

# (module, name) of every private (or undocumented) transformers symbol moekit.hf imports.
PRIVATE_SYMBOLS = (
    ("transformers.utils.output_capturing", "OutputRecorder"),
    ("transformers.utils.output_capturing", "_active_collector"),
    ("transformers.integrations.moe", "_default_apply_gate"),
    ("transformers.trainer_pt_utils", "get_parameter_names"),  # public, but undocumented: its walk is what we answer
)
# Private attributes moekit.hf reads on transformers objects, and on what.
PRIVATE_ATTRIBUTES = {
    "_can_record_outputs": "a PreTrainedModel class: {output name: OutputRecorder | module class | list of them}",
    "_experts_implementation_internal": "a PretrainedConfig: the experts implementation ('eager', 'grouped_mm', ...)",
    "_optimize_model_for_decode": "a GenerationMixin model: a context manager generate() enters for decoding",
    "_init_weights": "a PreTrainedModel: initialises one module (called on every module by init_weights)",
    "_output_capturing_hooks_installed": "a PreTrainedModel: True once transformers installed its output "
                                         "capturing forward hooks (named output_capturing_hook)",
    "_initialize_weights": "a PreTrainedModel: the per-module step of initialize_weights' walk (checks the "
                           "module's _is_hf_initialized, then _init_weights)",
}
DECODE_SWITCH = "_optimize_model_for_decode"
CAPTURE_FLAG = "_output_capturing_hooks_installed"
CAPTURE_HOOK = "output_capturing_hook"
INIT_HOOK = "_init_weights"
INIT_WALK = "_initialize_weights"


def _missing(what: str, why: object) -> ImportError:
    return ImportError(f"moekit.hf needs {what}, which transformers {transformers.__version__} does not have "
                       f"({why}); moekit.hf is tested with transformers {SUPPORTED_TRANSFORMERS}: install a "
                       f"tested version (pip install 'transformers{SUPPORTED_TRANSFORMERS}')")


def _require(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise _missing(f"{module}.{name}", e) from None


OutputRecorder = _require(*PRIVATE_SYMBOLS[0])
active_collector = _require(*PRIVATE_SYMBOLS[1])
default_apply_gate = _require(*PRIVATE_SYMBOLS[2])
trainer_parameter_names = _require(*PRIVATE_SYMBOLS[3])


def record_specs(module: Any) -> dict:
    """The `_can_record_outputs` specs of `module`'s class ({} for a module that records nothing, such
    as any non-transformers module)."""
    return getattr(type(module), "_can_record_outputs", None) or {}


def experts_implementation(config: Any) -> str | None:
    """The experts implementation `config` (a PretrainedConfig) selects. Raises ImportError naming the
    attribute if transformers no longer has it."""
    try:
        return config._experts_implementation_internal
    except AttributeError as e:
        raise _missing(f"{type(config).__name__}._experts_implementation_internal", e) from None


def set_experts_implementation(config: Any, value: str | None) -> None:
    experts_implementation(config)  # the attribute must exist: setting a new one would change nothing
    config._experts_implementation_internal = value


def forget_output_capturing(model: Any) -> None:
    """Remove transformers' output-capturing forward hooks from every module of `model` and clear its
    "installed" flags, so that its next forward hooks the modules it holds then. transformers hooks the
    modules present at the first forward that records outputs and never looks again: after `unwrap`, the
    restored routers would otherwise record nothing (`output_router_logits=True` returns no logits)."""
    for m in model.modules():
        for hook_id, fn in list(m._forward_hooks.items()):
            if getattr(fn, "__name__", None) == CAPTURE_HOOK:
                for hooks in (m._forward_hooks, m._forward_hooks_with_kwargs, m._forward_hooks_always_called):
                    hooks.pop(hook_id, None)
        m.__dict__.pop(CAPTURE_FLAG, None)
