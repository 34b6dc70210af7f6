"""Expert parallelism x data parallelism applied to a built model (see docs/parallel.md)."""

from moekit.parallel.apply import ExpertParallelModel, apply_expert_parallel, init_parallel
from moekit.parallel.config import ParallelConfig

__all__ = ["ExpertParallelModel", "ParallelConfig", "apply_expert_parallel", "init_parallel"]
