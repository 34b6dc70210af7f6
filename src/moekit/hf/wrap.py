"""wrap / unwrap: run a loaded transformers v5 MoE model's sparse blocks with moekit, and back.

    model = AutoModelForCausalLM.from_pretrained(...)
    moekit.hf.wrap(model)                   # every sparse MoE block -> HFMoEBlock (a MoELayer)
    with moekit.route(model, kind="topp", p=0.5):
        model.generate(...)
    moekit.hf.unwrap(model)                 # the original block modules, exactly

Stages of wrap:
  1. version guard (transformers >=5,<6)
  2. find blocks structurally (detect.py): a router `gate` plus stacked `experts`
  3. read each block's routing rule into a MoEConfig, and bind a HFMoEBlock to its Parameters
  4. verify (default on; for blocks whose weights are on the meta device, deferred to the block's first
     forward or `verify(model)`, once the weights exist): run the block and the HFMoEBlock on a probe input, the router alone in
     fp32 (selected experts exactly, weights to 1e-5) and the whole block in the model's dtype,
     its experts run by transformers' eager loop (the plain form of the block's math, and one that
     takes any expert width); a block that disagrees is refused with its class name, before
     anything is replaced
  5. swap the modules in place (all or nothing)
Nothing is copied, and dtype and device stay as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings

import torch
from torch import nn

from moekit.errors import UsageError
from moekit.hf.block import HFMoEBlock, recorded_router_output
from moekit.hf.detect import (
    DIVERGENT,
    PROBE_TOKENS,
    TESTED_BLOCKS,
    BlockSpec,
    UnsupportedBlockError,
    call_router,
    looks_like_moe_block,
    probe_token_ids,
    read_block,
    router_matches,
)
from moekit.hf.inline import (
    HFInlineMoE,
    InlineRouterCall,
    MoEChildren,
    inline_children,
    proxy_pairs,
)
from moekit.hf.private_api import (
    DECODE_SWITCH,
    INIT_HOOK,
    INIT_WALK,
    experts_implementation,
    forget_output_capturing,
    set_experts_implementation,
)
from moekit.hf.version import check_transformers_version
from moekit.layers import moe_layers


def wrap(model: nn.Module, *, backend: str = "auto", verify: bool = True) -> nn.Module:
    """Replace every sparse MoE block of `model` with an HFMoEBlock sharing its Parameters; in place.

    backend: the MoEConfig backend of the new layers ("auto" or "grouped_mm").
    verify: check each block against its own forward on a probe input first (cheap: 16 tokens).
    Idempotent: blocks already wrapped are left as they are. Returns `model`.
    """
    check_transformers_version()
    found = [(name, m) for name, m in _named_modules_outside_moekit(model) if looks_like_moe_block(m)]
    if not found:
        if any(isinstance(m, HFMoEBlock) for m in model.modules()):
            return model  # already wrapped
        raise UnsupportedBlockError(
            f"moekit.hf.wrap(): found no sparse MoE block in {type(model).__name__} (looked for a module with an "
            "`experts` child holding the experts' weights and a router beside it, as in transformers v5 "
            f"{', '.join(TESTED_BLOCKS)})")
    model_config = getattr(model, "config", None)
    new = []
    for name, block in found:
        children = inline_children(block)
        if children is not None:  # the MoE runs inside the decoder layer (Gemma 4): wrap its two children
            spec = read_block(MoEChildren(block, *children), model_config, backend)
            records = recorded_router_output(model, spec.gate)
            moe = (_defer_probe(HFInlineMoE(spec, records), model_config, backend) if verify and _on_meta(spec)
                   else _build(spec, records, verify, HFInlineMoE))
            new.extend(proxy_pairs(name, block, moe))
            continue
        spec = read_block(block, model_config, backend)
        records = recorded_router_output(model, spec.gate)
        if verify and _on_meta(spec):  # big-model loading: probe once the weights exist (`verify`)
            new.append((name, _defer_probe(HFMoEBlock(spec, records), model_config, backend)))
            continue
        new.append((name, _build(spec, records, verify)))
    for name, layer in new:
        _replace(model, name, layer)
    _refuse_experts_implementation_switch(model)
    blocks = [layer for _, layer in new if isinstance(layer, HFMoEBlock)]  # not Gemma 4's router stand-ins
    for hf_class in dict.fromkeys(layer.hf_class for layer in blocks if layer.hf_class in DIVERGENT):
        warnings.warn(f"moekit.hf.wrap: {DIVERGENT[hf_class]}", UserWarning, stacklevel=2)
    return model


def _build(spec: BlockSpec, recorded_output: int | None, verify: bool,
           cls: type[HFMoEBlock] = HFMoEBlock) -> HFMoEBlock:
    """The `cls` layer of the first reading (spec.cfg, then spec.alternatives) that reproduces the block on
    the probe; the first reading's refusal if none does."""
    if not verify:
        layer = cls(spec, recorded_output)
        layer.returns = _returns(spec, None, None)
        return layer
    first: UnsupportedBlockError | None = None
    for cfg in (spec.cfg, *spec.alternatives):
        reading = dataclasses.replace(spec, cfg=cfg, alternatives=[])
        layer = cls(reading, recorded_output)
        try:
            verify_block(reading, layer)
            return layer
        except UnsupportedBlockError as e:
            first = first or e
    raise first


