import json

import pytest
import torch

from moekit.compress import calibrate, merge, new_record, prune, quantize
from moekit.compress.prune import apply_keep, record_counts
from moekit.errors import DataError
from moekit.hf.export import ExportError, export_hf
from moekit.layers.moe import moe_layers
from moekit.train import TrainConfig, load_trained, save_trained
from moekit.train.checkpoint import read_json


@pytest.mark.parametrize("steps", [("prune",), ("prune", "merge", "quantize"), ("merge",), ("quantize",)])
def test_compressed_run_saves_and_loads_identically(tiny_lm, windows, tmp_path, steps):
    model = tiny_lm()
    record = new_record("test")
    if "prune" in steps:
        record["steps"].append(prune(model, calibrate(model, windows), 0.5, "reap", per_layer=True).to_dict())
    if "merge" in steps:
        record["steps"].append(merge(model, calibrate(model, windows), 0.5).to_dict())
    if "quantize" in steps:
        record["steps"].append(quantize(model, "mixed:4", calibrate(model, windows), group_size=16).to_dict())
    cfg = TrainConfig(seq_len=32)
    save_trained(model, cfg, tmp_path / "run", record)
    loaded, cfg2, _ = load_trained(tmp_path / "run")
    torch.testing.assert_close(loaded(windows), model(windows), rtol=0, atol=0)
    saved = read_json(tmp_path / "run" / "config.json")
    assert [s["method"] for s in saved["compression"]["steps"]] == list(steps)
    assert saved["compression"]["version"] == 1


def _compressed(tiny_lm, windows, kind):
    model = tiny_lm()
    if kind == "per-layer":
        for layer, keep in zip(moe_layers(model), ([0, 1, 2], [0, 1, 2, 3, 4, 5]), strict=True):
            apply_keep(layer, keep)
        record_counts(model)
        assert model.cfg.moe_num_experts == [3, 6]
    elif kind == "quantised":
        quantize(model, "int8", group_size=16)
    else:
        merge(model, calibrate(model, windows), 0.5)
    return model


@pytest.mark.parametrize(("kind", "export_why"), [("per-layer", "different expert counts"), ("quantised", "quantised"),
                                               ("merged", "merged")])
def test_export_refuses_what_it_cannot_hold(tiny_lm, windows, tmp_path, kind, export_why):
    model = _compressed(tiny_lm, windows, kind)
    with pytest.raises(ExportError, match=export_why):
        export_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_uniformly_pruned_model_exports(tiny_lm, windows, tmp_path):
    model = tiny_lm()
    prune(model, calibrate(model, windows), 0.5, "reap")
    assert model.cfg.moe.num_experts == 4 and model.cfg.moe_num_experts is None
    path = export_hf(model, tmp_path / "hf")
    assert json.loads((path / "config.json").read_text())["num_local_experts"] == 4


def test_a_damaged_record_is_refused(tiny_lm, windows, tmp_path):
    from moekit.compress import restore

    with pytest.raises(DataError, match="newer"):
        restore(tiny_lm(), {"format": "moekit-compression", "version": 99, "steps": []})
    with pytest.raises(DataError, match="unknown step"):
        restore(tiny_lm(), {"format": "moekit-compression", "version": 1, "steps": [{"method": "zip"}]})


