"""HFMoEBlock: moekit's MoELayer running a transformers sparse MoE block on the block's own weights.

What is shared with the wrapped block (the same Python objects, nothing copied), whatever the HF names
(found by role, see detect.py):
  HF block                                  HFMoEBlock
  router weight (E, D) [, logit bias (E,)]  router.weight [, router.bias]   (`gate`, `router`, `gate.wg`, ...)
  selection bias (E,), router's or block's  router.e_score_correction_bias   (DeepSeek-V3 rule)
  experts' stacks and biases                experts.* (an ExpertBank with the block's ExpertLayout)
  shared expert {gate,up,down}_proj         shared_experts.{gate,up,down}_proj   (the Linear modules)
  latent projections D->l, l->D             fc1_latent_proj, fc2_latent_proj      (the Linear modules)
  separate expert modules' Linear layers    experts.in_proj[e], experts.out_proj[e] (ExpertLayout(listed))
  block output bias (D,) / output norm      output_bias / output_norm.weight
  shared-expert gate Linear(D, 1)           shared_expert_gate                    (the Linear module)

The forward takes and returns what the HF block does: hidden states (B, T, D) -> (B, T, D), or the
tuple some blocks return (`_as_hf`).
`state_dict()` uses the HF block's names (gate.weight, shared_expert.*, ...) and drops moekit-only
state (routing statistics; a router whose HF block has no selection bias holds none), so a wrapped model saves
and loads as the original; `load_state_dict` accepts those names back. The original block is kept, unregistered,
for `moekit.hf.unwrap`.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from moekit.config import RouterConfig
from moekit.errors import UsageError
from moekit.experts.bank import STANDARD, ExpertBank
from moekit.hf.detect import BlockSpec, UnsupportedBlockError, router_caller
from moekit.hf.private_api import OutputRecorder, active_collector, record_specs, trainer_parameter_names
from moekit.layers.moe import MoELayer
from moekit.routers.base import RouterOutput


class HFMoEBlock(MoELayer):
    """A MoELayer bound to one transformers MoE block (see the module doc); built by `moekit.hf.wrap`.

    `hf_class` names the wrapped block's class; `original()` returns the block itself.
    `recorded_output`: the index of the HF router's output that transformers records as `router_logits`
    under `output_router_logits=True` (`recorded_router_output`), None where it records none of its outputs."""

    def __init__(self, spec: BlockSpec, recorded_output: int | None = None):
        # Built on the meta device: every weight is replaced by the block's own Parameter below, and a
        # real allocation (and random init) of E experts would cost a pretrained model's memory twice.
        with torch.device("meta"):
            super().__init__(spec.cfg)
            if spec.layout != STANDARD:  # the block's own storage, read in place (views, never copies)
                self.experts = ExpertBank(spec.cfg.num_experts, spec.cfg.expert_dim, spec.cfg.d_expert,
                                          self.experts.act, spec.layout,
                                          hidden_dropout=spec.cfg.expert_hidden_dropout)
        # The placeholders, held so that their ids stay theirs: "not bound" is "still a placeholder", not "on
        # the meta device" (a model built under `with torch.device("meta")` has every tensor there).
        placeholders = list(self.state_dict(keep_vars=True).values())
        placeholder_ids = {id(t) for t in placeholders}
        block = spec.block
        device = spec.router_weight.device
        self.router.weight = spec.router_weight
        if spec.router_bias is not None:
            self.router.bias = spec.router_bias
        if spec.selection_bias is not None:
            self.router.e_score_correction_bias = spec.selection_bias
        elif callable(getattr(self.router, "drop_selection_bias", None)) and not spec.cfg.router.updates_selection_bias():
            self.router.drop_selection_bias()  # the HF router has none: no zero one added per call either
        for name, tensor in spec.router_tensors.items():  # a hash router's token id -> experts table
            setattr(self.router, name, tensor)
        for name, tensor in spec.bank.items():
            setattr(self.experts, name, tensor)
        if spec.shared is not None:  # the HF Linear modules, biases included
            if isinstance(getattr(spec.shared, "gate_up_proj", None), nn.Linear):  # fused [gate; up]
                self.shared_experts.gate_proj = self.shared_experts.up_proj = None
                self.shared_experts.gate_up_proj = spec.shared.gate_up_proj
            for name in ("gate_proj", "up_proj", "down_proj"):
                if getattr(self.shared_experts, name) is not None:
                    setattr(self.shared_experts, name, getattr(spec.shared, name))
        if spec.shared_bank is not None:  # router-weighted shared experts: the HF stacks, read in place
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(self.shared_experts, name, getattr(spec.shared_bank, name))
        if spec.latent is not None:  # the HF Linear modules, biases included
            self.fc1_latent_proj, self.fc2_latent_proj = spec.latent
        if spec.output_bias is not None:
            self.output_bias = spec.output_bias
        if spec.output_norm is not None:
            self.output_norm.weight = spec.output_norm.weight
        if spec.latent_norm is not None:
            self.latent_norm.weight = spec.latent_norm.weight
        if spec.expert_output_norm is not None:
            self.expert_output_norm.weight = spec.expert_output_norm.weight
        if spec.shared_gate is not None:
            self.shared_expert_gate = spec.shared_gate
        # moekit-only state (routing statistics) on the block's device.
        for module in self.modules():
            for name, buf in module.named_buffers(recurse=False):
                if id(buf) in placeholder_ids:
                    setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype, device=device))
        left = [n for n, t in self.state_dict(keep_vars=True).items() if id(t) in placeholder_ids]
        del placeholders
        if left:
            raise RuntimeError(f"HFMoEBlock: {left} of {spec.class_name} were not bound to the block's tensors")

        # HF name of each shared tensor, by identity; HF tensors moekit does not use mean a wrong reading.
        hf_names = {id(t): n for n, t in block.state_dict(keep_vars=True).items()}
        mine = self.state_dict(keep_vars=True)
        self._hf_names = {n: hf_names[id(t)] for n, t in mine.items() if id(t) in hf_names}
        self._hf_order = list(block.state_dict(keep_vars=True))
        self._moekit_only = [n for n in mine if n not in self._hf_names]
        unused = sorted(set(self._hf_order) - set(self._hf_names.values()))
        if unused:
            raise UnsupportedBlockError(f"moekit.hf cannot wrap {spec.class_name}: its tensors {unused} have no "
                                        "place in moekit's MoELayer")
        # Every HF state_dict key resolves on this layer (`model.get_parameter(key)`; transformers' loading
        # walks the same path): a first name moekit lacks is an alias (`_hf_children`: gate -> router,
        # shared_expert -> shared_experts, JetMoE's bias -> output_bias, or the HF child itself where the
        # names below it differ too, JetMoE's input_linear); deeper names moekit lacks (`router.classifier`,
        # `gate.wg`, Switch's `experts.expert_0.wi`) are unregistered attributes leading to the module that
        # holds the tensor: moekit's own, or the HF one where moekit holds the HF module itself. Nothing is
        # registered twice (state_dict has each tensor once).
        self._hf_children = {}
        hf_modules = {id(m) for m in block.modules()}
        block_buffers = {f"{m}.{b}" if m else b for m, module in self.named_modules() for b in module._buffers}
        forwards: dict[str, tuple[str, str]] = {}  # a buffer of the HF block itself -> moekit's (owner, name)
        for mine, theirs in self._hf_names.items():
            (m_owner, _, m_leaf), (t_owner, _, t_leaf) = mine.rpartition("."), theirs.rpartition(".")
            if not t_owner:  # a tensor of the HF block itself (JetMoE's bias, MiniMax-M2's selection bias)
                if t_leaf not in self._parameters and t_leaf not in self._buffers:
                    self._hf_children.setdefault(t_leaf, mine)  # a dotted path: read when asked (buffers move)
                    if m_owner and mine in block_buffers:
                        forwards[t_leaf] = (m_owner, m_leaf)
                continue
            head, *rest = t_owner.split(".")
            if head not in self._modules:
                # moekit lacks the HF child: alias moekit's child holding the tensor; the HF child itself where
                # moekit reads the tensor from that very module; else a stand-in whose HF names reach moekit's
                # tensors (JetMoE's input_linear.weight is the bank's gate_up_proj): setting the HF child's own
                # attribute would leave moekit's tensor as it was
                same_path = m_owner and (m_owner.split(".")[1:] == rest) and m_leaf == t_leaf
                if m_owner and (same_path or m_leaf == t_leaf):
                    alias = m_owner.split(".")[0]
                elif block.get_submodule(t_owner) is self.get_submodule(m_owner):
                    alias = block.get_submodule(head)
                else:
                    alias = _HFPath()
                self._hf_children.setdefault(head, alias)
            if not m_owner:
                continue
            target = self.get_submodule(m_owner)
            alias = self._hf_children.get(head, head)
            module = alias if isinstance(alias, nn.Module) else self._modules.get(alias)
            path = head
            for part in rest:
                path = f"{path}.{part}"
                if part in module._modules:
                    module = module._modules[part]
                elif isinstance(module.__dict__.get(part), nn.Module):
                    module = module.__dict__[part]
                elif part in module.__dict__ or hasattr(type(module), part):
                    module = None  # a name moekit's module uses otherwise: this key stays unresolved
                    break
                else:
                    nxt = block.get_submodule(path) if id(target) in hf_modules else target
                    object.__setattr__(module, part, nxt)
                    module = nxt
            if module is target and t_leaf != m_leaf and not hasattr(target, t_leaf):
                # same module, another name (gpt-oss's experts.gate_up_proj_bias = moekit's in_proj_bias, DBRX's
                # experts.mlp.w1 = gate_proj): the bank answers to both, read and set live, so that transformers'
                # loading (getattr, then setattr of the HF name) and torch.func.functional_call reach the bank's
                # own tensor instead of a second attribute that nothing reads
                if type(target) in (ExpertBank, HFNamedExpertBank):
                    target.__class__ = HFNamedExpertBank  # the same object and tensors, one more way to name them
                    target.__dict__.setdefault("_hf_leaves", {})[t_leaf] = (None, m_leaf)
                else:  # Gemma 4's router.per_expert_scale: a fixed reference (replacing the tensor leaves it behind)
                    object.__setattr__(target, t_leaf, _get_tensor(self, mine))
            elif isinstance(module, _HFPath):
                module._hf_leaves[t_leaf] = (target, m_leaf)
        if forwards:  # torch's get_buffer / functional_call / setattr of the HF name reach moekit's buffer
            self.__dict__["_buffers"] = _ForwardingBuffers(self._buffers, self._modules, forwards)
        self.register_state_dict_post_hook(_state_dict_to_hf)
        self.register_load_state_dict_pre_hook(_load_hf_names)

        self.hf_class = spec.class_name
        self._hf_num_experts = spec.cfg.router_slots  # router columns the block's own code expects (unwrap checks)
        # The HF router's weights are this layer's / router_weight_scale (a scale its block applies after combining).
        self.router_weight_scale = spec.router_weight_scale
        # The dtype of each output of the HF router, as a rule of its weight's dtype (see `_router_output_dtypes`):
        # what moekit hands transformers in the HF router's place is cast to it (moekit routes in fp32).
        self._router_dtypes = _router_output_dtypes(spec)
        self.returns: str | None = None  # set by moekit.hf.wrap from the block's own output (see `_as_hf`)
        self.recorded_output = recorded_output
        self.records_router_logits = recorded_output is not None
        self._recorded_dtype = (self._router_dtypes[recorded_output][1]
                                if self.records_router_logits and recorded_output < len(self._router_dtypes) else None)
        self.router_logits_keep_batch = self.records_router_logits and _router_keeps_batch_dims(spec)
        self.reads_padding_mask = spec.reads_padding_mask
        object.__setattr__(self, "_hf_block", block)  # not a submodule: no second copy in state_dict / .to()
        self.train(block.training)
        if device.type == "meta":  # built before the weights exist: moekit's own state follows them at first use
            self._materialise_hook = self.register_forward_pre_hook(_materialise_moekit_state)

    def reset_moekit_state(self) -> None:
        """moekit's own buffers (routing statistics, a selection bias trained on a family without one: nothing
        the HF block holds) back to their initial zeros, on the device of the block's weights. transformers'
        `init_weights` reaches them through this (after `to_empty` they hold whatever memory they got)."""
        hf = {id(t) for t in self._hf_block.state_dict(keep_vars=True).values()}
        device = self.router.weight.device
        for module in self.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None and id(buf) not in hf:
                    module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The HF block's call: hidden states (B, T, D) -> (B, T, D). moekit callers may pass a (B, T) padding
        mask, as to any MoELayer; NLLB-MoE's layers pass their 4-D attention mask (B, 1, Q, K), additive (0:
        attend) or boolean (True: attend), read as its router reads it where it does (`reads_padding_mask`):
        the last query row, at the tokens' own key columns (transformers' NLLB router reads the last B*Q
        entries of the flattened rows, the same whenever Q = K or B = 1). `input_ids` (B, T): the token ids,
        which blocks of families with hash routing take (DeepSeek-V4); a router that routes on them gets them
        as its state."""
        if padding_mask is not None and padding_mask.dim() == 4:
            row_BT = padding_mask[:, 0, -1, -hidden_states.shape[-2]:]
            padding_mask = (row_BT if row_BT.dtype == torch.bool else row_BT == 0) if self.reads_padding_mask else None
        state = input_ids if self.router.cfg.routes_on_token_ids() else None
        if self.returns == "flat_logits" and hidden_states.dim() == 1:
            hidden_states = hidden_states.view(-1, self.cfg.d_model)  # ERNIE-VL's modality split passes it flat
        # Where transformers' `output_router_logits=True` collects router logits (None outside such a forward).
        collected = active_collector.get() if self.records_router_logits else None
        if collected is None or "router_logits" not in collected:
            return self._as_hf(super().forward(hidden_states, padding_mask, router_state=state))
        # `output_router_logits=True`: hand transformers the (T, E) router logits, with their gradient
        # (routing_info() keeps a detached copy), as its own router would have.
        logits = []
        handle = self.router.register_forward_hook(lambda _m, _a, route: logits.append(route.logits_TE))
        try:
            y = super().forward(hidden_states, padding_mask, router_state=state)
        finally:
            handle.remove()
        # in the shape the HF router returns them: (T, E), or (B, T, E) where it keeps the batch dims (Switch)
        logits_TE = self.as_router_dtype(logits[0], self._recorded_dtype)
        collected["router_logits"].append(logits_TE.view(*hidden_states.shape[:-1], -1)
                                          if self.router_logits_keep_batch else logits_TE)
        return self._as_hf(y)

    @property
    def returns(self) -> str | None:
        """What the block returns besides the hidden states (see `_as_hf`); None: the hidden states only."""
        return self.__dict__["_returns"]

    @returns.setter
    def returns(self, kind: str | None) -> None:
        self.__dict__["_returns"] = kind
        # the dtype rule of the HF router output the block returns: the first of the router's outputs of that
        # shape, (T, E) logits or (T, K) weights (gpt-oss returns its router's weights, Llama 4 its logits)
        E = self.cfg.router_slots
        last = round(self.cfg.router.expected_experts_per_token(E)) if kind == "weights_TK" else E
        self._returns_dtype = next((dt for n, dt in self._router_dtypes if n == last), None)

    def as_router_dtype(self, t: torch.Tensor, rule: torch.dtype | None) -> torch.Tensor:
        """`t` (moekit's fp32 router math) in the dtype the HF router gives the same output: `rule`, or the
        router weight's dtype where `rule` is None (a router computing in its weight's dtype)."""
        dtype = self.router.weight.dtype if rule is None else rule
        return t if t.dtype == dtype else t.to(dtype)

    def _as_hf(self, y: torch.Tensor):
        """What the HF block returns: y, or a tuple (y, router output) for blocks that return one (`returns`:
        "logits_TE" the (T, E) router logits (Llama 4), "weights_TK" the chosen weights (T, K) in
        descending order (gpt-oss), "flat_logits" y and the logits both flattened (ERNIE-4.5-VL's text
        and vision blocks, whose parent scatters them by token modality)); the decoder layers of those families
        unpack and drop the second. The second is in the dtype the HF router gives it (`as_router_dtype`)."""
        if self.returns is None:
            return y
        # After the inference path its dense choice (idx_TK, w_TK, scores_TE, logits_TE) holds the answer as is;
        # building the RoutingInfo's route to read it back costs a dozen ops per layer and decoding step.
        dense = self.last_dense_choice()
        route = self.routing_info().route if dense is None else None
        logits_TE = route.logits_TE if dense is None else dense[3]
        if self.returns == "flat_logits":
            return y.flatten(), self.as_router_dtype(logits_TE, self._returns_dtype).flatten()
        if self.returns == "logits_TE":
            return y, self.as_router_dtype(logits_TE, self._returns_dtype)
        w_TK = _chosen_weights_TK(route, self.router.cfg) if dense is None else dense[1]
        # gpt-oss's own rule gives them in descending order already: no sort per layer and decode step
        if dense is None or not self.router.dense_weights_descending():
            w_TK = w_TK.sort(dim=-1, descending=True).values
        if self.router_weight_scale != 1.0:
            w_TK = w_TK / self.router_weight_scale
        return y, self.as_router_dtype(w_TK, self._returns_dtype)

    def __getattr__(self, name: str):
        # The children first (`self.router`, `self.experts`, several times per layer at each decode step): torch
        # would ask `_buffers` first, a `_ForwardingBuffers` (Python-level lookups) on the selection-bias
        # families. A name is in one of `_parameters`, `_buffers`, `_modules` at most, so the answer is torch's.
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:
            return modules[name]
        try:
            return super().__getattr__(name)
        except AttributeError:
            alias = self.__dict__.get("_hf_children", {}).get(name)
            if alias is None:
                raise
            if isinstance(alias, nn.Module):
                return alias
            return _get_tensor(self, alias) if "." in alias else super().__getattr__(alias)

    def __setattr__(self, name: str, value) -> None:
        # A tensor the HF block holds itself under a name moekit spells otherwise (MiniMax-M2's and LFM2-MoE's
        # selection bias, moekit's router.e_score_correction_bias; JetMoE's `bias`, moekit's output_bias):
        # setting the HF name (transformers' loading, torch.func.functional_call) sets moekit's tensor.
        alias = self.__dict__.get("_hf_children", {}).get(name)
        if isinstance(alias, str) and alias in self._hf_names and name not in self._parameters \
                and name not in self._buffers and name not in self._modules:
            owner_name, _, leaf = alias.rpartition(".")
            _set_tensor(self.get_submodule(owner_name), leaf, value)
        else:
            super().__setattr__(name, value)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """torch's, plus, inside `named_parameters()` / `named_buffers()` (and parameters(), buffers()) with their
        default remove_duplicate=True, a name view of this layer first: stand-ins (no nn.Module, never yielded
        to any other caller) holding each HF-named tensor under its HF name (`_hf_names`), so that torch's
        `_named_members`, which keeps the first name of a tensor it meets, spells the state_dict names
        (gate.weight, shared_expert.*, experts.gate_up_proj_bias) as transformers' loader reports them.
        moekit-only and non-persistent state keeps moekit's names (it is in no state_dict); module names
        (`router`, `shared_experts`) stay moekit's. With remove_duplicate=False (torch.func.functional_call's
        strict key check, torch.export), where torch keeps every name it meets, this layer's modules come as
        views too, without the tensors already named: each tensor once, under the same name."""
        if (memo is None or self not in memo) and _inside_named_members():
            views = _hf_name_views(self, self._hf_names_prefix(prefix))
            yield from views
            if not remove_duplicate:
                named = {id(t) for _, v in views for t in (*v._parameters.values(), *v._buffers.values())}
                for name, module in super().named_modules(memo, prefix, remove_duplicate):
                    rest = _NameView()
                    rest._parameters = {k: t for k, t in module._parameters.items() if id(t) not in named}
                    rest._buffers = {k: t for k, t in module._buffers.items() if id(t) not in named}
                    yield name, rest
                return
        yield from super().named_modules(memo, prefix, remove_duplicate)

    def named_children(self):
        """torch's, except for transformers' Trainer building its weight-decay groups (`get_parameter_names`:
        parameter names put together from `named_children()` and each module's `_parameters`, then matched
        against `named_parameters()`): there, name views of the HF block's tree (`_ParameterTree`), so that the
        names it builds are the HF names `named_parameters()` gives and the router, shared experts and aliased
        stacks get the weight decay they get unwrapped."""
        if sys._getframe(1).f_code is _TRAINER_PARAMETER_NAMES:
            yield from _ParameterTree.of(self).named_children()
            return
        yield from super().named_children()

    def receives_token_ids(self) -> bool:
        """Whether transformers passes this block the token ids: where the HF block's forward takes `input_ids`
        (DeepSeek-V4's hash-routed families), as the wrap probes read it."""
        import inspect

        return "input_ids" in inspect.signature(self._hf_block.forward).parameters

    def _hf_names_prefix(self, prefix: str) -> str:
        """The prefix the HF names (`_hf_names`' values) sit under, for this layer named `prefix`: its own."""
        return prefix

    def original(self) -> nn.Module:
        """The wrapped transformers block, with any tensor this layer now holds (after `.to()`, say)
        put back in its place. UsageError when its experts are wrapped (LoRA on fused experts):
        `moekit.adapters.remove_adapters` or `merge_and_unload` first; UsageError when moekit.compress
        changed them (pruned, merged or quantised: the block's own code still expects its config's)."""
        if (self.expert_map_E is not None or self.router.num_experts != self._hf_num_experts
                or hasattr(self.experts, "bits_E")):
            raise UsageError(f"moekit.hf.unwrap: the experts of this {self.hf_class} were pruned, merged or quantised "
                             "by moekit.compress, which the transformers block cannot run; save the model with "
                             "moekit.compress.hf.save_hf instead")
        if not isinstance(self.experts, ExpertBank):
            raise UsageError(f"moekit.hf.unwrap: the experts of this {self.hf_class} are wrapped by a "
                             f"{type(self.experts).__name__}; call moekit.adapters.remove_adapters(model) or "
                             "merge_and_unload(model) first")
        block = self._hf_block
        for mine, theirs in self._hf_names.items():
            tensor = _get_tensor(self, mine)
            owner_name, _, leaf = theirs.rpartition(".")
            owner = block.get_submodule(owner_name)
            if getattr(owner, leaf) is not tensor:
                setattr(owner, leaf, tensor)
        block.train(self.training)
        return block

    def hf_modules(self) -> list[nn.Module]:
        """The HF modules this layer stands for (transformers' init re-initialises them): the block."""
        return [self.original()]

    def extra_repr(self) -> str:
        return f"hf={self.hf_class}, {super().extra_repr()}"


