"""Export a moekit language model as a transformers checkpoint whose routing rule is identical.

    top-k softmax, renormalised, no q/k norm, no dense layers      -> Mixtral
    top-k softmax (renormalised or not), q/k RMSNorm               -> Qwen3-MoE (dense layers: mlp_only_layers)
    top-k sigmoid (groups, selection bias, scaling, shared experts) -> GLM-4-MoE (full rotary)
    softmax over the top-k logits (softmax_after_topk; or the renormalised top-k softmax, equal to
    rounding), gpt-oss's clamped SwiGLU (limit, alpha, up + 1), no dense layers
                                                                    -> GPT-OSS (attention sinks at -inf, no
                                                                       attention biases, every layer full attention,
                                                                       zero router and expert biases)
    top-k sigmoid unnormalised with the score on the expert input, one shared expert of the experts' width
                                                                    -> Llama 4 text (every layer RoPE, no q/k norm,
                                                                       no chunked attention; q/k rows permuted to
                                                                       its interleaved rotary pairs)

Routers transformers cannot express (those whose config has no `hf_routing()`: top-p, null experts,
recurrent, expert choice, random, ...) and settings without a counterpart (capacity dropping, a sigmoid shared-expert gate, ...) raise
`ExportError` naming what does not fit. The written checkpoint is loaded back with
`AutoModelForCausalLM.from_pretrained` and its logits compared with the moekit model's before the
directory is moved into place (one rename; every file fsynced first).

The target must be absent, empty, or an earlier moekit export (it carries moekit's `.moekit` marker,
kind "export"); anything else is the user's and is refused with NotOwnedError. Temporary directories
of killed exports are removed by the next export to the same place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moekit.errors import UsageError
from moekit.models import MoELM
from moekit.utils.io import atomic_dir, check_writable_dir

KIND = "export"  # ownership marker kind (moekit.utils.io)


class ExportError(UsageError):  # a UsageError is a ValueError, as before
    """The model's routing or structure has no identical transformers architecture."""


class ExportVerificationError(ExportError):
    """The written checkpoint, loaded back by transformers, does not compute what the model does."""

    exit_code = 1


def _refuse(why: str) -> None:
    raise ExportError(f"moekit export --to hf: {why}")


def _common(cfg, routing: dict) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_dropout=0.0,
                num_experts_per_tok=routing["num_experts_per_tok"], dtype="float32")


