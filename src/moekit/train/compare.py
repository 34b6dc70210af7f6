"""`moekit compare`: train several router configurations on equal terms and tabulate them.

Every run uses the same TrainConfig (steps, batch, seed, so the same data order: batches are a
function of (seed, step)) except the aux-loss coefficients, which belong to each router family's
recipe (e.g. SMoE-Dropout trains with none), and is evaluated on the same validation windows. The table reports
validation loss and bits per byte overall and per domain, average activated experts per token
(overall, per layer, per domain), parameters, measured active parameters and training tokens/s.

Sweeps and seeds (`moekit.cli.compare.sweep_variants`, `moekit compare --sweep router.p=0.2,0.3 --seeds 3`): each
preset runs once per value of every swept field it has (a cartesian product over several sweeps) and
once per seed (seed, seed + 1, ...: initialisation and data order both change). Runs of one setting
form a group; compare.json's `groups` gives each group's mean and sample standard deviation of
validation bits per byte and experts per token, and whether it lies on the Pareto front (no other
group has lower-or-equal bits per byte with lower-or-equal experts, one of them strictly); with
two or more groups, pareto.png plots them with their seed spread.

The output directory is marked as a moekit compare directory and locked while it is written. Into
an existing one, a run is resumed (or, finished, only re-evaluated) only when its saved configuration
equals the requested one; otherwise compare refuses before training anything, so results are never
labelled with settings they were not trained with.
"""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path
from typing import Any

from moekit.data import DOMAINS
from moekit.errors import UsageError
from moekit.models import LMConfig
from moekit.train import checkpoint as ckpt
from moekit.train.evaluate import UNIGRAM_NOTE, evaluate
from moekit.train.rundir import locked_dir
from moekit.train.trainer import (
    TrainConfig,
    config_differences,
    load_run_config,
    read_metrics,
    resolve_configs,
    resolved_config,
    train,
)
from moekit.utils.io import atomic_write_bytes, atomic_write_text


