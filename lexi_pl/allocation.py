"""Stage 2 of LExI: choose each MoE layer's top-k under a total budget of active experts.

Given the per-layer deviations D_j(k) of a ``SensitivityProfile``, the allocation minimises
sum_j D_j(k_j) subject to sum_j k_j = B and k_min_j <= k_j <= k_max_j. This is a multiple-choice
knapsack problem with an equality constraint. Three methods solve it:

* ``"dp"``: exact dynamic programming over (layer, budget), O(L * B * K) for L layers and
  K options per layer.
* ``"evolutionary"``: the genetic algorithm that LExI (arXiv 2509.02753) uses, kept for
  comparison with that work. Its plan also records the exact optimum and the gap to it.
* ``"uniform"``: the same k in every layer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

from lexi_pl.plan import TopKPlan
from lexi_pl.profile_table import SensitivityProfile, is_integer_value

logger = logging.getLogger(__name__)

METHODS = ("dp", "evolutionary", "uniform")
NORMALIZATIONS = ("none", "base_norm")

DEFAULT_POPULATION_SIZE = 128
DEFAULT_GENERATIONS = 200
DEFAULT_TOURNAMENT_SIZE = 3

# Tolerances for treating a float product (average_k * layers, fraction * native total) as an
# exact integer or an exact half, so that decimal inputs behave as written. For example,
# 0.58 * 25 is 14.499999999999998 in floating point but rounds half up to 15.
_INTEGER_TOLERANCE = 1e-6
_HALF_TOLERANCE = 1e-9


@dataclass(frozen=True)
class FrontierPoint:
    """Exact optimum of the allocation problem at one budget."""

    budget: int
    """Total active experts over all MoE layers."""
    objective: float
    """Minimum of sum_j D_j(k_j) at this budget."""
    top_k: tuple[int, ...]
    """Optimal k per layer, in the profile's layer order."""


@dataclass
class EvolutionResult:
    """Outcome of ``evolutionary_search``."""

    best: np.ndarray
    """Best allocation found, one k per layer."""
    objective: float
    """Objective of ``best``."""
    population: np.ndarray
    """Final population, shape (population_size, layers), sorted by objective, so row 0 is ``best``."""
    objectives: np.ndarray
    """Objective of each row of ``population``."""
    generations: int
    """Number of generations run."""


