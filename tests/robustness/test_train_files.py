"""Robustness of a run's files: ownership, one writer, verified reads, old runs, debris, full disks, kills.

Every case here went wrong before: a user's directory overwritten, two trainers on one run, a bit
flip in meta.json or config.json read silently, a half-written metrics line blocking --resume,
temporary checkpoint directories left behind, a full disk leaving partial files.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.errors import DataError, NotOwnedError
from moekit.train import checkpoint as ckpt
from moekit.train import evaluate, load_trained, train
from moekit.train.rundir import LOCK, DirectoryLockedError
from moekit.train.trainer import train_stream
from moekit.utils.io import MARKER, marker_kind

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from test_trainer import losses, quick, tiny  # noqa: E402  (the canonical tiny run)

QUIET = {"progress": False, "log": lambda *_: None}
TINY = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--moe.d_expert", "32",
        "--moe.num_experts", "4", "--train.steps", "4", "--train.micro_batch", "4", "--train.seq_len", "32",
        "--train.eval_tokens", "128", "--train.threads", "1", "--train.checkpoint_every", "2", "--no-progress"]


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """A finished 8-step run (checkpoints at 4 and 8), copied by tests that damage it."""
    path = tmp_path_factory.mktemp("run8") / "run"
    train(tiny(), quick(), path, **QUIET)
    return path


def copy_run(run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- 1. never destroy the user's files


def test_train_refuses_a_directory_moekit_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    (out / "metrics.jsonl").write_text('{"my": 1}\n')
    for resume in ([], ["--resume"]):
        with pytest.raises(NotOwnedError, match=r"holds files moekit did not write; refusing") as e:
            main(["train", "--out", str(out), *TINY, *resume])
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl"]  # untouched, no lock left
    assert (out / "config.json").read_text() == '{"my": "settings"}'
    assert (out / "metrics.jsonl").read_text() == '{"my": 1}\n'


def test_compare_refuses_a_directory_moekit_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NotOwnedError, match="holds files moekit did not write"):
        main(["compare", "--presets", "topk,topp", "--out", str(tmp_path), *TINY])
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_run_and_compare_directories_carry_markers(tmp_path):
    main(["compare", "--presets", "topk", "--out", str(tmp_path / "cmp"), *TINY, "--train.steps", "2"])
    assert marker_kind(tmp_path / "cmp") == "compare" and marker_kind(tmp_path / "cmp" / "topk") == "run"
    with pytest.raises(NotOwnedError, match="holds a moekit compare"):  # a run never goes into a compare dir
        train(tiny(), quick(steps=2), tmp_path / "cmp", **QUIET)


_HOLDER = """
import sys, time
from moekit.train.rundir import locked_dir
with locked_dir(sys.argv[1], "run", "moekit train"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryLockedError, match=rf"{re.escape(str(run))} is in use by process {holder.pid} \(") as e:
            train(tiny(), quick(steps=2), run, **QUIET)
        assert "\n" not in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train(tiny(), quick(steps=2), run, **QUIET)  # the kernel released the lock with the process
    assert len(losses(run)) == 2 and (run / LOCK).is_file()


# ----------------------------------------------------------------------------- 2. every file read back is verified


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_a_bit_flip_in_meta_json_is_refused_not_read(run8, tmp_path):
    run = copy_run(run8, tmp_path)
    meta = ckpt.latest_checkpoint(run) / "meta.json"
    text = meta.read_text()
    flip_bit(meta, text.index('"step": 8') + len('"step": '))  # "8" -> "9": would silently skip a step
    with pytest.raises(DataError, match=r"meta.json is damaged"):
        train(None, None, run, resume=True, **QUIET)
    with pytest.raises(DataError, match=r"meta.json is damaged"):
        load_trained(run)


@pytest.mark.parametrize("name", ["meta.json", "LATEST"])
def test_every_single_bit_flip_is_caught(run8, tmp_path, name):
    run = copy_run(run8, tmp_path)
    path = ckpt.latest_checkpoint(run) / "meta.json" if name == "meta.json" else run / "checkpoints" / "LATEST"
    original = path.read_bytes()
    rng = random.Random(0)
    for offset in rng.sample(range(len(original)), min(40, len(original))):
        flip_bit(path, offset, rng.randrange(8))
        with pytest.raises(DataError):
            load_trained(run)
        path.write_bytes(original)
    load_trained(run)


def test_eval_uses_the_checkpoints_own_verified_config(run8, tmp_path):
    run = copy_run(run8, tmp_path)
    model, cfg, tok = load_trained(run)
    before = evaluate(model, tok, cfg.seq_len, 128)["loss"]
    config = json.loads((run / "config.json").read_text())
    config["model"]["moe"]["router"]["kind"] = "topp"  # the run-level copy now names another router
    (run / "config.json").write_text(json.dumps(config))
    model, cfg, tok = load_trained(run)
    assert model.cfg.moe.router.kind == "topk"
    assert evaluate(model, tok, cfg.seq_len, 128)["loss"] == before
    cfg_path = ckpt.latest_checkpoint(run) / "config.json"
    flip_bit(cfg_path, cfg_path.read_text().index('"topk"') + 3)
    with pytest.raises(DataError, match=r"config.json is damaged: its sha256 does not match meta.json"):
        load_trained(run)