def test_a_uniformly_pruned_model_goes_to_the_expert_store(tiny_lm, windows, tmp_path):
    from moekit.offload import ExpertStore, write_store

    model = tiny_lm()
    prune(model, calibrate(model, windows), 0.5, "reap")  # the same share in every layer: an ordinary model
    store = ExpertStore(write_store(model, tmp_path / "s"))
    assert store.num_experts == 4 and store.num_layers == 2


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantised_store_round_trips_with_checksums_and_counts_compressed_bytes(tiny_lm, windows, tmp_path, method):
    from moekit.compress.quantize import expert_bytes
    from moekit.offload import ExpertStore, ExpertStoreError, offloaded_generate, plan_cache, write_store

    full = tiny_lm()
    model = tiny_lm()
    quantize(model, method, group_size=16)
    path = write_store(model, tmp_path / "s")
    with ExpertStore(path, verify="always") as store:
        assert store.quantization == {"bits": int(method[3:]), "group_size": 16}
        # one width: still a version-2 store, which a moekit without versions 3 and 4 reads
        assert store.manifest["version"] == 2 and "formats" not in store.manifest
        assert all("format" not in x for layer in store.manifest["layers"] for x in layer["experts"])
        assert store.total_nbytes == expert_bytes(model)  # the budget counts compressed bytes
        bank = moe_layers(model)[1].experts
        q_in, s_in, q_down, s_down = store.load(1, 5)
        assert torch.equal(q_in, bank.w_in_q5) and torch.equal(s_down, bank.down_s5)
        store.verify_all()
        # the same byte budget holds more experts of the quantised model
        budget = 2 * 2 * sum(t.nbytes for t in (moe_layers(full)[0].experts.w_in[0], moe_layers(full)[0].experts.down_proj[0]))
        assert plan_cache(budget, store, "lru", "layer", 2).capacity >= 3 * plan_cache(
            budget, ExpertStore(write_store(full, tmp_path / "f")), "lru", "layer", 2).capacity
    # offloaded generation moves the compressed bytes and equals resident generation token for token
    prompt = windows[:1, :8]
    res = offloaded_generate(model, prompt, 6, budget="50%", policy="lru", simulate=False)
    from moekit.models.generate import generate

    assert torch.equal(res.ids_BT, generate(model, prompt, 6))
    assert res.metrics["expert_bytes"] == expert_bytes(model) // (2 * 8)
    # a corrupted byte fails its checksum
    layer_file = path / "layer-000.safetensors"
    raw = bytearray(layer_file.read_bytes())
    raw[-1] ^= 0xFF
    layer_file.write_bytes(bytes(raw))
    with ExpertStore(path, verify="always") as store, pytest.raises(ExpertStoreError, match="checksum"):
        store.verify_all()


