"""Command-line flags that map one-to-one onto config fields: `--SECTION.FIELD VALUE`.

Sections: model (LMConfig), moe (MoEConfig), router (RouterConfig), train (TrainConfig), parallel
(ParallelConfig: the process layout, not part of the run's configuration; `parallel_config(args)`).
E.g. `--router.kind topp --router.p 0.3 --moe.num_experts 16 --train.steps 200`.
Config errors name the flag: `TrainConfig.lr=inf is invalid` reads `--train.lr inf is invalid`.

`--router.FIELD` flags exist for the fields of every registered router; the router is the preset's
(or `--router.kind`'s, converted from the preset's: fields both kinds have keep the preset's values),
and a flag that is not one of its fields is refused with one line naming the fields it has.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from moekit.config import MoEConfig, RouterConfig, router_fields
from moekit.errors import UsageError
from moekit.models import LMConfig
from moekit.parallel import ParallelConfig
from moekit.train.trainer import TrainConfig

SECTIONS: dict[str, tuple[type, set[str]]] = {
    "model": (LMConfig, {"moe"}),
    "moe": (MoEConfig, {"router", "d_model"}),  # moe.d_model always follows model.d_model
    "router": (RouterConfig, set()),
    "train": (TrainConfig, set()),
    "parallel": (ParallelConfig, set()),
}
_SECTION_OF = {cls.__name__: section for section, (cls, _) in SECTIONS.items()}
_FIELD = re.compile(r"\b(LMConfig|MoEConfig|RouterConfig|TrainConfig|ParallelConfig)\.(\w+)(=?)")


def flag_names(message: str) -> str:
    """`TrainConfig.lr=inf ...` -> `--train.lr inf ...` (MoEConfig.d_model is --model.d_model)."""
    def flag(m: re.Match) -> str:
        section = "model" if (m[1], m[2]) == ("MoEConfig", "d_model") else _SECTION_OF[m[1]]
        return f"--{section}.{m[2]}" + (" " if m[3] else "")

    return _FIELD.sub(flag, message)


@contextmanager
def flag_errors() -> Iterator[None]:
    """Re-raise UsageErrors of the block with config fields named as flags."""
    try:
        yield
    except UsageError as e:
        raise UsageError(flag_names(str(e))) from e


def _section_objects(model_cfg: LMConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    return {"model": model_cfg, "moe": model_cfg.moe, "router": model_cfg.moe.router, "train": train_cfg,
            "parallel": ParallelConfig()}


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


def add_config_flags(parser: argparse.ArgumentParser, preset: tuple[LMConfig, TrainConfig] | None = None,
                     preset_name: str = "") -> None:
    """One flag per config field. Its help shows the value in `preset` (named `preset_name`), or,
    without one, says that each preset keeps its own value."""
    objects = _section_objects(*preset) if preset is not None else None
    for section, (cls, skip) in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__name__} fields)")
        fields = router_fields().values() if cls is RouterConfig else dataclasses.fields(cls)
        for f in fields:
            if f.name in skip:
                continue
            flag = f"--{section}.{f.name}"
            if objects is not None and hasattr(objects[section], f.name):
                shown = f"(preset {preset_name}: {getattr(objects[section], f.name)!r})"
            elif objects is not None:
                shown = f"(not a field of the preset's router kind {objects[section].kind!r})"
            else:
                shown = "(default: each preset's own value)"
            if "help" in f.metadata:
                shown = f"{f.metadata['help']} {shown}"
            group.add_argument(flag, dest=f"{section}.{f.name}", type=_converter(str(f.type), flag), default=None,
                               metavar=str(f.type).replace(" ", ""), help=shown.replace("%", "%%"))


def apply_flags(model_cfg: LMConfig, train_cfg: TrainConfig, args: argparse.Namespace) -> tuple[LMConfig, TrainConfig]:
    """The configs with every flag given on the command line applied (others untouched)."""
    given: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            if section in given:
                given[section][name] = value
    router = _apply_router_flags(model_cfg.moe.router, given["router"])
    moe = dataclasses.replace(model_cfg.moe, **given["moe"], router=router)
    model_cfg = dataclasses.replace(model_cfg, **given["model"], moe=moe)
    return model_cfg, dataclasses.replace(train_cfg, **given["train"])


def _apply_router_flags(router: RouterConfig, given: dict[str, Any]) -> RouterConfig:
    """The preset's router with `--router.*` flags applied; `--router.kind` converts it to that kind."""
    given = dict(given)
    kind = given.pop("kind", router.kind)
    names = {f.name for f in dataclasses.fields(router if kind == router.kind else RouterConfig(kind=kind))}
    wrong = sorted(set(given) - names)
    if wrong:
        flags = " ".join(f"--router.{n}" for n in wrong)
        change = " (--router.kind changes it)" if kind == router.kind else ""
        raise UsageError(f"{flags} {'does' if len(wrong) == 1 else 'do'} not apply to router kind {kind!r}{change}; "
                         "its flags: " + ", ".join(f"--router.{n}" for n in sorted(names)))
    return router.convert(kind, **given)


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    """The ParallelConfig of the `--parallel.FIELD` flags given (defaults for the rest), validated."""
    given = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("parallel.") and v is not None}
    return dataclasses.replace(ParallelConfig(), **given).validate()
