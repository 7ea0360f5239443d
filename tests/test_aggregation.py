"""Weighted averaging shared by every strategy."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.aggregation import BLOCK, RunningAverage, weighted_average


def _clients(n_clients: int, seed: int) -> tuple[list[list[np.ndarray]], list[float]]:
    rng = np.random.default_rng(seed)
    arrays: list[list[np.ndarray]] = [
        [
            rng.standard_normal(50_000).astype(np.float32),
            rng.integers(0, 100, size=3).astype(np.int64),
        ]
        for _ in range(n_clients)
    ]
    weights = [float(w) for w in rng.integers(1, 500, size=n_clients)]
    return arrays, weights


def test_weighted_average_is_the_weighted_mean_with_dtypes_kept() -> None:
    arrays, weights = _clients(5, seed=0)
    floats, ints = weighted_average(arrays, weights)
    expected = np.average(np.stack([a[0] for a in arrays]), axis=0, weights=weights)
    np.testing.assert_allclose(floats, expected, rtol=1e-6, atol=1e-7)
    assert floats.dtype == np.float32 and ints.dtype == np.int64
    np.testing.assert_array_equal(
        ints, np.rint(np.average(np.stack([a[1] for a in arrays]), axis=0, weights=weights))
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_arrival_order_does_not_change_a_single_bit(seed: int) -> None:
    arrays, weights = _clients(10, seed)
    reference = weighted_average(arrays, weights)
    for permutation in np.random.default_rng(seed).permuted(np.tile(np.arange(10), (5, 1)), axis=1):
        shuffled = weighted_average(
            [arrays[i] for i in permutation], [weights[i] for i in permutation]
        )
        for got, want in zip(shuffled, reference, strict=True):
            assert got.tobytes() == want.tobytes()


def test_bad_input_is_refused() -> None:
    arrays, weights = _clients(3, seed=4)
    with pytest.raises(ValueError, match="nothing to average"):
        weighted_average([], [])
    with pytest.raises(ValueError, match="weights"):
        weighted_average(arrays, weights[:2])
    with pytest.raises(ValueError, match="positive"):
        weighted_average(arrays, [0.0, 0.0, 0.0])


def test_zero_d_buffers_stay_arrays_of_their_dtype() -> None:
    # BatchNorm's num_batches_tracked is a 0-d int64 buffer; Flower's Array rejects numpy scalars
    clients: list[list[np.ndarray]] = [
        [np.array(3, dtype=np.int64), np.array(1.5, dtype=np.float32)],
        [np.array(4, dtype=np.int64), np.array(2.5, dtype=np.float32)],
    ]
    averaged = weighted_average(clients, [1.0, 3.0])
    assert all(isinstance(a, np.ndarray) and a.shape == () for a in averaged)
    assert averaged[0].dtype == np.int64 and int(averaged[0]) == 4  # rint(3.75)
    assert averaged[1].dtype == np.float32 and float(averaged[1]) == 2.25


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.int64])
def test_values_every_client_sent_alike_come_back_bitwise(dtype: type) -> None:
    # A frozen parameter or a constant buffer: sum(x * w_c / W) in float64 is not exactly x
    rng = np.random.default_rng(5)
    same: np.ndarray
    if np.issubdtype(dtype, np.integer):
        same = rng.integers(2**60, 2**62, size=64).astype(dtype)  # beyond float64's 2**53
    else:
        same = rng.standard_normal(64).astype(dtype)
    for seed in range(20):
        weights = [float(w) for w in np.random.default_rng(seed).integers(1, 500, size=3)]
        clients = [[same.copy(), rng.standard_normal(4)] for _ in weights]
        kept, mixed = weighted_average(clients, weights)
        assert kept.dtype == same.dtype and kept.tobytes() == same.tobytes()
        assert kept is not clients[0][0]  # a copy: the caller may write into it
        expected = np.average(np.stack([c[1] for c in clients]), axis=0, weights=weights)
        np.testing.assert_allclose(mixed, expected, rtol=1e-12)


def test_boolean_buffers_are_a_weighted_majority() -> None:
    clients = [
        [np.array([True, True, False, False])],
        [np.array([True, False, True, False])],
        [np.array([False, False, False, True])],
    ]
    (averaged,) = weighted_average(clients, [1.0, 1.0, 3.0])
    assert averaged.dtype == np.bool_
    assert averaged.tolist() == [False, False, False, True]


def test_running_average_is_the_float64_weighted_sum_in_the_order_added() -> None:
    # Prepare: arrays longer than a block (the sums run block by block), a 0-d one, integers
    rng = np.random.default_rng(6)
    clients: list[list[np.ndarray]] = [
        [
            rng.standard_normal(BLOCK * 2 + 7).astype(np.float32).reshape(-1, 1),
            np.array(rng.standard_normal(), dtype=np.float32),
            rng.integers(0, 1000, size=5).astype(np.int64),
        ]
        for _ in range(7)
    ]
    weights = [float(w) for w in rng.integers(1, 500, size=len(clients))]

    # Execute
    average = RunningAverage()
    for arrays, weight in zip(clients, weights, strict=True):
        average.add(arrays, weight)
    got = average.result()

    # Assert: bitwise the plain float64 sum in the same order, then one division
    total = sum(weights)
    for k, array in enumerate(got):
        sums = np.zeros(array.shape)
        for client, weight in zip(clients, weights, strict=True):
            sums = sums + client[k].astype(np.float64) * weight
        want = sums / total
        if array.dtype.kind == "i":
            want = np.rint(want)
        assert array.dtype == clients[0][k].dtype and array.shape == clients[0][k].shape
        assert array.tobytes() == np.asarray(want.astype(array.dtype)).tobytes()
    mean = np.average(np.stack([c[0] for c in clients]), axis=0, weights=weights)
    np.testing.assert_allclose(got[0], mean, rtol=1e-6, atol=1e-7)


def test_a_client_that_does_not_match_is_refused_before_anything_is_added() -> None:
    # Prepare
    first: list[np.ndarray] = [np.arange(4, dtype=np.float32), np.ones(2, dtype=np.float32)]
    average = RunningAverage()
    average.add(first, 2.0)
    # Execute / Assert: a wrong shape in the last array, a wrong dtype, a missing array
    refused: list[list[np.ndarray]] = [
        [np.full(4, 9, np.float32), np.ones(3, np.float32)],
        [np.full(4, 9, np.float32), np.ones(2, np.float64)],
        [np.full(4, 9, np.float32)],
    ]
    for bad in refused:
        with pytest.raises(ValueError, match="differ"):
            average.add(bad, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        average.add(first, -1.0)
    with pytest.raises(ValueError, match="non-negative"):
        average.add(first, float("nan"))
    # Nothing of the refused clients is in the sums: the average is the first client's alone
    assert average.count == 1
    for got, want in zip(average.result(), first, strict=True):
        assert got.tobytes() == want.tobytes()


def test_a_running_average_of_nothing_or_of_zero_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="nothing to average"):
        RunningAverage().result()
    average = RunningAverage()
    average.add([np.ones(3)], 0.0)
    with pytest.raises(ValueError, match="positive"):
        average.result()


def test_an_array_alike_in_every_client_comes_back_bitwise_beside_one_that_differs() -> None:
    # Prepare: the first array differs from the second client on, the second never does
    same = np.linspace(0, 1, 10)
    average = RunningAverage()
    average.add([np.zeros(3), same.copy()], 1.0)
    average.add([np.ones(3), same.copy()], 3.0)
    # Execute
    changing, kept = average.result()
    # Assert
    np.testing.assert_array_equal(changing, np.full(3, 0.75))
    assert kept.tobytes() == same.tobytes()
