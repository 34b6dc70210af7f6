"""`moekit bench hf` (moekit.bench.hf): a family that moekit does not wrap gets a `refused` line, not a crash."""

from __future__ import annotations

import importlib
import json
import types

import moekit.hf


def _bench():
    return importlib.import_module("moekit.bench.hf")


def test_a_refused_family_gets_a_refused_line(monkeypatch, capsys):
    bench = _bench()
    cfgs = bench.configs(32, 32, 4, 1, 64)
    assert {"gpt_oss", "llama4"} <= set(cfgs)

    def refuse(model, **kw):
        raise moekit.hf.UnsupportedBlockError("moekit.hf cannot wrap X: no reason")

    monkeypatch.setattr(bench.moekit.hf, "wrap", refuse)
    lines = bench.run_arch("gpt_oss", cfgs["gpt_oss"], types.SimpleNamespace())
    assert lines == [{"bench": "hf", "arch": "gpt_oss", "refused": "moekit.hf cannot wrap X: no reason"}]
    assert json.loads(capsys.readouterr().out.strip()) == lines[0]
