"""The expert store: round trip, safetensors compatibility, damage detection, dense loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from moekit.offload import ExpertStore, ExpertStoreError, load_dense_lm, write_store

from .conftest import tiny_lm


def test_round_trip_every_expert_and_safetensors_reader(model, tmp_path):
    store_dir = write_store(model, tmp_path / "store")
    with ExpertStore(store_dir, verify="always") as st:
        assert (st.num_layers, st.num_experts, st.activation) == (3, 8, "swiglu")
        assert st.expert_nbytes == (2 * 48 * 32 + 32 * 48) * 4
        for i, layer in enumerate(model.moe_layers()):
            for e in range(8):
                gate_up, down = st.load(i, e)
                assert torch.equal(gate_up, layer.experts.gate_up_proj[e])
                assert torch.equal(down, layer.experts.down_proj[e])
        st.verify_all()
        m = st.manifest
    # Each layer file is plain safetensors; experts are contiguous and the data starts page-aligned.
    layer1 = m["layers"][1]
    assert layer1["data_start"] % 4096 == 0
    with safe_open(str(store_dir / layer1["file"]), "pt") as f:
        assert torch.equal(f.get_tensor("e5.down"), model.moe_layers()[1].experts.down_proj[5])
        assert torch.equal(f.get_tensor("e0.gate_up"), model.moe_layers()[1].experts.gate_up_proj[0])
    assert layer1["experts"][3]["offset"] == layer1["data_start"] + 3 * m["expert_nbytes"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_gelu_and_bf16_experts(tmp_path):
    model = tiny_lm(activation="gelu", dtype=torch.bfloat16)
    with ExpertStore(write_store(model, tmp_path / "s")) as st:
        up, down = st.load(2, 7)
        assert st.layout.names == ("up", "down") and up.dtype == torch.bfloat16
        assert torch.equal(up, model.moe_layers()[2].experts.up_proj[7])
        assert torch.equal(down, model.moe_layers()[2].experts.down_proj[7])


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_expert_is_refused_naming_layer_and_expert(model, tmp_path):
    store_dir = write_store(model, tmp_path / "s")
    m = json.loads((store_dir / "manifest.json").read_text())
    _flip_byte(store_dir / m["layers"][2]["file"], m["layers"][2]["experts"][5]["offset"] + 100)
    with ExpertStore(store_dir) as st:
        st.load(2, 4)  # its neighbour is intact
        with pytest.raises(ExpertStoreError, match="layer 2 expert 5 .*fails its checksum"):
            st.load(2, 5)
    with ExpertStore(store_dir, verify="never") as st:  # verification off: the bytes come back as stored
        assert not torch.equal(st.load(2, 5)[0], model.moe_layers()[2].experts.gate_up_proj[5])


def test_first_read_verification_is_remembered(model, tmp_path):
    store_dir = write_store(model, tmp_path / "s")
    m = json.loads((store_dir / "manifest.json").read_text())
    with ExpertStore(store_dir, verify="first") as st:
        st.load(0, 1)
        _flip_byte(store_dir / m["layers"][0]["file"], m["layers"][0]["experts"][1]["offset"])
        st.load(0, 1)  # verified once: not hashed again ("first"), damage after that is not seen
    with ExpertStore(store_dir, verify="first") as st, pytest.raises(ExpertStoreError, match="layer 0 expert 1"):
        st.load(0, 1)


def test_truncated_file_is_refused_naming_the_first_lost_expert(model, tmp_path):
    store_dir = write_store(model, tmp_path / "s")
    m = json.loads((store_dir / "manifest.json").read_text())
    path = store_dir / m["layers"][1]["file"]
    os.truncate(path, m["layers"][1]["experts"][6]["offset"] + 10)
    with pytest.raises(ExpertStoreError, match=r"truncated .*layer 1 expert 6 \(and 1 more\)"):
        ExpertStore(store_dir)


def test_missing_manifest_wrong_version_and_foreign_directories(model, tmp_path):
    with pytest.raises(ExpertStoreError, match="manifest.json is missing"):
        ExpertStore(tmp_path)
    store_dir = write_store(model, tmp_path / "s")
    m = json.loads((store_dir / "manifest.json").read_text())
    (store_dir / "manifest.json").write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(ExpertStoreError, match="version 99"):
        ExpertStore(store_dir)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds files moekit did not write"):
        write_store(model, tmp_path / "mine")
    # Rewriting a store replaces it whole.
    other = tiny_lm(seed=3)
    write_store(other, store_dir)
    with ExpertStore(store_dir) as st:
        assert torch.equal(st.load(0, 0)[1], other.moe_layers()[0].experts.down_proj[0])


def test_store_of_another_shape_is_refused(model, tmp_path):
    from moekit.offload import offload

    store_dir = write_store(tiny_lm(E=4), tmp_path / "s")
    with pytest.raises(ExpertStoreError, match=r"\(E, D, F, activation\) = \(4, 32, 48, 'swiglu'\)"):
        offload(model, store_dir, "50%")


def test_dense_lm_is_built_without_experts_and_matches(model, prompt, tmp_path):
    from moekit.offload import offload

    store_dir = write_store(model, tmp_path / "s")
    dense = load_dense_lm(store_dir)
    banks = [layer.experts for layer in dense.moe_layers()]
    assert all(b.gate_up_proj.is_meta and b.down_proj.is_meta for b in banks)
    assert dense.lm_head.weight is dense.embed.weight  # tied embeddings restored
    with torch.no_grad(), offload(dense, store_dir, "100%"):
        assert torch.equal(dense(prompt), model(prompt))


def test_hf_wrapped_model_store(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, MixtralConfig

    import moekit.hf

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = moekit.hf.wrap(AutoModelForCausalLM.from_config(cfg).eval())
    with ExpertStore(write_store(hf, tmp_path / "s")) as st:
        assert st.manifest["dense"] is None and st.num_layers == 2
        layer = moekit.hf.wrapped_blocks(hf)[1]
        assert torch.equal(st.load(1, 3)[0], layer.experts.gate_up_proj[3])
    with pytest.raises(ExpertStoreError, match="holds experts only"):
        load_dense_lm(tmp_path / "s")