def hf_config_for(cfg):
    """The transformers config whose model computes exactly what `MoELM(cfg)` computes."""
    from transformers import Glm4MoeConfig, MixtralConfig, Qwen3MoeConfig

    moe = cfg.moe
    routing = moe.router.hf_routing()
    if routing is None:
        from moekit.routers import registered_routers, router_class

        exportable = [k for k in registered_routers() if router_class(k).config_class().hf_routing() is not None]
        _refuse(f"transformers has no model with the {moe.router.kind!r} router ({moe.router.describe()}); "
                f"routers with a transformers counterpart: {', '.join(exportable)}. Re-route to one of them "
                "before exporting")
    if moe.router.logit_scale != 1.0:
        _refuse(f"RouterConfig.logit_scale={moe.router.logit_scale:g}; the exported families' routers score "
                "unscaled logits")
    if moe.activation != "swiglu":
        _refuse(f"MoEConfig.activation={moe.activation!r}; transformers' MoE models use SwiGLU experts")
    clamped = moe.activation_limit is not None or moe.activation_alpha != 1.0 or moe.activation_up_offset != 0.0
    # The layer architectures (docs/routing.md) change the layer's computation itself.
    arch = {name: getattr(moe, name) for name, plain in (
        ("iterations", 1), ("zero_experts", 0), ("copy_experts", 0), ("constant_experts", 0),
        ("gating_residual", False), ("latent_dim", None), ("pregated", False), ("expert_output_norm_eps", None),
        ("shared_activation", None)) if getattr(moe, name) != plain}
    if arch:
        _refuse(f"MoEConfig {', '.join(f'{k}={v}' for k, v in arch.items())}: the Mixtral / Qwen3-MoE / GLM-4-MoE "
                "families export computes a plain MoE layer")
    # capacity_factor drops only in training (moekit never drops in eval mode unless asked to)
    if moe.eval_capacity_factor is not None:
        _refuse("eval_capacity_factor drops tokens at inference; transformers' MoE models are dropless")
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if moe.weight_on_input:
        return _llama4_config(cfg, routing, rope, clamped)
    if clamped:
        return _gpt_oss_config(cfg, routing, rope)
    if routing["scoring_func"] == "softmax":
        if routing.get("softmax_after_topk"):
            # Mixtral and Qwen3-MoE renormalise the top k of the softmax: equal in exact arithmetic, not bit for
            # bit, and where probabilities underflow to a tie they pick another expert.
            _refuse("the router takes a softmax over the top-k logits (softmax_after_topk, gpt-oss's rule), which "
                    "Mixtral and Qwen3-MoE do not (they renormalise the top k of the softmax); export it with "
                    "gpt-oss's clamped SwiGLU as GPT-OSS, or re-route with softmax_after_topk=False")
        if routing["n_group"] > 1 or routing["routed_scaling_factor"] != 1.0 or routing["selection_bias"]:
            _refuse("softmax routing with groups, scaling or a selection bias has no transformers counterpart")
        if moe.num_shared_experts:
            _refuse("softmax top-k with shared experts (ungated) has no identical transformers model")
        if cfg.qk_norm:
            return Qwen3MoeConfig(**_common(cfg, routing), num_experts=moe.num_experts,
                                  moe_intermediate_size=moe.d_expert,
                                  intermediate_size=cfg.dense_width, norm_topk_prob=routing["norm_topk_prob"],
                                  decoder_sparse_step=1, mlp_only_layers=list(range(cfg.n_dense)),
                                  rope_parameters=rope, attention_bias=False, output_router_logits=False)
        if not routing["norm_topk_prob"] or cfg.n_dense:
            _refuse("softmax top-k without q/k norm maps to Mixtral, which always renormalises and has no dense "
                    "layers; train with model.qk_norm=true (Qwen3-MoE) for other settings")
        return MixtralConfig(**_common(cfg, routing), num_local_experts=moe.num_experts, intermediate_size=moe.d_expert,
                             rope_parameters=rope, router_jitter_noise=0.0, sliding_window=None,
                             output_router_logits=False)
    if moe.shared_gate:
        _refuse("a sigmoid-gated shared expert (Qwen2-MoE) with sigmoid routing has no transformers counterpart")
    if moe.num_shared_experts and moe.shared_width != moe.num_shared_experts * moe.d_expert:
        _refuse(f"GLM-4-MoE's shared experts are num_shared_experts x d_expert = "
                f"{moe.num_shared_experts * moe.d_expert} wide, this model's are {moe.shared_width}")
    if moe.num_shared_experts == 0:
        _refuse("sigmoid routing without shared experts: GLM-4-MoE always has a shared expert")
    return Glm4MoeConfig(**_common(cfg, routing), n_routed_experts=moe.num_experts,
                         moe_intermediate_size=moe.d_expert, n_shared_experts=moe.num_shared_experts,
                         intermediate_size=cfg.dense_width, first_k_dense_replace=cfg.n_dense,
                         n_group=routing["n_group"], topk_group=routing["topk_group"],
                         norm_topk_prob=routing["norm_topk_prob"],
                         routed_scaling_factor=routing["routed_scaling_factor"],
                         use_qk_norm=cfg.qk_norm, attention_bias=False,
                         rope_parameters={**rope, "partial_rotary_factor": 1.0})


