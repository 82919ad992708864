"""Language-modelling data: documents tokenised into fixed-length blocks for causal LMs.

``TextData`` reads one of four kinds of ``source``:

- ``"pydoc"``: a built-in offline corpus of Python's own documentation (see ``load_pydoc_corpus``), split into
  "train" and "validation" by source, never inside a document;
- ``"text:<files>"``, ``"json:<files>"``, ``"parquet:<files>"``: local files read by ``datasets.load_dataset``,
  where ``<files>`` is a path or glob, or ``split=glob,split=glob`` to name the files of each split;
- any other string: a dataset id on the Hugging Face Hub (or in its local cache), with ``config_name``.

Documents are tokenised without special tokens, each followed by the tokenizer's EOS token, concatenated into
one token stream per split and cut into blocks of ``block_size`` tokens. Batches are dicts with LongTensors
``input_ids`` and ``attention_mask`` of shape (batch, block_size), plus ``labels`` when evaluation windows
overlap (``stride``). ``python -m lexi_pl.data.text train-tokenizer OUT_DIR`` trains the byte-level BPE
tokenizer of the shipped pydoc model.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import logging
import math
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lexi_pl.data.distributed import evaluation_dataloader
from lexi_pl.paths import default_cache_dir

log = logging.getLogger(__name__)

PYDOC_SOURCE = "pydoc"
LOCAL_BUILDERS = ("text", "json", "parquet")
IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` (and ``MoECausalLM``) leave out of the loss."""

VALIDATION_BUCKETS = 20
"""A document goes to validation when the CRC-32 of its source id is 0 modulo this number (about 5 %)."""

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"

# Folders of the standard library that hold tests, the IDLE editor or installed third-party packages.
_SKIPPED_STDLIB_FOLDERS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})


# The pydoc corpus


def is_validation_source(source_id: str) -> bool:
    """Return True when documents of ``source_id`` belong to the held-out split.

    The rule is ``zlib.crc32(source_id.encode("utf-8")) % 20 == 0``: CRC-32 is the same on every machine,
    Python version and process (unlike ``hash``), so the split never changes, and whole sources go to one side.
    """
    return zlib.crc32(source_id.encode("utf-8")) % VALIDATION_BUCKETS == 0


def _qualified_docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """Yield (qualified name, docstring) of every class and function in ``tree``, in source order."""
    stack: list[tuple[str, ast.AST]] = [("", node) for node in reversed(tree.body)]
    while stack:
        prefix, node = stack.pop()
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        name = f"{prefix}{node.name}"
        docstring = ast.get_docstring(node)
        if docstring:
            yield name, docstring
        stack.extend((f"{name}.", child) for child in reversed(node.body))


def _module_text(module_name: str, source: str) -> str | None:
    """Join the docstrings of a module: its own first, then each class and function under its qualified name."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    parts = []
    module_docstring = ast.get_docstring(tree)
    if module_docstring:
        parts.append(f"{module_name}\n\n{module_docstring}")
    for name, docstring in _qualified_docstrings(tree):
        parts.append(f"{module_name}.{name}\n\n{docstring}")
    return "\n\n".join(parts) if parts else None


def stdlib_module_files(stdlib: str | Path | None = None) -> list[tuple[str, Path]]:
    """List (dotted module name, file) of the standard library's .py files, sorted by module name.

    Test folders ("test", "tests"), idlelib and site-packages are skipped.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    modules = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in _SKIPPED_STDLIB_FOLDERS)
        for file_name in files:
            if not file_name.endswith(".py"):
                continue
            parts = list((Path(folder) / file_name).relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts:
                modules.append((".".join(parts), Path(folder) / file_name))
    return sorted(modules)


def build_pydoc_corpus() -> list[dict[str, str]]:
    """Build the pydoc corpus: one document per pydoc help topic and per standard-library module.

    Topic documents are the texts of ``pydoc_data.topics.topics`` (what ``help("assert")`` shows), with source
    id "topic:<name>". Module documents join the docstrings of a module, its classes and its functions (found
    with ``ast``, so nothing is imported), with source id "module:<dotted name>". For CPython 3.11 that is about
    0.47 MB of topics and 1.6 MB of docstrings. Documents are sorted by source id.
    """
    from pydoc_data.topics import topics

    documents = [{"source": f"topic:{name}", "text": text} for name, text in sorted(topics.items()) if text.strip()]
    for module_name, path in stdlib_module_files():
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as error:
            log.warning("skipping %s in the pydoc corpus: %s", path, error)
            continue
        text = _module_text(module_name, source)
        if text:
            documents.append({"source": f"module:{module_name}", "text": text})
    documents.sort(key=lambda document: document["source"])
    return documents


def load_pydoc_corpus(cache_dir: str | Path | None = None) -> datasets.DatasetDict:
    """Return the pydoc corpus as a ``DatasetDict`` with "train" and "validation" splits of ("source", "text") rows.

    The documents of ``build_pydoc_corpus`` are cached as JSON in ``cache_dir`` (default ``default_cache_dir()``)
    under a name that includes the Python version, because topics and docstrings change between versions. The
    split is computed on every load with ``is_validation_source``, so the cache does not fix it.
    """
    version = ".".join(str(number) for number in sys.version_info[:3])
    cache_path = Path(cache_dir or default_cache_dir()) / f"pydoc-corpus-python{version}.json"
    if cache_path.is_file():
        documents = json.loads(cache_path.read_text(encoding="utf-8"))
    else:
        documents = build_pydoc_corpus()
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(documents), encoding="utf-8")
        temporary.replace(cache_path)

    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": []}
    for document in documents:
        splits["validation" if is_validation_source(document["source"]) else "train"].append(document)
    return datasets.DatasetDict({
        name: datasets.Dataset.from_list(rows, features=datasets.Features({
            "source": datasets.Value("string"),
            "text": datasets.Value("string"),
        }))
        for name, rows in splits.items()
    })


