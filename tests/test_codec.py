"""Tests for cmd_fl.codec: accuracy of each codec, error feedback, sizes and hostile blobs."""

from __future__ import annotations

import math
import struct
import warnings

import numpy as np
import pytest

from cmd_fl.codec import CODECS, CodecSpec, compress, decode, encode, encoded_nbytes
from cmd_fl.wire import WireFormatError

LENGTHS = [0, 1, 255, 256, 257, 10_000]
SEEDS = range(5)
HEADER = 6  # format version, codec id, uint32 length
FP16_MAX = 65504.0


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _vector(n: int, seed: int) -> np.ndarray:
    """Normal values at a random scale, with zeros, huge and tiny values mixed in."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6)
    special = rng.random(n)
    x[special < 0.05] = 0.0
    x[(special >= 0.05) & (special < 0.07)] *= 1e20  # huge
    x[(special >= 0.07) & (special < 0.09)] *= 1e-30  # tiny (float32 subnormals included)
    return x.astype(np.float32)


def _leb128(values: list[int]) -> bytes:
    """Reference LEB128 encoder, written independently of cmd_fl.wire."""
    out = bytearray()
    for value in values:
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | 0x80 if value else byte)
            if not value:
                break
    return bytes(out)


def _topk_blob(n: int, k: int, indices: list[int], values: list[float]) -> np.ndarray:
    """A topk blob built by hand: header, k, varint-form index set, float32 values."""
    gaps = [indices[0], *np.diff(indices).tolist()] if indices else []
    raw = struct.pack("<BBII", 1, CODECS.index("topk"), n, k) + b"\x01" + _leb128(gaps)
    raw += np.asarray(values, dtype="<f4").tobytes()
    return np.frombuffer(raw, dtype=np.uint8).copy()


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "zstd"}, "codec name"),
        ({"block_size": -1}, "block_size"),
        ({"block_size": 2.0}, "block_size must be an int"),
        ({"block_size": True}, "block_size must be an int"),
        ({"topk_fraction": 0.0}, "topk_fraction"),
        ({"topk_fraction": 1.5}, "topk_fraction"),
        ({"topk_fraction": float("nan")}, "topk_fraction"),
        ({"topk_fraction": "0.1"}, "topk_fraction must be a number"),
        ({"error_feedback": 1}, "error_feedback"),
    ],
)
def test_spec_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CodecSpec(**kwargs)  # type: ignore[arg-type]


def test_topk_k() -> None:
    spec = CodecSpec("topk", topk_fraction=0.1)
    assert [spec.topk_k(n) for n in (0, 1, 9, 10, 11, 10_000)] == [0, 1, 1, 1, 2, 1000]
    assert CodecSpec("topk", topk_fraction=1.0).topk_k(7) == 7


@pytest.mark.parametrize(
    "vector",
    [
        np.array([1.0, np.nan], dtype=np.float32),
        np.array([np.inf], dtype=np.float32),
        np.zeros(3, dtype=np.float64),
        np.zeros((2, 2), dtype=np.float32),
    ],
)
@pytest.mark.parametrize("name", CODECS)
def test_encode_refuses_bad_vectors(name: str, vector: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"float32|non-finite"):
        encode(vector, CodecSpec(name))


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_none_is_bitwise_lossless(n: int, seed: int) -> None:
    x = _vector(n, seed)
    special = np.array([-0.0, np.finfo(np.float32).max, 1e-45], dtype=np.float32)
    x[: min(n, 3)] = special[: min(n, 3)]
    assert _bits_equal(decode(encode(x, CodecSpec()), CodecSpec(), n), x)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_fp16_error_and_clipping(n: int, seed: int) -> None:
    x = _vector(n, seed)
    spec = CodecSpec("fp16")
    y = decode(encode(x, spec), spec, n)
    assert y.dtype == np.float32 and y.shape == (n,) and np.all(np.isfinite(y))
    normal = (np.abs(x) >= 2.0**-14) & (np.abs(x) <= FP16_MAX)
    assert np.all(np.abs(y - x)[normal] <= 2.0**-11 * np.abs(x[normal]))
    tiny = np.abs(x) < 2.0**-14  # float16 subnormals: absolute error within half a step
    assert np.all(np.abs(y - x)[tiny] <= 2.0**-25)
    huge = np.abs(x) > FP16_MAX
    np.testing.assert_array_equal(y[huge], np.sign(x[huge]) * FP16_MAX)


def test_fp16_clips_the_float32_extremes() -> None:
    x = np.array([65519.0, 65520.0, -1e30, np.finfo(np.float32).max], dtype=np.float32)
    y = decode(encode(x, CodecSpec("fp16")), CodecSpec("fp16"), 4)
    np.testing.assert_array_equal(y, [FP16_MAX, FP16_MAX, -FP16_MAX, FP16_MAX])


@pytest.mark.parametrize("block_size", [0, 1, 64, 256])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_int8_error_within_half_a_step(n: int, seed: int, block_size: int) -> None:
    x = _vector(n, seed)
    x[n // 3 : n // 3 + 300] = 0.0  # at least one all-zero block for most lengths
    spec = CodecSpec("int8", block_size=block_size)
    blob = encode(x, spec)
    y = decode(blob, spec, n)
    block, n_blocks = spec.int8_blocks(n)
    scales = blob[HEADER + 8 : HEADER + 8 + 4 * n_blocks].view("<f4")
    padded = np.zeros(n_blocks * block, dtype=np.float32)
    padded[:n] = x
    amax = np.abs(padded.reshape(n_blocks, block)).max(axis=1, initial=0)
    np.testing.assert_array_equal(scales, amax / np.float32(127))
    per_value = np.repeat(scales.astype(np.float64), block)[:n]
    # Half a quantization step, plus the float32 rounding of the divide and the multiply.
    assert np.all(np.abs(y.astype(np.float64) - x) <= per_value * (0.5 + 1e-5))
    assert np.all(y[per_value == 0] == 0)


def _reference_top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k largest |x|, lowest index first among ties (a full sort)."""
    order = np.lexsort((np.arange(x.size), -np.abs(x.astype(np.float64))))
    return np.sort(order[:k])


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_topk_keeps_the_k_largest_bitwise(n: int, seed: int, fraction: float) -> None:
    x = _vector(n, seed)
    if seed % 2:  # many ties: magnitudes from a handful of values, both signs
        x = (np.random.default_rng(seed).integers(-3, 4, n)).astype(np.float32)
    spec = CodecSpec("topk", topk_fraction=fraction)
    y = decode(encode(x, spec), spec, n)
    k = spec.topk_k(n)
    assert k == (0 if n == 0 else min(n, max(1, math.ceil(fraction * n))))
    kept = _reference_top_k(x, k)
    assert _bits_equal(y[kept], x[kept])
    rest = np.ones(n, dtype=bool)
    rest[kept] = False
    assert np.all(y[rest] == 0)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("n", LENGTHS)
