"""Wire format: how index sets, tensors and CMD state are packed into Flower records.

Everything cmd-fl sends between server and clients is built and read here, so the two sides
share one definition of each byte. Readers validate strictly and raise `WireFormatError` on
anything malformed: a bad reply must be dropped, never averaged.

Why pack: in Flower 1.42 every `Array` costs 128 B of ``.npy`` header in the payload, about
315 B more of serialized objects (the Array, its chunk header, its entry in the record) and
about 140 B (down) to 270 B (up) of Fleet API control bytes: about 0.6 KB per Array beyond its
data (see `cmd_fl.ledger`). Small parts therefore travel together in one ``uint8`` blob.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = [
    "A_GRID_STEP",
    "MAX_INDEX_UNIVERSE",
    "MAX_MODES",
    "StateDelta",
    "WireFormatError",
    "decode_index_set",
    "encode_index_set",
    "encode_mode_ids",
    "from_array_record",
    "mode_id_bits",
    "nearest_float16",
    "pack_mode_ids",
    "pack_tensors",
    "snap_to_a_grid",
    "to_array_record",
    "unpack_mode_ids",
    "unpack_tensors",
]

MAX_MODES = 255
"""Largest number of CMD modes: mode ids travel as ``uint8``."""

MAX_INDEX_UNIVERSE = 2**32
"""Largest universe of an index set (4.3 G weights); keeps varint arithmetic inside uint64."""

_TAG_BITMAP = 0
_TAG_VARINT = 1
_TAG_ELIAS_FANO = 2
_MAX_VARINT_BYTES = 5  # ceil(32 / 7): enough for any value below MAX_INDEX_UNIVERSE

# StateDelta blob: format version, coefficient width (bytes), from/to versions, then the byte
# length of each part (mode ids of the embedded weights, references, embed, release, refit).
_STATE_FORMAT = 4
_STATE_HEADER = struct.Struct("<BBqqQQQQQ")
_COEFFICIENT_DTYPES: dict[int, np.dtype] = {4: np.dtype("<f4"), 2: np.dtype("<f2")}
_GRID_WIDTH = 1  # width code: a as one-byte grid codes (float16 escapes), b in float16
_STATE_KEY = "cmd-state"

A_GRID_STEP = 1.0 / 32.0
"""Step of the one-byte grid for the coefficient ``a``: ``a = k * A_GRID_STEP``, ``|k| <= 127``
(``|a| <= 3.97``). A power of two, so every grid value is exact in float32 and float16."""
_A_ESCAPE = -128  # grid code of an ``a`` off the grid: its float16 value follows the codes


class WireFormatError(ValueError):
    """Raised when received bytes or records do not follow the cmd-fl wire format."""


# --------------------------------------------------------------------------- index sets


def _check_universe(universe: int) -> int:
    if isinstance(universe, bool) or not isinstance(universe, (int, np.integer)):
        raise TypeError(f"universe must be an int, got {type(universe).__name__}")
    universe = int(universe)
    if not 0 <= universe <= MAX_INDEX_UNIVERSE:
        raise ValueError(f"universe must be in [0, {MAX_INDEX_UNIVERSE}], got {universe}")
    return universe


def _varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128-encode ``uint64`` values below ``2**35``, vectorized."""
    if values.size == 0:
        return np.empty(0, dtype=np.uint8)
    n_bytes = np.ones(values.shape, dtype=np.int64)
    for k in range(1, _MAX_VARINT_BYTES):
        n_bytes += values >= np.uint64(1 << (7 * k))
    starts = np.cumsum(n_bytes) - n_bytes
    out = np.empty(int(n_bytes.sum()), dtype=np.uint8)
    for k in range(int(n_bytes.max())):
        has_byte = n_bytes > k
        chunk = (values[has_byte] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (n_bytes[has_byte] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has_byte] + k] = (chunk | more).astype(np.uint8)
    return out


