import functools
import sys
import tempfile
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Cached profiles and corpora go to a folder of this test session, not the user's cache.
os.environ["LEXI_PL_CACHE"] = tempfile.mkdtemp(prefix="lexi-pl-test-cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(min(2, torch.get_num_threads()))


@functools.lru_cache(maxsize=None)
def _tiny_state(model_type: str):
    from lexi_models.language.tiny import build_tiny

    return build_tiny(model_type)


@pytest.fixture
def tiny_model():
    """Return a fresh tiny random-weight model of a transformers MoE family (built once per family, then copied)."""
    import copy

    def make(model_type: str):
        return copy.deepcopy(_tiny_state(model_type))

    return make


@pytest.fixture(autouse=True)
def command_line_without_pytest_options(monkeypatch):
    """Hide pytest's own options from in-process LightningCLI runs, which otherwise warn about them."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
