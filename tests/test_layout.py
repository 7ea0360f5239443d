"""Parameter layout: modelled weights vs extras, flatten and back, dtypes kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from cmd_fl import ParameterLayout


def _models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    with_frozen = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    with_frozen[0].weight.requires_grad_(False)
    return [torchvision.models.resnet18(num_classes=10), with_frozen]


@pytest.mark.parametrize("model", _models(), ids=["resnet18", "frozen-layer"])
def test_round_trip_keeps_values_and_dtypes(model: torch.nn.Module) -> None:
    layout = ParameterLayout.from_module(model)
    state = model.state_dict()

    flat = layout.flatten(state)
    rebuilt = layout.state_dict(flat, layout.extra_tensors(state))

    assert flat.ndim == 1 and flat.numel() == layout.n_weights
    assert layout.n_weights == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert list(rebuilt) == list(state)
    for name, tensor in state.items():
        assert rebuilt[name].dtype == tensor.dtype, name
        assert torch.equal(rebuilt[name], tensor), name


def test_buffers_are_extras_not_modelled() -> None:
    layout = ParameterLayout.from_module(torchvision.models.resnet18())
    extra_names = {s.name for s in layout.extras}

    assert "bn1.running_mean" in extra_names
    assert "bn1.num_batches_tracked" in extra_names
    assert "bn1.weight" not in extra_names
    assert any(s.dtype == torch.int64 for s in layout.extras)


def test_unflatten_returns_views_and_load_into_copies() -> None:
    model = torch.nn.Linear(3, 2)
    layout = ParameterLayout.from_module(model)
    flat = torch.arange(layout.n_weights, dtype=torch.float32)

    views = layout.unflatten(flat)
    flat[0] = 42.0
    layout.load_into(model, flat)

    assert views["weight"][0, 0] == 42.0  # a view, not a copy
    assert model.bias.tolist() == [6.0, 7.0]
    with pytest.raises(ValueError, match="flat vector"):
        layout.unflatten(torch.zeros(layout.n_weights + 1))


def test_state_dict_layout_and_tensor_lookup() -> None:
    state = {"w": np.zeros((2, 3), np.float32), "steps": np.array(3), "b": np.ones(4, np.float32)}
    layout = ParameterLayout.from_state_dict(state)

    assert layout.n_weights == 10
    assert [s.name for s in layout.extras] == ["steps"]
    spec, local = layout.tensor_of(7)
    assert (spec.name, local) == ("b", 1)
    with pytest.raises(IndexError):
        layout.tensor_of(10)
    with pytest.raises(ValueError, match="CMD models floats only"):
        ParameterLayout.from_state_dict(state, modelled_names={"steps"})
