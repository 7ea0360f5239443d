"""A SuperNode's own data: .npz files and image folders, validated and normalised like the
run's built-in data set."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simulations.data import (
    DIGITS_MEAN,
    DIGITS_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_dataset,
)
from simulations.federation import client_dataset
from simulations.node_data import (
    INPUT_SPECS,
    NodeDataError,
    load_node_data,
    node_dataset,
)
from simulations.settings import RunSettings


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _images(root: Path, labels: dict[str, int], size: tuple[int, int], mode: str) -> None:
    """``count`` images per class folder, pixel value = 10 * index within the folder."""
    for name, count in labels.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(np.full(shape, 10 * i, dtype=np.uint8), mode).save(folder / f"{i}.png")


# --------------------------------------------------------------------------- .npz


def test_digits_partition_round_trips_through_an_npz_file(tmp_path: Path) -> None:
    # Prepare: partition 1 of 2 as a node would export it (intensities in [0, 1], (N, H, W)).
    settings = RunSettings(dataset="digits", num_partitions=2)
    part = client_dataset(settings, 1, 2)
    intensities = part.x.numpy()[:, 0] * DIGITS_STD + DIGITS_MEAN
    path = _save(tmp_path / "node.npz", x=intensities, y=part.y.numpy())

    # Execute
    loaded = load_node_data(path, "digits")

    # Assert: the very tensors of the built-in partition.
    torch.testing.assert_close(loaded.x, part.x)
    assert torch.equal(loaded.y, part.y)
    assert loaded.num_classes == 10


def test_uint8_pixels_are_scaled_and_standardised_like_fashion_mnist(tmp_path: Path) -> None:
    x = np.arange(4 * 28 * 28, dtype=np.int64).reshape(4, 1, 28, 28) % 256
    path = _save(tmp_path / "node.npz", x=x.astype(np.uint8), y=np.array([0, 3, 9, 3]))

    loaded = load_node_data(path, "fashion-mnist")

    expected = (torch.from_numpy(x).float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(loaded.x, expected)
    assert loaded.x.dtype == torch.float32 and loaded.y.dtype == torch.int64
    assert loaded.y.tolist() == [0, 3, 9, 3]


def test_channels_last_rgb_is_accepted_for_cifar10(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    path = _save(tmp_path / "node.npz", x=x, y=np.array([1, 2, 3]))

    loaded = load_node_data(path, "cifar10")

    spec = INPUT_SPECS["cifar10"]
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    expected = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    torch.testing.assert_close(loaded.x, expected)


def test_input_specs_match_the_built_in_digits_loader() -> None:
    train, _ = load_dataset("digits")
    assert train.input_shape == INPUT_SPECS["digits"].shape
    assert train.num_classes == INPUT_SPECS["digits"].num_classes
    spec = INPUT_SPECS["digits"]
    assert (spec.mean, spec.std) == ((DIGITS_MEAN,), (DIGITS_STD,))
    # Standardised with the training split's statistics.
    assert abs(float(train.x.mean())) < 0.01 and abs(float(train.x.std()) - 1.0) < 0.01


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 3, 8, 8), np.uint8), "y": np.zeros(2, np.int64)}, "3 channel"),
        ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.zeros(2, np.int64)}, "3 channel"),
        ({"x": np.zeros((2, 1, 28, 28), np.uint8), "y": np.zeros(2, np.int64)}, "shape"),
        ({"x": np.zeros((2, 64), np.uint8), "y": np.zeros(2, np.int64)}, "shape"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([0, 10])}, "from 0 to 10"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([-1, 0])}, "from -1 to 0"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([0.0, 1.0])}, "integers"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.zeros(3, np.int64)}, "one label per"),
        ({"x": np.zeros((0, 8, 8), np.uint8), "y": np.zeros(0, np.int64)}, "empty"),
        ({"x": np.full((2, 8, 8), 16.0), "y": np.zeros(2, np.int64)}, "[0, 1]"),
        ({"x": np.full((2, 8, 8), np.nan), "y": np.zeros(2, np.int64)}, "NaN"),
        ({"x": np.zeros((2, 8, 8), np.int32), "y": np.zeros(2, np.int64)}, "uint8"),
        ({"inputs": np.zeros((2, 8, 8)), "labels": np.zeros(2)}, "needs arrays 'x'"),
    ],
)
def test_unusable_npz_data_is_refused_with_a_clear_reason(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = _save(tmp_path / "node.npz", **arrays)
    with pytest.raises(NodeDataError, match=_literal(message)):
        load_node_data(path, "digits")


def test_missing_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NodeDataError, match="no such file or folder"):
        load_node_data(tmp_path / "absent.npz", "digits")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(NodeDataError, match=r"an \.npz file or an image folder"):
        load_node_data(tmp_path / "data.csv", "digits")
    (tmp_path / "broken.npz").write_bytes(b"not a zip file")
    with pytest.raises(NodeDataError, match=r"not a readable \.npz"):
        load_node_data(tmp_path / "broken.npz", "digits")
    with pytest.raises(NodeDataError, match="unknown data set"):
        load_node_data(tmp_path / "broken.npz", "mnist")


def test_a_replaced_file_is_read_again(tmp_path: Path) -> None:
    path = _save(tmp_path / "node.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([1, 2]))
    assert load_node_data(path, "digits").y.tolist() == [1, 2]
    _save(path, x=np.zeros((3, 8, 8), np.uint8), y=np.array([4, 5, 6]))
    assert load_node_data(path, "digits").y.tolist() == [4, 5, 6]


# --------------------------------------------------------------------------- image folders


def test_label_named_folders_keep_the_runs_labels(tmp_path: Path) -> None:
    # A node holding only classes 3 and 7 (non-IID): folder names are the labels.
    _images(tmp_path, {"3": 2, "7": 1}, size=(8, 8), mode="L")

    loaded = load_node_data(tmp_path, "digits")

    assert sorted(loaded.y.tolist()) == [3, 3, 7]
    assert loaded.x.shape == (3, 1, 8, 8)
    values = sorted({round(float(v), 5) for v in loaded.x.flatten()})
    # Scaled to [0, 1], then standardised like the built-in digits.
    assert values == [round((i - DIGITS_MEAN) / DIGITS_STD, 5) for i in (0.0, 10 / 255)]


def test_rgb_images_become_grayscale_for_a_grayscale_data_set(tmp_path: Path) -> None:
    _images(tmp_path, {"0": 1, "1": 1}, size=(28, 28), mode="RGB")
    loaded = load_node_data(tmp_path, "fashion-mnist")
    assert loaded.x.shape == (2, 1, 28, 28)


def test_named_class_folders_follow_imagefolder_order(tmp_path: Path) -> None:
    # CIFAR-10's class names sort in label order: ImageFolder's rule gives the right labels.
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    _images(
        tmp_path, {name: 1 if name in ("bird", "truck") else 0 for name in names}, (32, 32), "RGB"
    )

    loaded = load_node_data(tmp_path, "cifar10")

    assert sorted(loaded.y.tolist()) == [2, 9]
    assert loaded.x.shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    ("labels", "size", "message"),
    [
        ({"cat": 1, "dog": 1}, (8, 8), "not labels"),
        ({"3": 1, "12": 1}, (8, 8), "out of range"),
        ({"3": 0}, (8, 8), "no images"),
        ({"3": 1}, (9, 8), "9x8"),
    ],
)
def test_unusable_image_folders_are_refused_with_a_clear_reason(
    tmp_path: Path, labels: dict[str, int], size: tuple[int, int], message: str
) -> None:
    _images(tmp_path, labels, size=size, mode="L")
    with pytest.raises(NodeDataError, match=_literal(message)):
        load_node_data(tmp_path, "digits")


def test_a_folder_without_class_folders_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NodeDataError, match="no class folders"):
        load_node_data(tmp_path, "digits")


# --------------------------------------------------------------------------- node config


def test_node_config_picks_the_nodes_data(tmp_path: Path) -> None:
    settings = RunSettings(dataset="digits", num_partitions=2)
    path = _save(tmp_path / "node.npz", x=np.zeros((5, 8, 8), np.uint8), y=np.arange(5))

    own, own_seed = node_dataset(settings, {"data-path": str(path)})
    part, part_seed = node_dataset(settings, {"partition-id": 1, "num-partitions": 2})
    default_k, _ = node_dataset(settings, {"partition-id": 1})

    assert len(own) == 5
    assert own_seed == node_dataset(settings, {"data-path": str(path)})[1]  # same at restart
    assert part_seed == 1 and torch.equal(part.y, client_dataset(settings, 1, 2).y)
    assert torch.equal(default_k.y, part.y)  # num-partitions defaults to the run's
    with pytest.raises(NodeDataError, match="names no data"):
        node_dataset(settings, {})


def _literal(text: str) -> str:
    """``text`` as a regular expression that matches it literally."""
    return re.escape(text)
