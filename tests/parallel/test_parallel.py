"""Expert parallelism applied to a model (moekit.parallel) and the trainer under it equal one process.

One fork of 2 gloo ranks runs every 2-rank job in order (a fork starts at once; a spawn re-imports
torch); the parent computes the single-process references meanwhile. Jobs:
  - one training step of a fp64 model (top-k, top-p, null experts, a rank receiving no tokens):
    loss and every gradient equal one process's on the same global batch;
  - expert choice is refused with one line;
  - `train(..., parallel=ParallelConfig(ep=2))` for 20 steps (top-k, top-p, null experts): the
    losses equal the single-process run's; the top-p run's step-10 checkpoint is resumed with the same
    layout (bit-identical) and, in the parent, with one process (equal within fp32 rounding);
  - last: rank 1 fails mid-training; rank 0 ends with an error naming the cause, no hang.
4-rank layouts (EP 4, EP x DP = 2 x 2) and the torchrun command line are `slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import moekit
from moekit.errors import UsageError
from moekit.models import LMConfig, MoELM
from moekit.parallel import ParallelConfig
from moekit.train import TrainConfig, train
from moekit.train import checkpoint as ckpt
from moekit.train.balance import BalanceTracker

TIMEOUT_S = 240  # the whole fork; a hang fails the test instead of the suite
ROUTERS = {"topk": {"k": 2}, "topp": {"p": 0.5}, "null": {"k": 2, "n_null": 4},
           "expert_choice": {"allow_causal_leak": True}}
FP32 = {"atol": 1e-4, "rtol": 0}  # the tolerance for fp32 losses
FP64 = {"atol": 1e-8, "rtol": 1e-6}  # the balance and z losses compute in fp32 whatever the model dtype


def tiny(kind: str = "topk", experts: int = 4, **kw) -> LMConfig:
    router = moekit.RouterConfig(kind=kind, **{**ROUTERS.get(kind, {}), **kw})
    return LMConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                    moe=moekit.MoEConfig(d_expert=32, num_experts=experts, router=router))


def quick(**kw) -> TrainConfig:
    base = {"steps": 20, "micro_batch": 4, "seq_len": 16, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 10,
            "eval_tokens": 64, "threads": 1}
    return TrainConfig(**{**base, **kw})


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lm_loss"]) for r in rows]


def rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` whose LATEST names checkpoint `step` (as if killed after writing it)."""
    shutil.copytree(src, dst)
    name = f"step-{step:08d}"
    ckpt.write_json(dst / "checkpoints" / ckpt.LATEST,
                    {"checkpoint": name, "meta_sha256": ckpt.sha256_file(dst / "checkpoints" / name / "meta.json")})
    return dst


# ------------------------------------------------------------------------------------------ one step, fp64


