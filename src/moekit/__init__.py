"""moekit: Mixture-of-Experts layers with dynamic routing for PyTorch.

The public names below are loaded on first use (PEP 562), so that `import moekit` -- and with it
`moekit --help` -- does not import torch; `from moekit import MoELayer` works as before.
"""

import importlib

from moekit import config as _config

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "MoEConfig": "moekit.config", "RouterConfig": "moekit.config",
    "MoELayer": "moekit.layers", "RoutingInfo": "moekit.layers", "attach_aux_losses": "moekit.layers",
    "moe_layers": "moekit.layers", "route": "moekit.layers", "mask_experts": "moekit.layers.masks",
    "RecurrentState": "moekit.routers", "Router": "moekit.routers", "RouterOutput": "moekit.routers",
    "register": "moekit.routers", "registered_routers": "moekit.routers",
    "BalanceTracker": "moekit.train.balance", "after_optimizer_step": "moekit.train.balance",
}

__all__ = sorted([*_PUBLIC, "__version__"])

# A router kind is looked up by name in moekit.config; the router files register themselves when imported.
_config.set_router_loader(lambda: importlib.import_module("moekit.routers"))


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # once
        return value
    if name.startswith("__"):
        raise AttributeError(f"module 'moekit' has no attribute {name!r}")
    try:  # a subpackage not imported yet (moekit.hf, moekit.data, ...)
        return importlib.import_module(f"moekit.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"moekit.{name}":
            raise
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