# Tokenizer


def train_bpe_tokenizer(
    texts: Iterable[str], output_dir: str | Path | None = None, vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and, with ``output_dir``, save it as a transformers tokenizer folder.

    The special tokens are "<|endoftext|>" (id 0, the EOS token that separates documents) and "<pad>" (id 1).
    The folder contains tokenizer.json and tokenizer_config.json, so ``AutoTokenizer.from_pretrained(output_dir)``
    loads it. Byte-level BPE needs the 256 byte tokens, so ``vocab_size`` must be at least 258.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + 2 special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    if output_dir is not None:
        wrapped.save_pretrained(str(output_dir))
    return wrapped


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Tokenise ``texts`` without special tokens and concatenate them, each followed by the EOS token.

    Returns:
        A 1-d int64 array (the token stream of the split).

    Raises:
        ValueError: the tokenizer has no EOS token.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token, which separates documents; pick a tokenizer "
            "with an eos_token"
        )
    pieces: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(list(texts[start : start + batch_size]), add_special_tokens=False, verbose=False)
        for ids in encoded["input_ids"]:
            pieces.append(np.asarray(ids, dtype=np.int64))
            pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


# Blocks


class TokenBlocks(Dataset):
    """Fixed-length token blocks; item ``i`` is a dict of 1-d LongTensors (``labels`` only when given)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item

    def subset(self, count: int | None) -> TokenBlocks:
        """Return the first ``count`` blocks (all of them when ``count`` is None)."""
        if count is None:
            return self
        labels = None if self.labels is None else self.labels[:count]
        return TokenBlocks(self.input_ids[:count], self.attention_mask[:count], labels)

    @property
    def scored_tokens(self) -> int:
        """Number of next-token targets a causal LM is scored on over all blocks (shifted once per block)."""
        if self.labels is not None:
            return int((self.labels[:, 1:] != IGNORE_INDEX).sum())
        return int(self.attention_mask[:, 1:].sum())


def make_blocks(tokens: np.ndarray | Sequence[int], block_size: int, pad_id: int, stride: int | None = None) -> TokenBlocks:
    """Cut a token stream into blocks of ``block_size`` tokens; the last block is right-padded with ``pad_id``.

    Without ``stride`` (or with ``stride == block_size``) the blocks do not overlap: token 0 of each block is
    context only and tokens 1 to ``block_size - 1`` are scored. With ``stride < block_size``, windows start
    every ``stride`` tokens, and each window after the first scores only the tokens that no earlier window
    scored, with the ``block_size - stride`` tokens before them as context. Those windows carry ``labels``
    equal to ``input_ids`` except -100 (``IGNORE_INDEX``) on the tokens scored earlier and on padding. Either
    way every token of the stream except the first is scored at most once, and padding is never scored
    (its ``attention_mask`` is 0).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (one context token and one target), got {block_size}")
    if stride is not None and not 1 <= stride <= block_size:
        raise ValueError(f"stride must be between 1 and block_size={block_size}, got {stride}")
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    length = tokens.numel()
    if length == 0:
        raise ValueError("the token stream is empty; the split has no text")

    overlapping = stride is not None and stride < block_size
    starts = list(range(0, length, stride)) if overlapping else list(range(0, length, block_size))
    input_ids = torch.full((len(starts), block_size), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(starts), block_size), dtype=torch.long)
    labels = torch.full((len(starts), block_size), IGNORE_INDEX, dtype=torch.long) if overlapping else None
    scored_until = 0  # tokens before this stream position are already scored
    used = 0
    for row, start in enumerate(starts):
        end = min(start + block_size, length)
        input_ids[row, : end - start] = tokens[start:end]
        attention_mask[row, : end - start] = 1
        used = row + 1
        if labels is not None:
            first_new = max(scored_until, start + 1) - start
            labels[row, first_new : end - start] = tokens[start + first_new : end]
            scored_until = end
        if end == length:
            break
    return TokenBlocks(input_ids[:used], attention_mask[:used], None if labels is None else labels[:used])


