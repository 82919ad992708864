"""Time the Stage 2 allocation methods on a random sensitivity profile and print a markdown table.

The profile has ``--layers`` MoE layers with native top-k ``--options`` and random deltas that
fall to 0 at the native k. The budget is half of the native total, rounded down, but at least
one expert per layer. Example::

    python benchmarks/bench_allocation.py --layers 64 --options 8 --repeats 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from lexi_pl.allocation import allocate
from lexi_pl.profile_table import SensitivityProfile


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=64, help="number of MoE layers (default: 64)")
    parser.add_argument(
        "--options", type=int, default=8, help="native top-k of every layer, so k in 1..options (default: 8)"
    )
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed runs of the DP, whose median is printed (default: 20)"
    )
    parser.add_argument(
        "--ga-repeats", type=int, default=3, help="timed runs of the evolutionary search (default: 3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random profile and the search (default: 0)")
    return parser.parse_args()


def random_profile(layers: int, options: int, seed: int) -> SensitivityProfile:
    """Return a profile whose deltas decrease with k and reach 0 at the native k, with a random scale per layer."""
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(layers):
        values = np.sort(rng.random(options - 1))[::-1] * rng.uniform(0.5, 5.0)
        deltas.append([*values.tolist(), 0.0])
    return SensitivityProfile(
        layer_names=[f"layers.{index}.moe" for index in range(layers)],
        native_top_k=[options] * layers,
        max_top_k=[options] * layers,
        num_experts=[max(64, options)] * layers,
        deltas=deltas,
        base_norms=[1.0] * layers,
        fingerprint="benchmark",
    )


def median_milliseconds(run, repeats: int):
    """Call ``run`` ``repeats`` times and return (median milliseconds, result of the last call)."""
    timings = []
    result = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        timings.append(1e3 * (time.perf_counter() - started))
    return statistics.median(timings), result


def main() -> None:
    arguments = parse_arguments()
    if arguments.layers < 1 or arguments.options < 1 or arguments.repeats < 1 or arguments.ga_repeats < 1:
        raise SystemExit("--layers, --options, --repeats and --ga-repeats must be at least 1")
    profile = random_profile(arguments.layers, arguments.options, arguments.seed)
    budget = max(profile.native_total // 2, arguments.layers)

    allocate(profile, budget=budget)  # warm-up, so that imports and first-call costs are not timed
    dp_ms, dp_plan = median_milliseconds(lambda: allocate(profile, budget=budget), arguments.repeats)
    ga_ms, ga_plan = median_milliseconds(
        lambda: allocate(profile, budget=budget, method="evolutionary", seed=arguments.seed), arguments.ga_repeats
    )
    # The evolutionary timing includes the DP that computes its gap, which is small next to the search.
    gap = ga_plan.extra["evolutionary"]["relative_gap"]

    print(f"budget {budget} of {profile.native_total} active experts; {platform.processor() or platform.machine()}, "
          f"numpy {np.__version__}")
    print()
    print("| method | layers | options | median ms | objective | gap to DP |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| dp | {arguments.layers} | {arguments.options} | {dp_ms:.2f} | {dp_plan.objective:.6g} | 0 |")
    gap_text = "n/a" if gap is None else f"{100 * gap:.2f} %"
    print(
        f"| evolutionary | {arguments.layers} | {arguments.options} | {ga_ms:.1f} "
        f"| {ga_plan.objective:.6g} | {gap_text} |"
    )


if __name__ == "__main__":
    main()
