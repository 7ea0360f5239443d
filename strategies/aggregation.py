"""Weighted averaging of arrays, shared by every strategy so all paths average alike."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def weighted_average(
    arrays: Sequence[Sequence[np.ndarray]], weights: Sequence[float]
) -> list[np.ndarray]:
    """Average lists of arrays, one list per client, weighted by ``weights``.

    Sums run in float64; each result gets back its input's dtype (integers and booleans
    rounded), so integer buffers such as BatchNorm's ``num_batches_tracked`` stay integers. An
    array every client sent bitwise alike is returned bitwise as it is. Clients are summed in an
    order fixed by their content, not by the order their replies arrived in: floating-point
    sums depend on the order, and a last-bit difference grows over rounds, so a run with the
    same seed would not repeat.

    Parameters
    ----------
    arrays : sequence of sequences of ndarray
        ``arrays[c][k]`` is client c's k-th array; every client has the same shapes and dtypes.
    weights : sequence of float
        Positive weight of each client (its number of examples).
    """
    if not arrays:
        raise ValueError("nothing to average")
    if len(arrays) != len(weights):
        raise ValueError(f"{len(arrays)} clients but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("weights must sum to a positive number")
    order = sorted(range(len(arrays)), key=lambda c: _content_key(arrays[c], weights[c]))
    arrays = [arrays[c] for c in order]
    factors = [float(weights[c]) / total for c in order]
    out: list[np.ndarray] = []
    for k, first in enumerate(arrays[0]):
        if all(_bitwise_equal(first, client[k]) for client in arrays[1:]):
            # Every client sent the same values (a frozen parameter, a constant buffer): keep
            # them bitwise. The float64 sum of x * w_c / W is not exactly x, and a float64 (or
            # int64 beyond 2**53) tensor would drift in its last bits every round.
            out.append(np.array(first, copy=True))
            continue
        acc = np.zeros(first.shape, dtype=np.float64)
        for client, factor in zip(arrays, factors, strict=True):
            acc += client[k].astype(np.float64, copy=False) * factor
        if first.dtype.kind in "biu":
            # Integers are rounded, not truncated toward zero; booleans too (a weighted
            # majority), where a plain cast would make any True win.
            np.rint(acc, out=acc)  # in place: np.rint of a 0-d array returns a numpy scalar
        out.append(np.asarray(acc.astype(first.dtype)).reshape(first.shape))
    return out


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (unlike ``==``: NaN equals NaN, 0.0 differs from -0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)
    )


def _content_key(arrays: Sequence[np.ndarray], weight: float) -> bytes:
    """A digest of one client's weight and arrays (the canonical summation order)."""
    digest = hashlib.blake2b(repr(float(weight)).encode(), digest_size=16)
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.digest()
