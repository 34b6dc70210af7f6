"""Presets train the recipe their paper used (issue 11, item 12)."""

import pytest
import torch

from moekit.train import train
from moekit.train.compare import compare
from moekit.train.presets import LOSS_RECIPES, PRESETS, preset


def test_random_preset_trains_no_balance_and_no_z_loss():
    _, train_cfg = preset("random")  # SMoE-Dropout: the router is frozen
    assert train_cfg.aux_coefs["load_balance"] == 0.0 and train_cfg.aux_coefs["z_loss"] == 0.0


def test_deepseek_preset_trains_bias_and_sequence_loss_not_switch():
    model_cfg, train_cfg = preset("deepseek")
    assert model_cfg.moe.router.bias_update_rate > 0
    assert train_cfg.aux_coefs["load_balance"] == 0.0
    assert train_cfg.aux_coefs["seq_balance"] == pytest.approx(1e-4)  # DeepSeek-V3's alpha


@pytest.mark.parametrize("name", sorted(set(PRESETS) - set(LOSS_RECIPES)))
def test_other_presets_keep_the_default_recipe(name):
    _, train_cfg = preset(name)
    assert train_cfg.aux_coefs == {"load_balance": 0.01, "z_loss": 1e-3, "seq_balance": 0.0, "dynamic": 1e-4}


def test_no_aux_gradient_reaches_the_hidden_states_of_the_random_preset():
    model_cfg, train_cfg = preset("random")
    from moekit.models import MoELM

    model_cfg.n_layers, model_cfg.d_model, model_cfg.max_seq_len, model_cfg.moe.d_expert = 2, 32, 16, 16
    model = MoELM(model_cfg.validate())
    model(torch.randint(0, 200, (2, 8)))
    aux = model.aux_losses()
    total = sum(train_cfg.aux_coefs.get(n, 0.0) * v for n, v in aux.items())
    total.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


class Stop(Exception):
    pass


def start_lines(name, tmp_path) -> list[str]:
    """The lines `train` logs before it loads the corpus (it is stopped there)."""
    lines = []

    def log(line):
        if line.startswith("unigram baseline"):
            raise Stop
        lines.append(line)

    model_cfg, train_cfg = preset(name)
    with pytest.raises(Stop):
        train(model_cfg, train_cfg, tmp_path / name, progress=False, log=log)
    return lines


@pytest.mark.parametrize("name,expected", [
    ("deepseek", "loss = lm_loss + 0.0001*seq_balance (off: load_balance, z_loss)"),
    ("random", "loss = lm_loss + 0 (off: load_balance, z_loss, seq_balance)"),
    ("tiny", "loss = lm_loss + 0.01*load_balance + 0.001*z_loss + 0.0001*dynamic (off: seq_balance)"),
], ids=["deepseek", "random", "tiny"])
def test_training_prints_the_effective_loss_coefficients_at_start(tmp_path, name, expected):
    lines = [line for line in start_lines(name, tmp_path) if line.startswith("loss = ")]
    assert lines == [expected + ", aux losses averaged over MoE layers"]


def test_compare_accepts_per_family_loss_recipes(tmp_path, monkeypatch):
    import moekit.train.compare as cmp

    def first_run(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(cmp, "train", first_run)
    with pytest.raises(Stop):  # got past the equal-training check into the first run
        compare({name: preset(name) for name in ("topk", "random")}, tmp_path, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match=r"trains differently \(\['steps'\]\)"):
        topk, random = preset("topk"), preset("random")
        random[1].steps = 9
        compare({"topk": topk, "random": random}, tmp_path, progress=False, log=lambda *_: None)


def test_a_routers_own_loss_takes_the_coefficient_its_config_declares(monkeypatch, tmp_path):
    """A loss TrainConfig does not name (e.g. one a router scales by its own adaptive coefficient) gets
    the router config's coefficient (RouterConfig.aux_loss_coefs); TrainConfig's own fields win."""
    from moekit.routers.topp import TopPConfig
    from moekit.train.trainer import aux_coefs_for

    monkeypatch.setattr(TopPConfig, "aux_loss_coefs", lambda self: {"probe": 1.0, "dynamic": 9.0})
    monkeypatch.setattr(TopPConfig, "aux_loss_names", lambda self: ("dynamic", "probe"))
    model_cfg, train_cfg = preset("topp")
    coefs = aux_coefs_for(model_cfg, train_cfg)
    assert coefs["probe"] == 1.0 and coefs["dynamic"] == train_cfg.dynamic_coef == 1e-4
    lines = []

    def log(line):
        if line.startswith("unigram baseline"):
            raise Stop
        lines.append(line)

    with pytest.raises(Stop):
        train(model_cfg, train_cfg, tmp_path / "run", progress=False, log=log)
    assert [line for line in lines if line.startswith("loss = ")] == [
        "loss = lm_loss + 0.01*load_balance + 0.001*z_loss + 0.0001*dynamic + 1*probe (off: seq_balance), "
        "aux losses averaged over MoE layers"]