def verify(model: nn.Module) -> nn.Module:
    """Run the parity probe `wrap` deferred for blocks whose weights were on the meta device (a model built
    with `torch.device("meta")`), now that they exist: each such block is read again from its own weights
    and kept only as a reading that reproduces it, exactly as `wrap` would have on a loaded model (all or
    nothing). A wrapped block runs this itself at its first forward. Raises UnsupportedBlockError as `wrap`
    does (weights still on the meta device included). Returns `model`."""
    pending = [m for m in model.modules() if isinstance(m, HFMoEBlock) and m.__dict__.get("_deferred")]
    built = [(layer, _reread(layer)) for layer in pending]
    for layer, new in built:
        _become(layer, new)
    return model


def _on_meta(spec: BlockSpec) -> bool:
    return any(t.is_meta for t in (spec.router_weight, spec.expert_weight))


def _defer_probe(layer: HFMoEBlock, model_config, backend: str) -> HFMoEBlock:
    """Mark a layer built on meta weights (the first reading, unverified) to be probed at its first forward."""
    layer._deferred = (model_config, backend)
    layer._deferred_hook = layer.register_forward_pre_hook(_probe_at_first_forward)
    return layer


def _probe_at_first_forward(layer: HFMoEBlock, args) -> None:
    """Forward pre-hook of a deferred layer: read and probe its block now that the weights exist, once."""
    _become(layer, _reread(layer))


def _reread(layer: HFMoEBlock) -> HFMoEBlock:
    """The verified reading of a deferred layer's block (the HF block holding the layer's tensors now)."""
    return _build(read_block(HFMoEBlock.original(layer), *layer._deferred), layer.recorded_output, True,
                  type(layer))


def _become(layer: HFMoEBlock, verified: HFMoEBlock) -> None:
    """Turn `layer` (the same object: its parent, `wrapped_blocks` and user references stay valid) into the
    verified reading `verified` of the same block; the hooks others registered on `layer` are kept, the
    deferral hook and the meta-state hook are dropped (the verified reading is built on real weights)."""
    layer._deferred_hook.remove()
    if "_materialise_hook" in layer.__dict__:
        layer._materialise_hook.remove()
    hooks = {k: v for k, v in layer.__dict__.items() if k.startswith(("_forward_", "_backward_"))}
    layer.__dict__.clear()
    layer.__dict__.update(verified.__dict__)
    layer.__dict__.update(hooks)


def unwrap(model: nn.Module) -> nn.Module:
    """Put every wrapped block's original transformers module back; in place. Returns `model`."""
    blocks = [(name, layer.original()) for name, layer in model.named_modules()
              if isinstance(layer, HFMoEBlock | InlineRouterCall)]
    for name, block in blocks:  # every block was ready before the first is replaced: all or nothing
        _replace(model, name, block)
    for m in model.modules():
        for attr in _GUARDED:
            m.__dict__.pop(attr, None)
    if blocks:
        forget_output_capturing(model)  # hooked while wrapped: the restored routers need theirs
    return model


def wrapped_blocks(model: nn.Module) -> list[HFMoEBlock]:
    """The HFMoEBlocks of a wrapped model, in module order (the order of `moekit.route(layers=...)`)."""
    return [m for m in moe_layers(model) if isinstance(m, HFMoEBlock)]


