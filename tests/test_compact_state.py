"""Compact CMD state on the wire: float16 coefficients when lossless, b-only re-fit deltas."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord

from benchmarks import first_message
from cmd_fl.embedding import EmbeddingState
from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import ByteLedger
from cmd_fl.sync import EmbeddingHistory, apply_delta, full_state
from cmd_fl.wire import (
    _STATE_HEADER,
    A_GRID_STEP,
    StateDelta,
    WireFormatError,
    mode_id_bits,
    pack_mode_ids,
    unpack_mode_ids,
)
from simulations.server_app import RunOutcome, make_strategy
from simulations.settings import RunSettings
from simulations.task import build_model
from strategies.cmd_strategy import CMDStrategy
from tests.test_flower_apps import simulate

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
        _same(apply_delta(None, back, N), state)  # bitwise: float32 only where float16 is not exact
    assert sizes["exact"] - sizes["rounded"] == 2 * 2 * emb.size


def test_one_coefficient_outside_float16_sends_all_in_float32() -> None:
    state, _ = _state(rounded=True)
    weight = int(state.embedded_indices[0])
    state.embed(np.array([weight]), np.array([1e6]), np.array([0.0]))  # beyond float16's range
    assert state.frozen_a[weight] == np.float32(1e6)
    delta = full_state(state)
    back = StateDelta.from_array_record(delta.to_array_record(N, M), N, M)
    _same(apply_delta(None, back, N), state)
    assert _blob_size(delta) > _blob_size(full_state(_state(rounded=True)[0]))


def test_a_refit_travels_as_new_offsets_only() -> None:
    state, history = _state(rounded=True)
    client = apply_delta(None, history.delta(state, 0), N)
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
    _same(apply_delta(None, history.delta(state, 0), N), state)


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
        "embed_modes": np.zeros(2, np.uint8),
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
    with pytest.raises(WireFormatError, match="coefficient width 3"):
        StateDelta.from_array_record(record, N, M)


# --------------------------------------------------------------------------- one-byte a, packed ids


def _grid_state(a: np.ndarray, refs: np.ndarray) -> tuple[EmbeddingState, np.ndarray, np.ndarray]:
    """A state with `a_on_grid`: 1,200 weights embedded with ``a`` at reference values refs.

    Returns the state, the embedded indices and the fitted ``b`` it was given.
    """
    rng = np.random.default_rng(1)
    state = EmbeddingState(np.arange(N) % M, np.arange(M))
    state.a_on_grid = True
    chosen = np.sort(rng.choice(state.free_indices, a.size, replace=False))
    b = rng.normal(scale=0.05, size=chosen.size).astype(np.float32)
    state.embed(chosen, a, b, reference_values=refs)
    state.version += 1
    return state, chosen, b


def test_grid_coefficients_travel_in_three_bytes_and_keep_each_weight_where_it_was() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=1200).astype(np.float32)
    a[:30] = rng.uniform(5, 9, size=30)  # off the grid (|a| > 3.97): float16, escaped
    refs = rng.normal(scale=0.1, size=M).astype(np.float32)
    state, chosen, b = _grid_state(a, refs)
    frozen_a = state.frozen_a[chosen]
    # On the grid where it fits, float16 elsewhere; never off by more than half a step.
    codes = frozen_a[30:] / np.float32(A_GRID_STEP)
    np.testing.assert_array_equal(codes, np.rint(codes))
    assert np.max(np.abs(frozen_a[30:] - a[30:])) <= A_GRID_STEP / 2
    np.testing.assert_allclose(frozen_a[:30], a[:30], rtol=2**-11)
    # b moved so that each weight keeps, at those references, the value the fit gave it
    # (up to float16 b: about 1e-4 here).
    fitted = a * refs[state.modes[chosen]] + b
    np.testing.assert_allclose(state.embedded_values(refs), fitted, atol=2e-4)
    moved = state.embedded_values(refs + 1.0)  # the references move on: now a's rounding shows
    assert np.max(np.abs(moved - (fitted + a))) > A_GRID_STEP / 4
    # Wire: one byte for a (three for an escaped one), two for b; back bitwise.
    delta = full_state(state)
    back = StateDelta.from_array_record(delta.to_array_record(N, M), N, M)
    _same(apply_delta(None, back, N), state)
    half = EmbeddingState(np.arange(N) % M, np.arange(M))
    half.round_coefficients = True
    half.embed(chosen, a, b)
    half.version += 1
    assert _blob_size(full_state(half)) - _blob_size(delta) == 1200 - 2 * 30


def test_mode_ids_travel_in_as_few_bits_as_the_modes_need() -> None:
    rng = np.random.default_rng(3)
    for n_modes, bits in ((1, 1), (2, 1), (3, 2), (4, 2), (5, 4), (16, 4), (17, 8), (255, 8)):
        assert mode_id_bits(n_modes) == bits
        for n in (1, 7, 8, 1001):
            modes = rng.integers(0, n_modes, size=n)
            packed = pack_mode_ids(modes, n_modes)
            assert len(packed) == -(-n * bits // 8)
            np.testing.assert_array_equal(unpack_mode_ids(packed, n, n_modes), modes)
    # A state's mode ids: those of its embedded weights only, at 2 bits for M = 4 (1,200
    # weights: 300 bytes, not N / 4); the references take 4 bytes each.
    state, _ = _state(rounded=True)
    full = full_state(state)
    blob = full.to_array_record(N, M)["cmd-state"].numpy()
    header = _STATE_HEADER.unpack(blob[: _STATE_HEADER.size].tobytes())
    assert header[4] == state.n_embedded * 2 // 8 == 300
    assert header[5] == 4 * M
    same_embeds = dataclasses.replace(full, from_version=1, references=None)
    assert _blob_size(full) - _blob_size(same_embeds) == 4 * M


@pytest.mark.parametrize(
    ("blob", "n", "n_modes", "match"),
    [
        (bytes([0b01_10_01_00]), 3, 4, "padding bits"),  # a 4th id, of 3, is set
        (bytes([0b11_10_01_00, 0]), 4, 4, "expected 1"),  # one byte too many
        (bytes([0x05]), 1, 5, r"mode id is >= n_modes 5"),  # 4 bits, id 5 of 5 modes
        (b"", 3, 4, "expected 1"),
    ],
)
def test_malformed_mode_ids_are_refused(blob: bytes, n: int, n_modes: int, match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        unpack_mode_ids(blob, n, n_modes)


def test_a_grid_code_blob_cut_short_is_refused() -> None:
    rng = np.random.default_rng(4)
    state, _, _ = _grid_state(rng.normal(size=1200).astype(np.float32), np.zeros(M, np.float32))
    record = full_state(state).to_array_record(N, M)
    blob = record["cmd-state"].numpy()
    record["cmd-state"] = type(record["cmd-state"])(blob[:-3].copy())
    with pytest.raises(WireFormatError, match="truncated"):
        StateDelta.from_array_record(record, N, M)


def test_grid_coefficients_through_the_apps_cut_the_state_and_keep_nodes_in_step(
    tmp_path: Path,
) -> None:
    # The real ServerApp and ClientApp: the clients rebuild the same CMD model from the
    # one-byte a (no reply rejected: every checksum matched), for a third less state.
    exact, _ = simulate(tmp_path / "float32", cmd_coefficients="float32")
    grid, _ = simulate(tmp_path / "grid", cmd_coefficients="grid")
    for outcome in (exact, grid):
        assert outcome.summary["rejected_replies"]["total"] == 0
    state = outcome_state(grid)
    emb = state.embedded_indices
    assert emb.size > 0 and state.a_on_grid
    on_grid = state.frozen_a[emb] / np.float32(A_GRID_STEP)
    assert np.mean(on_grid == np.rint(on_grid)) > 0.75  # digits: ~87 %, the rest |a| > 3.97
    ratio = grid.summary["total_state_bytes"] / exact.summary["total_state_bytes"]
    # About 3.3 bytes of coefficients a weight instead of 8; the same ids and index sets.
    assert ratio < 0.6
    assert grid.summary["final_accuracy"] > exact.summary["final_accuracy"] - 0.05


def outcome_state(outcome: RunOutcome) -> EmbeddingState:
    """The server's CMD state at the end of a run."""
    strategy = outcome.strategy
    assert isinstance(strategy, CMDStrategy) and strategy.state is not None
    return strategy.state


