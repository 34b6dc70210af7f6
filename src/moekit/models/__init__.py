"""Models built from moekit layers."""

from moekit.models.lm import KVCache, LMConfig, MoELM

__all__ = ["KVCache", "LMConfig", "MoELM"]
