"""Trainer: schedule, data order, learning, checkpoints, bit-identical resume, SIGKILL safety."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import moekit
from moekit.errors import UsageError
from moekit.models import LMConfig
from moekit.train import TrainConfig, evaluate, load_trained, train
from moekit.train import checkpoint as ckpt
from moekit.train.trainer import batch_at, lr_at


def tiny(kind="topk", **router_kw):
    router = moekit.RouterConfig(kind=kind, **router_kw)
    return LMConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                    moe=moekit.MoEConfig(d_expert=32, num_experts=4, router=router))


def quick(**kw):
    base = {"steps": 8, "micro_batch": 4, "seq_len": 32, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 4,
            "eval_tokens": 128, "threads": 1}
    return TrainConfig(**{**base, **kw})


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lm_loss"], r["grad_norm"]) for r in rows]


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # cosine midpoint: halfway between 1 and 0.1
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_batches_are_a_function_of_seed_step_and_micro_batch():
    tokens = np.arange(1000, dtype=np.int32)
    cfg = quick()
    a = batch_at(tokens, 3, 1, cfg)
    assert a.shape == (4, 33) and torch.equal(a, batch_at(tokens, 3, 1, cfg))
    assert not torch.equal(a, batch_at(tokens, 3, 0, cfg))
    assert torch.equal(a[:, 1:], a[:, :-1] + 1)  # contiguous windows


@pytest.mark.parametrize("kind,kw", [("topk", {}), ("topp", {"p": 0.5}), ("recurrent", {"gru_dim": 16})])
def test_training_lowers_the_loss_and_writes_a_run(tmp_path, kind, kw):
    result = train(tiny(kind, **kw), quick(steps=12, lr=1e-2), tmp_path / "run", progress=False, log=lambda *_: None)
    rows = losses(tmp_path / "run")
    assert len(rows) == 12 and rows[-1][2] < rows[0][2] - 0.5
    assert result["bpb"] < 8 and set(result["per_domain"]) == set(moekit.data.DOMAINS)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["moe"]["router"]["kind"] == kind
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "run"))
    assert meta["step"] == 12 and meta["data_position"] == {"step": 12} and "torch" in meta["rng"]
    model, cfg, tok = load_trained(tmp_path / "run")
    again = evaluate(model, tok, cfg.seq_len, cfg.eval_tokens)
    assert again["loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_gradient_accumulation_with_global_balance(tmp_path):
    cfg = tiny()
    cfg.moe.balance_scope = "global"
    train(cfg, quick(steps=3, grad_accum=2), tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(losses(tmp_path / "run")) == 3


def test_refuses_to_overwrite_a_run(tmp_path):
    train(tiny(), quick(steps=4), tmp_path / "run", progress=False, log=lambda *_: None)
    with pytest.raises(UsageError, match="already holds a run; resume it"):
        train(tiny(), quick(steps=4), tmp_path / "run", progress=False, log=lambda *_: None)


def test_damaged_checkpoint_is_named(tmp_path):
    train(tiny(), quick(steps=4), tmp_path / "run", progress=False, log=lambda *_: None)
    path = ckpt.latest_checkpoint(tmp_path / "run") / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors is damaged"):
        load_trained(tmp_path / "run")


_CHILD = """
import sys, moekit
from moekit.models import LMConfig
from moekit.train import TrainConfig, train
sys.path.insert(0, {tests!r})
from test_trainer import quick, tiny
train(tiny("recurrent", gru_dim=16, jitter=0.1), quick(), {run!r}, progress=False)
"""


def test_sigkill_mid_checkpoint_then_resume_is_bit_identical(tmp_path):
    # Uninterrupted reference run (jitter draws from the torch RNG, so RNG state must be restored).
    train(tiny("recurrent", gru_dim=16, jitter=0.1), quick(), tmp_path / "ref", progress=False, log=lambda *_: None)
    run = tmp_path / "killed"
    env = {**os.environ, "MOEKIT_TEST_CHECKPOINT_PAUSE": "8:60"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=os.path.dirname(__file__), run=str(run))],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list((run / "checkpoints").glob(".step-00000008.tmp-*")):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.time() < deadline, "the child never reached the second checkpoint"
            time.sleep(0.1)
        time.sleep(0.3)  # inside the write: weights and optimiser state are on disk, meta.json is not
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert ckpt.latest_checkpoint(run).name == "step-00000004"
    ckpt.read_meta(ckpt.latest_checkpoint(run))  # the previous checkpoint is intact
    train(None, quick(), run, resume=True, progress=False, log=lambda *_: None)
    assert losses(run) == losses(tmp_path / "ref")


def test_compare_refuses_unequal_training(tmp_path):
    from moekit.train.compare import compare

    with pytest.raises(ValueError, match=r"trains differently \(\['steps'\]\)"):
        compare({"a": (tiny(), quick()), "b": (tiny("topp"), quick(steps=9))}, tmp_path, log=lambda *_: None)


def test_measured_active_params_follow_the_measured_experts_per_token():
    from moekit.train.evaluate import measured_active_params

    cfg = tiny().validate()
    assert measured_active_params(cfg, [2.0, 2.0]) == cfg.num_active_params()  # top-2 measured = expected
    one_fewer = measured_active_params(cfg, [1.0, 2.0])
    assert cfg.num_active_params() - one_fewer == 3 * 32 * 32  # one expert (3 matrices D x F) fewer in layer 0


def test_evaluation_counts_executed_experts():
    """Experts per token (and so measured active parameters) count the assignments that ran, after
    capacity dropping, not the router's choice (issue 11, item 15's kind of fault)."""
    from moekit.data import ByteTokenizer
    from moekit.models import MoELM

    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=ByteTokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                   moe=moekit.MoEConfig(d_expert=32, num_experts=4, capacity_factor=0.5, eval_capacity_factor=0.5,
                                        router=moekit.RouterConfig(kind="topk", k=2)))
    model = MoELM(cfg.validate())
    seen = np.zeros((2, 3))  # per layer: executed, chosen, tokens

    def hook(j):
        def fn(module, args, output):
            info = module.routing_info()
            seen[j] += (info.executed.num_assignments, info.route.num_assignments, info.num_tokens)
        return fn

    handles = [layer.register_forward_hook(hook(j)) for j, layer in enumerate(model.moe_layers())]
    result = evaluate(model, ByteTokenizer(), 32, 256, domains=["english"])
    for h in handles:
        h.remove()
    np.testing.assert_allclose(result["experts_per_token_by_layer"], seen[:, 0] / seen[:, 2], atol=1e-4)
    assert (seen[:, 0] < seen[:, 1]).any()  # eval_capacity_factor dropped tokens
    assert not np.allclose(result["experts_per_token_by_layer"], seen[:, 1] / seen[:, 2], atol=1e-4)


@pytest.mark.parametrize("bad", [259, -1])
def test_evaluation_refuses_a_target_id_beyond_the_vocabulary(monkeypatch, bad):
    # A window's last id is a target only, which the model's own check never sees: before the check,
    # cross_entropy's raw "Target 259 is out of bounds" (or the byte table's IndexError).
    from moekit.data import ByteTokenizer
    from moekit.models import MoELM

    model = MoELM(LMConfig(vocab_size=ByteTokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=8,
                           moe=moekit.MoEConfig(d_expert=8, num_experts=4)).validate())
    module = sys.modules["moekit.train.evaluate"]  # the package exports the function under the module's name
    monkeypatch.setattr(module, "domain_windows", lambda *a: torch.tensor([[97, 98, 99, bad]]))
    with pytest.raises(UsageError, match=rf"^evaluate: the targets: token id\(s\) {bad} out of range; expected "
                                         r"token ids in \[0, 259\)"):
        evaluate(model, ByteTokenizer(), 3, 16, domains=["english"])
