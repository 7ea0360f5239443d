"""The model and data of the quickstart: scikit-learn's digits and a small CNN with BatchNorm."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """conv(1->16) - BatchNorm - relu - maxpool 2, fc(256->10), for 1x8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(16)  # buffers (running stats, num_batches_tracked) travel too
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for inputs of shape ``(n, 1, 8, 8)``."""
        return self.fc(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(labels, dtype=torch.long)


def load_data(partition_id: int, num_partitions: int) -> DataLoader:
    """This node's share of the first 1,500 digits (the rest is the server's test set)."""
    x, y = _digits()
    order = np.random.default_rng(0).permutation(1500)
    mine = torch.from_numpy(np.array_split(order, num_partitions)[partition_id])
    return DataLoader(TensorDataset(x[mine], y[mine]), batch_size=16, shuffle=True)


def load_test_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The last 297 digits: the server's test set."""
    x, y = _digits()
    return x[1500:], y[1500:]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` that ``model`` classifies as ``y``."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
