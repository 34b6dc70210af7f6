"""Never destroy what moekit did not write (issue 12 items 1 and 3): expert stores, exports and analyze
output directories are replaced only when moekit marked them as its own; old unmarked stores are still
read; temporary directories of killed writes are removed at the next start, and nothing else is."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.analysis import save_trace
from moekit.analysis.report import AnalysisConfig, analyze
from moekit.errors import NotOwnedError
from moekit.offload import ExpertStore, offloaded_generate, write_store
from moekit.utils.io import MARKER, marker_kind, remove_debris

from .io_support import dead_pid, random_trace, snapshot, tiny_lm

SMALL = AnalysisConfig(srp_n=(2,), n_boot=5, sch_n=(2,), model_sch_n=(2,), max_multiple=2,
                       model_multiples=(1,), workers=1)


@pytest.fixture
def no_plots(monkeypatch):
    """Directory handling is under test here, not the plots (which take seconds to draw)."""
    from moekit.analysis.report import plots

    monkeypatch.setattr(plots, "draw_plots", lambda m: {})


def users_folder(path):
    """A folder of the user's that happens to hold a file called manifest.json."""
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"my": "experiment"}))
    (path / "results.csv").write_text("a,b\n1,2\n")
    return path


def test_write_store_never_replaces_a_folder_it_did_not_mark(tmp_path):
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(NotOwnedError, match="holds files moekit did not write"):
        write_store(tiny_lm(), mine)
    assert snapshot(mine) == before


def test_offloaded_generate_never_replaces_a_folder_it_did_not_mark(tmp_path):
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(Exception, match="mine"):  # not a store, and not moekit's to replace
        offloaded_generate(tiny_lm(), [[1, 2, 3]], 2, "50%", store_dir=mine)
    assert snapshot(mine) == before
    # A store of another model that moekit did not mark (an older moekit's) is not rewritten either.
    old = write_store(tiny_lm(seed=3), tmp_path / "old")
    (old / MARKER).unlink()
    before = snapshot(old)
    with pytest.raises(NotOwnedError, match="written by an older moekit"):
        offloaded_generate(tiny_lm(seed=4), [[1, 2, 3]], 2, "50%", store_dir=old)
    assert snapshot(old) == before
    # A marked store of another model is moekit's own: it is rewritten for this one.
    mine_store = write_store(tiny_lm(seed=3), tmp_path / "marked")
    r = offloaded_generate(tiny_lm(seed=4), [[1, 2, 3]], 2, "50%", store_dir=mine_store)
    assert r.metrics["store"] == str(mine_store) and marker_kind(mine_store) == "store"


def test_marked_store_is_replaced_and_carries_the_marker(tmp_path):
    path = write_store(tiny_lm(seed=0), tmp_path / "s")
    assert marker_kind(path) == "store"
    other = tiny_lm(seed=1)
    write_store(other, path)
    with ExpertStore(path) as st:
        assert torch.equal(st.load(1, 2)[1], other.moe_layers()[1].experts.down_proj[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary or old directory left


def test_old_unmarked_store_is_read_but_not_replaced(tmp_path):
    model = tiny_lm()
    path = write_store(model, tmp_path / "old")
    (path / MARKER).unlink()  # as written before ownership markers existed
    with ExpertStore(path) as st:
        assert torch.equal(st.load(0, 1)[0], model.moe_layers()[0].experts.gate_up_proj[1])
    ref = offloaded_generate(model, [[5, 6, 7]], 3, "50%", store_dir=path)  # the same model: reused as is
    assert ref.metrics["store"] == str(path)
    before = snapshot(path)
    with pytest.raises(NotOwnedError, match=r"written by an older moekit.*can still be read.*rm -r"):
        write_store(tiny_lm(seed=5), path)
    assert snapshot(path) == before


def test_analyze_replaces_only_its_own_report(tmp_path, no_plots):
    trace = random_trace()
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(NotOwnedError, match="moekit analyze: .* holds files moekit did not write"):
        analyze(trace, mine, SMALL, progress=False)
    assert snapshot(mine) == before
    out = tmp_path / "rep"
    analyze(trace, out, SMALL, progress=False)
    assert marker_kind(out) == "report"
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "metrics.json", "report.html", "trace.npz"]
    analyze(random_trace(seed=1), out, SMALL, progress=False)  # an earlier report is replaced whole
    assert json.loads((out / "metrics.json").read_text())["trace"]["num_tokens"] == 60


def test_export_replaces_only_its_own_export(tmp_path):
    from moekit.hf.export import export_hf
    from moekit.models import MoELM
    from moekit.models.lm import LMConfig

    model = MoELM(LMConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)).eval()
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(NotOwnedError, match="moekit export: .* holds files moekit did not write"):
        export_hf(model, mine)
    assert snapshot(mine) == before
    out = export_hf(model, tmp_path / "hf")
    assert marker_kind(out) == "export" and (out / "config.json").is_file()
    export_hf(model, out)  # re-exporting over an earlier export is allowed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mine"]


