"""Adapters on linear layers, alone or as experts: LoRA, mixtures of LoRA experts chosen by any moekit
router (MixLoRA / MoLA), LoRAMoE, SMoRA and FlyLoRA, for transformers causal LMs and moekit models; and
LoRA on fused MoE experts (stacked expert weights of moekit and wrapped transformers MoE models).

>>> import moekit.adapters as ad
>>> ad.add_adapters(model, ad.MixLoRAConfig(num_experts=4, router=moekit.RouterConfig(kind="topp", p=0.4),
...                                         target_modules=["q_proj", "v_proj", "up_proj"]))
>>> loss = lm_loss + ad.aux_loss(model); loss.backward(); opt.step(); ad.after_optimizer_step(model)
>>> ad.save_adapters(model, "adapter/")            # PEFT layout; plain LoRA loads in PEFT as well
>>> ad.add_adapters(moe_model, ad.LoRAConfig(target_modules=[], target_parameters=["experts.gate_up_proj",
...                                          "experts.down_proj"]))   # LoRA on 128 of 128 experts in 24 layers

See docs/adapters.md.
"""

# importing the method modules registers their layers
from moekit.adapters import flylora, layer, loramoe, mixture, smora  # noqa: F401
from moekit.adapters.config import (
    EXPERT_ADAPTERS,
    AdapterConfig,
    FlyLoRAConfig,
    LoRAConfig,
    LoRAMoEConfig,
    MixLoRAConfig,
    SMoRAConfig,
    adapter_config_class,
    adapter_methods,
)
from moekit.adapters.experts import ExpertLoRA
from moekit.adapters.finetune import FinetuneConfig, finetune, logits_of, text_scores
from moekit.adapters.layer import AdapterLayer
from moekit.adapters.library import load_mixture, merge_loras
from moekit.adapters.model import (
    AdapterSummary,
    adapter_config,
    adapter_layers,
    add_adapters,
    after_optimizer_step,
    aux_loss,
    disabled,
    find_parameter_targets,
    find_targets,
    merge,
    merge_and_unload,
    remove_adapters,
    summary,
    task_types,
    unmerge,
)
from moekit.adapters.selection import CandidateScore, Selection, score_library, select_experts
from moekit.adapters.store import (
    adapter_state_dict,
    load_adapter_state,
    load_adapters,
    read_adapter_config,
    read_adapter_state,
    save_adapters,
)

__all__ = [
    "EXPERT_ADAPTERS", "AdapterConfig", "AdapterLayer", "AdapterSummary", "CandidateScore", "ExpertLoRA",
    "FinetuneConfig", "FlyLoRAConfig",
    "LoRAConfig", "LoRAMoEConfig", "MixLoRAConfig", "SMoRAConfig", "Selection", "adapter_config",
    "adapter_config_class", "adapter_layers", "adapter_methods", "adapter_state_dict", "add_adapters",
    "after_optimizer_step", "aux_loss", "disabled", "find_parameter_targets", "find_targets", "finetune", "load_adapter_state",
    "load_adapters", "load_mixture", "logits_of", "merge", "merge_and_unload", "merge_loras",
    "read_adapter_config", "read_adapter_state", "remove_adapters", "save_adapters", "score_library",
    "select_experts", "summary", "task_types", "text_scores", "unmerge",
]
