"""Expert-parallel dispatch over local gloo processes equals one process on the same global batch.

One spawn of 2 ranks runs every case (spawning costs seconds; the comparisons are per test), then a
last case where one rank dies mid-exchange. Cases are built from a seed, identically in the parent
(the single-process reference) and in every rank. The 4-rank cases are `slow`.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.dispatch import combine, make_plan, permute
from moekit.dispatch.expert_parallel import ExchangeError, ExpertParallel
from moekit.dispatch.placement import Placement, traffic
from moekit.errors import UsageError
from moekit.experts import ExpertBank

TIMEOUT_S = 120  # the whole spawn; a hang fails the test instead of the suite
D, F = 8, 12

# name -> (E, tokens per rank of a 2-rank run, routing kind, dtype, placement, capacity factor, activation)
CASES = {
    "topk": (4, [7, 5], "topk", torch.float64, "contiguous", None, "swiglu"),
    "topk_fp32": (4, [6, 6], "topk", torch.float32, "contiguous", None, "swiglu"),
    "ragged_topp": (4, [9, 6], "ragged", torch.float64, "contiguous", None, "swiglu"),
    "null_experts": (4, [8, 7], "null", torch.float64, "contiguous", None, "gelu"),
    "rank1_receives_nothing": (4, [6, 5], "rank0_only", torch.float64, "contiguous", None, "swiglu"),
    "rank1_has_no_tokens": (4, [9, 0], "topk", torch.float64, "contiguous", None, "swiglu"),
    "uneven_splits": (8, [13, 2], "skewed", torch.float64, "contiguous", None, "swiglu"),
    "noncontiguous_placement": (8, [8, 7], "ragged", torch.float64, "scattered", None, "swiglu"),
    "capacity_drops": (4, [10, 8], "skewed", torch.float64, "contiguous", 1.0, "swiglu"),
    "capacity_noncontiguous": (8, [7, 9], "skewed", torch.float64, "scattered", 0.75, "swiglu"),
}


# ------------------------------------------------------------------------------------------ cases


def _placement(kind: str, E: int, W: int) -> Placement:
    if kind == "contiguous":
        return Placement.contiguous(E, W)
    # experts dealt round-robin in a shuffled order: every rank gets a scattered set, local order shuffled
    order = np.random.default_rng(E * 31 + W).permutation(E)
    rank_E = np.empty(E, dtype=np.int64)
    local_E = np.empty(E, dtype=np.int64)
    rank_E[order] = np.arange(E) % W
    local_E[order] = np.arange(E) // W
    return Placement(tuple(rank_E.tolist()), tuple(local_E.tolist()), W)


def _routing(kind: str, T: int, E: int, g: torch.Generator, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_idx_N, expert_idx_N) of one rank's T tokens, token-major, distinct experts per token."""
    if kind == "topk":
        k_T = torch.full((T,), 2)
    elif kind == "ragged":
        k_T = torch.randint(1, E + 1, (T,), generator=g)  # top-p-like: 1..E experts per token
    elif kind == "null":
        k_T = torch.tensor([0, 1, 2, 0, 2, 1, 0, 2, 1, 0, 0, 2][:T] + [1] * max(T - 12, 0))  # zero experts included
    elif kind == "rank0_only":
        k_T = torch.randint(1, 3, (T,), generator=g)
    else:  # skewed
        k_T = torch.randint(1, 4, (T,), generator=g)
    tokens, experts = [], []
    for t in range(T):
        if kind == "rank0_only":
            choice = torch.randperm(E // 2, generator=g)  # only rank 0's contiguous block
        elif kind == "skewed":
            # a few experts far more popular (crowded experts); rank 0 favours the last ids (rank 1's
            # contiguous block), the others the first: uneven split sizes both ways
            choice = torch.multinomial(torch.tensor([2.0 ** -e for e in range(E)]), E, generator=g)
            if rank == 0:
                choice = choice.flip(0)
        else:
            choice = torch.randperm(E, generator=g)
        k = int(k_T[t])
        tokens += [t] * k
        experts += choice[:k].tolist()
    return torch.tensor(tokens, dtype=torch.int64), torch.tensor(experts, dtype=torch.int64)


def make_case(name: str, world: int) -> dict:
    E, T_r, kind, dtype, placement_kind, capacity, activation = CASES[name]
    T_r = T_r if world == 2 else [T_r[r % 2] + r if T_r[r % 2] else 0 for r in range(world)]
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{world}".encode()))
    offsets = np.cumsum([0, *T_r]).tolist()
    routes = [_routing(kind, T_r[r], E, g, r) for r in range(world)]
    T = offsets[-1]
    bank = {"gate_up_proj": torch.randn(E, 2 * F, D, generator=g, dtype=dtype) * 0.3,
            "up_proj": torch.randn(E, F, D, generator=g, dtype=dtype) * 0.3,
            "down_proj": torch.randn(E, D, F, generator=g, dtype=dtype) * 0.3}
    N_r = [tok.numel() for tok, _ in routes]
    return {
        "E": E, "T_r": T_r, "offsets": offsets, "dtype": dtype, "capacity": capacity, "activation": activation,
        "placement": _placement(placement_kind, E, world), "routes": routes, "N_offsets": np.cumsum([0, *N_r]).tolist(),
        "x": torch.randn(T, D, generator=g, dtype=dtype),
        "weight": torch.rand(sum(N_r), generator=g, dtype=dtype) + 0.1,
        "grad_y": torch.randn(T, D, generator=g, dtype=dtype),
        "bank": bank,
    }


def _bank(case: dict, experts: list[int]) -> ExpertBank:
    bank = ExpertBank(len(experts), D, F, case["activation"]).to(case["dtype"])
    with torch.no_grad():
        for name, w in case["bank"].items():
            if getattr(bank, name) is not None:
                getattr(bank, name).copy_(w[experts])
    return bank


def reference(case: dict) -> dict:
    """One process, the global batch (ranks concatenated), the full bank: make_plan + bank + combine."""
    x = case["x"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    tok = torch.cat([tok + case["offsets"][r] for r, (tok, _) in enumerate(case["routes"])])
    exp = torch.cat([e for _, e in case["routes"]])
    bank = _bank(case, list(range(case["E"])))
    plan = make_plan(tok, exp, weight, case["E"], case["capacity"])
    y = combine(bank(permute(x, plan), plan.offsets_E), plan, x.shape[0], x.dtype)
    (y * case["grad_y"]).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": weight.grad, "num_dropped": plan.num_dropped,
            "bank_grad": {n: getattr(bank, n).grad for n in case["bank"] if getattr(bank, n) is not None},
            "token": tok, "expert": exp}


def run_rank(case: dict, rank: int, world: int, x_requires_grad: bool = True) -> dict:
    lo, hi = case["offsets"][rank], case["offsets"][rank + 1]
    n_lo, n_hi = case["N_offsets"][rank], case["N_offsets"][rank + 1]
    x = case["x"][lo:hi].clone().requires_grad_(x_requires_grad)
    weight = case["weight"][n_lo:n_hi].clone().requires_grad_()
    tok, exp = case["routes"][rank]
    placement = case["placement"]
    bank = _bank(case, placement.local_experts(rank))
    ep = ExpertParallel(None, placement, case["capacity"])
    y = ep(x, tok, exp, weight, bank)
    (y * case["grad_y"][lo:hi]).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": weight.grad, "stats": ep.last_stats,
            "bank_grad": {n: getattr(bank, n).grad for n in case["bank"] if getattr(bank, n) is not None}}


