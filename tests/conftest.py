import functools
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
