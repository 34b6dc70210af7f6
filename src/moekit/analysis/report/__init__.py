"""`analyze(trace, out_dir)`: every routing metric of a trace, `metrics.json` and a self-contained
`report.html` (plots embedded as base64 PNG, no script, no network).

Stages:
  1. load the trace (a RoutingTrace or a trace file);
  2. compute every metric on a process pool (`tasks.compute_metrics`);
  3. draw the plots (`plots.draw_plots`) into one HTML page (`html.render_html`);
  4. write `metrics.json`, `report.html` and the trace (`trace.npz`) as one set: into a temporary
     sibling directory, then one rename (moekit.utils.io). The output directory must be absent,
     empty or an earlier moekit report (marker kind "report"); a failure or Ctrl-C leaves it as it was.

Definitions: docs/analysis-metrics.md; how to read the page: docs/analyze.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from moekit.analysis.report import plots
from moekit.analysis.report.html import render_html
from moekit.analysis.report.tasks import AnalysisConfig, compute_metrics, static_hits
from moekit.analysis.routing_trace import RoutingTrace
from moekit.analysis.tracefile import load_trace, save_trace
from moekit.utils.io import atomic_dir, check_writable_dir

__all__ = ["AnalysisConfig", "analyze", "check_report_dir", "compute_metrics", "render_html", "static_hits"]

KIND = "report"  # ownership marker kind of an analyze output directory (moekit.utils.io)
TRACE_FILE = "trace.npz"


def check_report_dir(out_dir: str | os.PathLike) -> None:
    """Refuse (NotOwnedError) an output directory that exists, is not empty and is not a moekit report."""
    check_writable_dir(out_dir, KIND, "moekit analyze")


def analyze(trace_or_path: RoutingTrace | str | os.PathLike, out_dir: str | os.PathLike,
            cfg: AnalysisConfig | None = None, progress: bool = True) -> dict:
    """Compute every metric of `trace_or_path` and write `out_dir/metrics.json`, `out_dir/report.html`
    and the trace `out_dir/trace.npz` as one set (module doc, stage 4). Returns the metrics dict.

    Raises NotOwnedError (out_dir holds other files), DataError / TraceFormatError (an empty,
    damaged or oversized trace), FileNotFoundError, OSError (e.g. a full disk: nothing is written).
    """
    out = Path(out_dir)
    check_report_dir(out)
    source = None if isinstance(trace_or_path, RoutingTrace) else Path(trace_or_path)
    trace = trace_or_path if source is None else load_trace(source)
    m = compute_metrics(trace, cfg, progress)
    t0 = time.perf_counter()
    figures = plots.draw_plots(m)
    page = render_html(m, figures)
    m["timing_s"]["plots_and_html"] = time.perf_counter() - t0
    with atomic_dir(out, KIND, "moekit analyze") as tmp:  # a full disk names `out`; nothing half-written
        if source is None:
            save_trace(trace, tmp / TRACE_FILE)
        else:
            shutil.copyfile(source, tmp / TRACE_FILE)
        (tmp / "metrics.json").write_text(json.dumps(m, indent=1), encoding="utf-8")
        (tmp / "report.html").write_text(page, encoding="utf-8")
    return m