# ------------------------------------------------------------------------------------------ ranks


class _RaisingBank(torch.nn.Module):
    num_experts = 2

    def forward(self, x_ND, offsets_L):
        raise RuntimeError("expert bank failed on purpose")


def _worker(rank: int, world: int, port: int, outdir: str, names: list[str], extras: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    out = {name: run_rank(make_case(name, world), rank, world) for name in names}
    if extras:
        # only rank 0's x needs a gradient: both ranks must still run the same backward exchanges
        out["asymmetric_grad"] = run_rank(make_case("topk", world), rank, world, x_requires_grad=rank == 0)
        # rank 1 passes an expert id out of range: every rank raises at the counts exchange, none waits
        case = make_case("topk", world)
        tok, exp = case["routes"][rank]
        if rank == 1:
            exp = exp.clone()
            exp[0] = 99
        lo, hi = case["offsets"][rank], case["offsets"][rank + 1]
        try:
            ExpertParallel(None, case["placement"])(case["x"][lo:hi], tok, exp, torch.ones(tok.numel()),
                                                    _bank(case, case["placement"].local_experts(rank)))
            out["bad_input"] = None
        except (ValueError, ExchangeError) as e:
            out["bad_input"] = (type(e).__name__, str(e))
        # the same with a capacity: the agreement happens at the all-gather of the counts
        try:
            ExpertParallel(None, case["placement"], capacity_factor=1.0)(
                case["x"][lo:hi], tok, exp, torch.ones(tok.numel()), _bank(case, case["placement"].local_experts(rank)))
            out["bad_input_capacity"] = None
        except (ValueError, ExchangeError) as e:
            out["bad_input_capacity"] = (type(e).__name__, str(e))
        # the group still works after the agreed failures
        out["after_bad_input"] = run_rank(make_case("topk", world), rank, world)
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    if extras:
        # last: rank 1 dies inside its expert bank, between the exchanges; rank 0 must end with an error
        case = make_case("topk", world)
        tok, exp = case["routes"][rank]
        lo, hi = case["offsets"][rank], case["offsets"][rank + 1]
        bank = _RaisingBank() if rank == 1 else _bank(case, case["placement"].local_experts(rank))
        t0 = time.monotonic()
        try:
            ExpertParallel(None, case["placement"])(case["x"][lo:hi], tok, exp, torch.ones(tok.numel()), bank)
            crash = None
        except ExchangeError as e:
            crash = str(e)
        torch.save({"crash": crash, "seconds": time.monotonic() - t0}, os.path.join(outdir, f"crash{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, names: list[str], outdir: str, extras: bool, join_within) -> list[int | None]:
    """Spawn `world` gloo ranks; wait at most TIMEOUT_S; kill what is left (a hang fails, never blocks)."""
    # NOTE: fork, not spawn: a spawned rank re-imports torch and moekit (5-20 s on a loaded 2-core
    # machine); a forked one starts at once. Ranks use one thread (no OpenMP pool crosses the fork).
    ctx = mp.start_processes(_worker, args=(world, _free_port(), outdir, names, extras), nprocs=world,
                             join=False, start_method="fork")
    alive = join_within(ctx.processes, TIMEOUT_S)
    if alive:
        pytest.fail(f"ranks {alive} were still running after {TIMEOUT_S} s: the exchange hangs")
    return [p.exitcode for p in ctx.processes]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, join_within):
    outdir = tmp_path_factory.mktemp("ep2")
    exitcodes = run_ranks(2, list(CASES), str(outdir), extras=True, join_within=join_within)
    results = [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    crash = [torch.load(outdir / f"crash{r}.pt", weights_only=False) if (outdir / f"crash{r}.pt").exists() else None
             for r in range(2)]
    return {"results": results, "exitcodes": exitcodes, "crash": crash}


# ------------------------------------------------------------------------------------------ checks


def assert_matches_one_process(case: dict, results: list[dict]) -> None:
    ref = reference(case)
    world = len(results)
    tol = {"atol": 1e-10, "rtol": 1e-10} if case["dtype"] == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), ref["y"], **tol)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), ref["x_grad"], **tol)
    torch.testing.assert_close(torch.cat([r["weight_grad"] for r in results]), ref["weight_grad"], **tol)
    for rank in range(world):
        experts = case["placement"].local_experts(rank)
        for name, grad in results[rank]["bank_grad"].items():
            torch.testing.assert_close(grad, ref["bank_grad"][name][experts], **tol)
    # the exchange really ran: rows crossed ranks (what one rank sent, the other received)
    stats = [r["stats"] for r in results]
    for a in range(world):
        for b in range(world):
            assert stats[a].rows_sent_W[b] == stats[b].rows_recv_W[a]
            assert stats[a].assignments_sent_W[b] == stats[b].assignments_recv_W[a]
    assert sum(s.bytes_sent for s in stats) == sum(s.bytes_received for s in stats) > 0
    if case["capacity"] is not None:
        assert ref["num_dropped"] > 0, "the case should drop assignments"
        assert all(s.num_dropped_global == ref["num_dropped"] for s in stats)
        assert sum(s.num_dropped for s in stats) == ref["num_dropped"]  # counted once
        assert torch.equal(torch.cat([s.kept_N for s in stats]), _kept_by_one_process(case, ref))
    else:
        assert all(s.kept_N is None and s.num_dropped == 0 for s in stats)


