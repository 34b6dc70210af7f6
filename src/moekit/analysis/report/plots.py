"""The report's plots: matplotlib (Agg backend) figures of a `compute_metrics` dict, as base64 PNG."""

from __future__ import annotations

import base64
import io
import math
import warnings

import numpy as np

__all__ = ["BOUNDS", "BOUND_LABELS", "draw_plots"]

BOUNDS = ("set_min", "bypass_min")
BOUND_LABELS = {"set_min": "set_min (optimum keeping each step's experts; bounds LRU, LFU)",
                "bypass_min": "bypass_min (optimal bound of every policy here)"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)  # layers are whole numbers


def _arr(x) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in x], dtype=np.float64) if not isinstance(x[0], list) \
        else np.array([[np.nan if v is None else v for v in row] for row in x], dtype=np.float64)


def draw_plots(m: dict) -> dict[str, str]:
    """One base64 PNG per section of the page, by key (load, experts_per_token, specialisation, cache,
    srp, affinity, prefetch); a section the trace has no data for has no key."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    L, E = m["trace"]["num_layers"], m["trace"]["num_experts"]
    plots: dict[str, str] = {}

    counts = _arr(m["load"]["counts_LE"])
    mean = counts.mean(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(min(14, 3 + E * 0.12), 1.5 + L * 0.25))
    im = ax.imshow(counts / np.where(mean > 0, mean, 1), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="expert", ylabel="layer", title="Load per expert (tokens / mean tokens per expert)")
    fig.colorbar(im, ax=ax, label="load / mean")
    plots["load"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.8))
    layers = np.arange(L)
    ax.plot(layers, _arr(m["experts_per_token"]["mean_L"]), "k-o", lw=2, label="all")
    for d, v in m["experts_per_token"]["by_domain"].items():
        ax.plot(layers, _arr(v["mean_L"]), marker=".", label=d)
    ax.set(xlabel="layer", ylabel="experts per token (mean)", title="Experts per token by layer and domain")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    plots["experts_per_token"] = _png(fig)

    spec = m.get("specialisation")
    if spec:
        dist = np.array(spec["dist_GLE"], dtype=np.float64)  # (G, L, E)
        G = dist.shape[0]
        fig, axes = plt.subplots(2, 1, figsize=(min(16, 4 + L * E * 0.01), 2.2 + 0.3 * G + 2.5),
                                 gridspec_kw={"height_ratios": [max(1.0, 0.3 * G), 1.6]})
        im = axes[0].imshow(dist.reshape(G, L * E) * E, aspect="auto", cmap="magma", interpolation="nearest",
                            vmax=max(2.0, float(np.nanpercentile(dist * E, 99))))
        for layer in range(1, L):
            axes[0].axvline(layer * E - 0.5, color="w", lw=0.5)
        axes[0].set_yticks(range(G), spec["domains"])
        axes[0].set(xlabel="layer x expert (white lines separate layers)",
                    title="Domain specialisation: share of the domain's assignments x E (1 = uniform)")
        fig.colorbar(im, ax=axes[0], label="share x E")
        axes[1].plot(layers, _arr(spec["mean_pairwise_js_L"]), "o-")
        axes[1].axhline(math.log(2), ls=":", c="gray", label="ln 2 (disjoint experts)")
        axes[1].set(xlabel="layer", ylabel="JS divergence (nats)", title="Mean pairwise divergence between domains")
        axes[1].xaxis.set_major_locator(_integer_ticks())
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
        fig.tight_layout()
        plots["specialisation"] = _png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, scope, title in [(axes[0], "per_layer", "One cache of C experts per layer"),
                             (axes[1], "whole_model", "One whole-model cache of L x C experts (same memory)")]:
        c = m["cache"][scope]
        x = np.array(c["C_over_k"], dtype=np.float64)
        for label, v in c["policies"].items():
            y = _arr(v["cold"])
            if label in BOUNDS:
                ax.plot(x, y, "k--" if label == "set_min" else "k:", lw=2.2, marker=".",
                        label=BOUND_LABELS[label])
            else:
                ax.plot(x, y, marker="o", ms=3, label=label)
        ax.set(xlabel="cache size per layer C / k", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("hit rate (cold cache)")
    plots["cache"] = _png(fig)

    ns = np.array(m["srp"]["n"], dtype=np.float64)
    val = _arr([m["srp"]["model"][str(int(n))]["value"] for n in ns])
    # Every n longer than every sequence (a one-token trace): no window, no plot; the page says so.
    if not np.isnan(val).all():
        fig, ax = plt.subplots(figsize=(7, 3.8))
        lo = _arr([m["srp"]["model"][str(int(n))]["lo"] for n in ns])
        hi = _arr([m["srp"]["model"][str(int(n))]["hi"] for n in ns])
        ax.errorbar(ns, val, yerr=[np.nan_to_num(val - lo), np.nan_to_num(hi - val)], fmt="o-", capsize=4,
                    label="whole model (95% bootstrap interval)")
        per_layer = np.array([_arr(m["srp"]["layer"][str(int(n))]["value_L"]) for n in ns])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # n longer than every sequence: all-nan column
            ax.fill_between(ns, np.nanmin(per_layer, axis=1), np.nanmax(per_layer, axis=1), alpha=0.2,
                            label="range over layers")
        ax.axhline(m["srp"]["random_baseline"], ls=":", c="gray", label="random routing 2k/(E+k)")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="segment length n (tokens)", ylabel="SRP(n)", title="Segment routing best performance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots["srp"] = _png(fig)

    aff = m.get("affinity")
    if aff:
        A = np.array(aff["A_JEE"], dtype=np.float64)
        pairs = sorted({0, A.shape[0] // 2, A.shape[0] - 1})
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.9), squeeze=False)
        for ax, j in zip(axes[0], pairs, strict=True):
            im = ax.imshow(A[j], cmap="viridis", interpolation="nearest", vmin=0)
            ax.set(xlabel=f"expert at layer {j + 1}", ylabel=f"expert at layer {j}",
                   title=f"P(next | current), layers {j}->{j + 1}")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        plots["affinity"] = _png(fig)

    pf = m["prefetch"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for kind, style in (("gate", "o-"), ("affinity", "s--")):
        rec = pf.get(kind) or {}
        for d, r in sorted(rec.items(), key=lambda kv: int(kv[0])):
            ax.plot(layers, _arr(r), style, ms=4, label=f"{kind}, {d} layer{'s' if int(d) > 1 else ''} ahead")
    ax.axhline(pf["random_baseline"], ls=":", c="gray", label="random k/E")
    ax.set(xlabel="target layer", ylabel="recall", title="Prefetch recall of the experts a layer executes",
           ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    plots["prefetch"] = _png(fig)
    return plots

