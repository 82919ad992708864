"""Lightning data modules."""

from lexi_pl.data.images import ImageClassificationData, load_mnist5k, mnist5k_split_indices

__all__ = [
    "ImageClassificationData",
    "TextData",
    "load_mnist5k",
    "load_pydoc_corpus",
    "mnist5k_split_indices",
    "train_bpe_tokenizer",
]

_TEXT_NAMES = ("TextData", "load_pydoc_corpus", "train_bpe_tokenizer")


def __getattr__(name: str):
    # The text data module is imported on first use, so that `python -m lexi_pl.data.text` does not
    # find its own module already imported by this package.
    if name in _TEXT_NAMES:
        from lexi_pl.data import text

        return getattr(text, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
