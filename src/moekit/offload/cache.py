"""The expert cache policies over an `ExpertStore`: lru, lfu, static hot set and predictive prefetch.

Legend: L MoE layers, E experts per layer, C capacity of one cache in experts, K experts one token
needs at a layer (the router's k), S_e bytes per expert.

How a budget becomes caches of C slots: moekit.offload.budget (`CachePlan`). Slots are allocated on
first use and reused, so resident expert bytes = allocated slots * S_e <= budget, checked on every
allocation (peak reported). Experts of different sizes (mixed widths, moekit.compress): each slot is
its expert's own size and a cache holds `plan.cache_nbytes`: a miss evicts until the new expert fits
(freed slots of another size are dropped), so the bytes of the resident experts, each counted at its
own size, never exceed the budget; with equal sizes this is exactly the C-slot cache.

A cache serves *steps*: one step is a set of experts one MoE layer needs at once, requested in
ascending id order (`acquire`), released by `end_step`. The conventions are those of
moekit.analysis.cache, so that a recorded run can be re-simulated exactly:
  * a request hits iff its expert was resident (or its prefetch issued) before the request;
  * the step's experts are never evicted during the step (victims are other residents);
  * lru: evict the least recently used; lfu: the fewest uses over the whole run ("perfect" LFU),
    ties by least recent use; static: only hot-set experts are cached (filled on first use, never
    evicted), others are read into one of K transient slots and dropped at the step's end (so the
    hot set holds C - K); predictive: lru plus `prefetch`, which inserts predicted experts before
    their step as most recently used (an already resident one is only touched); when the step
    starts, predicted experts it does not request become the least recently used (evicted first).
A prefetched expert is *useful* if its target step requests it, *wasted* if that step does not
(or it is evicted before). Prefetch loads run on one background thread (moekit.offload.prefetch); a
request for an expert whose load is still running waits for it (a *late* prefetch, its wait is *stall*).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

# Budgets (budget.py) and the prefetch thread (prefetch.py) used to live here: their names stay importable.
from moekit.offload.budget import (
    POLICIES,
    SCOPES,
    CachePlan,
    ExpertShape,
    format_bytes,
    hot_keys_from_counts,
    parse_budget,
    plan_cache,
)
from moekit.offload.prefetch import PrefetchError, PrefetchWorker, _Job
from moekit.offload.store import ExpertStore

__all__ = ["CacheStats", "ExpertCache",
           # re-exported from budget.py and prefetch.py
           "POLICIES", "SCOPES", "CachePlan", "ExpertShape", "PrefetchError", "PrefetchWorker", "format_bytes",
           "hot_keys_from_counts", "parse_budget", "plan_cache"]


@dataclass
class CacheStats:
    """Counters of one phase (prefill or decode)."""

    requests: int = 0
    hits: int = 0
    demand_loads: int = 0
    prefetch_loads: int = 0
    useful_prefetches: int = 0
    wasted_prefetches: int = 0
    late_prefetches: int = 0
    stall_s: float = 0.0
    load_s: float = 0.0           # demand loads (written by the calling thread only)
    prefetch_load_s: float = 0.0  # prefetch loads (written by the worker thread only)
    loaded_nbytes: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Slot:
    """S_e bytes of expert memory on the cache's device, viewed as the expert's tensors; `job` is
    a background load still writing into it."""

    def __init__(self, nbytes: int, device: torch.device, layout):
        self.u8 = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.nbytes = nbytes
        self.weights = layout.views(self.u8)
        self.job: _Job | None = None

    def settle(self) -> float:
        """Wait for a pending load into this slot; returns the seconds waited."""
        if self.job is None:
            return 0.0
        t0 = time.perf_counter()
        job, self.job = self.job, None
        job.wait()
        return time.perf_counter() - t0


@dataclass
class _Entry:
    slot: _Slot
    last_use: int
    prefetch_for: int | None = None  # target layer of an unused prefetch


@dataclass
class _OneCache:
    capacity: int
    capacity_nbytes: int
    hot: frozenset[int] = frozenset()
    entries: dict[int, _Entry] = field(default_factory=dict)
    free: list[_Slot] = field(default_factory=list)
    allocated: int = 0
    allocated_nbytes: int = 0                           # slots held, free ones included
    occupied_nbytes: int = 0                            # slots of residents and transients
    uses: int = 0                                       # recency clock
    demoted: int = 0                                    # below every use: unused predictions
    counts: dict[int, int] = field(default_factory=dict)  # LFU: requests per key, whole run
    step: set[int] = field(default_factory=set)          # keys of the step in progress
    transient: list[_Slot] = field(default_factory=list)  # static: bypass slots of this step
    hit_log: list[bool] = field(default_factory=list)
    phase_log: list[str] = field(default_factory=list)


class ExpertCache:
    """Caches of expert slots over `store` as `plan` says (see the module doc).

    acquire(layer, experts) -> weights     a step: each expert's (gate_up | up, down) views
    prefetch(layer, experts)               predictive: insert predicted experts for `layer`'s next step
    end_step(layer)                        release the step (transients, wasted prefetches)
    """

    def __init__(self, store: ExpertStore, plan: CachePlan, *, hot_keys: Sequence[Sequence[int]] | None = None,
                 device: str | torch.device = "cpu"):
        self.store, self.plan = store, plan
        self.device = torch.device(device)
        self.E = store.num_experts
        if plan.policy == "static":
            if hot_keys is None:
                raise ValueError("the static policy needs a hot set (a routing trace or per-expert counts)")
            if len(hot_keys) != plan.num_caches or any(len(set(h)) > plan.hot_capacity for h in hot_keys):
                raise ValueError(f"hot set: expected {plan.num_caches} lists of at most {plan.hot_capacity} keys")
        self.caches = [_OneCache(plan.capacity, plan.cache_nbytes,
                                 frozenset(hot_keys[i]) if hot_keys is not None else frozenset())
                       for i in range(plan.num_caches)]
        self.phase = "prefill"
        self.stats = {"prefill": CacheStats(), "decode": CacheStats()}
        self.peak_resident_nbytes = 0
        self._resident_nbytes = 0
        self.worker: PrefetchWorker | None = PrefetchWorker() if plan.policy == "predictive" else None
        self._pinned: list[torch.Tensor] = []  # CUDA staging buffers (one per loading thread)
        self._copy_stream = torch.cuda.Stream() if self.device.type == "cuda" else None

    # -------------------------------------------------------------- bookkeeping

    def _cache(self, layer: int) -> tuple[_OneCache, int]:
        """The cache serving `layer` and the key offset of its experts."""
        if self.plan.scope == "layer":
            return self.caches[layer], 0
        return self.caches[0], layer * self.E

    @property
    def resident_nbytes(self) -> int:
        return self._resident_nbytes

    def _new_slot(self, c: _OneCache, layer: int, expert: int) -> _Slot:
        """A slot of expert (layer, expert)'s own size: a free one of that size, else a new one (free
        slots of other sizes are dropped first while the cache's bytes would not fit)."""
        nbytes, layout = self.store.expert_nbytes_LE[layer][expert], self.store.layout_of(layer, expert)
        c.occupied_nbytes += nbytes
        for i, slot in enumerate(c.free):
            if slot.nbytes == nbytes:
                slot = c.free.pop(i)
                slot.weights = layout.views(slot.u8)
                return slot
        while c.free and c.allocated_nbytes + nbytes > c.capacity_nbytes:
            dropped = c.free.pop(0)
            c.allocated -= 1
            c.allocated_nbytes -= dropped.nbytes
            self._resident_nbytes -= dropped.nbytes
        c.allocated += 1
        c.allocated_nbytes += nbytes
        self._resident_nbytes += nbytes
        # The budget invariant, checked on every allocation (never compiled out, unlike assert).
        if c.allocated_nbytes > c.capacity_nbytes or self.resident_nbytes > self.plan.budget_nbytes:
            raise RuntimeError(f"expert cache: {self.resident_nbytes} resident bytes would exceed the budget of "
                               f"{self.plan.budget_nbytes} ({c.allocated_nbytes} bytes in a cache of "
                               f"{c.capacity_nbytes})")
        self.peak_resident_nbytes = max(self.peak_resident_nbytes, self.resident_nbytes)
        return _Slot(nbytes, self.device, layout)

    def _victim(self, c: _OneCache, protected: set[int]) -> int | None:
        """The resident to evict: lowest priority among those not protected (None if all are)."""
        best, best_key = None, None
        lfu = self.plan.policy == "lfu"
        for key, ent in c.entries.items():
            if key in protected or key in c.hot:
                continue
            prio = (c.counts.get(key, 0), ent.last_use) if lfu else ent.last_use
            if best is None or prio < best:
                best, best_key = prio, key
        return best_key

    def _room(self, c: _OneCache, protected: set[int], layer: int, expert: int) -> _Slot | None:
        """A slot for (layer, expert), evicting residents until it fits (None if nothing may go)."""
        nbytes = self.store.expert_nbytes_LE[layer][expert]
        while c.occupied_nbytes + nbytes > c.capacity_nbytes:
            victim = self._victim(c, protected)
            if victim is None:
                return None
            ent = c.entries.pop(victim)
            if ent.prefetch_for is not None:
                self.stats[self.phase].wasted_prefetches += 1
            ent.slot.settle()  # never overwrite memory a running load still writes
            c.occupied_nbytes -= ent.slot.nbytes
            c.free.append(ent.slot)
        return self._new_slot(c, layer, expert)

    # -------------------------------------------------------------- loads

    def _load_now(self, layer: int, expert: int, slot: _Slot) -> None:
        t0 = time.perf_counter()
        self._read(layer, expert, slot, self._staging(0))
        st = self.stats[self.phase]
        st.load_s += time.perf_counter() - t0
        st.demand_loads += 1
        st.loaded_nbytes += slot.nbytes

    def _staging(self, i: int) -> torch.Tensor | None:
        if self.device.type != "cuda":
            return None
        while len(self._pinned) <= i:
            self._pinned.append(torch.empty(self.plan.expert_nbytes, dtype=torch.uint8, pin_memory=True))
        return self._pinned[i]

    def _read(self, layer: int, expert: int, slot: _Slot, staging: torch.Tensor | None) -> None:
        if staging is None:
            self.store.read_into(layer, expert, slot.u8)
            return
        staging = staging[:slot.nbytes]  # the largest expert's size; this one may be smaller
        # CUDA (untested here: no GPU): disk -> pinned host buffer -> device on a side stream, so a
        # prefetch copy overlaps compute on the default stream; the load ends when its copy has, so
        # the staging buffer can be reused and a settled slot is complete.
        self.store.read_into(layer, expert, staging)
        with torch.cuda.stream(self._copy_stream):
            slot.u8.copy_(staging, non_blocking=True)
        self._copy_stream.synchronize()

    # -------------------------------------------------------------- steps

    def acquire(self, layer: int, experts: Sequence[int]) -> list[tuple[torch.Tensor, ...]]:
        """Make `experts` (ascending ids of one MoE layer) usable; returns their weight views."""
        if self.worker is not None:
            self.worker.check()
        c, off = self._cache(layer)
        if len(experts) > self.plan.step_size:
            raise ValueError(f"a step of {len(experts)} experts exceeds the cache's step size {self.plan.step_size}")
        keys = [off + e for e in experts]
        c.step = set(keys)
        st = self.stats[self.phase]
        # Predictions for this layer that the step does not use: wasted, and first to go (so a wrong
        # guess costs one eviction, not also the useful experts this step's misses would evict).
        wrong = sorted(k for k, ent in c.entries.items() if ent.prefetch_for == layer and k not in c.step)
        for k in wrong:
            c.demoted -= 1
            c.entries[k].last_use = c.demoted
            c.entries[k].prefetch_for = None
            st.wasted_prefetches += 1
        out = []
        for key, e in zip(keys, experts, strict=True):
            c.uses += 1
            st.requests += 1
            c.counts[key] = c.counts.get(key, 0) + 1
            ent = c.entries.get(key)
            c.hit_log.append(ent is not None)
            c.phase_log.append(self.phase)
            if ent is not None:
                st.hits += 1
                if ent.prefetch_for is not None:
                    st.useful_prefetches += 1
                    ent.prefetch_for = None
                if ent.slot.job is not None and not ent.slot.job.done:
                    st.late_prefetches += 1
                st.stall_s += ent.slot.settle()
                ent.last_use = c.uses
                out.append(ent.slot.weights)
                continue
            if self.plan.policy == "static" and key not in c.hot:
                slot = self._new_slot(c, layer, e)  # a transient slot: H + K <= C by construction
                c.transient.append(slot)
            else:
                slot = self._room(c, c.step, layer, e)
                if slot is None:  # cannot happen: step_size <= capacity
                    raise RuntimeError(f"expert cache: no room for layer {layer} expert {e}")
                c.entries[key] = _Entry(slot, c.uses)
            self._load_now(layer, e, slot)
            out.append(slot.weights)
        return out

    def end_step(self, layer: int) -> None:
        c, _ = self._cache(layer)
        c.free.extend(c.transient)  # static bypass slots stay allocated, empty, for the next step
        c.occupied_nbytes -= sum(slot.nbytes for slot in c.transient)
        c.transient.clear()
        c.step = set()
        for ent in c.entries.values():
            if ent.prefetch_for == layer:
                ent.prefetch_for = None
                self.stats[self.phase].wasted_prefetches += 1

    def prefetch(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Insert the predicted `experts` of `layer` (priority order) and start loading them in the
        background; returns the experts whose loads were issued."""
        if self.worker is None:
            raise RuntimeError(f"prefetch needs the predictive policy, this cache is {self.plan.policy!r}")
        self.worker.check()
        c, off = self._cache(layer)
        fresh: set[int] = set()
        issued = []
        for e in experts:
            key = off + e
            c.uses += 1
            ent = c.entries.get(key)
            if ent is not None:
                ent.last_use = c.uses
                continue
            slot = self._room(c, c.step | fresh, layer, e)
            if slot is None:
                break  # everything left is in use by the running step or just prefetched
            c.entries[key] = _Entry(slot, c.uses, prefetch_for=layer)
            fresh.add(key)
            slot.job = self.worker.submit(self._background_load(layer, e, slot, self.stats[self.phase]),
                                          f"layer {layer} expert {e}")
            issued.append(e)
        return issued

    def _background_load(self, layer: int, expert: int, slot: _Slot, st: CacheStats) -> Callable[[], None]:
        st.prefetch_loads += 1
        st.loaded_nbytes += slot.nbytes

        def load() -> None:
            t0 = time.perf_counter()
            self._read(layer, expert, slot, self._staging(1))
            st.prefetch_load_s += time.perf_counter() - t0
        return load

    # -------------------------------------------------------------- end

    def close(self) -> None:
        """Stop the background loader (pending prefetches are cancelled) and wait for it."""
        if self.worker is not None:
            worker, self.worker = self.worker, None
            worker.close()

    def request_log(self) -> list[tuple[list[bool], list[str]]]:
        """Per cache: the hit flag and phase of every request, in order (for exact re-simulation)."""
        return [(list(c.hit_log), list(c.phase_log)) for c in self.caches]

