"""Routers, one file each; importing this package registers them all.

A router file defines its config (a `RouterConfig` subclass) and its router (a `Router` subclass) and
registers them together: `@register("name", config=NameConfig)`. Adding a router is that file plus its
name in the import list below.
"""

from moekit.routers import (  # noqa: F401  (registration side effect)
    expert_choice,
    hash,
    null,
    random,
    recurrent,
    remoe,
    sparsemixer,
    topk,
    topp,
)
from moekit.routers.base import RouteExtras, Router, RouterOutput, StepCounts
from moekit.routers.recurrent import RecurrentState
from moekit.routers.registry import register, registered_routers, router_class

__all__ = ["RecurrentState", "RouteExtras", "Router", "RouterOutput", "StepCounts", "register",
           "registered_routers", "router_class"]
