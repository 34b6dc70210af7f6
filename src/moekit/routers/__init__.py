"""Routers, one file each; importing this package registers them all."""

from moekit.routers import expert_choice, null, random, recurrent, topk, topp  # noqa: F401  (registration side effect)
from moekit.routers.base import Router, RouterOutput, register, registered_routers, router_class
from moekit.routers.recurrent import RecurrentState

__all__ = ["RecurrentState", "Router", "RouterOutput", "register", "registered_routers", "router_class"]
