"""One adapter over every supported MoE family: find the MoE layers, read and set each layer's top-k.

`MoEAdapter(model)` walks the model once, matches router modules against the family table in `families.py`
(by class name, by the router class that transformers records router logits from, or by the ``top_k`` /
``num_experts`` protocol that the V-MoE router exposes) and wraps each MoE block in a `MoELayer`.

Changing k writes the attribute that the family's forward pass reads (for most families ``router.top_k``; for
DBRX the block's ``top_k``). The native k and the native routing-weight setting are stored on the router module
the first time any adapter sees it, so a second adapter built while a plan is applied still restores the
pretrained values.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lexi_pl.adapter.families import (
    FAMILY_BY_ROUTER_CLASS,
    FIXED_K_ROUTERS,
    INPUT_NORM_NAMES,
    ROUTING_WEIGHTS,
    RouterFamily,
    generic_family,
)

if TYPE_CHECKING:
    from lexi_pl.plan import TopKPlan

log = logging.getLogger(__name__)

# Attributes that the adapter stores on router modules, shared by every adapter built on the same model.
_NATIVE_K_ATTR = "_lexi_native_top_k"
_NATIVE_FLAG_ATTR = "_lexi_native_weight_flag"
_POLICY_HOOK_ATTR = "_lexi_weight_hook"
_POLICY_ATTR = "_lexi_routing_weights"


class MoELayer:
    """One MoE block of a model: its router, its current and native k, and its routing-weight policy."""

    def __init__(self, name: str, index: int, block: nn.Module, router: nn.Module, family: RouterFamily) -> None:
        self.name = name
        self.index = index
        self.block = block
        self.router = router
        self.family = family
        self.num_experts = family.num_experts(router)
        self._k_owner = block if family.k_owner == "block" else router
        if not hasattr(router, _NATIVE_K_ATTR):
            setattr(router, _NATIVE_K_ATTR, int(self._k_owner.top_k))
            if family.renormalize_flag is not None:
                setattr(router, _NATIVE_FLAG_ATTR, getattr(self._flag_owner, family.renormalize_flag[1]))
        self.native_top_k: int = getattr(router, _NATIVE_K_ATTR)
        limit = family.max_top_k(router) if family.max_top_k is not None else self.num_experts
        self.max_top_k: int = min(int(limit), self.num_experts)

    def __repr__(self) -> str:
        return (
            f"MoELayer(name={self.name!r}, family={self.family.name!r}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, native_top_k={self.native_top_k}, max_top_k={self.max_top_k})"
        )

    # k

    @property
    def top_k(self) -> int:
        return int(self._k_owner.top_k)

    @top_k.setter
    def top_k(self, k: int) -> None:
        self._k_owner.top_k = self.check_top_k(k)

    def check_top_k(self, k: Any) -> int:
        """Return `k` as an int, or raise ValueError naming this layer, the value and the allowed range."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise ValueError(
                f"top_k for MoE layer {self.name!r} must be an integer in [1, {self.max_top_k}], got {k!r} "
                f"({type(k).__name__})"
            )
        k = int(k)
        if not 1 <= k <= self.max_top_k:
            limit_reason = ""
            if self.max_top_k < self.num_experts:
                limit_reason = (
                    f"; {self.family.name} routing is group-limited, so at most {self.max_top_k} of its "
                    f"{self.num_experts} experts can be selected with non-zero weight"
                )
            raise ValueError(
                f"top_k for MoE layer {self.name!r} must be in [1, {self.max_top_k}], got {k}{limit_reason}"
            )
        return k

    # routing weights

    @property
    def _flag_owner(self) -> nn.Module:
        assert self.family.renormalize_flag is not None
        return self.router if self.family.renormalize_flag[0] == "router" else self.block

    @property
    def native_routing_weights(self) -> str:
        """The policy the layer follows as loaded: "renormalize", "none" or "other"."""
        flag = self.family.renormalize_flag
        if flag is None:
            return self.family.native_weights
        native_value = getattr(self.router, _NATIVE_FLAG_ATTR)
        if native_value == flag[2]:
            return "renormalize"
        if native_value == flag[3]:
            return "none"
        return "other"

    @property
    def routing_weights(self) -> str:
        """The routing-weight policy in force: "native", "renormalize" or "none"."""
        return getattr(self.router, _POLICY_ATTR, "native")

    @routing_weights.setter
    def routing_weights(self, policy: str) -> None:
        self.check_routing_weights(policy)
        self._remove_weight_hook()
        flag = self.family.renormalize_flag
        if flag is not None:
            setattr(self._flag_owner, flag[1], getattr(self.router, _NATIVE_FLAG_ATTR))
        if policy != "native" and policy != self.native_routing_weights:
            if flag is not None:
                setattr(self._flag_owner, flag[1], flag[2] if policy == "renormalize" else flag[3])
            else:
                handle = self.router.register_forward_hook(_make_weight_hook(self.family, self.router, policy))
                setattr(self.router, _POLICY_HOOK_ATTR, handle)
        setattr(self.router, _POLICY_ATTR, policy)

    def check_routing_weights(self, policy: str) -> None:
        """Raise ValueError unless this layer can follow `policy`."""
        if policy not in ROUTING_WEIGHTS:
            raise ValueError(f"routing_weights must be one of {ROUTING_WEIGHTS}, got {policy!r}")
        if policy == "native" or policy == self.native_routing_weights:
            return
        supported = self.family.renormalize_flag is not None or self.family.output in ("standard", "dense_scores")
        if not supported:
            raise ValueError(
                f"routing_weights={policy!r} is not supported for MoE layer {self.name!r} ({self.family.name}): "
                f"its router natively uses {self.native_routing_weights!r} weights and returns no per-expert "
                f"scores that lexi-pl can rewrite; use routing_weights='native'"
            )

    def _remove_weight_hook(self) -> None:
        handle = getattr(self.router, _POLICY_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            delattr(self.router, _POLICY_HOOK_ATTR)

    # cost

    @property
    def expert_flops_per_token(self) -> int:
        """Multiply-add FLOPs (2 per weight) of one expert on one token, counted from the expert weight matrices.

        Weights are those of the block's ``experts`` module, or else the block's parameters whose leading dimension
        is the number of experts; the router and shared experts are left out. Biases and activations are ignored.
        """
        experts = getattr(self.block, "experts", None)
        if isinstance(experts, nn.Module):
            # Stacked layouts keep weights as (E, out, in) and biases as (E, out); DBRX stacks its weights in 2-D.
            weights = sum(p.numel() for p in experts.parameters() if p.ndim >= 3)
            weights = weights or sum(p.numel() for p in experts.parameters() if p.ndim == 2)
        else:
            router_parameters = {id(p) for p in self.router.parameters()}
            weights = sum(
                p.numel()
                for p in self.block.parameters()
                if p.ndim >= 3 and p.shape[0] == self.num_experts and id(p) not in router_parameters
            )
        return 2 * weights // self.num_experts

    @property
    def computed_experts(self) -> int:
        """Experts computed per token at the current k: k, or every expert where the family runs them densely."""
        return self.num_experts if self.family.dense_experts else self.top_k

    # running the block alone

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states that enter the block, read from the router's weight matrix."""
        for parameter in self.router.parameters():
            if parameter.ndim == 2 and parameter.shape[0] == self.num_experts:
                return int(parameter.shape[1])
        raise RuntimeError(f"cannot read the hidden size of MoE layer {self.name!r} from its router weights")

    def forward_block(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Run the MoE block alone on `hidden_states` of shape (batch, seq, hidden); return the same shape."""
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"forward_block of MoE layer {self.name!r} takes hidden states of shape (batch, seq, "
                f"{self.hidden_size}), got {tuple(hidden_states.shape)}"
            )
        output = self.block(hidden_states)
        if isinstance(output, tuple):
            output = output[0]
        return output.reshape(hidden_states.shape)


def _make_weight_hook(family: RouterFamily, router: nn.Module, policy: str):
    """Build a forward hook that replaces the router's weights by the `policy` weights of its selected experts."""
    renormalize = policy == "renormalize"

    def scale() -> float:
        return float(getattr(router, family.scale_attribute)) if family.scale_attribute else 1.0

    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits.sigmoid() if family.score == "sigmoid" else logits.softmax(dim=-1)

    if family.output == "dense_scores":

        def hook(module: nn.Module, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> Any:
            scores, logits = output
            selected = scores > 0
            weights = torch.where(selected, probabilities(logits), torch.zeros((), device=scores.device))
            if renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return (weights * scale()).to(scores.dtype), logits

        return hook

    def hook(module: nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> Any:
        logits, weights, index = output[0], output[1], output[2]
        selected = probabilities(logits).gather(-1, index)
        if renormalize:
            selected = selected / selected.sum(dim=-1, keepdim=True)
        return (logits, (selected * scale()).to(weights.dtype), index, *output[3:])

    return hook


def _recorded_router_classes(model: nn.Module) -> set[type]:
    """Collect the router classes that transformers records router logits from, in every sub-model."""
    classes: set[type] = set()
    for module in model.modules():
        recorders = getattr(module, "_can_record_outputs", None) or {}
        recorder = recorders.get("router_logits") if isinstance(recorders, Mapping) else None
        target = getattr(recorder, "target_class", None)
        if isinstance(target, type):
            classes.add(target)
    return classes


def _has_protocol(module: nn.Module) -> bool:
    top_k = getattr(module, "top_k", None)
    num_experts = getattr(module, "num_experts", None)
    return (
        isinstance(top_k, int) and not isinstance(top_k, bool) and isinstance(num_experts, int) and num_experts > 1
    )


class MoEAdapter:
    """Read and set the per-layer top-k of an MoE model.

    Args:
        model: a transformers MoE model (any supported family), a V-MoE from ``lexi_models.vision``, or any
            module whose routers expose integer ``top_k`` and ``num_experts`` attributes read on every forward.

    Raises:
        ValueError: the model has no MoE layer, or uses a router whose k cannot change.

    Example::

        adapter = MoEAdapter(model)
        print(adapter.native_top_k)          # [8, 8, ...]
        with adapter.override([4] * len(adapter.layers)):
            logits = model(input_ids).logits
        assert adapter.top_k == adapter.native_top_k
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"MoEAdapter takes a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.layers: list[MoELayer] = self._find_layers(model)
        if not self.layers:
            raise ValueError(
                f"no MoE layer found in {type(model).__name__}: lexi-pl looks for routers of the families "
                f"{sorted({f.name for f in FAMILY_BY_ROUTER_CLASS.values()})} or modules with integer `top_k` and "
                "`num_experts` attributes; pass the model that contains the MoE blocks"
            )
        dense = [layer for layer in self.layers if layer.family.dense_experts]
        if dense:
            log.warning(
                "%s runs every expert on every token whatever k is (%d MoE layers), so lowering k changes the "
                "outputs but saves no compute",
                dense[0].family.name,
                len(dense),
            )
        self._by_name = {layer.name: layer for layer in self.layers}

    @staticmethod
    def _find_layers(model: nn.Module) -> list[MoELayer]:
        recorded = _recorded_router_classes(model)
        named = list(model.named_modules())
        parents: dict[str, nn.Module] = {}
        found: list[tuple[str, str, nn.Module, nn.Module, RouterFamily]] = []
        router_names: list[str] = []
        for name, module in named:
            for child_name, child in module.named_children():
                parents[f"{name}.{child_name}" if name else child_name] = module

        for name, module in named:
            class_name = type(module).__name__
            if class_name in FIXED_K_ROUTERS:
                raise ValueError(
                    f"{type(model).__name__} has a router whose k cannot change ({name}: {class_name}): "
                    f"{FIXED_K_ROUTERS[class_name]}. lexi-pl supports the families listed in "
                    "lexi_pl/adapter/families.py"
                )
            family = FAMILY_BY_ROUTER_CLASS.get(class_name)
            if family is None and (type(module) in recorded or _has_protocol(module)):
                family = generic_family(class_name)
            if family is None:
                continue
            router_names.append(name)
            block_name = name.rpartition(".")[0]
            block = parents.get(name)
            if block is None:
                raise ValueError(f"router {name!r} ({class_name}) has no parent MoE block; pass the whole model")
            skip_reason = family.skip_parents.get(type(block).__name__)
            if skip_reason:
                log.info("leaving router %s alone: %s", name, skip_reason)
                continue
            found.append((name, block_name, block, module, family))

        # A module that matched only by protocol but contains a router is a block holding a copy of k, not a
        # router (mixtral, jamba and minimax blocks keep such a copy that the forward pass never reads).
        def contains_router(name: str) -> bool:
            return any(other != name and other.startswith(name + ".") for other in router_names)

        layers = []
        for router_name, block_name, block, router, family in found:
            if family.name.startswith("unlisted") and contains_router(router_name):
                continue
            if family.name.startswith("unlisted"):
                log.warning(
                    "router class %s is not in lexi-pl's family table; treating it as a generic router "
                    "(k in `top_k`, native routing weights only)",
                    type(router).__name__,
                )
            layers.append(MoELayer(block_name, len(layers), block, router, family))
        return layers

    # reading

    @property
    def top_k(self) -> list[int]:
        return [layer.top_k for layer in self.layers]

    @property
    def native_top_k(self) -> list[int]:
        return [layer.native_top_k for layer in self.layers]

    @property
    def max_top_k(self) -> list[int]:
        return [layer.max_top_k for layer in self.layers]

    @property
    def num_experts(self) -> list[int]:
        return [layer.num_experts for layer in self.layers]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def routing_weights(self) -> str:
        """The routing-weight policy in force ("native", "renormalize" or "none"; "mixed" if layers differ)."""
        policies = {layer.routing_weights for layer in self.layers}
        return policies.pop() if len(policies) == 1 else "mixed"

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        families = sorted({layer.family.name for layer in self.layers})
        return f"MoEAdapter({type(self.model).__name__}, layers={len(self.layers)}, families={families})"

    # writing

    def _resolve(self, ks: Sequence[int] | Mapping[str, int]) -> dict[MoELayer, int]:
        """Check every requested k before any is written, so a bad request changes nothing."""
        if isinstance(ks, Mapping):
            unknown = [name for name in ks if name not in self._by_name]
            if unknown:
                hints = {name: difflib.get_close_matches(name, self._by_name, n=1) for name in unknown}
                hint_text = "; ".join(f"{n!r} (did you mean {h[0]!r}?)" if h else repr(n) for n, h in hints.items())
                raise ValueError(
                    f"unknown MoE layer name(s): {hint_text}. This model's MoE layers are: {self.names}"
                )
            pairs = [(self._by_name[name], k) for name, k in ks.items()]
        elif isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence):
            raise ValueError(
                f"top_k must be a list with one k per MoE layer or a mapping {{layer name: k}}, got {ks!r}"
            )
        else:
            if len(ks) != len(self.layers):
                raise ValueError(
                    f"got {len(ks)} top_k values for {len(self.layers)} MoE layers; give one k per layer in "
                    f"depth order ({self.names}) or a mapping {{layer name: k}}"
                )
            pairs = list(zip(self.layers, ks))
        return {layer: layer.check_top_k(k) for layer, k in pairs}

    def set_top_k(self, ks: Sequence[int] | Mapping[str, int]) -> None:
        """Set k per layer from a list (one k per MoE layer, depth order) or a mapping {layer name: k}."""
        for layer, k in self._resolve(ks).items():
            layer.top_k = k

    def set_routing_weights(self, policy: str) -> None:
        """Make every layer weight its selected experts by `policy` ("native", "renormalize" or "none")."""
        for layer in self.layers:
            layer.check_routing_weights(policy)
        for layer in self.layers:
            layer.routing_weights = policy

    def restore(self) -> None:
        """Put back every layer's native k and native routing weights."""
        for layer in self.layers:
            layer.routing_weights = "native"
            layer.top_k = layer.native_top_k

    @contextlib.contextmanager
    def override(
        self, ks: Sequence[int] | Mapping[str, int] | None = None, routing_weights: str | None = None
    ) -> Iterator[MoEAdapter]:
        """Run the body with `ks` (and `routing_weights`) in force; put back the previous values on exit, also
        when the body raises."""
        previous_k = self.top_k
        previous_policy = [layer.routing_weights for layer in self.layers]
        resolved = self._resolve(ks) if ks is not None else {}
        if routing_weights is not None:
            for layer in self.layers:
                layer.check_routing_weights(routing_weights)
        try:
            if routing_weights is not None:
                self.set_routing_weights(routing_weights)
            for layer, k in resolved.items():
                layer.top_k = k
            yield self
        finally:
            for layer, k, policy in zip(self.layers, previous_k, previous_policy):
                layer.routing_weights = policy
                layer.top_k = k

    def check_plan(self, plan: TopKPlan, check_fingerprint: bool = True) -> dict[MoELayer, int]:
        """Check that `plan` was made for this model and fits its layers; return the k per layer.

        With ``check_fingerprint=False`` only the layer names, the k ranges and the policy are checked, for a
        model whose router weights changed on purpose since the plan was made (training).

        Raises:
            ValueError: the plan's fingerprint or layer names do not match this model, a k is out of range, or
                its routing-weight policy is not supported by a layer.
        """
        if not all(hasattr(plan, name) for name in ("top_k", "fingerprint", "routing_weights")):
            raise TypeError(
                f"expected a TopKPlan, got {type(plan).__name__}; load one with lexi_pl.plan.TopKPlan.load(path)"
            )
        expected = self.fingerprint() if check_fingerprint else None
        if check_fingerprint and plan.fingerprint is not None and plan.fingerprint != expected:
            raise ValueError(
                f"this plan was made for another model (plan fingerprint {plan.fingerprint[:23]}..., this model "
                f"{str(expected)[:23]}...): its MoE structure or router weights differ. Make a new plan for this model "
                "by profiling it (with the LExI callback: give a budget instead of plan_path)"
            )
        if list(plan.top_k) != self.names:
            missing = [name for name in self.names if name not in plan.top_k]
            extra = [name for name in plan.top_k if name not in self._by_name]
            raise ValueError(
                f"the plan's layer names do not match this model's MoE layers: missing {missing}, unknown {extra}; "
                "create a plan for this model"
            )
        resolved = self._resolve(dict(plan.top_k))
        for layer in self.layers:
            layer.check_routing_weights(plan.routing_weights)
        return resolved

    def apply(self, plan: TopKPlan, check_fingerprint: bool = True) -> None:
        """Set the per-layer k and the routing weights of `plan`, after `check_plan` accepts it."""
        resolved = self.check_plan(plan, check_fingerprint=check_fingerprint)
        self.set_routing_weights(plan.routing_weights)
        for layer, k in resolved.items():
            layer.top_k = k

    # identity

    def fingerprint(self) -> str:
        """Return a SHA-256 digest of the MoE structure (names, classes, expert counts, native k) and router weights.

        Two models with the same digest route tokens the same way, so a plan made for one applies to the other.
        It does not change with the current k or routing-weight policy.
        """
        digest = hashlib.sha256()
        for layer in self.layers:
            header = f"{layer.name}|{type(layer.router).__name__}|{layer.num_experts}|{layer.native_top_k}|"
            digest.update(header.encode())
            tensors = list(layer.router.named_parameters()) + list(layer.router.named_buffers())
            for tensor_name, tensor in sorted(tensors, key=lambda item: item[0]):
                digest.update(tensor_name.encode())
                data = tensor.detach().to("cpu", torch.float32).contiguous()
                digest.update(data.numpy().tobytes())
        return "sha256:" + digest.hexdigest()

    def input_norm(self, layer: MoELayer) -> nn.Module | None:
        """Return the normalisation module that feeds `layer`'s block in its decoder layer, if one is found."""
        parent_name = layer.name.rpartition(".")[0]
        try:
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
        except AttributeError:
            return None
        for candidate in INPUT_NORM_NAMES:
            try:
                return parent.get_submodule(candidate)
            except AttributeError:
                continue
        return None
