"""What CMD and dense messages carry: record names, the model record, checksums.

The server strategy and the client wrapper both build and read messages only through this
module, so the two sides cannot drift apart.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from cmd_fl.embedding import EmbeddingState, apply_delta
from cmd_fl.layout import ParameterLayout
from cmd_fl.wire import (
    StateDelta,
    WireFormatError,
    from_array_record,
    pack_tensors,
    to_array_record,
)

# Record names in a message's RecordDict.
DENSE_MODEL = "arrays"  # the whole model, one Array per tensor (FedAvg and CMD warm-up)
CMD_MODEL = "cmd-model"  # free vector, reference values, packed extras
CMD_STATE = "cmd-state"  # a StateDelta, only when the receiver's version is behind
CONFIG = "config"
METRICS = "metrics"

# Config and metric keys.
SERVER_ROUND = "server-round"
STATE_VERSION = "state-version"
N_MODES = "n-modes"
NUM_EXAMPLES = "num-examples"
MODEL_CHECKSUM = "model-checksum"

_FREE = "free"
_REFS = "refs"
_EXTRAS = "extras"


@dataclass(frozen=True)
class CMDModel:
    """The trained part of a CMD model as it travels.

    Attributes
    ----------
    free : ndarray, float32
        Values of the free weights (neither embedded nor references), in index order.
    references : ndarray, float32, shape (M,)
        Values of the M reference weights (the mode coefficients).
    extras : ndarray, uint8
        The dense extras (buffers) packed into one blob.
    """

    free: np.ndarray
    references: np.ndarray
    extras: np.ndarray

    def to_record(self) -> ArrayRecord:
        """The model as one ArrayRecord of three arrays."""
        return to_array_record(
            {
                _FREE: np.ascontiguousarray(self.free, dtype=np.float32),
                _REFS: np.ascontiguousarray(self.references, dtype=np.float32),
                _EXTRAS: np.ascontiguousarray(self.extras, dtype=np.uint8),
            }
        )

    @classmethod
    def from_record(
        cls, record: ArrayRecord, n_free: int, n_modes: int, extras_bytes: int
    ) -> CMDModel:
        """Read and validate a model record (keys, dtypes, lengths, finite values).

        Raises
        ------
        WireFormatError
            If anything differs from what the receiver's state expects.
        """
        parts = from_array_record(
            record,
            {
                _FREE: (np.dtype(np.float32), n_free),
                _REFS: (np.dtype(np.float32), n_modes),
                _EXTRAS: (np.dtype(np.uint8), extras_bytes),
            },
        )
        return cls(parts[_FREE].reshape(-1), parts[_REFS].reshape(-1), parts[_EXTRAS].reshape(-1))


def model_checksum(flat: np.ndarray, extras_blob: np.ndarray | bytes) -> int:
    """CRC-32 of a flat float32 model and its packed extras: equal iff bitwise equal (w.h.p.)."""
    crc = zlib.crc32(np.ascontiguousarray(flat, dtype=np.float32).tobytes())
    return zlib.crc32(bytes(extras_blob), crc)


def state_checksum(layout: ParameterLayout, state: Mapping[str, Any]) -> int:
    """Checksum of a model given as a state dict (tensors or arrays), as ``model_checksum``."""
    return model_checksum(layout.flatten_numpy(state), pack_tensors(layout.extra_tensors(state)))


def save_state(store: RecordDict, key: str, state: EmbeddingState) -> None:
    """Persist a client's CMD state into a RecordDict (``context.state``), compactly."""
    emb = state.embedded_indices
    full = StateDelta(
        from_version=0,
        to_version=state.version,
        embed_indices=emb,
        embed_a=state.frozen_a[emb],
        embed_b=state.frozen_b[emb],
        modes=state.modes,
        references=state.references,
    )
    store[key] = full.to_array_record(state.n_weights, state.n_modes)
    store[key + ".meta"] = ConfigRecord({N_MODES: state.n_modes})


def load_state(store: RecordDict, key: str, n_weights: int) -> EmbeddingState | None:
    """A client's CMD state from ``context.state``, or None if it has none yet."""
    if key not in store:
        return None
    meta = store.config_records[key + ".meta"]
    n_modes = int(meta[N_MODES])  # type: ignore[arg-type]
    delta = StateDelta.from_array_record(store.array_records[key], n_weights, n_modes)
    return apply_delta(None, delta)


def extras_nbytes(specs: Sequence[tuple[tuple[int, ...], np.dtype]]) -> int:
    """Bytes of the packed extras blob for the given (shape, dtype) specs."""
    return int(
        sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for shape, dt in specs)
    )


__all__ = [
    "CMDModel",
    "WireFormatError",
    "extras_nbytes",
    "load_state",
    "model_checksum",
    "save_state",
    "state_checksum",
]
