"""Layers built from routers, dispatch and experts."""

from moekit.layers.moe import MoELayer, RoutingInfo, update_router_biases
from moekit.layers.overrides import moe_layers, route

__all__ = ["MoELayer", "RoutingInfo", "moe_layers", "route", "update_router_biases"]
