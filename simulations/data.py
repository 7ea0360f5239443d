"""Local datasets (no downloads) and their federated partitions."""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATASETS = ("fashion-mnist", "digits", "cifar10")
PARTITIONINGS = ("iid", "dirichlet")

DATA_ENV_VAR = "CMD_FL_DATA"
DEFAULT_DATA_ROOT = Path("~/.cache/cmd-fl/data")
# Where the Debian package `dataset-fashion-mnist` installs the gzipped idx files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)

# Per-channel statistics of the training sets, used to standardise the inputs.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DIGITS_MEAN, DIGITS_STD = 0.3054, 0.3760  # of the pixels / 16 in the 80 % training split

DIGITS_TRAIN_FRACTION = 0.8
# Every Dirichlet partition gets at least this many examples (fewer only when the data set is
# too small for it), so that every client can train.
DIRICHLET_MIN_PARTITION_SIZE = 10


@dataclass(frozen=True)
class ArrayDataset:
    """An in-memory labelled data set.

    Parameters
    ----------
    x : torch.Tensor
        Inputs, float32 of shape ``(n, C, H, W)``.
    y : torch.Tensor
        Class labels, int64 of shape ``(n,)``.
    num_classes : int
        Number of classes of the task (a partition may lack some). Default 0: inferred as
        ``max(y) + 1``.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int = 0

    def __post_init__(self) -> None:
        """Check shapes and dtypes; infer ``num_classes`` when not given."""
        if self.x.shape[0] != self.y.shape[0] or self.y.ndim != 1:
            raise ValueError(
                f"x and y need the same length and y one dimension, got shapes "
                f"{tuple(self.x.shape)} and {tuple(self.y.shape)}"
            )
        if self.y.dtype != torch.int64:
            raise ValueError(f"y must be int64, got {self.y.dtype}")
        if self.num_classes <= 0:
            inferred = int(self.y.max()) + 1 if len(self.y) else 0
            object.__setattr__(self, "num_classes", inferred)

    def __len__(self) -> int:
        """Return the number of examples."""
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, ``(C, H, W)``."""
        return tuple(self.x.shape[1:])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """Return the examples at ``indices`` (a copy), keeping ``num_classes``."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ArrayDataset(self.x[index], self.y[index], self.num_classes)


def _torchvision() -> Any:
    """torchvision, imported on first use (it is slow to import and digits does not need it)."""
    import torchvision

    return torchvision


def default_data_root() -> Path:
    """Return the data root: env ``CMD_FL_DATA`` or ``~/.cache/cmd-fl/data``."""
    return Path(os.environ.get(DATA_ENV_VAR, str(DEFAULT_DATA_ROOT))).expanduser()


def load_dataset(
    name: str = "fashion-mnist", root: str | os.PathLike[str] | None = None
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load the train and test sets of a local data set as normalised tensors.

    Nothing is downloaded. Results are cached in-process (Flower simulation calls this in
    every client); treat the returned tensors as read-only.

    Parameters
    ----------
    name : str
        ``"fashion-mnist"`` (default; idx files from the Debian package
        ``dataset-fashion-mnist`` or ``<root>/FashionMNIST/raw/``), ``"digits"`` (scikit-learn's
        8x8 digits, 80/20 split) or ``"cifar10"`` (``<root>/cifar-10-batches-py/``).
    root : str or PathLike, optional
        Data folder. Default: env ``CMD_FL_DATA`` or ``~/.cache/cmd-fl/data``.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)``.

    Raises
    ------
    ValueError
        If ``name`` is unknown.
    FileNotFoundError
        If the data files are missing; the message says how to get them.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    return _load_dataset_cached(name, _resolve_root(root))


def _resolve_root(root: str | os.PathLike[str] | None) -> str:
    """Return the absolute data root as a string: the in-process cache key."""
    path = Path(root).expanduser() if root is not None else default_data_root()
    return str(path.resolve())


@functools.lru_cache(maxsize=4)
def _load_dataset_cached(name: str, root: str) -> tuple[ArrayDataset, ArrayDataset]:
    if name == "fashion-mnist":
        return _load_fashion_mnist(Path(root))
    if name == "digits":
        return _load_digits()
    return _load_cifar10(Path(root))


def _load_fashion_mnist(root: Path) -> tuple[ArrayDataset, ArrayDataset]:
    _ensure_fashion_mnist_raw(root / "FashionMNIST" / "raw")
    splits = []
    for train in (True, False):
        data = _torchvision().datasets.FashionMNIST(str(root), train=train, download=False)
        x = data.data.unsqueeze(1).float().div(255.0)
        x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        splits.append(ArrayDataset(x, data.targets.long(), num_classes=10))
    return splits[0], splits[1]


def _ensure_fashion_mnist_raw(raw: Path) -> None:
    """Unpack the Debian package's idx files into ``raw`` unless they are already there."""
    for name in FASHION_MNIST_FILES:
        target = raw / name
        if target.is_file():
            continue
        source = DEBIAN_FASHION_MNIST_DIR / f"{name}.gz"
        if not source.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {name} is missing: neither {target} nor {source} exists. "
                f"Install the Debian package (`sudo apt-get install dataset-fashion-mnist`), or "
                f"put the four unpacked idx files ({', '.join(FASHION_MNIST_FILES)}) in {raw}."
            )
        raw.mkdir(parents=True, exist_ok=True)
        # Unpack to a temporary file, then rename: concurrent clients never see a partial file.
        with tempfile.NamedTemporaryFile(dir=raw, prefix=f".{name}.", delete=False) as tmp:
            with gzip.open(source, "rb") as packed:
                shutil.copyfileobj(packed, tmp)
        os.replace(tmp.name, target)


