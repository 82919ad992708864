"""Tests for ImageClassificationData and the mnist5k split in lexi_pl.data.images."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lexi_pl.data.images import (
    IMAGENET_DATA_CONFIG,
    MNIST_DATA_CONFIG,
    ImageClassificationData,
    _read_mnist5k_arrays,
    load_mnist5k,
    mnist5k_split_indices,
)


@pytest.fixture(scope="module")
def mnist5k_arrays():
    """Images (5000, 28, 28) and labels (5000,) in file order."""
    return _read_mnist5k_arrays()


def test_mnist5k_split_sizes():
    splits = load_mnist5k()

    assert sorted(splits) == ["train", "validation"]
    assert splits["train"].num_rows == 4000
    assert splits["validation"].num_rows == 1000
    assert splits["train"].features["label"].num_classes == 10
    assert isinstance(splits["train"].features["image"], datasets.Image)


def test_mnist5k_split_is_deterministic(mnist5k_arrays):
    _, labels = mnist5k_arrays
    train_first, validation_first = mnist5k_split_indices(labels)
    # The rule must not read any random state.
    np.random.seed(123)
    torch.manual_seed(123)
    train_second, validation_second = mnist5k_split_indices(labels)

    np.testing.assert_array_equal(train_first, train_second)
    np.testing.assert_array_equal(validation_first, validation_second)
    # The file contains 500 rows per digit, sorted by digit, so the last 100 rows of digit d start at 500 * d + 400.
    assert validation_first[:3].tolist() == [400, 900, 1400]
    assert train_first[:3].tolist() == [0, 1, 2]


def test_mnist5k_split_partitions_rows(mnist5k_arrays):
    _, labels = mnist5k_arrays
    train_indices, validation_indices = mnist5k_split_indices(labels)

    assert len(set(train_indices) & set(validation_indices)) == 0
    assert sorted(np.concatenate([train_indices, validation_indices]).tolist()) == list(range(5000))
    assert np.bincount(labels[validation_indices]).tolist() == [100] * 10
    assert np.bincount(labels[train_indices]).tolist() == [400] * 10


def test_mnist5k_validation_prefix_is_balanced():
    splits = load_mnist5k()
    first_labels = splits["validation"]["label"][:20]

    assert first_labels == list(range(10)) * 2


def test_mnist5k_split_rejects_small_class():
    labels = np.array([0] * 500 + [1] * 50)

    with pytest.raises(ValueError, match="digit 1 has 50 rows"):
        mnist5k_split_indices(labels)


def test_mnist5k_rows_match_file(mnist5k_arrays):
    images, labels = mnist5k_arrays
    _, validation_indices = mnist5k_split_indices(labels)
    row = load_mnist5k()["validation"][5]

    np.testing.assert_array_equal(np.asarray(row["image"]), images[validation_indices[5]])
    assert row["label"] == labels[validation_indices[5]]


def test_eval_batches_normalised_with_mnist_stats(mnist5k_arrays):
    images, labels = mnist5k_arrays
    _, validation_indices = mnist5k_split_indices(labels)
    data = ImageClassificationData(batch_size=8, val_subset=16)
    data.setup("validate")
    batches = list(data.val_dataloader())

    assert len(data.val_dataset) == 16
    assert [tuple(batch[0].shape) for batch in batches] == [(8, 1, 28, 28), (8, 1, 28, 28)]
    batch_images, batch_labels = batches[0]
    assert batch_images.dtype == torch.float32
    assert batch_labels.dtype == torch.long
    assert batch_labels.min() >= 0
    assert batch_labels.max() <= 9
    expected = (images[validation_indices[:8]] / 255.0 - 0.1307) / 0.3081
    torch.testing.assert_close(batch_images[:, 0], torch.from_numpy(expected).float(), atol=1e-5, rtol=0)
    assert batch_labels.tolist() == labels[validation_indices[:8]].tolist()


def test_default_data_config_is_mnist():
    data = ImageClassificationData()

    assert data.resolve_data_config() == MNIST_DATA_CONFIG


def test_default_data_config_for_other_sources():
    data = ImageClassificationData(source="imagefolder:/nonexistent")

    assert data.resolve_data_config() == IMAGENET_DATA_CONFIG


def test_explicit_data_config_sets_normalisation():
    config = dict(MNIST_DATA_CONFIG, mean=(0.5,), std=(0.5,))
    data = ImageClassificationData(batch_size=4, val_subset=4, data_config=config)
    data.setup("validate")
    batch_images, _ = next(iter(data.val_dataloader()))

    assert batch_images.min() >= -1.0
    assert batch_images.max() <= 1.0
    assert batch_images.min() == -1.0  # MNIST backgrounds are 0, which maps to (0 - 0.5) / 0.5


def test_train_augment_changes_images():
    plain = ImageClassificationData(batch_size=16)
    plain.setup("fit")
    augmented = ImageClassificationData(batch_size=16, train_augment=True)
    augmented.setup("fit")
    torch.manual_seed(0)

    first_plain = plain.train_dataset[0]["pixel_values"]
    first_augmented = augmented.train_dataset[0]["pixel_values"]

    assert first_augmented.shape == first_plain.shape == (1, 28, 28)
    assert not torch.equal(first_plain, first_augmented)


def test_test_split_defaults_to_validation():
    data = ImageClassificationData(batch_size=4, val_subset=8)
    data.setup("test")

    assert len(data.test_dataset) == 1000
    assert len(data.val_dataset) == 8


def test_missing_split_lists_available():
    data = ImageClassificationData(val_split="dev")

    with pytest.raises(KeyError, match=r"split 'dev' not found.*\['train', 'validation'\]"):
        data.setup("fit")


def test_missing_column_lists_columns():
    data = ImageClassificationData(label_column="digit")

    with pytest.raises(KeyError, match="column 'digit' not found"):
        data.setup("fit")


def test_imagefolder_without_path_rejected():
    with pytest.raises(ValueError, match="has no folder"):
        ImageClassificationData(source="imagefolder:")


def test_imagefolder_rgb_images_become_grayscale(tmp_path):
    # Two classes of 28x28 RGB PNGs per split. The 1-channel data config converts them to mode "L".
    for split in ("train", "validation"):
        for label, value in (("cat", 40), ("dog", 200)):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for index in range(2):
                Image.new("RGB", (28, 28), (value, value, value)).save(folder / f"{index}.png")
    data = ImageClassificationData(
        source=f"imagefolder:{tmp_path / 'images'}",
        batch_size=4,
        data_config=MNIST_DATA_CONFIG,
        dataset_kwargs={"cache_dir": str(tmp_path / "cache")},
    )
    data.setup("fit")
    batch_images, batch_labels = next(iter(data.val_dataloader()))

    assert data.num_classes == 2
    assert tuple(batch_images.shape) == (4, 1, 28, 28)
    assert sorted(batch_labels.tolist()) == [0, 0, 1, 1]
    cat_pixels = batch_images[batch_labels == 0]
    torch.testing.assert_close(cat_pixels, torch.full_like(cat_pixels, (40 / 255 - 0.1307) / 0.3081))


def test_missing_image_folder_named():
    data = ImageClassificationData(source="imagefolder:/nonexistent/images")
    with pytest.raises(FileNotFoundError, match="image folder '/nonexistent/images'.*does not exist"):
        data.setup("validate")
