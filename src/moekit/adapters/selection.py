"""Choosing experts for a new task from K examples: the model selection of "Leveraging Open Knowledge for
Advancing Task Expertise in Large Language Models" (ROCKET, arXiv 2408.15915; reference code
Yaphabates/Rocket, Model_Selection/).

  1. score     every LoRA of the bank on the K examples: K-shot performance (the paper's exact match;
               for text, the share of next tokens the model ranks first) and "reasoning perplexity"
               (compute_ppl.py: per example exp(mean token loss of its answer), averaged over the K)
  2. rank      by performance (higher first) and by perplexity (lower first); the sum of the two ranks
               orders the bank (ties: lower perplexity first); the first M are the candidates
  3. diversity among the C(M, N) N-tuples of candidates, the one whose members are least alike:
               group_diversity.py sums |cos(w_a, w_b)| over every pair of members and every adapter
               tensor (lora_A and lora_B of each module) and keeps the smallest sum (ties: better
               summed rank)

NOTE: the paper's figure names the last step "ranking by performance & perplexity & diversity"; its code
ranks the tuples of the pre-ranked candidates by the similarity sum alone, which is what this does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.adapters.config import LoRAConfig
from moekit.adapters.finetune import text_scores
from moekit.adapters.model import add_adapters, remove_adapters
from moekit.adapters.store import load_adapter_state
from moekit.errors import UsageError

Library = dict[str, tuple[LoRAConfig, dict[str, torch.Tensor]]]


@dataclass
class CandidateScore:
    name: str
    accuracy: float  # mean over the K examples of the share of next tokens ranked first
    ppl: float  # mean over the K examples of exp(mean token loss)
    rank_accuracy: int = 0
    rank_ppl: int = 0

    @property
    def rank(self) -> int:
        return self.rank_accuracy + self.rank_ppl


def score_library(model: nn.Module, library: Library, kshot_ids: list[list[int]], max_len: int) -> list[CandidateScore]:
    """Score every LoRA of `library` on the K examples (token ids); the model is left without adapters."""
    if not kshot_ids:
        raise UsageError("score_library: no K-shot examples")
    scores = []
    for name, (cfg, state) in library.items():
        add_adapters(model, cfg)
        try:
            load_adapter_state(model, state, f"LoRA {name!r}")
            per_text = text_scores(model, kshot_ids, max_len)
        finally:
            remove_adapters(model)
        scores.append(CandidateScore(name, sum(s["accuracy"] for s in per_text) / len(per_text),
                                     sum(s["ppl"] for s in per_text) / len(per_text)))
    return rank_candidates(scores)


def rank_candidates(scores: list[CandidateScore]) -> list[CandidateScore]:
    """Set each candidate's two ranks (1 = best; equal values share the better rank) and sort the list by
    summed rank, then perplexity."""
    for s in scores:
        s.rank_accuracy = 1 + sum(o.accuracy > s.accuracy for o in scores)
        s.rank_ppl = 1 + sum(o.ppl < s.ppl for o in scores)
    return sorted(scores, key=lambda s: (s.rank, s.ppl, s.name))


def similarity(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor]) -> float:
    """sum over tensors of |cos(a, b)| of the flattened tensors (group_diversity.py's `weight_sim`)."""
    if state_a.keys() != state_b.keys():
        raise UsageError("similarity: the two LoRAs adapt different modules")
    total = 0.0
    for key, a in state_a.items():
        total += abs(float(F.cosine_similarity(a.reshape(1, -1).float(), state_b[key].reshape(1, -1).float(), eps=1e-8)))
    return total


@dataclass
class Selection:
    experts: list[str]
    candidates: list[CandidateScore]
    tuples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)  # (members, similarity sum), best first


def select_experts(library: Library, scores: list[CandidateScore], num_candidates: int,
                   num_experts: int) -> Selection:
    """Steps 2-3: the M = num_candidates best-ranked LoRAs, then the N-tuple of them with the smallest
    summed pairwise similarity (the most diverse group)."""
    if not 1 <= num_experts <= num_candidates <= len(scores):
        raise UsageError(f"select_experts: need 1 <= num_experts ({num_experts}) <= num_candidates ({num_candidates}) "
                         f"<= the bank's size ({len(scores)})")
    candidates = rank_candidates(list(scores))[:num_candidates]
    rank = {c.name: c.rank for c in candidates}
    pair_sim: dict[tuple[str, str], float] = {}
    for a, b in itertools.combinations(sorted(rank), 2):
        pair_sim[a, b] = similarity(library[a][1], library[b][1])
    tuples = []
    for group in itertools.combinations([c.name for c in candidates], num_experts):
        sim = sum(pair_sim[tuple(sorted(pair))] for pair in itertools.combinations(group, 2))
        tuples.append((group, sim))
    tuples.sort(key=lambda t: (t[1], sum(rank[n] for n in t[0])))
    return Selection(list(tuples[0][0]), candidates, tuples)
