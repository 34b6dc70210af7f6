"""Which sparse-MoE families of the installed transformers `moekit.hf.wrap` reproduces exactly.

    PYTHONPATH=src python scripts/hf_coverage.py [--config test|aligned|native|all] [FAMILY ...]

For every sparse-MoE family (found by scanning transformers/models/*/modeling_*.py, the same rule as
docs/hf-families.md) a tiny random model of the real classes is built on CPU in fp32 (eval mode) and
checked three ways against itself unwrapped:
  1. logits (or last hidden states, for families without an LM head) on a 2x10 prompt, to 1e-5;
  2. 16 greedy tokens with the KV cache (`generate`; a manual cached loop without an LM head), equal;
  3. `moekit.hf.unwrap` puts back the very same block objects and the logits again match exactly.

Configs (one column each):
  test     the values of transformers' own tiny test config (CausalLMModelTester: hidden 32,
           intermediate 37, moe_intermediate 12, hidden_act="gelu", 8 experts, top-2), plus the
           per-family settings needed to get at least one sparse layer;
  aligned  the same with widths that are multiples of 16 (intermediate 48, moe_intermediate 16,
           shared 32), to tell a width failure (e.g. F=37) from a rule or activation failure;
  native   aligned widths and the family's own default activation (no hidden_act override).

Status: match (every sparse block wrapped, parity holds), refused (UnsupportedBlockError: moekit
says it cannot run the block; the reason is its message), partial (wrap succeeded but left some
sparse blocks unwrapped), MISMATCH (wrapped but the output differs: a silent error, the worst case),
error (wrap or the check raised something other than a refusal), build (the tiny model could not be
built: a gap in this script, not in moekit). One family never stops the run.
The last line: `M match, R refused of N families` (per config), then the other statuses.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import pathlib
import re
import sys
import traceback
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")

import transformers  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import moekit.hf  # noqa: E402
from moekit.hf.detect import NOT_FFN_MOE  # noqa: E402

hf_logging.set_verbosity_error()

PROMPT_SHAPE = (2, 10)
NEW_TOKENS = 16
VOCAB = 99

# transformers' CausalLMModelTester defaults (tests/causal_lm_tester.py), as passed to a config class:
# only the names its signature (or attribute_map) has.
TESTER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              intermediate_size=37, hidden_act="gelu", max_position_embeddings=512, initializer_range=0.02,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, moe_intermediate_size=12,
              shared_expert_intermediate_size=36, num_experts_per_tok=2, num_experts=8)
ALIGNED = dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=32)
# Sizes every family gets so that the model is tiny and has a sparse layer (names absent from a config are skipped).
COMMON = dict(num_hidden_layers=3, head_dim=16, n_routed_experts=8, num_local_experts=8, moe_num_experts=8,
              q_lora_rank=16, kv_lora_rank=16, o_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
              qk_head_dim=16, index_topk=4, index_n_heads=2, index_head_dim=16, zero_expert_num=2, n_shared_experts=1,
              sliding_window=64, first_k_dense_replace=1, mlp_only_layers=[0], decoder_sparse_step=1,
              moe_layer_start_index=1, n_group=2, topk_group=1)

# The config to build per family when the family's main config is a multimodal wrapper (text tower only).
TEXT_MODEL_TYPE = {
    "aria": "aria_text", "deepseek_ocr2": "deepseek_ocr2_text", "diffusion_gemma": "diffusion_gemma_text",
    "dots3_note": "dots3_note_text", "ernie4_5_vl_moe": "ernie4_5_vl_moe_text", "gemma4": "gemma4_text",
    "glm4v_moe": "glm4v_moe_text", "glm5_next": "glm5_next_text", "hy_v4_vl": "hy_v4_vl_text",
    "inkling": "inkling_text", "inkling2": "inkling2_text", "inkling2_loop": "inkling2_loop_text",
    "llama4": "llama4_text", "minimax_m3_vl": "minimax_m3_vl_text", "mistral_large4": "mistral_large4_text",
    "muse_spark": "muse_spark_text", "qwen3_5_moe": "qwen3_5_moe_text", "qwen3_omni_moe": "qwen3_omni_moe_text",
    "qwen3_vl_moe": "qwen3_vl_moe_text", "qwen4_exp": "qwen4_exp_text", "step3p7": "step3p5",
    "unlimited_ocr": "unlimited_ocr_text", "nllb_moe": "nllb-moe",
}

# The model class to build where no causal-LM class is registered for the text config.
MODEL_CLASS = {"qwen3_omni_moe": "Qwen3OmniMoeThinkerTextModel"}
# Folders with an expert bank that is not a routed sparse MoE; listed, not counted.
NOT_ROUTED = {"vitpose_backbone": "VitPoseNaiveMoe picks one expert per sample from a dataset index the caller passes "
                                  "(no router, no top-k): nothing for moekit to re-route"}

# Per-family settings a tiny config needs (found by building each one; values from the families' test configs
# where they exist).
HYBRID4 = dict(num_hidden_layers=4, first_k_dense_replace=1)
OVERRIDES: dict[str, dict] = {
    # {"all": kwargs for every config, "<config>": kwargs for that config only}
    "bailing_hybrid": {"all": dict(HYBRID4, layer_types=["linear_attention", "full_attention"] * 2)},
    "beam": {"all": dict(mlp_layer_types=["dense", "sparse", "sparse"])},
    "dbrx": {"all": dict(d_model=32, n_heads=2, n_layers=2, max_seq_len=512, vocab_size=VOCAB,
                         attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                         ffn_config=dict(ffn_hidden_size=37, moe_num_experts=8, moe_top_k=2)),
             "aligned": dict(ffn_config=dict(ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2)),
             "native": dict(ffn_config=dict(ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2))},
    "deepseek_ocr2": {"all": dict(mlp_layer_types=["dense", "sparse", "sparse"])},
    "diffusion_gemma": {"all": dict(enable_moe_block=True, top_k_experts=2)},
    "doge": {"all": dict(is_moe=True, num_experts=16, num_experts_per_tok=2)},
    # a third layer is a large attention variant here; the shared expert has its own width field
    "dots3_note": {"all": dict(num_hidden_layers=2, shared_experts_intermediate_size=36),
                   "aligned": dict(shared_experts_intermediate_size=32), "native": dict(shared_experts_intermediate_size=32)},
    "ernie4_5_vl_moe": {"all": dict(moe_intermediate_size=[12, 12], rope_parameters={
        "rope_type": "default", "rope_theta": 500000.0, "mrope_section": [2, 2, 4]})},
    "gemma4": {"all": dict(enable_moe_block=True, top_k_experts=2, vocab_size_per_layer_input=VOCAB,
                           hidden_size_per_layer_input=8)},
    "glm4v_moe": {"all": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5})},
    "glm5_next": {"all": dict(index_topk=16, qk_rope_head_dim=0, qk_nope_head_dim=16, num_hidden_layers=4,
                              layer_types=["linear_attention", "full_attention"] * 2,
                              mlp_layer_types=["dense", "sparse", "sparse", "sparse"])},
    "glm_moe_dsa": {"all": dict(index_topk=16)},
    "granitemoehybrid": {"all": dict(mamba_n_heads=8, layer_types=["mamba", "attention", "mamba"])},
    "hy_v4_vl": {"all": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [2, 1, 1]})},
    "inkling2": {"all": dict(unpadded_vocab_size=VOCAB)},
    "inkling2_loop": {"all": dict(unpadded_vocab_size=VOCAB)},
    "jamba": {"all": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                          expert_layer_offset=1)},
    "kimi_linear": {"all": dict(HYBRID4, layer_types=["linear_attention", "full_attention"] * 2)},
    "lfm2_moe": {"all": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1)},
    "longcat_flash": {"all": dict(head_dim=8)},
    "mimo_v2_flash": {"all": dict(num_attention_heads=4, v_head_dim=16, layer_types=["full_attention",
                                  "sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse", "sparse"],
                                  rope_parameters={
                                      "full_attention": {"rope_type": "default", "rope_theta": 5e6,
                                                         "partial_rotary_factor": 0.5},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4,
                                                            "partial_rotary_factor": 0.5}})},
    "qwen3_5_moe": {"all": dict(HYBRID4, layer_types=["linear_attention", "full_attention"] * 2)},
    "qwen3_next": {"all": dict(HYBRID4, layer_types=["linear_attention", "full_attention"] * 2)},
    "zaya": {"all": dict(num_experts_per_tok=1)},
    # its config rejects a GELU output gate; its attention layers always build the QSA indexer: a whole set of
    # sizes, with a token budget above the prompt + generated length (every block selected)
    "qwen4_exp": {"all": dict(HYBRID4, layer_types=["linear_attention", "full_attention"] * 2, hidden_act="silu",
                              indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=64,
                              indexer_compress_ratio=4)},
    "step3p7": {"all": dict(mlp_layer_types=["dense", "sparse", "sparse"], share_expert_dim=36),
                "aligned": dict(share_expert_dim=32), "native": dict(share_expert_dim=32)},
    "switch_transformers": {"all": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_sparse_encoder_layers=1,
                                        num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=4,
                                        expert_capacity=100, dense_act_fn="gelu"),
                            "aligned": dict(d_ff=48), "native": dict(d_ff=48, dense_act_fn="relu")},
    "nllb_moe": {"all": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                             encoder_attention_heads=4, decoder_attention_heads=4, num_experts=8, expert_capacity=100,
                             encoder_sparse_step=2, decoder_sparse_step=2, activation_function="gelu"),
                 "aligned": dict(encoder_ffn_dim=48, decoder_ffn_dim=48),
                 "native": dict(encoder_ffn_dim=48, decoder_ffn_dim=48, activation_function="relu")},
}


@contextlib.contextmanager
def nllb_experts_as_in_transformers_4():
    """transformers' NllbMoeExperts.forward replaced, for as long as the context lasts, by a transcription of
    transformers 4.x's per-expert dispatch (NllbMoeSparseMLP.forward up to v4.57), which is fairseq's NLLB-MoE
    top-2 layer: expert e runs on the tokens whose combine weight router_probs[t, e] is non-zero, its output
    times that weight (and, with moe_token_dropout = p, dropout p on its output in training, times 1 - p in
    eval), summed over experts.

    NOTE: the reference for nllb_moe only. transformers 5.x's NllbMoeExperts.forward one-hot encodes the
    *values* of the (T, E) 0/1 top-1 mask, so `expert_0` runs for every column that is not a token's top-1
    (weighted by router_probs there: its top-2 weight) and `expert_1` for its top-1 column; experts 2.. never
    run. That is a transformers bug, not NLLB-MoE, and moekit runs the authors' rule (`moekit.hf.wrap` warns)."""
    from transformers.models.nllb_moe import modeling_nllb_moe

    def forward(self, hidden_states, router_mask, router_probs):
        dispatch_TE = router_probs.bool()  # 4.x: router_mask = router_probs.bool()
        out_TD = torch.zeros_like(hidden_states)
        for idx in range(self.num_experts):
            token_idx = dispatch_TE[:, idx].nonzero().squeeze(-1)
            expert_output = self[f"expert_{idx}"](hidden_states[token_idx])
            if self.moe_token_dropout > 0:
                if self.training:
                    expert_output = self.token_dropout(expert_output)
                else:
                    expert_output = expert_output * (1 - self.moe_token_dropout)
            # 4.x scatters into an (E, T, D) tensor and sums over E; accumulating per expert is the same sum
            out_TD.index_add_(0, token_idx, router_probs[token_idx, idx, None] * expert_output)
        return out_TD

    cls = modeling_nllb_moe.NllbMoeExperts
    original = cls.forward
    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


