"""Expert parallelism x data parallelism applied to a built model (see docs/parallel.md)."""

from moekit.parallel.apply import ExpertParallelModel, agree, apply_expert_parallel, init_parallel
from moekit.parallel.config import ParallelConfig

__all__ = ["ExpertParallelModel", "agree", "ParallelConfig", "apply_expert_parallel", "init_parallel"]
