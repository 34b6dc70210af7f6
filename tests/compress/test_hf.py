import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, MixtralConfig  # noqa: E402

import moekit.hf  # noqa: E402
from moekit.compress import calibrate, merge, prune, quantize  # noqa: E402
from moekit.errors import UsageError  # noqa: E402


def test_wrapped_transformers_model_calibrates_and_compression_refuses_naming_why():
    cfg = MixtralConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, num_local_experts=6, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = moekit.hf.wrap(AutoModelForCausalLM.from_config(cfg).eval())
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    calib = calibrate(model, ids, forward=lambda x: model(input_ids=x))
    assert [int(s.count_E.sum()) for s in calib.layers] == [64, 64]  # 32 tokens x top-2 per layer
    assert all(bool((s.reap_E() >= 0).all()) for s in calib.layers)
    for run, why in ((lambda: prune(model, calib, 0.5), "one expert count"),
                     (lambda: merge(model, calib, 0.5), "no place for a map"),
                     (lambda: quantize(model, "int8", calib, 16), "full precision")):
        with pytest.raises(UsageError, match=why):
            run()
