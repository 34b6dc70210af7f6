"""The router registry: a name pairs a router class with its own config class (as PEFT pairs a method
with its config).

    @register("topk", config=TopKConfig)
    class TopKRouter(Router): ...

`RouterConfig(kind="topk", ...)` and `RouterConfig.from_dict({"kind": "topk", ...})` then build a
`TopKConfig`, and `router_class("topk")` is the module a layer builds from it. Strings exist for JSON
and the command line; Python callers pass configs. A new router is one file that defines its config and
its router and registers them, plus one line in the import list of `moekit/routers/__init__.py`.
"""

from __future__ import annotations

from moekit.config import RouterConfig, add_router_config, router_config_class
from moekit.routers.base import Router

_ROUTERS: dict[str, type[Router]] = {}


def register(name: str, config: type[RouterConfig] | None = None):
    """Class decorator: make router `name` available to configs, layers and the CLI, with `config` (a
    RouterConfig subclass whose `kind` field defaults to `name`) as its config class."""

    def deco(cls: type[Router]) -> type[Router]:
        if name in _ROUTERS:
            raise ValueError(f"router {name!r} is already registered (by {_ROUTERS[name].__name__})")
        if config is None or not issubclass(config, RouterConfig) or config is RouterConfig:
            raise TypeError(f"register({name!r}): pass config=<its RouterConfig subclass>")
        own = config.__dataclass_fields__["kind"].default
        if own != name:
            raise ValueError(f"register({name!r}): {config.__name__}.kind defaults to {own!r}; declare "
                             f"`kind: str = {name!r}` in it")
        add_router_config(name, config)
        cls.kind = name
        cls.config_class = config
        _ROUTERS[name] = cls
        return cls

    return deco


def router_class(name: str) -> type[Router]:
    """The router class registered as `name` (UsageError naming the registered ones if none)."""
    router_config_class(name)  # the error for an unknown name
    return _ROUTERS[name]


def registered_routers() -> list[str]:
    return sorted(_ROUTERS)


def router_aux_loss_names() -> tuple[str, ...]:
    """Every router-specific aux loss any registered router can return (sorted)."""
    return tuple(sorted({n for cls in _ROUTERS.values() for n in cls.config_class.router_losses}))
