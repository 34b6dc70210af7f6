"""Routers, one file each; importing this package registers them all."""

from moekit.routers import expert_choice, null, random, topk, topp  # noqa: F401  (registration side effect)
from moekit.routers.base import Router, RouterOutput, register, registered_routers, router_class

__all__ = ["Router", "RouterOutput", "register", "registered_routers", "router_class"]
