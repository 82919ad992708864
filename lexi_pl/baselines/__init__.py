"""Baselines that LExI is compared against: expert pruning at unchanged k and random per-layer k (no Lightning)."""

from lexi_pl.baselines.pruning import (
    CRITERIA,
    count_expert_selections,
    mask_experts,
    prune_experts,
    pruned_expert_count,
    router_weight_norms,
    select_pruned_experts,
)
from lexi_pl.baselines.random_allocation import count_allocations, random_plan, random_top_k

__all__ = [
    "CRITERIA",
    "count_allocations",
    "count_expert_selections",
    "mask_experts",
    "prune_experts",
    "pruned_expert_count",
    "random_plan",
    "random_top_k",
    "router_weight_norms",
    "select_pruned_experts",
]
