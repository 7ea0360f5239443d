"""Weighted averaging of arrays, shared by every strategy so all paths average alike."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

# Elements summed per numpy call: the float64 scratch (1 MiB) stays in cache, and no temporary
# of a whole array (the CMD free vector is nearly the whole model) is ever made.
BLOCK = 1 << 17


class RunningAverage:
    """A weighted average of lists of arrays that takes one client's list at a time.

    Memory does not grow with the number of clients: ``add`` adds ``weight * arrays`` into
    float64 sums, and keeps a copy of an array only while every client added so far sent it
    bitwise alike. ``result`` gives each average back in its input's dtype (integers and
    booleans rounded), so integer buffers such as BatchNorm's ``num_batches_tracked`` stay
    integers, and an array every client sent bitwise alike comes back bitwise as it is.

    Floating-point sums depend on the order of the terms, and a last-bit difference grows over
    rounds: callers add clients in an order fixed by their content, not by the order their
    replies arrived in, so a run with the same seed repeats bitwise (`weighted_average`,
    ``MeteredFedAvg.aggregate_train``).

    Attributes
    ----------
    count : int
        Clients added so far.
    total_weight : float
        Sum of their weights.
    """

    def __init__(self) -> None:
        self.count = 0
        self.total_weight = 0.0
        self._specs: list[tuple[tuple[int, ...], np.dtype]] = []
        self._sums: list[np.ndarray] = []
        self._alike: list[np.ndarray | None] = []
        self._scratch = np.empty(0, dtype=np.float64)

    def add(self, arrays: Sequence[np.ndarray], weight: float) -> None:
        """Add one client's arrays with ``weight`` (its number of examples).

        Every client must send the same number of arrays with the same shapes and dtypes as the
        first; a client that does not raises ``ValueError`` before anything is added.
        """
        weight = float(weight)
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be finite and non-negative, got {weight}")
        specs = [(tuple(np.shape(a)), np.asarray(a).dtype) for a in arrays]
        if not self.count:
            self._start(specs)
        elif specs != self._specs:
            raise ValueError(f"arrays {specs} differ from the first client's {self._specs}")
        for k, array in enumerate(arrays):
            kept = self._alike[k]
            if kept is None and not self.count:
                self._alike[k] = np.array(array, copy=True)
            elif kept is not None and not _bitwise_equal(kept, array):
                self._alike[k] = None  # no longer needed: its sum is already in _sums[k]
            _add_scaled(
                self._sums[k], np.ascontiguousarray(array).reshape(-1), weight, self._scratch
            )
        self.count += 1
        self.total_weight += weight

    def _start(self, specs: list[tuple[tuple[int, ...], np.dtype]]) -> None:
        self._specs = specs
        self._sums = [np.zeros(int(np.prod(shape)), dtype=np.float64) for shape, _ in specs]
        self._alike = [None] * len(specs)
        largest = max((s.size for s in self._sums), default=0)
        self._scratch = np.empty(min(largest, BLOCK), dtype=np.float64)

    def result(self) -> list[np.ndarray]:
        """The weighted averages, one array per input array, each of its input's shape and dtype.

        Raises ``ValueError`` when nothing was added or the weights sum to zero.
        """
        if not self.count:
            raise ValueError("nothing to average")
        if not self.total_weight > 0:
            raise ValueError("weights must sum to a positive number")
        out: list[np.ndarray] = []
        for (shape, dtype), sums, kept in zip(self._specs, self._sums, self._alike, strict=True):
            if kept is not None:
                # Every client sent the same values (a frozen parameter, a constant buffer):
                # keep them bitwise. sum(x * w_c) / W in float64 is not exactly x, and a
                # float64 (or int64 beyond 2**53) tensor would drift in its last bits every round.
                out.append(kept.copy())
                continue
            average = np.empty(shape, dtype=dtype)
            flat = average.reshape(-1)
            for start in range(0, sums.size, BLOCK):
                block = self._scratch[: min(BLOCK, sums.size - start)]
                np.divide(sums[start : start + block.size], self.total_weight, out=block)
                if dtype.kind in "biu":
                    # Integers are rounded, not truncated toward zero; booleans too (a weighted
                    # majority), where a plain cast would make any True win.
                    np.rint(block, out=block)
                flat[start : start + block.size] = block
            out.append(average)
        return out


def _add_scaled(sums: np.ndarray, values: np.ndarray, weight: float, scratch: np.ndarray) -> None:
    """``sums += float64(values) * weight``, block by block through ``scratch``."""
    for start in range(0, values.size, BLOCK):
        stop = min(start + BLOCK, values.size)
        block = scratch[: stop - start]
        np.multiply(values[start:stop], weight, out=block, dtype=np.float64)
        np.add(sums[start:stop], block, out=sums[start:stop])


def weighted_average(
    arrays: Sequence[Sequence[np.ndarray]], weights: Sequence[float]
) -> list[np.ndarray]:
    """Average lists of arrays, one list per client, weighted by ``weights``.

    The clients are added to a `RunningAverage` in an order fixed by a digest of their content,
    so the result does not depend on the order of ``arrays`` (bitwise).

    Parameters
    ----------
    arrays : sequence of sequences of ndarray
        ``arrays[c][k]`` is client c's k-th array; every client has the same shapes and dtypes.
    weights : sequence of float
        Non-negative weight of each client (its number of examples); they must sum to more
        than zero.
    """
    if not arrays:
        raise ValueError("nothing to average")
    if len(arrays) != len(weights):
        raise ValueError(f"{len(arrays)} clients but {len(weights)} weights")
    order = sorted(range(len(arrays)), key=lambda c: _content_key(arrays[c], weights[c]))
    average = RunningAverage()
    for c in order:
        average.add(arrays[c], weights[c])
    return average.result()


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (unlike ``==``: NaN equals NaN, 0.0 differs from -0.0)."""
    b = np.asarray(b)
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
