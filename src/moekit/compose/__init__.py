"""Composition of Experts (arXiv 2412.01868): route each request to one whole expert model.

>>> from moekit.compose import ExpertSpec, build_composition
>>> comp = build_composition([ExpertSpec("base", "runs/base"), ExpertSpec("de", "runs/base", "adapters/de")],
...                          texts, categories)
>>> comp.generate(prompts, comp.route(prompts))

See docs/adapters.md and `moekit compose --help`.
"""

from moekit.compose.coe import (
    Composition,
    ExpertSpec,
    Route,
    bits_per_byte,
    build_composition,
    evaluate_composition,
    generate_batch,
    score_batch,
)
from moekit.compose.router import CategoryRouter

__all__ = ["CategoryRouter", "Composition", "ExpertSpec", "Route", "bits_per_byte", "build_composition",
           "evaluate_composition", "generate_batch", "score_batch"]
