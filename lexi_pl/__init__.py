"""lexi-pl: layer-adaptive top-k (LExI) for Mixture-of-Experts inference, on PyTorch Lightning.

The core (`lexi_pl.adapter`, `lexi_pl.profiling`, `lexi_pl.allocation`, `lexi_pl.plan`) imports no Lightning;
`lexi_pl.callbacks`, `lexi_pl.modules`, `lexi_pl.data` and `lexi_pl.cli` are the Lightning side.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lexi-pl")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "unknown"