def test_a_model_pruned_per_layer_offloads_from_a_store_of_its_counts(tiny_lm, windows, tmp_path):
    from moekit.compress.quantize import expert_bytes
    from moekit.models.generate import generate
    from moekit.offload import ExpertStore, offloaded_generate, plan_cache, write_store
    from moekit.offload.runtime import expert_shape

    model = _compressed(tiny_lm, windows, "per-layer")  # 3 and 6 experts
    path = write_store(model, tmp_path / "s")
    with ExpertStore(path, verify="always") as store:
        assert store.experts_per_layer == [3, 6] and store.num_experts == 6
        assert store.total_nbytes == expert_bytes(model) == expert_shape(model).total_nbytes  # 9 experts, not 12
        store.verify_all()
        assert torch.equal(store.load(0, 2)[0], moe_layers(model)[0].experts.w_in[2])
        with pytest.raises(IndexError, match="layer 0: 3"):
            store.load(0, 3)
        shared = plan_cache("100%", store, "lru", "shared", 2)
        assert shared.capacity == 9  # a whole-model cache holds every expert there is
    manifest = json.loads((path / "manifest.json").read_text())
    for bad in ([3, 7], [3], [6, 3]):  # largest not num_experts; one per layer; counts that do not fit the files
        (path / "manifest.json").write_text(json.dumps({**manifest, "experts_per_layer": bad}))
        from moekit.offload import ExpertStoreError

        with pytest.raises(ExpertStoreError, match="experts_per_layer|experts|file_nbytes"):
            ExpertStore(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    prompt = windows[:1, :8]
    for scope in ("layer", "shared"):
        res = offloaded_generate(model, prompt, 6, budget="50%", policy="lru", scope=scope, simulate=False)
        assert torch.equal(res.ids_BT, generate(model, prompt, 6))
        assert res.metrics["total_expert_bytes"] == expert_bytes(model)


def _mixed(tiny_lm):
    """int4 experts with one int8 expert per layer (as a protected super expert, or mixed precision)."""
    from moekit.compress.quantize import install

    model = tiny_lm()
    for i, layer in enumerate(moe_layers(model)):
        install(layer, [8 if e == 2 + i else 4 for e in range(8)], 16)
    return model


def test_a_store_of_mixed_widths_holds_each_expert_at_its_size_and_offloads_exactly(tiny_lm, windows, tmp_path):
    from moekit.compress.quantize import expert_bytes
    from moekit.models.generate import generate
    from moekit.offload import ExpertStore, ExpertStoreError, offloaded_generate, plan_cache, write_store
    from moekit.offload.runtime import expert_shape

    model = _mixed(tiny_lm)
    path = write_store(model, tmp_path / "s")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == 4 and sorted(manifest["formats"]) == ["int4", "int8"]
    banks = [m.experts for m in moe_layers(model)]
    with ExpertStore(path, verify="always") as store:
        s4, s8 = banks[0].expert_nbytes(0), banks[0].expert_nbytes(2)
        assert s8 > s4 and store.expert_nbytes_LE[0] == [s4, s4, s8, s4, s4, s4, s4, s4]
        # the budget counts each expert's own bytes: 14 int4 + 2 int8, not 16 of the largest
        assert store.total_nbytes == expert_bytes(model) == expert_shape(model).total_nbytes == 14 * s4 + 2 * s8
        assert store.expert_bits(1, 3) == 8 and store.expert_bits(1, 2) == 4
        q_in, s_in, q_down, s_down = store.load(1, 3)
        assert torch.equal(q_in, banks[1].w_in_q3) and torch.equal(s_down, banks[1].down_s3)
        store.verify_all()
        plan = plan_cache(2 * (s8 + 2 * s4), store, "lru", "layer", 2)  # per layer: one int8 and two int4 experts
        # a step may hold 2 of the largest at once; the cache holds 3 experts of this layer's mix
        assert plan.cache_nbytes == s8 + 2 * s4 and plan.capacity == 2 and 3 * s4 <= plan.cache_nbytes
    prompt = windows[:2, :8]
    want = generate(model, prompt, 6)
    for policy, scope in (("lru", "layer"), ("lfu", "shared"), ("predictive", "layer")):
        res = offloaded_generate(model, prompt, 6, budget="40%", policy=policy, scope=scope)
        assert torch.equal(res.ids_BT, want), (policy, scope)
        assert res.metrics["total_expert_bytes"] == 14 * s4 + 2 * s8
        assert res.metrics["peak_resident_expert_bytes"] <= res.metrics["budget_bytes"]
        assert "simulated_skipped" in res.metrics
        # every loaded byte is an expert's own size: the moved bytes are sums of s4 and s8
        moved = res.metrics["decode_stats"]["loaded_nbytes"]
        loads = res.metrics["decode_stats"]["demand_loads"] + res.metrics["decode_stats"]["prefetch_loads"]
        assert any(moved == a * s4 + (loads - a) * s8 for a in range(loads + 1))
    # a damaged per-expert size list is refused in one line
    bad = json.loads(json.dumps(manifest))
    bad["layers"][0]["expert_nbytes"][2] = s4
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ExpertStoreError, match=r"layers\[0\]\.expert_nbytes is .*expected .*each expert's format size"
                       ) as err:
        ExpertStore(path)
    assert "\n" not in str(err.value)
    bad = json.loads(json.dumps(manifest))
    bad["layers"][1]["experts"][3]["format"] = "int4"  # its bytes no longer add up to the file
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ExpertStoreError, match="expert_nbytes|offset"):
        ExpertStore(path)


