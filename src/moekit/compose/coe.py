"""Composition of Experts (CoE, arXiv 2412.01868): a model-level router sends each request to one expert
model, in two stages as the paper's router does.

  1. category router   a text classifier trained on labelled examples: request -> category
                       (`CategoryRouter`; with `min_confidence`, a request whose top probability is
                       lower goes to the `fallback` expert, the paper's uncertainty option)
  2. category->expert  each category's expert is the one with the lowest bits per byte on that
                       category's labelled examples (the paper picks by win rate on each category's
                       data; for language models the measure is the likelihood)
  3. run               the requests of a batch are grouped by chosen expert and each expert model runs
                       once on its group (scoring: one forward over the group's windows; generation:
                       one forward per decoding step over the group)

Experts are moekit runs (`moekit train --out RUN`), optionally with adapters on top (a LoRA variant of
one base: `ExpertSpec(name, run, adapter)`), loaded on first use and kept.

Legend: N requests, W windows, P positions of a window or sequence, B sequences of a generation
group, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.adapters import load_adapters, logits_of
from moekit.compose.router import CategoryRouter
from moekit.errors import DataError, UsageError
from moekit.train.evaluate import token_bytes
from moekit.utils.io import atomic_dir

KIND = "compose"
CONFIG_NAME = "compose.json"
ROUTER_NAME = "router.safetensors"
VERSION = 1


@dataclass
class ExpertSpec:
    """An expert model: a moekit run directory, and optionally an adapter directory to load on top."""

    name: str
    run: str
    adapter: str | None = None


@dataclass
class Route:
    category: str  # the category router's (or the oracle's) category
    expert: str
    confidence: float  # the router's probability of `category` (1.0 for fixed and oracle routes)


def load_expert(spec: ExpertSpec):
    """(model in eval mode, tokenizer) of an expert spec."""
    from moekit.train import load_trained

    model, _, tokenizer = load_trained(spec.run)
    if spec.adapter is not None:
        load_adapters(model, spec.adapter)
    return model.eval(), tokenizer


def _limit(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "max_seq_len", 1 << 30)


@torch.no_grad()
def score_batch(model: nn.Module, tokenizer, texts: list[str], seq_len: int) -> list[tuple[float, int, int]]:
    """(nll in nats, UTF-8 bytes predicted, tokens predicted) of each text under `model`, from ONE forward
    over all texts' windows: each text's tokens cut into windows of seq_len + 1 with stride seq_len
    (every token but the first predicted once, as moekit's evaluate does), right-padded to one (W, P)
    batch. A text of fewer than 2 tokens scores (0, 0, 0)."""
    seq_len = min(seq_len, _limit(model))
    nbytes_V = torch.from_numpy(token_bytes(tokenizer))
    windows, owner = [], []
    for r, text in enumerate(texts):
        ids = tokenizer.encode(text)
        for start in range(0, max(len(ids) - 1, 0), seq_len):
            windows.append(ids[start:start + seq_len + 1])
            owner.append(r)
    out = [(0.0, 0, 0) for _ in texts]
    if not windows:
        return out
    device = next(model.parameters()).device
    P = max(len(w) for w in windows)
    ids_WP = torch.full((len(windows), P), tokenizer.pad_id, dtype=torch.long)
    mask_WP = torch.zeros(len(windows), P - 1, dtype=torch.bool)
    for i, w in enumerate(windows):
        ids_WP[i, :len(w)] = torch.tensor(w)
        mask_WP[i, :len(w) - 1] = True
    logits_WPV = logits_of(model, ids_WP[:, :-1].to(device)).float().cpu()
    target_WP = ids_WP[:, 1:]
    nll_WP = F.cross_entropy(logits_WPV.flatten(0, 1), target_WP.flatten(), reduction="none").view_as(target_WP)
    nll_W = (nll_WP * mask_WP).sum(1)
    bytes_W = (nbytes_V[target_WP] * mask_WP).sum(1)
    tokens_W = mask_WP.sum(1)
    acc = defaultdict(lambda: [0.0, 0, 0])
    for i, r in enumerate(owner):
        acc[r][0] += float(nll_W[i])
        acc[r][1] += int(bytes_W[i])
        acc[r][2] += int(tokens_W[i])
    return [tuple(acc[r]) if r in acc else (0.0, 0, 0) for r in range(len(texts))]


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of every prompt, with ONE forward per decoding step over the whole group:
    sequences are right-padded and each reads the logits at its own last position (causal attention,
    so padding after a sequence never reaches it). A prompt longer than the model's window keeps its
    last tokens; an empty prompt starts from BOS; a sequence stops at EOS."""
    limit = _limit(model)
    if max_new_tokens < 1 or max_new_tokens >= limit:
        raise UsageError(f"max_new_tokens={max_new_tokens} is invalid; allowed: an integer in [1, {limit - 1}]")
    seqs = [(tokenizer.encode(p) or [tokenizer.bos_id])[-(limit - max_new_tokens):] for p in prompts]
    if not seqs:
        return []
    device = next(model.parameters()).device
    B = len(seqs)
    lengths_B = torch.tensor([len(s) for s in seqs])
    prompt_B = lengths_B.clone()
    ids_BP = torch.full((B, int(lengths_B.max()) + max_new_tokens), tokenizer.pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids_BP[b, :len(s)] = torch.tensor(s)
    done_B = torch.zeros(B, dtype=torch.bool)
    rows_B = torch.arange(B)
    for _ in range(max_new_tokens):
        logits_BPV = logits_of(model, ids_BP[:, :int(lengths_B.max())].to(device)).cpu()
        next_B = logits_BPV[rows_B, lengths_B - 1].argmax(-1)
        live_B = ~done_B
        ids_BP[rows_B[live_B], lengths_B[live_B]] = next_B[live_B]
        lengths_B = lengths_B + live_B.long()
        done_B |= live_B & (next_B == tokenizer.eos_id)
        if bool(done_B.all()):
            break
    return [tokenizer.decode([t for t in ids_BP[b, prompt_B[b]:lengths_B[b]].tolist() if t != tokenizer.eos_id])
            for b in range(B)]


class Composition:
    """Experts, the category router, the category -> expert mapping, and the batched runner.

    `models`: already loaded (model, tokenizer) per expert name, instead of loading specs (tests, or
    models a caller holds)."""

    def __init__(self, experts: list[ExpertSpec], router: CategoryRouter, mapping: dict[str, str],
                 fallback: str | None = None, min_confidence: float = 0.0,
                 models: dict[str, tuple[nn.Module, object]] | None = None, mapping_bpb: dict | None = None):
        names = [e.name for e in experts]
        if len(set(names)) != len(names) or not names:
            raise UsageError(f"Composition: expert names must be distinct and at least one, got {names}")
        missing = [c for c in router.categories if mapping.get(c) not in names]
        if missing:
            raise UsageError(f"Composition: category {missing[0]!r} maps to {mapping.get(missing[0])!r}, not one of "
                             f"the experts {names}")
        if fallback is not None and fallback not in names:
            raise UsageError(f"Composition: fallback {fallback!r} is not one of the experts {names}")
        if not 0.0 <= min_confidence <= 1.0:
            raise UsageError(f"Composition: min_confidence={min_confidence} is invalid; allowed: a number in [0, 1]")
        self.experts = {e.name: e for e in experts}
        self.router, self.mapping = router, dict(mapping)
        self.fallback, self.min_confidence = fallback, min_confidence
        self.mapping_bpb = mapping_bpb or {}
        self._models: dict[str, tuple[nn.Module, object]] = dict(models or {})

    @property
    def categories(self) -> list[str]:
        return self.router.categories

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = load_expert(self.experts[name])
        return self._models[name]

    # ------------------------------------------------------------------ routing
    def route(self, texts: list[str]) -> list[Route]:
        """Stage 1 (category router) then stage 2 (mapping), with the low-confidence fallback."""
        routes = []
        for p_C in self.router.predict_proba(texts):
            c = int(p_C.argmax())
            category, confidence = self.categories[c], float(p_C[c])
            expert = self.mapping[category]
            if self.fallback is not None and confidence < self.min_confidence:
                expert = self.fallback
            routes.append(Route(category, expert, confidence))
        return routes

    def oracle(self, categories: list[str]) -> list[Route]:
        """Routes from the true categories (the router's upper bound)."""
        return [Route(c, self.mapping[c], 1.0) for c in categories]

    def fixed(self, expert: str, n: int) -> list[Route]:
        return [Route("", expert, 1.0) for _ in range(n)]

    # ------------------------------------------------------------------ running
    def _groups(self, routes: list[Route]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(routes):
            if r.expert not in self.experts:
                raise UsageError(f"route {i}: {r.expert!r} is not one of the experts {sorted(self.experts)}")
            groups[r.expert].append(i)
        return groups

    def score(self, texts: list[str], routes: list[Route], seq_len: int = 128) -> list[tuple[float, int, int]]:
        """(nll nats, bytes, tokens) per request; each chosen expert runs once (one forward) per call."""
        out: list = [None] * len(texts)
        for expert, rows in self._groups(routes).items():
            model, tokenizer = self.model(expert)
            for i, s in zip(rows, score_batch(model, tokenizer, [texts[i] for i in rows], seq_len), strict=True):
                out[i] = s
        return out

    def generate(self, prompts: list[str], routes: list[Route], max_new_tokens: int = 64) -> list[str]:
        out: list = [None] * len(prompts)
        for expert, rows in self._groups(routes).items():
            model, tokenizer = self.model(expert)
            for i, text in zip(rows, generate_batch(model, tokenizer, [prompts[i] for i in rows], max_new_tokens),
                               strict=True):
                out[i] = text
        return out

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        """DIR/compose.json (experts, categories, mapping, fallback) and DIR/router.safetensors, written
        whole or not at all; DIR must be absent, empty or an earlier composition."""
        directory = Path(directory)
        config = {"type": "Composition", "version": VERSION, "experts": [asdict(e) for e in self.experts.values()],
                  "categories": self.categories, "mapping": self.mapping, "fallback": self.fallback,
                  "min_confidence": self.min_confidence, "mapping_bpb": self.mapping_bpb,
                  "router": {"num_features": self.router.num_features, "max_bytes": self.router.max_bytes}}
        tensors = {k: v.detach().contiguous() for k, v in self.router.state_dict().items()}
        with atomic_dir(directory, KIND, "moekit compose") as tmp:  # whole or not at all
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            save_file(tensors, str(tmp / ROUTER_NAME))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Composition:
        directory = Path(directory)
        path = directory / CONFIG_NAME
        if not path.is_file():
            raise UsageError(f"{directory} is not a composition (no {CONFIG_NAME}); expected the --out directory of "
                             "`moekit compose build`")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("type") != "Composition" or d.get("version", 0) > VERSION:
                raise ValueError(f"type {d.get('type')!r}, version {d.get('version')!r}")
            router = CategoryRouter(d["categories"], **d["router"])
            router.load_state_dict(load_file(str(directory / ROUTER_NAME)))
            experts = [ExpertSpec(**e) for e in d["experts"]]
        except Exception as e:  # json, a missing key, or safetensors' own error type for a damaged file
            raise DataError(f"{directory} holds a damaged or unknown composition ({type(e).__name__}: {e})") from None
        return cls(experts, router, d["mapping"], d.get("fallback"), d.get("min_confidence", 0.0),
                   mapping_bpb=d.get("mapping_bpb"))


def bits_per_byte(scores: list[tuple[float, int, int]]) -> float:
    nll = sum(s[0] for s in scores)
    nbytes = sum(s[1] for s in scores)
    return nll / math.log(2) / max(nbytes, 1)


def build_composition(experts: list[ExpertSpec], texts: list[str], categories: list[str],
                      mapping_per_category: int = 8, router_steps: int = 300, seq_len: int = 128,
                      fallback: str | None = None, min_confidence: float = 0.0, seed: int = 0,
                      models: dict | None = None, log=None) -> Composition:
    """Train the category router on the labelled (text, category) examples, then map each category to
    the expert with the lowest bits per byte on its first `mapping_per_category` examples."""
    if len(texts) != len(categories):
        raise UsageError(f"build_composition: {len(texts)} texts but {len(categories)} categories")
    names = list(dict.fromkeys(categories))
    router = CategoryRouter(names)
    losses = router.fit(texts, categories, steps=router_steps, seed=seed)
    if log is not None:
        log(f"category router: {len(names)} categories, {len(texts)} examples, loss {losses[0]:.3f} -> {losses[-1]:.4f}")
    comp = Composition(experts, router, {c: experts[0].name for c in names}, fallback, min_confidence, models)
    probe = {c: [t for t, k in zip(texts, categories, strict=True) if k == c][:mapping_per_category] for c in names}
    probe_texts = [t for c in names for t in probe[c]]
    table: dict[str, dict[str, float]] = {c: {} for c in names}
    for e in experts:
        scores = comp.score(probe_texts, comp.fixed(e.name, len(probe_texts)), seq_len)
        start = 0
        for c in names:
            table[c][e.name] = bits_per_byte(scores[start:start + len(probe[c])])
            start += len(probe[c])
    comp.mapping = {c: min(table[c], key=table[c].get) for c in names}
    comp.mapping_bpb = {c: {e: round(v, 4) for e, v in row.items()} for c, row in table.items()}
    if log is not None:
        log("category -> expert: " + ", ".join(f"{c} -> {e}" for c, e in comp.mapping.items()))
    return comp


def evaluate_composition(comp: Composition, texts: list[str], categories: list[str], batch_size: int = 16,
                         seq_len: int = 128) -> dict:
    """Bits per byte per category of: the routed composition, oracle routing (true category -> its
    expert) and every single expert on every request; the category router's accuracy; how often each
    expert was chosen. Requests run in batches of `batch_size` (each chosen expert once per batch)."""
    strategies = ["routed", "oracle", *comp.experts]
    scores: dict[str, list] = {s: [] for s in strategies}
    chosen: list[Route] = []
    for start in range(0, len(texts), batch_size):
        batch, labels = texts[start:start + batch_size], categories[start:start + batch_size]
        routes = comp.route(batch)
        chosen += routes
        scores["routed"] += comp.score(batch, routes, seq_len)
        scores["oracle"] += comp.score(batch, comp.oracle(labels), seq_len)
        for e in comp.experts:
            scores[e] += comp.score(batch, comp.fixed(e, len(batch)), seq_len)
    per_category = {}
    for c in dict.fromkeys(categories):
        rows = [i for i, k in enumerate(categories) if k == c]
        per_category[c] = {s: round(bits_per_byte([scores[s][i] for i in rows]), 4) for s in strategies}
        per_category[c]["router_accuracy"] = round(float(np.mean([chosen[i].category == c for i in rows])), 4)
        per_category[c]["requests"] = len(rows)
        per_category[c]["chosen"] = {e: n for e in comp.experts if (n := sum(chosen[i].expert == e for i in rows))}
    return {"router_accuracy": round(float(np.mean([r.category == c for r, c in zip(chosen, categories,
                                                                                     strict=True)])), 4),
            "overall": {s: round(bits_per_byte(scores[s]), 4) for s in strategies},
            "per_category": per_category, "mapping": comp.mapping, "requests": len(texts)}


def corpus_examples(split: str, per_category: int | None) -> tuple[list[str], list[str]]:
    """(texts, categories) of the embedded corpus's `split`, the domain as the category; at most
    `per_category` samples per domain (spread over the train split, the first ones otherwise)."""
    from moekit.data import DOMAINS, load_corpus


    texts, categories = [], []
    for domain in DOMAINS:
        samples = load_corpus(split, domain)
        if per_category is not None and split == "train":
            step = max(1, len(samples) // per_category)  # spread over the domain, not its first pages
            samples = samples[::step]
        samples = samples[:per_category] if per_category is not None else samples
        texts += [s.text for s in samples]
        categories += [domain] * len(samples)
    return texts, categories
