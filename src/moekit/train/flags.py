"""Command-line flags that map one-to-one onto config fields: `--SECTION.FIELD VALUE`.

Sections: model (LMConfig), moe (MoEConfig), router (RouterConfig), train (TrainConfig).
E.g. `--router.kind topp --router.p 0.3 --moe.num_experts 16 --train.steps 200`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from moekit.config import MoEConfig, RouterConfig
from moekit.models import LMConfig
from moekit.train.trainer import TrainConfig

SECTIONS: dict[str, tuple[type, set[str]]] = {
    "model": (LMConfig, {"moe"}),
    "moe": (MoEConfig, {"router", "d_model"}),  # moe.d_model always follows model.d_model
    "router": (RouterConfig, set()),
    "train": (TrainConfig, set()),
}


def _converter(type_name: str, flag: str):
    optional = "None" in type_name

    def convert(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        if "bool" in type_name:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{flag}: expected true or false, got {text!r}")
        try:
            if "int" in type_name:
                return int(text)
            if "float" in type_name:
                return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected {type_name}, got {text!r}") from None
        return text

    return convert


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for section, (cls, skip) in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__name__} fields)")
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag = f"--{section}.{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else None
            group.add_argument(flag, dest=f"{section}.{f.name}", type=_converter(str(f.type), flag), default=None,
                               metavar=str(f.type).replace(" ", ""), help=f"(class default {default!r})")


def apply_flags(model_cfg: LMConfig, train_cfg: TrainConfig, args: argparse.Namespace) -> tuple[LMConfig, TrainConfig]:
    """The configs with every flag given on the command line applied (others untouched)."""
    given: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            if section in given:
                given[section][name] = value
    router = dataclasses.replace(model_cfg.moe.router, **given["router"])
    moe = dataclasses.replace(model_cfg.moe, **given["moe"], router=router)
    model_cfg = dataclasses.replace(model_cfg, **given["model"], moe=moe)
    return model_cfg, dataclasses.replace(train_cfg, **given["train"])
