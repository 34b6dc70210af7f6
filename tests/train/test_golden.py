"""The golden loss curve: 20 deterministic steps of the `tiny` preset (top-p routing) must reproduce
the per-step loss, lm_loss, grad_norm and experts per token checked in at
tests/train/golden_tiny_20.json, within tolerances chosen for other machines' summation orders
(see scripts/make_golden.py). A change meant to move training numbers regenerates the file:

    PYTHONPATH=src python scripts/make_golden.py
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def make_golden():
    """scripts/make_golden.py as a module: the test runs the very recipe and comparison it writes with."""
    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "scripts" / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_preset_reproduces_the_golden_losses(tmp_path, make_golden):
    golden = json.loads(make_golden.GOLDEN.read_text(encoding="utf-8"))
    assert golden["recipe"] == make_golden.RECIPE and golden["tolerance"] == make_golden.TOLERANCE, (
        "scripts/make_golden.py changed its recipe or tolerances: regenerate the golden file with it")
    assert len(golden["steps"]) == 20 and golden["steps"][-1]["lm_loss"] < golden["steps"][0]["lm_loss"] - 1
    got = make_golden.run_recipe(golden["recipe"], tmp_path / "run")
    bad = make_golden.compare(got, golden)
    assert not bad, ("training numbers moved from tests/train/golden_tiny_20.json; if the change is meant to move "
                     "them, regenerate it with `PYTHONPATH=src python scripts/make_golden.py`:\n" + "\n".join(bad))


def test_comparison_flags_a_moved_value_and_accepts_rounding(make_golden):
    golden = json.loads(make_golden.GOLDEN.read_text(encoding="utf-8"))
    rounding = copy.deepcopy(golden["steps"])
    rounding[7]["loss"] *= 1 + 5e-7  # the size of a summation-order difference
    assert make_golden.compare(rounding, golden) == []
    moved = copy.deepcopy(golden["steps"])
    moved[7]["lm_loss"] *= 1 + 3e-4  # less than 10% more balance loss moves it (measured, see make_golden.py)
    moved[12]["experts_per_token"] += 3 / 1024  # three flipped routing decisions
    assert [line.split(":")[0] for line in make_golden.compare(moved, golden)] == [
        "step 8 lm_loss", "step 13 experts_per_token"]