def test_decode_is_deterministic(name: str, n: int) -> None:
    x = _vector(n, 7)
    spec = CodecSpec(name)
    blob = encode(x, spec)
    assert _bits_equal(encode(x, spec), blob)
    first, second = decode(blob, spec, n), decode(blob.tobytes(), spec, n)
    assert _bits_equal(first, second) and first.dtype == np.float32 and first.shape == (n,)


# --------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("n", [1, 257, 10_000])
def test_error_feedback_conserves_the_sum(name: str, n: int) -> None:
    rng = np.random.default_rng(n)
    spec = CodecSpec(name, block_size=64, topk_fraction=0.05)
    residual: np.ndarray | None = None
    sum_updates = np.zeros(n)
    sum_decoded = np.zeros(n)
    for _ in range(30):
        update = rng.standard_normal(n).astype(np.float32)
        old = np.zeros(n, dtype=np.float32) if residual is None else residual
        blob, decoded, residual = compress(update, spec, residual)
        assert residual.dtype == np.float32 and residual.shape == (n,)
        assert _bits_equal(decoded, decode(blob, spec, n))
        assert _bits_equal(residual, (update + old) - decoded)  # the formula, in float32
        sum_updates += update
        sum_decoded += decoded
    assert residual is not None
    np.testing.assert_allclose(sum_decoded, sum_updates - residual, rtol=0, atol=1e-3)
    if name == "none":
        assert not np.any(residual)


@pytest.mark.parametrize("name", CODECS)
def test_without_error_feedback_the_residual_stays_zero(name: str) -> None:
    rng = np.random.default_rng(1)
    spec = CodecSpec(name, error_feedback=False)
    residual = np.ones(300, dtype=np.float32)  # ignored
    for _ in range(5):
        update = rng.standard_normal(300).astype(np.float32)
        blob, decoded, residual = compress(update, spec, residual)
        assert _bits_equal(residual, np.zeros(300, dtype=np.float32))
        assert _bits_equal(blob, encode(update, spec))
        assert _bits_equal(decoded, decode(blob, spec, 300))


