"""Expert-memory budgets: parse a budget, and turn it into caches of expert slots (`plan_cache`).

Legend: L MoE layers, E experts per layer, C capacity of one cache in experts, K experts one token
needs at a layer (the router's k), S_e bytes per expert.

The budget (bytes, or a fraction of all expert bytes) buys slots of S_e bytes: one cache of
C = budget // S_e slots shared by all layers (keys layer * E + expert), or one cache per layer of
C = budget // (L * S_e) slots. A cache must hold the K experts one token needs at a layer at once;
a smaller budget is refused before anything is loaded or written. The static policy keeps
`hot_capacity` = C - K slots for its hot set and K for the experts it bypasses.

Experts of different sizes (mixed widths, moekit.compress): each cache holds `cache_nbytes` of experts,
each counted at its own size (budget // L per layer, or the whole budget when shared); C is then the
count of the *largest* experts that fit, which is what a step may hold at once (step size) and what the
static policy plans its hot set in. The totals (a "25%" budget) are the sum of every expert's own bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moekit.errors import UsageError

if TYPE_CHECKING:
    from moekit.offload.store import ExpertStore

__all__ = ["BUDGET_FORMS", "POLICIES", "SCOPES", "CachePlan", "ExpertShape", "format_bytes", "hot_keys_from_counts",
           "parse_budget", "plan_cache"]

POLICIES = ("lru", "lfu", "static", "predictive")
SCOPES = ("layer", "shared")

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
BUDGET_FORMS = "a percentage of all expert bytes ('25%') or a size with a unit ('512MB', '1.5GiB')"


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_budget(budget: str | int | float, total_nbytes: int) -> int:
    """An expert budget in bytes. The same rule on the command line (`--expert-budget`), in Python and
    in docs/offload.md:

      "25%"                         a percentage in (0, 100] of `total_nbytes` (the bytes of all experts)
      "512MB", "1.5GiB", "4096 B"   a size with a unit: B, kB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB
                                    (powers of 1024), any case
      "4096", 4096, 4096.0          a bare number >= 1: a whole number of bytes

    A bare number below 1 ("0.25", 0.25) is refused with a hint rather than read as a fraction of a
    byte (it usually means a fraction of the experts: write "25%"); so are non-finite values
    ("1e999"), fractions of a byte, zero, negative and malformed budgets.
    Raises UsageError (a ValueError) naming the budget; TypeError for another type.
    """
    what = f"expert budget {budget!r}"
    if isinstance(budget, bool):
        raise UsageError(f"{what}: expected {BUDGET_FORMS}")
    if not isinstance(budget, str | int | float):
        raise TypeError(f"{what}: expected str, int or float, got {type(budget).__name__}")
    if isinstance(budget, str) and budget.strip().endswith("%"):
        text = budget.strip()[:-1].strip()
        try:
            pct = float(text)
        except ValueError:
            raise UsageError(f"{what}: {text!r} is not a number; expected e.g. '25%'") from None
        if not math.isfinite(pct):
            raise UsageError(f"{what}: not a finite percentage; expected a percentage in (0, 100], e.g. '25%'")
        if not 0 < pct <= 100:
            raise UsageError(f"{what}: a percentage must lie in (0, 100]; {budget.strip()} "
                             f"{'leaves no room for any expert' if pct <= 0 else 'is more than all experts'}")
        nbytes = math.floor(pct / 100 * total_nbytes)
    else:
        if isinstance(budget, str):
            # "-nan" with or without a unit is malformed, as "nan" is: not a negative budget; "-0" (any unit) is zero
            rest = budget.strip()[1:].strip()
            zero = _BUDGET_RE.match(rest)
            if budget.strip().startswith("-") and zero is not None and float(zero.group(1)) == 0:
                budget = rest
            elif budget.strip().startswith("-") and not rest.lower().startswith("nan"):
                raise UsageError(f"{what} is negative; expected {BUDGET_FORMS}: how much expert weight may stay "
                                 "resident")
            m = _BUDGET_RE.match(budget)
            if m is None or (m.group(2) and m.group(2).lower() not in _UNITS):
                raise UsageError(f"{what}: expected {BUDGET_FORMS}, or a whole number of bytes ('1073741824')")
            value, unit = float(m.group(1)), m.group(2).lower()
        else:
            value, unit = budget, ""
        # an int too large for a float (10**400) is finite but overflows float(); a finite value times its unit
        # ("1e308GiB") can reach infinity: both are refused as sizes no machine has, not with an OverflowError
        if isinstance(value, int) and value.bit_length() > 1000:
            raise UsageError(f"{what} is not a finite size; expected {BUDGET_FORMS}")
        if not math.isfinite(value) or (unit and not math.isfinite(value * _UNITS[unit])):
            raise UsageError(f"{what} is not a finite size; expected {BUDGET_FORMS}")
        if unit:
            nbytes = math.floor(value * _UNITS[unit])
        elif value == 0:
            nbytes = 0
        elif value < 1:
            raise UsageError(f"{what}: a bare number is a count of bytes, and {value:g} is less than one byte; "
                             f"for a fraction of the experts write '{100 * value:g}%', for a size give a unit "
                             "('512MB')")
        elif value != int(value):
            raise UsageError(f"{what}: a bare number is a whole number of bytes; give a unit for a fractional "
                             "size ('1.5MB')")
        else:
            nbytes = int(value)
    if nbytes <= 0:
        raise UsageError(f"{what} is {nbytes} bytes; it must be positive (expected {BUDGET_FORMS})")
    return nbytes


@dataclass(frozen=True)
class ExpertShape:
    """What a budget is planned against: the store's shape, known from the model before it is written."""

    num_layers: int
    num_experts: int  # the largest layer's
    expert_nbytes: int  # the largest expert's
    experts_per_layer: tuple[int, ...] | None = None  # layers pruned to different counts; None: num_experts each
    expert_nbytes_LE: tuple[tuple[int, ...], ...] | None = None  # each expert's bytes (mixed widths); None: all equal

    @property
    def total_nbytes(self) -> int:
        if self.expert_nbytes_LE is not None:
            return sum(map(sum, self.expert_nbytes_LE))
        return sum(self.experts_per_layer or [self.num_experts] * self.num_layers) * self.expert_nbytes


