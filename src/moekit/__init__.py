"""moekit: Mixture-of-Experts layers with dynamic routing for PyTorch."""

from moekit.config import MoEConfig, RouterConfig
from moekit.layers import MoELayer, RoutingInfo, attach_aux_losses, moe_layers, route
from moekit.layers.masks import mask_experts
from moekit.routers import RecurrentState, Router, RouterOutput, register, registered_routers

__version__ = "0.1.0"

__all__ = [
    "BalanceTracker", "MoEConfig", "MoELayer", "RecurrentState", "Router", "RouterConfig", "RouterOutput",
    "RoutingInfo", "__version__", "mask_experts", "moe_layers", "register", "registered_routers", "route",
    "after_optimizer_step", "attach_aux_losses",
]

_LAZY = {"BalanceTracker": "moekit.train.balance", "after_optimizer_step": "moekit.train.balance"}


def __getattr__(name: str):
    import importlib

    # `moekit.hf` imports transformers and `moekit.train` the corpus: load them on first use, not on `import moekit`.
    if name == "hf":
        return importlib.import_module("moekit.hf")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
