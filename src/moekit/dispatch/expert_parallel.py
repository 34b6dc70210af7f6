"""Expert-parallel dispatch: the experts of a layer sharded over the ranks of a process group.

Legend: T local tokens, D model dim, E experts of the layer, W ranks of the expert-parallel (EP)
group, P = E/W experts per rank (local experts), N local assignments, R rows (one per token and
destination rank), M assignments a rank receives, X fields of the counts message.

Each rank routes its own tokens (a ragged assignment: any number of experts per token, zero
included) and holds P experts (`Placement`: expert -> (rank, local index)). Forward stages:
  0. capacity (optional): one all-gather of per-rank counts per expert; every rank then keeps the
     assignments one process would keep over the concatenated global batch (ranks in order), and
     knows the global number dropped;
  1. plan: sort local assignments by (destination rank, local expert); one row per (token,
     destination rank) - a token's row travels once to each rank, however many of its experts
     live there, and not at all when they are all local;
  2. counts: all_to_all of per-(destination, local expert) counts, rows and a status flag; a rank
     whose input is invalid says so here and every rank raises (no rank is left waiting);
  3. exchange: row index and weight of each assignment, then the rows (all_to_all with per-rank
     split sizes);
  4. experts: received assignments regrouped by local expert (`make_plan` on (row, local expert,
     weight) triples), the local grouped GEMM, and a weighted sum per received row (`combine`,
     fp32 accumulation), so each row returns one partial sum;
  5. return: the inverse all_to_all, then y_TD = sum of a token's partial sums (fp32 accumulation).

Rows and weights cross ranks through `_AllToAll`, an autograd Function over the public
`torch.distributed.all_to_all_single` whose backward is the same exchange with the split sizes
reversed, so gradients reach x, the combine weights and the local experts.
NOTE: PyTorch's own autograd all-to-all exists and works with gloo in torch 2.13, but
`torch.distributed.nn.functional.all_to_all_single` is deprecated (a FutureWarning per call) and its
named replacement, `torch.distributed._functional_collectives.all_to_all_single_autograd`, is a
private module whose first call imports torch._dynamo and sympy (measured: 6 s and ~800 modules per
process on this project's CI machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.dispatch.placement import Placement
from moekit.dispatch.plan import combine, make_plan, permute
from moekit.errors import MoekitError, UsageError

__all__ = ["ExchangeError", "ExchangeStats", "ExpertParallel"]


class ExchangeError(MoekitError, RuntimeError):
    """A collective of expert- or data-parallel training failed (usually because another rank died first), or
    another rank of the group rejected its input."""


@dataclass(frozen=True)
class ExchangeStats:
    """What the last forward of an `ExpertParallel` exchanged, seen from this rank.

    Per-rank lists have W entries; the entry of this rank itself stays local (no bytes cross).
    Bytes are those of the forward; a backward exchanges rows and weights again in reverse.
    """

    rank: int
    rows_sent_W: tuple[int, ...]  # token rows this rank dispatched to each rank
    rows_recv_W: tuple[int, ...]  # rows it received from each rank (each goes back as one partial sum)
    assignments_sent_W: tuple[int, ...]  # (token, expert) assignments sent to each rank
    assignments_recv_W: tuple[int, ...]
    load_P: tuple[int, ...]  # assignments each local expert computed (all ranks' tokens)
    row_bytes: int  # one row: D * element size of x
    weight_bytes: int  # element size of the combine weights
    counts_bytes: int  # the counts message to one rank (and, with a capacity, the gathered counts from one rank)
    num_dropped: int  # this rank's assignments dropped by the capacity; the sum over ranks is the global count
    num_dropped_global: int  # assignments the capacity dropped over the whole group (same on every rank)
    kept_N: torch.Tensor | None  # bool (N,): which input assignments ran (None = dropless)

    def _remote(self, per_rank: tuple[int, ...]) -> int:
        return sum(n for r, n in enumerate(per_rank) if r != self.rank)

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sent to other ranks: rows dispatched, partial sums returned, and per assignment
        an int64 row index and a weight, plus the counts messages."""
        rows = self._remote(self.rows_sent_W) + self._remote(self.rows_recv_W)
        meta = self._remote(self.assignments_sent_W) * (8 + self.weight_bytes)
        return rows * self.row_bytes + meta + (len(self.rows_sent_W) - 1) * self.counts_bytes

    @property
    def bytes_received(self) -> int:
        rows = self._remote(self.rows_recv_W) + self._remote(self.rows_sent_W)
        meta = self._remote(self.assignments_recv_W) * (8 + self.weight_bytes)
        return rows * self.row_bytes + meta + (len(self.rows_sent_W) - 1) * self.counts_bytes