def _one_step(kind: str, world: int = 1, rank: int = 0, disabled=None, experts: int = 4) -> dict:
    """Loss and gradients of one training step of a fp64 model on a fixed global batch of 4 sequences;
    with world > 1 this rank's share through `apply_expert_parallel` (gradients gathered to full shape)."""
    from moekit.parallel import apply_expert_parallel, init_parallel

    torch.manual_seed(0)
    model = MoELM(tiny(kind, experts=experts)).double()
    ids = torch.randint(0, 259, (4, 13), generator=torch.Generator().manual_seed(1))
    par = None
    if world > 1:
        par = apply_expert_parallel(model, init_parallel(ParallelConfig(ep=world)))
        ids = ids[par.batch_rows(4)]
    BalanceTracker(model, group=None if par is None else par.data_group)
    model.train()
    ctx = moekit.mask_experts(model, {i: disabled for i in range(2)}) if disabled is not None else _nothing()
    with ctx:
        logits = (model if par is None else par.module)(ids[:, :-1])
        lm = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        aux = model.aux_losses()
        loss = lm + 0.01 * aux["load_balance"] + 1e-3 * aux["z_loss"] + 1e-4 * aux.get("dynamic", 0.0)
        loss.backward()
    out = {"loss": float(loss.detach())}
    if par is None:
        out["norm"] = float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1e9))
        out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out
    out["norm"] = float(par.clip_grad_norm_(1e9))
    layer_of = {id(p): layer for _, p, layer in par.expert_params}
    out["grads"] = {n: (par._gather_expert(p.grad, layer_of[id(p)]) if id(p) in layer_of else p.grad.clone())
                    for n, p in model.named_parameters() if p.grad is not None}
    total = torch.tensor([out["loss"]], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    out["loss"] = float(total) / world
    out["recv"] = [sum(layer.expert_dispatch.ep.last_stats.rows_recv_W) for layer in par.layers]
    out["sent"] = [layer.expert_dispatch.ep.last_stats.rows_sent_W for layer in par.layers]
    return out


def _placement_case(world: int = 1, rank: int = 0) -> dict:
    """ExFlow's affinity placement of a fp64 top-k model's trace, applied by renumbering experts
    (`permute_experts_`) before sharding: logits, and with world > 1 the measured exchange."""
    from moekit.dispatch.placement import Placement, affinity_placement, permute_experts_, traffic
    from moekit.parallel import apply_expert_parallel, init_parallel

    torch.manual_seed(0)
    model = MoELM(tiny("topk", experts=8)).double().eval()
    ids = torch.randint(0, 259, (4, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids)
    layers = model.moe_layers()
    experts_LTK = np.stack([layer.routing_info().executed.to_padded()[0].numpy() for layer in layers])
    rank_LE = affinity_placement(experts_LTK, 8, 2)
    out = {"logits": logits, "predicted": traffic(experts_LTK, rank_LE, 2),
           "current": traffic(experts_LTK, np.arange(8) // 4, 2)}
    if world == 1:
        return out
    for layer, rank_E in zip(layers, rank_LE, strict=True):
        permute_experts_(Placement.from_ranks(rank_E, 2).order_E(), layer.experts, layer.router)
    par = apply_expert_parallel(model, init_parallel(ParallelConfig(ep=world)))
    with torch.no_grad():
        out["logits"] = model(ids[par.batch_rows(4)])
    stats = [layer.expert_dispatch.ep.last_stats for layer in layers]
    out["rows"] = sum(st.rows_sent_W[1 - rank] + st.rows_recv_W[1 - rank] for st in stats)
    out["remote_assignments"] = sum(st.assignments_sent_W[1 - rank] for st in stats)
    out["bytes"] = sum(st.bytes_sent - (world - 1) * st.counts_bytes for st in stats)
    out["weight_bytes"] = stats[0].weight_bytes
    return out


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


STEP_CASES = {  # name -> (router kind, experts disabled in every layer: rank 1 holds experts 2, 3)
    "topk": ("topk", None),
    "topp": ("topp", None),
    "null": ("null", None),
    "rank1_receives_nothing": ("topk", [2, 3]),
}


# ------------------------------------------------------------------------------------------ the ranks


def _fail_on_rank1_at_step(step: int):
    """Make rank 1's third training forward raise (a crash in the middle of a run)."""
    original = MoELM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("rank 1 crashed on purpose")
        return original(self, *args, **kwargs)

    MoELM.forward = forward


def _worker(rank: int, world: int, port: int, outdir: str, jobs: list[tuple]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = Path(outdir)
    quiet = {"progress": False, "log": lambda *_: None}
    for job in jobs:
        what, name = job[0], job[1]
        try:
            if what == "step":
                kind, disabled = STEP_CASES[name]
                result = _one_step(kind, world, rank, disabled)
            elif what == "placement":
                result = _placement_case(world, rank)
            elif what == "refuse":
                try:
                    _one_step(name, world, rank)
                    result = None
                except UsageError as e:
                    result = str(e)
            elif what == "train":  # (train, name, kind, parallel kwargs)
                train(tiny(job[2]), quick(), out / name, parallel=ParallelConfig(**job[3]), **quiet)
                result = "done"
            elif what == "resume":  # (resume, name, source, step, parallel kwargs)
                if rank == 0:
                    rewind(out / job[2], out / name, job[3])
                torch.distributed.barrier()
                train(None, None, out / name, resume=True, parallel=ParallelConfig(**job[4]), **quiet)
                result = "done"
            elif what == "killed":  # rank 0 stalls inside the step-4 checkpoint's write; the test kills both
                if rank == 0:
                    os.environ["MOEKIT_TEST_CHECKPOINT_PAUSE"] = "4:120"
                train(tiny(), quick(steps=4, checkpoint_every=2), out / name, parallel=ParallelConfig(ep=world), **quiet)
                result = "not killed"
            elif what == "crash":  # rank 1 fails at its third forward; rank 0 must end with an error
                if rank == 1:
                    _fail_on_rank1_at_step(3)
                t0 = time.monotonic()
                try:
                    train(tiny(), quick(), out / name, parallel=ParallelConfig(ep=world), **quiet)
                    result = None
                except Exception as e:  # noqa: BLE001 - the test reads the message
                    result = {"type": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0}
                torch.save(result, out / f"{name}.{rank}.pt")
                os._exit(0 if rank == 0 else 1)  # rank 1 never reaches another collective
            torch.save(result, out / f"{name}.{rank}.pt")
        except Exception:  # noqa: BLE001 - written for the test to show, then the rank stops
            (out / f"{name}.{rank}.error").write_text(traceback.format_exc())
            os._exit(3)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(world: int, outdir: Path, jobs: list[tuple]):
    # NOTE: fork, not spawn (see tests/dispatch/test_expert_parallel.py); ranks use one thread.
    return mp.start_processes(_worker, args=(world, _free_port(), str(outdir), jobs), nprocs=world, join=False,
                              start_method="fork")


def join_ranks(ctx, outdir: Path, join_within, timeout: float = TIMEOUT_S) -> list[int | None]:
    alive = join_within(ctx.processes, timeout)
    errors = "\n".join(p.read_text() for p in sorted(outdir.glob("*.error")))
    if alive:
        pytest.fail(f"ranks {alive} were still running after {timeout} s: a collective hangs\n{errors}")
    return [p.exitcode for p in ctx.processes]


def result(outdir: Path, name: str, rank: int):
    path = outdir / f"{name}.{rank}.pt"
    if not path.exists():
        errors = "\n".join(p.read_text() for p in sorted(outdir.glob("*.error")))
        pytest.fail(f"rank {rank} left no result for {name}:\n{errors}")
    return torch.load(path, weights_only=False)


TRAIN_KINDS = ("topk", "topp", "null")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, join_within):
    outdir = tmp_path_factory.mktemp("par2")
    jobs = [("step", name) for name in STEP_CASES]
    jobs.append(("refuse", "expert_choice"))
    jobs.append(("placement", "placement"))
    jobs += [("train", f"ep2_{kind}", kind, {"ep": 2}) for kind in TRAIN_KINDS]
    jobs.append(("resume", "ep2_topp_resumed", "ep2_topp", 10, {"ep": 2}))
    jobs.append(("crash", "crash"))
    ctx = start_ranks(2, outdir, jobs)
    refs = {"steps": {name: _one_step(kind, disabled=disabled) for name, (kind, disabled) in STEP_CASES.items()},
            "placement": _placement_case()}
    for kind in TRAIN_KINDS:
        train(tiny(kind), quick(), outdir / f"one_{kind}", progress=False, log=lambda *_: None)
    exitcodes = join_ranks(ctx, outdir, join_within)
    return {"dir": outdir, "refs": refs, "exitcodes": exitcodes}


# ------------------------------------------------------------------------------------------ checks


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_one_step_fp64_equals_one_process(two_ranks, name):
    ref = two_ranks["refs"]["steps"][name]
    ranks = [result(two_ranks["dir"], name, r) for r in range(2)]
    for got in ranks:
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-8)
        assert got["norm"] == pytest.approx(ref["norm"], rel=1e-9)
        assert set(got["grads"]) == set(ref["grads"])
        for n, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][n], g, **FP64, msg=f"gradient of {n}")
    assert any(sum(s[1 - r] for s in ranks[r]["sent"]) for r in range(2)), "no row crossed ranks"
    if name == "rank1_receives_nothing":
        assert ranks[1]["recv"] == [0, 0] and all(s[1] == 0 for s in ranks[0]["sent"])


def test_expert_choice_is_refused_with_one_line(two_ranks):
    for r in range(2):
        message = result(two_ranks["dir"], "expert_choice", r)
        assert message is not None and "\n" not in message
        assert "expert_choice" in message and "token-choice router" in message


def test_applied_placement_keeps_outputs_and_moves_the_predicted_bytes(two_ranks):
    ref = two_ranks["refs"]["placement"]
    ranks = [result(two_ranks["dir"], "placement", r) for r in range(2)]
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]), ref["logits"], **FP64)
    predicted = ref["predicted"]
    assert sum(r["rows"] for r in ranks) == predicted.rows
    assert sum(r["remote_assignments"] for r in ranks) == int(predicted.remote_assignments_L.sum())
    expected_bytes = predicted.bytes_per_token(32, 8, ranks[0]["weight_bytes"]) * predicted.num_tokens
    assert sum(r["bytes"] for r in ranks) == pytest.approx(expected_bytes, rel=1e-12)
    assert predicted.rows != ref["current"].rows  # the placement changed what crosses ranks


