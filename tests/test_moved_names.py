"""Names that moved when files with several jobs were split stay importable from where they were.

Each row: (old module, name, new module). The old path must give the very same object as the new one.
"""

import importlib

import pytest

MOVED = [
    ("moekit.analysis.metrics", "RoutingTrace", "moekit.analysis.routing_trace"),
    ("moekit.analysis", "RoutingTrace", "moekit.analysis.routing_trace"),
    ("moekit.analysis.report", "AnalysisConfig", "moekit.analysis.report.tasks"),
    ("moekit.analysis.report", "compute_metrics", "moekit.analysis.report.tasks"),
    ("moekit.analysis.report", "static_hits", "moekit.analysis.report.tasks"),
    ("moekit.analysis.report", "render_html", "moekit.analysis.report.html"),
    ("moekit.offload.cache", "parse_budget", "moekit.offload.budget"),
    ("moekit.offload.cache", "plan_cache", "moekit.offload.budget"),
    ("moekit.offload.cache", "CachePlan", "moekit.offload.budget"),
    ("moekit.offload.cache", "ExpertShape", "moekit.offload.budget"),
    ("moekit.offload.cache", "hot_keys_from_counts", "moekit.offload.budget"),
    ("moekit.offload.cache", "format_bytes", "moekit.offload.budget"),
    ("moekit.offload.cache", "POLICIES", "moekit.offload.budget"),
    ("moekit.offload.cache", "SCOPES", "moekit.offload.budget"),
    ("moekit.offload.cache", "PrefetchWorker", "moekit.offload.prefetch"),
    ("moekit.offload.cache", "PrefetchError", "moekit.offload.prefetch"),
    ("moekit.offload", "PrefetchError", "moekit.offload.prefetch"),
    ("moekit.offload.store", "load_dense_lm", "moekit.offload.load"),
    ("moekit.offload", "load_dense_lm", "moekit.offload.load"),
    ("moekit.offload.generate", "open_model_and_store", "moekit.offload.load"),
    ("moekit.offload.generate", "store_matches_model", "moekit.offload.load"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_old_import_path_gives_the_same_object(old, name, new):
    moved = getattr(importlib.import_module(new), name)
    assert getattr(importlib.import_module(old), name) is moved
    if callable(moved):  # classes and functions are defined where they now live
        assert moved.__module__ == new


def test_a_name_that_never_existed_still_fails():
    store = importlib.import_module("moekit.offload.store")
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        store.no_such_name  # noqa: B018