def test_a_merged_model_offloads_from_a_store_of_its_bank(tiny_lm, windows, tmp_path):
    from moekit.models.generate import generate
    from moekit.offload import ExpertStore, ExpertStoreError, load_dense_lm, offloaded_generate, write_store

    model = _compressed(tiny_lm, windows, "merged")
    maps = [m.expert_map_E.tolist() for m in moe_layers(model)]
    M = [m.experts.num_experts for m in moe_layers(model)]
    assert M == [4, 4]
    path = write_store(model, tmp_path / "s")
    with ExpertStore(path, verify="always") as store:
        assert store.experts_per_layer == M and store.expert_maps == maps
        assert store.total_nbytes == sum(sum(t.nbytes for t in (m.experts.gate_up_proj, m.experts.down_proj))
                                         for m in moe_layers(model))  # 4 stored experts per layer, not 8
        store.verify_all()
    prompt = windows[:2, :8]
    want = generate(model, prompt, 6)
    for policy in ("lru", "predictive"):
        res = offloaded_generate(model, prompt, 6, budget="50%", policy=policy)
        assert torch.equal(res.ids_BT, want), policy
    # the model rebuilt from the store alone (experts never allocated) is merged as the original
    assert [m.expert_map_E.tolist() for m in moe_layers(load_dense_lm(path))] == maps
    res = offloaded_generate(path, prompt, 6, budget="50%", policy="lru")
    assert torch.equal(res.ids_BT, want)
    # a store whose map differs from the model's is refused
    manifest = json.loads((path / "manifest.json").read_text())
    bad = json.loads(json.dumps(manifest))
    bad["layers"][0]["expert_map"] = [9] * 8
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ExpertStoreError, match="expert_map"):
        ExpertStore(path)


def test_a_cache_over_experts_of_different_sizes_counts_each_ones_bytes(tiny_lm, tmp_path):
    from moekit.offload import ExpertStore, plan_cache, write_store
    from moekit.offload.cache import ExpertCache

    model = _mixed(tiny_lm)  # layer 0: expert 2 is int8, the others int4
    with ExpertStore(write_store(model, tmp_path / "s")) as store:
        s4, s8 = store.expert_nbytes_LE[0][0], store.expert_nbytes_LE[0][2]
        plan = plan_cache(s8 + 2 * s4, store, "lru", "shared", 2)
        cache = ExpertCache(store, plan)
        for e in (0, 1, 3):  # three int4 experts fit where only two int8 ones would
            cache.acquire(0, [e])
            cache.end_step(0)
        assert cache.resident_nbytes == 3 * s4 and set(cache.caches[0].entries) == {0, 1, 3}
        cache.acquire(0, [2])  # the int8 expert evicts the least recently used int4 expert (0): then it fits
        cache.end_step(0)
        assert set(cache.caches[0].entries) == {1, 2, 3}
        assert cache.resident_nbytes == 2 * s4 + s8 == plan.budget_nbytes
        assert cache.peak_resident_nbytes <= plan.budget_nbytes
        assert cache.stats["prefill"].loaded_nbytes == 3 * s4 + s8  # each load moved its expert's own bytes
        w = cache.acquire(0, [2])[0]
        assert torch.equal(w[0], moe_layers(model)[0].experts.w_in_q2)  # views in the int8 layout


@pytest.mark.parametrize("routing", ["spread", "two_experts"])
def test_a_quantised_model_offloads_bit_for_bit_where_its_gemms_run_weight_first(tiny_lm, tmp_path, monkeypatch,
                                                                                 routing):
    """A QuantizedExpertBank runs its grouped GEMMs over its A active experts, so "loop_wx"'s row rule
    (grouped.CPU_WX_ROWS_PER_EXPERT) counts A, not E, and the offloaded forward must count as it does (the size
    floor lowered to these tiny experts): decode-sized forwards run weight-first; with every row on two experts
    (a zeroed router: ties go to experts 0 and 1) 6 tokens make 12 rows > 4 x 2, which do not."""
    from moekit.compress.quantize import install
    from moekit.offload import offload, write_store
    from moekit.ops import grouped

    monkeypatch.setattr(grouped, "CPU_WX_MIN_WEIGHT_BYTES", 0)
    model = tiny_lm()
    for layer in moe_layers(model):
        if routing == "two_experts":
            torch.nn.init.zeros_(layer.router.weight)
        install(layer, [8, 4, 2, 4, 8, 4, 4, 8], 16)
    store = write_store(model, tmp_path / "s")
    for T in (1, 3, 6):
        ids = torch.randint(3, 64, (1, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            with grouped.record() as ran:
                ref = model(ids)
            with offload(model, store, "50%", "lru"):
                out = model(ids)
        assert torch.equal(out, ref), (routing, T)
        weight_first = T < 6 or routing == "spread"
        assert (ran["forward", "loop_wx"] == 4) == weight_first, (routing, T, dict(ran))
        if routing == "two_experts":
            assert [m.experts.last_active for m in moe_layers(model)] == [2, 2]