def verify_block(spec: BlockSpec, layer: HFMoEBlock) -> None:
    """Refuse a block whose output moekit's reading does not reproduce on a probe input."""
    block, cfg = spec.block, spec.cfg
    weight = spec.expert_weight
    if weight.is_meta:
        raise UnsupportedBlockError(f"moekit.hf cannot verify {spec.class_name}: its weights are on the meta "
                                    "device (not loaded yet); load them (e.g. load_state_dict(..., assign=True), or "
                                    "to_empty() and copy) before the first forward, or pass verify=False")
    # Weights not initialised yet (torch.empty: NaN or garbage) give a probe nothing to compare: say so, rather
    # than blame the routing rule (transformers builds models so, e.g. under its tests' skip_weight_init).
    tensors = [("router", spec.router_weight)] + [
        (n, t) for name, v in spec.bank.items()
        for n, t in (((f"{name}.{k}", p) for k, p in v.named_parameters()) if isinstance(v, nn.Module) else ((name, v),))]
    bad = [n for n, t in tensors if not bool(t.isfinite().all())]
    if bad:
        raise UnsupportedBlockError(f"moekit.hf cannot verify {spec.class_name}: its weights {bad} are not finite "
                                    "(not initialised yet?); initialise or load them first, or pass verify=False")
    gen = torch.Generator().manual_seed(0)
    x_BTD = torch.randn(1, PROBE_TOKENS, cfg.d_model, generator=gen, dtype=torch.float32).to(device=weight.device, dtype=weight.dtype)
    modes = (block.training, layer.training)
    block.eval()
    layer.eval()
    # A deferred probe runs inside the model's first forward: under `output_router_logits=True` the probe's own
    # router logits must not join the ones transformers collects for that forward.
    records, layer.records_router_logits = layer.records_router_logits, False
    gate_dims = []  # how the block calls its router: (B, T, D) (Switch: its logits keep the batch dims) or (T, D)
    hook = spec.gate.register_forward_pre_hook(lambda _m, args: gate_dims.append(args[0].dim()) if args else None)
    try:
        with torch.no_grad():
            ids = _token_ids(spec, PROBE_TOKENS)
            with _eager_experts(spec.experts), _kept_attributes(spec.gate):
                out_hf = block(x_BTD, **ids)
            hook.remove()
            if gate_dims:  # NLLB-MoE's router, called on (T, D), returns (B, T, E) logits for a (B, T, D) input
                layer.router_logits_keep_batch = layer.router_logits_keep_batch and gate_dims[0] == 3
            y_hf = out_hf[0] if isinstance(out_hf, tuple) else out_hf
            if not bool(y_hf.float().norm(dim=-1).isfinite().all()):  # garbage weights (torch.empty) overflow
                raise UnsupportedBlockError(f"moekit.hf cannot verify {spec.class_name}: its own output on the probe "
                                            "is not finite or overflows (weights not initialised yet?); initialise "
                                            "or load them first, or pass verify=False")
            _verify_router(spec, layer, x_BTD.reshape(-1, cfg.d_model).float(), required=spec.class_name in DIVERGENT)
            layer.returns = _returns(spec, out_hf, PROBE_TOKENS)
            y_mk = layer(x_BTD, **ids)
            y_mk = y_mk[0] if isinstance(y_mk, tuple) else y_mk
            if spec.class_name in DIVERGENT:
                # Its own forward is not the authors' rule (DIVERGENT): the router is checked above, each expert
                # module when it was read (detect._read_listed), the dispatch by tests against the authors' code.
                y_hf = y_mk
            # per token, whatever shape the block returns them in (ERNIE-VL's blocks: flattened)
            y_hf, y_mk = y_hf.reshape(-1, cfg.d_model), y_mk.reshape(-1, cfg.d_model)
    finally:
        hook.remove()
        block.train(modes[0])
        layer.train(modes[1])
        layer.records_router_logits = records
        layer._info = None  # the probe is not a forward the user ran
    # Per-token relative error. fp32: every token to 1e-3 (both sides run the same fp32 router math).
    # bf16/fp16: the gate runs where transformers' does (RouterConfig.gate_dtype), but the experts round in
    # another order, so a near-tie of a later sum may pick another expert; a wrong rule is off on most tokens.
    err_T = ((y_mk - y_hf).float().norm(dim=-1) / y_hf.float().norm(dim=-1).clamp(min=1e-6)).flatten()
    low = weight.dtype in (torch.bfloat16, torch.float16)
    tol, allowed = (5e-2, 0.25) if low else (1e-3, 0.0)
    bad = float((err_T > tol).float().mean())
    if not torch.isfinite(err_T).all() or bad > allowed:
        raise UnsupportedBlockError(
            f"moekit.hf cannot wrap {spec.class_name}: read as {cfg.router.describe()}"
            f"{', shared expert' if cfg.num_shared_experts else ''}{' (sigmoid-gated)' if cfg.shared_gate else ''}, "
            f"moekit's output differs from the block's own on a probe input ({bad:.0%} of {PROBE_TOKENS} tokens off by "
            f"more than {tol:g} relative, max {float(err_T.max()):.3g}); its forward does something moekit's "
            "MoELayer does not (pass verify=False to skip this check at your own risk)")