@pytest.mark.parametrize("kind", ["store", "report", "trace"])
def test_debris_of_killed_writes_is_removed_at_the_next_start(tmp_path, kind, no_plots):
    """`.NAME.tmp-PID` (and a stale `.NAME.old-PID`) of a dead process goes; a live process's and
    other names' temporaries stay."""
    name = {"store": "s", "report": "rep", "trace": "t.npz"}[kind]

    def write(seed: int) -> None:
        if kind == "store":
            write_store(tiny_lm(seed), tmp_path / name)
        elif kind == "report":
            analyze(random_trace(seed=seed), tmp_path / name, SMALL, progress=False)
        else:
            save_trace(random_trace(seed=seed), tmp_path / name)

    write(0)  # an earlier complete write
    dead, live = dead_pid(), 1  # pid 1 is always running
    debris = tmp_path / f".{name}.tmp-{dead}"
    debris.mkdir()
    (debris / "layer-000.safetensors").write_bytes(b"half a file")
    old = tmp_path / f".{name}.old-{dead}"
    if kind != "trace":  # directories are replaced by two renames; files by one
        old.mkdir()
    kept = [tmp_path / f".{name}.tmp-{live}", tmp_path / f".other.tmp-{dead}", tmp_path / "notes.tmp-1"]
    for p in kept:
        p.write_text("not moekit's to delete")
    write(1)
    assert not debris.exists() and not old.exists()
    assert all(p.exists() for p in kept)


def test_failed_store_write_leaves_nothing_and_keeps_the_old_store(tmp_path, monkeypatch):
    import moekit.offload.store as store_mod

    path = write_store(tiny_lm(seed=0), tmp_path / "s")
    before = snapshot(tmp_path)
    real = store_mod._write_layer_file

    def fail_on_second_layer(p, bank, layer):
        if layer == 1:
            p.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(p, bank, layer)

    monkeypatch.setattr(store_mod, "_write_layer_file", fail_on_second_layer)
    with pytest.raises(OSError, match=f"No space left on device: '{path}'"):
        write_store(tiny_lm(seed=1), path)
    assert snapshot(tmp_path) == before


def test_temporary_stores_of_killed_generations_are_removed(tmp_path, monkeypatch):
    """Generation without a store directory writes a temporary store (as big as the experts); one left
    by a killed process is removed by the next such generation, and each removes its own."""
    import os
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = tmp_path / f"moekit-offload-{os.getuid()}"
    killed = root / f".store-abcd.tmp-{dead_pid()}"
    (killed / "store").mkdir(parents=True)
    (killed / "store" / "layer-000.safetensors").write_bytes(b"x" * 1000)
    running = root / ".store-efgh.tmp-1"  # pid 1 is alive: another process's store in use
    running.mkdir()
    r = offloaded_generate(tiny_lm(), [[1, 2, 3]], 2, "50%")
    assert r.metrics["store"] == "(temporary)"
    assert sorted(p.name for p in root.iterdir()) == [running.name]


def test_a_store_moved_aside_by_a_killed_replace_is_put_back(tmp_path):
    """replace_dir renames the old store aside, then the new one in; a kill between the two leaves
    only `.s.old-PID`. The next write's start restores it rather than deleting the only copy."""
    model = tiny_lm(seed=2)
    path = write_store(model, tmp_path / "s")
    aside = tmp_path / f".s.old-{dead_pid()}"
    path.rename(aside)
    remove_debris(tmp_path, "s")
    assert not aside.exists()
    with ExpertStore(path) as st:
        assert torch.equal(st.load(1, 3)[1], model.moe_layers()[1].experts.down_proj[3])
