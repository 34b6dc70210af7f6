"""Dispatch: sort the ragged assignment by expert, permute tokens, combine expert outputs."""

from moekit.dispatch.plan import DispatchPlan, combine, make_plan, permute

__all__ = ["DispatchPlan", "combine", "make_plan", "permute"]
