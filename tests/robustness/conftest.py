"""Fixtures of tests/robustness (helpers for the test_io_* files live in io_support.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .io_support import train_tiny


@pytest.fixture(scope="session")
def io_trained_run(tmp_path_factory):
    """One tiny top-k run (E = 4, 2 layers) shared by the test_io_* modules; tests take `io_run`."""
    return train_tiny(tmp_path_factory.mktemp("io") / "run")


@pytest.fixture
def io_run(io_trained_run, tmp_path):
    """A fresh copy of the run per test: what one test writes into it cannot hide another's writes."""
    return Path(shutil.copytree(io_trained_run, tmp_path / "run"))


@pytest.fixture(autouse=True)
def _raise_from_main_in_train_tests(request, monkeypatch):
    """The test_train_* modules assert the typed exception and its one-line message that `moekit.cli.main`
    formats; MOEKIT_DEBUG=1 makes main re-raise it instead of printing it (test_io_cli.py and
    test_train_settings.py::test_the_command_prints_the_same_line check the printed form and exit codes)."""
    if request.module.__name__.rsplit(".", 1)[-1].startswith("test_train_"):
        monkeypatch.setenv("MOEKIT_DEBUG", "1")
