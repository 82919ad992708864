import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lexi_pl.data.text import (
    IGNORE_INDEX,
    TextData,
    build_pydoc_corpus,
    is_validation_source,
    load_pydoc_corpus,
    make_blocks,
    tokenize_documents,
    train_bpe_tokenizer,
    unigram_perplexity,
)

TEST_VOCAB_SIZE = 512


def shared_cache_dir(tmp_path_factory) -> Path:
    """Return a pydoc-corpus cache folder shared by all test modules of the session (built on first use)."""
    return tmp_path_factory.getbasetemp() / "lexi-pl-cache"


def shared_tokenizer_dir(tmp_path_factory) -> Path:
    """Return a 512-token BPE tokenizer folder trained on 40 pydoc training documents, shared by the session."""
    folder = tmp_path_factory.getbasetemp() / "bpe-512"
    if not (folder / "tokenizer.json").is_file():
        corpus = load_pydoc_corpus(shared_cache_dir(tmp_path_factory))
        train_bpe_tokenizer(corpus["train"]["text"][:40], folder, vocab_size=TEST_VOCAB_SIZE)
    return folder


@pytest.fixture
def cache_dir(tmp_path_factory):
    return shared_cache_dir(tmp_path_factory)


@pytest.fixture
def tokenizer_dir(tmp_path_factory):
    return shared_tokenizer_dir(tmp_path_factory)


# split rule


def test_split_rule_uses_standard_crc32():
    # 0xCBF43926 is the published CRC-32 check value of "123456789"; 0xCBF43926 % 20 == 2.
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert not is_validation_source("123456789")
    # crc32("module:_pyio") == 1954094820, which is 0 modulo 20.
    assert zlib.crc32(b"module:_pyio") == 1954094820
    assert is_validation_source("module:_pyio")


def test_pydoc_split_by_source_disjoint(cache_dir):
    corpus = load_pydoc_corpus(cache_dir)
    train_sources = corpus["train"]["source"]
    validation_sources = corpus["validation"]["source"]

    assert set(train_sources).isdisjoint(validation_sources)
    assert len(set(train_sources)) == len(train_sources)
    assert all(is_validation_source(source) for source in validation_sources)
    assert not any(is_validation_source(source) for source in train_sources)
    share = len(validation_sources) / (len(train_sources) + len(validation_sources))
    assert 0.02 < share < 0.10


def test_pydoc_corpus_contents(cache_dir):
    corpus = load_pydoc_corpus(cache_dir)
    sources = set(corpus["train"]["source"]) | set(corpus["validation"]["source"])
    texts = dict(zip(corpus["train"]["source"], corpus["train"]["text"]))

    assert "topic:assert" in sources
    assert "module:json" in sources
    assert "module:email.mime.text" in sources
    assert not any(source.startswith(("module:test.", "module:idlelib")) for source in sources)
    assert "json.dumps\n\nSerialize ``obj`` to a JSON formatted ``str``." in texts["module:json"]
    total_characters = sum(map(len, corpus["train"]["text"])) + sum(map(len, corpus["validation"]["text"]))
    assert total_characters > 1_500_000


def test_pydoc_cache_matches_fresh_build(cache_dir):
    load_pydoc_corpus(cache_dir)
    (cache_file,) = cache_dir.glob("pydoc-corpus-python*.json")
    cached = json.loads(cache_file.read_text(encoding="utf-8"))
    assert cached == build_pydoc_corpus()


# blocks


def test_blocks_without_overlap():
    blocks = make_blocks(list(range(10)), block_size=4, pad_id=99)

    assert blocks.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 99, 99]]
    assert blocks.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert blocks.labels is None
    # Each block scores its tokens after the first: 3 + 3 + 1.
    assert blocks.scored_tokens == 7


def test_blocks_with_stride_score_each_token_once():
    blocks = make_blocks(list(range(10)), block_size=4, pad_id=99, stride=2)

    assert blocks.input_ids.tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert blocks.labels.tolist() == [
        [IGNORE_INDEX, 1, 2, 3],
        [IGNORE_INDEX, IGNORE_INDEX, 4, 5],
        [IGNORE_INDEX, IGNORE_INDEX, 6, 7],
        [IGNORE_INDEX, IGNORE_INDEX, 8, 9],
    ]
    assert blocks.scored_tokens == 9


def test_blocks_with_stride_ragged_end():
    blocks = make_blocks(list(range(9)), block_size=4, pad_id=99, stride=3)

    assert blocks.input_ids.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 99]]
    assert blocks.attention_mask.tolist()[-1] == [1, 1, 1, 0]
    assert blocks.labels.tolist() == [
        [IGNORE_INDEX, 1, 2, 3],
        [IGNORE_INDEX, 4, 5, 6],
        [IGNORE_INDEX, 7, 8, IGNORE_INDEX],
    ]


