"""Random per-layer top-k under a fixed budget: the baseline that measures how much LExI's allocation adds.

`random_top_k` draws uniformly from every integer vector k with ``lower_j <= k_j <= upper_j`` and
``sum_j k_j = budget``. It counts the completions of each partial vector exactly (Python integers, no overflow)
and draws layer by layer with probabilities proportional to those counts, so every feasible vector has the same
probability. The draws use Python's `random.Random`, whose ``randrange`` is exact for counts of any size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from lexi_pl.adapter import MoEAdapter
from lexi_pl.plan import TopKPlan


def _bounds(upper: Sequence[int], lower: int | Sequence[int]) -> tuple[list[int], list[int]]:
    upper_list = [int(value) for value in upper]
    lower_list = [int(lower)] * len(upper_list) if isinstance(lower, (int, np.integer)) else [int(v) for v in lower]
    if not upper_list:
        raise ValueError("upper must give one bound per layer, got an empty sequence")
    if len(lower_list) != len(upper_list):
        raise ValueError(f"lower has {len(lower_list)} entries for {len(upper_list)} layers; give one per layer")
    for layer, (low, high) in enumerate(zip(lower_list, upper_list)):
        if not 1 <= low <= high:
            raise ValueError(f"layer {layer} needs bounds with 1 <= lower <= upper, got lower {low} and upper {high}")
    return lower_list, upper_list


def count_allocations(upper: Sequence[int], budget: int, lower: int | Sequence[int] = 1) -> int:
    """Return the number of integer vectors k with lower <= k <= upper (per layer) and sum(k) == budget."""
    lower_list, upper_list = _bounds(upper, lower)
    return _completion_counts(lower_list, upper_list)[0].get(int(budget), 0)


def _completion_counts(lower: list[int], upper: list[int]) -> list[dict[int, int]]:
    """Return, for each layer j, {remaining budget: number of ways layers j.. can use exactly that budget}."""
    layers = len(upper)
    counts: list[dict[int, int]] = [dict() for _ in range(layers + 1)]
    counts[layers] = {0: 1}
    for layer in range(layers - 1, -1, -1):
        following = counts[layer + 1]
        current: dict[int, int] = {}
        for rest, ways in following.items():
            for k in range(lower[layer], upper[layer] + 1):
                current[rest + k] = current.get(rest + k, 0) + ways
        counts[layer] = current
    return counts


def random_top_k(
    upper: Sequence[int], budget: int, seed: int = 0, lower: int | Sequence[int] = 1
) -> list[int]:
    """Draw a per-layer k uniformly from all vectors with lower <= k <= upper and sum(k) == budget.

    Args:
        upper: largest k per layer, usually the native k.
        budget: total k over all layers.
        seed: seed of the draw; the same seed gives the same vector.
        lower: smallest k, for all layers or per layer.

    Raises:
        ValueError: invalid bounds, or a budget outside [sum(lower), sum(upper)].
    """
    lower_list, upper_list = _bounds(upper, lower)
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an integer, got {budget!r}")
    counts = _completion_counts(lower_list, upper_list)
    if int(budget) not in counts[0]:
        raise ValueError(
            f"budget {budget} is outside the feasible range [{sum(lower_list)}, {sum(upper_list)}] given by the "
            "per-layer bounds"
        )
    rng = random.Random(seed)

    remaining = int(budget)
    top_k: list[int] = []
    for layer in range(len(upper_list)):
        options = range(lower_list[layer], upper_list[layer] + 1)
        ways = [counts[layer + 1].get(remaining - k, 0) for k in options]
        total = sum(ways)
        draw = rng.randrange(total)
        for k, count in zip(options, ways):
            if draw < count:
                break
            draw -= count
        top_k.append(k)
        remaining -= k
    return top_k


def random_plan(adapter: MoEAdapter, budget: int, seed: int = 0, lower: int | Sequence[int] = 1) -> TopKPlan:
    """Return a plan with a uniformly random per-layer k (`random_top_k` between `lower` and the native k).

    The plan has method "random", the native routing weights, the model's fingerprint and the seed in
    ``extra["seed"]``, so the LExI callback can load it like any other plan.
    """
    top_k = random_top_k(adapter.native_top_k, budget, seed=seed, lower=lower)
    return TopKPlan(
        top_k=dict(zip(adapter.names, top_k)),
        native_top_k=dict(zip(adapter.names, adapter.native_top_k)),
        budget=int(budget),
        method="random",
        routing_weights="native",
        fingerprint=adapter.fingerprint(),
        extra={"seed": seed},
    )