def _chosen_weights_TK(route: RouterOutput, router_cfg: RouterConfig) -> torch.Tensor:
    """Each token's chosen weights (T, K), detached, in any order within a token (the caller sorts them).

    Fast path: a router that gives every token the same K experts (`fixed_experts_per_token`) and a route
    with T * K assignments (no padding mask, no zero-computation experts, one iteration) is grouped by token
    with one argsort and viewed (T, K): shapes only, no host read. Anything else (a re-routed top-p layer,
    masked tokens) takes the general `RouterOutput.to_padded`, whose K_max is read from the data."""
    T = route.num_tokens
    K = router_cfg.expected_experts_per_token(route.num_experts) if router_cfg.fixed_experts_per_token() else 0
    if K and K == int(K) and route.num_assignments == T * int(K):
        return route.weight_N.detach().index_select(0, torch.argsort(route.token_idx_N)).view(T, int(K))
    return route.to_padded()[1]


def _materialise_moekit_state(layer: HFMoEBlock, args) -> None:
    """Forward pre-hook of a layer built on the meta device: once the weights exist (loaded by transformers,
    say), moekit's own buffers still on the meta device become their initial zeros there; then it is removed."""
    if layer.router.weight.is_meta:
        return
    if any(b.is_meta for b in layer.buffers()):
        layer.reset_moekit_state()
    layer._materialise_hook.remove()