@pytest.mark.parametrize("embedded_share", [0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
def test_a_new_nodes_first_message_is_no_larger_than_one_dense_model(
    embedded_share: float,
) -> None:
    # The real training message a never-seen node gets (free weights in float32 and the whole
    # state, one-byte a), against the FedAvg message of the same model, both measured as the
    # ledger measures them: the Fashion-MNIST CNN (65,558 weights), M = 10.
    settings = RunSettings(strategy="cmd", codec="none", cmd_coefficients="grid")
    model = build_model(settings.dataset)
    layout = ParameterLayout.from_module(model)
    strategy = make_strategy(settings, layout, ByteLedger())
    assert isinstance(strategy, CMDStrategy)
    strategy.set_global(ArrayRecord(model.state_dict()))
    assert strategy.global_flat is not None
    rng = np.random.default_rng(5)
    modes = rng.integers(0, 10, layout.n_weights)
    references = np.array([np.flatnonzero(modes == m)[0] for m in range(10)])
    state = EmbeddingState(modes, references)
    state.a_on_grid = True
    chosen = np.sort(
        rng.choice(state.free_indices, int(embedded_share * layout.n_weights), replace=False)
    )
    a = rng.normal(size=chosen.size)
    b = rng.normal(scale=0.05, size=chosen.size)
    state.embed(chosen, a, b, strategy.global_flat[references])
    state.version = 2
    strategy.state, strategy.history = state, EmbeddingHistory(state)
    with first_message.task_identity():
        cmd_bytes, state_bytes = first_message.first_message_bytes(strategy)
        dense_bytes = first_message.dense_message_bytes(strategy)
    assert state_bytes > 0
    assert cmd_bytes <= dense_bytes
