"""Tests for Stage 2 allocation: exact DP, Pareto frontier, evolutionary search and uniform."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lexi_pl.allocation import (
    allocate,
    evolutionary_search,
    exact_allocation,
    pareto_frontier,
)
from lexi_pl.profile_table import SensitivityProfile


def make_profile(deltas, base_norms=None, settings=None):
    layer_count = len(deltas)
    native = [len(row) for row in deltas]
    return SensitivityProfile(
        layer_names=[f"model.layers.{index}.mlp" for index in range(layer_count)],
        native_top_k=native,
        max_top_k=native,
        num_experts=[max(8, k) for k in native],
        deltas=[list(map(float, row)) for row in deltas],
        base_norms=[1.0] * layer_count if base_norms is None else list(base_norms),
        fingerprint="test-fingerprint",
        settings={} if settings is None else settings,
    )


def random_deltas(rng, layer_count, min_native, max_native, monotone):
    """Return per-layer deltas with native k drawn from [min_native, max_native] and delta 0 at the native k."""
    deltas = []
    for _ in range(layer_count):
        native = int(rng.integers(min_native, max_native + 1))
        values = rng.random(native - 1) * rng.uniform(0.5, 5.0)
        if monotone:
            values = np.sort(values)[::-1]
        deltas.append([*values.tolist(), 0.0])
    return deltas


def brute_force(deltas, budget, lower, upper):
    best_objective, best_ks = math.inf, None
    ranges = [range(low, high + 1) for low, high in zip(lower, upper)]
    for ks in itertools.product(*ranges):
        if sum(ks) != budget:
            continue
        objective = sum(row[k - 1] for row, k in zip(deltas, ks))
        if objective < best_objective:
            best_objective, best_ks = objective, ks
    return best_objective, best_ks


def plan_ks(plan):
    return list(plan.top_k.values())


# Hand-worked example. Lowering k costs 5.0 for layer a (2 to 1), 1.0 or 4.0 for layer b (3 to 2 or 1)
# and 0.5 for layer c (2 to 1).
HAND_DELTAS = [[5.0, 0.0], [4.0, 1.0, 0.0], [0.5, 0.0]]


def test_dp_hand_worked_budget_5():
    # Dropping 2 of 7 experts: b to 2 and c to 1 costs 1.5, b to 1 costs 4.0, and anything that lowers a costs >= 5.
    plan = allocate(make_profile(HAND_DELTAS), budget=5)

    assert plan_ks(plan) == [2, 2, 1]
    assert plan.objective == pytest.approx(1.5)
    assert plan.budget == 5
    assert plan.method == "dp"


def test_dp_hand_worked_budget_4():
    # Dropping 3 of 7 experts: b and c to 1 costs 4.5, a and b to 1 costs 9.0, and a, b and c by one costs 6.5.
    plan = allocate(make_profile(HAND_DELTAS), budget=4)

    assert plan_ks(plan) == [2, 1, 1]
    assert plan.objective == pytest.approx(4.5)


def test_dp_native_budget_keeps_native():
    plan = allocate(make_profile(HAND_DELTAS), budget=7)

    assert plan_ks(plan) == [2, 3, 2]
    assert plan.objective == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    deltas = random_deltas(rng, layer_count=4, min_native=2, max_native=4, monotone=seed % 2 == 0)
    profile = make_profile(deltas)
    lower = [1] * 4
    upper = profile.native_top_k

    for budget in range(sum(lower), sum(upper) + 1):
        expected_objective, expected_ks = brute_force(deltas, budget, lower, upper)
        plan = allocate(profile, budget=budget)

        assert plan.total == budget
        assert plan.objective == pytest.approx(expected_objective, abs=1e-12)
        assert plan_ks(plan) == list(expected_ks)


def test_dp_matches_brute_force_with_bounds():
    rng = np.random.default_rng(11)
    deltas = random_deltas(rng, layer_count=4, min_native=3, max_native=4, monotone=False)
    profile = make_profile(deltas)
    lower = [2, 1, 2, 1]
    upper = [3, 2, profile.native_top_k[2], 3]

    for budget in range(sum(lower), sum(upper) + 1):
        expected_objective, _ = brute_force(deltas, budget, lower, upper)
        plan = allocate(profile, budget=budget, k_min=lower, k_max=upper)
        ks = plan_ks(plan)

        assert plan.objective == pytest.approx(expected_objective, abs=1e-12)
        assert all(low <= k <= high for k, low, high in zip(ks, lower, upper))


def test_dp_different_native_k_per_layer():
    deltas = [[3.0, 0.0], [9.0, 5.0, 2.0, 1.0, 0.0], [0.1, 0.0]]
    plan = allocate(make_profile(deltas), budget=6)

    # Dropping 3 of 9: the last layer to 1 (0.1) and the middle layer to 3 (2.0) is the cheapest.
    assert plan_ks(plan) == [2, 3, 1]
    assert plan.objective == pytest.approx(2.1)
    assert plan.native_top_k == {"model.layers.0.mlp": 2, "model.layers.1.mlp": 5, "model.layers.2.mlp": 2}


def test_exact_allocation_raw_table():
    ks, objective = exact_allocation(HAND_DELTAS, 5, [1, 1, 1], [2, 3, 2])

    assert ks == [2, 2, 1]
    assert objective == pytest.approx(1.5)


def test_dp_large_table_keeps_budget():
    rng = np.random.default_rng(0)
    profile = make_profile(random_deltas(rng, layer_count=64, min_native=8, max_native=8, monotone=True))
    plan = allocate(profile, average_k=4)
    assert plan.total == 256
    assert all(1 <= k <= 8 for k in plan.top_k.values())


def test_frontier_non_increasing_for_monotone_tables():
    rng = np.random.default_rng(3)
    for _ in range(5):
        profile = make_profile(random_deltas(rng, layer_count=6, min_native=2, max_native=5, monotone=True))
        frontier = pareto_frontier(profile)
        objectives = [point.objective for point in frontier]

        assert [point.budget for point in frontier] == list(range(6, profile.native_total + 1))
        assert all(later <= earlier + 1e-12 for earlier, later in zip(objectives, objectives[1:]))
        assert objectives[-1] == 0.0


def test_frontier_points_match_allocate():
    rng = np.random.default_rng(4)
    profile = make_profile(random_deltas(rng, layer_count=5, min_native=2, max_native=6, monotone=False))
    lower = [1, 2, 1, 1, 2]

    for point in pareto_frontier(profile, k_min=lower, normalize="base_norm"):
        plan = allocate(profile, budget=point.budget, k_min=lower, normalize="base_norm")

        assert sum(point.top_k) == point.budget
        assert list(point.top_k) == plan_ks(plan)
        assert point.objective == pytest.approx(plan.objective, abs=1e-12)


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"budget": 2}, r"budget 2 is outside the feasible range \[3, 7\]"),
        ({"budget": 8}, r"budget 8 is outside the feasible range \[3, 7\]"),
        ({"average_k": 3.0}, r"budget of 9 .*\[3, 7\].*average_k in \[1, 2\.33333\]"),
        ({"average_k": 0.0}, r"budget of 0 .*\[3, 7\]"),
        ({"fraction": 0.3}, r"budget of 2 .*\[3, 7\].*fraction in \[0\.428571, 1\]"),
        ({"fraction": 1.2}, r"budget of 8 .*\[3, 7\]"),
    ],
)
def test_infeasible_budget_names_range(request_kwargs, message):
    with pytest.raises(ValueError, match=message):
        allocate(make_profile(HAND_DELTAS), **request_kwargs)


def test_infeasible_budget_with_bounds():
    with pytest.raises(ValueError, match=r"budget 4 is outside the feasible range \[5, 7\]"):
        allocate(make_profile(HAND_DELTAS), budget=4, k_min=[2, 2, 1])


def test_average_k_must_give_integer_budget():
    with pytest.raises(ValueError, match=r"not an integer.*1\.66667 \(budget 5\) or 2 \(budget 6\)"):
        allocate(make_profile(HAND_DELTAS), average_k=1.8)


def test_average_k_integer_budget():
    plan = allocate(make_profile(HAND_DELTAS), average_k=5 / 3)

    assert plan.budget == 5
    assert plan_ks(plan) == [2, 2, 1]


@pytest.mark.parametrize(
    ("fraction", "expected_budget"),
    [
        (0.5, 4),  # 3.5 rounds half up to 4
        (0.4, 3),  # 2.8 rounds to 3
        (5 / 7, 5),  # 5.0 within float error
        (0.64, 4),  # 4.48 rounds down
        (1.0, 7),
    ],
)
def test_fraction_rounds_half_up(fraction, expected_budget):
    plan = allocate(make_profile(HAND_DELTAS), fraction=fraction)

    assert plan.budget == expected_budget


def test_fraction_decimal_half_rounds_up():
    # 0.58 * 25 is 14.499999999999998 in binary floating point but counts as 14.5, so the budget is 15.
    profile = make_profile([[4.0, 3.0, 2.0, 1.0, 0.0]] * 5)

    assert 0.58 * 25 < 14.5
    assert allocate(profile, fraction=0.58).budget == 15


def test_exactly_one_budget_form():
    profile = make_profile(HAND_DELTAS)

    with pytest.raises(ValueError, match="exactly one of budget, average_k or fraction, found 0"):
        allocate(profile)
    with pytest.raises(ValueError, match=r"found 2 \(budget, fraction\)"):
        allocate(profile, budget=5, fraction=0.5)


def test_k_max_above_native_rejected():
    message = r"k_max exceeds the native top-k of layers 'model.layers.0.mlp' \(k_max 3, native 2\)"
    with pytest.raises(ValueError, match=message):
        allocate(make_profile(HAND_DELTAS), budget=5, k_max=3)


def test_k_min_above_k_max_rejected():
    with pytest.raises(ValueError, match="k_min exceeds k_max for layers 'model.layers.0.mlp'"):
        allocate(make_profile(HAND_DELTAS), budget=5, k_min=[3, 1, 1])


def test_bound_list_length_checked():
    with pytest.raises(ValueError, match=r"k_min must have one entry per MoE layer \(3\), found 2"):
        allocate(make_profile(HAND_DELTAS), budget=5, k_min=[1, 1])


def test_unknown_method_and_normalize():
    profile = make_profile(HAND_DELTAS)

    with pytest.raises(ValueError, match="unknown allocation method 'greedy'"):
        allocate(profile, budget=5, method="greedy")
    with pytest.raises(ValueError, match="unknown normalize 'l2'"):
        allocate(profile, budget=5, normalize="l2")
    with pytest.raises(TypeError, match="method 'dp' takes no options"):
        allocate(profile, budget=5, generations=3)


def test_base_norm_changes_allocation():
    # Raw costs of dropping one expert: x 10, y 2, so "none" drops y. Relative to the base norms
    # (100 and 1) they are 0.1 and 2, so "base_norm" drops x instead.
    profile = make_profile([[10.0, 0.0], [2.0, 0.0]], base_norms=[100.0, 1.0])

    raw = allocate(profile, budget=3)
    relative = allocate(profile, budget=3, normalize="base_norm")

    assert plan_ks(raw) == [2, 1]
    assert plan_ks(relative) == [1, 2]
    assert relative.normalize == "base_norm"
    assert relative.objective == pytest.approx(0.1)
    assert relative.extra["unnormalized_objective"] == pytest.approx(10.0)


def test_base_norm_zero_keeps_layer_unscaled():
    profile = make_profile([[10.0, 0.0], [2.0, 0.0]], base_norms=[100.0, 0.0])

    plan = allocate(profile, budget=3, normalize="base_norm")

    assert plan_ks(plan) == [1, 2]
    assert plan.objective == pytest.approx(0.1)
    assert plan.extra["unscaled_layers"] == ["model.layers.1.mlp"]
    assert math.isfinite(plan.objective)


def test_plan_records_profile_details():
    settings = {"routing_weights": "renormalized", "seed": 3}
    plan = allocate(make_profile(HAND_DELTAS, settings=settings), budget=5)

    assert plan.routing_weights == "renormalized"
    assert plan.profile_settings == settings
    assert plan.fingerprint == "test-fingerprint"
    assert plan.normalize == "none"


def test_uniform_divisible_budget():
    profile = make_profile([[3.0, 2.0, 1.0, 0.0]] * 4)

    plan = allocate(profile, budget=8, method="uniform")

    assert plan_ks(plan) == [2, 2, 2, 2]
    assert plan.objective == pytest.approx(8.0)
    assert plan.method == "uniform"


def test_uniform_non_divisible_names_nearest():
    profile = make_profile([[3.0, 2.0, 1.0, 0.0]] * 4)

    message = r"budget 9 does not\. The nearest uniform budgets are 8 \(k=2\) and 12 \(k=3\)"
    with pytest.raises(ValueError, match=message):
        allocate(profile, budget=9, method="uniform")


def test_uniform_k_outside_a_layer_bound():
    # 7 is not a multiple of 3, and k=3 (budget 9) exceeds the first layer's native k of 2.
    with pytest.raises(ValueError, match=r"k in \[1, 2\].*nearest uniform budgets are 6 \(k=2\)"):
        allocate(make_profile([[1.0, 0.0], [2.0, 1.0, 0.0, 0.0], [1.0, 0.5, 0.0]]), budget=7, method="uniform")


def test_evolutionary_population_stays_feasible():
    rng = np.random.default_rng(5)
    deltas = random_deltas(rng, layer_count=10, min_native=2, max_native=6, monotone=False)
    lower = [1, 2, 1, 1, 1, 2, 1, 1, 1, 1]
    upper = [len(row) for row in deltas]
    budget = (sum(lower) + sum(upper)) // 2

    for seed in range(5):
        result = evolutionary_search(
            deltas, budget, lower, upper, population_size=16, generations=20, mutation_rate=0.3, seed=seed
        )

        assert result.population.shape == (16, 10)
        assert np.all(result.population.sum(axis=1) == budget)
        assert np.all(result.population >= np.array(lower))
        assert np.all(result.population <= np.array(upper))
        assert np.array_equal(result.best, result.population[0])
        assert result.objective == pytest.approx(sum(row[k - 1] for row, k in zip(deltas, result.best)))


def test_evolutionary_is_deterministic_per_seed():
    rng = np.random.default_rng(6)
    deltas = random_deltas(rng, layer_count=8, min_native=2, max_native=6, monotone=True)
    upper = [len(row) for row in deltas]
    budget = sum(upper) // 2 + 4

    first = evolutionary_search(deltas, budget, [1] * 8, upper, generations=10, seed=7)
    second = evolutionary_search(deltas, budget, [1] * 8, upper, generations=10, seed=7)

    assert np.array_equal(first.population, second.population)


@pytest.mark.parametrize("seed", range(3))
def test_evolutionary_close_to_dp_on_16_layers(seed):
    rng = np.random.default_rng(100 + seed)
    profile = make_profile(random_deltas(rng, layer_count=16, min_native=2, max_native=8, monotone=True))
    budget = (16 + profile.native_total) // 2

    plan = allocate(profile, budget=budget, method="evolutionary", seed=seed)
    report = plan.extra["evolutionary"]
    exact = allocate(profile, budget=budget)

    assert plan.total == budget
    assert report["dp_objective"] == pytest.approx(exact.objective)
    assert report["objective"] == pytest.approx(plan.objective)
    assert plan.objective <= exact.objective * 1.01
    assert report["relative_gap"] <= 0.01
    assert report["seed"] == seed
    assert report["population_size"] == 128
    assert report["mutation_rate"] == pytest.approx(1 / 16)


def test_evolutionary_rejects_unknown_option():
    with pytest.raises(TypeError, match=r"unknown options for method 'evolutionary': \['elites'\]"):
        allocate(make_profile(HAND_DELTAS), budget=5, method="evolutionary", elites=2)


def test_evolutionary_rejects_bad_settings():
    with pytest.raises(ValueError, match="tournament_size must be an integer in"):
        evolutionary_search(HAND_DELTAS, 5, [1, 1, 1], [2, 3, 2], population_size=4, tournament_size=5)
    with pytest.raises(ValueError, match="mutation_rate must be a probability"):
        evolutionary_search(HAND_DELTAS, 5, [1, 1, 1], [2, 3, 2], mutation_rate=1.5)


def test_evolutionary_small_space_finds_optimum():
    # Only 4 feasible allocations exist for budget 5, fewer than the population, so newcomers fill the gap.
    result = evolutionary_search(HAND_DELTAS, 5, [1, 1, 1], [2, 3, 2], population_size=16, generations=5)

    assert result.best.tolist() == [2, 2, 1]
    assert result.objective == pytest.approx(1.5)