def unigram_perplexity(train_tokens: np.ndarray, blocks: TokenBlocks, vocab_size: int) -> float:
    """Return the perplexity of an add-one smoothed unigram model on the scored targets of ``blocks``.

    The model is p(t) = (count of t in ``train_tokens`` + 1) / (len(train_tokens) + ``vocab_size``). It scores the
    same targets as ``MoECausalLM`` (positions 1 onward of each block, padding and -100 labels excluded), so the
    two perplexities compare directly.
    """
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    if counts.shape[0] > vocab_size:
        raise ValueError(f"train_tokens contain ids up to {counts.shape[0] - 1}, beyond vocab_size={vocab_size}")
    log_probability = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    if blocks.labels is not None:
        targets = blocks.labels[:, 1:]
        targets = targets[targets != IGNORE_INDEX]
    else:
        targets = blocks.input_ids[:, 1:][blocks.attention_mask[:, 1:].bool()]
    if targets.numel() == 0:
        raise ValueError("the blocks have no scored target")
    return float(math.exp(-log_probability[targets.numpy()].mean()))


# Reading sources


def parse_data_files(spec: str) -> dict[str, list[str]]:
    """Parse the part after "text:", "json:" or "parquet:": a path or glob, or "split=glob,split=glob".

    A plain path or glob becomes the "train" split. Globs are expanded here, so a pattern that matches nothing
    fails with the pattern in the message.
    """
    if "=" in spec:
        mapping: dict[str, list[str]] = {}
        for item in spec.split(","):
            split, _, pattern = item.partition("=")
            if not split or not pattern:
                raise ValueError(f"invalid data files {spec!r}: expected 'split=path_or_glob,split=path_or_glob'")
            mapping[split.strip()] = _expand(pattern.strip())
        return mapping
    return {"train": _expand(spec)}


def _expand(pattern: str) -> list[str]:
    paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not paths:
        raise FileNotFoundError(
            f"no file matches {pattern!r} (relative paths start from the current directory {Path.cwd()})"
        )
    return paths