@contextlib.contextmanager
def _eager_experts(experts: nn.Module):
    """Run a transformers experts module with its eager loop inside the block.

    NOTE: transformers' default `grouped_mm` experts crash inside torch._grouped_mm on expert widths
    whose rows are not 16-byte aligned (F = 37 in its own tiny test configs), so the probe would
    refuse a block moekit runs fine. Only this config object is switched (not its sub-configs), and
    only for the probe."""
    config = getattr(experts, "config", None)  # set by transformers' @use_experts_implementation
    current = None if config is None else experts_implementation(config)
    if current is None or current == "eager":
        yield
        return
    set_experts_implementation(config, "eager")
    try:
        yield
    finally:
        set_experts_implementation(config, current)


@contextlib.contextmanager
def _kept_attributes(module: nn.Module):
    """The module's plain attributes as they were after the probe: transformers' NLLB router keeps the
    capacity of its last eval forward as its own `expert_capacity` (then used in training)."""
    before = {k: v for k, v in vars(module).items() if isinstance(v, int | float | bool | str | type(None))}
    try:
        yield
    finally:
        module.__dict__.update(before)


@contextlib.contextmanager
def _stub(experts: nn.Module):
    """The experts module returning zeros shaped as its input (no data-dependent expert loop on meta tensors)."""
    experts.forward = lambda hidden_states, *args, **kwargs: torch.zeros_like(hidden_states)
    try:
        yield
    finally:
        del experts.forward


def _verify_router(spec: BlockSpec, layer: HFMoEBlock, x_TD: torch.Tensor, required: bool = False) -> None:
    """The HF router's own choice (where its output states one, see `call_router`) against moekit's fp32
    router: the same experts for every token and the same weights, free of rounding. `required`: a router
    whose output states no choice is refused (the block's own output cannot be the check)."""
    hf = call_router(spec, x_TD)
    if hf is None and required:
        raise UnsupportedBlockError(f"moekit.hf cannot wrap {spec.class_name}: its router's output on a probe states "
                                    "no choice moekit can read, and its block's own forward is not the check")
    if hf is None:
        return  # the block selects: the block probe decides
    k = round(layer.cfg.router.expected_experts_per_token(layer.cfg.router_slots))
    if hf[1].shape[-1] != k:
        raise UnsupportedBlockError(f"moekit.hf cannot wrap {spec.class_name}: its router picks {hf[1].shape[-1]} "
                                    f"experts per token, moekit read {layer.cfg.router.describe()}")
    if not router_matches(spec, layer.cfg.router, x_TD, hf):
        raise UnsupportedBlockError(
            f"moekit.hf cannot wrap {spec.class_name}: its router ({type(spec.gate).__name__}) and moekit's reading "
            f"of it ({layer.cfg.router.describe()}) pick other experts or weights on a probe input; its routing "
            "rule is not one moekit has")


def _returns(spec: BlockSpec, out, num_tokens: int | None) -> str | None:
    """How the block returns (see HFMoEBlock._as_hf), from its output on the probe (`out`), or, without
    one, from a one-token call (on meta weights, a meta call with the experts stubbed: the block's own code
    decides what it returns, the experts only fill the hidden states, which have no values there)."""
    if out is None:
        weight = spec.expert_weight
        x = torch.zeros(1, 1, spec.cfg.d_model, device=weight.device, dtype=weight.dtype)
        was = spec.block.training
        spec.block.eval()
        try:
            with torch.no_grad(), _eager_experts(spec.experts) if not weight.is_meta else _stub(spec.experts), \
                    _kept_attributes(spec.gate):
                out = spec.block(x, **_token_ids(spec, 1))
        finally:
            spec.block.train(was)
        num_tokens = 1
    if isinstance(out, torch.Tensor):
        return None
    E, K = spec.cfg.router_slots, spec.cfg.router.k
    if isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out) and \
            tuple(out[0].shape) == (num_tokens * spec.cfg.d_model,) and tuple(out[1].shape) == (num_tokens * E,):
        return "flat_logits"  # ERNIE-4.5-VL's text and vision blocks: both flattened, for its modality split
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], torch.Tensor):
        shape = tuple(out[1].shape)
        if shape == (num_tokens, E):
            return "logits_TE"
        if shape == (num_tokens, K):
            return "weights_TK"
    raise UnsupportedBlockError(f"moekit.hf cannot wrap {spec.class_name}: it returns "
                                f"{type(out).__name__} {_shapes(out)}; moekit reproduces a tensor, or a pair "
                                f"(hidden, router logits (T, E) or chosen weights (T, K))")