# Families whose transformers 5.x forward is a bug, checked against transformers with that bug fixed.
REFERENCE_FIX = {"nllb_moe": (nllb_experts_as_in_transformers_4,
                              "(ref: transformers with NllbMoeExperts.forward fixed to 4.x's per-expert dispatch)")}
MAX_PARAMS = 20_000_000  # a tiny config that is not tiny (e.g. default vision towers) is reported, not built


def sparse_moe_families() -> list[str]:
    """Every transformers model folder whose modeling code defines a sparse MoE (experts + selection)."""
    root = pathlib.Path(transformers.__file__).parent / "models"
    marker = re.compile(r"self\.experts\s*=|use_experts_implementation|^class \w*(Moe|MoE|Experts)\w*\(", re.M)
    return sorted(d.name for d in root.iterdir()
                  if d.is_dir() and any(marker.search(f.read_text()) for f in d.glob("modeling_*.py")))


def _config_kwargs(cls, values: dict) -> dict:
    """The CausalLMModelTester rule: pass a value only where the config signature (or attribute_map) names it."""
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    alias = {v: k for k, v in getattr(cls, "attribute_map", {}).items()}
    out = {}
    for k in params:
        if k in values:
            out[k] = values[k]
        elif k in alias and alias[k] in values:
            out[k] = values[alias[k]]
    return out


