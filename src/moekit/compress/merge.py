"""Expert merging: experts of one layer are grouped, and each group becomes one expert.

Legend: E router experts of a layer, M experts after merging, D model dim, F expert hidden dim, X = 2F
(SwiGLU) or F (GELU), T calibration tokens.

M-SMoE (arXiv 2310.01334; UNITES-Lab/MC-SMoE):
  1. the M most used experts (routing frequency on the calibration text) are the dominant ones;
  2. every other expert joins the dominant expert whose router logits are the most similar (cosine of
     the experts' logit columns over the calibration tokens);
  3. each member's hidden neurons are permuted to match the dominant expert's (weight matching: a
     linear assignment over the neurons' concatenated [gate; up; down] weights), so that averaging
     combines like with like;
  4. the group's weights are averaged, each member weighted by its routing frequency.
HC-SMoE (arXiv 2410.08589): hierarchical clustering (average linkage, cosine distance) of the experts'
  mean outputs over every calibration token into M clusters, then the frequency-weighted average
  (no neuron permutation, as the paper's default).

The router is merged as MC-SMoE merges it: it keeps its E experts and every member of a group routes
to the group's one merged expert (`MoELayer.expert_map_E`, (E,) -> 0..M-1). Routing decisions are
unchanged; a token that picks two members of one group gets the merged expert once per pick, each
with its own weight (their sum, as the shared weights make them one function). Merging two identical
experts is therefore exact. The bank holds M experts: M experts' bytes.

`merge` reports per layer the relative reconstruction error of the layer's output on the calibration
inputs: ||y_merged - y|| / ||y||.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moekit.compress.calibrate import Calibration
from moekit.errors import UsageError
from moekit.experts import ExpertBank
from moekit.experts.bank import STANDARD
from moekit.layers.moe import MoELayer, moe_layers
from moekit.ops.ffn import Activation
from moekit.utils.assign import assign_min_cost

__all__ = ["METHODS", "MergeResult", "hc_smoe_groups", "m_smoe_groups", "merge", "merge_groups"]

METHODS = ("m-smoe", "hc-smoe")


def _neurons(w_in_XD: torch.Tensor, down_DF: torch.Tensor, activation: str) -> torch.Tensor:
    """(F, 3D or 2D) features of each hidden neuron: its gate, up and down weights."""
    F = down_DF.shape[1]
    parts = [w_in_XD[:F], w_in_XD[F:]] if activation == "swiglu" else [w_in_XD]
    return torch.cat([*parts, down_DF.T], dim=1)


def _permute(w_in_XD: torch.Tensor, down_DF: torch.Tensor, perm_F: torch.Tensor, activation: str):
    F = down_DF.shape[1]
    if activation == "swiglu":
        w_in_XD = torch.cat([w_in_XD[:F][perm_F], w_in_XD[F:][perm_F]])
    else:
        w_in_XD = w_in_XD[perm_F]
    return w_in_XD, down_DF[:, perm_F]


def m_smoe_groups(freq_E: torch.Tensor, similarity_EE: torch.Tensor, M: int) -> list[list[int]]:
    """M groups (each led by its dominant expert, listed first): the M most used experts lead, every other
    expert joins the most similar leader."""
    order = torch.argsort(freq_E, descending=True, stable=True).tolist()
    leaders = order[:M]
    groups = {d: [d] for d in leaders}
    for e in order[M:]:
        best = max(leaders, key=lambda d: float(similarity_EE[e, d]))
        groups[best].append(e)
    return [groups[d] for d in sorted(leaders)]


def hc_smoe_groups(features_ED: torch.Tensor, freq_E: torch.Tensor, M: int) -> list[list[int]]:
    """M clusters by average-linkage hierarchical clustering on cosine distance of `features_ED`; each
    cluster's most used expert is listed first."""
    f = features_ED.double()
    f = f / f.norm(dim=1, keepdim=True).clamp(min=1e-30)
    dist_EE = (1 - f @ f.T).numpy()
    clusters = [[e] for e in range(f.shape[0])]
    while len(clusters) > M:
        best, pair = float("inf"), (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = float(dist_EE[np.ix_(clusters[a], clusters[b])].mean())
                if d < best:
                    best, pair = d, (a, b)
        a, b = pair
        clusters[a] = clusters[a] + clusters.pop(b)
    return [sorted(c, key=lambda e: (-float(freq_E[e]), e)) for c in sorted(clusters, key=min)]


def check_mergeable(bank: nn.Module) -> None:
    """UsageError unless `bank` is an ExpertBank of standard SwiGLU stacks (what merging rewrites)."""
    if not isinstance(bank, ExpertBank):
        raise UsageError("merge: quantised experts cannot be merged; merge first, then quantise")
    if bank.layout != STANDARD or bank.act != Activation("swiglu"):
        # Neuron alignment splits gate and up rows as SwiGLU stacks them.
        raise UsageError(f"merge: the expert bank ({bank.extra_repr()}) is not the standard SwiGLU stack merging "
                         "handles; expected activation swiglu and the standard layout")


@torch.no_grad()
def merge_groups(layer: MoELayer, groups: list[list[int]], freq_E: torch.Tensor, align: bool) -> None:
    """Replace `layer`'s experts by one per group (the first member is the dominant one): neurons aligned
    to it when `align`, weights averaged by `freq_E` (uniformly within a group nobody used)."""
    if layer.expert_map_E is not None:
        raise UsageError("merge: this layer was merged already")
    bank = layer.experts
    check_mergeable(bank)
    E = layer.router.num_experts
    covered = sorted(e for g in groups for e in g)
    if covered != list(range(E)):
        raise ValueError(f"merge: groups must cover experts 0..{E - 1} exactly once, got {groups}")
    new = ExpertBank(len(groups), bank.d_model, bank.d_expert, bank.activation).to(bank.down_proj)
    map_E = torch.zeros(E, dtype=torch.long)
    for m, group in enumerate(groups):
        w = freq_E[group].double()
        w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1 / len(group))
        dom_in, dom_down = bank.w_in[group[0]].float(), bank.down_proj[group[0]].float()
        dom_feat = _neurons(dom_in, dom_down, bank.activation)
        acc_in, acc_down = float(w[0]) * dom_in, float(w[0]) * dom_down
        for j, e in enumerate(group[1:], start=1):
            w_in, down = bank.w_in[e].float(), bank.down_proj[e].float()
            if align:
                cost = -(dom_feat @ _neurons(w_in, down, bank.activation).T).double().numpy()
                perm = torch.from_numpy(assign_min_cost(cost))
                w_in, down = _permute(w_in, down, perm, bank.activation)
            acc_in += float(w[j]) * w_in
            acc_down += float(w[j]) * down
        new.w_in[m].copy_(acc_in)
        new.down_proj[m].copy_(acc_down)
        map_E[group] = m
    layer.experts = new
    layer.expert_map_E = map_E.to(layer.router.weight.device)


