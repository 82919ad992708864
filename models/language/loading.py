"""Load a transformers causal language model and its tokenizer from a local folder or a model hub id.

``load_causal_lm`` wraps ``AutoModelForCausalLM`` / ``AutoTokenizer`` and turns their most common failures into
errors that name the value and the fix. Those failures are a local path that does not exist, a hub id while
offline, and a family whose top-k is fixed in its routing code (phimoe, switch_transformers, nllb-moe).

This module does not check that the model has MoE layers at all, because that needs lexi-pl's router tables
and this package imports nothing from lexi_pl. ``lexi_pl.modules.MoECausalLM`` makes that check with
``lexi_pl.adapter.MoEAdapter`` right after loading.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lexi_models.language.tiny import FIXED_K_FAMILIES

DType = Literal["auto", "float32", "bfloat16", "float16"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Files of which a tokenizer folder has at least one (fast tokenizers, SentencePiece models, GPT-2 style BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# A model hub id: "name" or "owner/name", made of letters, digits, "-", "_" and ".".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_local_path(name_or_path: str) -> bool:
    """Return True when ``name_or_path`` can only be a file system path, never a model hub id.

    Strings starting with ".", "/" or "~", and strings containing the path separator that are not of the hub's
    "owner/name" form, are paths. "owner/name" itself is ambiguous: it is a local folder when one exists
    relative to the current directory, and a hub id otherwise.
    """
    if name_or_path.startswith((".", "/", "~")):
        return True
    separators = {os.sep, os.altsep} - {None}
    if any(separator in name_or_path for separator in separators):
        return not _HUB_ID.match(name_or_path)
    return False


def resolve_name_or_path(name_or_path: str) -> str:
    """Expand "~" in a local path and check that it exists; return hub ids unchanged.

    Raises:
        FileNotFoundError: ``name_or_path`` looks like a local path and does not exist.
    """
    if not name_or_path:
        raise ValueError("model name_or_path is empty; pass a local model folder or a model hub id")
    expanded = os.path.expanduser(name_or_path)
    if Path(expanded).exists():
        return expanded
    if looks_like_local_path(name_or_path):
        raise FileNotFoundError(
            f"model folder {name_or_path!r} not found (resolved to {Path(expanded).absolute()}); relative paths "
            "start from the current directory, so run from the repository root or pass an absolute path"
        )
    return name_or_path


def _offline_advice(name_or_path: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    state = "HF_HUB_OFFLINE is set, so " if offline else ""
    return (
        f"{name_or_path!r} is not a local folder, and {state}it could not be read from the model hub or its "
        "local cache. Pass the path of a local folder written by save_pretrained, or run with network access "
        "and HF_HUB_OFFLINE=0 so that the files can be downloaded"
    )


def load_config(
    name_or_path: str, *, trust_remote_code: bool = False, local_files_only: bool | None = None
) -> PretrainedConfig:
    """Load the transformers config of ``name_or_path`` and reject families whose k cannot change.

    Raises:
        FileNotFoundError: a local path that does not exist.
        OSError: a hub id that cannot be fetched (offline, or not on the hub).
        ValueError: a family with a fixed top-k (phimoe, switch_transformers, nllb-moe).
    """
    resolved = resolve_name_or_path(name_or_path)
    options: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if local_files_only is not None:
        options["local_files_only"] = local_files_only
    try:
        config = AutoConfig.from_pretrained(resolved, **options)
    except OSError as error:
        if Path(resolved).exists():
            raise
        raise OSError(_offline_advice(name_or_path)) from error
    check_supported_family(config, name_or_path)
    return config


def check_supported_family(config: PretrainedConfig, name_or_path: str = "the model") -> None:
    """Raise ValueError when ``config.model_type`` is a family whose top-k is fixed in its routing code."""
    if config.model_type in FIXED_K_FAMILIES:
        raise ValueError(
            f"{name_or_path} is a {config.model_type!r} model, whose number of experts per token is fixed in the "
            f"routing code, so per-layer top-k cannot change it. Families that lexi-pl cannot adjust: "
            f"{', '.join(FIXED_K_FAMILIES)}"
        )


def check_dtype(dtype: str) -> str | torch.dtype:
    """Map "auto", "float32", "bfloat16" or "float16" to the value that ``from_pretrained(dtype=...)`` takes."""
    if dtype == "auto":
        return "auto"
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of 'auto', {', '.join(map(repr, TORCH_DTYPES))}; got {dtype!r}")
    return TORCH_DTYPES[dtype]


def load_model(
    name_or_path: str,
    *,
    dtype: DType = "auto",
    device_map: str | None = None,
    experts_implementation: str | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
) -> PreTrainedModel:
    """Load a causal LM with ``AutoModelForCausalLM.from_pretrained`` after the checks of ``load_config``.

    Args:
        name_or_path: local folder written by ``save_pretrained``, or a model hub id.
        dtype: parameter dtype; "auto" keeps the dtype recorded in the checkpoint's config.
        device_map: passed to ``from_pretrained`` (for example "auto" to spread a large model over devices);
            None loads on the CPU.
        experts_implementation: expert kernel of transformers' MoE blocks: "eager", "grouped_mm",
            "batched_mm", ...; None keeps transformers' default.
        trust_remote_code: allow code from the checkpoint's repository to run.
        local_files_only: True never contacts the hub; None keeps transformers' default (HF_HUB_OFFLINE).

    Returns:
        The model in eval mode.
    """
    torch_dtype = check_dtype(dtype)
    config = load_config(name_or_path, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    options: dict[str, Any] = {"config": config, "dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        options["device_map"] = device_map
    if experts_implementation is not None:
        options["experts_implementation"] = experts_implementation
    if local_files_only is not None:
        options["local_files_only"] = local_files_only
    resolved = resolve_name_or_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **options)
    except OSError as error:
        if Path(resolved).exists():
            raise
        raise OSError(_offline_advice(name_or_path)) from error
    return model.eval()


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False, local_files_only: bool | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer with ``AutoTokenizer.from_pretrained`` from a folder, a tokenizer.json file or a hub id.

    Raises:
        FileNotFoundError: a local path that does not exist, or a folder without tokenizer files.
        OSError: a hub id that cannot be fetched.
    """
    resolved = resolve_name_or_path(name_or_path)
    if Path(resolved).is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=resolved)
    if Path(resolved).is_dir() and not any((Path(resolved) / name).is_file() for name in TOKENIZER_FILES):
        # For such a folder transformers 5.25 builds a tokenizer with no vocabulary instead of raising.
        raise FileNotFoundError(
            f"no tokenizer files in {name_or_path!r} (expected one of {', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer there with tokenizer.save_pretrained(folder), or pass the tokenizer's own path"
        )
    options: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if local_files_only is not None:
        options["local_files_only"] = local_files_only
    try:
        return AutoTokenizer.from_pretrained(resolved, **options)
    except (OSError, ValueError) as error:
        if not Path(resolved).exists():
            raise OSError(_offline_advice(name_or_path)) from error
        raise FileNotFoundError(
            f"no tokenizer could be loaded from {name_or_path!r} ({error}); the folder needs tokenizer.json and "
            "tokenizer_config.json (as written by tokenizer.save_pretrained), or pass another tokenizer path"
        ) from error


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: DType = "auto",
    device_map: str | None = None,
    experts_implementation: str | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (in eval mode) and its tokenizer; see ``load_model`` for the arguments and errors."""
    model = load_model(
        name_or_path,
        dtype=dtype,
        device_map=device_map,
        experts_implementation=experts_implementation,
        trust_remote_code=trust_remote_code,
        local_files_only=local_files_only,
    )
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    return model, tokenizer