def _model_class(family: str, model_type: str, config_cls) -> type:
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if family in MODEL_CLASS:
        return getattr(module, MODEL_CLASS[family])
    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        name = mapping.get(model_type)
        if isinstance(name, str) and hasattr(module, name) and getattr(module, name).config_class is config_cls:
            return getattr(module, name)
    candidates = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, PreTrainedModel)
                  and getattr(c, "config_class", None) is config_cls and "PreTrained" not in c.__name__]
    for suffix in ("ForCausalLM", "ForConditionalGeneration", "Model"):
        for c in candidates:
            if c.__name__.endswith(suffix):
                return c
    raise RuntimeError(f"no model class for config {config_cls.__name__}")


def build(family: str, config: str) -> nn.Module:
    model_type = TEXT_MODEL_TYPE.get(family, family)
    config_cls = CONFIG_MAPPING[model_type]
    values = {**TESTER, **COMMON}
    if config in ("aligned", "native"):
        values.update(ALIGNED)
    if config == "native":
        values.pop("hidden_act")
    kwargs = _config_kwargs(config_cls, values)
    over = OVERRIDES.get(family, {})
    kwargs.update(over.get("all", {}))
    kwargs.update(over.get(config, {}))
    cfg = config_cls(**kwargs)
    model_cls = _model_class(family, model_type, config_cls)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in model_cls(cfg).parameters())
    if n_params > MAX_PARAMS:
        raise RuntimeError(f"the tiny config still has {n_params / 1e6:.0f}M parameters (limit {MAX_PARAMS / 1e6:.0f}M)")
    torch.manual_seed(0)
    return randomize(model_cls(cfg)).eval()


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights with well separated logits (transformers' init gives near-uniform ones and zero routers), as in
    tests/hf/conftest.py; selection biases and hash tables get random values so that they matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if "norm" in name or name.endswith("scale"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 * fan_in**-0.5 if p.dim() > 1 else 0.1))
        for name, b in model.named_buffers():
            leaf = name.rpartition(".")[2]
            if b.is_floating_point() and leaf in ("e_score_correction_bias", "expert_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif leaf == "tid2eid":  # DeepSeek-V4 hash routing: k distinct experts per token id
                n_experts = max(int(b.max()) + 1, b.shape[1] * 4)
                b.copy_(torch.stack([torch.randperm(n_experts, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))
    return model


def sparse_blocks(model: nn.Module) -> list[str]:
    """Class names of the model's sparse MoE blocks (independent of moekit's detection): modules holding an
    experts child (stacked, listed or parallel), or DOGE's retrieval MoE; not the mixtures of attention moekit
    leaves alone (moekit.hf.detect.NOT_FFN_MOE: JetMoE's JetMoeMoA)."""
    found = []
    for m in model.modules():
        kids = [type(c).__name__ for c in m.children()]
        is_block = any(re.search(r"(?<!Shared)Experts$|NaiveMoe$", k) for k in kids) or type(m).__name__.endswith("CDMoE")
        if is_block and type(m).__name__ not in found and type(m).__name__ not in NOT_FFN_MOE:
            found.append(type(m).__name__)
    return found


def _outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids) if not model.config.is_encoder_decoder else model(input_ids=ids, decoder_input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _greedy(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.can_generate():
            return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=0,
                                  eos_token_id=None, min_new_tokens=NEW_TOKENS)
        # No LM head: greedy on hidden states against the input embeddings, through the KV cache.
        emb = model.get_input_embeddings().weight
        out = model(input_ids=ids, use_cache=True)
        cache, seq = out.past_key_values, ids
        for _ in range(NEW_TOKENS):
            nxt = (out.last_hidden_state[:, -1] @ emb.T).argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        return seq


def check(family: str, config: str) -> tuple[str, str, str]:
    """(block classes, status, reason) for one family under one config; families in REFERENCE_FIX against
    transformers with that fix applied (said in the reason)."""
    if family not in REFERENCE_FIX:
        return _check(family, config)
    fix, note = REFERENCE_FIX[family]
    with fix():
        block, status, why = _check(family, config)
    return block, status, f"{note} {why}".strip()


def _check(family: str, config: str) -> tuple[str, str, str]:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = build(family, config)
    except Exception as e:
        return "-", "build", f"{type(e).__name__}: {_one_line(e)}"
    blocks = sparse_blocks(model)
    block_names = ",".join(blocks) or "-"
    ids = torch.randint(3, VOCAB, PROMPT_SHAPE, generator=torch.Generator().manual_seed(1))
    note = ""
    try:
        ref = _outputs(model, ids)
    except Exception as e:
        # transformers' default experts kernel (grouped_mm) needs 16-byte aligned strides on CPU: F=37 fp32 fails
        # in transformers itself. The eager per-expert loop is its reference semantics.
        if "strides should be multiple of 16 bytes" not in str(e):
            return block_names, "build", f"the unwrapped model does not run: {type(e).__name__}: {_one_line(e)}"
        model.set_experts_implementation("eager")
        note = "(ref: eager experts; transformers' grouped_mm fails on this width) "
        ref = _outputs(model, ids)
    before = {n: m for n, m in model.named_modules()}
    # Wrap first: most families are refused, and a refusal needs no reference generation (wrap changes nothing
    # then). A wrapped model is unwrapped again for the reference tokens, then wrapped for the comparison.
    try:
        moekit.hf.wrap(model)
    except moekit.hf.UnsupportedBlockError as e:
        return block_names, "refused", note + re.sub(r"^moekit\.hf cannot wrap \w+: ", "", _one_line(e))
    except Exception as e:
        return block_names, "error", f"wrap raised {type(e).__name__}: {_one_line(e)} @ {_where(e)}"
    try:
        moekit.hf.unwrap(model)
        ref_gen = _greedy(model, ids)
    except Exception as e:
        ref_gen, note = None, note + f"(no generation check: {type(e).__name__}: {_one_line(e, 80)}) "
    try:
        moekit.hf.wrap(model)
    except Exception as e:
        return block_names, "error", f"wrapping again after unwrap raised {type(e).__name__}: {_one_line(e)}"
    wrapped = {layer.hf_class for layer in moekit.hf.wrapped_blocks(model)}
    try:
        got = _outputs(model, ids)
        if got.shape != ref.shape or not torch.allclose(got, ref, atol=1e-5, rtol=1e-5):
            diff = (got - ref).abs().max().item() if got.shape == ref.shape else float("nan")
            return block_names, "MISMATCH", note + f"wrapped output differs by {diff:.3g} (> 1e-5)"
        if ref_gen is not None:
            gen = _greedy(model, ids)
            if gen.shape != ref_gen.shape or not torch.equal(gen, ref_gen):
                return block_names, "MISMATCH", note + f"{NEW_TOKENS} greedy tokens with the KV cache differ"
        moekit.hf.unwrap(model)
        after = {n: m for n, m in model.named_modules()}
        if after.keys() != before.keys() or any(after[n] is not before[n] for n in before):
            return block_names, "error", "unwrap did not restore the original modules"
        if not torch.equal(_outputs(model, ids), ref):
            return block_names, "error", "logits after unwrap differ from the original"
    except Exception as e:
        return block_names, "error", f"wrapped model raised {type(e).__name__}: {_one_line(e)} @ {_where(e)}"
    missing = [b for b in blocks if b not in wrapped]
    if missing:
        return block_names, "partial", note + f"wrapped {sorted(wrapped)}, left {missing} unwrapped"
    return block_names, "match", note.strip()


def _one_line(e: BaseException, width: int = 220) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _where(e: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "moekit" in f.filename] or \
        traceback.extract_tb(e.__traceback__)[-1:]
    f = frames[-1]
    return f"{pathlib.Path(f.filename).name}:{f.lineno}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("families", nargs="*", help="default: every sparse-MoE family of the installed transformers")
    ap.add_argument("--config", choices=("test", "aligned", "native", "all"), default="all")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table (family, block, status, reason) "
                    "as Markdown to FILE (docs/hf-coverage.md)")
    args = ap.parse_args(argv)
    families = [f for f in args.families or sparse_moe_families() if f not in NOT_ROUTED]
    configs = ["test", "aligned", "native"] if args.config == "all" else [args.config]
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}; configs: {', '.join(configs)}")
    print(f"# {'family':<22} {'block':<38} " + " ".join(f"{c:<9}" for c in configs) + " reason")
    tally = {c: {} for c in configs}
    rows = []
    for family in families:
        results = [check(family, c) for c in configs]
        for c, (_, status, _) in zip(configs, results, strict=True):
            tally[c][status] = tally[c].get(status, 0) + 1
        block = next((b for b, _, _ in results if b != "-"), "-")
        reasons = []
        for c, (_, _, why) in zip(configs, results, strict=True):
            if why and why not in [r.split("] ", 1)[-1] for r in reasons]:
                reasons.append(f"[{c}] {why}" if len(configs) > 1 else why)
        statuses = " ".join(f"{s:<9}" for _, s, _ in results)
        print(f"{family:<24} {block:<38} {statuses} {' | '.join(reasons)}", flush=True)
        rows.append((family, block, " / ".join(s for _, s, _ in results), " | ".join(reasons)))
    for family, why in NOT_ROUTED.items():
        print(f"# not counted: {family}: {why}")
    for c in configs:
        t = tally[c]
        rest = ", ".join(f"{n} {s}" for s, n in sorted(t.items()) if s not in ("match", "refused"))
        print(f"{c}: {t.get('match', 0)} match, {t.get('refused', 0)} refused of {len(families)} families"
              + (f" ({rest})" if rest else ""))
    if args.markdown:
        write_markdown(args.markdown, configs, rows, tally, len(families))
    return 0


def markdown_table(configs: list[str], rows: list[tuple[str, str, str, str]]) -> str:
    """The coverage table (family, block, status per config, reason) in Markdown."""
    lines = [f"| family | block | status ({' / '.join(configs)}) | reason |", "|---|---|---|---|"]
    lines += [f"| {f} | {b} | {s} | {r.replace('|', '/')} |" for f, b, s, r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: str, configs: list[str], rows, tally, n: int) -> None:
    from moekit.utils.io import atomic_write_text

    totals = "\n".join(f"- `{c}`: {tally[c].get('match', 0)} match, {tally[c].get('refused', 0)} refused of {n} "
                       "families" for c in configs)
    atomic_write_text(path, f"# moekit.hf coverage (transformers {transformers.__version__}, torch "
                            f"{torch.__version__})\n\nGenerated by `scripts/hf_coverage.py --markdown`.\n\n{totals}"
                            f"\n\n{markdown_table(configs, rows)}")


if __name__ == "__main__":
    sys.exit(main())
