"""moekit: Mixture-of-Experts layers with dynamic routing for PyTorch."""

from moekit.config import MoEConfig, RouterConfig
from moekit.layers import MoELayer, RoutingInfo, after_optimizer_step, moe_layers, route
from moekit.routers import RecurrentState, Router, RouterOutput, register, registered_routers

__version__ = "0.1.0"

__all__ = [
    "MoEConfig", "MoELayer", "RecurrentState", "Router", "RouterConfig", "RouterOutput", "RoutingInfo", "__version__",
    "moe_layers", "register", "registered_routers", "route", "after_optimizer_step",
]
