"""A byte-budgeted expert cache over an `ExpertStore`, with a background loader for prefetches.

Legend: L MoE layers, E experts per layer, C capacity of one cache in experts, K experts one token
needs at a layer (the router's k), S_e bytes per expert, H static hot-set size.

The budget (bytes, or a fraction of all expert bytes) buys slots of S_e bytes: one cache of
C = budget // S_e slots shared by all layers (keys layer * E + expert), or one cache per layer of
C = budget // (L * S_e) slots. Slots are allocated on first use and reused, so resident expert
bytes = allocated slots * S_e <= budget, checked on every allocation (peak reported).

A cache serves *steps*: one step is a set of experts one MoE layer needs at once, requested in
ascending id order (`acquire`), released by `end_step`. The conventions are those of
moekit.analysis.cache, so that a recorded run can be re-simulated exactly:
  * a request hits iff its expert was resident (or its prefetch issued) before the request;
  * the step's experts are never evicted during the step (victims are other residents);
  * lru: evict the least recently used; lfu: the fewest uses over the whole run ("perfect" LFU),
    ties by least recent use; static: only hot-set experts are cached (filled on first use, never
    evicted), others are read into one of K transient slots and dropped at the step's end
    (so H = C - K); predictive: lru plus `prefetch`, which inserts predicted experts before their
    step as most recently used (an already resident one is only touched); when the step starts,
    predicted experts it does not request become the least recently used (evicted first).
A prefetched expert is *useful* if its target step requests it, *wasted* if that step does not
(or it is evicted before). Prefetch loads run on one background thread (`PrefetchWorker`); a request
for an expert whose load is still running waits for it (a *late* prefetch, its wait is *stall*).
"""

from __future__ import annotations

import math
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from moekit.errors import MoekitError, UsageError
from moekit.offload.store import ExpertStore