def test_compress_refuses_a_bad_residual() -> None:
    update = np.zeros(5, dtype=np.float32)
    with pytest.raises(ValueError, match="residual"):
        compress(update, CodecSpec("int8"), np.zeros(5, dtype=np.float64))
    with pytest.raises(ValueError, match="residual"):
        compress(update, CodecSpec("int8"), np.zeros(4, dtype=np.float32))


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("n", LENGTHS)
def test_sizes(n: int) -> None:
    x = _vector(n, 3)
    sizes = {name: encode(x, CodecSpec(name)).size for name in CODECS}
    assert sizes["none"] == HEADER + 4 * n
    assert sizes["fp16"] == HEADER + 2 * n
    assert sizes["int8"] == HEADER + 8 + 4 * math.ceil(n / 256) + n
    assert encode(x, CodecSpec("int8", block_size=0)).size == HEADER + 8 + 4 * (n > 0) + n
    for name in ("none", "fp16", "int8"):
        assert sizes[name] == encoded_nbytes(CodecSpec(name), n)
    assert sizes["topk"] <= encoded_nbytes(CodecSpec("topk"), n)
    if n >= 1000:
        assert sizes["topk"] < min(sizes["int8"], sizes["fp16"])


# --------------------------------------------------------------------------- hostile blobs


def _valid(name: str, n: int = 300, **kwargs: object) -> tuple[np.ndarray, CodecSpec]:
    spec = CodecSpec(name, **kwargs)  # type: ignore[arg-type]
    return encode(_vector(n, 11), spec), spec