@dataclass(frozen=True)
class CachePlan:
    """How a budget is spent: `num_caches` caches of `capacity` slots each."""

    budget_nbytes: int
    expert_nbytes: int
    total_nbytes: int
    scope: str
    policy: str
    num_caches: int
    capacity: int           # slots per cache
    step_size: int          # most experts one step holds: C (demand policies) or K (static)
    hot_capacity: int       # static: hot-set size per cache (C - K); else 0
    experts_per_token: int  # K
    cache_nbytes: int = 0   # expert bytes one cache may hold, each expert at its own size (0: C x expert_nbytes)

    def __post_init__(self):
        if not self.cache_nbytes:
            object.__setattr__(self, "cache_nbytes", self.capacity * self.expert_nbytes)

    @property
    def slots(self) -> int:
        return self.num_caches * self.capacity

    def describe(self) -> str:
        per = "per layer" if self.scope == "layer" else "shared by all layers"
        if self.cache_nbytes != self.capacity * self.expert_nbytes:  # experts of different sizes
            return (f"{self.policy} cache {per}: {format_bytes(self.cache_nbytes)} of experts, each at its own size "
                    f"(at least {self.capacity} of the largest, {format_bytes(self.expert_nbytes)}; budget "
                    f"{format_bytes(self.budget_nbytes)} = {self.budget_nbytes / self.total_nbytes:.1%} of "
                    f"{format_bytes(self.total_nbytes)})")
        return (f"{self.policy} cache {per}: {self.capacity} experts x {format_bytes(self.expert_nbytes)} "
                f"(budget {format_bytes(self.budget_nbytes)} = {self.budget_nbytes / self.total_nbytes:.1%} of "
                f"{format_bytes(self.total_nbytes)})")


def plan_cache(budget: str | int | float, store: ExpertStore | ExpertShape, policy: str = "lru",
               scope: str = "layer", experts_per_token: int = 2) -> CachePlan:
    """Check a budget and turn it into cache capacities (see the module doc). `store` may be the
    `ExpertShape` of a model whose store is not written yet: a budget is refused before any write."""
    if policy not in POLICIES:
        raise UsageError(f"cache policy {policy!r} is unknown; allowed: {POLICIES}")
    if scope not in SCOPES:
        raise UsageError(f"cache scope {scope!r} is unknown; allowed: {SCOPES}")
    L, E, S = store.num_layers, store.num_experts, store.expert_nbytes
    total = store.total_nbytes
    nbytes = parse_budget(budget, total)
    K = max(1, min(int(experts_per_token), E))
    sizes_LE = _sizes(store)
    if sizes_LE is not None and policy != "static":  # experts of different sizes: a cache holds bytes
        per_cache_max = max(map(sum, sizes_LE)) if scope == "layer" else total
        caches = L if scope == "layer" else 1
        cache_nbytes = min(nbytes // caches, per_cache_max)
        C = cache_nbytes // S  # the largest experts that fit at once: a step's size
    else:
        caches, per_cache_max = (L, E) if scope == "layer" else (1, total // S)
        C = min(nbytes // (caches * S), per_cache_max)  # slots beyond every expert would never be used
        cache_nbytes = C * S
    if C < K:
        need = caches * K * S
        where = "of each layer's cache" if scope == "layer" else "of the shared cache"
        raise UsageError(f"expert budget {budget!r} = {format_bytes(nbytes)} holds {C} expert(s) {where} "
                         f"({format_bytes(S)} each), but one token needs {K} experts of a layer resident at once; "
                         f"give at least {need} bytes ({100 * need / total:.2f}% of {format_bytes(total)})")
    static = policy == "static"
    return CachePlan(nbytes, S, total, scope, policy, caches, C, K if static else C, C - K if static else 0, K,
                     cache_nbytes)


def _sizes(store) -> list[list[int]] | None:
    """Each expert's bytes when they differ (mixed widths), else None."""
    sizes = getattr(store, "expert_nbytes_LE", None)
    if sizes is None or len({s for row in sizes for s in row}) <= 1:
        return None
    return [list(row) for row in sizes]


def hot_keys_from_counts(counts_LE: np.ndarray, plan: CachePlan) -> list[list[int]]:
    """The static hot set of each cache: the `hot_capacity` most used keys (ties to the lower key,
    as moekit.analysis.cache.simulate_static). Per-layer keys are expert ids; shared keys layer * E + e."""
    counts_LE = np.asarray(counts_LE)
    if counts_LE.ndim != 2:
        raise ValueError(f"hot-set counts must be (layers, experts), got shape {counts_LE.shape}")
    hot = plan.hot_capacity
    if plan.scope == "layer":
        return [np.argsort(-row, kind="stable")[:hot].tolist() for row in counts_LE]
    return [np.argsort(-counts_LE.reshape(-1), kind="stable")[:hot].tolist()]

