"""`ParallelConfig`: how a run is laid out over processes (`--parallel.FIELD` flags).

Not part of a run's saved configuration: a checkpoint is consolidated (moekit.parallel.layout), so a
run saved with one layout resumes with another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.config import Config, check_fields, require

BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelConfig(Config):
    """Expert parallelism (EP) x data parallelism (DP) over the processes torchrun starts."""

    ep: int = field(default=1, metadata={"help": "expert-parallel size: each MoE layer's experts are sharded over "
                                                 "this many ranks (num_experts divisible by it)"})
    dp: int = field(default=0, metadata={"help": "data-parallel size: replicas of each expert shard (0 = world "
                                                 "size / ep); ep * dp must equal the number of processes"})
    backend: str = field(default="auto", metadata={"help": "torch.distributed backend: auto = nccl on CUDA, gloo "
                                                           "on CPU"})
    timeout_s: float = field(default=600.0, metadata={"help": "seconds a collective may wait for another rank "
                                                              "before every rank stops with an error"})

    def validate(self) -> ParallelConfig:
        """Raises UsageError naming the field and the allowed values."""
        check_fields(self)
        require(self.ep >= 1, "ParallelConfig.ep", self.ep, "an integer >= 1")
        require(self.dp >= 0, "ParallelConfig.dp", self.dp, "an integer >= 0 (0 = world size / ep)")
        require(self.backend in BACKENDS, "ParallelConfig.backend", self.backend, f"one of {BACKENDS}")
        require(self.timeout_s > 0, "ParallelConfig.timeout_s", self.timeout_s, "a finite float > 0")
        return self
