"""The allowed import direction between moekit's packages, read from every `import` in src/ with `ast`.

    errors  <-  config, utils, data  <-  losses, ops  <-  routers, dispatch, experts  <-  layers
            <-  models, hf, parallel  <-  compress, adapters  <-  train, analysis, offload  <-  compose  <-  bench  <-  cli
            <-  __main__

A package may import packages on lower levels only; packages on one level do not import each other,
except for the edges in PEER_EDGES. No package imports another package's `_private` names. Imports
inside functions (late imports) count, and so do `importlib.import_module("moekit....")` calls with
a constant name. The package root `moekit/__init__.py` is the public namespace: it may import any
library package (lazily, e.g. `moekit.hf`), and only train, analysis, offload, bench and cli may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "moekit"

LEVELS = [
    ("errors",),
    ("config", "utils", "data"),  # data: the embedded corpus and tokenizers, imports nothing of moekit
    ("losses", "ops"),
    ("routers", "dispatch", "experts"),
    ("layers",),
    ("models", "hf", "parallel"),  # parallel: applied to a built model (its layers), used by train
    ("compress", "adapters"),  # compress: prune, merge, quantise a built model (train's loader rebuilds them);
    # adapters: on dense linears, moekit expert banks and wrapped transformers models
    ("train", "analysis", "offload"),
    ("compose",),  # Composition of Experts: scores moekit runs (train) with adapters on top
    ("bench",),  # the benchmarks: they time the whole library; `moekit bench` runs them
    ("cli",),
    ("__main__",),  # moekit/__main__.py: `python -m moekit` (and torchrun -m moekit) runs the command line
]
LEVEL = {pkg: i for i, pkgs in enumerate(LEVELS) for pkg in pkgs}
ROOT = "moekit"  # the package root (moekit/__init__.py)
MAY_IMPORT_ROOT = {"train", "analysis", "offload", "bench", "cli"}

# Imports between packages of one level that are part of the design, with the reason.
PEER_EDGES = {
    ("hf", "models"): "hf/export.py writes a moekit MoELM as a transformers checkpoint",
    ("offload", "analysis"): "offload re-simulates its caches with analysis' simulators on a RoutingTrace it "
                             "records with analysis' TraceRecorder",
    ("offload", "train"): "offloaded generation of a moekit run opens the run's checkpoint (offload/load.py: "
                          "train.load_trained, train.checkpoint), public names only",
}

# Edges that break the rules today, each to be removed by the work named. At merge the lead empties
# this list (the test then fails on any edge left): keep it explicit, one edge per line.
ALLOWLIST: dict[tuple[str, str], str] = {}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[str, str, int]]:
    """(imported module, or module.name for a `from` import of a private name, kind, line) of every
    moekit import in `path`, at any depth. kind: "module" or "private"."""
    me = module_name(path, root)
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "module", node.lineno) for a in node.names if a.name.split(".")[0] == ROOT]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != ROOT:
                continue
            for a in node.names:
                sub = root.joinpath(*target.split(".")[1:], a.name)
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    found.append((f"{target}.{a.name}", "module", node.lineno))  # `from moekit import losses`
                elif a.name.startswith("_") and not a.name.startswith("__"):
                    found.append((f"{target}.{a.name}", "private", node.lineno))
                else:
                    found.append((target, "module", node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and node.args[0].value.split(".")[0] == ROOT):
            found.append((node.args[0].value, "module", node.lineno))
    return found


def violations(root: Path = SRC, allow: dict | None = None) -> list[str]:
    allow = ALLOWLIST if allow is None else allow
    out = []
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        src = package_of(me)
        for target, kind, line in imports_of(path, root):
            dst = package_of(target)
            where = f"{path.relative_to(root.parent)}:{line}: {me} imports {target}"
            if (me, target) in allow:
                continue
            if kind == "private" and dst != src:
                out.append(f"{where}: a private name of another package")
                continue
            if dst == src:
                continue
            if src == ROOT:
                if dst == "cli":
                    out.append(f"{where}: the package root imports the command line")
                continue
            if dst == ROOT:
                if src not in MAY_IMPORT_ROOT:
                    out.append(f"{where}: only {sorted(MAY_IMPORT_ROOT)} may import the package root")
                continue
            if src not in LEVEL or dst not in LEVEL:
                out.append(f"{where}: package {src if src not in LEVEL else dst!r} has no level in test_layering.py")
            elif LEVEL[dst] > LEVEL[src]:
                out.append(f"{where}: {src} (level {LEVEL[src]}) may not import {dst} (level {LEVEL[dst]})")
            elif LEVEL[dst] == LEVEL[src] and (src, dst) not in PEER_EDGES:
                out.append(f"{where}: {src} and {dst} are on one level and do not import each other")
    return out


def test_every_import_points_down():
    found = violations()
    assert not found, "import direction broken (see the docstring of tests/test_layering.py):\n" + "\n".join(found)


def test_every_allowlisted_edge_still_exists():
    # An edge that was removed must leave the list, so that the list only ever shrinks to empty.
    present = {(module_name(p, SRC), t) for p in SRC.rglob("*.py") for t, _, _ in imports_of(p, SRC)}
    stale = sorted(set(ALLOWLIST) - present)
    assert not stale, f"remove these edges from ALLOWLIST, they no longer exist: {stale}"


def test_every_package_has_a_level():
    pkgs = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
            if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert pkgs <= set(LEVEL), f"give these packages a level: {sorted(pkgs - set(LEVEL))}"


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    root = tmp_path / "moekit"
    files = {
        "__init__.py": "from moekit.config import Config\n",
        "errors.py": "",
        "config.py": "from moekit.routers import router_class\n",                  # upward, module level
        "routers/__init__.py": "",
        "routers/topk.py": ("def f():\n    from moekit.layers.moe import MoELayer\n"  # upward, late import
                            "from moekit.utils.io import _private\n"                  # another package's private
                            "from . import base\n"                                    # relative, same package: fine
                            "from ..losses import z_loss\n"),                         # relative, down: fine
        "routers/base.py": "",
        "losses.py": "",
        "utils/__init__.py": "",
        "utils/io.py": "def _private(): pass\n",
        "layers/__init__.py": "",
        "layers/moe.py": "import importlib\nimportlib.import_module('moekit.cli')\n",  # library imports cli
        "dispatch/__init__.py": "from moekit.experts import ExpertBank\n",        # peers on one level
        "experts/__init__.py": "",
        "models/__init__.py": "import moekit\n",                                     # root from below train
        "cli.py": "import moekit.train\nfrom moekit import losses\n",               # fine
        "train/__init__.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    found = sorted(v.split(": ", 1)[0] for v in violations(root, allow={}))
    assert found == ["moekit/config.py:1", "moekit/dispatch/__init__.py:1", "moekit/layers/moe.py:2",
                     "moekit/models/__init__.py:1", "moekit/routers/topk.py:2", "moekit/routers/topk.py:3"]
    assert violations(root, allow={("moekit.config", "moekit.routers"): "x"}) != violations(root, allow={})
