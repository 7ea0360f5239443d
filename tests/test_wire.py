"""Tests for cmd_fl.wire: index-set codec, tensor packing, record helpers, StateDelta."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from cmd_fl.wire import (
    MAX_INDEX_UNIVERSE,
    MAX_MODES,
    StateDelta,
    WireFormatError,
    decode_index_set,
    encode_index_set,
    encode_mode_ids,
    from_array_record,
    pack_tensors,
    to_array_record,
    unpack_tensors,
)


def _leb128(values: list[int]) -> bytes:
    """Reference LEB128 encoder, written independently of the module under test."""
    out = bytearray()
    for value in values:
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
    return bytes(out)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _through_flower(record: ArrayRecord) -> ArrayRecord:
    """Serialize a record as Flower does for transport (deflate every object) and rebuild it."""
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=1,
        dst_node_id=2,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    message = Message(metadata=metadata, content=RecordDict({"r": record}))  # type: ignore[call-overload]
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    rebuilt = inflate_object_from_contents(message.object_id, contents)
    assert isinstance(rebuilt, Message)
    return rebuilt.content.array_records["r"]


# --------------------------------------------------------------------------- index sets


@pytest.mark.parametrize("universe", [0, 1, 7, 8, 9, 13, 100, 1001, 4096, 100_003])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.3, 0.9, 1.0])
def test_index_set_round_trip(universe: int, density: float) -> None:
    # Prepare
    rng = np.random.default_rng(universe * 1000 + int(density * 100))
    indices = np.flatnonzero(rng.random(universe) < density)
    # Execute
    blob = encode_index_set(indices, universe)
    decoded = decode_index_set(blob, universe)
    # Assert
    assert blob.dtype == np.uint8 and blob.ndim == 1
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, indices)
    assert np.array_equal(decode_index_set(blob.tobytes(), universe), indices)


def _elias_fano_bytes(count: int, universe: int) -> int:
    """Body size of an Elias-Fano set, from its definition: L = floor(log2(U / n)) low bits
    per index, n + floor((U - 1) / 2^L) + 1 upper bits, a low-bit byte and a varint count."""
    low = int(np.floor(np.log2(universe / count))) if count and universe > count else 0
    upper_bits = count + (universe - 1) // 2**low + 1
    return 1 + len(_leb128([count])) + -(-count * low // 8) + -(-upper_bits // 8)


@pytest.mark.parametrize("universe", [1, 9, 1000, 77_777])
def test_index_set_picks_smallest_form(universe: int) -> None:
    rng = np.random.default_rng(universe)
    for density in (0.0, 0.002, 0.02, 0.2, 0.7, 1.0):
        indices = np.flatnonzero(rng.random(universe) < density)
        gaps = np.diff(indices, prepend=0).tolist()
        varint_size = len(_leb128(gaps))
        bitmap_size = (universe + 7) // 8
        elias_fano_size = _elias_fano_bytes(indices.size, universe)
        blob = encode_index_set(indices, universe)
        assert blob.size == 1 + min(varint_size, bitmap_size, elias_fano_size)
        if varint_size < min(bitmap_size, elias_fano_size):
            assert blob[0] == 1 and blob[1:].tobytes() == _leb128(gaps)
        if elias_fano_size < min(bitmap_size, varint_size):
            assert blob[0] == 2


def test_index_set_form_follows_the_sets_shape() -> None:
    universe = 1_000_000
    run = np.arange(1000, 1100)  # gaps of 1: one varint byte each
    scattered = np.sort(np.random.default_rng(0).choice(universe, 50_000, replace=False))
    dense = np.arange(0, universe, 2)
    run_blob = encode_index_set(run, universe)
    scattered_blob = encode_index_set(scattered, universe)
    dense_blob = encode_index_set(dense, universe)
    assert run_blob[0] == 1 and run_blob.size == 1 + 2 + 99
    # 5 % of the universe: about 2 + log2(20) = 6.3 bits an index, where varints take 8-16.
    assert scattered_blob[0] == 2 and scattered_blob.size < 50_000 * 6.4 / 8
    assert dense_blob[0] == 0 and dense_blob.size == 1 + universe // 8
    empty_blob = encode_index_set(np.empty(0, dtype=np.int64), universe)
    assert empty_blob.size == 1
    assert decode_index_set(empty_blob, universe).size == 0


def test_index_set_extreme_values() -> None:
    universe = MAX_INDEX_UNIVERSE
    indices = np.array([0, 1, 2**31, universe - 1])
    blob = encode_index_set(indices, universe)
    np.testing.assert_array_equal(decode_index_set(blob, universe), indices)


@pytest.mark.parametrize(
    ("blob", "universe", "match"),
    [
        (b"", 10, "tag byte is missing"),
        (b"\x03\x00", 10, "unknown tag"),
        (b"\x02\x00", 10, "truncated in its header"),
        (b"\x02\x01\x80\x80\x80\x80\x80", 1000, "malformed count"),
        (b"\x02\x00\x03\x00", 1000, "low bits, not the canonical"),  # 3 of 1000: L = 8
        (b"\x02\x08\x03\x00\x00", 1000, "has 4 bytes, expected 6"),
        (b"\x02\x08\x03\x00\x00\x00\x03", 1000, "2 upper bits for 3"),
        (b"\x02\x08\x03\x00\x00\x00\x87", 1000, "padding bits set"),
        (b"\x02\x08\x03\x05\x04\x00\x07", 1000, "not a strictly increasing"),
        (b"\x02\x00\x03\x00", 2, "3 entries"),
        (b"\x00\x01", 10, "bitmap has 1 bytes, expected 2"),
        (b"\x00\x01\x00\x00", 10, "bitmap has 3 bytes"),
        (b"\x00\x00\x04", 10, "beyond 10"),  # bit 10 set, universe 10
        (b"\x01\x03\x85", 1000, "truncated"),
        (b"\x01\x03\x00", 1000, "not strictly increasing"),
        (b"\x01\x05\x03", 8, "index >= universe"),
        (b"\x01\x80\x00", 1000, "non-canonical"),
        (b"\x01\x81\x81\x81\x81\x81\x01", MAX_INDEX_UNIVERSE, "longer than 5 bytes"),
        (b"\x01\x00\x01\x01", 2, "3 entries"),
    ],
)
def test_index_set_rejects_malformed(blob: bytes, universe: int, match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        decode_index_set(blob, universe)


def test_index_set_rejects_non_byte_blob() -> None:
    with pytest.raises(WireFormatError, match="uint8"):
        decode_index_set(np.zeros(3, dtype=np.float32), 10)


@pytest.mark.parametrize(
    ("indices", "universe", "match"),
    [
        (np.array([3, 1]), 10, "strictly increasing"),
        (np.array([1, 1]), 10, "strictly increasing"),
        (np.array([-1, 2]), 10, r"\[0, 10\)"),
        (np.array([10]), 10, r"\[0, 10\)"),
        (np.array([1.0, 2.0]), 10, "integer dtype"),
        (np.array([[1, 2]]), 10, "1-D"),
        (np.array([1]), MAX_INDEX_UNIVERSE + 1, "universe"),
    ],
)
def test_index_set_encode_rejects_bad_input(indices: np.ndarray, universe: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_index_set(indices, universe)


# --------------------------------------------------------------------------- mode ids


def test_encode_mode_ids() -> None:
    modes = np.array([0, 4, 2, 4])
    out = encode_mode_ids(modes, 5)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, modes)
    assert encode_mode_ids(np.full(3, MAX_MODES - 1), MAX_MODES).max() == MAX_MODES - 1
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        encode_mode_ids(np.array([5]), 5)
    with pytest.raises(ValueError, match="uint8"):
        encode_mode_ids(np.array([0]), MAX_MODES + 1)


# --------------------------------------------------------------------------- tensors


def _mixed_tensors() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    # quiet NaN with payload, signalling NaN, -0.0, smallest subnormal
    bits = [0x7FC00001, 0x7F800001, 0x80000000, 0x00000001]
    special = np.array(bits, dtype=np.uint32).view(np.float32)
    return [
        rng.standard_normal((3, 4)).astype(np.float32),
        np.array(123456789012, dtype=np.int64),  # 0-d
        rng.standard_normal(5).astype(np.float16),
        special,  # packing is bitwise, not value-wise
        np.array([True, False, True]),
        np.empty((0, 3), dtype=np.float32),
    ]


def test_pack_unpack_round_trip_bitwise() -> None:
    # Prepare
    tensors = _mixed_tensors()
    specs = [(t.shape, t.dtype) for t in tensors]
    # Execute
    blob = pack_tensors(tensors)
    out = unpack_tensors(blob, specs)
    # Assert
    assert blob.dtype == np.uint8
    assert blob.size == sum(t.nbytes for t in tensors)
    assert all(_bits_equal(a, b) for a, b in zip(tensors, out, strict=True))
    assert all(o.flags.writeable for o in out)
    assert unpack_tensors(blob.tobytes(), specs)[1].shape == ()


def test_pack_is_byte_order_independent() -> None:
    native = np.arange(6, dtype=np.float32).reshape(2, 3)
    big_endian = native.astype(">f4")
    assert pack_tensors([native]).tobytes() == pack_tensors([big_endian]).tobytes()
    assert pack_tensors([]).size == 0
    assert unpack_tensors(b"", []) == []


def test_unpack_rejects_wrong_length() -> None:
    tensors = _mixed_tensors()
    specs = [(t.shape, t.dtype) for t in tensors]
    blob = pack_tensors(tensors)
    with pytest.raises(WireFormatError, match="need"):
        unpack_tensors(blob[:-1], specs)
    with pytest.raises(WireFormatError, match="need"):
        unpack_tensors(np.concatenate([blob, np.zeros(1, dtype=np.uint8)]), specs)


def test_pack_rejects_object_dtype() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        pack_tensors([np.array(["a"], dtype=object)])


# --------------------------------------------------------------------------- records


def _parts() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "free": rng.standard_normal(1000).astype(np.float32),
        "coef": np.array([1.5, -0.0, 1e-45], dtype=np.float32),
        "count": np.array(7, dtype=np.int64),
        "extras": pack_tensors([rng.standard_normal(4).astype(np.float16)]),
    }


def _expected() -> dict[str, tuple[np.dtype, int | None]]:
    return {
        "free": (np.dtype(np.float32), 1000),
        "coef": (np.dtype(np.float32), 3),
        "count": (np.dtype(np.int64), 1),
        "extras": (np.dtype(np.uint8), None),
    }


def test_array_record_round_trip_bitwise_through_flower() -> None:
    # Prepare
    parts = _parts()
    # Execute
    record = _through_flower(to_array_record(parts))
    out = from_array_record(record, _expected())
    # Assert
    assert list(out) == list(_expected())
    assert all(_bits_equal(parts[k], out[k]) for k in parts)
    assert out["count"].shape == ()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_array_record_rejects_non_finite(bad: float) -> None:
    parts = _parts()
    parts["coef"] = parts["coef"].copy()
    parts["coef"][1] = bad
    with pytest.raises(WireFormatError, match=r"'coef'.*non-finite"):
        from_array_record(to_array_record(parts), _expected())


def test_array_record_rejects_missing_and_unknown_keys() -> None:
    parts = _parts()
    del parts["coef"]
    parts["surprise"] = np.zeros(1, dtype=np.float32)
    with pytest.raises(WireFormatError, match=r"missing \['coef'\], unknown \['surprise'\]"):
        from_array_record(to_array_record(parts), _expected())


def test_array_record_rejects_wrong_dtype() -> None:
    parts = _parts()
    parts["free"] = parts["free"].astype(np.float64)
    with pytest.raises(WireFormatError, match="'free' has dtype float64, expected float32"):
        from_array_record(to_array_record(parts), _expected())


def test_array_record_rejects_wrong_length() -> None:
    parts = _parts()
    parts["free"] = parts["free"][:999]
    with pytest.raises(WireFormatError, match="'free' has 999 elements, expected 1000"):
        from_array_record(to_array_record(parts), _expected())


def test_array_record_rejects_undecodable_and_inconsistent_arrays() -> None:
    expected = {"x": (np.dtype(np.float32), None)}
    foreign = ArrayRecord({"x": Array("float32", (1,), "torch.Tensor", b"\x00" * 4)})
    with pytest.raises(WireFormatError, match="'x' cannot be decoded"):
        from_array_record(foreign, expected)
    garbage = ArrayRecord({"x": Array("float32", (1,), "numpy.ndarray", b"not npy")})
    with pytest.raises(WireFormatError, match="'x' cannot be decoded"):
        from_array_record(garbage, expected)
    lying = ArrayRecord({"x": Array(np.zeros(3, dtype=np.float32))})
    lying["x"].shape = (4,)
    with pytest.raises(WireFormatError, match="declares shape"):
        from_array_record(lying, expected)


def test_to_array_record_rejects_bad_parts() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        to_array_record({"x": np.array(["a"], dtype=object)})
    with pytest.raises(ValueError, match="non-empty strings"):
        to_array_record({"": np.zeros(1)})


# --------------------------------------------------------------------------- StateDelta

N_WEIGHTS = 1000
N_MODES = 5


def _full_state(to_version: int = 3) -> StateDelta:
    rng = np.random.default_rng(2)
    modes = rng.integers(0, N_MODES, N_WEIGHTS).astype(np.uint8)
    references = np.array([np.flatnonzero(modes == m)[0] for m in range(N_MODES)], np.int64)
    candidates = np.setdiff1d(np.arange(N_WEIGHTS), references)
    embed = np.sort(rng.choice(candidates, 300, replace=False)).astype(np.int64)
    a = rng.standard_normal(embed.size).astype(np.float32)
    a[0] = np.float32(1.2345e-3)  # a marker the corruption test can find in the blob
    b = rng.standard_normal(embed.size).astype(np.float32)
    b[:2] = np.array([0x80000000, 0x00000001], dtype=np.uint32).view(np.float32)
    return StateDelta(
        from_version=0,
        to_version=to_version,
        embed_indices=embed,
        embed_a=a,
        embed_b=b,
        embed_modes=modes[embed],
        references=references,
    )


def _assert_same_delta(x: StateDelta, y: StateDelta) -> None:
    assert (x.from_version, x.to_version) == (y.from_version, y.to_version)
    for name in ("embed_indices", "embed_a", "embed_b", "embed_modes", "release_indices"):
        assert _bits_equal(getattr(x, name), getattr(y, name)), name
    assert (x.references is None) == (y.references is None)
    if x.references is not None and y.references is not None:
        assert _bits_equal(x.references, y.references)


def test_state_full_round_trip() -> None:
    # Prepare
    delta = _full_state()
    # Execute
    record = _through_flower(delta.to_array_record(N_WEIGHTS, N_MODES))
    out = StateDelta.from_array_record(record, N_WEIGHTS, N_MODES)
    # Assert
    assert len(record) == 1  # one Array, one npy header
    assert out.is_full
    _assert_same_delta(delta, out)


def test_state_delta_and_empty_round_trip() -> None:
    # Prepare
    delta = StateDelta(
        from_version=2,
        to_version=4,
        embed_indices=np.array([5, 17, 999], dtype=np.int64),
        embed_a=np.array([0.5, -1.0, 2.0], dtype=np.float32),
        embed_b=np.array([0.0, 0.25, -3.0], dtype=np.float32),
        embed_modes=np.array([4, 0, 2], dtype=np.uint8),
        release_indices=np.array([6, 700], dtype=np.int64),
    )
    empty = StateDelta(
        from_version=4,
        to_version=4,
        embed_indices=np.empty(0, dtype=np.int64),
        embed_a=np.empty(0, dtype=np.float32),
        embed_b=np.empty(0, dtype=np.float32),
    )
    for item in (delta, empty):
        # Execute
        record = item.to_array_record(N_WEIGHTS, N_MODES)
        out = StateDelta.from_array_record(record, N_WEIGHTS, N_MODES)
        # Assert
        _assert_same_delta(item, out)
        assert not out.is_full
        assert record.count_bytes() < 250  # header + two tiny varint sets + 24 B of floats


def _blob(delta: StateDelta) -> np.ndarray:
    record = delta.to_array_record(N_WEIGHTS, N_MODES)
    (key,) = record.keys()
    return record[key].numpy()


def _record_like(delta: StateDelta, blob: np.ndarray) -> ArrayRecord:
    (key,) = delta.to_array_record(N_WEIGHTS, N_MODES).keys()
    return to_array_record({key: blob})


def test_state_rejects_truncated_extended_and_bad_format() -> None:
    delta = _full_state()
    blob = _blob(delta)
    for bad in (blob[:-1], blob[:10], np.concatenate([blob, np.zeros(1, np.uint8)])):
        with pytest.raises(WireFormatError):
            StateDelta.from_array_record(_record_like(delta, bad), N_WEIGHTS, N_MODES)
    wrong_format = blob.copy()
    wrong_format[0] = 99
    with pytest.raises(WireFormatError, match="format"):
        StateDelta.from_array_record(_record_like(delta, wrong_format), N_WEIGHTS, N_MODES)


def test_state_rejects_nan_coefficient() -> None:
    delta = _full_state()
    blob = _blob(delta)
    marker = np.float32(1.2345e-3).tobytes()
    position = blob.tobytes().find(marker)
    assert position > 0
    corrupted = blob.copy()
    corrupted[position : position + 4] = np.frombuffer(np.float32(np.nan).tobytes(), dtype=np.uint8)
    with pytest.raises(WireFormatError, match="embed_a has non-finite"):
        StateDelta.from_array_record(_record_like(delta, corrupted), N_WEIGHTS, N_MODES)


def test_state_rejects_wrong_sizes_and_extra_keys() -> None:
    delta = _full_state()
    record = delta.to_array_record(N_WEIGHTS, N_MODES)
    with pytest.raises(WireFormatError):
        StateDelta.from_array_record(record, N_WEIGHTS + 8, N_MODES)
    with pytest.raises(WireFormatError):
        StateDelta.from_array_record(record, N_WEIGHTS, N_MODES - 1)
    record["extra"] = Array(np.zeros(1, dtype=np.uint8))
    with pytest.raises(WireFormatError, match="unknown"):
        StateDelta.from_array_record(record, N_WEIGHTS, N_MODES)


def _replace(delta: StateDelta, **changes: object) -> StateDelta:
    values = {name: getattr(delta, name) for name in delta.__dataclass_fields__}
    values.update(changes)
    return StateDelta(**values)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"from_version": 5}, "from <= to"),
        ({"from_version": 1}, "only in a full state"),
        ({"references": None}, "must carry the references"),
        ({"release_indices": np.array([1], dtype=np.int64)}, "cannot release|both embedded"),
        ({"embed_a": np.zeros(300, dtype=np.float64)}, "embed_a must be float32"),
        ({"embed_b": np.zeros(299, dtype=np.float32)}, "embed_b must be float32 of length 300"),
        ({"embed_indices": np.arange(300, 0, -1)}, "strictly increasing"),
        ({"references": np.arange(N_MODES, dtype=np.int64) + 10**6}, "reference index"),
        ({"references": np.zeros(N_MODES, dtype=np.int64)}, "reference of two modes"),
        ({"embed_modes": np.full(300, N_MODES, dtype=np.uint8)}, "mode id is >= n_modes"),
        ({"embed_modes": np.zeros(299, dtype=np.uint8)}, "embed_modes must be uint8 of length"),
    ],
)
def test_state_rejects_invalid_deltas(changes: dict[str, object], match: str) -> None:
    delta = _replace(_full_state(), **changes)
    with pytest.raises(WireFormatError, match=match):
        delta.to_array_record(N_WEIGHTS, N_MODES)


def test_state_rejects_embedded_reference_and_overlap() -> None:
    full = _full_state()
    assert full.references is not None
    with_ref = np.union1d(full.embed_indices, full.references[:1])
    coefficients = np.zeros(with_ref.size, dtype=np.float32)
    embedded_ref = _replace(
        full,
        embed_indices=with_ref,
        embed_a=coefficients,
        embed_b=coefficients,
        embed_modes=np.zeros(with_ref.size, dtype=np.uint8),
    )
    with pytest.raises(WireFormatError, match="reference weight cannot be embedded"):
        embedded_ref.validate(N_WEIGHTS, N_MODES)
    overlap = StateDelta(
        from_version=1,
        to_version=2,
        embed_indices=np.array([3], dtype=np.int64),
        embed_a=np.ones(1, dtype=np.float32),
        embed_b=np.ones(1, dtype=np.float32),
        embed_modes=np.zeros(1, dtype=np.uint8),
        release_indices=np.array([3], dtype=np.int64),
    )
    with pytest.raises(WireFormatError, match="both embedded and released"):
        overlap.validate(N_WEIGHTS, N_MODES)


def test_overlap_check_agrees_with_intersect1d() -> None:
    # The validation's fast overlap test (binary search) against numpy's set intersection,
    # on random sets, on sets touching only at their first or last element, and on empty ones.
    from cmd_fl.wire import _overlap

    rng = np.random.default_rng(0)
    pairs = [(np.arange(5), np.arange(5, 9)), (np.arange(5), np.arange(4, 9))]
    pairs += [(np.array([0]), np.arange(0, 9, 3)), (np.array([8]), np.arange(2, 9, 3))]
    pairs += [(np.empty(0, np.int64), np.arange(3)), (np.arange(3), np.empty(0, np.int64))]
    for _ in range(300):
        a = np.unique(rng.integers(0, 400, rng.integers(0, 60)))
        b = np.unique(rng.integers(0, 400, rng.integers(0, 200)))
        pairs.append((a, b))
    for a, b in pairs:
        assert _overlap(a, b) == bool(np.intersect1d(a, b).size), (a, b)


def test_state_rejects_mode_ids_without_embedded_weights() -> None:
    from cmd_fl.wire import _STATE_HEADER

    empty = encode_index_set(np.empty(0, dtype=np.int64), N_WEIGHTS).tobytes()
    header = _STATE_HEADER.pack(4, 4, 1, 2, 1, 0, len(empty), len(empty), len(empty))
    blob = np.frombuffer(header + b"\x03" + empty * 3, dtype=np.uint8)
    with pytest.raises(WireFormatError, match="mode ids but embeds no weight"):
        StateDelta.from_array_record(to_array_record({"cmd-state": blob}), N_WEIGHTS, N_MODES)
