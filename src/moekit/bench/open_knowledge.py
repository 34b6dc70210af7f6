"""The open-knowledge recipe (ROCKET, arXiv 2408.15915) on the embedded corpus, with bits per byte.

  base      a small dense transformer trained by `moekit.train.train` on the train split of all six
            domains (LMConfig with n_dense = n_layers: no MoE layer)
  library   one LoRA per domain, each trained from the base on that domain's train split only
  task      a target domain is the "new task": its own LoRA is left out of the bank (leave-one-out),
            and only K examples of it are known (K samples of its train split, seeded)
  select    the paper's criterion on those K examples (moekit.adapters.selection): rank the bank by
            K-shot next-token accuracy and per-example perplexity, keep M candidates, take the most
            diverse N-tuple of them (smallest summed |cos| between the LoRAs' tensors)
  MoE       a MixLoRA of the N selected LoRAs (top-k routers on every adapted linear); only the
            routers train, on the K examples
  compare   bits per byte on the target's validation split (never used for training or choices) of:
            the base; every single LoRA of the bank (the K-shot criterion's first choice, and the
            held-out best, marked as an oracle); the uniform merge of the selected LoRAs and of the
            whole bank; the MoE of the selected LoRAs and the MoE of all bank LoRAs (same router
            training); and, as a reference outside the task's premise, the target's own LoRA

Which text is used for what: base and library LoRAs: train split (a library LoRA: its domain's
part only); K-shot examples (selection and router training): K samples of the target's train
split; every reported number: the target's validation split (every 20th sample, disjoint from
train). No setting was chosen by looking at validation numbers.

Prints JSON lines: {"bench": "open_knowledge", "target": ...} per target, then a summary line.
Runs and adapters are kept under --work (default runs/open-knowledge) and reused when present.

    python benchmarks/open_knowledge.py                  # the figure (docs/results/open-knowledge.md)
    python benchmarks/open_knowledge.py --quick          # tiny settings, a smoke test
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import moekit
import moekit.adapters as ad
from moekit.config import MoEConfig, RouterConfig
from moekit.data import DOMAINS, encode_samples, load_corpus
from moekit.models import LMConfig
from moekit.train import TrainConfig, evaluate, load_trained, train
from moekit.train.checkpoint import has_checkpoint

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def base_configs(quick: bool) -> tuple[LMConfig, TrainConfig]:
    """A dense 4-layer transformer (n_dense = n_layers; the MoE config is unused) and its training."""
    moe = MoEConfig(d_model=96, d_expert=64, num_experts=2, router=RouterConfig(kind="topk", k=1))
    model = LMConfig(d_model=96, n_layers=4, n_heads=4, max_seq_len=128, n_dense=4, d_ff_dense=384, moe=moe)
    cfg = TrainConfig(steps=300, micro_batch=8, seq_len=128, lr=3e-3, warmup_steps=30, checkpoint_every=100,
                      eval_tokens=4096)
    if quick:
        model = dataclasses.replace(model, d_model=32, n_layers=2, n_dense=2, d_ff_dense=64,
                                    moe=dataclasses.replace(moe, d_model=32))
        cfg = dataclasses.replace(cfg, steps=20, warmup_steps=2, checkpoint_every=20, eval_tokens=512)
    return model, cfg


def tokens_of(samples, tokenizer) -> np.ndarray:
    return encode_samples(samples, tokenizer)[0]


def bpb(model, tokenizer, domain: str, seq_len: int, tokens: int) -> float:
    return evaluate(model, tokenizer, seq_len, tokens, domains=[domain])["per_domain"][domain]["bpb"]


def with_lora(base, lora):
    model = copy.deepcopy(base)
    ad.add_adapters(model, lora[0])
    ad.load_adapter_state(model, lora[1])
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/open-knowledge", help="base run and LoRA library (reused when present)")
    p.add_argument("--targets", default=",".join(DOMAINS), help="target domains (comma-separated)")
    p.add_argument("--k-shot", type=int, default=16, help="K: examples of the target known to the recipe")
    p.add_argument("--candidates", type=int, default=4, help="M: candidates kept by performance & perplexity")
    p.add_argument("--experts", type=int, default=3, help="N: experts in the MoE")
    p.add_argument("--lora-steps", type=int, default=100)
    p.add_argument("--router-steps", type=int, default=40)
    p.add_argument("--eval-tokens", type=int, default=8192, help="validation tokens per target (at most)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two threads wait on each other)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.lora_steps, args.router_steps, args.eval_tokens, args.k_shot = 4, 3, 256, 4
    torch.manual_seed(args.seed)
    work = Path(args.work)
    started = time.time()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    # 1. base
    base_dir = work / "base"
    if not (base_dir.is_dir() and has_checkpoint(base_dir)):
        log(f"training the base into {base_dir}")
        train(*base_configs(args.quick), base_dir, progress=False, log=log)
    base, base_cfg, tokenizer = load_trained(base_dir)
    seq_len = 64 if not args.quick else 32
    lora_cfg = ad.LoRAConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    tune = ad.FinetuneConfig(steps=args.lora_steps, micro_batch=8, seq_len=seq_len, lr=2e-3, warmup_steps=10)

    # 2. library: one LoRA per domain (seeded by the domain's position, so their A's differ)
    library: dict[str, tuple[ad.LoRAConfig, dict]] = {}
    for i, domain in enumerate(DOMAINS):
        path = work / "library" / domain
        if not (path / "adapter_model.safetensors").is_file():
            log(f"training the {domain} LoRA ({args.lora_steps} steps)")
            model = copy.deepcopy(base)
            torch.manual_seed(1000 + i)
            ad.add_adapters(model, lora_cfg)
            ad.finetune(model, tokens_of(load_corpus("train", domain), tokenizer),
                        dataclasses.replace(tune, seed=i), log=log)
            ad.save_adapters(model, path)
        cfg, _ = ad.read_adapter_config(path)
        library[domain] = (cfg, ad.read_adapter_state(path))

    results = []
    mixture = ad.MixLoRAConfig(router=RouterConfig(kind="topk", k=2), load_balance_coef=0.01)
    router_tune = ad.FinetuneConfig(steps=args.router_steps, micro_batch=8, seq_len=seq_len, lr=5e-3, warmup_steps=5)
    for target in args.targets.split(","):
        t0 = time.time()
        train_samples = load_corpus("train", target)
        pick = np.random.default_rng([args.seed, DOMAINS.index(target)]).choice(len(train_samples), args.k_shot,
                                                                                 replace=False)
        kshot = [train_samples[j] for j in sorted(pick)]
        kshot_ids = [tokenizer.encode(s.text) + [tokenizer.eos_id] for s in kshot]
        kshot_tokens = tokens_of(kshot, tokenizer)
        bank = {d: lora for d, lora in library.items() if d != target}

        scores = ad.score_library(base, bank, kshot_ids, max_len=base.cfg.max_seq_len - 1)
        selection = ad.select_experts(bank, scores, args.candidates, args.experts)

        def measure(model, target=target):
            return bpb(model, tokenizer, target, seq_len, args.eval_tokens)

        row = {"bench": "open_knowledge", "target": target, "k_shot": args.k_shot, "bank": sorted(bank),
               "selected": selection.experts,
               "candidates": [dataclasses.asdict(c) | {"rank": c.rank} for c in selection.candidates],
               "tuples": [[list(g), round(s, 4)] for g, s in selection.tuples]}
        bpbs = {"base": measure(base)}
        singles = {d: measure(with_lora(base, lora)) for d, lora in bank.items()}
        bpbs.update({f"lora:{d}": v for d, v in singles.items()})
        bpbs["single_by_kshot"] = singles[scores[0].name]
        row["single_by_kshot"] = scores[0].name
        row["single_best_heldout"] = min(singles, key=singles.get)
        bpbs["single_best_heldout (oracle)"] = min(singles.values())
        bpbs["merge_selected"] = measure(with_lora(base, ad.merge_loras([bank[d] for d in selection.experts])))
        bpbs["merge_all"] = measure(with_lora(base, ad.merge_loras(list(bank.values()))))
        for name, members in (("moe_selected", selection.experts), ("moe_all", sorted(bank))):
            model = copy.deepcopy(base)
            torch.manual_seed(args.seed)
            ad.load_mixture(model, [bank[d] for d in members], mixture)
            losses = ad.finetune(model, kshot_tokens, router_tune)
            bpbs[name] = measure(model)
            row[f"{name}_router_loss"] = [round(losses[0], 4), round(losses[-1], 4)]
        bpbs["own_lora (reference)"] = measure(with_lora(base, library[target]))
        row["bpb"] = {k: round(v, 4) for k, v in bpbs.items()}
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        results.append(row)

    keys = ["base", "single_by_kshot", "merge_selected", "merge_all", "moe_selected", "moe_all"]
    summary = {"bench": "open_knowledge_summary", "targets": [r["target"] for r in results],
               "mean_bpb": {k: round(float(np.mean([r["bpb"][k] for r in results])), 4) for k in keys},
               "moe_selected_beats_base": sum(r["bpb"]["moe_selected"] < r["bpb"]["base"] for r in results),
               "moe_selected_beats_single_by_kshot": sum(r["bpb"]["moe_selected"] < r["bpb"]["single_by_kshot"]
                                                         for r in results),
               "moe_selected_beats_merge_selected": sum(r["bpb"]["moe_selected"] < r["bpb"]["merge_selected"]
                                                        for r in results),
               "moe_selected_beats_moe_all": sum(r["bpb"]["moe_selected"] < r["bpb"]["moe_all"] for r in results),
               "settings": {"k_shot": args.k_shot, "candidates": args.candidates, "experts": args.experts,
                            "lora": lora_cfg.to_dict(), "lora_steps": args.lora_steps,
                            "router_steps": args.router_steps, "router": mixture.router.to_dict(),
                            "eval_tokens": args.eval_tokens, "seq_len": seq_len,
                            "base": {"params": base.cfg.num_params(), "train_steps": base_cfg.steps}},
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "moekit": moekit.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
               "seconds": round(time.time() - started, 1)}
    print(json.dumps(summary), flush=True)
