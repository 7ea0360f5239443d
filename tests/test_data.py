"""Tests of simulations.data: local loaders, partitions and the validation split."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from simulations import data
from simulations.data import (
    ArrayDataset,
    load_dataset,
    load_partition,
    partition_indices,
    split_validation,
)

HAS_DEBIAN_FASHION_MNIST = all(
    (data.DEBIAN_FASHION_MNIST_DIR / f"{name}.gz").is_file() for name in data.FASHION_MNIST_FILES
)


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    """Labels of the digits training set (1437 examples, 10 classes)."""
    return load_dataset("digits")[0].y.numpy()


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's and the global label mix."""
    overall = np.bincount(labels, minlength=10) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - overall).sum() for p in parts
    ]
    return float(np.mean(distances))


# --- Fashion-MNIST --------------------------------------------------------------------------


@pytest.mark.skipif(
    not HAS_DEBIAN_FASHION_MNIST,
    reason="Debian package dataset-fashion-mnist not installed (apt-get install it)",
)
def test_fashion_mnist_unpacks_debian_files_and_loads_normalised(tmp_path: Path) -> None:
    # Execute
    train, test = load_dataset("fashion-mnist", root=tmp_path)

    # Assert
    assert (len(train), len(test)) == (60000, 10000)
    assert train.x.shape == (60000, 1, 28, 28) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64 and set(train.y.unique().tolist()) == set(range(10))
    assert train.num_classes == 10 and train.input_shape == (1, 28, 28)
    assert abs(float(train.x.mean())) < 0.01
    assert abs(float(train.x.std()) - 1.0) < 0.01
    raw = sorted(p.name for p in (tmp_path / "FashionMNIST" / "raw").iterdir())
    assert raw == sorted(data.FASHION_MNIST_FILES)  # no temporary files left behind
    assert load_dataset("fashion-mnist", root=tmp_path)[0] is train  # cached in-process


def test_fashion_mnist_missing_files_raise_with_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: no Debian package and an empty data root
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-package")

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path / "root")


def test_default_root_comes_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path))
    assert data.default_data_root() == tmp_path
    monkeypatch.delenv(data.DATA_ENV_VAR)
    assert data.default_data_root() == Path.home() / ".cache" / "cmd-fl" / "data"


# --- digits and general loader behaviour -----------------------------------------------------


def test_digits_loads_deterministic_split() -> None:
    # Execute
    train, test = load_dataset("digits")

    # Assert
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.shape == (1437, 1, 8, 8) and train.x.dtype == torch.float32
    intensities = train.x * data.DIGITS_STD + data.DIGITS_MEAN  # standardised pixels / 16
    assert float(intensities.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(intensities.max()) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(train.x.mean())) < 0.01 and abs(float(train.x.std()) - 1.0) < 0.01
    assert train.y.dtype == torch.int64 and train.num_classes == 10
    data._load_dataset_cached.cache_clear()
    again, _ = load_dataset("digits")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)


def test_unknown_dataset_raises() -> None:
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("mnist")


def test_array_dataset_checks_and_subset() -> None:
    # Prepare
    ds = ArrayDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 2, 1, 2]))

    # Execute
    sub = ds.subset(np.array([3, 1]))

    # Assert
    assert ds.num_classes == 3  # inferred
    assert sub.y.tolist() == [2, 2] and sub.num_classes == 3 and len(sub) == 2
    with pytest.raises(ValueError, match="same length"):
        ArrayDataset(torch.zeros(3, 1), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        ArrayDataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.int32))


# --- CIFAR-10 ----------------------------------------------------------------------------------


