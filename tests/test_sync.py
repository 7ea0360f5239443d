"""State sync: any client version is brought exactly to the server's state."""

from __future__ import annotations

import numpy as np
import pytest

from cmd_fl.embedding import EmbeddingState
from cmd_fl.sync import EmbeddingHistory, apply_delta
from cmd_fl.wire import StateDelta


def _server() -> tuple[EmbeddingState, EmbeddingHistory, list[EmbeddingState]]:
    """A server state through four versions; returns it, its log, and a snapshot per version."""
    n = 40
    modes = np.arange(n) % 3
    state = EmbeddingState(modes, np.array([0, 1, 2]))
    history = EmbeddingHistory(state)
    snapshots = [state.copy()]
    rng = np.random.default_rng(0)
    for change in ("embed", "embed", "release"):
        if change == "embed":
            chosen = rng.choice(state.free_indices, 8, replace=False)
            state.embed(chosen, rng.normal(size=8), rng.normal(size=8))
        else:
            chosen = state.embedded_indices[::3]
            state.release(chosen)
        state.version += 1
        history.record(state.version, chosen)
        snapshots.append(state.copy())
    return state, history, snapshots


def _same(a: EmbeddingState, b: EmbeddingState) -> None:
    assert a.version == b.version
    np.testing.assert_array_equal(a.embedded, b.embedded)
    np.testing.assert_array_equal(a.frozen_a[a.embedded], b.frozen_a[b.embedded])
    np.testing.assert_array_equal(a.frozen_b[a.embedded], b.frozen_b[b.embedded])
    refs = np.arange(3, dtype=np.float32)
    free, _ = a.split(np.zeros(a.n_weights, np.float32))
    np.testing.assert_array_equal(a.assemble(free, refs), b.assemble(free, refs))


def test_every_version_catches_up_exactly() -> None:
    server, history, snapshots = _server()
    _same(apply_delta(None, history.delta(server, 0), server.n_weights), server)
    for known in snapshots:
        client = apply_delta(known.copy(), history.delta(server, known.version))
        _same(client, server)


def test_a_client_that_got_part_of_a_delta_ends_in_the_same_state() -> None:
    server, history, snapshots = _server()
    # The client reached version 3 but the server still believes it is at version 1.
    client = apply_delta(snapshots[2].copy(), history.delta(server, 1))
    _same(client, server)


def test_up_to_date_client_gets_an_empty_delta() -> None:
    server, history, _ = _server()
    delta = history.delta(server, server.version)
    assert delta.embed_indices.size == 0 and delta.release_indices.size == 0


def test_gaps_and_missing_state_are_clear_errors() -> None:
    server, history, snapshots = _server()
    with pytest.raises(ValueError, match="cannot update a client at version 1"):
        apply_delta(snapshots[0].copy(), history.delta(server, 2))
    with pytest.raises(ValueError, match="no CMD state"):
        apply_delta(None, history.delta(server, 2), server.n_weights)
    with pytest.raises(ValueError, match="newer than the server"):
        history.delta(server, server.version + 1)
    assert isinstance(history.delta(server, 0), StateDelta)


def test_a_full_state_needs_the_number_of_weights() -> None:
    # A full state carries the modes of its embedded weights only: N must come from the client.
    server, history, _ = _server()
    with pytest.raises(ValueError, match="number of weights"):
        apply_delta(None, history.delta(server, 0))
    client = apply_delta(None, history.delta(server, 0), server.n_weights)
    known = np.union1d(server.embedded_indices, server.references)
    np.testing.assert_array_equal(client.modes[known], server.modes[known])