def _mean_tokens_per_s(run_dir: Path) -> float:
    rows = read_metrics(run_dir / "metrics.jsonl")
    rates = [r["tokens_per_s"] for r in rows[len(rows) // 10:]]  # skip the first 10%: warm-up allocations
    return sum(rates) / max(len(rates), 1)


def _check_saved_runs(variants: dict[str, tuple[LMConfig, TrainConfig]], out_dir: Path) -> None:
    """Refuse, before training anything, a saved run whose configuration is not the requested one."""
    for name, (model_cfg, train_cfg) in variants.items():
        run_dir = out_dir / name
        if not (run_dir / "config.json").is_file() and not ckpt.has_checkpoint(run_dir):
            continue
        saved = resolved_config(*resolve_configs(*load_run_config(run_dir)))
        differ = config_differences(saved, resolved_config(*resolve_configs(model_cfg, train_cfg)))
        if differ:
            raise UsageError(f"compare: {run_dir} holds a run trained with other settings ({'; '.join(differ)}); "
                             "choose another --out to compare with these settings")


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def summarise_groups(rows: dict[str, dict], groups: dict[str, str]) -> dict[str, dict]:
    """Mean and sample std over each group's runs of val_bpb and experts_per_token, and the Pareto
    front of (experts per token, val bpb), both lower-is-better."""
    out: dict[str, dict] = {}
    for group in dict.fromkeys(groups[name] for name in rows):
        runs = [name for name in rows if groups[name] == group]
        out[group] = {"runs": runs,
                      "val_bpb": _spread([rows[r]["val_bpb"] for r in runs]),
                      "experts_per_token": _spread([rows[r]["experts_per_token"] for r in runs]),
                      "active_params": statistics.fmean(rows[r]["active_params"] for r in runs)}
    for g, v in out.items():
        b, k = v["val_bpb"]["mean"], v["experts_per_token"]["mean"]
        v["pareto"] = not any(o["val_bpb"]["mean"] <= b and o["experts_per_token"]["mean"] <= k
                              and (o["val_bpb"]["mean"] < b or o["experts_per_token"]["mean"] < k)
                              for h, o in out.items() if h != g)
    return out


def pareto_png(summary: dict[str, dict]) -> bytes:
    """A PNG of validation bits per byte against experts per token, one point per group with its
    seed spread (±1 sample std) as error bars, the Pareto front joined."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g, v in summary.items():
        ax.errorbar(v["experts_per_token"]["mean"], v["val_bpb"]["mean"], xerr=v["experts_per_token"]["std"] or 0,
                    yerr=v["val_bpb"]["std"] or 0, fmt="o" if v["pareto"] else "s", capsize=3, label=g)
    front = sorted((v["experts_per_token"]["mean"], v["val_bpb"]["mean"]) for v in summary.values() if v["pareto"])
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), "k--", lw=1, label="Pareto front")
    ax.set(xlabel="activated experts per token (validation)", ylabel="validation bits per byte",
           title="Quality against activated experts (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def compare(variants: dict[str, tuple[LMConfig, TrainConfig]], out_dir: str | Path, progress: bool = True,
            log=print, groups: dict[str, str] | None = None) -> dict[str, Any]:
    """Train (or resume) each variant in `out_dir/NAME` and write compare.json and compare.md (and
    pareto.png with two or more groups).

    groups: the setting each variant replicates (`moekit.cli.compare.sweep_variants`); default: each its own. Only aux-loss
    coefficients (each family's recipe) and the seed may differ between variants.
    Raises UsageError when the variants train differently otherwise or a saved run's settings differ
    from the requested ones, NotOwnedError when `out_dir` holds files moekit did not write, and
    DirectoryLockedError while another process writes it.
    """
    out_dir = Path(out_dir)
    groups = groups or {name: name for name in variants}
    # Aux-loss coefficients are part of each router family's recipe (presets.LOSS_RECIPES), the seed
    # is what replicates vary; all else is equal.
    trains = {name: {k: v for k, v in t.to_dict().items() if not k.endswith("_coef") and k != "seed"}
              for name, (_, t) in variants.items()}
    reference = next(iter(trains.values()))
    for name, t in trains.items():
        if t != reference:
            diff = sorted(k for k in t if t[k] != reference[k])
            raise UsageError(f"compare: variant {name!r} trains differently ({diff}); equal training is the point")
    with locked_dir(out_dir, "compare", "moekit compare"):
        _check_saved_runs(variants, out_dir)
        rows = {}
        for name, (model_cfg, train_cfg) in variants.items():
            log(f"== {name}")
            run_dir = out_dir / name
            resume = (run_dir / "config.json").is_file() or ckpt.has_checkpoint(run_dir)
            result = train(model_cfg, train_cfg, run_dir, resume=resume, progress=progress, log=log)
            rows[name] = _row(model_cfg, result, groups[name], train_cfg.seed, _mean_tokens_per_s(run_dir))
        report = _report(reference, rows, result["unigram_bpb"])
        md = _write_report(out_dir, report)
    log(md)
    return report


def _report(train: dict, rows: dict[str, dict], unigram_bpb: float, **extra) -> dict[str, Any]:
    return {"train": train, "seeds": sorted({r["seed"] for r in rows.values()}), "unigram_bpb": unigram_bpb,
            "runs": rows, "groups": summarise_groups(rows, {name: r["group"] for name, r in rows.items()}), **extra}


def _write_report(out_dir: Path, report: dict[str, Any]) -> str:
    if len(report["groups"]) > 1:
        atomic_write_bytes(out_dir / "pareto.png", pareto_png(report["groups"]))
    atomic_write_text(out_dir / "compare.json", json.dumps(report, indent=2))
    md = to_markdown(report)
    atomic_write_text(out_dir / "compare.md", md)
    return md


def merge(dirs: list[str | Path], out_dir: str | Path, log=print) -> dict[str, Any]:
    """Tabulate the runs of several finished compare directories as one compare: compare.json (with
    `merged_from`), compare.md and pareto.png in `out_dir`, groups and Pareto front over all runs.

    For a study trained in parts (e.g. one compare per setting, run side by side); nothing is trained
    or evaluated again: each run's row is its directory's compare.json row.
    Raises UsageError for a directory without compare.json, parts trained with different settings
    (steps, batch, tokenizer, ...: all but seeds and aux-loss coefficients) or a run name in two parts.
    """
    out_dir = Path(out_dir)
    reports = []
    for d in map(Path, dirs):
        if not (d / "compare.json").is_file():
            raise UsageError(f"compare --merge: {d} holds no compare.json; expected a finished moekit compare directory")
        reports.append((d, json.loads((d / "compare.json").read_text())))
    (first, reference), rows = reports[0], {}
    for d, rep in reports:
        if rep["train"] != reference["train"] or rep["unigram_bpb"] != reference["unigram_bpb"]:
            diff = sorted(k for k in {*rep["train"], *reference["train"]}
                          if rep["train"].get(k) != reference["train"].get(k)) or ["unigram_bpb"]
            raise UsageError(f"compare --merge: {d} was trained differently from {first} ({diff}); "
                             "only runs trained on equal terms are compared")
        for name, row in rep["runs"].items():
            if name in rows:
                raise UsageError(f"compare --merge: run {name!r} is in two of the directories; merge each run once")
            rows[name] = row
    report = _report(reference["train"], rows, reference["unigram_bpb"], merged_from=[str(d) for d, _ in reports])
    with locked_dir(out_dir, "compare", "moekit compare"):
        md = _write_report(out_dir, report)
    log(md)
    return report


def _row(model_cfg: LMConfig, result: dict[str, Any], group: str, seed: int, tokens_per_s: float | None) -> dict:
    """One run's compare.json row from its validation result (`moekit.train.evaluate` plus parameter counts)."""
    return {
        "group": group, "seed": seed,
        "router": f"{model_cfg.moe.router.kind}({model_cfg.moe.router.describe()})",
        "params": result["params"], "active_params": result["active_params"],
        "active_params_config": result["active_params_config"],
        "val_loss": result["loss"], "val_bpb": result["bpb"],
        "bpb_by_domain": {d: v["bpb"] for d, v in result["per_domain"].items()},
        "experts_per_token": result["experts_per_token"],
        "experts_per_token_by_layer": result["experts_per_token_by_layer"],
        "experts_per_token_by_domain": {d: v["experts_per_token"] for d, v in result["per_domain"].items()},
        "zero_compute_per_token_by_domain": {d: v.get("zero_compute_per_token_by_layer")
                                             for d, v in result["per_domain"].items()},
        "tokens_per_s": tokens_per_s,
    }


def to_markdown(report: dict[str, Any]) -> str:
    rows = report["runs"]
    domains = [d for d in DOMAINS if d in next(iter(rows.values()))["bpb_by_domain"]]
    t = report["train"]
    header = ["run", "router", "params", "active/token (measured)", "val loss", "val bpb",
              *(f"bpb {d}" for d in domains), "experts/token", "by layer", *(f"k {d}" for d in domains), "tokens/s"]
    seeds = report.get("seeds") or [t.get("seed", 0)]
    lines = [*(["Existing runs, evaluated on the first run's validation windows (nothing trained)."]
               if report.get("evaluated_only") else []),
             f"Training: {t['steps']} steps x {t['micro_batch'] * t['grad_accum'] * t['seq_len']} tokens, "
             f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, tokenizer {t['tokenizer']}. Unigram baseline {report['unigram_bpb']:.3f} bits/byte "
             f"({UNIGRAM_NOTE}).",
             "",
             "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for name, r in rows.items():
        cells = [name, r["router"], f"{r['params']:,}", f"{r['active_params']:,}", f"{r['val_loss']:.4f}",
                 f"{r['val_bpb']:.4f}", *(f"{r['bpb_by_domain'][d]:.3f}" for d in domains),
                 f"{r['experts_per_token']:.3f}", " / ".join(f"{x:.2f}" for x in r["experts_per_token_by_layer"]),
                 *(f"{r['experts_per_token_by_domain'][d]:.2f}" for d in domains),
                 "–" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    summary = report.get("groups") or {}
    if any(len(v["runs"]) > 1 for v in summary.values()):

        def pm(x: dict) -> str:
            return f"{x['mean']:.4f}" + ("" if x["std"] is None else f" ± {x['std']:.4f}")

        lines += ["", "Per setting, mean ± sample std over its seeds; Pareto: no other setting has lower-or-equal "
                  "bits per byte with lower-or-equal experts per token (pareto.png plots them).", "",
                  "| setting | runs | val bpb | experts/token | Pareto |", "|---|---|---|---|---|"]
        for g, v in summary.items():
            lines.append(f"| {g} | {len(v['runs'])} | {pm(v['val_bpb'])} | {pm(v['experts_per_token'])} | "
                         f"{'yes' if v['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: dict[str, str | Path], out_dir: str | Path, log=print) -> dict[str, Any]:
    """Evaluate existing runs (trained, or compressed by `moekit compress`) on the same validation
    windows - the first run's `seq_len` and `eval_tokens` - and write compare.json and compare.md as
    `compare` does (nothing is trained). `tokens_per_s` is the run's training speed where it has a
    metrics.jsonl (a compressed run has none: None).

    run_dirs: {row name: run directory}. Raises UsageError for runs of different tokenizers or a
    directory that is not a run, CheckpointError for a damaged checkpoint, NotOwnedError when `out_dir`
    holds files moekit did not write, DirectoryLockedError while another process writes it.
    """
    from moekit.train.evaluate import measured_active_params
    from moekit.train.trainer import load_trained

    if not run_dirs:
        raise UsageError("compare: no runs given; expected --runs DIR1,DIR2,...")
    out_dir = Path(out_dir)
    rows: dict[str, dict] = {}
    reference: dict[str, Any] | None = None
    with locked_dir(out_dir, "compare", "moekit compare"):
        for name, run_dir in run_dirs.items():
            model, train_cfg, tok = load_trained(run_dir)
            t = train_cfg.to_dict()
            if reference is None:
                reference = t
            elif t["tokenizer"] != reference["tokenizer"]:
                raise UsageError(f"compare: run {run_dir} uses tokenizer {t['tokenizer']!r}, the first run "
                                 f"{reference['tokenizer']!r}; bits per byte are comparable, the same windows are not")
            log(f"== {name} ({run_dir})")
            # Every run on the first run's windows: the same validation tokens for all.
            result = evaluate(model, tok, reference["seq_len"], reference["eval_tokens"])
            model_cfg = model.cfg
            result["params"] = model_cfg.num_params()
            result["active_params"] = measured_active_params(model_cfg, result["experts_per_token_by_layer"])
            result["active_params_config"] = model_cfg.num_active_params()
            metrics = Path(run_dir) / "metrics.jsonl"
            rows[name] = _row(model_cfg, result, name, t["seed"],
                              _mean_tokens_per_s(Path(run_dir)) if metrics.is_file() else None)
            rows[name]["run_dir"] = str(run_dir)
        report = _report(reference, rows, result["unigram_bpb"], evaluated_only=True)
        md = _write_report(out_dir, report)
    log(md)
    return report