def _kept_by_one_process(case: dict, ref: dict) -> torch.Tensor:
    """The plain rule: each expert keeps its first C assignments in the global order."""
    expert = ref["expert"].tolist()
    capacity = int(np.ceil(case["capacity"] * len(expert) / case["E"]))
    seen = [0] * case["E"]
    kept = []
    for e in expert:
        kept.append(seen[e] < capacity)
        seen[e] += 1
    return torch.tensor(kept)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(two_ranks, name):
    results = [two_ranks["results"][r][name] for r in range(2)]
    case = make_case(name, 2)
    assert_matches_one_process(case, results)
    stats = [r["stats"] for r in results]
    if name == "rank1_receives_nothing":
        assert sum(stats[1].rows_recv_W) == 0 and sum(stats[1].load_P) == 0
        assert stats[1].rows_sent_W[0] > 0
    if name == "rank1_has_no_tokens":
        assert results[1]["y"].shape == (0, D) and sum(stats[1].rows_sent_W) == 0 and sum(stats[1].rows_recv_W) > 0
    if name == "uneven_splits":
        assert stats[0].rows_sent_W[1] != stats[1].rows_sent_W[0]
    if name == "null_experts":
        tokens_used = torch.unique(case["routes"][0][0]).numel()
        assert tokens_used < case["T_r"][0]  # some tokens use no expert ...
        no_expert = torch.ones(case["T_r"][0], dtype=torch.bool)
        no_expert[case["routes"][0][0]] = False
        assert torch.equal(results[0]["y"][no_expert], torch.zeros(int(no_expert.sum()), D, dtype=case["dtype"]))