def write_tiny_cifar10(root: Path, n_train: int, n_test: int) -> tuple[np.ndarray, ...]:
    """Write a CIFAR-10 python-format folder; return train/test images (NCHW uint8) and labels."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, size=(n_train + n_test, 3 * 32 * 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_train + n_test).tolist()
    chunks = np.array_split(np.arange(n_train), 5)
    for i, chunk in enumerate(chunks, start=1):
        batch = {"data": images[chunk], "labels": [labels[j] for j in chunk]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test_batch = {"data": images[n_train:], "labels": labels[n_train:]}
    (folder / "test_batch").write_bytes(pickle.dumps(test_batch))
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    meta = {"label_names": names}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    nchw = images.reshape(-1, 3, 32, 32)
    y = np.asarray(labels)
    return nchw[:n_train], y[:n_train], nchw[n_train:], y[n_train:]


def test_cifar10_reads_python_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: our files cannot match the md5 sums torchvision pins for the real batches, so its
    # integrity check is reduced to "file exists"; reading stays torchvision's own code.
    x_train, y_train, x_test, y_test = write_tiny_cifar10(tmp_path, n_train=20, n_test=10)
    real_check = torchvision.datasets.cifar.check_integrity
    monkeypatch.setattr(
        torchvision.datasets.cifar,
        "check_integrity",
        lambda fpath, md5=None: real_check(fpath, None),
    )

    # Execute
    train, test = load_dataset("cifar10", root=tmp_path)

    # Assert
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (10, 3, 32, 32)
    assert train.y.tolist() == y_train.tolist() and test.y.tolist() == y_test.tolist()
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    pixels = (train.x * std + mean) * 255.0
    np.testing.assert_allclose(pixels.numpy(), x_train.astype(np.float32), atol=1e-3)
    pixels = (test.x * std + mean) * 255.0
    np.testing.assert_allclose(pixels.numpy(), x_test.astype(np.float32), atol=1e-3)


def test_cifar10_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path)


# --- partitions --------------------------------------------------------------------------------


def test_iid_partitions_are_disjoint_complete_and_balanced(digits_labels: np.ndarray) -> None:
    # Execute
    parts = partition_indices(digits_labels, num_partitions=7, partitioning="iid", seed=0)

    # Assert
    joined = np.concatenate(parts)
    assert len(parts) == 7 and all(p.dtype == np.int64 for p in parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(digits_labels)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(digits_labels, parts) < 0.15
    assert not np.array_equal(parts[0], np.arange(len(parts[0])))  # shuffled, not contiguous


def test_dirichlet_partitions_are_label_skewed(digits_labels: np.ndarray) -> None:
    # Execute
    iid = partition_indices(digits_labels, 5, "iid", seed=0)
    skewed = partition_indices(digits_labels, 5, "dirichlet", alpha=0.5, seed=0)

    # Assert
    np.testing.assert_array_equal(np.sort(np.concatenate(skewed)), np.arange(len(digits_labels)))
    assert min(len(p) for p in skewed) >= data.DIRICHLET_MIN_PARTITION_SIZE
    assert label_skew(digits_labels, skewed) > 0.25
    assert label_skew(digits_labels, skewed) > 3 * label_skew(digits_labels, iid)


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
def test_partitions_are_deterministic_per_seed(
    digits_labels: np.ndarray, partitioning: str
) -> None:
    first = partition_indices(digits_labels, 4, partitioning, seed=3)
    second = partition_indices(digits_labels, 4, partitioning, seed=3)
    other = partition_indices(digits_labels, 4, partitioning, seed=4)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, c) for a, c in zip(first, other, strict=True))


def test_single_partition_holds_everything(digits_labels: np.ndarray) -> None:
    for partitioning in ("iid", "dirichlet"):
        (only,) = partition_indices(digits_labels, 1, partitioning)
        np.testing.assert_array_equal(np.sort(only), np.arange(len(digits_labels)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_partitions": 2, "partitioning": "shards"}, "unknown partitioning"),
        ({"num_partitions": 0}, "num_partitions"),
        ({"num_partitions": 11}, "num_partitions"),
        ({"num_partitions": 2, "partitioning": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_partitions": 2, "alpha": -1.0}, "alpha"),
    ],
)
def test_partition_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition_indices(np.arange(10) % 3, **kwargs)


def test_load_partition_matches_partition_indices(digits_labels: np.ndarray) -> None:
    # Execute
    train, test = load_partition("digits", 2, 4, "dirichlet", alpha=0.5, seed=1)

    # Assert
    expected = partition_indices(digits_labels, 4, "dirichlet", alpha=0.5, seed=1)[2]
    full_train, full_test = load_dataset("digits")
    assert torch.equal(train.y, full_train.y[expected])
    assert torch.equal(train.x, full_train.x[expected])
    assert test is full_test and train.num_classes == 10
    with pytest.raises(ValueError, match="partition_id"):
        load_partition("digits", 4, 4)


# --- validation split --------------------------------------------------------------------------


def test_split_validation_is_disjoint_complete_and_deterministic() -> None:
    # Prepare: example i holds the value i, so the split can be traced
    ds = ArrayDataset(torch.arange(50.0).view(50, 1, 1, 1), torch.arange(50) % 10)

    # Execute
    train, val = split_validation(ds, fraction=0.2, seed=5)
    train_again, val_again = split_validation(ds, fraction=0.2, seed=5)
    _, val_other = split_validation(ds, fraction=0.2, seed=6)

    # Assert
    assert (len(train), len(val)) == (40, 10)
    values = sorted(train.x.flatten().tolist() + val.x.flatten().tolist())
    assert values == list(range(50))
    assert torch.equal(val.x, val_again.x) and torch.equal(train.x, train_again.x)
    assert not torch.equal(val.x, val_other.x)
    assert val.num_classes == 10


def test_split_validation_edge_cases() -> None:
    ds = ArrayDataset(torch.zeros(3, 1), torch.tensor([0, 1, 2]))
    assert [len(part) for part in split_validation(ds, fraction=0.01)] == [2, 1]
    assert [len(part) for part in split_validation(ds, fraction=0.99)] == [1, 2]
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match="fraction"):
            split_validation(ds, fraction=fraction)
    with pytest.raises(ValueError, match="at least 2"):
        split_validation(ds.subset(np.array([0])), fraction=0.5)
