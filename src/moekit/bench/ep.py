"""Expert parallelism on CPU with gloo: step time and all-to-all traffic per EP size (1, 2, 4).

Each EP size runs in its own group of forked gloo ranks (EP = world, DP = 1) training the `tiny`
preset's model (d_model 128, 4 layers, 8 experts of width 256, top-p 0.4) on the same global batch
(--micro-batch sequences of --seq-len tokens, split over the ranks) with moekit.parallel, one torch
thread per rank. Per step (median over --steps after --warmup):
  step_ms            forward + backward + expert-gradient sync + clip + AdamW, the slowest rank
  a2a_ms             time inside the expert exchange's all_to_all_single calls (forward and backward,
                     counts included), the slowest rank
  a2a_bytes          bytes every rank sent to other ranks, forward and backward (ExchangeStats:
                     rows, per-assignment row index + weight, counts messages; backward moves the
                     same rows and weights the other way)
  lower_bound_bytes  rows only: each token's row once to each other rank holding one of its experts
                     and one partial sum back (tokens whose experts are all local move nothing), in
                     forward and backward: the floor of any exchange of whole rows
  ratio_to_lower_bound   a2a_bytes / lower_bound_bytes (the metadata and counts overhead)
  naive_ratio        what one row per (token, remote expert) would send (a dispatcher that does not
                     merge a token's experts on one rank), over the lower bound
JSON lines: a machine line, one line per EP size.

What CPU gloo can and cannot say about GPUs: the bytes, the rows and their ratio to the lower bound
are properties of the routing and the dispatcher, the same on any transport. The times are not:
gloo moves tensors through host memory and TCP loopback on the CPU cores that also run the experts
(and, with more ranks than cores, the ranks share cores), so a2a_ms and step_ms here say nothing
about NVLink or InfiniBand bandwidth, NCCL kernels, or overlap of communication with GPU compute.

Usage: python benchmarks/ep.py [--sizes 1,2,4] [--out docs/results/ep-cpu.jsonl]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moekit.bench.timing import write_json_lines
from moekit.dispatch import expert_parallel as ep_module  # noqa: E402
from moekit.models import MoELM  # noqa: E402
from moekit.parallel import ParallelConfig, apply_expert_parallel, init_parallel  # noqa: E402
from moekit.train.balance import BalanceTracker  # noqa: E402
from moekit.train.presets import preset  # noqa: E402
from moekit.train.trainer import batch_at, train_stream  # noqa: E402


def _worker(rank: int, world: int, port: int, args, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model_cfg, train_cfg = preset("tiny")
    train_cfg.micro_batch, train_cfg.seq_len = args.micro_batch, args.seq_len
    torch.manual_seed(0)
    model = MoELM(model_cfg)
    mesh = init_parallel(ParallelConfig(ep=world)) if world > 1 else None
    par = apply_expert_parallel(model, mesh) if mesh is not None else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    BalanceTracker(model, group=None if par is None else par.data_group).attach(optimizer)
    tokens = train_stream("byte")
    clock = {"a2a": 0.0}
    original = ep_module._all_to_all

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            clock["a2a"] += time.perf_counter() - t0

    ep_module._all_to_all = timed
    rows = []
    model.train()
    for step in range(args.warmup + args.steps):
        ids = batch_at(tokens, step, 0, train_cfg)
        if par is not None:
            ids = ids[par.batch_rows(args.micro_batch)]
        clock["a2a"] = 0.0
        t0 = time.perf_counter()
        logits = (model if par is None else par.module)(ids[:, :-1])
        aux = model.aux_losses()
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + 0.01 * aux["load_balance"]
        loss.backward()
        if par is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            par.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0
        sent = lower = naive = 0
        if par is not None:
            for layer in par.layers:
                st = layer.expert_dispatch.ep.last_stats
                remote_rows = st._remote(st.rows_sent_W) + st._remote(st.rows_recv_W)
                meta = st._remote(st.assignments_sent_W) * (8 + st.weight_bytes)
                counts = (world - 1) * st.counts_bytes
                sent += 2 * (remote_rows * st.row_bytes + meta) + counts  # backward: rows and weights again
                lower += 2 * remote_rows * st.row_bytes
                naive += 2 * 2 * st._remote(st.assignments_sent_W) * st.row_bytes
        rows.append([step_s, clock["a2a"], sent, lower, naive])
    t = torch.tensor(rows, dtype=torch.float64)
    if par is not None:  # times: the slowest rank; bytes: summed over ranks
        times, volumes = t[:, :2].contiguous(), t[:, 2:].contiguous()
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        dist.all_reduce(volumes)
        t = torch.cat([times, volumes], dim=1)
    if rank == 0:
        torch.save(t[args.warmup:], os.path.join(outdir, f"ep{world}.pt"))
    if par is not None:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,2,4", help="EP sizes to run (default 1,2,4)")
    parser.add_argument("--micro-batch", type=int, default=8, help="global batch in sequences (default 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    lines = [{"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "backend": "gloo",
              "load_before": os.getloadavg()[0], "preset": "tiny", "micro_batch": args.micro_batch,
              "seq_len": args.seq_len, "threads_per_rank": 1}]
    with tempfile.TemporaryDirectory() as outdir:
        for world in [int(w) for w in args.sizes.split(",")]:
            ctx = mp.start_processes(_worker, args=(world, _free_port(), args, outdir), nprocs=world,
                                     start_method="fork", join=True)
            del ctx
            t = torch.load(os.path.join(outdir, f"ep{world}.pt"))
            med = [statistics.median(t[:, i].tolist()) for i in range(t.shape[1])]
            step_s, a2a_s, sent, lower, naive = med
            lines.append({"ep": world, "ranks": world, "step_ms": round(1e3 * step_s, 1),
                          "a2a_ms": round(1e3 * a2a_s, 1), "a2a_bytes": int(sent), "lower_bound_bytes": int(lower),
                          "ratio_to_lower_bound": round(sent / lower, 4) if lower else None,
                          "naive_ratio": round(naive / lower, 4) if lower else None,
                          "tokens_per_step": args.micro_batch * args.seq_len})
    lines[0]["load_after"] = os.getloadavg()[0]
    write_json_lines(lines, args.out)
    return 0
