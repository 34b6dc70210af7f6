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

from moekit.config import MoEConfig, RouterConfig, router_config_class, router_fields
from moekit.errors import UsageError
from moekit.models import LMConfig
from moekit.parallel import ParallelConfig
from moekit.routers import registered_routers
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


def field_converter(type_name: str, flag: str):
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


def _router_field(name: str, preset_router: RouterConfig | None) -> dataclasses.Field:
    """The definition of router field `name` to describe: the preset's router's own, else the first
    registered router's that has it."""
    owners = [type(preset_router)] if preset_router is not None else []
    for cls in owners + [RouterConfig] + [router_config_class(k) for k in registered_routers()]:
        found = {f.name: f for f in dataclasses.fields(cls)}.get(name)
        if found is not None and "help" in found.metadata:
            return found
    return router_fields()[name]


def _owners(name: str) -> list[str]:
    """The registered router kinds whose config has field `name`."""
    return [k for k in registered_routers() if name in router_config_class(k).__dataclass_fields__]


def config_flag_fields(preset_router: RouterConfig | None = None) -> Iterator[tuple[str, dataclasses.Field]]:
    """(section, field) of every generated `--SECTION.FIELD` flag."""
    for section, (cls, skip) in SECTIONS.items():
        names = router_fields() if cls is RouterConfig else [f.name for f in dataclasses.fields(cls)]
        for name in names:
            if name not in skip:
                yield section, (_router_field(name, preset_router) if cls is RouterConfig
                                else cls.__dataclass_fields__[name])


def add_config_flags(parser: argparse.ArgumentParser, preset: tuple[LMConfig, TrainConfig] | None = None,
                     preset_name: str = "") -> None:
    """One flag per config field, with the field's help text (`setting(help=...)` metadata) and, for an
    enumeration, its choices. The help ends with the value in `preset` (named `preset_name`), or, without
    one, says that each preset keeps its own value."""
    objects = _section_objects(*preset) if preset is not None else None
    groups = {section: parser.add_argument_group(f"{section} ({cls.__name__} fields)")
              for section, (cls, _) in SECTIONS.items()}
    for section, f in config_flag_fields(objects["router"] if objects is not None else None):
        flag = f"--{section}.{f.name}"
        if objects is not None and hasattr(objects[section], f.name):
            shown = f"preset {preset_name}: {getattr(objects[section], f.name)!r}"
        elif objects is not None:
            shown = (f"router kinds {', '.join(_owners(f.name))}; not a field of the preset's router kind "
                     f"{objects[section].kind!r}")
        else:
            shown = "default: each preset's own value"
        choices = registered_routers() if (section, f.name) == ("router", "kind") else f.metadata.get("choices")
        text = f"{f.metadata.get('help', '')} ({shown})".strip()
        groups[section].add_argument(flag, dest=f"{section}.{f.name}", type=field_converter(str(f.type), flag),
                                     default=None, choices=choices,
                                     metavar=None if choices else str(f.type).replace(" ", ""),
                                     help=text.replace("%", "%%"))


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


def parse_sweep(spec: str) -> tuple[str, list[Any]]:
    """`SECTION.FIELD=V1,V2,...` (as `moekit compare --sweep router.p=0.2,0.3`) -> ("SECTION.FIELD",
    [values converted to the field's type]). Raises UsageError naming the problem."""
    name, sep, values = spec.partition("=")
    section, _, field = name.partition(".")
    if not sep or not field or not values.strip(","):
        raise UsageError(f"--sweep {spec!r}: expected SECTION.FIELD=V1,V2,... (e.g. router.p=0.2,0.3)")
    if section not in SECTIONS:
        raise UsageError(f"--sweep {spec!r}: unknown section {section!r}; expected one of {', '.join(SECTIONS)}")
    cls, skip = SECTIONS[section]
    fields = router_fields() if cls is RouterConfig else {f.name: f for f in dataclasses.fields(cls)}
    if field not in fields or field in skip or field == "kind":
        raise UsageError(f"--sweep {spec!r}: --{section}.{field} is not a field that can be swept")
    convert = field_converter(str(fields[field].type), f"--{section}.{field}")
    try:
        parsed = [convert(v.strip()) for v in values.split(",") if v.strip()]
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--sweep {spec!r}: {e}") from None
    if len(set(map(repr, parsed))) != len(parsed):
        raise UsageError(f"--sweep {spec!r}: a value is repeated")
    return f"{section}.{field}", parsed


def applies_to(key: str, model_cfg: LMConfig) -> bool:
    """Whether the flag `key` (SECTION.FIELD) is a field of this model's configs (a router field only
    of routers that have it)."""
    section, field = key.split(".", 1)
    if section == "router":
        return hasattr(model_cfg.moe.router, field)
    return True


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    """The ParallelConfig of the `--parallel.FIELD` flags given (defaults for the rest), validated."""
    given = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("parallel.") and v is not None}
    return dataclasses.replace(ParallelConfig(), **given).validate()
