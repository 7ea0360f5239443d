"""Lossy and lossless codecs for the float32 vectors cmd-fl sends (model updates).

A vector is encoded into one ``uint8`` blob that starts with a 6-byte header: format version
(``uint8``), codec id (``uint8``, its position in `CODECS`) and vector length (``uint32``), all
little-endian. What follows depends on the codec:

- ``none``: ``length`` float32 values, bitwise lossless.
- ``fp16``: ``length`` float16 values; values beyond float16 range are clipped to ±65504.
- ``int8``: block size and number of scales (``uint32`` each), one float32 scale per block
  (``max|x| / 127``; 0 for an all-zero block), then ``length`` int8 values in [-127, 127].
- ``topk``: ``k`` (``uint32``), the kept indices as a `cmd_fl.wire.encode_index_set` encoding
  (sorted, unique; the smaller of bitmap and delta varints), then ``k`` float32 values.

`decode` is strict: a reply's payload is hostile input, so anything malformed raises
`WireFormatError` and no partially decoded vector is ever returned. Decoding uses only exact
IEEE float32 operations (conversions and one multiply), so every machine reconstructs the
same bytes into the same vector bitwise; `compress` adds error feedback on top.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from cmd_fl.wire import WireFormatError, _as_byte_array, decode_index_set, encode_index_set

__all__ = [
    "CODECS",
    "MAX_LENGTH",
    "CodecSpec",
    "Compressed",
    "compress",
    "decode",
    "encode",
    "encoded_nbytes",
]

CODECS = ("none", "fp16", "int8", "topk")
"""Codec names; a codec's id on the wire is its position here."""

MAX_LENGTH = 2**32 - 1
"""Longest vector: the length travels as ``uint32`` (and bounds `encode_index_set`'s universe)."""

_FORMAT = 1
_HEADER = struct.Struct("<BBI")  # format version, codec id, length
_INT8_HEADER = struct.Struct("<II")  # block size, number of scales
_TOPK_HEADER = struct.Struct("<I")  # k
_FP16_MAX = np.float32(np.finfo(np.float16).max)  # 65504