@dataclass
class MergeResult:
    groups: list[list[list[int]]]
    method: str
    error_L: list[float]

    def summary(self) -> str:
        E = sum(sum(map(len, g)) for g in self.groups)
        M = sum(map(len, self.groups))
        errs = " ".join(f"{x:.3f}" for x in self.error_L)
        return (f"merged {E} experts into {M} in {len(self.groups)} layers ({self.method}; router experts kept, "
                f"mapped to merged ones); output reconstruction error by layer: {errs}")

    def to_dict(self) -> dict:
        return {"method": "merge", "kind": self.method, "groups": self.groups, "error_by_layer": self.error_L}


@torch.no_grad()
def reconstruction_error(layer: MoELayer, x_TD: torch.Tensor, y_TD: torch.Tensor) -> float:
    """||layer(x) - y|| / ||y|| on calibration inputs."""
    return float((layer(x_TD) - y_TD).norm() / y_TD.norm().clamp(min=1e-30))


@torch.no_grad()
def merge(model: nn.Module, calib: Calibration, ratio: float, method: str = "m-smoe") -> MergeResult:
    """Merge each MoE layer's experts into round(E * (1 - ratio)) (at least 1) by `method` (module doc), in
    place; `calib` must come from this model (with `outputs=True` for hc-smoe)."""
    if method not in METHODS:
        raise UsageError(f"--merge {method!r} is invalid; allowed: {', '.join(METHODS)}")
    if not 0 <= ratio < 1:
        raise UsageError(f"--merge-ratio {ratio} is invalid; allowed: a share of experts to merge away in [0, 1)")
    layers = moe_layers(model)
    if len(calib.layers) != len(layers):
        raise ValueError(f"merge: the calibration has {len(calib.layers)} layers, the model {len(layers)}")
    groups_L, errors = [], []
    for layer, stats in zip(layers, calib.layers, strict=True):
        E = layer.router.num_experts
        M = max(1, round(E * (1 - ratio)))
        freq_E = stats.frequency_E()
        if method == "m-smoe":
            groups = m_smoe_groups(freq_E, stats.logit_similarity_EE(), M)
        else:
            groups = hc_smoe_groups(stats.mean_output_ED(), freq_E, M)
        x_TD = stats.inputs_TD
        y_TD = layer(x_TD) if x_TD is not None else None
        merge_groups(layer, groups, freq_E, align=method == "m-smoe")
        errors.append(reconstruction_error(layer, x_TD, y_TD) if x_TD is not None else float("nan"))
        groups_L.append(groups)
    return MergeResult(groups_L, method, errors)