@pytest.mark.parametrize("kind", TRAIN_KINDS)
def test_training_with_ep2_equals_one_process(two_ranks, kind):
    out = two_ranks["dir"]
    one, two = losses(out / f"one_{kind}"), losses(out / f"ep2_{kind}")
    assert [s for s, *_ in one] == [s for s, *_ in two] == list(range(1, 21))
    torch.testing.assert_close(torch.tensor([r[1:] for r in two]), torch.tensor([r[1:] for r in one]), **FP32)
    assert one[-1][2] < one[0][2] - 0.3  # it learnt: the comparison is not between two constant curves
    # rank 0 owns the files: one metrics file, a checkpoint in the single-process format
    assert not list(out.glob(f"ep2_{kind}/*.tmp*"))
    meta = ckpt.read_meta(ckpt.latest_checkpoint(out / f"ep2_{kind}"))
    assert meta["layout"] == {"ep": 2, "dp": 1} and meta["step"] == 20


def test_checkpoint_holds_every_expert_and_loads_in_one_process(two_ranks):
    from moekit.train import load_trained

    out = two_ranks["dir"]
    model, _, _ = load_trained(out / "ep2_topk")
    reference, _, _ = load_trained(out / "one_topk")
    got, want = model.state_dict(), reference.state_dict()
    assert got["layers.0.ffn.experts.gate_up_proj"].shape[0] == 4
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, atol=2e-4, rtol=0, msg=f"weight {n}")


