"""Expert parallelism applied to a built model: `apply_expert_parallel(model, mesh)`.

Legend: E experts of a layer, P = E / W_ep experts per rank, W ranks.

The model is built as for one process (the same seed on every rank, or loaded from a checkpoint),
then sharded in place:
  - each MoE layer keeps the P experts its placement gives to this rank's position on the mesh's
    "ep" dimension (a smaller `ExpertBank`, same parameter names) and dispatches through
    `moekit.dispatch.expert_parallel.ExpertParallel` over the "ep" group;
  - routers stay whole and replicated: every rank routes its own tokens over all E experts (their
    per-expert tensors are permuted with the bank by `permute_experts_` when a placement is applied);
  - dense parameters (embeddings, attention, norms, routers, shared experts) are replicated and their
    gradients averaged by PyTorch's `DistributedDataParallel` over every rank (its own process group,
    so that its asynchronous all-reduces never interleave with the exchanges);
  - expert parameters are data-parallel over the mesh's "dp" dimension (the ranks holding the same
    shard): `sync_expert_grads()` sums their gradients there and divides by the world size.

Every rank reads different tokens and its loss is the mean over its own tokens, so the rules above
give the gradient of the mean over the global batch, as one process holding it would compute:
a shard's gradient after backward already sums the contributions of its EP group's tokens (the
exchange brought them); the "dp" sum adds the other groups'; 1 / world turns the sum of per-rank
means into the global mean. Balance statistics (the balance loss's f, the step's counts for the
aux-loss-free bias, k schedules and ReMoE's L1 coefficient) are summed over every rank: pass
`data_group` to `moekit.BalanceTracker`.

Routers whose choice for a token depends on the other tokens of the batch (expert choice) would need
the global batch to route; they are refused.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from moekit.dispatch.expert_parallel import ExchangeError, ExpertParallel
from moekit.dispatch.placement import Placement
from moekit.errors import UsageError
from moekit.experts import ExpertBank
from moekit.layers.moe import MoELayer, moe_layer_names, moe_layers
from moekit.parallel.config import ParallelConfig

__all__ = ["ExpertParallelModel", "agree", "apply_expert_parallel", "init_parallel"]

_BANK_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def init_parallel(cfg: ParallelConfig) -> DeviceMesh | None:
    """The ("dp", "ep") device mesh of this process, initialising torch.distributed from torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) when needed; None for a single process with
    ep = dp = 1. Backend: nccl on CUDA (one device per local rank), gloo on CPU, unless set.
    Raises UsageError when ep * dp differs from the number of processes."""
    cfg.validate()
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    if world == 1 and cfg.ep == 1 and cfg.dp in (0, 1):
        return None
    dp = cfg.dp or max(world // cfg.ep, 1)
    if cfg.ep * dp != world:
        raise UsageError(f"--parallel.ep {cfg.ep} x --parallel.dp {dp} = {cfg.ep * dp} ranks, but {world} "
                         f"process(es) run; expected ep * dp = the number of processes (torchrun --nproc-per-node)")
    cuda = torch.cuda.is_available() and cfg.backend != "gloo"
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
    return init_device_mesh("cuda" if cuda else "cpu", (dp, cfg.ep), mesh_dim_names=("dp", "ep"))


class _Dispatch:
    """A layer's `expert_dispatch`: `ExpertParallel` with the capacity factor of this forward."""

    def __init__(self, ep: ExpertParallel):
        self.ep = ep

    def __call__(self, x_TD, token_idx_N, expert_idx_N, weight_N, experts, capacity_factor):
        self.ep.capacity_factor = capacity_factor
        y_TD = self.ep(x_TD, token_idx_N, expert_idx_N, weight_N, experts)
        return y_TD, self.ep.last_stats.kept_N

    def __repr__(self) -> str:
        return repr(self.ep)


