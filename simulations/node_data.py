"""A SuperNode's own training data: a partition of a built-in data set, or files on the node.

In a real deployment every SuperNode trains on data that lives on its machine (the app bundle
never carries data). The node names its data in its ``--node-config``:

- ``data-path="/abs/path"``: the node's own data set, in one of two formats:

  * an ``.npz`` file with arrays ``x`` and ``y``. ``x`` holds the inputs, shape ``(N, C, H, W)``,
    ``(N, H, W, C)`` or, for one-channel data sets, ``(N, H, W)``; dtype ``uint8`` (pixel
    intensities 0..255) or floating point (intensities already scaled to [0, 1]). ``y`` holds
    the integer class labels, shape ``(N,)``, each in ``[0, num_classes)``;
  * a folder of images, ``<root>/<class>/<image>.png`` (torchvision ``ImageFolder`` layout; any
    extension ImageFolder accepts works). Name each class folder by its label, ``0`` to
    ``num_classes - 1``: a node that holds only some classes then keeps the run's labels. With
    other names ImageFolder's rule applies (sorted names are labels 0, 1, ...), so the node needs
    one folder per class, named so that they sort in label order (CIFAR-10's class names do).
    Images are converted to grayscale or RGB as the run's data set needs and must already have
    its height and width.

  Inputs are then normalised exactly as the run's built-in data set is (same scaling, same mean
  and standard deviation), so the server's model sees the same input distribution.
- ``partition-id=I num-partitions=K``: partition I of K of the run's built-in training set (what
  simulation does; every node needs the data set on disk).

Every problem (missing file, wrong shape or channels for the run's model, labels out of range,
an empty data set) raises a ``NodeDataError`` that says what to fix.
"""

from __future__ import annotations

import functools
import os
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from simulations.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    DIGITS_MEAN,
    DIGITS_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ArrayDataset,
)
from simulations.federation import client_dataset
from simulations.settings import RunSettings

DATA_PATH_KEY = "data-path"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"


@dataclass(frozen=True)
class InputSpec:
    """What the model of a built-in data set expects, and how its inputs are normalised.

    Parameters
    ----------
    shape : tuple[int, int, int]
        One input, ``(C, H, W)``.
    num_classes : int
        Number of classes.
    mean, std : tuple[float, ...]
        Per-channel standardisation applied after scaling intensities to [0, 1].
    """

    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# Must match simulations/data.py: the same scaling and statistics as the built-in loaders
# (digits is only scaled to [0, 1]); tests/test_deployment.py checks it on the built-in data.
INPUT_SPECS: dict[str, InputSpec] = {
    "fashion-mnist": InputSpec((1, 28, 28), 10, (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)),
    "digits": InputSpec((1, 8, 8), 10, (DIGITS_MEAN,), (DIGITS_STD,)),
    "cifar10": InputSpec((3, 32, 32), 10, CIFAR10_MEAN, CIFAR10_STD),
}
assert set(INPUT_SPECS) == set(DATASETS), "every built-in data set needs an InputSpec"


class NodeDataError(ValueError):
    """A node's own data cannot be used for the run; the message says why and what to fix."""


def node_dataset(
    settings: RunSettings, node_config: Mapping[str, object]
) -> tuple[ArrayDataset, int]:
    """The training data a SuperNode's ``--node-config`` names, and a seed for its shuffles.

    Parameters
    ----------
    settings : RunSettings
        The run's settings (data set, partitioning).
    node_config : Mapping[str, object]
        ``context.node_config``: ``data-path``, or ``partition-id`` (and ``num-partitions``,
        default the run's ``num-partitions``).

    Returns
    -------
    tuple[ArrayDataset, int]
        The data, and a per-node seed offset: the partition id, or the CRC-32 of the data path.

    Raises
    ------
    NodeDataError
        If the node config names no data, or the data is unusable.
    """
    key = node_data_key(node_config)
    if DATA_PATH_KEY in node_config:
        return load_node_data(str(node_config[DATA_PATH_KEY]), settings.dataset), key
    num_partitions = int(str(node_config.get(NUM_PARTITIONS_KEY, settings.num_partitions)))
    return client_dataset(settings, key, num_partitions), key