def _varint_decode(data: np.ndarray) -> np.ndarray:
    """Decode a canonical LEB128 stream into ``uint64`` values, strictly."""
    if data.size == 0:
        return np.empty(0, dtype=np.uint64)
    is_last = (data & 0x80) == 0
    if not is_last[-1]:
        raise WireFormatError("index set is truncated: the last varint has its continuation bit")
    ends = np.flatnonzero(is_last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    n_bytes = ends - starts + 1
    if int(n_bytes.max()) > _MAX_VARINT_BYTES:
        raise WireFormatError(f"index set has a varint longer than {_MAX_VARINT_BYTES} bytes")
    if np.any((n_bytes > 1) & (data[ends] == 0)):
        raise WireFormatError("index set has a non-canonical varint (trailing zero byte)")
    values = np.zeros(ends.size, dtype=np.uint64)
    for k in range(int(n_bytes.max())):
        has_byte = n_bytes > k
        chunk = data[starts[has_byte] + k].astype(np.uint64) & np.uint64(0x7F)
        values[has_byte] |= chunk << np.uint64(7 * k)
    return values


def _as_index_array(indices: np.ndarray, universe: int, what: str) -> np.ndarray:
    """Return `indices` as int64, checking it is a strictly increasing set in [0, universe)."""
    arr = np.asarray(indices)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must have an integer dtype, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        if arr[0] < 0 or arr[-1] >= universe:
            raise ValueError(f"{what} must lie in [0, {universe})")
        if np.any(np.diff(arr) <= 0):
            raise ValueError(f"{what} must be strictly increasing (sorted, unique)")
    return arr


def encode_index_set(indices: np.ndarray, universe: int) -> np.ndarray:
    """Encode a set of indices in ``[0, universe)`` into the smallest of three forms.

    The first byte is a tag. Tag 0: a bitmap of ``ceil(universe / 8)`` bytes (bit ``i % 8`` of
    byte ``i // 8`` is set when ``i`` is in the set). Tag 1: LEB128 varints of the first index
    and of the gaps between consecutive indices. Tag 2: Elias-Fano (`_elias_fano_encode`),
    about ``2 + log2(universe / n)`` bits per index, the smallest for sets of a few percent of
    the universe. On a tie the earlier tag is used.

    Parameters
    ----------
    indices : np.ndarray
        Strictly increasing (sorted, unique) integer indices, 1-D; may be empty.
    universe : int
        Size of the index space, ``0 <= universe <= MAX_INDEX_UNIVERSE``. Both sides know it.

    Returns
    -------
    np.ndarray
        The encoding, ``uint8``, 1-D.

    Raises
    ------
    ValueError
        If `indices` is not a sorted set of integers in ``[0, universe)``.
    """
    universe = _check_universe(universe)
    arr = _as_index_array(indices, universe, "indices")
    bitmap_size = (universe + 7) // 8
    gaps = np.diff(arr, prepend=0).astype(np.uint64)
    varints = _varint_encode(gaps)
    elias_fano_size = _elias_fano_size(arr.size, universe)
    if bitmap_size <= min(varints.size, elias_fano_size):
        bits = np.zeros(universe, dtype=np.uint8)
        bits[arr] = 1
        body = np.packbits(bits, bitorder="little")
        return np.concatenate(([np.uint8(_TAG_BITMAP)], body)).astype(np.uint8)
    if varints.size <= elias_fano_size:
        return np.concatenate(([np.uint8(_TAG_VARINT)], varints)).astype(np.uint8)
    return np.concatenate(([np.uint8(_TAG_ELIAS_FANO)], _elias_fano_encode(arr, universe)))


def _elias_fano_low_bits(count: int, universe: int) -> int:
    """Low bits per index of an Elias-Fano set: ``floor(log2(universe / count))``, at least 0."""
    if count == 0 or universe <= count:
        return 0
    return (universe // count).bit_length() - 1


def _elias_fano_upper_bits(count: int, universe: int, low: int) -> int:
    """Length of an Elias-Fano set's upper bit vector: one bit per index and one per bucket
    of ``2**low`` values (``count`` for an empty universe: ``(-1 >> low) == -1``)."""
    return count + ((universe - 1) >> low) + 1


def _elias_fano_size(count: int, universe: int) -> int:
    """Bytes of `_elias_fano_encode`'s body for ``count`` indices in ``[0, universe)``."""
    low = _elias_fano_low_bits(count, universe)
    upper_bits = _elias_fano_upper_bits(count, universe, low)
    head = _varint_encode(np.array([count], dtype=np.uint64)).size + 1
    return head + (count * low + 7) // 8 + (upper_bits + 7) // 8


def _elias_fano_encode(arr: np.ndarray, universe: int) -> np.ndarray:
    """Elias-Fano body: the low-bit count ``L`` (one byte), the number of indices (a varint),
    the ``L`` low bits of every index packed little-endian, then the upper bit vector: index
    ``i`` sets bit ``(x_i >> L) + i``; it has ``count + ((universe - 1) >> L) + 1`` bits."""
    count = arr.size
    low = _elias_fano_low_bits(count, universe)
    head = np.concatenate(
        ([np.uint8(low)], _varint_encode(np.array([count], dtype=np.uint64)))
    ).astype(np.uint8)
    low_bits = ((arr[:, None] >> np.arange(low, dtype=np.int64)) & 1).astype(np.uint8)
    upper = np.zeros(_elias_fano_upper_bits(count, universe, low), dtype=np.uint8)
    upper[(arr >> low) + np.arange(count, dtype=np.int64)] = 1
    return np.concatenate(
        (
            head,
            np.packbits(low_bits.reshape(-1), bitorder="little"),
            np.packbits(upper, bitorder="little"),
        )
    ).astype(np.uint8)


def _elias_fano_decode(body: np.ndarray, universe: int) -> np.ndarray:
    """Read an Elias-Fano body (`_elias_fano_encode`), validating every length and bit."""
    if body.size < 2:
        raise WireFormatError("Elias-Fano index set is truncated in its header")
    low = int(body[0])
    ends = np.flatnonzero((body[1 : 1 + _MAX_VARINT_BYTES] & 0x80) == 0)
    if not ends.size:
        raise WireFormatError("Elias-Fano index set has a malformed count")
    count = int(_varint_decode(body[1 : 2 + int(ends[0])])[0])
    if count > universe:
        raise WireFormatError(f"index set has {count} entries, universe is {universe}")
    if low != _elias_fano_low_bits(count, universe):
        raise WireFormatError(f"Elias-Fano index set has {low} low bits, not the canonical")
    expected = _elias_fano_size(count, universe)
    if body.size != expected:
        raise WireFormatError(
            f"Elias-Fano index set has {body.size} bytes, expected {expected} for {count} indices"
        )
    cursor = 2 + int(ends[0])
    n_low_bytes = (count * low + 7) // 8
    low_bits = np.unpackbits(body[cursor : cursor + n_low_bytes], bitorder="little")
    if np.any(low_bits[count * low :]):
        raise WireFormatError("Elias-Fano index set has padding bits set")
    n_upper = _elias_fano_upper_bits(count, universe, low)
    upper = np.unpackbits(body[cursor + n_low_bytes :], bitorder="little")
    if np.any(upper[n_upper:]):
        raise WireFormatError("Elias-Fano index set has padding bits set")
    ones = np.flatnonzero(upper[:n_upper])
    if ones.size != count:
        raise WireFormatError(f"Elias-Fano index set has {ones.size} upper bits for {count}")
    weights = np.int64(1) << np.arange(low, dtype=np.int64)
    lows = low_bits[: count * low].reshape(count, low).astype(np.int64) @ weights
    indices = ((ones - np.arange(count, dtype=np.int64)) << low) | lows
    if indices.size and (int(indices[-1]) >= universe or np.any(np.diff(indices) <= 0)):
        raise WireFormatError("Elias-Fano index set is not a strictly increasing set in range")
    return indices.astype(np.int64)


def decode_index_set(blob: np.ndarray | bytes, universe: int) -> np.ndarray:
    """Decode an index set written by `encode_index_set`, validating it strictly.

    Parameters
    ----------
    blob : np.ndarray | bytes
        The encoding (``uint8`` array or bytes).
    universe : int
        Size of the index space the set was encoded for.

    Returns
    -------
    np.ndarray
        The indices, ``int64``, strictly increasing.

    Raises
    ------
    WireFormatError
        On an empty blob, an unknown tag, a bitmap of the wrong length or with bits set past
        `universe`, a truncated or non-canonical varint, a zero gap (non-increasing) or an index
        outside ``[0, universe)``.
    """
    universe = _check_universe(universe)
    data = _as_byte_array(blob, "index set")
    if data.size == 0:
        raise WireFormatError("index set is empty: the tag byte is missing")
    tag, body = int(data[0]), data[1:]
    if tag == _TAG_BITMAP:
        expected = (universe + 7) // 8
        if body.size != expected:
            raise WireFormatError(
                f"index set bitmap has {body.size} bytes, expected {expected} "
                f"for universe {universe}"
            )
        bits = np.unpackbits(body, bitorder="little")
        if np.any(bits[universe:]):
            raise WireFormatError(f"index set bitmap has bits set at or beyond {universe}")
        return np.flatnonzero(bits[:universe]).astype(np.int64)
    if tag == _TAG_VARINT:
        gaps = _varint_decode(body)
        if gaps.size > universe:
            raise WireFormatError(f"index set has {gaps.size} entries, universe is {universe}")
        if gaps.size > 1 and np.any(gaps[1:] == 0):
            raise WireFormatError("index set is not strictly increasing (zero gap)")
        # Each gap < 2**35 and there are at most 2**32 of them: the sum stays inside uint64.
        indices = np.cumsum(gaps, dtype=np.uint64)
        if indices.size and int(indices[-1]) >= universe:
            raise WireFormatError(f"index set has an index >= universe {universe}")
        return indices.astype(np.int64)
    if tag == _TAG_ELIAS_FANO:
        return _elias_fano_decode(body, universe)
    raise WireFormatError(f"index set has unknown tag {tag}")


def _as_byte_array(blob: np.ndarray | bytes, what: str) -> np.ndarray:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return np.frombuffer(blob, dtype=np.uint8)
    arr = np.asarray(blob)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise WireFormatError(f"{what} must be a 1-D uint8 array, got {arr.dtype} {arr.shape}")
    return arr


# --------------------------------------------------------------------------- mode ids


def encode_mode_ids(modes: np.ndarray, n_modes: int) -> np.ndarray:
    """Return mode ids as ``uint8`` after checking they lie in ``[0, n_modes)``.

    Parameters
    ----------
    modes : np.ndarray
        Integer mode id of each weight, 1-D.
    n_modes : int
        Number of modes M, ``1 <= M <= MAX_MODES``.

    Returns
    -------
    np.ndarray
        The ids, ``uint8``.

    Raises
    ------
    ValueError
        If M exceeds `MAX_MODES` or an id is outside ``[0, n_modes)``.
    """
    if not 1 <= n_modes <= MAX_MODES:
        raise ValueError(f"n_modes must be in [1, {MAX_MODES}] (uint8 ids), got {n_modes}")
    arr = np.asarray(modes)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"modes must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= n_modes):
        raise ValueError(f"mode ids must lie in [0, {n_modes})")
    return arr.astype(np.uint8)


def mode_id_bits(n_modes: int) -> int:
    """Bits per mode id on the wire: the smallest of 1, 2, 4, 8 that holds ``n_modes`` ids."""
    if not 1 <= n_modes <= MAX_MODES:
        raise ValueError(f"n_modes must be in [1, {MAX_MODES}], got {n_modes}")
    return next(bits for bits in (1, 2, 4, 8) if n_modes <= 2**bits)


def pack_mode_ids(modes: np.ndarray, n_modes: int) -> bytes:
    """Pack mode ids at `mode_id_bits` bits each (little-endian within a byte, zero padding).

    Parameters
    ----------
    modes : np.ndarray
        Mode id of each weight, 1-D, in ``[0, n_modes)``.
    n_modes : int
        Number of modes M.
    """
    ids = encode_mode_ids(modes, n_modes)
    bits = mode_id_bits(n_modes)
    if bits == 8:
        return ids.tobytes()
    per_byte = 8 // bits
    padded = np.zeros(-(-ids.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: ids.size] = ids
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    groups = padded.reshape(-1, per_byte) << shifts
    return np.bitwise_or.reduce(groups, axis=1).astype(np.uint8).tobytes()


def unpack_mode_ids(data: np.ndarray | bytes, n_weights: int, n_modes: int) -> np.ndarray:
    """Read mode ids written by `pack_mode_ids`, validating them strictly.

    Raises
    ------
    WireFormatError
        On a wrong length, padding bits that are set, or an id ``>= n_modes``.
    """
    raw = _as_byte_array(data, "mode ids")
    bits = mode_id_bits(n_modes)
    per_byte = 8 // bits
    expected = -(-n_weights // per_byte)
    if raw.size != expected:
        raise WireFormatError(
            f"mode ids take {raw.size} bytes, expected {expected} for {n_weights} weights "
            f"at {bits} bits"
        )
    if bits == 8:
        ids = raw.copy()
    else:
        shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
        mask = np.uint8(2**bits - 1)
        ids = ((raw[:, None] >> shifts) & mask).astype(np.uint8).reshape(-1)
        if np.any(ids[n_weights:]):
            raise WireFormatError("mode ids have padding bits set")
        ids = ids[:n_weights].copy()
    if ids.size and int(ids.max()) >= n_modes:
        raise WireFormatError(f"a mode id is >= n_modes {n_modes}")
    return ids


# --------------------------------------------------------------------------- coefficients


def nearest_float16(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to float16 and back (float32), where float16 can hold them."""
    with np.errstate(over="ignore"):
        rounded = np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float32)
    return np.where(np.isfinite(rounded), rounded, values).astype(np.float32)


def snap_to_a_grid(a: np.ndarray) -> np.ndarray:
    """``a`` on the one-byte grid (`A_GRID_STEP`) where it fits, else to the nearest float16.

    What the server stores when states travel in the compact form; the wire then carries each
    ``a`` in one byte (an off-grid one in three).
    """
    a32 = np.asarray(a, dtype=np.float32)
    codes = np.rint(a32 / np.float32(A_GRID_STEP))
    on_grid = np.abs(codes) <= 127
    # + 0.0 turns -0.0 (a small negative a) into the 0.0 that code 0 decodes to.
    grid = codes * np.float32(A_GRID_STEP) + np.float32(0.0)
    return np.where(on_grid, grid, nearest_float16(a32)).astype(np.float32)


def _grid_codes(a: np.ndarray) -> np.ndarray | None:
    """One-byte codes of ``a`` (`_A_ESCAPE` where off the grid), or None if an off-grid value
    is not a float16."""
    scaled = a / np.float32(A_GRID_STEP)  # exact: a power-of-two division
    on_grid = (np.rint(scaled) == scaled) & (np.abs(scaled) <= 127)
    if not _exact_in_float16(a[~on_grid]):
        return None
    return np.where(on_grid, scaled, _A_ESCAPE).astype(np.int8)


def _coefficient_width(a: np.ndarray, b_parts: Sequence[np.ndarray]) -> int:
    """The smallest lossless width code for a state's coefficients: 1, 2 or 4."""
    if not all(_exact_in_float16(v) for v in b_parts):
        return 4
    codes = _grid_codes(a)
    if codes is not None and 2 * int(np.count_nonzero(codes == _A_ESCAPE)) < a.size:
        return _GRID_WIDTH
    return 2 if _exact_in_float16(a) else 4


# --------------------------------------------------------------------------- dense tensors


def _little_endian(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.byteorder != "|" else dtype


def pack_tensors(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate the raw bytes of `arrays` (C order, little-endian) into one blob.

    The receiver must know each array's shape and dtype (e.g. from the model layout) and
    passes them to `unpack_tensors`.

    Parameters
    ----------
    arrays : Sequence[np.ndarray]
        Numeric or boolean arrays, any shape including 0-d.

    Returns
    -------
    np.ndarray
        ``uint8`` blob, 1-D.
    """
    parts: list[np.ndarray] = []
    for i, array in enumerate(arrays):
        arr = np.asarray(array)
        if arr.dtype.hasobject or arr.dtype.kind not in "biufc":
            raise ValueError(f"tensor {i} has unsupported dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=_little_endian(arr.dtype))
        parts.append(arr.reshape(-1).view(np.uint8))
    if not parts:
        return np.empty(0, dtype=np.uint8)
    return np.concatenate(parts)


def unpack_tensors(
    blob: np.ndarray | bytes, specs: Sequence[tuple[tuple[int, ...], np.dtype]]
) -> list[np.ndarray]:
    """Split a blob written by `pack_tensors` back into arrays.

    Parameters
    ----------
    blob : np.ndarray | bytes
        The packed bytes.
    specs : Sequence[tuple[tuple[int, ...], np.dtype]]
        ``(shape, dtype)`` of each array, in packing order.

    Returns
    -------
    list[np.ndarray]
        Fresh (writable, native byte order) arrays with the given shapes and dtypes.

    Raises
    ------
    WireFormatError
        If the blob length differs from what the specs require.
    """
    data = _as_byte_array(blob, "tensor blob")
    dtypes = [np.dtype(dtype) for _, dtype in specs]
    shapes = [tuple(shape) for shape, _ in specs]
    sizes = [
        int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        for shape, dt in zip(shapes, dtypes, strict=True)
    ]
    if sum(sizes) != data.size:
        raise WireFormatError(
            f"tensor blob has {data.size} bytes, the {len(specs)} specs need {sum(sizes)}"
        )
    out: list[np.ndarray] = []
    offset = 0
    for shape, dtype, size in zip(shapes, dtypes, sizes, strict=True):
        chunk = data[offset : offset + size]
        arr = chunk.view(_little_endian(dtype)).astype(dtype).reshape(shape)
        out.append(arr)
        offset += size
    return out


# --------------------------------------------------------------------------- records


def to_array_record(parts: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap named arrays in a Flower `ArrayRecord`, keeping dtype and shape (0-d included).

    Values are not checked for finiteness here: the receiver validates (`from_array_record`),
    so a diverged client's reply is rejected by the server rather than crashing the client.

    Parameters
    ----------
    parts : Mapping[str, np.ndarray]
        Record key -> numeric or boolean array.

    Returns
    -------
    ArrayRecord
        One `flwr.app.Array` per key, in the order of `parts`.
    """
    arrays: dict[str, Array] = {}
    for key, value in parts.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"record keys must be non-empty strings, got {key!r}")
        arr = np.asarray(value)
        if arr.dtype.hasobject or arr.dtype.kind not in "biufc":
            raise ValueError(f"part {key!r} has unsupported dtype {arr.dtype}")
        arrays[key] = Array(arr)
    return ArrayRecord(arrays)


def from_array_record(
    record: ArrayRecord, expected: Mapping[str, tuple[np.dtype | type, int | None]]
) -> dict[str, np.ndarray]:
    """Read and validate the arrays of a received `ArrayRecord`.

    Parameters
    ----------
    record : ArrayRecord
        The received record.
    expected : Mapping[str, tuple[np.dtype | type, int | None]]
        Key -> ``(dtype, length)``: the record must hold exactly these keys, each array of
        exactly this dtype and, when `length` is not None, of this many elements (flattened).

    Returns
    -------
    dict[str, np.ndarray]
        Key -> array as sent (shape kept), in the order of `expected`.

    Raises
    ------
    WireFormatError
        On missing or unknown keys, an undecodable array, a dtype or length mismatch, or a
        NaN/Inf in a floating-point array. The message names the offending key.
    """
    if not isinstance(record, ArrayRecord):
        raise WireFormatError(f"expected an ArrayRecord, got {type(record).__name__}")
    missing = [key for key in expected if key not in record]
    unknown = [key for key in record if key not in expected]
    if missing or unknown:
        raise WireFormatError(f"record keys differ: missing {missing}, unknown {unknown}")
    out: dict[str, np.ndarray] = {}
    for key, (dtype, length) in expected.items():
        item = record[key]
        try:
            arr = item.numpy()
        except (TypeError, ValueError, EOFError, OSError) as err:
            raise WireFormatError(f"part {key!r} cannot be decoded: {err}") from err
        if tuple(item.shape) != arr.shape:
            raise WireFormatError(
                f"part {key!r} declares shape {tuple(item.shape)} but holds {arr.shape}"
            )
        if arr.dtype != np.dtype(dtype):
            raise WireFormatError(f"part {key!r} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        if length is not None and arr.size != length:
            raise WireFormatError(f"part {key!r} has {arr.size} elements, expected {length}")
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            raise WireFormatError(f"part {key!r} has non-finite values (NaN or Inf)")
        out[key] = arr
    return out


# --------------------------------------------------------------------------- CMD state


def _empty_indices() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


@dataclass(frozen=True, eq=False, kw_only=True)
class StateDelta:
    """What a client needs to move its CMD state from one version to another.

    A *full state* (``from_version == 0``: the client knows nothing) carries the reference
    weight of every mode, plus every weight embedded so far. A delta between two known versions
    carries only the embedding changes. An empty delta has ``from_version == to_version``.
    Mode ids travel only with the weights a delta embeds: a client needs the mode of an
    embedded weight alone (a free weight is sent as its value), so the ids of free weights,
    most of the model early in the embedding, never cross the network.

    Parameters
    ----------
    from_version : int
        State version the client holds (0: none).
    to_version : int
        State version after applying the delta, ``>= from_version``.
    embed_indices : np.ndarray
        Weights embedded since `from_version`, ``int64``, strictly increasing.
    embed_a : np.ndarray
        Frozen scale ``a`` of each embedded weight, ``float32``, same length.
    embed_b : np.ndarray
        Frozen offset ``b`` of each embedded weight, ``float32``, same length.
    embed_modes : np.ndarray, default empty
        Mode id of each embedded weight, ``uint8``, same length.
    release_indices : np.ndarray, default empty
        Weights un-embedded since `from_version` (they travel in the free vector again),
        ``int64``, strictly increasing, disjoint from `embed_indices`; empty in a full state.
    references : np.ndarray | None, default None
        Index of the reference weight of each mode (``references[m]`` belongs to mode ``m``),
        ``int64``, length M; only in a full state.
    refit_indices : np.ndarray, default empty
        Weights that stay embedded with the same ``a`` and a new offset ``b`` (a refresh
        re-fit), ``int64``, strictly increasing, disjoint from the other sets; not in a full
        state.
    refit_b : np.ndarray, default empty
        The new offset of each re-fit weight, ``float32``.

    On the wire mode ids take `mode_id_bits` bits each and references 4 bytes each, in mode
    order. The coefficients take the fewest
    bytes that carry them exactly: ``a`` one byte on the `A_GRID_STEP` grid and ``b`` two, when
    the server snapped them so (`EmbeddingState.a_on_grid`); two each when all are float16
    (`EmbeddingState.round_coefficients`); else four.
    """

    from_version: int
    to_version: int
    embed_indices: np.ndarray
    embed_a: np.ndarray
    embed_b: np.ndarray
    embed_modes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint8))
    release_indices: np.ndarray = field(default_factory=_empty_indices)
    references: np.ndarray | None = None
    refit_indices: np.ndarray = field(default_factory=_empty_indices)
    refit_b: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))

    @property
    def is_full(self) -> bool:
        """Whether this is a full state (the client starts from nothing)."""
        return self.from_version == 0 and self.to_version > 0

    def validate(self, n_weights: int, n_modes: int) -> None:
        """Check the delta against the model's CMD sizes.

        Parameters
        ----------
        n_weights : int
            Number of CMD weights N.
        n_modes : int
            Number of modes M.

        Raises
        ------
        WireFormatError
            On any inconsistency; the message says which.
        """
        _validate_state(self, n_weights, n_modes)

    def to_array_record(self, n_weights: int, n_modes: int) -> ArrayRecord:
        """Validate the delta and pack it into a one-array `ArrayRecord`.

        Index sets travel in the compact `encode_index_set` form, the coefficients as raw
        float16 when that is lossless for all of them, else float32, everything in a single
        ``uint8`` blob (one `Array`: one npy header).

        Parameters
        ----------
        n_weights : int
            Number of CMD weights N (the universe of every index set).
        n_modes : int
            Number of modes M.

        Returns
        -------
        ArrayRecord
            Record to place in the message content; read it back with `from_array_record`.

        Raises
        ------
        WireFormatError
            If the delta is inconsistent (see `validate`).
        """
        _validate_state(self, n_weights, n_modes)
        modes = pack_mode_ids(self.embed_modes, n_modes) if self.embed_indices.size else b""
        refs = b"" if self.references is None else self.references.astype("<u4").tobytes()
        embed = _encode_set(self.embed_indices, n_weights)
        release = _encode_set(self.release_indices, n_weights)
        refit = _encode_set(self.refit_indices, n_weights)
        a_values, b_values, refit_values = (
            np.asarray(v) for v in (self.embed_a, self.embed_b, self.refit_b)
        )
        width = _coefficient_width(a_values, (b_values, refit_values))
        header = _STATE_HEADER.pack(
            _STATE_FORMAT,
            width,
            int(self.from_version),
            int(self.to_version),
            len(modes),
            len(refs),
            len(embed),
            len(release),
            len(refit),
        )
        if width == _GRID_WIDTH:
            codes = _grid_codes(a_values)
            assert codes is not None  # _coefficient_width checked it
            off_grid = a_values[codes == _A_ESCAPE].astype("<f2")
            a, dtype = codes.tobytes() + off_grid.tobytes(), _COEFFICIENT_DTYPES[2]
        else:
            dtype = _COEFFICIENT_DTYPES[width]
            a = a_values.astype(dtype).tobytes()
        b, refit_b = (v.astype(dtype).tobytes() for v in (b_values, refit_values))
        blob = b"".join((header, modes, refs, embed, a, b, release, refit, refit_b))
        return to_array_record({_STATE_KEY: np.frombuffer(blob, dtype=np.uint8)})

    @classmethod
    def from_array_record(cls, record: ArrayRecord, n_weights: int, n_modes: int) -> StateDelta:
        """Read and validate a delta written by `to_array_record`.

        Parameters
        ----------
        record : ArrayRecord
            The received record.
        n_weights : int
            Number of CMD weights N (the universe of every index set).
        n_modes : int
            Number of modes M.

        Returns
        -------
        StateDelta
            The validated delta.

        Raises
        ------
        WireFormatError
            If the record or its blob is malformed or inconsistent with N and M.
        """
        blob = from_array_record(record, {_STATE_KEY: (np.dtype(np.uint8), None)})[_STATE_KEY]
        data = blob.reshape(-1)
        if data.size < _STATE_HEADER.size:
            raise WireFormatError(f"state blob has {data.size} bytes, header needs more")
        header = _STATE_HEADER.unpack(data[: _STATE_HEADER.size].tobytes())
        fmt, width, from_v, to_v, n_mode_bytes, n_ref, n_embed, n_release, n_refit = header
        if fmt != _STATE_FORMAT:
            raise WireFormatError(f"state blob has format {fmt}, expected {_STATE_FORMAT}")
        if width not in (_GRID_WIDTH, *_COEFFICIENT_DTYPES):
            raise WireFormatError(f"state blob has coefficient width {width}, not 1, 2 or 4")
        dtype = _COEFFICIENT_DTYPES[2 if width == _GRID_WIDTH else width]
        cursor = _STATE_HEADER.size

        def take(size: int, what: str) -> np.ndarray:
            nonlocal cursor
            if size > data.size - cursor:
                raise WireFormatError(f"state blob is truncated in {what}")
            part = data[cursor : cursor + size]
            cursor += size
            return part

        universe = _check_universe(n_weights)
        packed_modes = take(n_mode_bytes, "mode ids")
        references = None
        if n_ref:
            if n_ref != 4 * n_modes:
                raise WireFormatError(f"state has {n_ref} bytes of references, not 4 x {n_modes}")
            references = take(n_ref, "references").view("<u4").astype(np.int64)

        def coefficients(count: int, what: str) -> np.ndarray:
            raw = take(dtype.itemsize * count, what)
            return raw.view(dtype).astype(np.float32)

        embed = decode_index_set(take(n_embed, "embed indices"), universe)
        if embed.size:
            embed_modes = unpack_mode_ids(packed_modes, embed.size, n_modes)
        elif n_mode_bytes:
            raise WireFormatError("state has mode ids but embeds no weight")
        else:
            embed_modes = np.empty(0, dtype=np.uint8)
        if width == _GRID_WIDTH:
            codes = take(embed.size, "grid codes of a").view(np.int8)
            off_grid = codes == _A_ESCAPE
            a = codes.astype(np.float32) * np.float32(A_GRID_STEP)
            a[off_grid] = coefficients(int(np.count_nonzero(off_grid)), "off-grid a")
        else:
            a = coefficients(embed.size, "coefficients a")
        b = coefficients(embed.size, "coefficients b")
        release = decode_index_set(take(n_release, "release indices"), universe)
        refit = decode_index_set(take(n_refit, "refit indices"), universe)
        refit_b = coefficients(refit.size, "refit offsets")
        if cursor != data.size:
            raise WireFormatError(f"state blob has {data.size - cursor} trailing bytes")
        delta = cls(
            from_version=from_v,
            to_version=to_v,
            embed_indices=embed,
            embed_a=a,
            embed_b=b,
            embed_modes=embed_modes,
            release_indices=release,
            references=references,
            refit_indices=refit,
            refit_b=refit_b,
        )
        _validate_state(delta, universe, n_modes)
        return delta


def _exact_in_float16(values: np.ndarray) -> bool:
    """Whether float16 holds every value exactly (then the coefficients travel in 2 bytes)."""
    with np.errstate(over="ignore"):
        return bool(np.array_equal(values.astype(np.float16).astype(np.float32), values))


def _encode_set(indices: np.ndarray, universe: int) -> bytes:
    """Encode validated (sorted) indices as an index set."""
    return encode_index_set(np.asarray(indices, dtype=np.int64), universe).tobytes()


def _validate_state(delta: StateDelta, n_weights: int, n_modes: int) -> None:
    """Check a `StateDelta` against N weights and M modes; raise WireFormatError if invalid."""
    if not 1 <= n_modes <= MAX_MODES:
        raise WireFormatError(f"n_modes must be in [1, {MAX_MODES}], got {n_modes}")
    for name in ("from_version", "to_version"):
        value = getattr(delta, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise WireFormatError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= delta.from_version <= delta.to_version < 2**63:
        raise WireFormatError(
            f"versions must satisfy 0 <= from <= to, got {delta.from_version} -> {delta.to_version}"
        )
    embed = _checked_set(delta.embed_indices, n_weights, "embed indices")
    release = _checked_set(delta.release_indices, n_weights, "release indices")
    refit = _checked_set(delta.refit_indices, n_weights, "refit indices")
    # Coefficients must be float32 already: both sides must hold bitwise-equal values, so the
    # server does the rounding once, not this module.
    embed_modes = np.asarray(delta.embed_modes)
    if embed_modes.dtype != np.uint8 or embed_modes.shape != (embed.size,):
        raise WireFormatError(
            f"embed_modes must be uint8 of length {embed.size}, "
            f"got {embed_modes.dtype} {embed_modes.shape}"
        )
    if embed_modes.size and int(embed_modes.max()) >= n_modes:
        raise WireFormatError(f"a mode id is >= n_modes {n_modes}")
    for name, coef, length in (
        ("embed_a", delta.embed_a, embed.size),
        ("embed_b", delta.embed_b, embed.size),
        ("refit_b", delta.refit_b, refit.size),
    ):
        arr = np.asarray(coef)
        if arr.dtype != np.float32 or arr.shape != (length,):
            raise WireFormatError(
                f"{name} must be float32 of length {length}, got {arr.dtype} {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise WireFormatError(f"{name} has non-finite values (NaN or Inf)")
    if _overlap(embed, release):
        raise WireFormatError("a weight is both embedded and released in one delta")
    if _overlap(refit, embed) or _overlap(refit, release):
        raise WireFormatError("a re-fit weight is also embedded or released in the delta")
    if delta.from_version == delta.to_version:
        changes = embed.size or release.size or refit.size
        if changes or delta.references is not None:
            raise WireFormatError("an empty delta (from == to) must carry nothing")
        return
    if delta.from_version > 0:
        if delta.references is not None:
            raise WireFormatError("references travel only in a full state (from 0)")
        return
    # Full state.
    if delta.references is None:
        raise WireFormatError("a full state (from 0) must carry the references")
    if release.size or refit.size:
        raise WireFormatError("a full state cannot release or re-fit weights")
    refs = np.asarray(delta.references)
    if refs.dtype != np.int64 or refs.shape != (n_modes,):
        raise WireFormatError(
            f"references must be int64 of length {n_modes}, got {refs.dtype} {refs.shape}"
        )
    if refs.min() < 0 or refs.max() >= n_weights:
        raise WireFormatError(f"a reference index is outside [0, {n_weights})")
    if np.unique(refs).size != n_modes:
        raise WireFormatError("a weight is the reference of two modes")
    if _overlap(embed, np.sort(refs)):
        raise WireFormatError("a reference weight cannot be embedded")


def _overlap(sorted_a: np.ndarray, sorted_b: np.ndarray) -> bool:
    """Whether two sorted index arrays share an element: a binary search of the shorter in the
    longer, instead of ``np.intersect1d``'s sort of both (most of a full state's check time)."""
    short, long = sorted((np.asarray(sorted_a), np.asarray(sorted_b)), key=len)
    if not short.size or not long.size:
        return False
    at = np.minimum(np.searchsorted(long, short), long.size - 1)
    return bool(np.any(long[at] == short))


def _checked_set(indices: np.ndarray, universe: int, what: str) -> np.ndarray:
    try:
        return _as_index_array(indices, universe, what)
    except ValueError as err:
        raise WireFormatError(str(err)) from err
