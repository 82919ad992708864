"""Language models: loading transformers causal LMs (``loading``) and tiny random-weight MoE models (``tiny``)."""

from .loading import (
    check_supported_family,
    load_causal_lm,
    load_config,
    load_model,
    load_tokenizer,
    looks_like_local_path,
)
from .tiny import FIXED_K_FAMILIES, TINY_FAMILIES, build_tiny, tiny_config

__all__ = [
    "FIXED_K_FAMILIES",
    "TINY_FAMILIES",
    "build_tiny",
    "check_supported_family",
    "load_causal_lm",
    "load_config",
    "load_model",
    "load_tokenizer",
    "looks_like_local_path",
    "tiny_config",
]
