"""Compact CMD state on the wire: float16 coefficients when lossless, b-only re-fit deltas."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from cmd_fl.embedding import EmbeddingState
from cmd_fl.sync import EmbeddingHistory, apply_delta, full_state
from cmd_fl.wire import StateDelta, WireFormatError

N, M = 2000, 4


def _same(a: EmbeddingState, b: EmbeddingState) -> None:
    """Bitwise the same state (version, embedded set, coefficients)."""
    assert a.version == b.version
    np.testing.assert_array_equal(a.embedded, b.embedded)
    assert a.frozen_a.tobytes() == b.frozen_a.tobytes()
    assert a.frozen_b.tobytes() == b.frozen_b.tobytes()


def _state(rounded: bool) -> tuple[EmbeddingState, EmbeddingHistory]:
    rng = np.random.default_rng(0)
    modes = np.arange(N) % M
    state = EmbeddingState(modes, np.arange(M))
    state.round_coefficients = rounded
    history = EmbeddingHistory(state)
    chosen = np.sort(rng.choice(state.free_indices, 1200, replace=False))
    state.embed(chosen, rng.normal(size=chosen.size), rng.normal(scale=0.05, size=chosen.size))
    state.version += 1
    history.record(state.version, chosen)
    return state, history


def _blob_size(delta: StateDelta) -> int:
    return int(delta.to_array_record(N, M)["cmd-state"].numpy().size)


def test_rounded_coefficients_travel_in_two_bytes_each_and_arrive_bitwise() -> None:
    exact, _ = _state(rounded=False)
    rounded, _ = _state(rounded=True)
    # The server's rounding moves each coefficient by at most float16's half step.
    emb = rounded.embedded_indices
    np.testing.assert_allclose(rounded.frozen_a[emb], exact.frozen_a[emb], rtol=2**-11)
    np.testing.assert_allclose(rounded.frozen_b[emb], exact.frozen_b[emb], rtol=2**-11, atol=1e-7)
    assert not np.array_equal(rounded.frozen_a[emb], exact.frozen_a[emb])

    sizes = {}
    for name, state in (("exact", exact), ("rounded", rounded)):
        delta = full_state(state)
        sizes[name] = _blob_size(delta)
        back = StateDelta.from_array_record(delta.to_array_record(N, M), N, M)
        _same(apply_delta(None, back), state)  # bitwise: float32 only where float16 is not exact
    assert sizes["exact"] - sizes["rounded"] == 2 * 2 * emb.size


def test_one_coefficient_outside_float16_sends_all_in_float32() -> None:
    state, _ = _state(rounded=True)
    weight = int(state.embedded_indices[0])
    state.embed(np.array([weight]), np.array([1e6]), np.array([0.0]))  # beyond float16's range
    assert state.frozen_a[weight] == np.float32(1e6)
    delta = full_state(state)
    back = StateDelta.from_array_record(delta.to_array_record(N, M), N, M)
    _same(apply_delta(None, back), state)
    assert _blob_size(delta) > _blob_size(full_state(_state(rounded=True)[0]))


def test_a_refit_travels_as_new_offsets_only() -> None:
    state, history = _state(rounded=True)
    client = apply_delta(None, history.delta(state, 0))
    before = state.copy()
    refit = state.embedded_indices[::2]
    state.embed(refit, state.frozen_a[refit], state.frozen_b[refit] + np.float32(0.01))
    released = state.embedded_indices[1:10:2]
    state.release(released)
    state.version += 1
    history.record(state.version, released, refit=refit)

    delta = history.delta(state, before.version)
    np.testing.assert_array_equal(delta.refit_indices, refit)
    np.testing.assert_array_equal(delta.release_indices, released)
    assert delta.embed_indices.size == 0  # nothing newly embedded: no a travels
    back = StateDelta.from_array_record(delta.to_array_record(N, M), N, M)
    _same(apply_delta(client, back), state)
    # 2 bytes of b per re-fit weight (and its index), not 4 of a and b.
    assert _blob_size(delta) < refit.size * (2 + 2)
    # A client that knew nothing gets the re-fit weights in its full state.
    _same(apply_delta(None, history.delta(state, 0)), state)


def test_a_refit_of_a_weight_the_client_does_not_hold_embedded_is_refused() -> None:
    state, _ = _state(rounded=False)
    free = state.free_indices[:3]
    delta = StateDelta(
        from_version=state.version,
        to_version=state.version + 1,
        embed_indices=np.empty(0, np.int64),
        embed_a=np.empty(0, np.float32),
        embed_b=np.empty(0, np.float32),
        refit_indices=free,
        refit_b=np.zeros(3, np.float32),
    )
    version = state.version
    with pytest.raises(ValueError, match="does not hold embedded"):
        apply_delta(state, delta)
    assert state.version == version and not state.embedded[free].any()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("refit-overlaps-embed", "re-fit weight is also embedded"),
        ("refit-in-full-state", "cannot release or re-fit"),
        ("refit-b-length", "refit_b must be float32 of length"),
    ],
)
def test_malformed_refits_are_refused_on_both_ends(change: str, message: str) -> None:
    state, _ = _state(rounded=False)
    emb = state.embedded_indices[:4]
    fields: dict[str, Any] = {
        "from_version": 1,
        "to_version": 2,
        "embed_indices": emb[:2],
        "embed_a": np.ones(2, np.float32),
        "embed_b": np.ones(2, np.float32),
        "refit_indices": emb[2:],
        "refit_b": np.zeros(2, np.float32),
    }
    if change == "refit-overlaps-embed":
        fields["refit_indices"] = emb[1:3]
    elif change == "refit-in-full-state":
        fields = {
            **dataclasses.asdict(full_state(state)),
            "refit_indices": state.free_indices[:2],
            "refit_b": np.zeros(2, np.float32),
        }
    else:
        fields["refit_b"] = np.zeros(3, np.float32)
    with pytest.raises(WireFormatError, match=message):
        StateDelta(**fields).to_array_record(N, M)


def test_a_blob_with_an_unknown_coefficient_width_is_refused() -> None:
    state, _ = _state(rounded=True)
    record = full_state(state).to_array_record(N, M)
    blob = record["cmd-state"].numpy().copy()
    blob[1] = 3  # the width byte follows the format byte
    record["cmd-state"] = type(record["cmd-state"])(blob)
    with pytest.raises(WireFormatError, match="coefficients of 3 bytes"):
        StateDelta.from_array_record(record, N, M)
