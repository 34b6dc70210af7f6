"""pytest plugin: run transformers' own model tests with every model wrapped by `moekit.hf.wrap`.

Loaded by the conftest.py that fetch_tests.py writes at the root of the test cache; active only with
`--moekit-wrap`. The hook is `PreTrainedModel.post_init`, the last call of every transformers model's
`__init__` (top-level and nested models, `from_config`, `from_pretrained`, direct construction), so no model
a test builds escapes it:

  - a model with no module that looks like a sparse MoE block is left alone (counted as `no_block`);
  - a model whose weights are on the meta device (from_pretrained builds the skeleton there and loads the
    weights afterwards), or not initialised yet (built under the tests' `skip_weight_init`, whose weights
    `init_weights` fills later: not finite, or finite garbage the probe names by its non-finite output), is
    wrapped with `verify=False`, since the parity probe needs real
    weights (counted as `unverified`; issue #14 item 4 asks for a deferred probe);
  - otherwise `moekit.hf.wrap(model)` with its parity probe; a refusal (UnsupportedBlockError) propagates, so
    the test fails with moekit's message.

`--moekit-config-override hidden_act=silu,intermediate_size=48` (both runs, wrapped or not) sets those config
attributes, where the config has them, at the start of every model construction (PreTrainedModel.__init__): a
diagnostic variant that takes the tiny configs' GELU activation and F=37 width out of the comparison, so that
the failures behind them show. It changes the tests' configs; the unchanged run is the reference.

Nested models are wrapped by the innermost post_init first; the outer call finds them wrapped (wrap is
idempotent). With MOEKIT_WRAP_STATS=<path>, the counts are written there as JSON at the end of the session
(run_external.py checks that a wrapped run wrapped something).
"""

from __future__ import annotations

import json
import os

STATS = {"wrapped": 0, "unverified": 0, "refused": 0, "already_wrapped": 0, "no_block": 0}


def pytest_addoption(parser):
    parser.addoption("--moekit-wrap", action="store_true", default=False,
                     help="wrap every transformers model with moekit.hf.wrap right after construction")


    parser.addoption("--moekit-config-override", default="",
                     help="KEY=VALUE[,KEY=VALUE...]: config attributes set before every model construction")


def pytest_configure(config):
    overrides = parse_overrides(config.getoption("--moekit-config-override"))
    if overrides:
        install_config_override(overrides)
    if config.getoption("--moekit-wrap"):
        install()


def parse_overrides(text: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--moekit-config-override: expected KEY=VALUE, got {item!r}")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def install_config_override(overrides: dict) -> None:
    """Set `overrides` on the config (and its text config) where those attributes exist, before any module is
    built: every transformers model's __init__ starts with super().__init__(config)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.__init__
    if getattr(original, "_moekit_original", None) is not None:
        original = original._moekit_original

    def __init__(self, config, *args, **kwargs):
        for cfg in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            for key, value in overrides.items():
                if hasattr(cfg, key) and getattr(cfg, key) is not None:
                    setattr(cfg, key, value)
        original(self, config, *args, **kwargs)

    __init__._moekit_original = original
    PreTrainedModel.__init__ = __init__


def pytest_unconfigure(config):
    uninstall()
    path = os.environ.get("MOEKIT_WRAP_STATS")
    if path and config.getoption("--moekit-wrap"):
        with open(path, "w") as f:
            json.dump(STATS, f)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.getoption("--moekit-wrap"):
        terminalreporter.write_line(
            f"moekit-wrap: {STATS['wrapped']} model constructions wrapped ({STATS['unverified']} without the parity "
            f"probe: meta or uninitialised weights), {STATS['refused']} refused, {STATS['already_wrapped']} outer "
            f"models of wrapped ones, "
            f"{STATS['no_block']} without a sparse block")


def install() -> None:
    """Patch PreTrainedModel.post_init so that every constructed model is wrapped; idempotent."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.post_init
    if getattr(original, "_moekit_original", None) is not None:
        return

    def post_init(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        wrap_constructed(self)
        return out

    post_init._moekit_original = original
    PreTrainedModel.post_init = post_init


def uninstall() -> None:
    """Undo install() and install_config_override()."""
    from transformers import PreTrainedModel

    for name in ("post_init", "__init__"):
        original = getattr(getattr(PreTrainedModel, name), "_moekit_original", None)
        if original is not None:
            setattr(PreTrainedModel, name, original)


def wrap_constructed(model) -> None:
    import moekit.hf
    from moekit.hf.detect import looks_like_moe_block

    if not any(looks_like_moe_block(m) for m in model.modules()):
        # an outer model whose inner model's post_init already wrapped the blocks, or a model without any
        STATS["already_wrapped" if moekit.hf.wrapped_blocks(model) else "no_block"] += 1
        return
    unready = any(p.is_meta or not bool(p.isfinite().all()) for p in model.parameters())
    try:
        moekit.hf.wrap(model, verify=not unready)
    except moekit.hf.UnsupportedBlockError as e:
        if "not initialised yet?" not in str(e):  # finite garbage: the probe says its output is not finite
            STATS["refused"] += 1
            raise
        moekit.hf.wrap(model, verify=False)
        unready = True
    STATS["wrapped"] += 1
    STATS["unverified"] += int(unready)
