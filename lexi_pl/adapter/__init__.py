"""The unified MoE adapter: find MoE layers and read or set their per-layer top-k (no Lightning imports)."""

from lexi_pl.adapter.core import MoEAdapter, MoELayer
from lexi_pl.adapter.families import FAMILIES, ROUTING_WEIGHTS, RouterFamily

__all__ = ["FAMILIES", "ROUTING_WEIGHTS", "MoEAdapter", "MoELayer", "RouterFamily"]
