"""Models of each data set and the local train / evaluate loops."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from simulations.data import ArrayDataset

OptimizerHook = Callable[[torch.optim.Optimizer], object]


class FashionMnistCnn(nn.Module):
    """Small CNN for 1x28x28 inputs: 65,558 trainable parameters.

    conv(1->16, 5x5) - relu - maxpool 2, conv(16->32, 5x5) - relu - maxpool 2,
    fc(512->100) - relu - fc(100->10).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5)
        self.fc1 = nn.Linear(32 * 4 * 4, 100)
        self.fc2 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(n, num_classes)`` for inputs ``(n, 1, 28, 28)``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class DigitsCnn(nn.Module):
    """Tiny CNN for 1x8x8 inputs: 4,538 trainable parameters.

    conv(1->8, 3x3, padding 1) - relu - maxpool 2, fc(128->32) - relu - fc(32->10).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)
        # He initialisation: PyTorch's default (uniform, gain 1/sqrt(3)) shrinks the signal by
        # about 3x per layer; in a net this small that leaves SGD on a near-chance plateau for
        # ~100 steps, longer than a client's share of a short federated run.
        for layer in (self.conv, self.fc1, self.fc2):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(n, num_classes)`` for inputs ``(n, 1, 8, 8)``."""
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """Return torchvision's ResNet-18 adapted to 32x32 inputs: 11,173,962 parameters.

    The 7x7 stride-2 stem and its max-pool would shrink 32x32 images to 8x8 before the first
    block, so conv1 becomes 3x3 stride 1 and the max-pool is dropped. Never pretrained.
    """
    import torchvision  # only this model needs it, and it is slow to import

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


_MODELS: dict[str, Callable[[], nn.Module]] = {
    "fashion-mnist": FashionMnistCnn,
    "digits": DigitsCnn,
    "cifar10": cifar_resnet18,
}


def build_model(dataset_name: str, seed: int | None = None) -> nn.Module:
    """Build the model of a data set, with seeded initial weights when ``seed`` is given.

    Parameters
    ----------
    dataset_name : str
        ``"fashion-mnist"`` (`FashionMnistCnn`), ``"digits"`` (`DigitsCnn`) or ``"cifar10"``
        (`cifar_resnet18`).
    seed : int, optional
        Seed of the initial weights. The model is built under ``torch.manual_seed(seed)``
        inside ``torch.random.fork_rng``, so the caller's global RNG state is left untouched.
        Default None: weights drawn from the current global RNG.

    Returns
    -------
    nn.Module
        The model, on CPU, in training mode.
    """
    if dataset_name not in _MODELS:
        raise ValueError(f"no model for data set {dataset_name!r}; choose one of {list(_MODELS)}")
    if seed is None:
        return _MODELS[dataset_name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _MODELS[dataset_name]()


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(
    model: nn.Module,
    dataset: ArrayDataset,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.0,
    device: str | torch.device = "cpu",
    optimizer_hook: OptimizerHook | None = None,
) -> dict[str, float | int]:
    """Train ``model`` in place with mini-batch SGD on cross-entropy.

    Parameters
    ----------
    model : nn.Module
        Model to train; moved to ``device``.
    dataset : ArrayDataset
        Training data (not empty).
    epochs : int
        Passes over the data, at least 1.
    batch_size : int
        Examples per step; the last batch of an epoch may be smaller.
    lr : float
        Learning rate.
    seed : int
        Seed of the per-epoch shuffles: the same seed, model and data give identical weights.
    momentum : float
        SGD momentum. Default 0.0 (plain SGD).
    device : str or torch.device
        Where to train. Default ``"cpu"``.
    optimizer_hook : callable, optional
        Called with the optimizer right after it is created, e.g. to register
        ``optimizer.register_step_post_hook``.

    Returns
    -------
    dict
        ``loss``: mean training loss over the last epoch (float); ``num_examples``: examples per
        epoch, ``len(dataset)`` (int).
    """
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty data set")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    model.to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    if optimizer_hook is not None:
        optimizer_hook(optimizer)
    generator = torch.Generator().manual_seed(seed)
    n = len(dataset)
    epoch_loss = 0.0
    for _ in range(epochs):
        epoch_loss = 0.0
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            x, y = dataset.x[batch].to(device), dataset.y[batch].to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(batch)
    return {"loss": epoch_loss / n, "num_examples": n}


def evaluate(
    model: nn.Module,
    dataset: ArrayDataset,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
) -> dict[str, float | int]:
    """Compute the loss and accuracy of ``model`` on ``dataset``, in eval mode without gradients.

    Parameters
    ----------
    model : nn.Module
        Model to evaluate; moved to ``device`` and left in eval mode.
    dataset : ArrayDataset
        Evaluation data (not empty).
    batch_size : int
        Examples per forward pass. Default 1000.
    device : str or torch.device
        Where to evaluate. Default ``"cpu"``.

    Returns
    -------
    dict
        ``loss``: mean cross-entropy (float); ``accuracy``: share of correct top-1 predictions
        (float); ``num_examples``: ``len(dataset)`` (int).
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    model.to(device)
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            x = dataset.x[start : start + batch_size].to(device)
            y = dataset.y[start : start + batch_size].to(device)
            logits = model(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum())
    n = len(dataset)
    return {"loss": total_loss / n, "accuracy": correct / n, "num_examples": n}