def node_data_key(node_config: Mapping[str, object]) -> int:
    """Which data a node trains on, as a number that is the same at every start of the node:
    its partition id, or the CRC-32 of its data path (its node id is new at every start).

    Seeds the node's shuffles, and orders the nodes when the server samples them by data
    (``sample-by = "data"``), so that runs stay reproducible and paired.

    Raises
    ------
    NodeDataError
        If the node config names no data.
    """
    if DATA_PATH_KEY in node_config:
        return zlib.crc32(str(node_config[DATA_PATH_KEY]).encode())
    if PARTITION_ID_KEY not in node_config:
        raise NodeDataError(
            f"node config names no data: start the SuperNode with --node-config "
            f'"{DATA_PATH_KEY}=\'/path/to/data.npz\'" or "{PARTITION_ID_KEY}=I '
            f'{NUM_PARTITIONS_KEY}=K"'
        )
    return int(str(node_config[PARTITION_ID_KEY]))


def load_node_data(path: str | os.PathLike[str], dataset: str) -> ArrayDataset:
    """Load a node's own data (``.npz`` file or image folder) for a run on ``dataset``.

    Parameters
    ----------
    path : str or PathLike
        An ``.npz`` file or an image folder (see the module docstring); ``~`` is expanded.
    dataset : str
        The run's data set (``dataset`` run-config key): fixes the input shape, the number of
        classes and the normalisation.

    Returns
    -------
    ArrayDataset
        Normalised float32 inputs ``(N, C, H, W)`` and int64 labels.

    Raises
    ------
    NodeDataError
        If the path is missing or the data does not fit the run's data set.
    """
    if dataset not in INPUT_SPECS:
        raise NodeDataError(f"unknown data set {dataset!r}; choose one of {sorted(INPUT_SPECS)}")
    resolved = Path(path).expanduser().resolve()
    stamp = resolved.stat().st_mtime_ns if resolved.exists() else 0
    return _load_cached(str(resolved), stamp, dataset)


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, stamp: int, dataset: str) -> ArrayDataset:
    # ``stamp`` (modification time) is part of the key: a replaced file is read again.
    spec = INPUT_SPECS[dataset]
    source = Path(path)
    if source.is_dir():
        pixels, labels = _read_image_folder(source, spec)
    elif source.is_file():
        if source.suffix != ".npz":
            raise NodeDataError(f"{source}: expected an .npz file or an image folder")
        pixels, labels = _read_npz(source, spec)
    else:
        raise NodeDataError(f"{source}: no such file or folder (the node config's {DATA_PATH_KEY})")
    return _to_dataset(pixels, labels, spec, str(source))