def _patched(blob: np.ndarray, offset: int, raw: bytes) -> np.ndarray:
    out = blob.copy()
    out[offset : offset + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out


def _hostile_cases() -> list[tuple[str, np.ndarray, CodecSpec, int, str | None]]:
    cases: list[tuple[str, np.ndarray, CodecSpec, int, str | None]] = []
    for name in CODECS:
        blob, spec = _valid(name)
        cases += [
            (f"{name} short header", blob[:5], spec, 300, "truncated"),
            (f"{name} version", _patched(blob, 0, b"\x02"), spec, 300, "format version 2"),
            (f"{name} length", blob, spec, 301, "length 300, expected 301"),
        ]
        other = CODECS[(CODECS.index(name) + 1) % len(CODECS)]
        cases.append((f"{name} codec", blob, CodecSpec(other), 300, "codec id"))
    for name in ("none", "fp16", "int8"):
        blob, spec = _valid(name)
        cases += [
            (f"{name} truncated", blob[:-1], spec, 300, "truncated"),
            (f"{name} over-long", np.append(blob, np.uint8(0)), spec, 300, "over-long"),
        ]
    none, fp16 = _valid("none")[0], _valid("fp16")[0]
    cases += [
        ("none NaN", _patched(none, HEADER, struct.pack("<f", np.nan)), CodecSpec(), 300, "non"),
        ("fp16 Inf", _patched(fp16, HEADER, b"\x00\x7c"), CodecSpec("fp16"), 300, "non-finite"),
        ("fp16 NaN", _patched(fp16, HEADER, b"\x01\x7e"), CodecSpec("fp16"), 300, "non-finite"),
    ]
    int8, spec8 = _valid("int8", block_size=64)  # 5 scales
    scale = HEADER + 8
    cases += [
        ("int8 block size", int8, CodecSpec("int8", block_size=32), 300, "block size 64"),
        ("int8 scale count", _patched(int8, HEADER + 4, b"\x04\0\0\0"), spec8, 300, "4 scales"),
        ("int8 NaN scale", _patched(int8, scale, struct.pack("<f", np.nan)), spec8, 300, "scale"),
        ("int8 Inf scale", _patched(int8, scale, struct.pack("<f", np.inf)), spec8, 300, "scale"),
        ("int8 neg scale", _patched(int8, scale, struct.pack("<f", -1.0)), spec8, 300, "negative"),
        ("int8 -0 scale", _patched(int8, scale, struct.pack("<f", -0.0)), spec8, 300, "negative"),
        ("int8 -128", _patched(int8, scale + 20, b"\x80"), spec8, 300, "-128"),
        (
            "int8 overflow",
            _patched(_patched(int8, scale, struct.pack("<f", 3e38)), scale + 20, b"\x7f"),
            spec8,
            300,
            "non-finite",
        ),
    ]
    spec_k = CodecSpec("topk", topk_fraction=0.01)  # k = 3 of 300
    ok = [1.0, 2.0, 3.0]
    topk, _ = _valid("topk", topk_fraction=0.01)
    over = np.zeros(encoded_nbytes(spec_k, 300) + 1, dtype=np.uint8)  # past the bitmap bound
    over[: HEADER + 4] = topk[: HEADER + 4]
    cases += [
        ("topk hand-made", _topk_blob(300, 3, [5, 9, 299], ok), spec_k, 300, None),
        ("topk short", topk[: HEADER + 3], spec_k, 300, "truncated"),
        ("topk no room", _topk_blob(300, 3, [], [1.0, 2.0]), spec_k, 300, "truncated"),
        ("topk over-long", over, spec_k, 300, "over-long"),
        ("topk k > length", _topk_blob(2, 3, [0, 1], ok), spec_k, 2, "larger than the length"),
        ("topk k", _topk_blob(300, 2, [0, 1], [1.0, 2.0]), spec_k, 300, "k 2, expected 3"),
        ("topk out of range", _topk_blob(300, 3, [5, 9, 300], ok), spec_k, 300, "universe"),
        ("topk duplicate", _topk_blob(300, 3, [5, 9, 9], ok), spec_k, 300, "strictly increasing"),
        ("topk too few", _topk_blob(300, 3, [5, 9], ok), spec_k, 300, "2 indices for 3"),
        ("topk too many", _topk_blob(300, 3, [5, 9, 10, 11], ok), spec_k, 300, "4 indices for 3"),
        ("topk NaN", _topk_blob(300, 3, [5, 9, 10], [1, np.nan, 2]), spec_k, 300, "non-finite"),
        ("topk Inf", _topk_blob(300, 3, [5, 9, 10], [1, 2, -np.inf]), spec_k, 300, "non-finite"),
        ("dtype", np.zeros(10, np.int16), CodecSpec(), 1, "uint8"),
    ]
    return cases


@pytest.mark.parametrize(("case", "blob", "spec", "length", "match"), _hostile_cases())
def test_hostile_blob_is_rejected_with_its_reason(
    case: str, blob: np.ndarray, spec: CodecSpec, length: int, match: str | None
) -> None:
    if match is None:  # the control: the hand-made encoder agrees with the module
        np.testing.assert_array_equal(np.flatnonzero(decode(blob, spec, length)), [5, 9, 299])
        return
    with pytest.raises(WireFormatError, match=match):
        decode(blob, spec, length)


def test_decode_refuses_a_bad_expected_length() -> None:
    with pytest.raises(ValueError, match="length"):
        decode(np.zeros(6, np.uint8), CodecSpec(), -1)


@pytest.mark.parametrize("name", CODECS)
def test_random_mutations_raise_or_decode_finite(name: str) -> None:
    """Byte flips, truncations and extensions: WireFormatError or a finite vector, nothing else."""
    rng = np.random.default_rng(CODECS.index(name))
    specs = [CodecSpec(name, block_size=16, topk_fraction=0.2), CodecSpec(name, block_size=0)]
    outcomes = {"rejected": 0, "decoded": 0}
    for trial in range(300):
        spec, n = specs[trial % 2], int(rng.choice([0, 1, 37, 300]))
        blob = encode(_vector(n, trial), spec)
        kind = rng.integers(3)
        if kind == 0:
            at = rng.integers(blob.size, size=rng.integers(1, 4))
            blob[at] = rng.integers(0, 256, at.size)
        elif kind == 1:
            blob = blob[: rng.integers(blob.size)]
        else:
            blob = np.append(blob, rng.integers(0, 256, rng.integers(1, 9)).astype(np.uint8))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a numpy warning would be an unhandled case
            try:
                out = decode(blob, spec, n)
            except WireFormatError:
                outcomes["rejected"] += 1
                continue
        outcomes["decoded"] += 1
        assert out.dtype == np.float32 and out.shape == (n,) and np.all(np.isfinite(out))
    assert outcomes["rejected"] > 100
