"""Why the digits CNN did not learn with the defaults: inputs x initialisation, trained centrally.

Run ``python -m benchmarks.digits_plateau``. Trains `simulations.task.DigitsCnn`'s architecture on
the built-in digits training split with the run defaults (batch 32, lr 0.05, plain SGD) and
prints test accuracy after each epoch (45 steps) for raw ([0, 1]) or standardised inputs and
PyTorch's default or He initialisation, plus a linear model for reference.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from simulations.data import DIGITS_MEAN, DIGITS_STD, load_dataset
from simulations.task import DigitsCnn


def _default_init(model: nn.Module) -> nn.Module:
    """Undo DigitsCnn's He initialisation: PyTorch's own of every layer."""
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            layer.reset_parameters()
    return model


def _linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def accuracies(
    build: Callable[[], nn.Module], standardised: bool, seed: int, epochs: int
) -> list[float]:
    """Test accuracy after each epoch of plain SGD (batch 32, lr 0.05)."""
    train, test = load_dataset("digits")

    def inputs(x: torch.Tensor) -> torch.Tensor:  # the loader standardises; undo it for "raw"
        return x if standardised else x * DIGITS_STD + DIGITS_MEAN

    torch.manual_seed(seed)
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    order = torch.Generator().manual_seed(seed)
    x_train, x_test = inputs(train.x), inputs(test.x)
    result = []
    for _ in range(epochs):
        perm = torch.randperm(len(train.y), generator=order)
        for start in range(0, len(perm), 32):
            batch = perm[start : start + 32]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[batch]), train.y[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            result.append(float((model(x_test).argmax(1) == test.y).float().mean()))
    return result


def main() -> None:
    """Print the table of docs/experiments.md ("Why digits did not learn with the defaults")."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants: list[tuple[str, Callable[[], nn.Module], bool]] = [
        ("raw inputs, PyTorch default init", lambda: _default_init(DigitsCnn()), False),
        ("standardised, PyTorch default init", lambda: _default_init(DigitsCnn()), True),
        ("raw inputs, He init", DigitsCnn, False),
        ("standardised, He init (DigitsCnn)", DigitsCnn, True),
        ("linear model, standardised", _linear, True),
    ]
    for name, build, standardised in variants:
        cells = []
        for seed in args.seeds:
            accs = accuracies(build, standardised, seed, args.epochs)
            cells.append(f"seed {seed}: " + ", ".join(f"{a:.2f}" for a in accs))
        print(f"{name:38s} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
