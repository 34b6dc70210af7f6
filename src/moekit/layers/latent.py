"""MoLAE conversion (Mixture of Latent Experts, arXiv 2503.23100): a trained MoE layer's experts
factored through a basis shared by all experts, giving a latent-expert layer (`MoEConfig.latent_dim`).

Legend: E experts, D model dim, F expert hidden dim, r latent rank.

Input side (as MoLAE): the stacked input matrices W_e (I, D) (gate_up_proj, I = 2F; up_proj for GELU)
form M (E*I, D); its SVD M = U S V^T gives the shared basis A = V[:, :r]^T (r, D) and the per-expert
maps B_e = W_e A^T (I, r), so W_e x ~ B_e (A x): A becomes `fc1_latent_proj`, B_e the expert's input
matrix in r dims. Output side (so that the result is a latent layer, whose experts write r dims too):
the down matrices W_e (D, F) side by side, N (D, E*F) = U S V^T, P = U[:, :r] (D, r) shared
(`fc2_latent_proj`) and C_e = P^T W_e (r, F); the combine is linear, so sum_e g_e P C_e h = P sum_e g_e C_e h.
A and P are orthonormal, so the projection onto them is the best rank-r fit of the stacked matrices
(Eckart-Young) and at r = D (with E*I >= D and E*F >= D) the converted layer equals the original.

    new_layer, report = molae_layer(layer, rank=64)
    new_model, reports = molae_model(model, rank=64)     # an MoELM: every MoE layer converted
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from moekit.config import require
from moekit.layers.moe import MoELayer

__all__ = ["molae_layer", "molae_model"]


def _relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    return float(torch.linalg.norm(W - W_hat) / torch.linalg.norm(W).clamp_min(1e-30))


@torch.no_grad()
def molae_layer(layer: MoELayer, rank: int) -> tuple[MoELayer, dict]:
    """A latent-expert copy of `layer` with `latent_dim = rank` (the original is not changed).

    Returns (new layer, report) with the relative Frobenius reconstruction errors of the stacked
    input and output matrices, and the expert bytes before and after (the shared projections
    counted as dense bytes). Raises UsageError for a latent layer or a rank outside [1, D].
    """
    cfg = layer.cfg
    D = cfg.d_model
    require(cfg.latent_dim is None, "molae_layer(layer)", f"latent_dim={cfg.latent_dim}", "a layer without latent_dim")
    require(isinstance(rank, int) and 1 <= rank <= D, "molae_layer(rank)", rank, f"an integer in [1, d_model={D}]")
    bank = layer.experts
    E, w_in_EID, w_out_EDF = cfg.num_experts, bank.w_in.double(), bank.down_proj.double()
    I, F = w_in_EID.shape[1], w_out_EDF.shape[2]
    # Input side: the shared row basis of the stacked input matrices (arXiv 2503.23100).
    M = w_in_EID.reshape(E * I, D)
    A_rD = torch.linalg.svd(M, full_matrices=False).Vh[:rank]
    B_EIr = w_in_EID @ A_rD.T
    # Output side: the shared column basis of the down matrices side by side.
    N_DX = w_out_EDF.permute(1, 0, 2).reshape(D, E * F)
    P_Dr = torch.linalg.svd(N_DX, full_matrices=False).U[:, :rank]
    C_ErF = P_Dr.T @ w_out_EDF

    dtype = bank.down_proj.dtype
    new = MoELayer(dataclasses.replace(cfg, latent_dim=rank)).to(device=bank.down_proj.device, dtype=dtype)
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("experts.")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or not all(k.startswith(("experts.", "fc1_latent", "fc2_latent")) for k in missing):
        raise RuntimeError(f"molae_layer: the layer's weights do not fit its latent copy ({missing}, {unexpected})")
    new.fc1_latent_proj.weight.copy_(A_rD.to(dtype))
    new.fc2_latent_proj.weight.copy_(P_Dr.to(dtype))
    new.experts.w_in.copy_(B_EIr.to(dtype))
    new.experts.down_proj.copy_(C_ErF.to(dtype))
    new.train(layer.training)

    size = bank.down_proj.element_size()
    report = {
        "rank": rank,
        "input_error": _relative_error(M, (B_EIr @ A_rD).reshape(E * I, D)),
        "output_error": _relative_error(N_DX, (P_Dr @ C_ErF).permute(1, 0, 2).reshape(D, E * F)),
        "expert_bytes_before": (w_in_EID.numel() + w_out_EDF.numel()) * size,
        "expert_bytes_after": (B_EIr.numel() + C_ErF.numel()) * size,
        "dense_bytes_added": 2 * D * rank * size,  # the shared projections stay resident (offload: dense)
    }
    report["bytes_saved"] = report["expert_bytes_before"] - report["expert_bytes_after"] - report["dense_bytes_added"]
    return new, report


@torch.no_grad()
def molae_model(model: nn.Module, rank: int) -> tuple[nn.Module, list[dict]]:
    """A copy of `model` with every MoELayer converted by `molae_layer`; a model config with a `moe`
    field (moekit's LMConfig) gets `moe.latent_dim = rank`, so the copy saves and loads as built.
    Returns (new model, one report per MoE layer, in `moe_layers` order)."""
    new = copy.deepcopy(model)
    reports = []
    for name, module in list(new.named_modules()):
        if isinstance(module, MoELayer):
            parent_name, _, attr = name.rpartition(".")
            converted, report = molae_layer(module, rank)
            setattr(new.get_submodule(parent_name) if parent_name else new, attr, converted)
            reports.append(report)
    if not reports:
        raise ValueError(f"molae_model(): {type(model).__name__} contains no MoELayer")
    cfg = getattr(new, "cfg", None)
    if dataclasses.is_dataclass(cfg) and hasattr(cfg, "moe"):
        new.cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, latent_dim=rank))
    return new, reports
