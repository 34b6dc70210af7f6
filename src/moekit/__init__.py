"""moekit: Mixture-of-Experts layers with dynamic routing for PyTorch."""

from moekit.config import MoEConfig, RouterConfig
from moekit.layers import MoELayer, RoutingInfo, after_optimizer_step, attach_aux_losses, moe_layers, route
from moekit.layers.masks import mask_experts
from moekit.routers import RecurrentState, Router, RouterOutput, register, registered_routers

__version__ = "0.1.0"

__all__ = [
    "MoEConfig", "MoELayer", "RecurrentState", "Router", "RouterConfig", "RouterOutput", "RoutingInfo", "__version__",
    "mask_experts", "moe_layers", "register", "registered_routers", "route", "after_optimizer_step",
    "attach_aux_losses",
]


def __getattr__(name: str):
    # `moekit.hf` imports transformers: load it on first use, not on `import moekit`.
    if name == "hf":
        import importlib

        return importlib.import_module("moekit.hf")
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