@dataclass(frozen=True)
class CodecSpec:
    """How update vectors are encoded; sender and receiver must hold the same spec.

    Parameters
    ----------
    name : str, default "none"
        One of `CODECS`.
    block_size : int, default 256
        ``int8`` only: values sharing one scale; 0 means one scale for the whole vector.
    topk_fraction : float, default 0.1
        ``topk`` only: share of entries kept, in (0, 1]; ``k = max(1, ceil(fraction * length))``
        (at most ``length``).
    error_feedback : bool, default True
        Whether `compress` carries what the codec lost into the next round's vector.
    """

    name: str = "none"
    block_size: int = 256
    topk_fraction: float = 0.1
    error_feedback: bool = True

    def __post_init__(self) -> None:
        """Check every field; raise ValueError naming the bad one."""
        if self.name not in CODECS:
            raise ValueError(f"codec name must be one of {CODECS}, got {self.name!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size must be an int, got {type(self.block_size).__name__}")
        if not 0 <= self.block_size <= MAX_LENGTH:
            raise ValueError(f"block_size must be in [0, {MAX_LENGTH}], got {self.block_size}")
        fraction = self.topk_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"topk_fraction must be a number, got {type(fraction).__name__}")
        if not 0.0 < fraction <= 1.0:  # also refuses NaN
            raise ValueError(f"topk_fraction must be in (0, 1], got {fraction}")
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"error_feedback must be a bool, got {self.error_feedback!r}")

    def topk_k(self, length: int) -> int:
        """Entries `topk` keeps of a vector of `length`: ``min(length, max(1, ceil(f * n)))``."""
        return min(length, max(1, math.ceil(self.topk_fraction * length)))

    def int8_blocks(self, length: int) -> tuple[int, int]:
        """``(block, n_blocks)`` of `int8` for a vector of `length` (0 blocks when empty)."""
        block = self.block_size or max(length, 1)
        return block, -(-length // block)


def encoded_nbytes(spec: CodecSpec, length: int) -> int:
    """Size of the blob `encode` writes for a vector of `length`.

    Exact for ``none``, ``fp16`` and ``int8``. For ``topk`` it is the largest possible size
    (the index set in bitmap form); the real blob is this size or smaller.

    Parameters
    ----------
    spec : CodecSpec
        The codec.
    length : int
        Vector length, ``0 <= length <= MAX_LENGTH``.

    Returns
    -------
    int
        Bytes, header included.
    """
    length = _check_length(length)
    if spec.name == "none":
        return _HEADER.size + 4 * length
    if spec.name == "fp16":
        return _HEADER.size + 2 * length
    if spec.name == "int8":
        return _HEADER.size + _INT8_HEADER.size + 4 * spec.int8_blocks(length)[1] + length
    index_bound = 1 + (length + 7) // 8  # tag byte + bitmap: encode_index_set never exceeds it
    return _HEADER.size + _TOPK_HEADER.size + index_bound + 4 * spec.topk_k(length)


def encode(vector: np.ndarray, spec: CodecSpec) -> np.ndarray:
    """Encode a float32 vector into one blob.

    Parameters
    ----------
    vector : np.ndarray
        Values to send, float32, 1-D, finite; may be empty.
    spec : CodecSpec
        The codec.

    Returns
    -------
    np.ndarray
        The blob, ``uint8``, 1-D; read it back with `decode`.

    Raises
    ------
    ValueError
        If `vector` is not a finite 1-D float32 array of at most `MAX_LENGTH` values.
    """
    x = np.asarray(vector)
    if x.dtype != np.float32 or x.ndim != 1:
        raise ValueError(f"vector must be a 1-D float32 array, got {x.dtype} {x.shape}")
    n = _check_length(x.size)
    if not np.all(np.isfinite(x)):
        raise ValueError("vector has non-finite values (NaN or Inf): it cannot be encoded")
    parts = [_HEADER.pack(_FORMAT, CODECS.index(spec.name), n)]
    if spec.name == "none":
        parts.append(x.astype("<f4").tobytes())
    elif spec.name == "fp16":
        parts.append(np.clip(x, -_FP16_MAX, _FP16_MAX).astype("<f2").tobytes())
    elif spec.name == "int8":
        block, n_blocks = spec.int8_blocks(n)
        padded = np.zeros(n_blocks * block, dtype=np.float32)
        padded[:n] = x
        rows = padded.reshape(n_blocks, block)
        scales = np.abs(rows).max(axis=1, initial=np.float32(0)) / np.float32(127)
        ratio = np.zeros_like(rows)
        np.divide(rows, scales[:, None], out=ratio, where=scales[:, None] > 0)
        q = np.clip(np.rint(ratio), -127, 127).astype(np.int8).reshape(-1)[:n]
        parts += [_INT8_HEADER.pack(block, n_blocks), scales.astype("<f4").tobytes(), q.tobytes()]
    else:
        indices = _top_k_indices(x, spec.topk_k(n))
        parts += [
            _TOPK_HEADER.pack(indices.size),
            encode_index_set(indices, n).tobytes(),
            x[indices].astype("<f4").tobytes(),
        ]
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy()


def decode(blob: np.ndarray | bytes, spec: CodecSpec, length: int) -> np.ndarray:
    """Decode a blob written by `encode`, validating it strictly.

    Parameters
    ----------
    blob : np.ndarray | bytes
        The received blob (1-D ``uint8`` array or bytes).
    spec : CodecSpec
        The codec the receiver expects.
    length : int
        The vector length the receiver expects.

    Returns
    -------
    np.ndarray
        A fresh float32 vector of exactly `length` finite values.

    Raises
    ------
    WireFormatError
        If the blob is truncated or over-long, has another format version, codec or length,
        ``int8`` block size, scale count or scales (NaN, Inf, negative) that do not match, an
        int8 value of -128, ``topk`` k or indices that do not match (k other than the spec's,
        an index out of range, unsorted or repeated, fewer or more indices than values), or a
        non-finite value.
    """
    n = _check_length(length)
    data = _as_byte_array(blob, "codec blob")
    if data.size < _HEADER.size:
        raise WireFormatError(f"codec blob is truncated: {data.size} bytes, header needs 6")
    fmt, codec_id, sent_length = _HEADER.unpack(data[: _HEADER.size].tobytes())
    if fmt != _FORMAT:
        raise WireFormatError(f"codec blob has format version {fmt}, expected {_FORMAT}")
    expected_id = CODECS.index(spec.name)
    if codec_id != expected_id:
        raise WireFormatError(f"codec blob has codec id {codec_id}, expected {expected_id}")
    if sent_length != n:
        raise WireFormatError(f"codec blob has length {sent_length}, expected {n}")
    body = data[_HEADER.size :]
    if spec.name == "none":
        _check_size(data, encoded_nbytes(spec, n))
        out = body.view("<f4").astype(np.float32)
    elif spec.name == "fp16":
        _check_size(data, encoded_nbytes(spec, n))
        out = body.view("<f2").astype(np.float32)
    elif spec.name == "int8":
        out = _decode_int8(body, spec, n)
    else:
        out = _decode_topk(body, spec, n)
    if not np.all(np.isfinite(out)):
        raise WireFormatError(f"{spec.name} blob has non-finite values (NaN or Inf)")
    return out


class Compressed(NamedTuple):
    """What `compress` returns."""

    blob: np.ndarray
    """The bytes to send, ``uint8``."""
    decoded: np.ndarray
    """``decode(blob)``: exactly the float32 vector the receiver reconstructs."""
    residual: np.ndarray
    """What was lost, float32, to pass to the next `compress` (zeros without error feedback)."""


def compress(update: np.ndarray, spec: CodecSpec, residual: np.ndarray | None = None) -> Compressed:
    """Encode ``update + residual`` (error feedback) and return what the codec lost.

    Parameters
    ----------
    update : np.ndarray
        This round's update, float32, 1-D, finite.
    spec : CodecSpec
        The codec; with ``error_feedback=False`` the residual is ignored and returned as zeros.
    residual : np.ndarray | None, default None
        The previous call's residual (float32, same length); None means zeros.

    Returns
    -------
    Compressed
        ``(blob, decoded, residual)`` with ``residual = (update + old residual) - decoded``,
        in float32; zeros for ``none`` (lossless) or without error feedback.

    Raises
    ------
    ValueError
        If `update` cannot be encoded or `residual` is not float32 of the same shape.
    """
    sent = np.asarray(update)
    if spec.error_feedback and residual is not None:
        res = np.asarray(residual)
        if res.dtype != np.float32 or res.shape != sent.shape:
            raise ValueError(
                f"residual must be float32 of shape {sent.shape}, got {res.dtype} {res.shape}"
            )
        sent = sent + res
    blob = encode(sent, spec)
    decoded = decode(blob, spec, sent.size)
    if spec.error_feedback and spec.name != "none":
        return Compressed(blob, decoded, sent - decoded)
    return Compressed(blob, decoded, np.zeros(sent.size, dtype=np.float32))


def _check_length(length: int) -> int:
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
        raise ValueError(f"length must be an int, got {type(length).__name__}")
    if not 0 <= length <= MAX_LENGTH:
        raise ValueError(f"length must be in [0, {MAX_LENGTH}], got {length}")
    return int(length)


def _check_size(data: np.ndarray, expected: int) -> None:
    if data.size < expected:
        raise WireFormatError(f"codec blob is truncated: {data.size} bytes, expected {expected}")
    if data.size > expected:
        raise WireFormatError(f"codec blob is over-long: {data.size} bytes, expected {expected}")


def _top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the `k` largest ``|x|``; among equal magnitudes the lowest indices win.

    O(n): one partition finds the k-th largest magnitude instead of sorting all of them.
    """
    if k == 0:
        return np.empty(0, dtype=np.int64)
    magnitude = np.abs(x)
    threshold = np.partition(magnitude, x.size - k)[x.size - k]
    above = np.flatnonzero(magnitude > threshold)
    ties = np.flatnonzero(magnitude == threshold)[: k - above.size]
    return np.sort(np.concatenate((above, ties)))


def _decode_int8(body: np.ndarray, spec: CodecSpec, n: int) -> np.ndarray:
    if body.size < _INT8_HEADER.size:
        raise WireFormatError(f"codec blob is truncated: int8 header needs {_INT8_HEADER.size}")
    block, n_scales = _INT8_HEADER.unpack(body[: _INT8_HEADER.size].tobytes())
    expected_block, n_blocks = spec.int8_blocks(n)
    if block != expected_block:
        raise WireFormatError(f"int8 blob has block size {block}, expected {expected_block}")
    if n_scales != n_blocks:
        raise WireFormatError(f"int8 blob has {n_scales} scales, expected {n_blocks}")
    _check_size(body, _INT8_HEADER.size + 4 * n_blocks + n)
    start = _INT8_HEADER.size
    scales = body[start : start + 4 * n_blocks].view("<f4").astype(np.float32)
    if not np.all(np.isfinite(scales)) or np.any(np.signbit(scales)):
        raise WireFormatError("int8 blob has a NaN, Inf or negative scale")
    q = body[start + 4 * n_blocks :].view(np.int8)
    if np.any(q == -128):
        raise WireFormatError("int8 blob has the value -128 (the range is [-127, 127])")
    rows = np.zeros(n_blocks * block, dtype=np.float32)
    rows[:n] = q
    with np.errstate(over="ignore"):  # an overflow to Inf is rejected by the caller
        rows = rows.reshape(n_blocks, block) * scales[:, None]
    return rows.reshape(-1)[:n].copy()


def _decode_topk(body: np.ndarray, spec: CodecSpec, n: int) -> np.ndarray:
    if body.size < _TOPK_HEADER.size:
        raise WireFormatError(f"codec blob is truncated: topk header needs {_TOPK_HEADER.size}")
    (k,) = _TOPK_HEADER.unpack(body[: _TOPK_HEADER.size].tobytes())
    if k > n:
        raise WireFormatError(f"topk blob has k {k} larger than the length {n}")
    if k != spec.topk_k(n):
        raise WireFormatError(f"topk blob has k {k}, expected {spec.topk_k(n)}")
    bound = encoded_nbytes(spec, n) - _HEADER.size
    if body.size > bound:
        raise WireFormatError(f"codec blob is over-long: topk body of {body.size} > {bound} bytes")
    if body.size < _TOPK_HEADER.size + 1 + 4 * k:
        raise WireFormatError(f"codec blob is truncated: topk body of {body.size} bytes, k {k}")
    try:
        indices = decode_index_set(body[_TOPK_HEADER.size : body.size - 4 * k], n)
    except WireFormatError as err:
        raise WireFormatError(f"topk indices: {err}") from err
    if indices.size != k:
        raise WireFormatError(f"topk blob has {indices.size} indices for {k} values")
    out = np.zeros(n, dtype=np.float32)
    out[indices] = body[body.size - 4 * k :].view("<f4")
    return out
