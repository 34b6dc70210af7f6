"""kill -9 at random moments while an expert store is written (issue 12 item 3): the store directory
is always either the previous complete store or the new one, never half of one, and the temporary
directory a killed writer leaves is removed by the next write."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from moekit.offload import ExpertStore

from .io_support import SRC

# A child that builds a model with about 200 MB of experts (a write takes a second or so here), says
# "ready" and writes the store; the parent kills it at a random moment of the write.
CHILD = """
import sys, torch
from moekit.config import MoEConfig, RouterConfig
from moekit.models.lm import LMConfig, MoELM
from moekit.offload import write_store
torch.manual_seed(int(sys.argv[2]))
cfg = LMConfig(vocab_size=256, d_model=256, n_layers=2, n_heads=4, max_seq_len=64,
               moe=MoEConfig(d_model=256, d_expert=512, num_experts=64, router=RouterConfig(kind="topk", k=2)))
model = MoELM(cfg).eval()
print("ready", flush=True)
write_store(model, sys.argv[1], source={"seed": int(sys.argv[2])})
print("done", flush=True)
"""


def write_in_child(out, seed: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(seed)], env=env, text=True,
                            stdout=subprocess.PIPE)


@pytest.mark.slow
def test_kill_9_during_store_writes(tmp_path):
    rng = random.Random(0)
    out = tmp_path / "store"
    p = write_in_child(out, 0)  # one whole write: a complete store to start from, and its duration
    assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    assert p.stdout.readline().strip() == "done"
    write_s = time.perf_counter() - t0
    p.wait(timeout=60)
    complete = {0: True}  # seed -> whether a write of that seed finished
    for attempt in range(1, 7):
        p = write_in_child(out, attempt)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.95) * write_s)  # somewhere inside the write
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        finished = p.stdout.read().strip() == "done"
        complete[attempt] = finished
        # The previous store or the new one, whole: every file and every expert checks out. A kill
        # between replace_dir's two renames leaves the previous one aside (the next write restores it).
        found = out if out.exists() else next(tmp_path.glob(".store.old-*"))
        with ExpertStore(found, verify="always") as st:
            st.verify_all()
            assert st.manifest["source"]["seed"] in complete
    assert not all(complete.values()), "no kill landed inside a write; the test proved nothing"
    # A write that is allowed to finish removes what the killed ones left.
    p = write_in_child(out, 99)
    p.wait(timeout=300)
    assert p.returncode == 0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["store"], "debris of killed writes is left"
    with ExpertStore(out) as st:
        assert st.manifest["source"]["seed"] == 99