def test_blocks_reject_invalid_sizes():
    with pytest.raises(ValueError, match="block_size"):
        make_blocks([1, 2, 3], block_size=1, pad_id=0)
    with pytest.raises(ValueError, match="stride"):
        make_blocks([1, 2, 3], block_size=2, pad_id=0, stride=3)
    with pytest.raises(ValueError, match="empty"):
        make_blocks([], block_size=2, pad_id=0)


def test_unigram_perplexity_hand_worked():
    # Training counts of ids 0, 1, 2 are 2, 1, 0; add-one gives p = 3/6, 2/6, 1/6.
    blocks = make_blocks([2, 0, 1], block_size=3, pad_id=2)
    # Targets are 0 and 1, so the perplexity is exp((ln 2 + ln 3) / 2) = sqrt(6).
    assert unigram_perplexity([0, 0, 1], blocks, vocab_size=3) == pytest.approx(math.sqrt(6))


# tokenizer


def test_tokenizer_folder_loads_with_autotokenizer(tmp_path):
    text = "def add(a, b):\n    return a + b  # naïve"
    corpus = [text] + [f"value_{index} = compute(value_{index - 1}, {index})" for index in range(1, 200)]
    train_bpe_tokenizer(corpus, tmp_path, vocab_size=300)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)

    assert (tmp_path / "tokenizer_config.json").is_file()
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0
    assert tokenizer.pad_token_id == 1
    assert len(tokenizer) == 300
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_documents_joined_with_eos(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    first = tokenizer("Return the value.", add_special_tokens=False)["input_ids"]
    second = tokenizer("x", add_special_tokens=False)["input_ids"]

    tokens = tokenize_documents(tokenizer, ["Return the value.", "x"])
    assert tokens.tolist() == first + [0] + second + [0]


# data module


def test_pydoc_batches_deterministic(cache_dir, tokenizer_dir):
    def first_batches():
        data = TextData(tokenizer_path=str(tokenizer_dir), cache_dir=str(cache_dir), block_size=32, batch_size=4,
                        val_subset=5)
        data.setup("fit")
        return next(iter(data.train_dataloader())), list(data.val_dataloader()), data

    train_batch, validation_batches, data = first_batches()
    train_again, validation_again, _ = first_batches()

    assert set(train_batch) == {"input_ids", "attention_mask"}
    assert train_batch["input_ids"].shape == (4, 32)
    assert train_batch["input_ids"].dtype == torch.long
    assert train_batch["attention_mask"].dtype == torch.long
    assert [len(batch["input_ids"]) for batch in validation_batches] == [4, 1]
    assert torch.equal(train_batch["input_ids"], train_again["input_ids"])
    assert torch.equal(validation_batches[0]["input_ids"], validation_again[0]["input_ids"])
    # The validation stream starts with the first held-out document, _pyio, in source order.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.decode(validation_batches[0]["input_ids"][0]).startswith("_pyio\n\nPython implementation")
    # Training does not shuffle the stream itself: its first block is the start of the first training document.
    first_document = load_pydoc_corpus(cache_dir)["train"][0]["text"]
    assert tokenizer.decode(data.blocks["train"].input_ids[0]).startswith(first_document[:10])


def test_local_text_files_with_named_splits(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text("Return the sum of the values.\n")
    (tmp_path / "b.txt").write_text("Raise ValueError when empty.\n")
    data = TextData(source=f"text:train={tmp_path / 'a.txt'},validation={tmp_path / 'b.txt'}",
                    tokenizer_path=str(tokenizer_dir), block_size=64)
    data.setup("fit")

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = tokenizer("Raise ValueError when empty.\n", add_special_tokens=False)["input_ids"] + [0]
    assert data.token_streams["validation"].tolist() == expected
    assert len(data.blocks["validation"]) == 1


def test_local_json_rows_split_by_row_index(tmp_path, tokenizer_dir):
    rows = [{"body": f"document {index}"} for index in range(50)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    data = TextData(source=f"json:{tmp_path / 'rows.jsonl'}", tokenizer_path=str(tokenizer_dir), text_column="body")

    # crc32("row:<i>") % 20 == 0 for i = 38 and 46 among 0..49.
    validation = data._texts(data._split_rows("validation", held_out=True), "validation")
    train = data._texts(data._split_rows("train", held_out=False), "train")
    assert validation == ["document 38", "document 46"]
    assert len(train) == 48
    assert "document 38" not in train


def test_missing_local_files_named(tokenizer_dir):
    data = TextData(source="text:/nonexistent/folder/*.txt", tokenizer_path=str(tokenizer_dir))
    with pytest.raises(FileNotFoundError, match="/nonexistent/folder"):
        data.setup("validate")


def test_hub_dataset_offline_explained(tokenizer_dir):
    data = TextData(source="wikitext", config_name="wikitext-2-raw-v1", val_split="test",
                    tokenizer_path=str(tokenizer_dir))
    with pytest.raises(ConnectionError, match="source='pydoc'"):
        data.setup("validate")


def test_missing_tokenizer_explained(cache_dir):
    data = TextData(cache_dir=str(cache_dir))
    with pytest.raises(ValueError, match="tokenizer_path"):
        data.setup("validate")