def allocate(
    profile: SensitivityProfile,
    budget: int | None = None,
    *,
    average_k: float | None = None,
    fraction: float | None = None,
    method: str = "dp",
    k_min: int | Sequence[int] = 1,
    k_max: int | Sequence[int] | None = None,
    normalize: str = "none",
    seed: int = 0,
    **method_options: Any,
) -> TopKPlan:
    """Choose a top-k per MoE layer that minimises the total deviation at a fixed budget.

    Give exactly one of:

    * ``budget``: total active experts over all MoE layers.
    * ``average_k``: mean k per layer. The budget is ``average_k * num_layers``, which must be
      within 1e-6 of an integer. Otherwise the ValueError names the nearest feasible averages.
    * ``fraction``: share of the native total. The budget is ``fraction * native_total``
      rounded to the nearest integer, with halves rounded up (a product within 1e-9 of a half
      counts as a half).

    ``k_min`` and ``k_max`` bound every layer's k. Each is an int for all layers or a list with
    one entry per layer. ``k_max`` defaults to the native k and must not exceed it, because the
    profile measures deviations only up to the native k. A budget outside
    [sum k_min, sum k_max] raises ValueError with the feasible range.

    ``normalize="base_norm"`` divides each layer's deviations by its ``base_norms`` entry,
    which makes them relative errors. A layer with a zero base norm keeps its unscaled
    deviations and, unless they are all 0, is listed in ``plan.extra["unscaled_layers"]``.

    ``method`` is "dp" (exact), "evolutionary" or "uniform", as described in the module docstring.
    ``seed`` and ``method_options`` (population_size, generations, tournament_size,
    mutation_rate) apply to "evolutionary" only. ``evolutionary_search`` documents their defaults.

    The plan's ``routing_weights`` comes from ``profile.settings["routing_weights"]`` ("native"
    when absent) because the deviations were measured under that setting.
    """
    if not isinstance(profile, SensitivityProfile):
        raise TypeError(
            f"allocate takes a SensitivityProfile, got {type(profile).__name__}; make one with "
            "lexi_pl.profiling.profile_sensitivity(adapter) or SensitivityProfile.load(path)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if method not in METHODS:
        raise ValueError(f"unknown allocation method {method!r}; expected one of {', '.join(METHODS)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; expected one of {', '.join(NORMALIZATIONS)}")
    if method != "evolutionary" and method_options:
        raise TypeError(f"method {method!r} takes no options, got {sorted(method_options)}")

    lower, upper = _resolve_bounds(profile, k_min, k_max)
    costs, unscaled_layers = _profile_cost_matrix(profile, normalize)
    total_budget = _resolve_budget(
        budget,
        average_k,
        fraction,
        num_layers=profile.num_layers,
        native_total=profile.native_total,
        lower_total=int(lower.sum()),
        upper_total=int(upper.sum()),
    )
    logger.debug(
        "allocating %d active experts over %d layers with method %s, normalize %s",
        total_budget,
        profile.num_layers,
        method,
        normalize,
    )

    extra: dict[str, Any] = {}
    if unscaled_layers:
        extra["unscaled_layers"] = unscaled_layers

    if method == "dp":
        ks = _solve_exact(costs, total_budget, lower, upper)
    elif method == "uniform":
        ks = _uniform_allocation(profile.layer_names, total_budget, lower, upper)
    else:
        ks, extra["evolutionary"] = _run_evolutionary(costs, total_budget, lower, upper, seed, method_options)

    objective = _objective(costs, ks)
    if normalize != "none":
        raw_costs, _ = _profile_cost_matrix(profile, "none")
        extra["unnormalized_objective"] = _objective(raw_costs, ks)

    return TopKPlan(
        top_k={name: int(k) for name, k in zip(profile.layer_names, ks)},
        native_top_k=dict(zip(profile.layer_names, profile.native_top_k)),
        budget=total_budget,
        method=method,
        routing_weights=str(profile.settings.get("routing_weights", "native")),
        objective=objective,
        normalize=normalize,
        profile_settings=dict(profile.settings),
        fingerprint=profile.fingerprint,
        extra=extra,
    )


def pareto_frontier(
    profile: SensitivityProfile,
    *,
    k_min: int | Sequence[int] = 1,
    k_max: int | Sequence[int] | None = None,
    normalize: str = "none",
) -> list[FrontierPoint]:
    """Return the exact optimum for every feasible budget, from sum k_min to sum k_max, in one DP pass.

    Each point equals ``allocate(profile, budget=point.budget, method="dp", ...)`` with the
    same bounds and normalisation. When every D_j is non-increasing in k within its bounds,
    the objective is non-increasing in the budget: raising any layer of an optimum below its
    k_max by one gives a feasible allocation for the next budget at no higher cost. Without
    that property the optima are still exact, but a larger budget can have a larger optimum,
    because the budget is an equality.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; expected one of {', '.join(NORMALIZATIONS)}")
    lower, upper = _resolve_bounds(profile, k_min, k_max)
    costs, _ = _profile_cost_matrix(profile, normalize)

    started = time.perf_counter()
    _, choices = _dp_tables(costs, lower, upper)
    budgets = np.arange(int(lower.sum()), int(upper.sum()) + 1)
    allocations = _backtrack(choices, budgets)
    objectives = costs[np.arange(costs.shape[0]), allocations - 1].sum(axis=1)
    logger.debug(
        "pareto frontier over %d budgets and %d layers took %.2f ms",
        len(budgets),
        costs.shape[0],
        1e3 * (time.perf_counter() - started),
    )
    return [
        FrontierPoint(budget=int(budget), objective=float(objective), top_k=tuple(int(k) for k in ks))
        for budget, objective, ks in zip(budgets, objectives, allocations)
    ]


def exact_allocation(
    cost_table: Sequence[Sequence[float]],
    budget: int,
    lower: Sequence[int],
    upper: Sequence[int],
) -> tuple[list[int], float]:
    """Solve the allocation problem exactly for raw per-layer costs and return (k per layer, objective).

    ``cost_table[j][k - 1]`` is layer j's cost at k. Layer j's k ranges over
    ``lower[j]..upper[j]``, where ``upper[j]`` is at most ``len(cost_table[j])``.
    """
    costs = _cost_matrix(cost_table)
    lower_array, upper_array = _validate_raw_bounds(costs, lower, upper)
    _validate_raw_budget(budget, lower_array, upper_array)
    ks = _solve_exact(costs, int(budget), lower_array, upper_array)
    return [int(k) for k in ks], _objective(costs, ks)


def evolutionary_search(
    cost_table: Sequence[Sequence[float]],
    budget: int,
    lower: Sequence[int],
    upper: Sequence[int],
    *,
    population_size: int = DEFAULT_POPULATION_SIZE,
    generations: int = DEFAULT_GENERATIONS,
    tournament_size: int = DEFAULT_TOURNAMENT_SIZE,
    mutation_rate: float | None = None,
    seed: int = 0,
) -> EvolutionResult:
    """Search for a low-cost allocation with a genetic algorithm modelled on the one in LExI.

    ``cost_table``, ``lower`` and ``upper`` are as in ``exact_allocation``. Every individual is
    a feasible allocation (sum equal to ``budget``, each k within its bounds). The first
    population is the near-uniform allocation plus random feasible vectors. Each generation
    creates ``population_size`` children:

    1. Two parents are picked by tournament selection: the lowest-cost of ``tournament_size``
       individuals drawn uniformly with replacement.
    2. Uniform crossover takes each layer's k from either parent with probability 1/2.
    3. Repair restores the budget by adding or removing one expert at randomly chosen layers
       that have room within their bounds.
    4. Zero-sum mutation picks each layer with probability ``mutation_rate`` for +1 and the
       same number of other layers for -1, within the bounds. The default rate is 1 / layers,
       so a child gets one +1/-1 pair on average.

    The population has a fixed size with elitist replacement: parents and children are pooled,
    duplicates are dropped and the ``population_size`` lowest-cost distinct allocations
    survive. When fewer distinct allocations exist, random feasible ones fill the gap. The
    search uses ``numpy.random.default_rng(seed)`` and is deterministic for a fixed seed.
    NOTE: LExI's own algorithm is reported to let the population grow without culling. The
    fixed size bounds the run time, and the two variants have not been compared here.

    Defaults: population_size 128, generations 200, tournament_size 3, mutation_rate 1 / layers.
    In a check on 20 random non-increasing tables with 16 layers of 2 to 8 options, these
    defaults found the exact optimum every time. On tables with 64 layers they ended up to
    about 3 % above it; benchmarks/bench_allocation.py prints this gap.
    """
    costs = _cost_matrix(cost_table)
    lower_array, upper_array = _validate_raw_bounds(costs, lower, upper)
    _validate_raw_budget(budget, lower_array, upper_array)
    if mutation_rate is None:
        mutation_rate = 1.0 / costs.shape[0]
    _validate_evolution_settings(population_size, generations, tournament_size, mutation_rate)
    budget = int(budget)
    rng = np.random.default_rng(seed)

    population = np.empty((population_size, costs.shape[0]), dtype=np.int64)
    population[0] = _near_uniform(budget, lower_array, upper_array)
    population[1:] = _random_feasible(rng, population_size - 1, budget, lower_array, upper_array)
    objectives = _objectives(costs, population)
    population, objectives = _select_survivors(
        rng, costs, population, objectives, population_size, budget, lower_array, upper_array
    )

    for generation in range(generations):
        first_parents = population[_tournament(rng, objectives, population_size, tournament_size)]
        second_parents = population[_tournament(rng, objectives, population_size, tournament_size)]
        from_first = rng.random(first_parents.shape) < 0.5
        children = np.where(from_first, first_parents, second_parents)
        children = _repair(rng, children, budget, lower_array, upper_array)
        children = _mutate(rng, children, lower_array, upper_array, mutation_rate)

        pooled = np.concatenate([population, children])
        pooled_objectives = np.concatenate([objectives, _objectives(costs, children)])
        population, objectives = _select_survivors(
            rng, costs, pooled, pooled_objectives, population_size, budget, lower_array, upper_array
        )
        if logger.isEnabledFor(logging.DEBUG) and (generation + 1) % 50 == 0:
            logger.debug("evolutionary search generation %d: best objective %.6g", generation + 1, objectives[0])

    return EvolutionResult(
        best=population[0].copy(),
        objective=float(objectives[0]),
        population=population,
        objectives=objectives,
        generations=generations,
    )


# Input checks and problem set-up.


def _resolve_bounds(
    profile: SensitivityProfile,
    k_min: int | Sequence[int],
    k_max: int | Sequence[int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return per-layer (lower, upper) bounds on k as int arrays, checked against the profile."""
    native = np.asarray(profile.native_top_k, dtype=np.int64)
    lower = _per_layer_bound("k_min", k_min, profile.layer_names)
    upper = native.copy() if k_max is None else _per_layer_bound("k_max", k_max, profile.layer_names)

    above_native = [
        f"{name!r} (k_max {int(bound)}, native {int(limit)})"
        for name, bound, limit in zip(profile.layer_names, upper, native)
        if bound > limit
    ]
    if above_native:
        raise ValueError(
            f"k_max exceeds the native top-k of layers {', '.join(above_native[:5])}"
            f"{' and more' if len(above_native) > 5 else ''}. The sensitivity profile measures deviations "
            "only up to each layer's native k, so k_max must be at most the native k."
        )
    crossed = [
        f"{name!r} (k_min {int(low)}, k_max {int(high)})"
        for name, low, high in zip(profile.layer_names, lower, upper)
        if low > high
    ]
    if crossed:
        raise ValueError(
            f"k_min exceeds k_max for layers {', '.join(crossed[:5])}{' and more' if len(crossed) > 5 else ''}. "
            "Lower k_min or raise k_max (k_max defaults to the native k)."
        )
    return lower, upper


def _per_layer_bound(name: str, value: int | Sequence[int], layer_names: Sequence[str]) -> np.ndarray:
    if is_integer_value(value):
        values = [int(value)] * len(layer_names)
    elif isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str):
        if len(value) != len(layer_names):
            raise ValueError(f"{name} must have one entry per MoE layer ({len(layer_names)}), found {len(value)}")
        values = list(value)
    else:
        raise ValueError(f"{name} must be an int or a list of ints, found {value!r}")

    for layer, bound in zip(layer_names, values):
        if not is_integer_value(bound) or bound < 1:
            raise ValueError(f"{name} for layer {layer!r} must be a positive integer, found {bound!r}")
    return np.asarray(values, dtype=np.int64)