def _token_ids(spec: BlockSpec, num_tokens: int) -> dict:
    """{"input_ids": (1, num_tokens)} for a block whose forward takes the token ids (hash routing), else {}."""
    if "input_ids" not in inspect.signature(spec.block.forward).parameters:
        return {}
    return {"input_ids": probe_token_ids(spec, num_tokens, spec.router_weight.device).reshape(1, -1)}


def _shapes(out) -> str:
    return str([tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in out]) \
        if isinstance(out, tuple) else ""


# Instance attributes wrap() sets on transformers (sub)models holding wrapped blocks; unwrap() removes them.
_GUARDED = ("set_experts_implementation", DECODE_SWITCH, INIT_HOOK, INIT_WALK)


def _refuse_experts_implementation_switch(model: nn.Module) -> None:
    """`set_experts_implementation` on a (sub)model holding wrapped blocks raises: moekit runs those
    experts, so switching transformers' implementation would silently change nothing. generate()'s own
    switch to 'batched_mm' for decoding on GPUs (DECODE_SWITCH) becomes a no-op: moekit picks its GEMM
    path per call."""
    for m in model.modules():
        if callable(getattr(type(m), "set_experts_implementation", None)) and \
                any(isinstance(b, HFMoEBlock) for b in m.modules()):
            m.set_experts_implementation = functools.partial(_experts_implementation_refused, type(m).__name__)
            if callable(getattr(type(m), DECODE_SWITCH, None)):
                setattr(m, DECODE_SWITCH, contextlib.nullcontext)
            if callable(getattr(type(m), INIT_HOOK, None)):
                setattr(m, INIT_HOOK, functools.partial(_init_wrapped, getattr(m, INIT_HOOK)))
            if callable(getattr(type(m), INIT_WALK, None)):
                inside = {id(x) for b in m.modules() if isinstance(b, HFMoEBlock) for x in b.modules() if x is not b}
                setattr(m, INIT_WALK, functools.partial(_initialize_wrapped, m, inside))


def _init_wrapped(init_weights, module: nn.Module) -> None:
    """transformers' `_init_weights(module)` on a wrapped model: a wrapped block is initialised as its
    original block would be (the same Parameter objects, so in place for moekit too)."""
    if isinstance(module, HFMoEBlock):
        for root in module.hf_modules():
            for sub in _children_first(root):
                init_weights(sub)
        module.reset_moekit_state()
    elif not isinstance(module, InlineRouterCall):  # its HF router is initialised through its HFInlineMoE
        init_weights(module)


def _initialize_wrapped(model: nn.Module, inside: set[int], module: nn.Module, *args, **kwargs) -> None:
    """transformers' `_initialize_weights(module)`, the step of `initialize_weights`' walk (children first;
    what init_weights and from_pretrained's missing-weight init run), on a wrapped model: a wrapped block's
    original modules each take that step, in the order the walk visits them in the unwrapped model, so that
    each is initialised once, with its own flag check and whatever the class's step adds (a seed per module in
    transformers' tests): the same draws as unwrapped. The wrapped layer's own children (`inside`: moekit's
    router and bank, the HF shared-expert Linears it holds) are reached through the block, not on their own."""
    step = getattr(type(model), INIT_WALK)  # looked up per call: a wrapper patched onto the class applies
    if isinstance(module, HFMoEBlock):
        for root in module.hf_modules():
            for sub in _children_first(root):
                step(model, sub, *args, **kwargs)
        module.reset_moekit_state()
    elif id(module) not in inside and not isinstance(module, InlineRouterCall):
        step(model, module, *args, **kwargs)


def _children_first(module: nn.Module):
    for child in module.children():
        yield from _children_first(child)
    yield module


def _experts_implementation_refused(model_class: str, *args, **kwargs) -> None:
    raise UsageError(f"{model_class}.set_experts_implementation(): its MoE blocks are wrapped by moekit.hf, which "
                     "runs their experts itself (torch._grouped_mm or a per-expert loop, chosen per GEMM); "
                     "call moekit.hf.unwrap(model) first to use transformers' experts implementations")


def _named_modules_outside_moekit(model: nn.Module):
    """named_modules() without descending into moekit layers (already wrapped blocks)."""
    skip: list[str] = []
    for name, m in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, HFMoEBlock):
            skip.append(name)
            continue
        yield name, m


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise UnsupportedBlockError("moekit.hf.wrap(): pass the whole model, not a single MoE block")
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)
