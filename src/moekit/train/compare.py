"""`moekit compare`: train several router configurations on equal terms and tabulate them.

Every run uses the same TrainConfig (steps, batch, seed, so the same data order: batches are a
function of (seed, step)) except the aux-loss coefficients, which belong to each router family's
recipe (e.g. SMoE-Dropout trains with none), and is evaluated on the same validation windows. The table reports
validation loss and bits per byte overall and per domain, average activated experts per token
(overall, per layer, per domain), parameters, active parameters and training tokens/s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.data import DOMAINS
from moekit.models import LMConfig
from moekit.train import checkpoint as ckpt
from moekit.train.trainer import TrainConfig, train


def _mean_tokens_per_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in rows[len(rows) // 10:]]  # skip the first 10%: warm-up allocations
    return sum(rates) / max(len(rates), 1)


def _measured_active(model_cfg: LMConfig, experts_per_token_L: list[float]) -> int:
    """Active parameters per token with the experts per token measured on validation (dynamic routers'
    `active_params` counts their worst case)."""
    moe = model_cfg.moe
    unused = sum((moe.num_experts - k) * moe._expert_params() for k in experts_per_token_L)
    return int(round(model_cfg.num_params() - unused))


def compare(variants: dict[str, tuple[LMConfig, TrainConfig]], out_dir: str | Path, progress: bool = True,
            log=print) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Aux-loss coefficients are part of each router family's recipe (presets.LOSS_RECIPES); all else is equal.
    trains = {name: {k: v for k, v in t.to_dict().items() if not k.endswith("_coef")}
              for name, (_, t) in variants.items()}
    reference = next(iter(trains.values()))
    for name, t in trains.items():
        if t != reference:
            diff = sorted(k for k in t if t[k] != reference[k])
            raise ValueError(f"compare: variant {name!r} trains differently ({diff}); equal training is the point")
    rows = {}
    for name, (model_cfg, train_cfg) in variants.items():
        log(f"== {name}")
        run_dir = out_dir / name
        result = train(model_cfg, train_cfg, run_dir, resume=(run_dir / ckpt.CHECKPOINT_DIR).exists(),
                       progress=progress, log=log)
        rows[name] = {
            "router": f"{model_cfg.moe.router.kind}({model_cfg.moe.router.describe()})",
            "params": result["params"], "active_params": result["active_params"],
            "active_params_measured": _measured_active(model_cfg, result["experts_per_token_by_layer"]),
            "val_loss": result["loss"], "val_bpb": result["bpb"],
            "bpb_by_domain": {d: v["bpb"] for d, v in result["per_domain"].items()},
            "experts_per_token": result["experts_per_token"],
            "experts_per_token_by_layer": result["experts_per_token_by_layer"],
            "experts_per_token_by_domain": {d: v["experts_per_token"] for d, v in result["per_domain"].items()},
            "tokens_per_s": _mean_tokens_per_s(run_dir),
        }
    report = {"train": reference, "unigram_bpb": result["unigram_bpb"], "runs": rows}
    ckpt.atomic_write_text(out_dir / "compare.json", json.dumps(report, indent=2))
    md = to_markdown(report)
    ckpt.atomic_write_text(out_dir / "compare.md", md)
    log(md)
    return report


def to_markdown(report: dict[str, Any]) -> str:
    rows = report["runs"]
    domains = [d for d in DOMAINS if d in next(iter(rows.values()))["bpb_by_domain"]]
    t = report["train"]
    lines = [f"Training: {t['steps']} steps x {t['micro_batch'] * t['grad_accum'] * t['seq_len']} tokens, "
             f"seed {t['seed']}, tokenizer {t['tokenizer']}. Unigram baseline {report['unigram_bpb']:.3f} bits/byte.",
             "",
             "| run | router | params | active (measured) | val loss | val bpb | " + " | ".join(f"bpb {d}" for d in domains)
             + " | experts/token | by layer | " + " | ".join(f"k {d}" for d in domains) + " | tokens/s |",
             "|" + "---|" * (8 + 2 * len(domains))]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['router']} | {r['params']:,} | {r['active_params_measured']:,} | {r['val_loss']:.4f} | "
            f"{r['val_bpb']:.4f} | " + " | ".join(f"{r['bpb_by_domain'][d]:.3f}" for d in domains)
            + f" | {r['experts_per_token']:.3f} | " + " / ".join(f"{x:.2f}" for x in r["experts_per_token_by_layer"])
            + " | " + " | ".join(f"{r['experts_per_token_by_domain'][d]:.2f}" for d in domains)
            + f" | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"