def _gpt_oss_config(cfg, routing: dict, rope: dict):
    """GPT-OSS for gpt-oss's own rule: softmax over the top-k logits and the clamped SwiGLU with (up + 1)."""
    from transformers import GptOssConfig

    moe = cfg.moe
    if moe.activation_up_offset != 1.0 or moe.activation_limit is None:
        _refuse(f"clamped SwiGLU with limit={moe.activation_limit}, up_offset={moe.activation_up_offset}: GPT-OSS "
                "computes clamp(up, -limit, limit) + 1 with a limit (its swiglu_limit), nothing else")
    if routing["scoring_func"] != "softmax" or not routing["norm_topk_prob"] or routing["n_group"] > 1 \
            or routing["routed_scaling_factor"] != 1.0 or routing["selection_bias"]:
        _refuse(f"GPT-OSS routes by a softmax over the top-k logits (renormalised top-k softmax, no groups, scaling "
                f"or selection bias); this model routes {moe.router.describe()}")
    if moe.num_shared_experts or cfg.n_dense or cfg.qk_norm:
        _refuse("GPT-OSS has no shared expert, no dense layers and no q/k norm; this model has "
                f"num_shared_experts={moe.num_shared_experts}, n_dense={cfg.n_dense}, qk_norm={cfg.qk_norm}")
    return GptOssConfig(**_common(cfg, routing), num_local_experts=moe.num_experts, intermediate_size=moe.d_expert,
                        swiglu_limit=moe.activation_limit, swiglu_alpha=moe.activation_alpha, attention_bias=False,
                        layer_types=["full_attention"] * cfg.n_layers, rope_parameters=rope,
                        router_aux_loss_coef=0.0, output_router_logits=False)


def _llama4_config(cfg, routing: dict, rope: dict, clamped: bool):
    """Llama 4 text for its rule: sigmoid of the top-k logits, not renormalised, on the expert input."""
    from transformers import Llama4TextConfig

    moe = cfg.moe
    if routing["scoring_func"] != "sigmoid" or routing["norm_topk_prob"] or routing["n_group"] > 1 \
            or routing["routed_scaling_factor"] != 1.0 or routing["selection_bias"] or clamped:
        _refuse(f"the score on the expert input is Llama 4's rule, which is the sigmoid of the top-k logits, not "
                f"renormalised, unscaled, without groups or selection bias, with plain SwiGLU experts; this model "
                f"routes {moe.router.describe()}{' with a clamped SwiGLU' if clamped else ''}")
    if moe.num_shared_experts != 1 or moe.shared_gate or moe.shared_width != moe.d_expert or cfg.qk_norm:
        _refuse(f"Llama 4 has one ungated shared expert of the routed experts' width ({moe.d_expert}) and no q/k "
                f"RMSNorm; this model has num_shared_experts={moe.num_shared_experts}, shared_width="
                f"{moe.shared_width}, shared_gate={moe.shared_gate}, qk_norm={cfg.qk_norm}")
    n = cfg.n_layers
    return Llama4TextConfig(**_common(cfg, routing), num_local_experts=moe.num_experts, intermediate_size=moe.d_expert,
                            intermediate_size_mlp=cfg.dense_width, moe_layers=list(range(cfg.n_dense, n)),
                            no_rope_layers=[1] * n, layer_types=["full_attention"] * n, attention_chunk_size=None,
                            use_qk_norm=False, attn_temperature_tuning=False, attention_bias=False,
                            rope_parameters=rope, router_aux_loss_coef=0.0, output_router_logits=False)


def _interleaved_rows(head_dim: int, heads: int) -> torch.Tensor:
    """Row order that turns moekit's rotate-half q/k projections (pair i, i + d/2) into Llama 4's interleaved
    rotary pairs (2i, 2i + 1), head by head: q.k is unchanged when both are permuted alike."""
    half = head_dim // 2
    per_head = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return torch.cat([per_head + h * head_dim for h in range(heads)])


