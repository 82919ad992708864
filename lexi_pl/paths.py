"""Cache locations of lexi-pl for files that outlive a run: built corpora and cached sensitivity profiles."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """Return ``$LEXI_PL_CACHE``, or ``~/.cache/lexi-pl`` when it is not set."""
    return Path(os.environ.get("LEXI_PL_CACHE", Path.home() / ".cache" / "lexi-pl"))