def _profile_cost_matrix(profile: SensitivityProfile, normalize: str) -> tuple[np.ndarray, list[str]]:
    """Return the (layers, max native k) cost matrix and the layers left unscaled by a zero base norm."""
    costs = _cost_matrix(profile.deltas)
    unscaled_layers: list[str] = []
    if normalize == "base_norm":
        for index, (name, base_norm) in enumerate(zip(profile.layer_names, profile.base_norms)):
            if base_norm > 0:
                costs[index] /= base_norm
            elif any(delta != 0 for delta in profile.deltas[index]):
                unscaled_layers.append(name)
        if unscaled_layers:
            logger.warning(
                "base norm is 0 for layers %s, so their deviations are used unscaled under normalize='base_norm'",
                unscaled_layers,
            )
    return costs, unscaled_layers


def _cost_matrix(cost_table: Sequence[Sequence[float]]) -> np.ndarray:
    """Return the costs as a (layers, max options) float array, padded with +inf past each layer's last k."""
    if len(cost_table) == 0:
        raise ValueError("the cost table must have at least one layer")
    width = max(len(row) for row in cost_table)
    costs = np.full((len(cost_table), width), np.inf)
    for index, row in enumerate(cost_table):
        values = np.asarray(row, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"costs of layer {index} must be a non-empty list of numbers")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"costs of layer {index} must be finite, found {row!r}")
        costs[index, : values.size] = values
    return costs


