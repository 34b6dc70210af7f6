"""Layers built from routers, dispatch and experts."""

from moekit.layers.moe import MoELayer, RoutingInfo, attach_aux_losses, moe_layers
from moekit.layers.overrides import route

__all__ = ["MoELayer", "RoutingInfo", "moe_layers", "route", "attach_aux_losses"]
