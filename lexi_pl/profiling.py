"""Stage 1 of LExI: data-free sensitivity profiling of every MoE layer.

For each MoE layer j and each k in 1..native k, random hidden states X of shape (batch, seq, hidden) go through
the MoE block alone (router and experts; no attention, no residual) at the native k and at k, and the profile
records D_j(k), the mean over iterations of the Frobenius norm ||Y_k - Y_native||. No data and no labels are used.

Choices the LExI paper (arXiv 2509.02753, Algorithm 1) leaves open, and what this module does:

- Inputs. ``input_mode="gaussian"`` feeds X ~ N(0, 1) straight into the block, as the paper's algorithm does.
  ``input_mode="norm_scaled"`` multiplies X by the weight (and adds the bias) of the normalisation layer that
  feeds the block, because real MoE inputs are normalised hidden states, not unit Gaussians.
- Sampling. Iteration i draws one X from a generator seeded with ``seed + i`` and uses it for every layer and
  every k, so profiles are reproducible and layers are compared on the same inputs.
- Precision and device. X is drawn in float32 on the CPU and moved to the block's device and dtype, so the
  model is profiled as it will run; the profile records both.
- Routing weights. The policy given here (native, renormalize or none) is in force while profiling, and must
  be the one used at evaluation; the plan records it.
- Shared experts. They run in the block but add the same output at every k, so they cancel in Y_k - Y_native.

- Base norms. ``base_norms`` holds the mean norm of the routed experts' output at native k (the experts
  module's output, without shared experts), the scale used by ``normalize="base_norm"`` in allocation.

Cost. The experts that the native top-k selects already contain every smaller top-k selection (greedy top-k
keeps the best k of the native k). The fast path therefore runs each selected (token, expert) pair once, routes
again at each smaller k (a cheap router call) and combines the stored expert outputs, for about the price of one
native-k forward per batch. Families whose router does not return (logits, weights, index), whose experts run densely,
or blocks that drop tokens over an expert capacity, take the exact loop instead (set k, run the block).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lexi_pl.adapter import MoEAdapter, MoELayer
from lexi_pl.profile_table import SensitivityProfile

log = logging.getLogger(__name__)

InputMode = Literal["gaussian", "norm_scaled"]
INPUT_MODES: tuple[str, ...] = ("gaussian", "norm_scaled")


def profile_sensitivity(
    adapter: MoEAdapter,
    *,
    batch_size: int = 4,
    seq_len: int = 128,
    iterations: int = 4,
    seed: int = 0,
    routing_weights: str = "native",
    input_mode: InputMode = "gaussian",
    method: Literal["auto", "fast", "naive"] = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> SensitivityProfile:
    """Measure D_j(k) for every MoE layer j of `adapter` and every k from 1 to the layer's native k.

    Args:
        adapter: the model's adapter. Its layers' k, routing weights and the model's training mode are the same
            afterwards as before, also when profiling fails.
        batch_size: sequences per random batch.
        seq_len: tokens per sequence. Each iteration routes ``batch_size * seq_len`` tokens through every layer.
        iterations: random batches averaged per layer.
        seed: seed of the random inputs; the same seed gives the same profile.
        routing_weights: routing-weight policy in force while profiling ("native", "renormalize" or "none").
        input_mode: "gaussian" (unit Gaussian inputs) or "norm_scaled" (scaled by the input normalisation's weight).
        method: "fast" reuses the native-k expert outputs for every smaller k; "naive" runs the block once per k;
            "auto" takes the fast path where the family allows it.
        cache_dir: folder of cached profiles. A profile made for the same model fingerprint and settings is loaded
            from it instead of being measured again, and a new profile is written to it.
        progress: show a progress bar over layers.

    Raises:
        ValueError: a setting is out of range, or ``input_mode="norm_scaled"`` finds no normalisation layer.
    """
    if not isinstance(adapter, MoEAdapter):
        raise TypeError(
            f"profile_sensitivity takes an MoEAdapter, got {type(adapter).__name__}; wrap the model first: "
            "profile_sensitivity(MoEAdapter(model), ...)"
        )
    _check_positive(batch_size=batch_size, seq_len=seq_len, iterations=iterations)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if input_mode not in INPUT_MODES:
        raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
    if method not in ("auto", "fast", "naive"):
        raise ValueError(f"method must be 'auto', 'fast' or 'naive', got {method!r}")
    for layer in adapter.layers:
        layer.check_routing_weights(routing_weights)

    first_parameter = next(adapter.layers[0].block.parameters())
    settings: dict[str, Any] = {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "iterations": iterations,
        "seed": seed,
        "routing_weights": routing_weights,
        "input_mode": input_mode,
        "dtype": str(first_parameter.dtype).removeprefix("torch."),
        "device": str(first_parameter.device),
    }
    fingerprint = adapter.fingerprint()
    cache_path = _cache_path(cache_dir, fingerprint, settings) if cache_dir is not None else None
    if cache_path is not None and cache_path.is_file():
        cached = SensitivityProfile.load(cache_path)
        if cached.fingerprint == fingerprint and cached.settings == settings:
            log.info("reusing the cached sensitivity profile %s", cache_path)
            return cached
        log.warning("ignoring cached profile %s: its fingerprint or settings differ", cache_path)

    norms = [_input_norm(adapter, layer) if input_mode == "norm_scaled" else None for layer in adapter.layers]
    deltas: list[list[float]] = []
    base_norms: list[float] = []
    seconds: list[float] = []
    paths: list[str] = []
    was_training = adapter.model.training
    start = time.perf_counter()
    try:
        adapter.model.eval()
        with adapter.override(adapter.top_k, routing_weights=routing_weights), torch.no_grad():
            bar = tqdm(adapter.layers, desc="LExI profiling", unit="layer", disable=not progress)
            for layer, norm in zip(bar, norms):
                layer_start = time.perf_counter()
                layer.top_k = layer.native_top_k
                fast = method == "fast" or (method == "auto" and _fast_path_applies(layer))
                if method == "fast" and not _fast_path_applies(layer):
                    raise ValueError(
                        f"the fast profiling path does not apply to MoE layer {layer.name!r} "
                        f"({layer.family.name}); use method='auto' or 'naive'"
                    )
                layer_deltas, base_norm = _profile_layer(layer, norm, settings, fast)
                deltas.append(layer_deltas)
                base_norms.append(base_norm)
                paths.append("fast" if fast else "naive")
                seconds.append(time.perf_counter() - layer_start)
                log.debug("profiled %s in %.3f s: D = %s", layer.name, seconds[-1], layer_deltas)
    finally:
        adapter.model.train(was_training)

    profile = SensitivityProfile(
        layer_names=adapter.names,
        native_top_k=adapter.native_top_k,
        max_top_k=adapter.max_top_k,
        num_experts=adapter.num_experts,
        deltas=deltas,
        base_norms=base_norms,
        fingerprint=fingerprint,
        settings=settings,
        timing={"total_seconds": time.perf_counter() - start, "layer_seconds": seconds, "paths": paths},
    )
    log.info("profiled %d MoE layers in %.2f s", len(deltas), profile.timing["total_seconds"])
    if cache_path is not None:
        profile.save(cache_path)
        log.info("saved the sensitivity profile to %s", cache_path)
    return profile


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _cache_path(cache_dir: str | Path, fingerprint: str, settings: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps([fingerprint, settings], sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"lexi-profile-{key}.json"


def _input_norm(adapter: MoEAdapter, layer: MoELayer) -> nn.Module:
    norm = adapter.input_norm(layer)
    weight = getattr(norm, "weight", None)
    if norm is None or not isinstance(weight, torch.Tensor) or weight.shape != (layer.hidden_size,):
        raise ValueError(
            f"input_mode='norm_scaled' found no normalisation layer with a weight of shape ({layer.hidden_size},) "
            f"feeding MoE layer {layer.name!r}; use input_mode='gaussian'"
        )
    return norm


def _random_inputs(layer: MoELayer, norm: nn.Module | None, settings: dict[str, Any], iteration: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings["seed"] + iteration)
    shape = (settings["batch_size"], settings["seq_len"], layer.hidden_size)
    inputs = torch.randn(shape, generator=generator)
    if norm is not None:
        inputs = inputs * norm.weight.detach().float().cpu()
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            inputs = inputs + bias.detach().float().cpu()
    parameter = next(layer.block.parameters())
    return inputs.to(device=parameter.device, dtype=parameter.dtype)


def _fast_path_applies(layer: MoELayer) -> bool:
    experts = getattr(layer.block, "experts", None)
    return (
        layer.family.output == "standard"
        and layer.family.k_owner == "router"
        and not layer.family.dense_experts
        and isinstance(experts, nn.Module)
        and getattr(layer.block, "capacity_factor", None) is None
    )


def _profile_layer(
    layer: MoELayer, norm: nn.Module | None, settings: dict[str, Any], fast: bool
) -> tuple[list[float], float]:
    native = layer.native_top_k
    totals = [0.0] * native
    base_total = 0.0
    for iteration in range(settings["iterations"]):
        inputs = _random_inputs(layer, norm, settings, iteration)
        if fast:
            distances, base_norm = _distances_fast(layer, inputs)
        else:
            distances, base_norm = _distances_naive(layer, inputs)
        totals = [total + distance for total, distance in zip(totals, distances)]
        base_total += base_norm
    iterations = settings["iterations"]
    return [total / iterations for total in totals], base_total / iterations


class _ExpertsReached(Exception):
    """Raised by a hook to stop a block's forward pass once the experts' inputs are recorded."""


def _routed_output_norm(layer: MoELayer, run_block) -> tuple[torch.Tensor, float]:
    """Run the block; return its output and the norm of the routed experts' part of it.

    The routed part is the experts module's output where the block has one, so shared experts (which add the same
    output at every k) are left out; otherwise it is the whole block output.
    """
    experts = getattr(layer.block, "experts", None)
    recorded: dict[str, torch.Tensor] = {}
    handle = None
    if isinstance(experts, nn.Module):

        def keep_output(module: nn.Module, args: tuple, output: Any) -> None:
            recorded["output"] = output[0] if isinstance(output, tuple) else output

        handle = experts.register_forward_hook(keep_output)
    try:
        output = run_block().float()
    finally:
        if handle is not None:
            handle.remove()
    routed = recorded.get("output", output)
    return output, torch.linalg.vector_norm(routed.float()).item()


def _distances_naive(layer: MoELayer, inputs: torch.Tensor) -> tuple[list[float], float]:
    """Return ||Y_k - Y_native||_F for k = 1..native, running the block once per k, and the routed output norm."""
    native = layer.native_top_k
    layer.top_k = native
    base, base_norm = _routed_output_norm(layer, lambda: layer.forward_block(inputs))
    distances = []
    try:
        for k in range(1, native):
            layer.top_k = k
            distances.append(torch.linalg.vector_norm(layer.forward_block(inputs).float() - base).item())
    finally:
        layer.top_k = native
    return [*distances, 0.0], base_norm


def _distances_fast(layer: MoELayer, inputs: torch.Tensor) -> tuple[list[float], float]:
    """Return ||Y_k - Y_native||_F for k = 1..native, computing each natively selected expert once.

    The block runs only up to its experts call (router inputs and expert inputs are recorded, then a hook stops
    it). One experts call on every (token, selected expert) pair with weight 1 gives every expert output that
    any k <= native combines; each k then needs only a router call and a weighted sum.
    """
    native = layer.native_top_k
    router_call: dict[str, Any] = {}
    experts_call: dict[str, Any] = {}

    def keep_router_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
        router_call.update(args=args, kwargs=kwargs)

    def keep_experts_inputs_and_stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        experts_call.update(args=args, kwargs=kwargs)
        raise _ExpertsReached

    experts: nn.Module = layer.block.experts
    handles = [
        layer.router.register_forward_pre_hook(keep_router_inputs, with_kwargs=True),
        experts.register_forward_pre_hook(keep_experts_inputs_and_stop, with_kwargs=True),
    ]
    layer.top_k = native
    try:
        layer.forward_block(inputs)
    except _ExpertsReached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not experts_call:
        raise RuntimeError(f"MoE layer {layer.name!r} never called its experts module; profile it with method='naive'")

    hidden, native_index, native_weights = _experts_arguments(experts_call)
    num_tokens, width = hidden.shape
    pairs = num_tokens * native
    ones = torch.ones(pairs, 1, dtype=native_weights.dtype, device=native_weights.device)
    # expert_outputs[t, s] is the output of token t's s-th selected expert, with weight 1.
    expert_outputs = experts(hidden.repeat_interleave(native, dim=0), native_index.reshape(pairs, 1), ones)
    expert_outputs = expert_outputs.float().reshape(num_tokens, native, width)
    base = torch.einsum("ts,tsd->td", native_weights.float(), expert_outputs)
    base_norm = torch.linalg.vector_norm(base).item()

    distances = []
    try:
        for k in range(1, native):
            layer.top_k = k
            _, weights, index = layer.router(*router_call["args"], **router_call["kwargs"])[:3]
            # match[t, j, s]: the j-th expert selected at k is the s-th expert selected at native k.
            match = index[:, :, None] == native_index[:, None, :]
            if not bool((match.sum(dim=-1) == 1).all()):
                raise RuntimeError(
                    f"MoE layer {layer.name!r} selected experts at k={k} outside its native top-{native}; "
                    "profile it with method='naive'"
                )
            slot_weights = torch.einsum("tj,tjs->ts", weights.float(), match.float())
            routed = torch.einsum("ts,tsd->td", slot_weights, expert_outputs)
            distances.append(torch.linalg.vector_norm(routed - base).item())
    finally:
        layer.top_k = native
    return [*distances, 0.0], base_norm


def _experts_arguments(call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (hidden_states, top_k_index, top_k_weights) from a recorded experts call."""
    args = list(call["args"])
    kwargs = call["kwargs"]
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = [args.pop(0) if args else kwargs[name] for name in names]
    return values[0], values[1], values[2]
