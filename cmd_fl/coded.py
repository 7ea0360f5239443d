"""Coded uplink: a training reply that sends its update through a `cmd_fl.codec` codec.

With a codec other than ``none`` the server names it in the training message's config; the
client then replies with the *update* (trained minus received values of what it would have sent:
the whole flat model under FedAvg, free weights and references under CMD) encoded with error
feedback, plus the packed extras (buffers) as they are. The residual the codec did not send
stays in the client's ``context.state`` and is added to its next update of the same values (the
same positions of the flat model). The server knows what it sent, so it rebuilds
``received + decode(blob)`` exactly as the client's decoder does.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from cmd_fl.codec import CodecSpec, compress, decode
from cmd_fl.wire import WireFormatError, from_array_record

CODED_UPDATE = "coded-update"  # record name of a coded reply

# Train-config keys naming the codec (absent: no codec).
CODEC = "codec"
CODEC_BLOCK_SIZE = "codec-block-size"
CODEC_TOPK_FRACTION = "codec-topk-fraction"
CODEC_ERROR_FEEDBACK = "codec-error-feedback"

_UPDATE = "update"
_EXTRAS = "extras"
_RESIDUAL = "residual"
_POSITIONS = "positions-crc"  # which values the residual belongs to


def codec_config(spec: CodecSpec) -> dict[str, int | float | str]:
    """The train-config entries that tell a client which codec to use."""
    return {
        CODEC: spec.name,
        CODEC_BLOCK_SIZE: spec.block_size,
        CODEC_TOPK_FRACTION: spec.topk_fraction,
        CODEC_ERROR_FEEDBACK: int(spec.error_feedback),
    }


def codec_from_config(config: ConfigRecord) -> CodecSpec | None:
    """The codec a training message asks for, or None (reply uncoded)."""
    name = config.get(CODEC)
    if name is None or name == "none":
        return None
    return CodecSpec(  # refuses an unknown name
        name=str(name),
        block_size=int(config[CODEC_BLOCK_SIZE]),  # type: ignore[arg-type]
        topk_fraction=float(config[CODEC_TOPK_FRACTION]),  # type: ignore[arg-type]
        error_feedback=bool(int(config[CODEC_ERROR_FEEDBACK])),  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class CodedUpdate:
    """A coded reply's arrays: the codec blob of the update and the packed extras."""

    update: np.ndarray
    extras: np.ndarray

    def to_record(self) -> ArrayRecord:
        """One ArrayRecord; a model without buffers sends no extras array."""
        record = ArrayRecord({_UPDATE: Array(np.ascontiguousarray(self.update, dtype=np.uint8))})
        if self.extras.size:
            record[_EXTRAS] = Array(np.ascontiguousarray(self.extras, dtype=np.uint8))
        return record

    @classmethod
    def from_record(cls, record: ArrayRecord, extras_bytes: int) -> CodedUpdate:
        """Read and check the record's keys, dtypes and the extras' length."""
        expected: dict[str, tuple[np.dtype | type, int | None]] = {
            _UPDATE: (np.dtype(np.uint8), None)
        }
        if extras_bytes:
            expected[_EXTRAS] = (np.dtype(np.uint8), extras_bytes)
        parts = from_array_record(record, expected)
        if parts[_UPDATE].ndim != 1:
            raise WireFormatError("the coded update must be a flat byte vector")
        extras = parts[_EXTRAS].reshape(-1) if extras_bytes else np.empty(0, dtype=np.uint8)
        return cls(parts[_UPDATE], extras)

    def values(self, spec: CodecSpec, received: np.ndarray) -> np.ndarray:
        """The trained values: ``received + decode(update)``, as the sender computed them."""
        return received.astype(np.float32) + decode(self.update, spec, received.size)


def encode_update(
    store: RecordDict,
    key: str,
    spec: CodecSpec,
    received: np.ndarray,
    trained: np.ndarray,
    *,
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """Encode ``trained - received`` with the residual kept under ``key`` in ``store``.

    Parameters
    ----------
    store, key : RecordDict, str
        Where the residual lives between rounds (``context.state`` and its key).
    spec : CodecSpec
        The codec.
    received, trained : np.ndarray
        The values that travel, as received and after training.
    positions : np.ndarray or None
        Where those values sit in the flat model (CMD: the free weights, then the
        references). Default None: they are the whole flat model, in order.

    The new residual replaces the old one. The old one is added only if it belongs to the
    same values: a residual kept for other positions (warm-up to CMD, whose first state travels
    as many values in another order; an embedding event; a release) or another model is
    dropped rather than added to the wrong weights.
    """
    update = np.subtract(trained, received, dtype=np.float32)
    tag = _positions_tag(positions)
    residual = None
    if key in store.array_records:
        kept = store.array_records[key]
        if (
            _POSITIONS in kept
            and int(kept[_POSITIONS].numpy()[0]) == tag
            and kept[_RESIDUAL].shape == update.shape
        ):
            residual = kept[_RESIDUAL].numpy().astype(np.float32)
    blob, _, new_residual = compress(update, spec, residual)
    store[key] = ArrayRecord(
        {
            _RESIDUAL: Array(np.ascontiguousarray(new_residual)),
            _POSITIONS: Array(np.asarray([tag], dtype=np.int64)),
        }
    )
    return blob


def _positions_tag(positions: np.ndarray | None) -> int:
    """CRC-32 of the positions (-1: the whole model in order); equal iff equal (w.h.p.)."""
    if positions is None:
        return -1
    return zlib.crc32(np.ascontiguousarray(positions, dtype=np.int64).tobytes())


__all__ = [
    "CODED_UPDATE",
    "CodedUpdate",
    "codec_config",
    "codec_from_config",
    "encode_update",
]