class ExpertParallel:
    """Dispatch ragged routings to experts sharded over an expert-parallel process group.

    group: the EP process group (None = the default group); its ranks are the placement's ranks.
    placement: where each expert lives (`Placement`); its num_ranks must equal the group size.
    capacity_factor: None = dropless; else each expert runs at most ceil(factor * N_global / E)
        assignments, the first ones in the order of the concatenated global batch (rank 0's
        assignments, then rank 1's, ...), exactly as `make_plan` on one process.

    Call `ep(x_TD, token_idx_N, expert_idx_N, weight_N, local_bank) -> y_TD` on every rank of the
    group, in the same order (it is a collective). `last_stats` then describes the exchange.
    Raises UsageError at construction for a placement of another size; ValueError on the rank whose
    input is invalid and ExchangeError on the others; ExchangeError when a collective fails.
    """

    def __init__(self, group: dist.ProcessGroup | None, placement: Placement, capacity_factor: float | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise UsageError("ExpertParallel: torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group (or launch with torchrun) first")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if placement.num_ranks != self.world:
            raise UsageError(f"ExpertParallel: the placement is for {placement.num_ranks} ranks but the "
                             f"expert-parallel group has {self.world}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise UsageError(f"ExpertParallel: capacity_factor={capacity_factor} is invalid; expected None "
                             f"(dropless) or a number > 0")
        self.placement = placement
        self.capacity_factor = capacity_factor
        self._slot_E = torch.from_numpy(placement.slot_E())
        self.last_stats: ExchangeStats | None = None

    def __repr__(self) -> str:
        kind = "contiguous" if self.placement.is_contiguous() else "custom"
        return (f"ExpertParallel(rank={self.rank}/{self.world}, experts={self.placement.num_experts} "
                f"({self.placement.experts_per_rank} per rank, {kind} placement), capacity_factor={self.capacity_factor})")

    # ----------------------------------------------------------------------------------------- forward

    def __call__(self, x_TD: torch.Tensor, token_idx_N: torch.Tensor, expert_idx_N: torch.Tensor,
                 weight_N: torch.Tensor, local_bank) -> torch.Tensor:
        """y_TD[t] = sum over t's assignments n of weight_n * FFN_{expert_n}(x_TD[t]), experts anywhere.

        x_TD (T, D) float; token_idx_N, expert_idx_N (N,) int64 (global expert ids); weight_N (N,)
        float; local_bank: this rank's shard, called as `local_bank(x_ND, offsets_P) -> y_ND` with
        rows grouped by local expert (an `ExpertBank` of E/W experts). Returns y_TD in x's dtype.
        """
        W, P = self.world, self.placement.experts_per_rank
        problem = self._input_problem(x_TD, token_idx_N, expert_idx_N, weight_N, local_bank)
        kept_N, dropped_global = None, 0
        if self.capacity_factor is not None:  # 0. (raises on every rank if any rank's input is invalid)
            kept_N, dropped_global = self._capacity(expert_idx_N, problem)
            token_idx_N, expert_idx_N, weight_N = token_idx_N[kept_N], expert_idx_N[kept_N], weight_N[kept_N]
        elif problem is not None:  # tell the other ranks through the counts exchange they expect; all raise
            self._exchange_counts(torch.zeros(W, P + 1, dtype=torch.int64, device=x_TD.device), problem)
        T, D = x_TD.shape
        device = x_TD.device

        # 1. plan: assignments sorted by destination slot (rank, local expert); one row per (token, rank)
        plan = make_plan(token_idx_N, self._slot_E.to(device)[expert_idx_N], weight_N, W * P)
        dest_N = plan.expert_N // P
        row_key_R, row_of_N = torch.unique(dest_N * T + plan.token_N, sorted=True, return_inverse=True)
        row_token_R = row_key_R % max(T, 1)
        rows_sent_W = torch.bincount(row_key_R // max(T, 1), minlength=W)
        row_in_chunk_N = row_of_N - (torch.cumsum(rows_sent_W, 0) - rows_sent_W)[dest_N]

        # 2. counts per (destination, local expert) and rows per destination
        counts_WP = plan.counts_E.view(W, P)
        recv_WX = self._exchange_counts(torch.cat([counts_WP, rows_sent_W.unsqueeze(1)], dim=1), None)
        recv_counts_WP, rows_recv_W = recv_WX[:, :P], recv_WX[:, P]
        sent_assign_W, recv_assign_W = counts_WP.sum(1), recv_counts_WP.sum(1)

        # 3. row index and weight of each assignment, then the rows themselves
        send_a, recv_a = sent_assign_W.tolist(), recv_assign_W.tolist()
        send_r, recv_r = rows_sent_W.tolist(), rows_recv_W.tolist()
        row_in_chunk_M = self._exchange_ints(row_in_chunk_N, recv_a, send_a, "row indices")
        rows_RD = x_TD.index_select(0, row_token_R)
        weight_N = plan.weight_N
        if torch.is_grad_enabled():
            # NOTE: every rank must run the same reverse exchanges in backward, or the ranks that do
            # wait forever: keep the exchanges in this rank's graph even when its inputs need no gradient.
            rows_RD = rows_RD if rows_RD.requires_grad else rows_RD.detach().requires_grad_()
            weight_N = weight_N if weight_N.requires_grad else weight_N.detach().requires_grad_()
        weight_M = self._exchange(weight_N, recv_a, send_a, "combine weights")
        recv_rows_RD = self._exchange(rows_RD, recv_r, send_r, "token rows")

        # 4. local experts: received assignments -> (row, local expert, weight) triples, planned like one process
        src_M = torch.repeat_interleave(torch.arange(W, device=device), recv_assign_W)
        row_M = row_in_chunk_M + (torch.cumsum(rows_recv_W, 0) - rows_recv_W)[src_M]
        local_M = torch.repeat_interleave(torch.arange(P, device=device).repeat(W), recv_counts_WP.reshape(-1))
        local_plan = make_plan(row_M, local_M, weight_M, P)
        y_MD = local_bank(permute(recv_rows_RD, local_plan), local_plan.offsets_E)
        partial_RD = combine(y_MD, local_plan, recv_rows_RD.shape[0], x_TD.dtype)

        # 5. partial sums go home and add up per token
        back_RD = self._exchange(partial_RD, send_r, recv_r, "partial sums")
        acc_dtype = torch.promote_types(back_RD.dtype, torch.float32)
        y_TD = back_RD.new_zeros(T, D, dtype=acc_dtype).index_add(0, row_token_R, back_RD.to(acc_dtype))

        self.last_stats = ExchangeStats(
            rank=self.rank, rows_sent_W=tuple(send_r), rows_recv_W=tuple(recv_r),
            assignments_sent_W=tuple(send_a), assignments_recv_W=tuple(recv_a),
            load_P=tuple(local_plan.counts_E.tolist()), row_bytes=D * x_TD.element_size(),
            weight_bytes=weight_N.element_size(),
            counts_bytes=8 * (P + 2 + (self.placement.num_experts + 1 if self.capacity_factor is not None else 0)),
            num_dropped=0 if kept_N is None else int((~kept_N).sum()), num_dropped_global=dropped_global,
            kept_N=kept_N)
        return y_TD.to(x_TD.dtype)

    # ----------------------------------------------------------------------------------------- helpers

    def _input_problem(self, x_TD, token_idx_N, expert_idx_N, weight_N, local_bank) -> str | None:
        """A one-line description of what is wrong with this rank's input, or None."""
        E, P = self.placement.num_experts, self.placement.experts_per_rank
        if x_TD.dim() != 2 or not x_TD.is_floating_point():
            return f"x_TD must be a float (tokens, d_model) tensor, got dtype {x_TD.dtype} shape {tuple(x_TD.shape)}"
        n = token_idx_N.numel()
        if any(t.dim() != 1 or t.numel() != n for t in (token_idx_N, expert_idx_N, weight_N)):
            return (f"token_idx_N, expert_idx_N and weight_N must be 1-D with one entry per assignment, got shapes "
                    f"{tuple(token_idx_N.shape)}, {tuple(expert_idx_N.shape)}, {tuple(weight_N.shape)}")
        if token_idx_N.dtype != torch.int64 or expert_idx_N.dtype != torch.int64:
            return f"token_idx_N and expert_idx_N must be int64, got {token_idx_N.dtype} and {expert_idx_N.dtype}"
        if n and not (0 <= int(expert_idx_N.min()) and int(expert_idx_N.max()) < E):
            return (f"expert ids must lie in 0..{E - 1} (global ids), got {int(expert_idx_N.min())}.."
                    f"{int(expert_idx_N.max())}")
        if n and not (0 <= int(token_idx_N.min()) and int(token_idx_N.max()) < x_TD.shape[0]):
            return f"token ids must lie in 0..{x_TD.shape[0] - 1}, got {int(token_idx_N.min())}..{int(token_idx_N.max())}"
        bank_experts = getattr(local_bank, "num_experts", P)
        if bank_experts != P:
            return f"the local expert bank holds {bank_experts} experts; expected E / W = {E} / {self.world} = {P}"
        return None

    def _capacity(self, expert_idx_N: torch.Tensor, problem: str | None) -> tuple[torch.Tensor, int]:
        """Keep mask of the local assignments and the global number dropped, decided as one process would
        over the concatenated batch (Switch Transformer, arXiv 2101.03961: an expert keeps its first C)."""
        E, W = self.placement.num_experts, self.world
        device = expert_idx_N.device
        counts_E = (torch.bincount(expert_idx_N, minlength=E) if problem is None
                    else torch.zeros(E, dtype=torch.int64, device=device))
        msg_X = torch.cat([counts_E, counts_E.new_tensor([int(problem is not None)])])
        gathered = [torch.empty_like(msg_X) for _ in range(W)]
        try:
            dist.all_gather(gathered, msg_X, group=self.group)
        except RuntimeError as e:
            raise self._exchange_error("capacity counts", e) from e
        all_WX = torch.stack(gathered)
        self._raise_if_any_failed(all_WX[:, -1], problem)
        counts_WE = all_WX[:, :E]
        total_E = counts_WE.sum(0)
        n_global = int(total_E.sum())
        if n_global == 0:
            return torch.ones(expert_idx_N.numel(), dtype=torch.bool, device=device), 0
        # the same float expression as make_plan, so that one process and W processes agree exactly
        capacity = math.ceil(self.capacity_factor * n_global / E)
        order_N = torch.argsort(expert_idx_N, stable=True)
        sorted_N = expert_idx_N[order_N]
        position_N = torch.empty_like(expert_idx_N)
        position_N[order_N] = torch.arange(sorted_N.numel(), device=device) - (torch.cumsum(counts_E, 0) - counts_E)[sorted_N]
        earlier_E = counts_WE[:self.rank].sum(0)  # assignments of lower ranks come first in the global order
        kept_N = earlier_E[expert_idx_N] + position_N < capacity
        return kept_N, int((total_E - capacity).clamp(min=0).sum())

    def _exchange_counts(self, counts_WX: torch.Tensor, problem: str | None) -> torch.Tensor:
        """Row r of counts_WX goes to rank r with this rank's status; returns the rows received (W, X).
        Raises on every rank if any rank reported a problem."""
        status_W1 = counts_WX.new_full((counts_WX.shape[0], 1), int(problem is not None))
        recv_WX = self._exchange_ints(torch.cat([counts_WX, status_W1], dim=1), None, None, "counts")
        self._raise_if_any_failed(recv_WX[:, -1], problem)
        return recv_WX[:, :-1]

    def _raise_if_any_failed(self, status_W: torch.Tensor, problem: str | None) -> None:
        """Every rank learnt every rank's status in the same collective: all raise together, none waits."""
        if problem is None and not bool(status_W.any()):
            return
        messages: list[str | None] = [None] * self.world
        dist.all_gather_object(messages, problem, group=self.group)
        if problem is not None:
            raise ValueError(f"ExpertParallel (rank {self.rank} of {self.world}): {problem}")
        bad = [r for r, m in enumerate(messages) if m is not None]
        raise ExchangeError(f"ExpertParallel: rank {bad[0]} of the expert-parallel group rejected its input "
                            f"({messages[bad[0]]}); rank {self.rank} stops too")

    def _exchange_error(self, what: str, e: Exception) -> ExchangeError:
        return _exchange_error(what, self.rank, self.world, e)

    def _exchange_ints(self, t: torch.Tensor, recv: list[int] | None, send: list[int] | None, what: str) -> torch.Tensor:
        return _all_to_all(t, recv, send, self.group, what)

    def _exchange(self, t: torch.Tensor, recv: list[int], send: list[int], what: str) -> torch.Tensor:
        return _AllToAll.apply(t, recv, send, self.group, what)


def _exchange_error(what: str, rank: int, world: int, e: Exception) -> ExchangeError:
    return ExchangeError(f"ExpertParallel: exchanging {what} failed on rank {rank} of {world}; another rank "
                         f"probably failed first (see its error). Cause: {e}")


def _all_to_all(t: torch.Tensor, recv: list[int] | None, send: list[int] | None, group, what: str) -> torch.Tensor:
    """Rows send[r] of t go to rank r; out holds recv[r] rows from each rank r (None = equal splits)."""
    out = t.new_empty((sum(recv), *t.shape[1:]) if recv is not None else t.shape)
    try:
        dist.all_to_all_single(out, t.contiguous(), recv, send, group=group)
    except RuntimeError as e:
        raise _exchange_error(what, dist.get_rank(group), dist.get_world_size(group), e) from e
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single: backward sends each gradient row back to where its row came from."""

    @staticmethod
    def forward(ctx, t, recv, send, group, what):
        ctx.recv, ctx.send, ctx.group, ctx.what = recv, send, group, what
        return _all_to_all(t, recv, send, group, what)

    @staticmethod
    def backward(ctx, grad_out):
        return _all_to_all(grad_out, ctx.send, ctx.recv, ctx.group, f"gradients of {ctx.what}"), None, None, None, None
