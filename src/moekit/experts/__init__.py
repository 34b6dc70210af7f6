"""Expert banks (stacked weights in the transformers v5 layout) and shared experts."""

from moekit.experts.bank import ExpertBank, SharedExpert

__all__ = ["ExpertBank", "SharedExpert"]