def _load_digits() -> tuple[ArrayDataset, ArrayDataset]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the 'digits' data set needs scikit-learn: pip install scikit-learn "
            "(or the project's dev extra, pip install -e '.[dev]')"
        ) from exc
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32).div(16.0).reshape(-1, 1, 8, 8)
    x = (x - DIGITS_MEAN) / DIGITS_STD  # standardised, as the other data sets
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(y)))
    n_train = int(DIGITS_TRAIN_FRACTION * len(y))
    train, test = order[:n_train], order[n_train:]
    return ArrayDataset(x[train], y[train], 10), ArrayDataset(x[test], y[test], 10)


def _load_cifar10(root: Path) -> tuple[ArrayDataset, ArrayDataset]:
    folder = root / "cifar-10-batches-py"
    missing = [name for name in CIFAR10_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 files {missing} are missing in {folder}. This machine cannot download "
            f"them: fetch cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
            f"elsewhere and unpack it into {root} (or set {DATA_ENV_VAR} to its parent folder)."
        )
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    splits = []
    for train in (True, False):
        data = _torchvision().datasets.CIFAR10(str(root), train=train, download=False)
        x = torch.as_tensor(data.data).permute(0, 3, 1, 2).float().div(255.0)
        y = torch.as_tensor(data.targets, dtype=torch.int64)
        splits.append(ArrayDataset((x - mean) / std, y, num_classes=10))
    return splits[0], splits[1]


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioning: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split example indices into federated partitions with flwr-datasets partitioners.

    Parameters
    ----------
    labels : np.ndarray
        Class label of every example, shape ``(n,)``.
    num_partitions : int
        Number of partitions (clients), from 1 to ``n``.
    partitioning : str
        ``"iid"`` (default): seeded shuffle, then equal contiguous shards (sizes differ by at
        most one). ``"dirichlet"``: per-label proportions drawn from Dir(``alpha``), with
        self-balancing and at least ``DIRICHLET_MIN_PARTITION_SIZE`` examples per partition.
    alpha : float
        Dirichlet concentration; smaller means more label skew. Default 0.5. Must be > 0.
    seed : int
        Seed of the shuffle and the Dirichlet draws. Default 0.

    Returns
    -------
    list[np.ndarray]
        One int64 index array per partition; together they cover every index exactly once.

    Raises
    ------
    ValueError
        On an unknown ``partitioning``, ``num_partitions`` outside ``[1, n]`` or ``alpha <= 0``;
        also from flwr-datasets when 10 Dirichlet draws all leave a partition too small (very
        small ``alpha`` with many partitions).
    """
    labels = np.asarray(labels)
    if partitioning not in PARTITIONINGS:
        raise ValueError(f"unknown partitioning {partitioning!r}; choose one of {PARTITIONINGS}")
    if not 1 <= num_partitions <= len(labels):
        raise ValueError(f"num_partitions must be in [1, {len(labels)}], got {num_partitions}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    # Imported here: a deployed ClientApp starts a fresh process per message, and these heavy
    # imports are only needed where partitions are computed.
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

    table = Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))})
    partitioner: Partitioner
    if partitioning == "iid":
        # IidPartitioner shards contiguously; like FederatedDataset, shuffle first.
        table = table.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min(DIRICHLET_MIN_PARTITION_SIZE, len(labels) // num_partitions),
            self_balancing=True,
            seed=seed,
        )
    partitioner.dataset = table
    return [
        np.asarray(partitioner.load_partition(pid)["idx"], dtype=np.int64)
        for pid in range(num_partitions)
    ]


def load_partition(
    name: str,
    partition_id: int,
    num_partitions: int,
    partitioning: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load one client's partition of the training set, and the full test set.

    Parameters
    ----------
    name : str
        Data set name, see `load_dataset`.
    partition_id : int
        This client's partition, in ``[0, num_partitions)``.
    num_partitions, partitioning, alpha, seed
        Partitioning of the training set, see `partition_indices`.
    root : str or PathLike, optional
        Data folder, see `load_dataset`.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(partition of the training set, full test set)``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    resolved = _resolve_root(root)
    train, test = load_dataset(name, resolved)
    parts = _partition_indices_cached(name, resolved, num_partitions, partitioning, alpha, seed)
    return train.subset(parts[partition_id]), test


@functools.lru_cache(maxsize=8)
def _partition_indices_cached(
    name: str,
    root: str,
    num_partitions: int,
    partitioning: str,
    alpha: float,
    seed: int,
) -> tuple[np.ndarray, ...]:
    labels = load_dataset(name, root)[0].y.numpy()
    return tuple(partition_indices(labels, num_partitions, partitioning, alpha, seed))


def split_validation(
    dataset: ArrayDataset, fraction: float, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset]:
    """Hold out a seeded random fraction of ``dataset`` (e.g. a server-side validation set).

    Parameters
    ----------
    dataset : ArrayDataset
        Data to split; needs at least two examples.
    fraction : float
        Share of examples held out, in ``(0, 1)``; rounded, but both parts keep one example.
    seed : int
        Seed of the permutation. Default 0.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, validation)``, disjoint, together all of ``dataset``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = len(dataset)
    if n < 2:
        raise ValueError(f"need at least 2 examples to split, got {n}")
    n_val = min(max(round(fraction * n), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return dataset.subset(order[n_val:]), dataset.subset(order[:n_val])
