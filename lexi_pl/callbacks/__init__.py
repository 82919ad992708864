"""Lightning callbacks: apply a LExI plan during evaluation, and report throughput and expert cost."""

from lexi_pl.callbacks.lexi import LExI
from lexi_pl.callbacks.throughput import MoEThroughput, default_batch_counts

__all__ = ["LExI", "MoEThroughput", "default_batch_counts"]
