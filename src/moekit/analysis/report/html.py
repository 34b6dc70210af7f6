"""The report page: one self-contained HTML file (plots embedded as base64 PNG, no script, no network)."""

from __future__ import annotations

import html
import math

import numpy as np

from moekit.analysis.report.plots import _arr

__all__ = ["render_html"]

_CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
img{max-width:100%;display:block;margin:.8em 0}p.note{color:#555;font-size:.92em}"""


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _nanmean(x) -> float:
    a = _arr(x)
    return float(np.mean(a[~np.isnan(a)])) if np.any(~np.isnan(a)) else math.nan


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cache_table(c: dict) -> str:
    xs = c["C_over_k"]
    pick = [i for i, x in enumerate(xs) if x in (1, 2, 4, 8)] or list(range(len(xs)))
    header = ["policy"] + [f"C/k={xs[i]:g} cold / warm" for i in pick]
    rows = [[label] + [f"{_fmt(v['cold'][i])} / {_fmt(v['warm'][i])}" for i in pick]
            for label, v in c["policies"].items()]
    return _table(header, rows)


def render_html(m: dict, plots: dict[str, str]) -> str:
    t = m["trace"]

    def img(key: str, alt: str) -> str:
        if key not in plots:
            return f"<p class='note'>{html.escape(alt)}: not available for this trace.</p>"
        return f'<img class="plot" id="plot-{key}" alt="{html.escape(alt)}" src="data:image/png;base64,{plots[key]}">'

    ls = m["load"]
    summary = _table(["quantity", "value"], [
        ["layers L / experts E", f"{t['num_layers']} / {t['num_experts']}"],
        ["sequences / tokens / (token, layer) rows", f"{t['num_sequences']} / {t['num_tokens']} / {t['num_rows']}"],
        ["mean experts per token (k) / max", f"{_fmt(t['mean_experts_per_token'])} / {t['k_max']}"],
        ["domains", ", ".join(f"{d} ({n})" for d, n in (t["domains"] or {}).items()) or "unlabelled"],
        ["routers", ", ".join((t.get("meta") or {}).get("routers", [])) or "–"],
        ["load CV (mean over layers)", _fmt(_nanmean(ls["cv_L"]))],
        ["load Gini (mean over layers)", _fmt(_nanmean(ls["gini_L"]))],
        ["normalised entropy (mean over layers)", _fmt(_nanmean(ls["norm_entropy_L"]))],
        ["SRP random baseline 2k/(E+k)", _fmt(m["srp"]["random_baseline"])],
        ["analysis wall time", f"{m['timing_s']['wall']:.1f} s"],
    ])
    srp_rows = [[n, _fmt(v["value"]), f"[{_fmt(v['lo'])}, {_fmt(v['hi'])}]"] for n, v in m["srp"]["model"].items()]
    pf = m["prefetch"]
    pf_rows = []
    for kind in ("gate", "affinity"):
        precision = (pf.get("gate_precision") or {}) if kind == "gate" else (pf.get(kind) or {})
        for d, r in sorted((pf.get(kind) or {}).items(), key=lambda kv: int(kv[0])):
            pf_rows.append([kind, d, _fmt(_nanmean(r)), _fmt(_nanmean(precision.get(d, [None])))])
    sections = [
        ("Load per expert", img("load", "load heatmap, layer by expert"),
         "Tokens routed to each expert of each layer divided by the layer's mean: 1 is a perfectly balanced "
         "expert, bright cells are hot experts, dark ones idle."),
        ("Experts per token", img("experts_per_token", "experts per token by layer and domain"),
         "Mean number of executed experts per token at each layer, overall and per domain (constant k for "
         "top-k routers; varies with top-p, null-expert and other dynamic routers)."),
        ("Domain specialisation", img("specialisation", "domain by expert specialisation heatmap"),
         "Each domain's share of assignments per expert, times E (1 = what uniform routing gives), and the "
         "mean pairwise Jensen-Shannon divergence between domains per layer (0 identical, ln 2 disjoint)."),
        ("Expert caches", img("cache", "hit rate versus cache size for every policy")
         + _cache_table(m["cache"]["per_layer"]) + "<p class='note'>whole-model cache:</p>"
         + _cache_table(m["cache"]["whole_model"]),
         "Hit rate against cache size in units of k for LRU, LFU, SCH(n), the oracle static hot set and the "
         "two optimal caches (set-MIN dashed, bypass-MIN dotted). Plots use the cold convention; tables show "
         "cold / warm. set-MIN is the best a cache can do when all of a token's experts must be resident: "
         "it bounds LRU and LFU. SCH(n) is the paper's (arXiv 2505.16056, as its authors' code computes it): "
         "a later expert of a token may evict an earlier one, so it can exceed set-MIN; nothing that only "
         "chooses what to keep, SCH and static included, can exceed bypass-MIN. '–': LRU, LFU and set-MIN "
         "have no value when C is below the most experts one step requests (k_max)."),
        ("Segment routing locality", img("srp", "SRP versus segment length")
         + _table(["n", "SRP (whole model)", "95% interval"], srp_rows),
         "SRP(n): the best F1 of predicting one fixed expert group for each window of n tokens. Far above the "
         "random baseline means routing is stable over segments and per-segment caching pays."),
        ("Cross-layer affinity", img("affinity", "inter-layer affinity heatmaps"),
         "P(expert p at layer j+1 | expert i at layer j) for three layer pairs: concentrated rows mean the "
         "next layer's experts are predictable from this layer's."),
        ("Prefetch recall", img("prefetch", "prefetch recall by layer and distance")
         + _table(["predictor", "layers ahead", "mean recall", "mean precision"], pf_rows),
         pf["note"]),
    ]
    body = "".join(f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(note)}</p>{content}"
                   for title, content, note in sections)
    title = "moekit routing analysis"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_CSS}</style></head><body><h1>{title}</h1>{summary}{body}"
            "<p class='note'>Every number is in metrics.json next to this page; definitions in "
            "docs/analysis-metrics.md.</p></body></html>")