@torch.no_grad()
def _copy_moe(moe, ffn, kind: str) -> None:
    """The MoE block's weights into a GPT-OSS / Llama 4 block (transposed stacks; GPT-OSS: interleaved)."""
    ffn.router.weight.copy_(moe.router.weight)
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj  # (E, 2F, D), (E, D, F)
    if kind == "gpt_oss":
        F = gate_up.shape[1] // 2
        bias = getattr(moe.router, "bias", None)
        ffn.router.bias.copy_(bias) if bias is not None else ffn.router.bias.zero_()
        ffn.experts.gate_up_proj[..., 0::2] = gate_up[:, :F].transpose(1, 2)
        ffn.experts.gate_up_proj[..., 1::2] = gate_up[:, F:].transpose(1, 2)
        ffn.experts.gate_up_proj_bias.zero_()
        ffn.experts.down_proj_bias.zero_()
    else:
        ffn.experts.gate_up_proj.copy_(gate_up.transpose(1, 2))
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ffn.shared_expert, name).weight.copy_(getattr(moe.shared_experts, name).weight)
    ffn.experts.down_proj.copy_(down.transpose(1, 2))


@torch.no_grad()
def _copy_weights(model: MoELM, hf) -> None:
    hf.model.embed_tokens.weight.copy_(model.embed.weight)
    hf.model.norm.weight.copy_(model.norm.weight)
    if not model.cfg.tie_embeddings:
        hf.lm_head.weight.copy_(model.lm_head.weight)
    kind = {"GptOssConfig": "gpt_oss", "Llama4TextConfig": "llama4"}.get(type(hf.config).__name__)
    cfg = model.cfg
    for block, layer in zip(model.layers, hf.model.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = getattr(block.attn, name).weight
            if kind == "llama4" and name in ("q_proj", "k_proj"):
                w = w[_interleaved_rows(cfg.head_dim, cfg.n_heads if name == "q_proj" else cfg.kv_heads)]
            getattr(layer.self_attn, name).weight.copy_(w)
        if kind == "gpt_oss":
            layer.self_attn.sinks.fill_(float("-inf"))  # no sink: softmax over the keys alone
        if kind is not None:
            layer.input_layernorm.weight.copy_(block.attn_norm.weight)
            layer.post_attention_layernorm.weight.copy_(block.ffn_norm.weight)
            ffn = layer.mlp if kind == "gpt_oss" else layer.feed_forward
            if block.is_moe:
                _copy_moe(block.ffn, ffn, kind)
            else:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    getattr(ffn, name).weight.copy_(getattr(block.ffn, name).weight)
            continue
        if model.cfg.qk_norm:
            layer.self_attn.q_norm.weight.copy_(block.attn.q_norm.weight)
            layer.self_attn.k_norm.weight.copy_(block.attn.k_norm.weight)
        layer.input_layernorm.weight.copy_(block.attn_norm.weight)
        layer.post_attention_layernorm.weight.copy_(block.ffn_norm.weight)
        if not block.is_moe:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer.mlp, name).weight.copy_(getattr(block.ffn, name).weight)
            continue
        moe = block.ffn
        layer.mlp.gate.weight.copy_(moe.router.weight)
        if hasattr(layer.mlp.gate, "e_score_correction_bias"):
            bias_E = getattr(moe.router, "e_score_correction_bias", None)  # None: dropped, a zero bias
            layer.mlp.gate.e_score_correction_bias.copy_(0.0 if bias_E is None else bias_E)
        layer.mlp.experts.gate_up_proj.copy_(moe.experts.gate_up_proj)
        layer.mlp.experts.down_proj.copy_(moe.experts.down_proj)
        if moe.shared_experts is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer.mlp.shared_experts, name).weight.copy_(getattr(moe.shared_experts, name).weight)


def check_export_target(out_dir: str | os.PathLike) -> None:
    """Refuse (NotOwnedError) an export directory that exists, is not empty and is not a moekit export."""
    check_writable_dir(out_dir, KIND, "moekit export")


