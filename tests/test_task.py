"""Tests of simulations.task: models, training and evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from simulations.data import ArrayDataset, load_dataset
from simulations.task import build_model, count_parameters, evaluate, train


@pytest.fixture(scope="module")
def digits() -> tuple[ArrayDataset, ArrayDataset]:
    """The digits train and test sets."""
    return load_dataset("digits")


def weights(model: nn.Module) -> list[torch.Tensor]:
    """Detached copies of the model's tensors, in order."""
    return [t.detach().clone() for t in model.state_dict().values()]


@pytest.mark.parametrize(
    ("name", "input_shape"),
    [("fashion-mnist", (1, 28, 28)), ("digits", (1, 8, 8)), ("cifar10", (3, 32, 32))],
)
def test_models_map_inputs_to_ten_logits(name: str, input_shape: tuple[int, ...]) -> None:
    model = build_model(name, seed=0).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, *input_shape))
    assert logits.shape == (2, 10)


def test_parameter_counts() -> None:
    assert 55_000 <= count_parameters(build_model("fashion-mnist")) <= 75_000
    assert count_parameters(build_model("fashion-mnist")) == 65_558
    assert count_parameters(build_model("digits")) == 4_538
    assert count_parameters(build_model("cifar10")) == 11_173_962


def test_cifar_model_keeps_32x32_resolution_in_the_stem() -> None:
    model = build_model("cifar10")
    stem = model.conv1
    assert isinstance(stem, nn.Conv2d)
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_build_model_seeding_is_local_and_reproducible() -> None:
    # Prepare
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)

    # Execute
    first = weights(build_model("digits", seed=7))
    second = weights(build_model("digits", seed=7))
    other = weights(build_model("digits", seed=8))

    # Assert
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(first, other, strict=True))
    assert torch.equal(torch.rand(3), expected_next)  # caller's global RNG untouched


def test_unknown_model_raises() -> None:
    with pytest.raises(ValueError, match="no model"):
        build_model("imagenet")


def test_training_on_digits_learns(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    # Prepare
    train_set, test_set = digits
    model = build_model("digits", seed=0)
    before = evaluate(model, train_set)

    # Execute
    result = train(model, train_set, epochs=3, batch_size=32, lr=0.05, seed=0, momentum=0.9)
    after = evaluate(model, test_set)

    # Assert
    assert result["num_examples"] == len(train_set)
    assert result["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.8
    assert after["num_examples"] == len(test_set)


def test_training_is_deterministic_per_seed(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    # Prepare: a small slice keeps this fast
    data = digits[0].subset(torch.arange(200).numpy())
    runs = []
    for seed in (0, 0, 1):
        model = build_model("digits", seed=0)
        loss = train(model, data, epochs=2, batch_size=16, lr=0.1, seed=seed)["loss"]
        runs.append((loss, weights(model)))

    # Assert
    (loss_a, wa), (loss_b, wb), (_, wc) = runs
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(wa, wb, strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(wa, wc, strict=True))


def test_optimizer_hook_sees_every_step(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    # Prepare
    data = digits[0].subset(torch.arange(50).numpy())
    steps: list[int] = []
    seen: list[torch.optim.Optimizer] = []

    def hook(optimizer: torch.optim.Optimizer) -> None:
        seen.append(optimizer)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))

    # Execute
    train(
        build_model("digits", seed=0),
        data,
        epochs=2,
        batch_size=16,
        lr=0.1,
        seed=0,
        momentum=0.5,
        optimizer_hook=hook,
    )

    # Assert
    assert len(seen) == 1 and isinstance(seen[0], torch.optim.SGD)
    assert seen[0].param_groups[0]["momentum"] == 0.5
    assert len(steps) == 2 * math.ceil(50 / 16)


def test_evaluate_is_batch_size_invariant_and_read_only(
    digits: tuple[ArrayDataset, ArrayDataset],
) -> None:
    # Prepare
    test_set = digits[1]
    model = build_model("digits", seed=0)
    before = weights(model)

    # Execute
    big = evaluate(model, test_set)
    small = evaluate(model, test_set, batch_size=7)

    # Assert
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))
    assert small["accuracy"] == big["accuracy"] and 0.0 <= big["accuracy"] <= 1.0
    assert small["loss"] == pytest.approx(big["loss"], rel=1e-5)
    assert big["num_examples"] == len(test_set) == 360


def test_empty_data_and_bad_arguments_raise(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    model = build_model("digits", seed=0)
    empty = digits[0].subset(torch.arange(0).numpy())
    with pytest.raises(ValueError, match="empty"):
        train(model, empty, epochs=1, batch_size=8, lr=0.1, seed=0)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, empty)
    with pytest.raises(ValueError, match="epochs"):
        train(model, digits[0], epochs=0, batch_size=8, lr=0.1, seed=0)