def test_run_config_before_the_first_checkpoint_is_verified(tmp_path):
    run = tmp_path / "run"
    train(tiny(), quick(steps=2, checkpoint_every=100), run, **QUIET)
    shutil.rmtree(run / "checkpoints")  # as if killed before the first checkpoint
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text.replace('"lr": 0.003', '"lr": 0.004'))
    with pytest.raises(DataError, match=r"config.json is damaged: its content does not match its checksum"):
        train(None, None, run, resume=True, **QUIET)
    (run / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=r"config.json is damaged or truncated: not valid JSON") as e:
        main(["train", "--out", str(run), "--resume", "--no-progress"])
    assert "\n" not in str(e.value)
    (run / "config.json").write_text(text)
    train(None, None, run, resume=True, **QUIET)  # no checkpoint yet: starts again from step 0
    assert len(losses(run)) == 2


@pytest.mark.parametrize("content,match", [
    (b"", r"LATEST is empty; expected the name of a checkpoint"),
    (b"\n", r"LATEST is empty"),
    (b"hello\n", r"LATEST is damaged: it names 'hello'; expected the name of a checkpoint"),
    (b"\xff\xfe", r"LATEST is damaged: it is not text"),
    (b'{"checkpoint": "step-000', r"LATEST is damaged or truncated: not valid JSON"),
    (b"step-00000009\n", r"LATEST names step-00000009, which does not exist"),
])
def test_empty_garbage_or_truncated_latest_is_one_line(run8, tmp_path, content, match):
    run = copy_run(run8, tmp_path)
    (run / "checkpoints" / "LATEST").write_bytes(content)
    for call in (lambda: main(["eval", str(run)]), lambda: main(["train", "--out", str(run), "--resume"])):
        with pytest.raises(DataError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_truncated_meta_json_names_the_file(run8, tmp_path):
    run = copy_run(run8, tmp_path)
    latest = ckpt.latest_checkpoint(run)
    # bypass LATEST's record of meta.json to reach the JSON parser itself
    meta = latest / "meta.json"
    meta.write_bytes(meta.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"{re.escape(str(meta))} is damaged or truncated: not valid JSON"):
        ckpt.read_meta(latest)


def make_legacy(run: Path) -> None:
    """Rewrite a run as the moekit before checksums and markers wrote it."""
    for path in [run / "config.json", *run.glob("checkpoints/step-*/meta.json")]:
        obj = json.loads(path.read_text())
        obj.pop("checksum")
        path.write_text(json.dumps(obj, indent=2))
    latest = json.loads((run / "checkpoints" / "LATEST").read_text())["checkpoint"]
    (run / "checkpoints" / "LATEST").write_text(latest + "\n")
    (run / MARKER).unlink()
    (run / LOCK).unlink()


def test_runs_written_before_checksums_still_evaluate_and_resume(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    train(tiny(), quick(), ref, **QUIET)
    run = tmp_path / "old"
    train(tiny(), quick(steps=8, checkpoint_every=4), run, **QUIET)
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    ckpt.write_json(run / "checkpoints" / "LATEST", {"checkpoint": "step-00000004"})  # as if stopped at step 4
    make_legacy(run)
    monkeypatch.setattr(ckpt, "_warned_unverified", False)
    with pytest.warns(UserWarning, match="carries no checksum") as warned:
        model, cfg, tok = load_trained(run)
        main(["eval", str(run), "--tokens", "64"])
    assert len([w for w in warned if "checksum" in str(w.message)]) == 1  # one warning, not one per file
    train(None, None, run, resume=True, **QUIET)  # resumes the old run ...
    assert losses(run) == losses(ref)  # ... to the same loss curve
    assert marker_kind(run) == "run"  # and adopts it: marker and checksums from now on
    assert "checksum" in json.loads((run / "config.json").read_text())


# ----------------------------------------------------------------------------- 3. no debris, always resumable


def test_debris_of_killed_writers_is_removed_at_the_next_start(run8, tmp_path):
    run = copy_run(run8, tmp_path)
    pid = dead_pid()
    debris = [run / "checkpoints" / f".step-00000012.tmp-{pid}", run / f".config.json.tmp-{pid}",
              run / "checkpoints" / f".LATEST.tmp-{pid}"]
    debris[0].mkdir()
    (debris[0] / "model.safetensors").write_bytes(b"\0" * 1000)
    debris[1].write_text("{")
    debris[2].write_text("step")
    train(None, None, run, resume=True, **QUIET)
    assert not any(p.exists() for p in debris)


def test_a_half_written_last_metrics_line_is_cut_back(run8, tmp_path):
    run = copy_run(run8, tmp_path)
    before = losses(run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 9, "loss": 2.')  # killed (or out of space) in the middle of a line
    train(None, None, run, resume=True, **QUIET)
    assert losses(run) == before
    assert (run / "metrics.jsonl").read_bytes().endswith(b"}\n")


def test_a_damaged_metrics_line_before_the_last_is_named(run8, tmp_path):
    run = copy_run(run8, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:20] + "\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(DataError, match=r"metrics.jsonl line 3 is damaged"):
        train(None, None, run, resume=True, **QUIET)


_CHILD = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_trainer import quick, tiny
from moekit.train import train
from moekit.train.checkpoint import WriteError
if {limit}:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
    train(tiny(), quick(**{kw!r}), {run!r}, resume=Path({run!r}, "config.json").is_file(), progress=False,
          log=lambda *_: None)
except WriteError as e:
    print(e)
    sys.exit(3)
"""


def run_child(run: Path, limit: int = 0, **kw) -> subprocess.CompletedProcess:
    code = _CHILD.format(tests=str(Path(__file__).parents[1] / "train"), limit=limit, kw=kw, run=str(run))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def assert_clean_and_resumable(run: Path, ref: Path, tmp_path: Path, **kw) -> None:
    """No temporary file anywhere, every metrics line whole, the last checkpoint verified; a copy on
    a healthy disk resumes to the reference's loss curve."""
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    text = (run / "metrics.jsonl").read_text()
    assert text == "" or text.endswith("\n")
    for line in text.splitlines():
        json.loads(line)
    if ckpt.has_checkpoint(run):
        ckpt.read_meta(ckpt.latest_checkpoint(run))
    healthy = tmp_path / "healthy"
    shutil.copytree(run, healthy)
    train(None, None, healthy, resume=True, **QUIET)
    assert losses(healthy) == losses(ref)


@pytest.mark.slow
@pytest.mark.parametrize("limit,kw,failing", [
    (200_000, {}, "cannot write checkpoint step-00000004"),  # optimizer.safetensors is ~330 kB
    (4096, {"steps": 20, "checkpoint_every": 100}, "cannot append to"),  # metrics.jsonl outgrows 4 kB
])
def test_file_size_limit_fails_with_one_line_and_no_partial_file(tmp_path, limit, kw, failing):
    ref = tmp_path / "ref"
    train(tiny(), quick(**kw), ref, **QUIET)
    run = tmp_path / "run"
    child = run_child(run, limit, **kw)
    assert child.returncode == 3, child.stderr[-3000:]
    assert failing in child.stdout and "File too large" in child.stdout and len(child.stdout.splitlines()) == 1
    assert_clean_and_resumable(run, ref, tmp_path, **kw)


@pytest.mark.slow
def test_full_disk_fails_with_one_line_and_no_partial_file(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the RLIMIT_FSIZE test covers the same path")
    ref = tmp_path / "ref"
    train(tiny(), quick(), ref, **QUIET)
    size = sum(p.stat().st_size for p in (ref / "checkpoints" / "step-00000008").iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        child = run_child(disk / "run")  # the second checkpoint does not fit next to the first
        assert child.returncode == 3, child.stderr[-3000:]
        assert "No space left on device" in child.stdout and len(child.stdout.splitlines()) == 1
        assert_clean_and_resumable(disk / "run", ref, tmp_path)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_kill_at_random_moments_then_resume_is_bit_identical_and_leaves_no_debris(tmp_path):
    kw = {"steps": 30, "checkpoint_every": 3}
    ref = tmp_path / "ref"
    train_stream("byte")  # time the training itself, not the corpus encoding
    t0 = time.perf_counter()
    train(tiny("recurrent", gru_dim=16, jitter=0.1), quick(**kw), ref, **QUIET)
    t_train = time.perf_counter() - t0  # steps, checkpoint writes, the final evaluation
    run = tmp_path / "run"
    code = _CHILD.format(tests=str(Path(__file__).parents[1] / "train"), limit=0, kw=kw, run=str(run)).replace(
        "tiny()", "tiny('recurrent', gru_dim=16, jitter=0.1)")
    rng = random.Random(0)
    kills = 0
    for _ in range(20):
        started = time.time_ns()
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # once this child has started training (it rewrites config.json just before), kill it at a random
        # moment of the next third of a run: during steps, checkpoint writes or the final evaluation
        while child.poll() is None and _mtime_ns(run / "config.json") < started:
            time.sleep(0.01)
        try:
            child.wait(timeout=rng.uniform(0.0, t_train / 3))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
            kills += 1
            continue
        assert child.returncode == 0, child.stderr.read().decode()[-3000:]
        break
    assert kills >= 3
    train(None, None, run, resume=True, **QUIET)
    assert losses(run) == losses(ref)
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def test_rotation_keeps_the_newest_checkpoints_of_this_attempt_not_a_stale_later_one(tmp_path):
    import torch

    from moekit.models import MoELM

    model = MoELM(tiny().validate())
    opt = torch.optim.AdamW(model.parameters())
    meta = {"rng": ckpt.rng_state()}
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, meta)
    # step 8 was written by an attempt whose LATEST update failed; this attempt resumed from step 4
    shutil.copytree(tmp_path / "checkpoints" / "step-00000004", tmp_path / "checkpoints" / "step-00000008")
    ckpt.save_checkpoint(tmp_path, 6, model, opt, {}, meta)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000006"
