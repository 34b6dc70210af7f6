"""Dispatch: sort the ragged assignment by expert, permute tokens, combine expert outputs."""

from moekit.dispatch.plan import DispatchPlan, combine, combine_rows, make_plan, permute

__all__ = ["DispatchPlan", "combine", "combine_rows", "make_plan", "permute"]