def test_one_row_per_token_and_rank_as_the_placement_analysis_predicts(two_ranks):
    """Measured rows and remote assignments equal `placement.traffic` on the same routing."""
    for name in ("ragged_topp", "noncontiguous_placement", "uneven_splits"):
        case = make_case(name, 2)
        stats = [two_ranks["results"][r][name]["stats"] for r in range(2)]
        tok = torch.cat([t + case["offsets"][r] for r, (t, _) in enumerate(case["routes"])])
        exp = torch.cat([e for _, e in case["routes"]])
        T = case["offsets"][-1]
        K = int(torch.bincount(tok, minlength=T).max())
        experts_1TK = np.full((1, T, K), -1)
        slot = {}
        for t, e in zip(tok.tolist(), exp.tolist(), strict=True):
            experts_1TK[0, t, slot.get(t, 0)] = e
            slot[t] = slot.get(t, 0) + 1
        home_T = np.repeat(np.arange(2), case["T_r"])
        predicted = traffic(experts_1TK, np.asarray(case["placement"].rank_E), 2, home_T)
        measured_rows = sum(s.rows_sent_W[1 - s.rank] for s in stats)
        assert measured_rows == predicted.dispatch_rows_L.sum() == predicted.combine_rows_L.sum() > 0
        assert sum(s.assignments_sent_W[1 - s.rank] for s in stats) == predicted.remote_assignments_L.sum()
        # rows are per (token, rank): fewer than assignments when a token has several experts on one rank
        assert measured_rows < predicted.remote_assignments_L.sum()
        # bytes: the prediction's rows and metadata, plus one counts message each way
        itemsize = case["dtype"].itemsize
        counts = 2 * stats[0].counts_bytes
        assert sum(s.bytes_sent for s in stats) == round(predicted.bytes_per_token(D, itemsize, itemsize) * T) + counts


def test_exchange_stays_in_every_ranks_graph(two_ranks):
    """Rank 1's x needs no gradient, rank 0's does: backward completes on both with rank 0's gradients right."""
    case = make_case("topk", 2)
    ref = reference(case)
    got = [two_ranks["results"][r]["asymmetric_grad"] for r in range(2)]
    assert got[1]["x_grad"] is None
    torch.testing.assert_close(got[0]["x_grad"], ref["x_grad"][: case["T_r"][0]], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.cat([r["y"] for r in got]), ref["y"], atol=1e-10, rtol=1e-10)


def test_bad_input_on_one_rank_stops_every_rank_with_its_message(two_ranks):
    for key in ("bad_input", "bad_input_capacity"):
        kind1, msg1 = two_ranks["results"][1][key]
        kind0, msg0 = two_ranks["results"][0][key]
        assert kind1 == "ValueError" and "expert ids must lie in 0..3" in msg1 and "99" in msg1
        assert kind0 == "ExchangeError" and "rank 1" in msg0 and "expert ids must lie in 0..3" in msg0
    # the agreed failure leaves the group usable
    assert_matches_one_process(make_case("topk", 2), [two_ranks["results"][r]["after_bad_input"] for r in range(2)])


def test_a_rank_dying_mid_exchange_ends_every_rank_with_an_error(two_ranks):
    assert two_ranks["exitcodes"][1] != 0  # rank 1 died of its bank's error
    assert two_ranks["exitcodes"][0] == 0  # rank 0 ended by itself (caught, recorded, exited), not killed
    crash0 = two_ranks["crash"][0]
    assert crash0 is not None and crash0["crash"] is not None
    assert "ExpertParallel: exchanging" in crash0["crash"] and "rank 0 of 2" in crash0["crash"]


def test_usage_errors_are_named():
    with pytest.raises(UsageError, match="not initialised"):
        ExpertParallel(None, Placement.contiguous(4, 2))
    with pytest.raises(UsageError, match="cannot be sharded over 3 ranks"):
        Placement.contiguous(4, 3)


@pytest.mark.slow
def test_four_ranks_equal_one_process(tmp_path, join_within):
    names = ["topk", "ragged_topp", "null_experts", "rank1_has_no_tokens", "noncontiguous_placement",
             "capacity_noncontiguous"]
    exitcodes = run_ranks(4, names, str(tmp_path), extras=False, join_within=join_within)
    assert exitcodes == [0, 0, 0, 0]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    for name in names:
        assert_matches_one_process(make_case(name, 4), [results[r][name] for r in range(4)])