def _read_npz(path: Path, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise NodeDataError(f"{path}: not a readable .npz file ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise NodeDataError(f"{path}: a single .npy array, expected an .npz archive (np.savez)")
    with archive:
        files = list(archive.files)
        if not {"x", "y"} <= set(files):
            raise NodeDataError(
                f"{path}: needs arrays 'x' (inputs) and 'y' (labels), found {files}"
            )
        x, y = archive["x"], archive["y"]
    return _channels_first(x, spec, str(path)), y


def _channels_first(x: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """Inputs as ``(N, C, H, W)``, accepting ``(N, H, W)`` for one channel and ``(N, H, W, C)``."""
    c, h, w = spec.shape
    shape = tuple(x.shape)
    if x.ndim == 4 and shape[1:] == spec.shape:
        return x
    if x.ndim == 4 and shape[1:] == (h, w, c):
        return np.moveaxis(x, 3, 1)
    if x.ndim == 3 and c == 1 and shape[1:] == (h, w):
        return x[:, None]
    if x.ndim == 4 and shape[2:] == (h, w):  # (N, C, H, W) with other channels
        channels: int | None = shape[1]
    elif x.ndim == 4 and shape[1:3] == (h, w):  # (N, H, W, C) with other channels
        channels = shape[3]
    elif x.ndim == 3 and shape[1:] == (h, w):
        channels = 1
    else:
        channels = None
    if channels is not None:
        raise NodeDataError(
            f"{where}: inputs have {channels} channel(s), the run's model needs {c} "
            f"(x has shape {shape}; expected (N, {c}, {h}, {w}))"
        )
    raise NodeDataError(
        f"{where}: x has shape {shape}; the run's model needs inputs of shape (N, {c}, {h}, {w})"
        + (f" or (N, {h}, {w})" if c == 1 else f" or (N, {h}, {w}, {c})")
    )


def _read_image_folder(root: Path, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    # Imported here: every ClientApp process imports this module, few read image folders.
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise NodeDataError(f"{root}: no class folders (expected {root}/<label>/<image>.png)")
    if all(name.isdecimal() for name in classes):
        class_to_idx = {name: int(name) for name in classes}
    elif len(classes) == spec.num_classes:
        class_to_idx = {name: index for index, name in enumerate(classes)}
    else:
        raise NodeDataError(
            f"{root}: class folders {classes} are not labels; name each folder by its label "
            f"(0 to {spec.num_classes - 1}), or give all {spec.num_classes} class folders"
        )
    outside = sorted(name for name, label in class_to_idx.items() if label >= spec.num_classes)
    if outside:
        raise NodeDataError(
            f"{root}: class folders {outside} are out of range: labels must be in "
            f"[0, {spec.num_classes})"
        )
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise NodeDataError(f"{root}: no images (extensions {', '.join(IMG_EXTENSIONS)})")
    c, h, w = spec.shape
    mode = "L" if c == 1 else "RGB"
    pixels = np.empty((len(samples), h, w, c), dtype=np.uint8)
    for i, (file, _) in enumerate(samples):
        try:
            with Image.open(file) as image:
                if image.size != (w, h):
                    raise NodeDataError(
                        f"{file}: image is {image.size[0]}x{image.size[1]}, the run's model "
                        f"needs {w}x{h} (width x height); resize the node's images"
                    )
                pixels[i] = np.asarray(image.convert(mode), dtype=np.uint8).reshape(h, w, c)
        except OSError as err:
            raise NodeDataError(f"{file}: not a readable image ({err})") from err
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    return np.moveaxis(pixels, 3, 1), labels


def _to_dataset(x: np.ndarray, y: np.ndarray, spec: InputSpec, where: str) -> ArrayDataset:
    """Validate labels and intensities, then scale and standardise like the built-in loader."""
    if x.shape[0] == 0:
        raise NodeDataError(f"{where}: the data set is empty")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise NodeDataError(
            f"{where}: y must have shape ({x.shape[0]},) (one label per input), got {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise NodeDataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= spec.num_classes:
        raise NodeDataError(
            f"{where}: labels must be in [0, {spec.num_classes}), found values from {low} to {high}"
        )
    if x.dtype == np.uint8:
        scaled = torch.from_numpy(np.ascontiguousarray(x)).float().div(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise NodeDataError(f"{where}: inputs contain NaN or infinity")
        if x.min() < 0.0 or x.max() > 1.0:
            raise NodeDataError(
                f"{where}: float inputs must be intensities in [0, 1] (they are normalised "
                f"here), found values from {float(x.min()):g} to {float(x.max()):g}"
            )
        scaled = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise NodeDataError(
            f"{where}: inputs must be uint8 (0..255) or float ([0, 1]), got dtype {x.dtype}"
        )
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    labels = torch.from_numpy(y.astype(np.int64))
    return ArrayDataset((scaled - mean) / std, labels, num_classes=spec.num_classes)
