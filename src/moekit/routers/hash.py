"""Hash routing: a token's experts are a fixed function of its token id (Hash Layers, arXiv 2106.04426;
DeepSeek-V4's first MoE layers).

Legend: T tokens, D model dim, E experts, K experts per token, V vocabulary size.

  1. experts: idx_TK = tid2eid[token_id] — a fixed (V, K) int64 table (`tid2eid`, DeepSeek-V4's name),
     never trained; moekit's default is the paper's "random hash": K distinct experts per token id, drawn
     once from a seeded generator. A pretrained table (moekit.hf) replaces it.
  2. weights: the gate's scores (softmax, sigmoid or sqrt-softplus of the logits, as top-k) at those
     experts, renormalised if `normalizes()` (default: for k > 1; with k = 1 the weight is the raw score)
     and times routed_scaling_factor — DeepSeek-V4's rule. The paper's hash layer has no gate weight: k = 1
     with normalize=True gives every token the weight 1.
The token ids come as the layer's `router_state` (`RouterConfig.routes_on_token_ids()`): `MoELM` hands its
input ids to every MoE layer, `moekit.hf` the `input_ids` its model passes to the block. An expert mask can
disable experts (their picks are dropped: the table cannot choose another) but not force them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moekit.config import RouterConfig, require, setting
from moekit.errors import DataError, UsageError
from moekit.routers.base import Router, RouterOutput, warn_if_k1_normalized
from moekit.routers.registry import register
from moekit.routers.topk import SCORES, renormalizer, scores_of
from moekit.utils.ids import check_token_ids


@dataclass
class HashConfig(RouterConfig):
    """Hash routing (arXiv 2106.04426): k experts per token id from a fixed (vocab_size, k) table; weights from
    the gate's `score` at them, renormalised (`normalize`, None = yes for k > 1) and scaled
    (routed_scaling_factor), as DeepSeek-V4's hash layers. `seed`: the random table's seed."""

    expert_count_fields: ClassVar[tuple[str, ...]] = ("k",)
    kind: str = setting("hash", "router: how tokens pick experts (moekit info lists them)")
    k: int = setting(1, "experts per token id")
    vocab_size: int = setting(32768, "token ids the table maps (at least the model's vocabulary size)")
    score: str = setting("softmax", "gate score function for the weights", choices=SCORES)
    normalize: bool | None = setting(None, "renormalise the weights over a token's experts (None = yes for k > 1)")
    routed_scaling_factor: float = setting(1.0, "multiply the weights by this (DeepSeek-V4)")
    seed: int = setting(0, "seed of the random token id -> experts table")

    def normalizes(self) -> bool:
        return self.normalize if self.normalize is not None else self.k > 1

    def score_function(self) -> str:
        return self.score

    def describe(self) -> str:
        parts = [f"k={self.k}", f"hash over {self.vocab_size} token ids", f"score={self.score}",
                 f"normalize={self.normalizes()}"]
        if self.routed_scaling_factor != 1.0:
            parts.append(f"scale={self.routed_scaling_factor}")
        return ", ".join(parts)

    def check(self, num_experts: int) -> None:
        require(1 <= self.k <= num_experts, "RouterConfig.k", self.k, f"an integer in [1, num_experts={num_experts}]")
        require(self.vocab_size >= 1, "RouterConfig.vocab_size", self.vocab_size,
                "the model's vocabulary size (an integer >= 1)")
        require(self.score in SCORES, "RouterConfig.score", self.score, f"one of {SCORES}")
        require(self.routed_scaling_factor > 0, "RouterConfig.routed_scaling_factor", self.routed_scaling_factor,
                "a float > 0")
        if self.normalize is not None:
            warn_if_k1_normalized(self)

    def expected_experts_per_token(self, num_experts: int) -> float:
        return float(min(self.k, num_experts))

    def fixed_experts_per_token(self) -> bool:
        return True

    def routes_on_token_ids(self) -> bool:
        return True

    def check_vocabulary(self, vocab_size: int) -> None:
        require(self.vocab_size >= vocab_size, "RouterConfig.vocab_size", self.vocab_size,
                f"at least the model's vocabulary size {vocab_size} (the table maps every token id)")

    def hf_routing(self) -> dict[str, Any] | None:
        return None  # export writes Mixtral / Qwen3-MoE / GLM-4-MoE checkpoints, none of which hashes


@register("hash", config=HashConfig)
class HashRouter(Router):
    expert_tensors = ("weight", "expert_scale")  # tid2eid holds expert ids, not a row per expert

    def __init__(self, cfg: HashConfig, d_model: int, num_experts: int):
        super().__init__(cfg, d_model, num_experts)
        self.register_buffer("tid2eid", random_table(cfg.vocab_size, num_experts, cfg.k, cfg.seed))
        self._checked_table: tuple[int, int] | None = None  # (id, version) of the table last checked

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None, state: Any = None,
                logit_bias_TE: torch.Tensor | None = None) -> RouterOutput:
        """`state`: the token ids (any shape with T elements, int), see the module doc. Raises UsageError for
        missing ids or ids outside [0, rows of `tid2eid`) (on CUDA a device-side assert: no host sync)."""
        if (not isinstance(state, torch.Tensor) or state.dtype.is_floating_point or state.dtype.is_complex
                or state.dtype == torch.bool or state.numel() != x_TD.shape[0]):
            raise UsageError(f"RouterConfig(kind='hash') routes on token ids: pass the {x_TD.shape[0]} tokens' ids as "
                             f"the MoE layer's router_state (got {type(state).__name__}"
                             f"{'' if not isinstance(state, torch.Tensor) else f' {tuple(state.shape)} {state.dtype}'})")
        logits_TE = self.scaled(self.logits(self.gate_input(self.jittered(x_TD))))
        if logit_bias_TE is not None:
            logits_TE = logits_TE + logit_bias_TE
        cfg = self.cfg
        ids_T = state.reshape(-1).to(self.tid2eid.device, torch.long)  # uint8 would index as a mask
        # A negative id would silently index the table from its end, a large one raise a raw IndexError.
        check_token_ids(ids_T, self.tid2eid.shape[0], "RouterConfig(kind='hash')", "the rows of its token id table")
        self._check_table()
        idx_TK = self.tid2eid[ids_T].long()
        scores_TE = scores_of(logits_TE, cfg.score)
        w_TK = scores_TE.gather(1, idx_TK)
        if cfg.normalizes():
            w_TK = w_TK / renormalizer(w_TK, cfg.score)
        if cfg.routed_scaling_factor != 1.0:
            w_TK = w_TK * cfg.routed_scaling_factor
        route = self.scale_weights(RouterOutput.from_topk(idx_TK, w_TK, scores_TE, logits_TE))
        if self.expert_mask_E is None:
            return route
        # A disabled expert's picks are dropped: the table has no other expert for the token.
        return route.keep(~(self.expert_mask_E < 0)[route.expert_idx_N])

    def _check_table(self) -> None:
        """DataError where the table holds an expert id outside [0, E) (a damaged or mismatched checkpoint's
        `tid2eid`; the gather's raw error otherwise). Once per table and version: loading a checkpoint into
        it (copy_) bumps the version. Skipped under torch.compile, whose graphs do not read versions."""
        table = self.tid2eid
        if torch.compiler.is_compiling() or table.is_meta:
            return
        key = (id(table), table._version)
        if self._checked_table != key:
            check_token_ids(table, self.num_experts, "RouterConfig(kind='hash')", "the layer's experts", noun="expert id",
                            error=DataError)
            self._checked_table = key

    def select(self, logits_TE: torch.Tensor, x_TD: torch.Tensor,
               valid_T: torch.Tensor | None = None) -> RouterOutput:
        raise UsageError("RouterConfig(kind='hash') routes on token ids, which its forward takes as `state`")

    def check_reroute(self, cfg: HashConfig) -> None:
        """The table is fixed (random, or the pretrained model's): k, vocab_size and seed cannot change under it."""
        V, K = self.tid2eid.shape
        held = {"k": K, "vocab_size": V, "seed": self.cfg.seed}
        changed = [f"{name}={getattr(cfg, name)}" for name, value in held.items() if getattr(cfg, name) != value]
        if changed:
            raise UsageError(f"RouterConfig(kind='hash') {', '.join(changed)}: its experts come from the layer's table "
                             f"tid2eid ({V}, {K}), which does not change; expected k={K}, vocab_size={V}, "
                             f"seed={self.cfg.seed} (the table's), or route(kind='topk', ...) to route on the gate")

    def adopt(self, old: Router) -> None:
        super().adopt(old)
        table = getattr(old, "tid2eid", None)
        if isinstance(table, torch.Tensor):
            self.tid2eid = table  # the same table: re-routing back to hash keeps a pretrained one


def random_table(vocab_size: int, num_experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """(vocab_size, k) int64: k distinct experts per token id, uniformly at random from a seeded generator
    (the "random hash" of arXiv 2106.04426)."""
    device = torch.empty(0).device  # the default device (meta while moekit.hf binds a pretrained table)
    if device.type == "meta":
        return torch.empty(vocab_size, k, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    if k == 1:
        table = torch.randint(0, num_experts, (vocab_size, 1), generator=g, device="cpu")
    else:
        table = torch.rand(vocab_size, num_experts, generator=g, device="cpu").topk(k, dim=-1).indices
    return table.to(device)
