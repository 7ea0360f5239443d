"""The step hook keeps embedded weights on the CMD model through any optimizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmd_fl import EmbeddedProjector, EmbeddingState, ParameterLayout


def _setup() -> tuple[torch.nn.Module, ParameterLayout, EmbeddingState]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    layout = ParameterLayout.from_module(model)
    n = layout.n_weights
    rng = np.random.default_rng(0)
    references = np.array([3, 40])
    modes = rng.integers(0, 2, n)
    modes[references] = [0, 1]
    state = EmbeddingState(modes, references)
    chosen = np.setdiff1d(rng.choice(n, n // 2, replace=False), references)
    state.embed(chosen, rng.normal(size=chosen.size), rng.normal(size=chosen.size))
    return model, layout, state


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=0.01),
    ],
    ids=["sgd-momentum-wd", "adam"],
)
@pytest.mark.parametrize("reference_gradient", ["own", "mode"])
def test_embedded_weights_follow_references_after_each_step(  # type: ignore[no-untyped-def]
    make_optimizer, reference_gradient: str
) -> None:
    model, layout, state = _setup()
    optimizer = make_optimizer(model.parameters())
    projector = EmbeddedProjector(model, layout, state, reference_gradient).attach(optimizer)
    before = layout.flatten_numpy(model.state_dict()).copy()

    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 6)).pow(2).sum().backward()
        optimizer.step()
        flat = layout.flatten_numpy(model.state_dict())
        expected = flat.copy()
        state.project(expected)  # the numpy definition of the CMD model
        np.testing.assert_array_equal(flat, expected)

    free = state.free_indices
    assert (flat[free] != before[free]).mean() > 0.9  # trained weights moved
    assert (flat[state.references] != before[state.references]).all()
    projector.detach()


def test_detach_stops_projection() -> None:
    model, layout, state = _setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    EmbeddedProjector(model, layout, state).attach(optimizer).detach()

    optimizer.zero_grad()
    model(torch.randn(8, 6)).pow(2).sum().backward()
    optimizer.step()
    flat = layout.flatten_numpy(model.state_dict())
    expected = flat.copy()
    state.project(expected)
    assert not np.array_equal(flat, expected)


def test_mode_gradient_moves_references_by_the_least_squares_step() -> None:
    model, layout, state = _setup()
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    projector = EmbeddedProjector(model, layout, state, reference_gradient="mode").attach(optimizer)
    before = layout.flatten_numpy(model.state_dict()).copy()
    x = torch.randn(8, 6)

    optimizer.zero_grad()
    model(x).pow(2).sum().backward()
    grads = np.concatenate(
        [p.grad.detach().numpy().reshape(-1).astype(np.float64) for p in model.parameters()]  # type: ignore[union-attr]
    )
    optimizer.step()
    after = layout.flatten_numpy(model.state_dict())

    emb = state.embedded_indices
    for mode, ref in enumerate(state.references):
        members = emb[state.modes[emb] == mode]
        a = state.frozen_a[members].astype(np.float64)
        expected = (grads[ref] + a @ grads[members]) / (1 + a @ a)
        np.testing.assert_allclose(before[ref] - after[ref], lr * expected, rtol=1e-4)
    projected = after.copy()
    state.project(projected)
    np.testing.assert_array_equal(after, projected)  # still exactly on the CMD model
    free = state.free_indices
    np.testing.assert_allclose(before[free] - after[free], lr * grads[free], rtol=1e-4, atol=1e-7)
    projector.detach()
    with pytest.raises(ValueError, match="reference_gradient"):
        EmbeddedProjector(model, layout, state, reference_gradient="sum")
