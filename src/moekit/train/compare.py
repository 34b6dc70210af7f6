"""`moekit compare`: train several router configurations on equal terms and tabulate them.

Every run uses the same TrainConfig (steps, batch, seed, so the same data order: batches are a
function of (seed, step)) except the aux-loss coefficients, which belong to each router family's
recipe (e.g. SMoE-Dropout trains with none), and is evaluated on the same validation windows. The table reports
validation loss and bits per byte overall and per domain, average activated experts per token
(overall, per layer, per domain), parameters, measured active parameters and training tokens/s.

The output directory is marked as a moekit compare directory and locked while it is written. Into
an existing one, a run is resumed (or, finished, only re-evaluated) only when its saved configuration
equals the requested one; otherwise compare refuses before training anything, so results are never
labelled with settings they were not trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.data import DOMAINS
from moekit.errors import UsageError
from moekit.models import LMConfig
from moekit.train import checkpoint as ckpt
from moekit.train.evaluate import UNIGRAM_NOTE
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
from moekit.utils.io import atomic_write_text


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


def compare(variants: dict[str, tuple[LMConfig, TrainConfig]], out_dir: str | Path, progress: bool = True,
            log=print) -> dict[str, Any]:
    """Train (or resume) each variant in `out_dir/NAME` and write compare.json and compare.md.

    Raises UsageError when the variants train differently or a saved run's settings differ from the
    requested ones, NotOwnedError when `out_dir` holds files moekit did not write, and
    DirectoryLockedError while another process writes it.
    """
    out_dir = Path(out_dir)
    # Aux-loss coefficients are part of each router family's recipe (presets.LOSS_RECIPES); all else is equal.
    trains = {name: {k: v for k, v in t.to_dict().items() if not k.endswith("_coef")}
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
            rows[name] = {
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
                "tokens_per_s": _mean_tokens_per_s(run_dir),
            }
        report = {"train": reference, "unigram_bpb": result["unigram_bpb"], "runs": rows}
        atomic_write_text(out_dir / "compare.json", json.dumps(report, indent=2))
        md = to_markdown(report)
        atomic_write_text(out_dir / "compare.md", md)
    log(md)
    return report


def to_markdown(report: dict[str, Any]) -> str:
    rows = report["runs"]
    domains = [d for d in DOMAINS if d in next(iter(rows.values()))["bpb_by_domain"]]
    t = report["train"]
    header = ["run", "router", "params", "active/token (measured)", "val loss", "val bpb",
              *(f"bpb {d}" for d in domains), "experts/token", "by layer", *(f"k {d}" for d in domains), "tokens/s"]
    lines = [f"Training: {t['steps']} steps x {t['micro_batch'] * t['grad_accum'] * t['seq_len']} tokens, "
             f"seed {t['seed']}, tokenizer {t['tokenizer']}. Unigram baseline {report['unigram_bpb']:.3f} bits/byte "
             f"({UNIGRAM_NOTE}).",
             "",
             "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for name, r in rows.items():
        cells = [name, r["router"], f"{r['params']:,}", f"{r['active_params']:,}", f"{r['val_loss']:.4f}",
                 f"{r['val_bpb']:.4f}", *(f"{r['bpb_by_domain'][d]:.3f}" for d in domains),
                 f"{r['experts_per_token']:.3f}", " / ".join(f"{x:.2f}" for x in r["experts_per_token_by_layer"]),
                 *(f"{r['experts_per_token_by_domain'][d]:.2f}" for d in domains), f"{r['tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
