"""Layers built from routers, dispatch and experts."""

from moekit.layers.moe import MoELayer, RoutingInfo, update_router_biases

__all__ = ["MoELayer", "RoutingInfo", "update_router_biases"]
