"""A decoder-only MoE language model in one file.

Legend: B batch, T tokens (new ones), S cached + new positions, D model dim, H heads,
Hk key/value heads, d head dim, V vocabulary.

    tokens -> embedding -> n_layers x [x + Attn(RMSNorm(x)); x + FFN(RMSNorm(x))] -> RMSNorm -> lm_head

- Attention: rotary position embeddings (rotate-half convention, as transformers' Llama/Mixtral/
  Qwen3-MoE), optional per-head RMSNorm on q and k (Qwen3), grouped-query heads, PyTorch's
  `scaled_dot_product_attention`, and a preallocated KV cache for generation.
- FFN: a moekit `MoELayer` in every layer, except the first `n_dense` layers, which use a dense
  SwiGLU FFN (DeepSeek's `first_k_dense_replace`).
- Routers that carry a routing state across layers (RMoE's GRU) get the module they share from their
  config (`build_shared_module`): the model owns it (`router_shared`) and threads the state from
  layer to layer in `forward` (each MoE layer's `routing_info().router_state`).

The layout follows transformers' Mixtral / Qwen3-MoE, so a trained model can be exported to them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import Config, MoEConfig, check_fields, require, setting
from moekit.errors import UsageError
from moekit.experts import ExpertBank, SharedExpert
from moekit.layers.moe import MoELayer, moe_layers
from moekit.utils.ids import check_token_ids


@dataclass
class LMConfig(Config):
    """The language model. `moe.d_model` always equals `d_model` (set by `validate`).

    d_ff_dense: width of the dense FFN in the first `n_dense` layers (default: the MoE layer's
    expected active width, k * d_expert + shared width, so dense and MoE layers cost the same).
    moe_num_experts: routed experts of each MoE layer, in layer order (None: `moe.num_experts` in every
    one). Pruning (moekit.compress) writes it, so that layers may keep different expert counts.
    """

    vocab_size: int = setting(259, "vocabulary size (set from the tokenizer when training)")
    d_model: int = setting(128, "model width D")
    n_layers: int = setting(4, "transformer blocks L")
    n_heads: int = setting(4, "attention heads")
    n_kv_heads: int | None = setting(None, "key/value heads for grouped-query attention (None = n_heads)")
    qk_norm: bool = setting(False, "RMSNorm on queries and keys")
    max_seq_len: int = setting(512, "longest sequence the model accepts (rotary positions)")
    rope_theta: float = setting(10000.0, "rotary embedding base")
    norm_eps: float = setting(1e-6, "RMSNorm epsilon")
    n_dense: int = setting(0, "the first n_dense blocks use a dense FFN instead of a MoE layer")
    d_ff_dense: int | None = setting(None, "width of those dense FFNs (None = the MoE layer's expected "
                                            "active width)")
    tie_embeddings: bool = setting(True, "share the input embedding with the output projection")
    init_std: float = setting(0.02, "standard deviation of the weight initialisation")
    moe: MoEConfig = field(default_factory=MoEConfig, metadata={"help": 'the MoE layer (MoEConfig)'})
    moe_num_experts: list[int] | None = field(
        default=None, metadata={"help": "routed experts of each MoE layer (written by pruning; None = moe.num_experts)"})

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)

    @property
    def n_moe(self) -> int:
        return self.n_layers - self.n_dense

    def moe_config(self, i: int) -> MoEConfig:
        """The MoEConfig of MoE layer `i` (0-based among the MoE layers): `moe` with that layer's expert
        count when `moe_num_experts` gives one."""
        if self.moe_num_experts is None or self.moe_num_experts[i] == self.moe.num_experts:
            return self.moe
        return dataclasses.replace(self.moe, num_experts=self.moe_num_experts[i])

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def dense_width(self) -> int:
        if self.d_ff_dense is not None:
            return self.d_ff_dense
        return int(round(self.moe.expected_experts_per_token() * self.moe.d_expert)) + self.moe.shared_width

    def validate(self) -> LMConfig:
        check_fields(self)
        require(self.vocab_size >= 2, "LMConfig.vocab_size", self.vocab_size, "an integer >= 2")
        require(self.d_model >= 1, "LMConfig.d_model", self.d_model, "an integer >= 1")
        require(self.n_layers >= 1, "LMConfig.n_layers", self.n_layers, "an integer >= 1")
        require(self.n_heads >= 1 and self.d_model % self.n_heads == 0 and self.head_dim % 2 == 0,
               "LMConfig.n_heads", self.n_heads, f"a divisor of d_model={self.d_model} giving an even head dim")
        require(self.n_kv_heads is None or self.n_kv_heads >= 1, "LMConfig.n_kv_heads", self.n_kv_heads,
               f"None or a divisor of n_heads={self.n_heads}")
        require(self.n_heads % self.kv_heads == 0, "LMConfig.n_kv_heads", self.n_kv_heads,
               f"None or a divisor of n_heads={self.n_heads}")
        require(0 <= self.n_dense <= self.n_layers, "LMConfig.n_dense", self.n_dense,
               f"an integer in [0, n_layers={self.n_layers}]")
        require(self.max_seq_len >= 1, "LMConfig.max_seq_len", self.max_seq_len, "an integer >= 1")
        require(self.d_ff_dense is None or self.d_ff_dense >= 1, "LMConfig.d_ff_dense", self.d_ff_dense,
               "None or an integer >= 1")
        require(self.rope_theta > 0, "LMConfig.rope_theta", self.rope_theta, "a finite float > 0")
        require(self.norm_eps > 0, "LMConfig.norm_eps", self.norm_eps, "a finite float > 0")
        require(self.init_std > 0, "LMConfig.init_std", self.init_std, "a finite float > 0")
        if self.moe.d_model != self.d_model:
            self.moe = dataclasses.replace(self.moe, d_model=self.d_model)
        self.moe.validate()
        if self.moe_num_experts is not None:
            counts = self.moe_num_experts
            require(isinstance(counts, list | tuple) and len(counts) == self.n_moe
                    and all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in counts),
                    "LMConfig.moe_num_experts", counts, f"None or a list of {self.n_moe} integers >= 1 (one per MoE layer)")
            self.moe_num_experts = list(counts)
            for i in range(self.n_moe):
                self.moe_config(i).validate()
        self.moe.router.check_vocabulary(self.vocab_size)  # a hash router's table must map every token id
        if not self.moe.router.is_causal() and not self.moe.router.accepts_causal_leak():
            raise UsageError(f"RouterConfig.kind={self.moe.router.kind!r} is not causal (a token's experts depend on "
                             "later tokens), so a causal LM would see the future; set allow_causal_leak=True to "
                             "train it anyway (its validation loss is then not comparable)")
        return self

    # Parameter counts, without building.
    def _attn_params(self) -> int:
        d, hd = self.d_model, self.head_dim
        return d * d * 2 + 2 * d * self.kv_heads * hd + (2 * hd if self.qk_norm else 0)

    def num_params(self) -> int:
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        per_layer = self._attn_params() + 2 * self.d_model
        dense = 3 * self.d_model * self.dense_width
        shared = self.moe.router.shared_module_params()  # e.g. RMoE's GRU, one per model
        moe = sum(self.moe_config(i).num_params() for i in range(self.n_moe))
        return embed + self.n_layers * per_layer + self.n_dense * dense + moe + self.d_model + shared

    def num_active_params(self) -> int:
        """Parameters one token uses on average (experts at the router's expected count)."""
        inactive = sum(c.num_params() - c.num_active_params() for c in map(self.moe_config, range(self.n_moe)))
        return self.num_params() - inactive


class KVCache:
    """Preallocated keys and values for every layer: (layers, B, Hk, max_len, d)."""

    def __init__(self, cfg: LMConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far
        self.max_len = max_len


def rotary_tables(cfg: LMConfig, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (T, d) for RoPE (arXiv 2104.09864) in the rotate-half layout."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    angles_Td2 = positions_T.float().unsqueeze(-1) * inv_freq.to(positions_T.device)
    angles_Td = torch.cat([angles_Td2, angles_Td2], dim=-1)
    return angles_Td.cos(), angles_Td.sin()


def _rotate(x_BHTd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTd.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHTd * cos_Td + rotated * sin_Td).to(x_BHTd.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, Hk, d = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, H * d, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, Hk * d, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, Hk * d, bias=False)
        self.o_proj = nn.Linear(H * d, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(d, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(d, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x_BTD: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        q_BHTd = self.q_proj(x_BTD).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k_BHTd = self.k_proj(x_BTD).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v_BHTd = self.v_proj(x_BTD).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q_BHTd, k_BHTd = self.q_norm(q_BHTd), self.k_norm(k_BHTd)
        q_BHTd, k_BHTd = _rotate(q_BHTd, cos_Td, sin_Td), _rotate(k_BHTd, cos_Td, sin_Td)
        if cache is None:
            out = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, is_causal=True,
                                                 enable_gqa=cfg.kv_heads != cfg.n_heads)
        else:
            start = cache.pos
            cache.k[self.layer_idx, :, :, start:start + T] = k_BHTd
            cache.v[self.layer_idx, :, :, start:start + T] = v_BHTd
            k_BHSd = cache.k[self.layer_idx, :, :, :start + T]
            v_BHSd = cache.v[self.layer_idx, :, :, :start + T]
            # New token t (absolute position start + t) sees cached positions <= start + t.
            mask_TS = None
            if T > 1:
                mask_TS = (torch.arange(T, device=x_BTD.device).unsqueeze(1) + start
                           >= torch.arange(start + T, device=x_BTD.device).unsqueeze(0))
            out = F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, attn_mask=mask_TS,
                                                 enable_gqa=cfg.kv_heads != cfg.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.is_moe = layer_idx >= cfg.n_dense
        self.ffn = MoELayer(cfg.moe_config(layer_idx - cfg.n_dense)) if self.is_moe else SharedExpert(cfg.d_model, cfg.dense_width)

    def forward(self, x_BTD, cos_Td, sin_Td, cache, padding_mask, router_state):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_Td, sin_Td, cache)
        h_BTD = self.ffn_norm(x_BTD)
        if not self.is_moe:
            return x_BTD + self.ffn(h_BTD), router_state
        y_BTD = self.ffn(h_BTD, padding_mask, router_state=router_state)
        return x_BTD + y_BTD, self.ffn.routing_info().router_state


class MoELM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # A module every MoE layer's router shares (RMoE's GRU), or None.
        self.router_shared = cfg.moe.router.build_shared_module()
        self.register_load_state_dict_pre_hook(_rename_router_gru)
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2-style initialisation (the same for every router, so comparisons are fair):

        - embeddings and every projection: N(0, init_std);
        - projections that write into the residual stream (attention o_proj, dense and shared
          down_proj, every expert's down_proj): N(0, init_std / sqrt(2 * n_layers)), so the residual
          stream's variance does not grow with depth;
        - experts' gate/up: N(0, init_std); norms: 1;
        - routers keep their own initialisation (the random router's frozen weights included), and
          the GRU keeps PyTorch's.
        """
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.Linear) and not name.endswith("shared_expert_gate"):
                is_resid = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, std=resid_std if is_resid else std)
            elif isinstance(module, ExpertBank):
                for w in (module.gate_up_proj, module.up_proj):
                    if w is not None:
                        nn.init.normal_(w, std=std)
                nn.init.normal_(module.down_proj, std=resid_std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    def moe_layers(self) -> list[MoELayer]:
        return moe_layers(self)

    def forward(self, input_ids_BT: torch.Tensor, cache: KVCache | None = None,
                padding_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V). With a cache, the tokens continue the cached positions."""
        B, T = input_ids_BT.shape
        # nn.Embedding raises a raw IndexError (CUDA: a device-side assert) for an id outside the vocabulary.
        check_token_ids(input_ids_BT, self.cfg.vocab_size, "MoELM", "LMConfig.vocab_size")
        start = 0 if cache is None else cache.pos
        if start + T > self.cfg.max_seq_len or (cache is not None and start + T > cache.max_len):
            limit = self.cfg.max_seq_len if cache is None else min(self.cfg.max_seq_len, cache.max_len)
            raise ValueError(f"MoELM: positions {start}..{start + T - 1} exceed the limit of {limit} tokens")
        cos_Td, sin_Td = rotary_tables(self.cfg, torch.arange(start, start + T, device=input_ids_BT.device))
        x_BTD = self.embed(input_ids_BT)
        router_state = self.cfg.moe.router.initial_state(self.router_shared)
        if router_state is None and any(m.router.cfg.routes_on_token_ids() for m in self.moe_layers()):
            router_state = input_ids_BT  # hash routing (moekit.routers.hash) picks experts by token id
        for block in self.layers:
            x_BTD, router_state = block(x_BTD, cos_Td, sin_Td, cache, padding_mask_BT, router_state)
        if cache is not None:
            cache.pos += T
        return self.lm_head(self.norm(x_BTD))

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """The last forward's auxiliary losses, each averaged over MoE layers (so a coefficient does
        not depend on depth). Empty when the forward ran without autograd."""
        totals: dict[str, list[torch.Tensor]] = {}
        for layer in self.moe_layers():
            for name, value in layer.routing_info().aux.items():
                totals.setdefault(name, []).append(value)
        return {name: torch.stack(v).mean() for name, v in totals.items()}

    def extra_repr(self) -> str:
        return f"params={self.cfg.num_params():,}, active_params={self.cfg.num_active_params():,}"


def _rename_router_gru(module: MoELM, state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: checkpoints written before routers owned their configs call the shared
    module `router_gru`."""
    old = prefix + "router_gru."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "router_shared." + key[len(old):]] = state_dict.pop(key)
