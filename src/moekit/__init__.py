"""moekit: Mixture-of-Experts layers with dynamic routing for PyTorch."""

from moekit.config import MoEConfig, RouterConfig
from moekit.layers import MoELayer, RoutingInfo, update_router_biases
from moekit.routers import Router, RouterOutput, register, registered_routers

__version__ = "0.1.0"

__all__ = [
    "MoEConfig", "MoELayer", "Router", "RouterConfig", "RouterOutput", "RoutingInfo", "__version__",
    "register", "registered_routers", "update_router_biases",
]