__all__ = ["POLICIES", "SCOPES", "CachePlan", "CacheStats", "ExpertCache", "ExpertShape", "PrefetchError",
           "PrefetchWorker", "format_bytes", "hot_keys_from_counts", "parse_budget", "plan_cache"]

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
            m = _BUDGET_RE.match(budget)
            if m is None or (m.group(2) and m.group(2).lower() not in _UNITS):
                raise UsageError(f"{what}: expected {BUDGET_FORMS}, or a whole number of bytes ('1073741824')")
            value, unit = float(m.group(1)), m.group(2).lower()
        else:
            value, unit = budget, ""
        if not math.isfinite(value):
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
    num_experts: int
    expert_nbytes: int

    @property
    def total_nbytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_nbytes


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

    @property
    def slots(self) -> int:
        return self.num_caches * self.capacity

    def describe(self) -> str:
        per = "per layer" if self.scope == "layer" else "shared by all layers"
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
    caches, per_cache_max = (L, E) if scope == "layer" else (1, L * E)
    C = min(nbytes // (caches * S), per_cache_max)  # slots beyond every expert would never be used
    if C < K:
        need = caches * K * S
        where = "of each layer's cache" if scope == "layer" else "of the shared cache"
        raise UsageError(f"expert budget {budget!r} = {format_bytes(nbytes)} holds {C} expert(s) {where} "
                         f"({format_bytes(S)} each), but one token needs {K} experts of a layer resident at once; "
                         f"give at least {need} bytes ({100 * need / total:.2f}% of {format_bytes(total)})")
    static = policy == "static"
    return CachePlan(nbytes, S, total, scope, policy, caches, C, K if static else C, C - K if static else 0, K)


def hot_keys_from_counts(counts_LE: np.ndarray, plan: CachePlan) -> list[list[int]]:
    """The static hot set of each cache: the `hot_capacity` most used keys (ties to the lower key,
    as moekit.analysis.cache.simulate_static). Per-layer keys are expert ids; shared keys layer * E + e."""
    counts_LE = np.asarray(counts_LE)
    if counts_LE.ndim != 2:
        raise ValueError(f"hot-set counts must be (layers, experts), got shape {counts_LE.shape}")
    H = plan.hot_capacity
    if plan.scope == "layer":
        return [np.argsort(-row, kind="stable")[:H].tolist() for row in counts_LE]
    return [np.argsort(-counts_LE.reshape(-1), kind="stable")[:H].tolist()]


# ----------------------------------------------------------------------------- background loads


class PrefetchError(MoekitError, RuntimeError):
    """A prefetch could not complete because the background loader stopped."""


class _Job:
    def __init__(self, what: str):
        self.what = what
        self._done = threading.Event()
        self.error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        # Short timed waits keep Ctrl-C responsive in the main thread.
        while not self._done.wait(0.05):
            pass
        if self.error is not None:
            raise self.error


class PrefetchWorker:
    """One daemon thread running load jobs in order. On the first failing job it stops and exits:
    that job and every queued one finish with the error (re-raised by whoever waits on them, and by
    `check`); later `submit`s raise it. `close` stops it and joins it (pending jobs are cancelled)."""

    def __init__(self, name: str = "moekit-prefetch"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # submit vs. shutdown: no job is queued after the thread left
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[[], None], what: str) -> _Job:
        with self._lock:
            self.check()
            if self._closed:
                raise PrefetchError(f"prefetch worker is closed; cannot load {what}")
            job = _Job(what)
            self._queue.put((fn, job))
        return job

    def check(self) -> None:
        """Re-raise a failure of the background thread in the caller's thread."""
        if self.error is not None:
            raise self.error

    def _shutdown(self, reason: BaseException) -> None:
        """Refuse new jobs and cancel the queued ones (the thread then exits)."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                if item is not None:
                    item[1].finish(PrefetchError(f"prefetch of {item[1].what} was cancelled: {reason}"))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._shutdown(PrefetchError("the worker was closed"))
                return
            fn, job = item
            try:
                fn()
            except BaseException as e:  # handed to the main thread, never lost
                self.error = e
                job.finish(e)
                self._shutdown(e)
                return
            job.finish()

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():  # a read stuck in the kernel: the daemon thread dies with the process
            raise PrefetchError(f"prefetch worker did not stop within {timeout} s")


# ----------------------------------------------------------------------------- caches


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
    hot: frozenset[int] = frozenset()
    entries: dict[int, _Entry] = field(default_factory=dict)
    free: list[_Slot] = field(default_factory=list)
    allocated: int = 0
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
        self.caches = [_OneCache(plan.capacity, frozenset(hot_keys[i]) if hot_keys is not None else frozenset())
                       for i in range(plan.num_caches)]
        self.phase = "prefill"
        self.stats = {"prefill": CacheStats(), "decode": CacheStats()}
        self.peak_resident_nbytes = 0
        self._resident_slots = 0
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
        return self._resident_slots * self.plan.expert_nbytes

    def _new_slot(self, c: _OneCache) -> _Slot:
        if c.free:
            return c.free.pop()
        c.allocated += 1
        self._resident_slots += 1
        # The budget invariant, checked on every allocation (never compiled out, unlike assert).
        if c.allocated > c.capacity or self.resident_nbytes > self.plan.budget_nbytes:
            raise RuntimeError(f"expert cache: {self.resident_nbytes} resident bytes would exceed the budget of "
                               f"{self.plan.budget_nbytes} ({c.allocated} slots of {c.capacity})")
        self.peak_resident_nbytes = max(self.peak_resident_nbytes, self.resident_nbytes)
        return _Slot(self.plan.expert_nbytes, self.device, self.store.layout)

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

    def _room(self, c: _OneCache, protected: set[int]) -> _Slot | None:
        """A free slot, evicting one resident if the cache is full (None if nothing may go)."""
        if len(c.entries) + len(c.transient) < c.capacity:
            return self._new_slot(c)
        victim = self._victim(c, protected)
        if victim is None:
            return None
        ent = c.entries.pop(victim)
        if ent.prefetch_for is not None:
            self.stats[self.phase].wasted_prefetches += 1
        ent.slot.settle()  # never overwrite memory a running load still writes
        return ent.slot

    # -------------------------------------------------------------- loads

    def _load_now(self, layer: int, expert: int, slot: _Slot) -> None:
        t0 = time.perf_counter()
        self._read(layer, expert, slot, self._staging(0))
        st = self.stats[self.phase]
        st.load_s += time.perf_counter() - t0
        st.demand_loads += 1
        st.loaded_nbytes += self.plan.expert_nbytes

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
                slot = self._new_slot(c)  # a transient slot: H + K <= C by construction
                c.transient.append(slot)
            else:
                slot = self._room(c, c.step)
                if slot is None:  # cannot happen: step_size <= capacity
                    raise RuntimeError(f"expert cache: no room for layer {layer} expert {e}")
                c.entries[key] = _Entry(slot, c.uses)
            self._load_now(layer, e, slot)
            out.append(slot.weights)
        return out

    def end_step(self, layer: int) -> None:
        c, _ = self._cache(layer)
        c.free.extend(c.transient)  # static bypass slots stay allocated, empty, for the next step
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
            slot = self._room(c, c.step | fresh)
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
        st.loaded_nbytes += self.plan.expert_nbytes

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
