"""No code outside src/moekit/routers/ switches on a router's kind: callers ask the router config's
capability methods (describe, num_params, expected_experts_per_token, min_resident_experts, masks,
carries_state, hf_routing, is_causal, aux losses, ...), so a new router is one file.

What counts as a switch (read with `ast`, so docstrings and comments never count):
  1. a comparison (==, !=, in, not in, is) with a router name: a string constant that names a registered
     router or a selection rule ("topk", "topp", "null", "recurrent", "random", "expert_choice", ...),
     alone or inside a tuple, list or set;
  2. a comparison of a router's or a config's `kind` attribute (`router.kind`, `cfg.router.kind`,
     `self.cfg.kind`, ...) with any string constant (other things called kind, e.g. a trace event's, are
     not router kinds);
  3. a dict literal keyed by router names (a lookup table by kind), and a `match` case on a router name;
  4. importing a router's own module (moekit.routers.<name>) or one of its classes;
  5. probing for or reading a router's own field (`getattr(cfg, "n_group", 1)`, `hasattr(cfg, "p")`,
     `layer.cfg.router.k`): a field that only some routers' configs have (not the base's `kind`, `jitter`)
     stands for their kinds.
Allowed: router names as keyword arguments of calls (`RouterConfig(kind="topk", k=2)`: presets, the
transformers reader), in f-strings and messages, and the preset table's keys in train/presets.py (preset
names, some of which are router names). The transformers reader (hf/detect.py and the block probe of
hf/wrap.py) reads the fields of the top-k config it builds itself from a model's settings (rule 5 only).
"""

import ast
import dataclasses
from pathlib import Path

import moekit
from moekit.config import RouterConfig, router_fields

SRC = Path(moekit.__file__).parent
ROUTERS = SRC / "routers"
NAMES = set(moekit.registered_routers()) | {"topk", "topp"}
PRESET_TABLE = SRC / "train" / "presets.py"
OWN_FIELDS = set(router_fields()) - {f.name for f in dataclasses.fields(RouterConfig)}


def _names_in(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & NAMES
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return set().union(*(_names_in(e) for e in node.elts)) if node.elts else set()
    return set()


def _is_router_kind(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Attribute) and node.attr == "kind"):
        return False
    chain, value = [], node.value
    while isinstance(value, ast.Attribute):
        chain.append(value.attr)
        value = value.value
    if isinstance(value, ast.Name):
        chain.append(value.id)
    return any("router" in part or part in ("cfg", "config") for part in chain)


READER = {SRC / "hf" / "detect.py", SRC / "hf" / "wrap.py"}  # build the top-k config they read


def switches(source: str, name: str, preset_table: bool = False, reader: bool = False) -> list[str]:
    """The kind switches of one module's `source` (`name` for messages), in line order."""
    found = []
    for node in sorted(ast.walk(ast.parse(source, name)), key=lambda n: getattr(n, "lineno", 0)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            named = set().union(*(_names_in(o) for o in operands))
            if named:
                found.append(f"{where}: compares with router name(s) {sorted(named)}")
            elif any(_is_router_kind(o) for o in operands) and any(
                    isinstance(o, ast.Constant) and isinstance(o.value, str) for o in operands):
                found.append(f"{where}: compares a kind with a string")
        elif isinstance(node, ast.Dict) and not preset_table:
            keyed = set().union(*(_names_in(k) for k in node.keys if k is not None)) if node.keys else set()
            if keyed:
                found.append(f"{where}: a table keyed by router name(s) {sorted(keyed)}")
        elif isinstance(node, ast.match_case):
            if isinstance(node.pattern, ast.MatchValue) and _names_in(node.pattern.value):
                found.append(f"{where}: a match case on a router name")
        elif reader and isinstance(node, (ast.Call, ast.Attribute)):
            continue
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in OWN_FIELDS):
            found.append(f"{where}: probes for the router field {node.args[1].value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in OWN_FIELDS and "router" in ast.unparse(node.value):
            found.append(f"{where}: reads the router field {node.attr!r}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[:2] == ["moekit", "routers"] and len(parts) > 2 and parts[2] in NAMES:
                found.append(f"{where}: imports the {parts[2]!r} router's own module")
    return found


def test_no_file_outside_routers_switches_on_a_router_kind():
    files = [p for p in SRC.rglob("*.py") if ROUTERS not in p.parents]
    assert len(files) > 30  # the whole package was read
    found = [s for p in sorted(files) for s in switches(p.read_text(), str(p.relative_to(SRC.parent)),
                                                          preset_table=p == PRESET_TABLE, reader=p in READER)]
    assert not found, "switch on router kinds outside moekit/routers (ask the router config instead):\n" + "\n".join(found)


def test_the_check_catches_each_kind_of_switch():
    """The rules above fire on the forms they name (so the test cannot pass by reading nothing)."""
    probe = ('if cfg.router.kind == "recurrent": pass\n'
             'if rule in ("topp",): pass\n'
             'if layer.router.kind != "anything": pass\n'
             'if kind == "gate": pass\n'  # allowed: not a router's kind
             'need = {"topk": 1}.get(kind)\n'
             'from moekit.routers.null import NullExpertRouter\n'
             'groups = getattr(getattr(router, "cfg", None), "n_group", 1)\n'
             'if hasattr(cfg, "p"): pass\n'
             'step = getattr(layer, "router", None)\n'  # allowed: not a router config's own field
             'print(layer.cfg.router.k, layer.cfg.router.jitter, hf_config.n_group)\n'  # k only: jitter is the base's
             'RouterConfig(kind="topk", k=2)\n'  # allowed: construction
             'print(f"router {cfg.kind!r} is not topk")\n')  # allowed: messages
    found = switches(probe, "probe.py")
    assert [f.split(": ", 1)[1] for f in found] == [
        "compares with router name(s) ['recurrent']", "compares with router name(s) ['topp']",
        "compares a kind with a string", "a table keyed by router name(s) ['topk']",
        "imports the 'null' router's own module", "probes for the router field 'n_group'",
        "probes for the router field 'p'", "reads the router field 'k'"]


def test_config_is_a_leaf():
    """config.py imports nothing of moekit but the error classes (errors.py imports nothing at all)."""
    for name, allowed in (("config.py", {"moekit.errors"}), ("errors.py", set())):
        tree = ast.parse((SRC / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert {m for m in imported if m.split(".")[0] == "moekit"} <= allowed, name