def _check_uncompressed(model: MoELM) -> None:
    """Refuse what moekit.compress made that a transformers MoE checkpoint cannot hold."""
    from moekit.experts import ExpertBank

    if model.cfg.moe_num_experts is not None:
        _refuse(f"its MoE layers keep different expert counts ({' '.join(map(str, model.cfg.moe_num_experts))}: "
                "pruned per layer) and a transformers MoE config has one num_experts; prune the same share of "
                "every layer (no --per-layer) to export")
    for layer in model.moe_layers():
        if layer.expert_map_E is not None:
            _refuse("its experts were merged (router experts mapped to fewer merged experts), which transformers' "
                    "MoE blocks cannot express; export before merging, or prune instead")
        if not isinstance(layer.experts, ExpertBank):
            _refuse("its experts are quantised (moekit's group-wise int codes), which transformers' MoE "
                    "checkpoints do not hold; export the unquantised model")


def export_hf(model: MoELM, out_dir: str | os.PathLike, atol: float = 1e-4, tokenizer=None) -> Path:
    """Write `model` as a transformers checkpoint in `out_dir` (config.json + safetensors), verified by
    loading it back and comparing logits; `out_dir` is untouched if anything fails (see the module doc).
    tokenizer: the run's (`moekit.data.ByteTokenizer` or `BPETokenizer`); its BOS/EOS/PAD ids go into the config
    and generation config (so transformers' generate stops where moekit's does), and a BPE tokenizer is saved
    with the checkpoint (`AutoTokenizer` loads it). Without one the three ids are None (transformers' defaults
    of the target family would name ordinary tokens of a moekit vocabulary).
    Raises ExportError (nothing exportable), ExportVerificationError, NotOwnedError, OSError."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    check_export_target(out_dir)
    _check_uncompressed(model)
    hf_cfg = hf_config_for(model.cfg)
    for name in ("bos", "eos", "pad"):
        setattr(hf_cfg, f"{name}_token_id", getattr(tokenizer, f"{name}_id", None))
    target = type(hf_cfg).__name__.removesuffix("Config")
    if target != "Glm4Moe" and any(_nonzero_selection_bias(layer.router) for layer in model.moe_layers()):
        score = model.cfg.moe.router.hf_routing()["scoring_func"]
        _refuse(f"the {score} routers carry a non-zero selection bias (aux-loss-free balancing), which {target} does "
                "not have")
    if target != "GptOss" and any(getattr(layer.router, "bias", None) is not None for layer in model.moe_layers()):
        _refuse(f"the routers add a logit bias, which {target} does not have (GPT-OSS's router does)")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    _copy_weights(model, hf)
    with atomic_dir(out_dir, KIND, "moekit export") as tmp:  # a full disk names out_dir; nothing half-written
        hf.save_pretrained(tmp)
        if (hf_tokenizer := _hf_tokenizer(tokenizer)) is not None:
            hf_tokenizer.save_pretrained(tmp)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True).float().eval()
        ids_BT = torch.randint(0, model.cfg.vocab_size, (2, min(24, model.cfg.max_seq_len)),
                               generator=torch.Generator().manual_seed(0))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            ours = model(ids_BT).float()
            theirs = loaded(input_ids=ids_BT).logits.float()
        model.train(was_training)
        diff = float((ours - theirs).abs().max())
        if diff > atol:
            raise ExportVerificationError(f"moekit export: {type(loaded).__name__} logits differ from moekit's by "
                                          f"{diff:.2e} (> {atol}); the export was not written")
    return out_dir


def _hf_tokenizer(tokenizer):
    """A BPE run's tokenizer as a transformers fast tokenizer, or None for the byte tokenizer (it has no
    transformers counterpart: `moekit generate --hf` falls back to it for a checkpoint without one, by its 259
    ids)."""
    from moekit.data import BPETokenizer
    from moekit.data.corpus import BPE_SPECIAL_TOKENS

    if not isinstance(tokenizer, BPETokenizer):
        return None
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = BPE_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                   clean_up_tokenization_spaces=False)


def _nonzero_selection_bias(router) -> bool:
    bias_E = getattr(router, "e_score_correction_bias", None)  # None: no selection bias (dropped)
    return bias_E is not None and bool(bias_E.any())
