"""The transformers versions moekit.hf understands.

moekit.hf reads the transformers v5 module layout (stacked `gate_up_proj` (E, 2F, D) experts, routers
returning `(logits, weights, indices)`). transformers 4.x stores experts as a ModuleList of Linear
layers, and a future major version may change the layout again: both would surface as a confusing
shape or attribute error deep inside wrap(), so the version is checked first.
"""

from __future__ import annotations

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

SUPPORTED_TRANSFORMERS = ">=5.0,<6"  # keep in step with pyproject.toml


def check_transformers_version() -> str:
    """Return the installed transformers version; raise RuntimeError if moekit.hf does not support it."""
    installed = transformers.__version__
    try:
        ok = SpecifierSet(SUPPORTED_TRANSFORMERS).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise RuntimeError(f"moekit.hf supports transformers {SUPPORTED_TRANSFORMERS} (the v5 stacked-experts layout); "
                           f"transformers {installed} is installed. Install a supported version, e.g. "
                           f"pip install 'transformers{SUPPORTED_TRANSFORMERS}'")
    return installed