def _validate_raw_bounds(
    costs: np.ndarray, lower: Sequence[int], upper: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    layer_count = costs.shape[0]
    option_counts = np.isfinite(costs).sum(axis=1)
    if len(lower) != layer_count or len(upper) != layer_count:
        raise ValueError(
            f"lower and upper must have one entry per layer ({layer_count}), found {len(lower)} and {len(upper)}"
        )
    for index, (low, high) in enumerate(zip(lower, upper)):
        if not (is_integer_value(low) and is_integer_value(high)) or not 1 <= low <= high <= option_counts[index]:
            raise ValueError(
                f"bounds of layer {index} must be integers with 1 <= lower <= upper <= {int(option_counts[index])} "
                f"(its number of costs), found lower {low!r} and upper {high!r}"
            )
    return np.asarray(lower, dtype=np.int64), np.asarray(upper, dtype=np.int64)


def _validate_raw_budget(budget: int, lower: np.ndarray, upper: np.ndarray) -> None:
    if not is_integer_value(budget):
        raise ValueError(f"budget must be an integer, found {budget!r}")
    if not lower.sum() <= budget <= upper.sum():
        raise ValueError(
            f"budget {budget} is outside the feasible range [{int(lower.sum())}, {int(upper.sum())}] "
            "given by the per-layer bounds"
        )


def check_budget(
    native_top_k: Sequence[int],
    budget: int | None = None,
    *,
    average_k: float | None = None,
    fraction: float | None = None,
    k_min: int = 1,
) -> int:
    """Return the total budget that `allocate` would use for layers of `native_top_k`, or raise its ValueError.

    It needs no profile, so callers can reject an infeasible budget before spending time on profiling.
    """
    num_layers = len(native_top_k)
    return _resolve_budget(
        budget,
        average_k,
        fraction,
        num_layers=num_layers,
        native_total=int(sum(native_top_k)),
        lower_total=int(sum(min(k_min, k) for k in native_top_k)),
        upper_total=int(sum(native_top_k)),
    )


def _resolve_budget(
    budget: int | None,
    average_k: float | None,
    fraction: float | None,
    *,
    num_layers: int,
    native_total: int,
    lower_total: int,
    upper_total: int,
) -> int:
    """Turn exactly one of budget, average_k and fraction into a total budget and check it is feasible."""
    budget_forms = {"budget": budget, "average_k": average_k, "fraction": fraction}
    provided = [name for name, value in budget_forms.items() if value is not None]
    if len(provided) != 1:
        listed = f" ({', '.join(provided)})" if provided else ""
        raise ValueError(f"give exactly one of budget, average_k or fraction, found {len(provided)}{listed}")
    feasible = f"the feasible range [{lower_total}, {upper_total}] active experts"
    advice = "Choose a budget in that range or change k_min and k_max."

    if budget is not None:
        if not is_integer_value(budget):
            raise ValueError(f"budget must be an integer number of active experts, found {budget!r}")
        if not lower_total <= budget <= upper_total:
            raise ValueError(
                f"budget {budget} is outside {feasible} for {num_layers} MoE layers and the k bounds. {advice}"
            )
        return int(budget)

    if average_k is not None:
        _require_finite_number("average_k", average_k)
        product = average_k * num_layers
        nearest = round(product)
        if abs(product - nearest) > _INTEGER_TOLERANCE:
            below = min(max(math.floor(product), lower_total), upper_total)
            above = min(max(math.ceil(product), lower_total), upper_total)
            candidates = sorted({below, above})
            options = " or ".join(f"{total / num_layers:.6g} (budget {total})" for total in candidates)
            raise ValueError(
                f"average_k {average_k} times {num_layers} MoE layers gives {product:.6g} active experts, which is "
                f"not an integer. Use the nearest feasible average {options}, or pass budget instead."
            )
        if not lower_total <= nearest <= upper_total:
            raise ValueError(
                f"average_k {average_k} gives a budget of {nearest} active experts, outside {feasible}, "
                f"that is average_k in [{lower_total / num_layers:.6g}, {upper_total / num_layers:.6g}]. {advice}"
            )
        return int(nearest)

    _require_finite_number("fraction", fraction)
    product = fraction * native_total
    rounded = math.floor(product + 0.5 + _HALF_TOLERANCE)
    if not lower_total <= rounded <= upper_total:
        raise ValueError(
            f"fraction {fraction} of the native total {native_total} gives a budget of {rounded} active experts "
            f"(rounded half up from {product:.6g}), outside {feasible}, that is fraction in "
            f"[{lower_total / native_total:.6g}, {upper_total / native_total:.6g}]. {advice}"
        )
    return int(rounded)


def _require_finite_number(name: str, value: Any) -> None:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, found {value!r}")


# Exact dynamic programming.


def _dp_tables(costs: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run the DP over layers and return (best objective per total, k chosen per layer and total).

    ``best[b]`` is the minimum cost of all layers with totals b = 0..sum(upper), +inf where b is
    unreachable. ``choices[j, b]`` is the k of layer j in an optimum of layers 0..j with total
    b. Among equal-cost options the smallest k wins, so results are deterministic.
    """
    layer_count = costs.shape[0]
    size = int(upper.sum()) + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    choices = np.zeros((layer_count, size), dtype=np.int64)

    for layer in range(layer_count):
        low, high = int(lower[layer]), int(upper[layer])
        # Row r contains the total cost when this layer takes k = low + r, indexed by the new total.
        candidates = np.full((high - low + 1, size), np.inf)
        for row, k in enumerate(range(low, high + 1)):
            candidates[row, k:] = best[: size - k] + costs[layer, k - 1]
        best_rows = candidates.argmin(axis=0)
        best = candidates[best_rows, np.arange(size)]
        choices[layer] = low + best_rows
    return best, choices


def _backtrack(choices: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Return the optimal allocation for each budget, shape (len(budgets), layers)."""
    layer_count = choices.shape[0]
    remaining = np.asarray(budgets, dtype=np.int64).copy()
    allocations = np.empty((remaining.size, layer_count), dtype=np.int64)
    for layer in range(layer_count - 1, -1, -1):
        allocations[:, layer] = choices[layer, remaining]
        remaining -= allocations[:, layer]
    if np.any(remaining != 0):
        raise RuntimeError(
            f"DP backtracking left budgets {remaining.tolist()} unassigned. This is a bug in lexi_pl.allocation."
        )
    return allocations


def _solve_exact(costs: np.ndarray, budget: int, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    started = time.perf_counter()
    _, choices = _dp_tables(costs, lower, upper)
    ks = _backtrack(choices, np.array([budget]))[0]
    logger.debug(
        "DP over %d layers and budget %d took %.2f ms", costs.shape[0], budget, 1e3 * (time.perf_counter() - started)
    )
    return ks


def _objective(costs: np.ndarray, ks: np.ndarray) -> float:
    return math.fsum(float(costs[layer, k - 1]) for layer, k in enumerate(ks))


def _objectives(costs: np.ndarray, population: np.ndarray) -> np.ndarray:
    return costs[np.arange(costs.shape[0]), population - 1].sum(axis=1)


# Uniform allocation.


def _uniform_allocation(
    layer_names: Sequence[str], budget: int, lower: np.ndarray, upper: np.ndarray
) -> np.ndarray:
    layer_count = len(layer_names)
    smallest_k, largest_k = int(lower.max()), int(upper.min())
    if smallest_k > largest_k:
        raise ValueError(
            f"method 'uniform' needs one k within every layer's bounds, but the largest k_min ({smallest_k}) "
            f"exceeds the smallest k_max ({largest_k}). Use method 'dp' or widen the bounds."
        )
    if budget % layer_count == 0 and smallest_k <= budget // layer_count <= largest_k:
        return np.full(layer_count, budget // layer_count, dtype=np.int64)

    below = min(max(budget // layer_count, smallest_k), largest_k)
    above = min(max(-(-budget // layer_count), smallest_k), largest_k)
    nearest = " and ".join(f"{k * layer_count} (k={k})" for k in sorted({below, above}))
    raise ValueError(
        f"method 'uniform' needs a budget that gives the same k in all {layer_count} MoE layers within their bounds "
        f"(k in [{smallest_k}, {largest_k}]), and budget {budget} does not. The nearest uniform budgets are {nearest}."
    )


# Evolutionary search.


def _run_evolutionary(
    costs: np.ndarray,
    budget: int,
    lower: np.ndarray,
    upper: np.ndarray,
    seed: int,
    options: dict[str, Any],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the evolutionary search and the DP, and return the search's allocation and a report for the plan."""
    known = ("population_size", "generations", "tournament_size", "mutation_rate")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown options for method 'evolutionary': {unknown}; expected some of {list(known)}")
    settings = {
        "population_size": options.get("population_size", DEFAULT_POPULATION_SIZE),
        "generations": options.get("generations", DEFAULT_GENERATIONS),
        "tournament_size": options.get("tournament_size", DEFAULT_TOURNAMENT_SIZE),
        "mutation_rate": options.get("mutation_rate", 1.0 / costs.shape[0]),
        "seed": seed,
    }

    started = time.perf_counter()
    cost_rows = [costs[layer, : int(np.isfinite(costs[layer]).sum())] for layer in range(costs.shape[0])]
    result = evolutionary_search(cost_rows, budget, lower.tolist(), upper.tolist(), **settings)
    elapsed = time.perf_counter() - started

    exact_objective = _objective(costs, _solve_exact(costs, budget, lower, upper))
    absolute_gap = result.objective - exact_objective
    if exact_objective > 0:
        relative_gap: float | None = absolute_gap / exact_objective
    else:
        # The relative gap is undefined when the optimum is 0, unless the search also found 0.
        relative_gap = 0.0 if absolute_gap == 0 else None
    logger.debug(
        "evolutionary search took %.1f ms: objective %.6g, DP optimum %.6g",
        1e3 * elapsed,
        result.objective,
        exact_objective,
    )
    report = {
        **settings,
        "objective": result.objective,
        "dp_objective": exact_objective,
        "absolute_gap": absolute_gap,
        "relative_gap": relative_gap,
    }
    return result.best, report


def _validate_evolution_settings(
    population_size: int, generations: int, tournament_size: int, mutation_rate: float
) -> None:
    if not is_integer_value(population_size) or population_size < 2:
        raise ValueError(f"population_size must be an integer >= 2, found {population_size!r}")
    if not is_integer_value(generations) or generations < 0:
        raise ValueError(f"generations must be an integer >= 0, found {generations!r}")
    if not is_integer_value(tournament_size) or not 1 <= tournament_size <= population_size:
        raise ValueError(
            f"tournament_size must be an integer in [1, population_size={population_size}], found {tournament_size!r}"
        )
    if not isinstance(mutation_rate, Real) or isinstance(mutation_rate, bool) or not 0 <= mutation_rate <= 1:
        raise ValueError(f"mutation_rate must be a probability in [0, 1], found {mutation_rate!r}")


def _near_uniform(budget: int, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Return the feasible allocation closest to uniform: raise the lowest layers first, earlier layers on ties."""
    ks = lower.copy()
    remaining = budget - int(ks.sum())
    while remaining > 0:
        has_room = ks < upper
        level = ks[has_room].min()
        at_level = np.flatnonzero(has_room & (ks == level))[:remaining]
        ks[at_level] += 1
        remaining -= at_level.size
    return ks


def _random_feasible(
    rng: np.random.Generator, count: int, budget: int, lower: np.ndarray, upper: np.ndarray
) -> np.ndarray:
    """Return ``count`` random feasible allocations: uniform draws within the bounds, then repaired to the budget."""
    draws = rng.integers(lower, upper + 1, size=(count, lower.size))
    return _repair(rng, draws, budget, lower, upper)


def _choose_per_row(rng: np.random.Generator, eligible: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Return a mask that marks ``min(counts[i], eligible[i].sum())`` random eligible entries in each row i."""
    scores = rng.random(eligible.shape)
    scores[~eligible] = 2.0
    ranks = scores.argsort(axis=1).argsort(axis=1)
    return eligible & (ranks < counts[:, None])


def _repair(
    rng: np.random.Generator, vectors: np.ndarray, budget: int, lower: np.ndarray, upper: np.ndarray
) -> np.ndarray:
    """Clip each row into the bounds, then add or remove one expert at random layers until it sums to the budget.

    Each pass changes every unbalanced row by at least one, because a feasible budget leaves
    some layer with room in the needed direction, so the loop ends.
    """
    vectors = np.clip(vectors, lower, upper)
    while True:
        deficit = budget - vectors.sum(axis=1)
        if not deficit.any():
            return vectors
        grow = deficit > 0
        eligible = np.where(grow[:, None], vectors < upper, vectors > lower)
        chosen = _choose_per_row(rng, eligible, np.abs(deficit)).astype(np.int64)
        vectors = vectors + np.where(grow[:, None], chosen, -chosen)


def _mutate(
    rng: np.random.Generator, vectors: np.ndarray, lower: np.ndarray, upper: np.ndarray, rate: float
) -> np.ndarray:
    """Apply zero-sum mutation: +1 on some layers and -1 on as many others, staying within the bounds."""
    can_grow = vectors < upper
    can_shrink = vectors > lower
    requested_pairs = rng.binomial(vectors.shape[1], rate, size=vectors.shape[0])
    requested_pairs = np.minimum(requested_pairs, np.minimum(can_grow.sum(axis=1), can_shrink.sum(axis=1)))

    grow = _choose_per_row(rng, can_grow, requested_pairs)
    shrink_candidates = can_shrink & ~grow
    # A layer picked to grow cannot also shrink, which can leave too few shrink candidates.
    pairs = np.minimum(grow.sum(axis=1), shrink_candidates.sum(axis=1))
    grow = _choose_per_row(rng, grow, pairs)
    shrink = _choose_per_row(rng, shrink_candidates, pairs)
    return vectors + grow.astype(np.int64) - shrink.astype(np.int64)


def _tournament(rng: np.random.Generator, objectives: np.ndarray, count: int, size: int) -> np.ndarray:
    """Return the indices of ``count`` tournament winners, each the lowest-cost of ``size`` random entrants."""
    entrants = rng.integers(0, objectives.size, size=(count, size))
    winners = objectives[entrants].argmin(axis=1)
    return entrants[np.arange(count), winners]


def _select_survivors(
    rng: np.random.Generator,
    costs: np.ndarray,
    pool: np.ndarray,
    pool_objectives: np.ndarray,
    population_size: int,
    budget: int,
    lower: np.ndarray,
    upper: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``population_size`` lowest-cost distinct allocations, sorted by cost.

    Random feasible allocations fill the population when the pool has too few distinct rows.
    """
    _, first_indices = np.unique(pool, axis=0, return_index=True)
    first_indices.sort()
    order = first_indices[np.argsort(pool_objectives[first_indices], kind="stable")][:population_size]
    survivors = pool[order]
    survivor_objectives = pool_objectives[order]

    shortfall = population_size - survivors.shape[0]
    if shortfall > 0:
        newcomers = _random_feasible(rng, shortfall, budget, lower, upper)
        survivors = np.concatenate([survivors, newcomers])
        survivor_objectives = np.concatenate([survivor_objectives, _objectives(costs, newcomers)])
        resort = np.argsort(survivor_objectives, kind="stable")
        survivors, survivor_objectives = survivors[resort], survivor_objectives[resort]
    return survivors, survivor_objectives
