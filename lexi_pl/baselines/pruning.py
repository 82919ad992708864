"""Expert pruning at unchanged k: a baseline that removes experts instead of lowering the number of active experts.

Pruning fraction p removes ``round(p * E)`` of each MoE layer's E experts (halves rounded up) and keeps every
layer's k, so each token still runs k experts, chosen among the experts that remain. It saves expert memory, not
expert FLOPs.

How a pruned expert is removed. The routers compute their probabilities and top-k inside ``forward``. A forward
pre-hook runs before the logits exist, and a mask on the returned weights comes after the selection, so neither can
remove an expert. Not every router has a bias that could push a logit down either. `mask_experts` therefore adds a
forward hook to each router that takes the logits the router returns, sets the pruned experts' logits to -inf and
routes again. It scores the experts (softmax over the experts that remain, or the sigmoid of each logit), takes the
top-k of those scores and weights them by the layer's policy in force at that call (renormalised over the k
selected experts, or the raw scores), times the family's constant scale. This is the routing of the same model
with the pruned experts' router rows deleted. The hook returns the masked logits, so a routing-weight hook of the
adapter that runs after it also sees the pruned experts at probability 0.

NOTE: the hook routes from the logits the router returns. V-MoE leaves its training noise out of them, so in
training mode a pruned V-MoE selects without noise.

Supported: routers of the adapter's "standard" layout (logits, weights, index) whose selection is a plain top-k
of the scores, plus LFM2's selection bias passed as the router's second argument. Rejected with a ValueError:
group-limited routing (DeepSeek V2 "group_limited_greedy", DeepSeek V3, GLM-4 MoE), routers that select with a
score-correction term they keep inside (ERNIE 4.5 MoE's ``moe_statics``), routers with another output layout
(DBRX, JetMoE, Llama 4) and routers of unlisted families, whose weighting lexi-pl does not know.

Criteria for choosing the pruned experts:

- ``"router_norm"`` (data-free): the experts whose router weight rows have the smallest L2 norm.
- ``"frequency"`` (uses data): the experts selected least often on a calibration set, counted by
  `count_expert_selections`. Ties go to the expert with the smaller router row norm, then the lower index.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lexi_pl.adapter import MoEAdapter, MoELayer

CRITERIA: tuple[str, ...] = ("router_norm", "frequency")

# Families that choose experts with a per-expert correction term they keep inside the router, or within expert
# groups, so routing again from the returned logits would select differently from the router itself.
_UNSUPPORTED_SELECTION: dict[str, str] = {
    "ernie4_5_moe": "it selects with a score-correction term (moe_statics) that the router does not return",
    "deepseek_v3": "it selects within expert groups and with a score-correction bias",
    "glm4_moe": "it selects within expert groups and with a score-correction bias",
}

# A fraction times the expert count within this distance of an integer or a half counts as exactly that value.
_ROUNDING_TOLERANCE = 1e-9


def router_weight_norms(layer: MoELayer) -> torch.Tensor:
    """Return the L2 norm of each expert's router weight row of `layer`, a float32 CPU tensor of shape (E,)."""
    for parameter in layer.router.parameters():
        if parameter.ndim == 2 and parameter.shape[0] == layer.num_experts:
            return torch.linalg.vector_norm(parameter.detach().float(), dim=1).cpu()
    raise ValueError(
        f"MoE layer {layer.name!r} ({layer.family.name}) has no router weight matrix with one row per expert "
        f"({layer.num_experts} rows), so criterion 'router_norm' cannot rank its experts"
    )


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def count_expert_selections(
    adapter: MoEAdapter,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> list[torch.Tensor]:
    """Run the model on `batches` and count how often each layer's router selects each expert.

    Args:
        adapter: adapter of the model. Its routers are hooked only while this function runs.
        batches: calibration batches. This criterion uses data, unlike the rest of LExI.
        forward: function ``forward(model, batch)`` that runs the model on one batch. The default passes a
            mapping as keyword arguments, the first item of a tuple or list, or the batch itself.

    Returns:
        One int64 tensor of shape (E,) per MoE layer in depth order: token-expert selections at the k in force
        (tokens dropped over an expert capacity are not counted).

    Raises:
        ValueError: a router does not return (logits, weights, index).
    """
    _check_standard_output(adapter)
    forward = forward or _default_forward
    counts = [torch.zeros(layer.num_experts, dtype=torch.int64) for layer in adapter.layers]

    def make_counter(position: int, num_experts: int):
        def count(module: nn.Module, args: Any, output: Any) -> None:
            index = output[2].reshape(-1)
            # An index equal to the expert count marks a pair dropped over V-MoE's capacity, counted and cut off here.
            counts[position] += torch.bincount(index.cpu(), minlength=num_experts + 1)[:num_experts]

        return count

    handles = [
        layer.router.register_forward_hook(make_counter(position, layer.num_experts))
        for position, layer in enumerate(adapter.layers)
    ]
    was_training = adapter.model.training
    try:
        adapter.model.eval()
        with torch.no_grad():
            for batch in batches:
                forward(adapter.model, batch)
    finally:
        for handle in handles:
            handle.remove()
        adapter.model.train(was_training)
    return counts


def pruned_expert_count(layer: MoELayer, fraction: float) -> int:
    """Return how many of `layer`'s experts pruning `fraction` removes: fraction * E, halves rounded up.

    Raises:
        ValueError: `fraction` is not in [0, 1), or would leave fewer experts than the layer's native k.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"pruning fraction must be a number in [0, 1), got {fraction!r}")
    count = math.floor(fraction * layer.num_experts + 0.5 + _ROUNDING_TOLERANCE)
    kept = layer.num_experts - count
    required = max(layer.native_top_k, layer.top_k)
    if kept < required:
        largest = (layer.num_experts - required) / layer.num_experts
        raise ValueError(
            f"pruning {fraction:.4g} of MoE layer {layer.name!r} leaves {kept} of {layer.num_experts} experts, fewer "
            f"than its k = {required}; use a fraction of at most {largest:.4g}"
        )
    return count


def select_pruned_experts(
    adapter: MoEAdapter,
    fraction: float,
    criterion: str = "router_norm",
    selection_counts: Sequence[torch.Tensor] | None = None,
) -> dict[str, list[int]]:
    """Choose the experts to prune in every MoE layer; return {layer name: sorted expert indices}.

    Args:
        fraction: share of each layer's experts to remove (``pruned_expert_count`` rounds it).
        criterion: "router_norm" (data-free) or "frequency" (needs `selection_counts`).
        selection_counts: for "frequency", one tensor of shape (E,) per layer, as `count_expert_selections`
            returns.

    Raises:
        ValueError: an unknown criterion, missing or mis-shaped counts, or a fraction that leaves fewer experts
            than a layer's k.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    if criterion == "frequency":
        if selection_counts is None:
            raise ValueError(
                "criterion 'frequency' needs selection_counts; count them on calibration data with "
                "count_expert_selections(adapter, batches)"
            )
        if len(selection_counts) != len(adapter.layers):
            raise ValueError(
                f"selection_counts has {len(selection_counts)} entries for {len(adapter.layers)} MoE layers; "
                "give one tensor per layer in depth order"
            )

    pruned: dict[str, list[int]] = {}
    for position, layer in enumerate(adapter.layers):
        count = pruned_expert_count(layer, fraction)
        norms = router_weight_norms(layer).double()
        if criterion == "frequency":
            frequencies = torch.as_tensor(selection_counts[position]).double().cpu()
            if frequencies.shape != (layer.num_experts,):
                raise ValueError(
                    f"selection_counts for MoE layer {layer.name!r} must have shape ({layer.num_experts},), got "
                    f"{tuple(frequencies.shape)}"
                )
            # Sort by count, then by router norm, then by index (stable sorts, last key first).
            order = torch.argsort(norms, stable=True)
            order = order[torch.argsort(frequencies[order], stable=True)]
        else:
            order = torch.argsort(norms, stable=True)
        pruned[layer.name] = sorted(int(expert) for expert in order[:count])
    return pruned


def _check_standard_output(adapter: MoEAdapter) -> None:
    for layer in adapter.layers:
        if layer.family.output != "standard":
            raise ValueError(
                f"MoE layer {layer.name!r} ({layer.family.name}) has a router that does not return (logits, "
                "weights, index), so lexi-pl cannot count or mask its expert selections"
            )


def _check_maskable(layer: MoELayer) -> None:
    family = layer.family
    reason = None
    if family.output != "standard":
        reason = "its router does not return (logits, weights, index)"
    elif family.name in _UNSUPPORTED_SELECTION:
        reason = _UNSUPPORTED_SELECTION[family.name]
    elif layer.max_top_k < layer.num_experts:
        reason = "its routing is group-limited"
    elif layer.native_routing_weights == "other" and layer.routing_weights == "native":
        reason = "lexi-pl does not know how its router weights the selected experts"
    if reason is not None:
        raise ValueError(f"cannot prune experts of MoE layer {layer.name!r} ({family.name}): {reason}")


def _policy_in_force(layer: MoELayer) -> str:
    """Return "renormalize" or "none": how the layer weights its selected experts at this moment."""
    flag = layer.family.renormalize_flag
    if flag is not None:
        owner = layer.router if flag[0] == "router" else layer.block
        value = getattr(owner, flag[1])
        if value == flag[2]:
            return "renormalize"
        if value == flag[3]:
            return "none"
        raise ValueError(
            f"MoE layer {layer.name!r} has {flag[1]}={value!r}, which is neither {flag[2]!r} (renormalize) nor "
            f"{flag[3]!r} (none), so pruning cannot reproduce its routing weights"
        )
    policy = layer.routing_weights
    return layer.family.native_weights if policy == "native" else policy


def _make_mask_hook(layer: MoELayer, pruned: torch.Tensor):
    """Build the router forward hook that routes again with the `pruned` experts (bool mask of shape (E,)) removed."""
    family = layer.family
    kept = int((~pruned).sum())

    def hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        logits, weights, index = output[0], output[1], output[2]
        k = index.shape[-1]
        if k > kept:
            raise RuntimeError(
                f"MoE layer {layer.name!r} runs k = {k} experts per token but only {kept} remain after pruning"
            )
        mask = pruned.to(logits.device)
        masked_logits = logits.masked_fill(mask, float("-inf"))
        scores = masked_logits.float()
        scores = scores.sigmoid() if family.score == "sigmoid" else scores.softmax(dim=-1)
        selection = scores
        if len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].shape == mask.shape:
            # LFM2 passes its expert bias as the router's second argument. It steers the selection, not the weights.
            selection = (scores + args[1].float()).masked_fill(mask, float("-inf"))
        new_index = selection.topk(k, dim=-1).indices
        new_weights = scores.gather(-1, new_index)
        if _policy_in_force(layer) == "renormalize":
            new_weights = new_weights / new_weights.sum(dim=-1, keepdim=True)
        if family.scale_attribute is not None:
            new_weights = new_weights * float(getattr(module, family.scale_attribute))
        new_index = new_index.to(index.dtype)
        return (masked_logits, new_weights.to(weights.dtype), new_index, *output[3:])

    return hook


