"""Layers built from routers, dispatch and experts."""

from moekit.layers.moe import MoELayer, RoutingInfo, attach_aux_losses
from moekit.layers.overrides import moe_layers, route

__all__ = ["MoELayer", "RoutingInfo", "moe_layers", "route", "attach_aux_losses"]
