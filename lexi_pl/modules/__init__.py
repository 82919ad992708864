"""Lightning modules that wrap MoE models for training and evaluation."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MoECausalLM", "MoEImageClassifier", "export_pretrained", "export_timm_weights"]

_SUBMODULE_OF = {
    "MoEImageClassifier": "image",
    "export_timm_weights": "image",
    "MoECausalLM": "language",
    "export_pretrained": "language",
}


def __getattr__(name: str) -> Any:
    # Import lazily, so that `python -m lexi_pl.modules.image` (or `.language`) does not find its own
    # module already imported by this package (runpy warns about that and the module would run twice).
    if name in _SUBMODULE_OF:
        module = importlib.import_module(f"{__name__}.{_SUBMODULE_OF[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