@contextlib.contextmanager
def mask_experts(adapter: MoEAdapter, pruned: Mapping[str, Sequence[int]]) -> Iterator[dict[str, list[int]]]:
    """Run the body with the `pruned` experts of each layer removed from routing; remove the hooks on exit.

    Args:
        pruned: {layer name: expert indices}. Layers not named keep all their experts but are still routed by
            the hook, which reproduces the router's own output up to float rounding.

    Yields:
        The pruned expert indices of every layer, sorted.

    Raises:
        ValueError: an unknown layer name, an index out of range, fewer experts left than a layer's k, or a
            family that cannot be masked (see the module docstring).
    """
    unknown = [name for name in pruned if name not in adapter.names]
    if unknown:
        raise ValueError(f"unknown MoE layer name(s) {unknown}; this model's MoE layers are {adapter.names}")
    masks: list[tuple[MoELayer, torch.Tensor]] = []
    for layer in adapter.layers:
        _check_maskable(layer)
        experts = sorted({int(expert) for expert in pruned.get(layer.name, ())})
        if experts and not 0 <= experts[0] <= experts[-1] < layer.num_experts:
            raise ValueError(
                f"expert indices for MoE layer {layer.name!r} must be in [0, {layer.num_experts}), got {experts}"
            )
        required = max(layer.native_top_k, layer.top_k)
        if layer.num_experts - len(experts) < required:
            raise ValueError(
                f"pruning {len(experts)} of the {layer.num_experts} experts of MoE layer {layer.name!r} leaves fewer "
                f"than its k = {required}"
            )
        mask = torch.zeros(layer.num_experts, dtype=torch.bool)
        mask[experts] = True
        masks.append((layer, mask))

    handles = [layer.router.register_forward_hook(_make_mask_hook(layer, mask)) for layer, mask in masks]
    try:
        yield {layer.name: mask.nonzero().flatten().tolist() for layer, mask in masks}
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def prune_experts(
    adapter: MoEAdapter,
    fraction: float,
    criterion: str = "router_norm",
    selection_counts: Sequence[torch.Tensor] | None = None,
) -> Iterator[dict[str, list[int]]]:
    """Run the body with `fraction` of every layer's experts pruned by `criterion`, at unchanged k.

    The model's parameters are not modified: the routers are hooked while the body runs and the hooks are removed
    on exit, also when the body raises, so outputs after the block equal those before it bit for bit.

    Example::

        with prune_experts(adapter, 0.25, criterion="router_norm") as pruned:
            logits = model(input_ids).logits   # each layer routes among 75 % of its experts

    Yields:
        {layer name: pruned expert indices}.
    """
    pruned = select_pruned_experts(adapter, fraction, criterion, selection_counts)
    with mask_experts(adapter, pruned) as applied:
        yield applied