class ExpertParallelModel:
    """A model sharded by `apply_expert_parallel`. Call `module` (the DDP wrapper) for training forwards;
    `model` is the sharded model itself (its MoE layers, `aux_losses()`, evaluation).

    After the micro-batches' backward and before clipping or the optimiser step, call
    `sync_expert_grads()` (or `clip_grad_norm_`, which calls it). Collective methods must run on every
    rank in the same order.
    """

    def __init__(self, model: nn.Module, mesh: DeviceMesh, placements: Sequence[Placement]):
        self.model = model
        self.mesh = mesh
        self.ep_group = mesh.get_group("ep")
        self.expert_dp_group = mesh.get_group("dp")
        self.ep_size, self.dp_size = mesh["ep"].size(), mesh["dp"].size()
        self.ep_rank = mesh.get_local_rank("ep")
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.data_group = dist.new_group(list(range(self.world)))  # balance statistics (all ranks' tokens)
        self.dense_group = dist.new_group(list(range(self.world)))  # DDP's own, see the module doc
        self.placements = list(placements)
        self.layers = moe_layers(model)
        names = moe_layer_names(model)
        # (name, parameter, layer index) of every expert parameter: sharded, never in DDP
        self.expert_params: list[tuple[str, nn.Parameter, int]] = []
        for i, (name, layer) in enumerate(zip(names, self.layers, strict=True)):
            prefix = "" if layer is model else f"{name}."
            if isinstance(layer.experts, ExpertBank):
                layer.experts.require_standard("expert parallelism")
            for p_name in _BANK_PARAMS:
                p = getattr(layer.experts, p_name, None)
                if p is not None:
                    self.expert_params.append((f"{prefix}experts.{p_name}", p, i))
        self._expert_ids = {id(p) for _, p, _ in self.expert_params}
        model._ddp_params_and_buffers_to_ignore = [name for name, _, _ in self.expert_params]  # DDP's documented hook
        device = next(model.parameters()).device
        self.module = DistributedDataParallel(model, process_group=self.dense_group, forward_sync_buffers=False,
                                              device_ids=[device.index] if device.type == "cuda" else None)

    def __repr__(self) -> str:
        return (f"ExpertParallelModel(rank {self.rank} of {self.world}: ep {self.ep_rank} of {self.ep_size}, "
                f"dp {self.dp_size}, {len(self.layers)} MoE layers)")

    # ----------------------------------------------------------------------------------------- data
    def batch_rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of `batch_size` sequences (rank r takes the r-th of world
        equal parts, so that the ranks' batches concatenated in rank order are the global batch).
        Raises UsageError when batch_size is not divisible by the world size."""
        if batch_size % self.world:
            raise UsageError(f"a global batch of {batch_size} sequences cannot be split over {self.world} ranks; "
                             f"expected --train.micro_batch divisible by the number of processes")
        per_rank = batch_size // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    # ----------------------------------------------------------------------------------------- gradients
    def is_expert_param(self, p: torch.Tensor) -> bool:
        return id(p) in self._expert_ids

    @torch.no_grad()
    def sync_expert_grads(self) -> None:
        """Expert gradients -> the gradient of the global mean loss: sum over the ranks holding the same
        shard ("dp"), divide by the world size (see the module doc). One all-reduce."""
        grads = [p.grad for _, p, _ in self.expert_params if p.grad is not None]
        if not grads:
            return
        if self.dp_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.expert_dp_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        for g in grads:
            g.div_(self.world)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`sync_expert_grads()`, then `torch.nn.utils.clip_grad_norm_` over the whole model: the norm
        counts every expert once (shards' squared norms summed over "ep"). max_norm <= 0: no clipping.
        Returns the total norm (the same on every rank)."""
        self.sync_expert_grads()
        dense, expert = [], []
        for p in self.model.parameters():
            if p.grad is not None:
                (expert if self.is_expert_param(p) else dense).append(p.grad)
        norms = [torch.linalg.vector_norm(g.to(torch.promote_types(g.dtype, torch.float32))) for g in dense + expert]
        zero = torch.zeros((), dtype=torch.float64, device=next(self.model.parameters()).device)
        dense_sq = sum((n ** 2 for n in norms[:len(dense)]), zero)
        expert_sq = sum((n ** 2 for n in norms[len(dense):]), zero).clone()
        if self.ep_size > 1:
            dist.all_reduce(expert_sq, group=self.ep_group)
        total = torch.sqrt(dense_sq + expert_sq)
        if max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
            for g in dense + expert:
                g.mul_(coef.to(g.dtype))
        return total

    # ----------------------------------------------------------------------------------------- state
    @torch.no_grad()
    def _gather_expert(self, shard: torch.Tensor, layer: int) -> torch.Tensor:
        """The (E, ...) tensor of every expert from each rank's (P, ...) shard, in global expert order."""
        parts = [torch.empty_like(shard) for _ in range(self.ep_size)]
        dist.all_gather(parts, shard.contiguous(), group=self.ep_group)
        slot_E = torch.from_numpy(self.placements[layer].slot_E()).to(shard.device)
        return torch.cat(parts)[slot_E]

    def _local(self, full: torch.Tensor, layer: int) -> torch.Tensor:
        ids = torch.tensor(self.placements[layer].local_experts(self.ep_rank), device=full.device)
        return full.index_select(0, ids).clone()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict one process would have (every expert), on every rank (collective)."""
        sd = dict(self.model.state_dict())
        for name, p, layer in self.expert_params:
            sd[name] = self._gather_expert(p.detach(), layer)
        return sd

    def _expert_pids(self, optimizer: torch.optim.Optimizer) -> dict[int, int]:
        """Optimiser state index -> layer, for the expert parameters."""
        layer_of = {id(p): layer for _, p, layer in self.expert_params}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {pid: layer_of[id(p)] for pid, p in enumerate(params) if id(p) in layer_of}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer.state_dict()` as one process would have it: per-expert state tensors gathered
        (collective). Scalars (Adam's step) are the same on every rank."""
        sd = optimizer.state_dict()
        state = {pid: dict(s) for pid, s in sd["state"].items()}
        for pid, layer in sorted(self._expert_pids(optimizer).items()):
            for key, value in sorted(state.get(pid, {}).items()):
                if torch.is_tensor(value) and value.dim() > 0:
                    state[pid][key] = self._gather_expert(value, layer)
        return {"state": state, "param_groups": sd["param_groups"]}

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer, full: dict) -> dict:
        """A one-process optimiser state dict (`full_optimizer_state`, or a checkpoint's) cut to this
        rank's experts, ready for `optimizer.load_state_dict`."""
        state = {pid: dict(s) for pid, s in full["state"].items()}
        for pid, layer in self._expert_pids(optimizer).items():
            for key, value in state.get(pid, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[pid][key] = self._local(value, layer)
        return {"state": state, "param_groups": full["param_groups"]}

    # ----------------------------------------------------------------------------------------- agreement
    def agree(self, problem: str | None) -> None:
        """`agree` over every rank."""
        agree(problem, self.data_group)


def agree(problem: str | None, group=None) -> None:
    """Every rank of `group` says whether it failed (`problem`: a one-line message, or None); when one
    did, all raise together and none is left waiting: ExchangeError naming the first rank that failed
    and its message. A collective: every rank calls it at the same point."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    problems: list[str | None] = [None] * world
    dist.all_gather_object(problems, problem, group=group)
    bad = [r for r, m in enumerate(problems) if m is not None]
    if bad:
        raise ExchangeError(f"rank {bad[0]} of {world} failed: {problems[bad[0]]}; rank {rank} stops too")


def _check_same_everywhere(model: nn.Module, layers: list[MoELayer]) -> None:
    """Every rank must start from the same full model (same seed, or the same checkpoint): compare a
    checksum of the expert weights (the dense ones DDP broadcasts from rank 0)."""
    total = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    for layer in layers:
        for p_name in _BANK_PARAMS:
            p = getattr(layer.experts, p_name, None)
            if p is not None:
                w = p.detach().double()
                total[0] += w.sum()
                total[1] += (w * torch.arange(1, w.shape[0] + 1, device=w.device, dtype=w.dtype).view(-1, *[1] * (w.dim() - 1))).sum()
    low, high = total.clone(), total.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise UsageError("apply_expert_parallel: the ranks hold different expert weights; expected the same full "
                         "model on every rank (build it with the same seed, or load the same checkpoint, first)")


def untested_options(cfg) -> list[str]:
    """The options of MoEConfig `cfg` that expert parallelism refuses (not tested with it yet)."""
    return [name for name, on in (("iterations > 1 (Chain-of-Experts)", cfg.iterations > 1),
                                  ("zero-computation experts", cfg.num_zero_compute > 0),
                                  ("latent_dim", cfg.latent_dim is not None),
                                  ("expert_output_norm_eps", cfg.expert_output_norm_eps is not None),
                                  ("pregated", cfg.pregated),
                                  ("gating_residual", cfg.gating_residual),
                                  ("weight_on_input", cfg.weight_on_input)) if on]


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh,
                          placements: Sequence[Placement] | None = None) -> ExpertParallelModel:
    """Shard `model`'s MoE layers over the mesh's "ep" dimension and wrap it for data parallelism.

    model: a full model, the same on every rank (built with one seed or loaded from one checkpoint).
    mesh: a 2-D DeviceMesh with dimensions ("dp", "ep") (`init_parallel`). placements: one `Placement`
    per MoE layer (default contiguous blocks). A layer's expert bank is replaced in place by this
    rank's shard; build the optimiser afterwards. Returns an `ExpertParallelModel`.

    Raises UsageError for a mesh without those dimensions, a number of experts not divisible by the EP
    size, a router that routes over the whole batch (expert choice), or ranks whose models differ.
    """
    if mesh.mesh_dim_names is None or set(mesh.mesh_dim_names) != {"dp", "ep"} or mesh.ndim != 2:
        raise UsageError(f"apply_expert_parallel: the mesh has dimensions {mesh.mesh_dim_names}; expected a 2-D "
                         f"DeviceMesh named ('dp', 'ep') (moekit.parallel.init_parallel builds one)")
    layers = moe_layers(model)
    if not layers:
        raise UsageError(f"apply_expert_parallel: {type(model).__name__} contains no MoELayer")
    ep_size, ep_rank = mesh["ep"].size(), mesh.get_local_rank("ep")
    if placements is None:
        placements = [Placement.contiguous(layer.cfg.num_experts, ep_size) for layer in layers]
    if len(placements) != len(layers):
        raise UsageError(f"apply_expert_parallel: {len(placements)} placements for {len(layers)} MoE layers")
    for i, (layer, placement) in enumerate(zip(layers, placements, strict=True)):
        if not layer.cfg.router.is_causal():
            raise UsageError(f"apply_expert_parallel: router {layer.cfg.router.kind!r} picks each expert's tokens over "
                             "the whole batch, which expert parallelism splits over ranks; expected a token-choice "
                             "router (top-k, top-p, null experts, ...)")
        untested = untested_options(layer.cfg)
        if untested:
            raise UsageError(f"apply_expert_parallel: MoE layer {i} uses {', '.join(untested)}, which expert "
                             "parallelism is not tested with yet; expected a plain routed layer")
        if placement.num_experts != layer.cfg.num_experts or placement.num_ranks != ep_size:
            raise UsageError(f"apply_expert_parallel: MoE layer {i} has {layer.cfg.num_experts} experts over "
                             f"{ep_size} ranks but its placement is for {placement.num_experts} over "
                             f"{placement.num_ranks}")
        if layer.expert_dispatch is not None:
            raise UsageError(f"apply_expert_parallel: MoE layer {i} is sharded already")
    _check_same_everywhere(model, layers)
    ep_group = mesh.get_group("ep")
    for layer, placement in zip(layers, placements, strict=True):
        full = layer.experts
        ids = torch.tensor(placement.local_experts(ep_rank))
        P = placement.experts_per_rank
        shard = ExpertBank(P, full.d_model, full.d_expert, full.activation)
        with torch.no_grad():
            for p_name in _BANK_PARAMS:
                w = getattr(full, p_name, None)
                if w is not None:
                    local = w.detach().index_select(0, ids.to(w.device)).clone()
                    setattr(shard, p_name, nn.Parameter(local, requires_grad=w.requires_grad))
        layer.experts = shard
        layer.expert_dispatch = _Dispatch(ExpertParallel(ep_group, placement))
    return ExpertParallelModel(model, mesh, placements)