@pytest.mark.slow  # transformers' import and the export's own check: ~10 s
def test_ep2_checkpoint_exports_to_transformers(two_ranks, tmp_path):
    from moekit.hf.export import export_hf
    from moekit.train import load_trained

    model, _, _ = load_trained(two_ranks["dir"] / "ep2_topk")
    export_hf(model, tmp_path / "hf")  # verifies the exported model's logits against moekit's
    assert (tmp_path / "hf" / "config.json").is_file()


def test_resume_with_the_same_layout_is_bit_identical(two_ranks):
    out = two_ranks["dir"]
    assert losses(out / "ep2_topp_resumed") == losses(out / "ep2_topp")


def test_ep2_checkpoint_resumes_in_one_process(two_ranks, tmp_path):
    out = two_ranks["dir"]
    run = rewind(out / "ep2_topp", tmp_path / "one", 10)
    train(None, None, run, resume=True, progress=False, log=lambda *_: None)
    got, want = losses(run), losses(out / "one_topp")
    torch.testing.assert_close(torch.tensor([r[1:] for r in got]), torch.tensor([r[1:] for r in want]), **FP32)


def test_one_rank_failing_ends_every_rank_with_an_error(two_ranks):
    out = two_ranks["dir"]
    assert two_ranks["exitcodes"][1] == 1
    crash = result(out, "crash", 0)
    assert crash is not None, "rank 0 finished a run whose other rank died"
    assert crash["type"] == "ExchangeError" and "another rank probably failed first" in crash["message"]
    assert "\n" not in crash["message"]
    assert result(out, "crash", 1)["message"] == "rank 1 crashed on purpose"


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path, join_within):
    ctx = start_ranks(2, tmp_path, [("killed", "killed")])
    run = tmp_path / "killed"
    try:
        train(tiny(), quick(steps=4, checkpoint_every=2), tmp_path / "one", progress=False, log=lambda *_: None)
        deadline = time.monotonic() + TIMEOUT_S
        while not list((run / "checkpoints").glob(".step-00000004.tmp-*")):
            assert all(p.is_alive() for p in ctx.processes), "a rank ended before the second checkpoint"
            assert time.monotonic() < deadline, "the ranks never reached the second checkpoint"
            time.sleep(0.1)
        time.sleep(0.3)  # inside the write: weights and optimiser state are on disk, meta.json is not
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        join_ranks(ctx, tmp_path, join_within, timeout=30)
    assert ckpt.latest_checkpoint(run).name == "step-00000002"
    ckpt.read_meta(ckpt.latest_checkpoint(run))  # the previous checkpoint is intact
    train(None, None, run, resume=True, progress=False, log=lambda *_: None)  # and resumes, here in one process
    got, want = losses(run), losses(tmp_path / "one")
    torch.testing.assert_close(torch.tensor([r[1:] for r in got]), torch.tensor([r[1:] for r in want]), **FP32)


