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

from cmd_fl.embedding import EmbeddingState
from cmd_fl.layout import ParameterLayout
from cmd_fl.sync import apply_delta, full_state
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
APF_MODEL = "apf-model"  # APF: values the receiver lacks (or trained), packed extras, index sets
CONFIG = "config"
METRICS = "metrics"

# Config and metric keys.
SERVER_ROUND = "server-round"
# The server's one query (``sample-by = "data"``): config key and value, and the reply's record
# and metric, the node's data key (`simulations.node_data.node_data_key`).
ASK = "cmd-fl-ask"
DATA_KEY = "data-key"
STATE_VERSION = "state-version"
N_MODES = "n-modes"
NUM_EXAMPLES = "num-examples"
MODEL_CHECKSUM = "model-checksum"
PROBE = "cmd-probe"  # config: train every weight and send the embedded ones too
APF_MASK_ID = "apf-mask-id"  # the id of the round's active set (the APF mask)
APF_MODEL_VERSION = "apf-model-version"  # the last round that changed the global model
APF_BASE_VERSION = "apf-base-version"  # the model version the values update; -1: a full model

_FREE = "free"
_REFS = "refs"
_EXTRAS = "extras"
_EMBEDDED = "embedded"
_VALUES = "values"
_MASK = "mask"
_SYNC = "sync"
_CODED = "coded"


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
        The dense extras (buffers) packed into one blob; a model without buffers sends none.
    embedded : ndarray, float32, or None
        Uplink of a refresh probe only: the locally trained values of the embedded weights, in
        index order, so the server can see which ones drifted off the CMD model.
    """

    free: np.ndarray
    references: np.ndarray
    extras: np.ndarray
    embedded: np.ndarray | None = None

    def to_record(self) -> ArrayRecord:
        """The model as one ArrayRecord of three (four with ``embedded``) arrays."""
        parts: dict[str, np.ndarray] = {
            _FREE: np.ascontiguousarray(self.free, dtype=np.float32),
            _REFS: np.ascontiguousarray(self.references, dtype=np.float32),
        }
        if self.extras.size:  # a model without buffers sends no empty array (~430 B each)
            parts[_EXTRAS] = np.ascontiguousarray(self.extras, dtype=np.uint8)
        if self.embedded is not None:
            parts[_EMBEDDED] = np.ascontiguousarray(self.embedded, dtype=np.float32)
        return to_array_record(parts)

    @classmethod
    def from_record(
        cls,
        record: ArrayRecord,
        n_free: int,
        n_modes: int,
        extras_bytes: int,
        n_embedded: int | None = None,
    ) -> CMDModel:
        """Read and validate a model record (keys, dtypes, lengths, finite values).

        ``n_embedded`` is given exactly when embedded values are expected (a probe reply).

        Raises
        ------
        WireFormatError
            If anything differs from what the receiver's state expects.
        """
        expected: dict[str, tuple[np.dtype | type, int | None]] = {
            _FREE: (np.dtype(np.float32), n_free),
            _REFS: (np.dtype(np.float32), n_modes),
        }
        if extras_bytes:
            expected[_EXTRAS] = (np.dtype(np.uint8), extras_bytes)
        if n_embedded is not None:
            expected[_EMBEDDED] = (np.dtype(np.float32), n_embedded)
        parts = from_array_record(record, expected)
        flat_parts(parts)
        embedded = parts[_EMBEDDED].reshape(-1) if n_embedded is not None else None
        extras = parts[_EXTRAS] if extras_bytes else np.empty(0, dtype=np.uint8)
        return cls(parts[_FREE], parts[_REFS], extras, embedded)


@dataclass(frozen=True)
class APFModel:
    """What an APF message carries in its ``apf-model`` record.

    Attributes
    ----------
    values : ndarray, float32
        Downlink: the values the receiver lacks, in flat order of the synced set (the entries
        changed since its model version; the whole flat model for a newcomer). Uplink: the
        trained values of the round's active entries, in flat order.
    extras : ndarray, uint8
        The dense extras (buffers) packed into one blob.
    mask : ndarray, uint8, or None
        Downlink only: the round's active set (``encode_index_set``), when the receiver's known
        mask is not the current one.
    sync : ndarray, uint8, or None
        Downlink only: the set of entries in ``values`` (``encode_index_set``), when it is not
        the receiver's known mask (the common case needs no index set).
    coded : ndarray, uint8, or None
        With a codec: the `cmd_fl.codec` blob of the values' *change* (uplink: trained minus
        received; downlink: new minus the receiver's), sent instead of ``values`` (then empty).
    """

    values: np.ndarray
    extras: np.ndarray
    mask: np.ndarray | None = None
    sync: np.ndarray | None = None
    coded: np.ndarray | None = None

    def to_record(self) -> ArrayRecord:
        """The model as one ArrayRecord of two to four arrays."""
        parts: dict[str, np.ndarray] = {_EXTRAS: np.ascontiguousarray(self.extras, dtype=np.uint8)}
        if self.coded is None:
            parts[_VALUES] = np.ascontiguousarray(self.values, dtype=np.float32)
        for key, blob in ((_MASK, self.mask), (_SYNC, self.sync), (_CODED, self.coded)):
            if blob is not None:
                parts[key] = np.ascontiguousarray(blob, dtype=np.uint8)
        return to_array_record(parts)

    @classmethod
    def from_record(
        cls,
        record: ArrayRecord,
        extras_bytes: int,
        n_values: int | None = None,
        index_sets: bool = False,
    ) -> APFModel:
        """Read and validate an APF record (keys, dtypes, lengths, finite values).

        Parameters
        ----------
        record : ArrayRecord
            The received record.
        extras_bytes : int
            Bytes of the packed extras.
        n_values : int or None
            Exact number of values expected; None leaves the length to the caller (a client
            knows it only once the index sets are decoded). A coded record's length is checked
            when its blob is decoded.
        index_sets : bool
            Whether ``mask`` and ``sync`` may be present (downlink). Default False (uplink).

        Raises
        ------
        WireFormatError
            If anything differs from what the receiver expects.
        """
        expected: dict[str, tuple[np.dtype | type, int | None]] = {
            _EXTRAS: (np.dtype(np.uint8), extras_bytes)
        }
        if _CODED in record:  # a coded record carries no float values
            expected[_CODED] = (np.dtype(np.uint8), None)
        else:
            expected[_VALUES] = (np.dtype(np.float32), n_values)
        if index_sets:
            for key in (_MASK, _SYNC):
                if key in record:
                    expected[key] = (np.dtype(np.uint8), None)
        parts = from_array_record(record, expected)
        optional = {
            key: parts[key].reshape(-1) if key in parts else None for key in (_MASK, _SYNC, _CODED)
        }
        values = parts.get(_VALUES, np.empty(0, dtype=np.float32))
        return cls(
            values.reshape(-1),
            parts[_EXTRAS].reshape(-1),
            mask=optional[_MASK],
            sync=optional[_SYNC],
            coded=optional[_CODED],
        )


def flat_parts(parts: dict[str, np.ndarray]) -> None:
    """Every part of a model record is a flat vector; anything else is malformed."""
    for key, value in parts.items():
        if value.ndim != 1:
            raise WireFormatError(f"part {key!r} has shape {value.shape}, expected a flat vector")


def model_checksum(flat: np.ndarray, extras_blob: np.ndarray | bytes) -> int:
    """CRC-32 of a flat float32 model and its packed extras: equal iff bitwise equal (w.h.p.)."""
    crc = zlib.crc32(np.ascontiguousarray(flat, dtype=np.float32).tobytes())
    return zlib.crc32(bytes(extras_blob), crc)


def state_checksum(layout: ParameterLayout, state: Mapping[str, Any]) -> int:
    """Checksum of a model given as a state dict (tensors or arrays), as ``model_checksum``."""
    return model_checksum(layout.flatten_numpy(state), pack_tensors(layout.extra_tensors(state)))


def save_state(store: RecordDict, key: str, state: EmbeddingState) -> None:
    """Persist a client's CMD state into a RecordDict (``context.state``), compactly."""
    store[key] = full_state(state).to_array_record(state.n_weights, state.n_modes)
    store[key + ".meta"] = ConfigRecord({N_MODES: state.n_modes})


def load_state(store: RecordDict, key: str, n_weights: int) -> EmbeddingState | None:
    """A client's CMD state from ``context.state``, or None if it has none yet."""
    if key not in store:
        return None
    meta = store.config_records[key + ".meta"]
    n_modes = int(meta[N_MODES])  # type: ignore[arg-type]
    delta = StateDelta.from_array_record(store.array_records[key], n_weights, n_modes)
    return apply_delta(None, delta, n_weights)


def extras_nbytes(specs: Sequence[tuple[tuple[int, ...], np.dtype]]) -> int:
    """Bytes of the packed extras blob for the given (shape, dtype) specs."""
    return int(
        sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for shape, dt in specs)
    )


__all__ = [
    "APFModel",
    "CMDModel",
    "WireFormatError",
    "extras_nbytes",
    "load_state",
    "model_checksum",
    "save_state",
    "state_checksum",
]