class TextData(LightningDataModule):
    """Token blocks of a text corpus for training and evaluating causal language models.

    Args:
        source: "pydoc" (built-in offline corpus), "text:<files>", "json:<files>", "parquet:<files>" (local
            files; ``<files>`` is a path or glob, or ``split=glob,split=glob``), or a Hub dataset id.
        tokenizer_path: tokenizer folder, tokenizer.json file or Hub id. None uses the folder of the model being
            run (``hparams.model_name_or_path`` of the trainer's LightningModule).
        block_size: tokens per block (sequence length).
        stride: evaluation windows start every ``stride`` tokens and score only tokens that no earlier window
            scored (see ``make_blocks``); None means non-overlapping blocks. Training blocks never overlap.
        batch_size: blocks per batch.
        num_workers: DataLoader worker processes.
        val_subset: evaluate on the first N validation (and test) blocks only; None uses all of them.
        config_name: configuration of a Hub dataset, for example "wikitext-2-raw-v1".
        split: training split name.
        val_split: validation split name. When a local source has no split of that name, its "train" rows are
            divided with ``is_validation_source`` on the row index ("row:<i>").
        test_split: test split name; None uses ``val_split``.
        text_column: column with the text (json, parquet and Hub sources).
        join_rows_with: join all rows of a split into one document with this separator (for line-per-row data
            such as wikitext, usually "\\n\\n"); None treats each row as a document.
        text_sample_by: rows of "text:" files: "document" (one per file), "paragraph" or "line".
        cache_dir: folder of the cached pydoc corpus; default ``~/.cache/lexi-pl``.
        seed: seed of the training shuffle.
    """

    def __init__(
        self,
        source: str = PYDOC_SOURCE,
        tokenizer_path: str | None = None,
        block_size: int = 256,
        stride: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        val_subset: int | None = None,
        config_name: str | None = None,
        split: str = "train",
        val_split: str = "validation",
        test_split: str | None = None,
        text_column: str = "text",
        join_rows_with: str | None = None,
        text_sample_by: Literal["document", "paragraph", "line"] = "document",
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        if stride is not None and not 1 <= stride <= block_size:
            raise ValueError(f"stride must be between 1 and block_size={block_size}, got {stride}")
        if val_subset is not None and val_subset < 1:
            raise ValueError(f"val_subset must be a positive number of blocks or None, got {val_subset}")
        if text_sample_by not in ("document", "paragraph", "line"):
            raise ValueError(f"text_sample_by must be 'document', 'paragraph' or 'line', got {text_sample_by!r}")
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.blocks: dict[str, TokenBlocks] = {}
        self.token_streams: dict[str, np.ndarray] = {}
        self._raw: datasets.DatasetDict | None = None

    # tokenizer

    def _attached_module(self) -> Any:
        """Return the LightningModule of the trainer this data module runs in, or None outside a trainer."""
        trainer = getattr(self, "trainer", None)
        return trainer.lightning_module if trainer is not None else None

    def resolve_tokenizer_path(self) -> str:
        """Return ``tokenizer_path``, or the model folder of the attached LightningModule."""
        if self.hparams.tokenizer_path:
            return self.hparams.tokenizer_path
        hparams = getattr(self._attached_module(), "hparams", {})
        model_path = hparams.get("model_name_or_path")
        if not model_path:
            raise ValueError(
                "TextData needs a tokenizer: set tokenizer_path, or run it with a LightningModule whose "
                "hparams.model_name_or_path is a model folder with tokenizer files"
            )
        return model_path

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """Load (once) the tokenizer of ``resolve_tokenizer_path()``."""
        if self.tokenizer is None:
            from lexi_models.language.loading import load_tokenizer

            self.tokenizer = load_tokenizer(self.resolve_tokenizer_path())
        return self.tokenizer

    # raw text

    def _raw_splits(self) -> datasets.DatasetDict:
        if self._raw is not None:
            return self._raw
        source = self.hparams.source
        builder, separator, spec = source.partition(":")
        if source == PYDOC_SOURCE:
            raw = load_pydoc_corpus(self.hparams.cache_dir)
        elif separator and builder in LOCAL_BUILDERS:
            options: dict[str, Any] = {"data_files": parse_data_files(spec)}
            if builder == "text":
                options["sample_by"] = self.hparams.text_sample_by
            raw = datasets.load_dataset(builder, **options)
        else:
            raw = None  # Hub splits are loaded one at a time in _split_rows
        self._raw = raw
        return raw

    def _split_rows(self, split: str, held_out: bool) -> datasets.Dataset:
        """Return the rows of ``split``; ``held_out`` marks the validation and test splits."""
        raw = self._raw_splits()
        if raw is None:
            return self._load_hub_split(split)
        local = self.hparams.source != PYDOC_SOURCE
        if split in raw:
            rows = raw[split]
            if local and not held_out and split == "train" and self.hparams.val_split not in raw:
                # The validation rows are carved out of "train" (below), so training leaves them out.
                rows = self._hash_split(rows, held_out=False)
            return rows
        if local and held_out and "train" in raw:
            return self._hash_split(raw["train"], held_out=True)
        raise ValueError(f"source {self.hparams.source!r} has no split {split!r}; it has {sorted(raw)}")

    def _texts(self, rows: datasets.Dataset, split: str) -> list[str]:
        """Return the non-empty documents of ``rows`` (joined into one with ``join_rows_with``)."""
        source = self.hparams.source
        column = "text" if source == PYDOC_SOURCE or source.startswith("text:") else self.hparams.text_column
        if column not in rows.column_names:
            raise ValueError(
                f"split {split!r} of {source!r} has no column {column!r}; its columns are {rows.column_names}. "
                "Set text_column"
            )
        texts = [text for text in rows[column] if text]
        if self.hparams.join_rows_with is not None:
            texts = [self.hparams.join_rows_with.join(texts)]
        if not texts:
            raise ValueError(f"split {split!r} of {source!r} has no text")
        return texts

    @staticmethod
    def _hash_split(rows: datasets.Dataset, held_out: bool) -> datasets.Dataset:
        indices = [index for index in range(len(rows)) if is_validation_source(f"row:{index}") == held_out]
        return rows.select(indices)

    def _load_hub_split(self, split: str) -> datasets.Dataset:
        source, config_name = self.hparams.source, self.hparams.config_name
        try:
            return datasets.load_dataset(source, config_name, split=split)
        except ConnectionError as error:
            raise ConnectionError(
                f"dataset {source!r} ({config_name}, split {split!r}) is not in the local datasets cache and the "
                "Hub cannot be reached. Use source='pydoc' or local files ('text:<path>', 'json:<path>', "
                "'parquet:<path>'), or run with network access and HF_HUB_OFFLINE=0 / HF_DATASETS_OFFLINE=0"
            ) from error

    # Lightning hooks

    def split_name(self, name: str) -> str:
        """Map "train", "validation" or "test" to the source's split name (``split``, ``val_split``, ``test_split``)."""
        names = {
            "train": self.hparams.split,
            "validation": self.hparams.val_split,
            "test": self.hparams.test_split or self.hparams.val_split,
        }
        return names[name]

    def _tokens_of(self, name: str) -> np.ndarray:
        if name not in self.token_streams:
            split = self.split_name(name)
            texts = self._texts(self._split_rows(split, held_out=name != "train"), split)
            self.token_streams[name] = tokenize_documents(self.load_tokenizer(), texts)
            self._check_vocabulary(name, self.token_streams[name])
        return self.token_streams[name]

    def _check_vocabulary(self, name: str, tokens: np.ndarray) -> None:
        config = getattr(getattr(self._attached_module(), "model", None), "config", None)
        vocab_size = getattr(config, "vocab_size", None)
        if isinstance(vocab_size, int) and tokens.size and int(tokens.max()) >= vocab_size:
            raise ValueError(
                f"the tokenizer {self.resolve_tokenizer_path()!r} produced token id {int(tokens.max())} in the "
                f"{name} split, but the model's vocab_size is {vocab_size}; use the tokenizer the model was "
                "trained with"
            )

    def _pad_id(self) -> int:
        tokenizer = self.load_tokenizer()
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def setup(self, stage: str | None = None) -> None:
        """Tokenise and block the splits that ``stage`` needs: train and validation for fit, else one of them."""
        needed = {
            "fit": ["train", "validation"],
            "validate": ["validation"],
            "test": ["test"],
            "predict": ["validation"],
        }
        block_size, stride = self.hparams.block_size, self.hparams.stride
        for name in needed.get(stage, ["train", "validation", "test"]):
            if name in self.blocks:
                continue
            tokens = self._tokens_of(name)
            if name == "train":
                self.blocks[name] = make_blocks(tokens, block_size, self._pad_id())
            else:
                blocks = make_blocks(tokens, block_size, self._pad_id(), stride=stride)
                self.blocks[name] = blocks.subset(self.hparams.val_subset)
            log.info("%s: %d tokens in %d blocks of %d", name, tokens.size, len(self.blocks[name]), block_size)

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        if name not in self.blocks:
            self.setup({"train": "fit", "validation": "validate", "test": "test"}[name])
        options = dict(
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )
        if shuffle:
            generator = torch.Generator().manual_seed(self.hparams.seed)
            return DataLoader(self.blocks[name], shuffle=True, generator=generator, **options)
        # Evaluation: with several processes each scores its own blocks, none twice (see lexi_pl.data.distributed).
        return evaluation_dataloader(self.blocks[name], self.trainer, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("validation")


def main(argv: list[str] | None = None) -> None:
    """Run ``python -m lexi_pl.data.text train-tokenizer OUT_DIR [--vocab-size N] [--cache-dir DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m lexi_pl.data.text")
    subcommands = parser.add_subparsers(dest="subcommand", required=True)
    train = subcommands.add_parser(
        "train-tokenizer", help="train a byte-level BPE tokenizer on the training split of the pydoc corpus"
    )
    train.add_argument("out_dir", help="folder for tokenizer.json and tokenizer_config.json")
    train.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size, special tokens included")
    train.add_argument("--cache-dir", help="folder of the cached pydoc corpus (default ~/.cache/lexi-pl)")
    args = parser.parse_args(argv)

    corpus = load_pydoc_corpus(args.cache_dir)
    tokenizer = train_bpe_tokenizer(corpus["train"]["text"], args.out_dir, vocab_size=args.vocab_size)
    print(f"tokenizer with {len(tokenizer)} tokens written to {args.out_dir}")


if __name__ == "__main__":
    main()