# ------------------------------------------------------------------------------------------ slow: 4 ranks, torchrun


@pytest.mark.slow
def test_four_rank_layouts_equal_one_process(tmp_path, join_within):
    jobs = [("train", "ep4", "topp", {"ep": 4}), ("train", "ep2dp2", "topp", {"ep": 2, "dp": 2}),
            ("resume", "ep4_from_ep2", "ep2dp2", 10, {"ep": 4})]
    ctx = start_ranks(4, tmp_path, jobs)
    train(tiny("topp"), quick(), tmp_path / "one", progress=False, log=lambda *_: None)
    join_ranks(ctx, tmp_path, join_within, timeout=900)
    want = torch.tensor([r[1:] for r in losses(tmp_path / "one")])
    for name in ("ep4", "ep2dp2", "ep4_from_ep2"):
        torch.testing.assert_close(torch.tensor([r[1:] for r in losses(tmp_path / name)]), want, **FP32,
                                   msg=f"run {name}")


@pytest.mark.slow
def test_torchrun_command_line_matches_one_process(tmp_path):
    """The issue's acceptance command: torchrun --nproc-per-node 2 -m moekit train --preset tiny ..."""
    env = {**os.environ, "PYTHONPATH": str(Path(moekit.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    common = ["train", "--preset", "tiny", "--train.steps", "20", "--no-progress"]
    two = subprocess_run([str(torchrun), "--nproc-per-node", "2", "-m", "moekit", *common, "--parallel.ep", "2",
                          "--out", str(tmp_path / "ep2")], env)
    assert "expert parallel 2 x data parallel 1" in two.stderr + two.stdout
    subprocess_run([sys.executable, "-m", "moekit", *common, "--out", str(tmp_path / "one")], env)
    got, want = losses(tmp_path / "ep2"), losses(tmp_path / "one")
    assert len(got) == len(want) == 20
    torch.testing.assert_close(torch.tensor([r[1:] for r in got]), torch.tensor([r[1:] for r in want]), **FP32)


def subprocess_run(argv: list[str], env: dict):
    import subprocess

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_layout_that_does_not_fit_the_processes_is_refused_with_one_line(tmp_path, capsys):
    from moekit.cli import main

    code = main(["train", "--preset", "tiny", "--train.steps", "2", "--parallel.ep", "2", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--parallel.ep 2 x --parallel.dp 1 = 2 ranks, but 1 process(es) run" in err
    assert not (tmp_path / "r").exists()  # refused before anything was written
    with pytest.raises(UsageError, match=r"ParallelConfig.backend='mpi' is invalid"):
        ParallelConfig(backend="mpi").validate()


def test_layer_options_expert_parallelism_is_not_tested_with_are_named():
    from moekit.config import MoEConfig
    from moekit.parallel.apply import untested_options

    assert untested_options(MoEConfig()) == []
    named = untested_options(MoEConfig(iterations=2, zero_experts=1, latent_dim=16))
    assert named == ["iterations > 1 (Chain-of-Experts)", "zero-computation experts", "latent_dim"]