class _HFLeafAliases:
    """Mixin for an nn.Module answering HF leaf names it does not register: `_hf_leaves` maps each to (moekit's
    owner module, or None for this one; its name there). getattr and setattr of an HF leaf act on moekit's tensor,
    read live (nothing to go stale after `.to()` or a load)."""

    def _hf_leaf(self, name: str) -> tuple[nn.Module, str] | None:
        found = self.__dict__.get("_hf_leaves", {}).get(name)
        return None if found is None else (self if found[0] is None else found[0], found[1])

    def __getattr__(self, name: str):
        found = self._hf_leaf(name)
        return super().__getattr__(name) if found is None else getattr(*found)

    def __setattr__(self, name: str, value) -> None:
        found = self._hf_leaf(name)
        if found is None:
            super().__setattr__(name, value)
        else:
            _set_tensor(*found, value)


class HFNamedExpertBank(_HFLeafAliases, ExpertBank):
    """The ExpertBank of a wrapped block whose HF leaf names differ from the bank's (gpt-oss's
    `gate_up_proj_bias` is its `in_proj_bias`): getattr and setattr of an HF name act on the bank's tensor of that
    role."""


class _ForwardingBuffers(dict):
    """The `_buffers` of a layer whose HF block holds a buffer itself that moekit keeps on a child (MiniMax-M2's
    and LFM2-MoE's selection bias, `e_score_correction_bias` / `expert_bias` of the block, is moekit's
    router.e_score_correction_bias, which moekit's router reads and keeps fp32). `forwards` maps each such HF
    name to (moekit owner path, name); membership, reading and writing of that name act on the owner's
    `_buffers`, looked up through the layer's `_modules` at each access (a re-routed or pruned layer's new
    router is followed), so torch's `get_buffer`, transformers' `get_parameter_or_buffer` and loading
    (setattr), and `functional_call`'s swap (which writes `_buffers[name]`) reach the one tensor the router
    uses: nothing to re-alias after `.to()`, a load or a copy. Iteration lists the layer's own buffers only,
    so `_apply`, state_dict, loading and named_buffers see the tensor once, where they see it today (on the
    router; state_dict renames it to the HF name)."""

    def __init__(self, own: dict, modules: dict, forwards: dict[str, tuple[str, str]]):
        super().__init__(own)
        self.modules, self.forwards = modules, forwards

    def _owner(self, key: str) -> tuple[dict, str] | None:
        """(the owner's `_buffers`, name there) for a forwarded HF name whose owner exists, else None."""
        path_leaf = self.__dict__.get("forwards", {}).get(key)  # absent while pickle / deepcopy refill the items
        if path_leaf is None:
            return None
        head, _, rest = path_leaf[0].partition(".")
        owner = self.modules.get(head)
        owner = owner.get_submodule(rest) if owner is not None and rest else owner
        return None if owner is None else (owner._buffers, path_leaf[1])

    def __contains__(self, key) -> bool:
        found = self._owner(key) if isinstance(key, str) else None
        return super().__contains__(key) if found is None else found[1] in found[0]

    def __getitem__(self, key):
        found = self._owner(key) if isinstance(key, str) else None
        return super().__getitem__(key) if found is None else found[0][found[1]]

    def __setitem__(self, key, value) -> None:
        found = self._owner(key) if isinstance(key, str) else None
        if found is None:
            super().__setitem__(key, value)
        else:
            found[0][found[1]] = value

    def __delitem__(self, key) -> None:
        if isinstance(key, str) and self._owner(key) is not None:
            # (torch's register_parametrization deletes the name: moekit's router would lose its selection bias)
            owner, name = self.forwards[key]
            raise UsageError(f"moekit.hf: `{key}` of a wrapped block is moekit's `{owner}.{name}` (the router reads "
                             f"it there); delete or parametrize `{owner}.{name}` instead, or moekit.hf.unwrap(model) "
                             "first to change the transformers block")
        super().__delitem__(key)


class _HFPath(_HFLeafAliases, nn.Module):
    """A stand-in, never registered, for an HF child moekit has no module for (JetMoE's `input_linear`, whose
    `weight` is the bank's gate_up_proj): its HF leaves name other modules' tensors."""

    def __init__(self):
        super().__init__()
        self.__dict__["_hf_leaves"] = {}


def _set_tensor(owner: nn.Module, leaf: str, value) -> None:
    """setattr(owner, leaf, value) for a tensor set under its HF name, which is not the name `owner` registers
    it under. A plain tensor for a Parameter: transformers' loading wraps a tensor in a Parameter only where
    the HF name itself is in `_parameters`, so a tensor without autograd history becomes one (trainable where
    floating, as transformers makes it); one that requires grad or has history (torch.func.functional_call,
    torch.func.grad) is put in place as is, as torch's own swap does for a registered name, so gradients reach
    the caller's tensor."""
    if leaf in owner._parameters and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        if value.requires_grad or value.grad_fn is not None:
            owner._parameters[leaf] = value
            return
        value = nn.Parameter(value, requires_grad=value.is_floating_point())
    setattr(owner, leaf, value)


_NAMED_MEMBERS = nn.Module._named_members.__code__


def _inside_named_members() -> bool:
    """Whether this named_modules() runs for torch's `_named_members` (named_parameters / named_buffers and
    what calls them), the one caller that reads tensors off each yielded module and nothing else."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _NAMED_MEMBERS:
            return True
        frame = frame.f_back
    return False


_TRAINER_PARAMETER_NAMES = trainer_parameter_names.__code__


class _ParameterTree:
    """A layer's Parameters as the HF block's module tree names them (moekit's names for the ones the HF block
    has not), for name walkers that read `named_children()` and `_parameters` only (transformers' Trainer)."""

    def __init__(self):
        self._parameters: dict[str, nn.Parameter] = {}
        self.children: dict[str, _ParameterTree] = {}

    def named_children(self):
        return iter(self.children.items())

    @classmethod
    def of(cls, layer: HFMoEBlock) -> _ParameterTree:
        """The tree of `layer.named_parameters()`' names (the HF names, see `HFMoEBlock.named_modules`), without
        the layer's own `_parameters`, which the walker reads off the layer itself."""
        root = cls()
        for name, p in layer.named_parameters():
            *parts, leaf = name.split(".")
            if parts or leaf not in layer._parameters:
                node = root
                for part in parts:
                    node = node.children.setdefault(part, cls())
                node._parameters[leaf] = p
        return root


class _NameView:
    """An HF module path's tensors under their HF leaf names, as `_named_members` reads them (`_parameters`,
    `_buffers`); built per call from the layer's live tensors, so `.to()` / `load_state_dict` never leave it
    stale and nothing is registered twice."""

    __slots__ = ("_buffers", "_parameters")

    def __init__(self):
        self._parameters, self._buffers = {}, {}


def _hf_name_views(layer: HFMoEBlock, prefix: str) -> list[tuple[str, _NameView]]:
    """(prefixed HF module path, its _NameView) for the tensors `_state_dict_to_hf` renames, in the HF block's
    order; a moekit name that no longer resolves (experts wrapped by an adapter) is left to moekit's spelling,
    as state_dict leaves it."""
    by_hf = {theirs: mine for mine, theirs in layer._hf_names.items()}
    views: dict[str, _NameView] = {}
    for theirs in layer._hf_order:
        owner_name, _, leaf = by_hf[theirs].rpartition(".")
        try:
            owner = layer.get_submodule(owner_name)
        except AttributeError:
            continue
        hf_owner, _, hf_leaf = theirs.rpartition(".")
        view = views.setdefault(prefix + ("." if prefix and hf_owner else "") + hf_owner, _NameView())
        if owner._parameters.get(leaf) is not None:
            view._parameters[hf_leaf] = owner._parameters[leaf]
        elif owner._buffers.get(leaf) is not None and leaf not in owner._non_persistent_buffers_set:
            view._buffers[hf_leaf] = owner._buffers[leaf]
    return list(views.items())


def _get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def _load_hf_names(module: HFMoEBlock, state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: accept the HF block's names."""
    for mine, theirs in module._hf_names.items():
        if prefix + theirs in state_dict and mine != theirs:
            state_dict[prefix + mine] = state_dict.pop(prefix + theirs)
    for mine in module._moekit_only:  # not in an HF checkpoint: keep the current value
        if prefix + mine not in state_dict:
            state_dict[prefix + mine] = _get_tensor(module, mine).detach()


def _state_dict_to_hf(module: HFMoEBlock, state_dict, prefix: str, local_metadata) -> None:
    """Rename this layer's entries to the HF block's names, in the HF block's order."""
    mine = {k[len(prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    by_hf = {theirs: m for m, theirs in module._hf_names.items()}
    for theirs in module._hf_order:
        if by_hf[theirs] in mine:
            state_dict[prefix + theirs] = mine.pop(by_hf[theirs])
    for name in module._moekit_only:
        mine.pop(name, None)
    for name, value in mine.items():  # state an override added (e.g. null-expert rows): moekit's names
        state_dict[prefix + name] = value


def _router_output_dtypes(spec: BlockSpec) -> list[tuple[int, torch.dtype | None]]:
    """(last dim, dtype rule) of each output of the HF router: the rule None where the output is in the router
    weight's dtype (`F.linear(x, self.weight)`: Mixtral, Qwen3-MoE, gpt-oss), else the dtype it is always in
    (routers that upcast on purpose: DeepSeek-V3's fp32 logits). Read on a bf16 copy of the router (the gate
    is small: E x D), so that a model wrapped in fp32 and cast later keeps the rule; where that call raises,
    on a copy in the weight's own dtype; [] where both raise (every output then follows the weight). The
    input is (T, D), or (1, T, D) for a router that takes the batch dims (AFMoE's)."""
    weight_dtype = spec.router_weight.dtype
    x_TD = torch.randn(3, spec.cfg.d_model, generator=torch.Generator().manual_seed(0)).to(spec.router_weight.device)
    for dtype in dict.fromkeys((torch.bfloat16, weight_dtype)):
        run = router_caller(spec, dtype)
        out = run(x_TD)
        out = run(x_TD[None]) if out is None else out
        if out is not None:
            outs = out if isinstance(out, tuple) else (out,)
            return [(t.shape[-1] if t.dim() else 0, None if t.dtype == dtype else t.dtype)
                    if isinstance(t, torch.Tensor) and t.is_floating_point() else (-1, None) for t in outs]
    return []


def _router_keeps_batch_dims(spec: BlockSpec) -> bool:
    """Whether the HF router returns (B, T, E) logits for a (B, T, D) input (Switch Transformers) rather
    than (T, E); read on a copy of it, on a 2 x 3-token probe (False on meta tensors)."""
    if spec.router_weight.is_meta:
        return False
    gate = copy.deepcopy(spec.gate).float().eval()
    E = spec.cfg.router_slots
    try:
        with torch.no_grad():
            out = gate(torch.zeros(2, 3, spec.cfg.d_model, device=spec.router_weight.device, dtype=torch.float32))
    except Exception:
        return False
    outs = out if isinstance(out, tuple) else (out,)
    return any(isinstance(t, torch.Tensor) and tuple(t.shape) == (2, 3, E) and t.is_floating_point() for t in outs)


def recorded_router_output(model: nn.Module, gate: nn.Module) -> int | None:
    """The index of `gate`'s output transformers records as `router_logits` for `output_router_logits=True`
    (its OutputRecorder's `index`; 0 for a spec naming the class alone), or None where it records none."""
    for m in model.modules():
        specs = record_specs(m).get("router_logits")
        for s in specs if isinstance(specs, list) else [specs]:
            target = s.target_class if isinstance(s, OutputRecorder) else s
            if isinstance(target, type) and isinstance(gate, target):
                return s.index if isinstance(s, OutputRecorder) else 0
    return None
