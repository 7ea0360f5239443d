"""Tests for cmd_fl.ledger: byte counts of real Flower messages and the ByteLedger.

Messages are built the way Flower builds them outside a running app: `Message(metadata=...,
content=...)` for instructions (no TaskIdentity needed) and `Message(content, reply_to=...)`
for replies; `message_id` is set to the object id as the Grid and the SuperNode do.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
)
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

from cmd_fl.ledger import (
    STATE_RECORD,
    ByteLedger,
    LedgerRow,
    _object_tree,
    message_control_bytes,
    message_control_split,
    message_payload_bytes,
    message_record_wire_bytes,
    message_wire_bytes,
    saved_fraction,
)

RUN_ID = 8_346_523_987_123_456_789
SUPERLINK_NODE_ID = 1


def make_instruction(
    content: RecordDict, dst_node_id: int, server_round: int = 1, message_type: str = "train"
) -> Message:
    """Build a server-to-client message as the Grid would push it (message_id = object id)."""
    metadata = Metadata(
        run_id=RUN_ID,
        message_id="",
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
    )
    message = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
    message.metadata.__dict__["_message_id"] = message.object_id  # what the Grid does
    return message


def make_reply(content: RecordDict | Error, instruction: Message) -> Message:
    """Build a client-to-server reply as the SuperNode would push it."""
    reply = Message(content, reply_to=instruction)
    reply.metadata.__dict__["_message_id"] = reply.object_id  # what the SuperNode does
    return reply


def _model_content(n: int, seed: int = 0, zeros: bool = False) -> RecordDict:
    rng = np.random.default_rng(seed)
    values = np.zeros(n, np.float32) if zeros else rng.standard_normal(n).astype(np.float32)
    return RecordDict({"arrays": ArrayRecord({"w": Array(values)})})


# --------------------------------------------------------------------------- byte counts


def test_payload_is_sum_of_count_bytes() -> None:
    # Prepare
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.ones(10, np.float32)), "b": Array(np.ones(2))}),
            "metrics": MetricRecord({"num-examples": 12, "loss": 0.5}),
            "config": ConfigRecord({"server-round": 3, "name": "cmd"}),
        }
    )
    # Execute
    payload = message_payload_bytes(content)
    # Assert
    expected = sum(record.count_bytes() for record in content.values())
    assert payload == expected
    assert content["arrays"].count_bytes() == (128 + 40 + 1) + (128 + 16 + 1)  # npy headers


def test_wire_bytes_of_one_million_floats() -> None:
    # Prepare
    message = make_instruction(_model_content(1_000_000), dst_node_id=42)
    # Execute
    wire = message_wire_bytes(message)
    # Assert: data + npy header, plus the envelope objects (Message, RecordDict, ArrayRecord,
    # Array, ArrayChunk header): about 600 B, no compression.
    data_with_header = 4_000_000 + 128
    assert message_payload_bytes(message.content) == data_with_header + 1
    assert data_with_header + 400 < wire < data_with_header + 1_000


def test_wire_bytes_are_the_deflated_objects() -> None:
    message = make_instruction(_model_content(1000), dst_node_id=42)
    objects = get_all_nested_objects(message)
    assert message_wire_bytes(message) == sum(len(o.deflate()) for o in objects.values())
    assert len(objects) == 5  # Message, RecordDict, ArrayRecord, Array, ArrayChunk


def test_no_compression_below_chunk_size() -> None:
    # A zero array and a random one of the same shape cost the same: nothing is compressed.
    n = 1_000_000
    random_message = make_instruction(_model_content(n), dst_node_id=42)
    zero_message = make_instruction(_model_content(n, zeros=True), dst_node_id=42)
    assert message_wire_bytes(zero_message) == message_wire_bytes(random_message)


def test_identical_chunks_travel_once() -> None:
    # Arrays are cut into chunks of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE bytes (5 MiB), stored by
    # content hash: two identical all-zero chunks inside one array cross once. This is the
    # only "compression" Flower applies.
    n = 4_000_000  # 16 MB of float32: chunks 1 and 2 are all zeros
    chunk = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    random_wire = message_wire_bytes(make_instruction(_model_content(n), dst_node_id=42))
    zero_wire = message_wire_bytes(make_instruction(_model_content(n, zeros=True), 42))
    saved = random_wire - zero_wire
    assert chunk < saved < chunk + 200


def test_wire_bytes_follow_flower_object_transfer() -> None:
    # Prepare: the same Array under two records, so the object tree has a shared node.
    shared = Array(np.arange(1000, dtype=np.float32))
    content = RecordDict(
        {
            "a": ArrayRecord({"w": Array(np.ones(500, np.float32)), "s": shared}),
            "b": ArrayRecord({"s": shared}),
            "config": ConfigRecord({"lr": 0.1}),
        }
    )
    instruction = make_instruction(content, dst_node_id=42)
    sizes = {oid: len(obj.deflate()) for oid, obj in get_all_nested_objects(instruction).items()}
    # Execute: the SuperNode pulls what its object store's `preregister` returns for the tree.
    to_pull = InMemoryObjectStore().preregister(RUN_ID, get_object_tree(instruction))
    # Assert: the shared subtree is pulled once per parent.
    assert len(to_pull) > len(sizes)
    assert message_wire_bytes(instruction) == sum(sizes[oid] for oid in to_pull)
    # Uplink: the SuperNode pushes each distinct object of the reply once.
    reply = make_reply(content, instruction)
    reply_sizes = {oid: len(obj.deflate()) for oid, obj in get_all_nested_objects(reply).items()}
    assert message_wire_bytes(reply) == sum(reply_sizes.values())
    assert message_wire_bytes(reply, "down") > message_wire_bytes(reply, "up")


def test_object_tree_matches_flower() -> None:
    # The ledger rebuilds Flower's ObjectTree from cached child ids (no re-hashing of chunks).
    shared = Array(np.arange(10, dtype=np.float32))
    content = RecordDict({"a": ArrayRecord({"s": shared}), "b": ArrayRecord({"s": shared})})
    message = make_instruction(content, dst_node_id=42)
    assert _object_tree(message.object_id, message) == get_object_tree(message)


def test_control_bytes_grow_with_the_object_tree() -> None:
    # Every object adds its 64-character id to the object tree in the Fleet API messages.
    small = make_instruction(_model_content(10), dst_node_id=42)
    records: dict[str, Any] = {
        f"r{i}": ArrayRecord({"w": Array(np.full(3, i, np.float32))}) for i in range(4)
    }
    large = make_instruction(RecordDict(records), dst_node_id=42)
    down_small = message_control_bytes(small)
    down_large = message_control_bytes(large)
    assert 300 < down_small < 1_000
    assert down_large - down_small >= 6 * 64  # six more objects
    reply = make_reply(_model_content(10), small)
    assert message_control_bytes(reply) > down_small  # the push lists objects to push again
    # The push request carries the tree and the response lists every object id again (66 B
    # each with framing); message_id, reply_to_message_id and the results key add 3 x 64 B.
    n_objects = sum(1 for _ in iterate_object_tree(get_object_tree(reply)))
    assert message_control_bytes(reply) > 2 * 66 * n_objects + 3 * 64


def test_error_reply_has_no_payload() -> None:
    instruction = make_instruction(_model_content(10), dst_node_id=42)
    reply = make_reply(Error(code=0, reason="client failed"), instruction)
    ledger = ByteLedger()
    row = ledger.record_message(1, "train", "up", 42, reply, kind="error")
    assert row.payload_bytes == 0
    assert 100 < row.wire_bytes < 400


# --------------------------------------------------------------------------- ledger


def _two_round_ledger() -> ByteLedger:
    ledger = ByteLedger()
    for server_round in (1, 2):
        for node_id, n in ((11, 1000), (22, 3000)):
            down = make_instruction(_model_content(n, seed=server_round), node_id, server_round)
            ledger.record_message(server_round, "train", "down", node_id, down, kind="model")
            up = make_reply(_model_content(n // 2, seed=node_id), down)
            ledger.record_message(server_round, "train", "up", node_id, up, kind="reply")
        query = make_instruction(RecordDict({"c": ConfigRecord({"x": 1})}), 11, server_round)
        ledger.record_message(server_round, "query", "down", 11, query, kind="query")
    return ledger


def test_record_message_measures_the_message() -> None:
    instruction = make_instruction(_model_content(2000), dst_node_id=7)
    ledger = ByteLedger()
    row = ledger.record_message(3, "evaluate", "down", 7, instruction, kind="model")
    assert row == ledger.rows[0]
    assert row.payload_bytes == message_payload_bytes(instruction.content)
    assert row.wire_bytes == message_wire_bytes(instruction)
    assert row.control_bytes == message_control_bytes(instruction)
    assert (row.control_up_bytes, row.control_down_bytes) == message_control_split(instruction)
    assert row.control_up_bytes < row.control_down_bytes  # the response holds the message
    assert row.state_bytes == 0  # no cmd-state record
    assert (row.round, row.phase, row.direction, row.node_id, row.kind) == (
        3,
        "evaluate",
        "down",
        7,
        "model",
    )


def test_state_bytes_are_the_wire_bytes_of_the_state_record() -> None:
    # Prepare: an instruction with a model record and a (stand-in) cmd-state record
    content = _model_content(3000)
    state = ArrayRecord({"cmd-state": Array(np.arange(5000, dtype=np.uint8))})
    content[STATE_RECORD] = state
    instruction = make_instruction(content, dst_node_id=9)
    without = make_instruction(_model_content(3000), dst_node_id=9)
    # Execute
    ledger = ByteLedger()
    row = ledger.record_message(4, "train", "down", 9, instruction, kind="model")
    plain = ledger.record_message(4, "train", "down", 9, without, kind="model")
    # Assert: the state's share is the record and its array, a part of the wire bytes
    assert row.state_bytes == message_record_wire_bytes(instruction, STATE_RECORD)
    assert 5000 < row.state_bytes < row.wire_bytes
    # What the state adds to the message: its objects plus its entry (key, object id) in the
    # parent RecordDict.
    assert row.state_bytes < row.wire_bytes - plain.wire_bytes < row.state_bytes + 200
    assert plain.state_bytes == 0
    assert ledger.totals()["state_down"] == row.state_bytes
    assert ledger.totals()["state_up"] == 0


def test_totals_equal_sum_of_rows() -> None:
    # Prepare
    ledger = _two_round_ledger()
    rows = ledger.rows
    # Execute
    totals = ledger.totals()
    # Assert
    for direction in ("up", "down"):
        selected = [r for r in rows if r.direction == direction]
        assert totals[f"wire_{direction}"] == sum(r.wire_bytes for r in selected)
        assert totals[f"payload_{direction}"] == sum(r.payload_bytes for r in selected)
        assert totals[f"messages_{direction}"] == len(selected)
    # Control bytes go by where each protobuf travels: requests up, responses down.
    assert totals["control_up"] == sum(r.control_up_bytes for r in rows)
    assert totals["control_down"] == sum(r.control_down_bytes for r in rows)
    assert totals["bytes_up"] == totals["wire_up"] + totals["control_up"]
    assert totals["bytes_down"] == totals["wire_down"] + totals["control_down"]
    assert totals["control_up"] > 0 and totals["control_down"] > 0
    per_round = [ledger.round_totals(r) for r in ledger.rounds()]
    assert ledger.rounds() == [1, 2]
    assert {k: sum(t[k] for t in per_round) for k in totals} == totals
    per_node = ledger.node_totals()
    assert list(per_node) == [11, 22]
    assert {k: sum(t[k] for t in per_node.values()) for k in totals} == totals
    train = ledger.totals(phase="train")
    query = ledger.totals(phase="query")
    assert train["bytes_down"] + query["bytes_down"] == totals["bytes_down"]
    assert ledger.totals(round=1, node_id=22, phase="train")["messages_up"] == 1
    assert ledger.round_totals(99) == dict.fromkeys(totals, 0)


def test_csv_round_trip(tmp_path: Path) -> None:
    # Prepare
    ledger = _two_round_ledger()
    path = tmp_path / "ledger.csv"
    # Execute
    ledger.to_csv(path)
    loaded = ByteLedger.from_csv(path)
    # Assert
    assert loaded.rows == ledger.rows
    assert loaded.to_rows() == ledger.to_rows()
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.csv"]  # no temporary left behind
    ledger.to_csv(path)  # overwrite in place
    assert len(ByteLedger.from_csv(path)) == len(ledger)


def test_from_csv_rejects_bad_files(tmp_path: Path) -> None:
    bad_header = tmp_path / "header.csv"
    bad_header.write_text("round,phase\n1,train\n")
    with pytest.raises(ValueError, match="expected columns"):
        ByteLedger.from_csv(bad_header)
    good = tmp_path / "good.csv"
    _two_round_ledger().to_csv(good)
    lines = good.read_text().splitlines()
    lines[1] = lines[1].replace("train", "fit", 1)
    bad_value = tmp_path / "value.csv"
    bad_value.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 2.*phase"):
        ByteLedger.from_csv(bad_value)


def test_extend_merges_ledgers() -> None:
    first, second = _two_round_ledger(), _two_round_ledger()
    merged = ByteLedger(first)
    merged.extend(second)
    assert len(merged) == len(first) + len(second)
    assert merged.totals()["bytes_up"] == 2 * first.totals()["bytes_up"]
    assert list(merged)[: len(first)] == list(first.rows)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"phase": "fit"}, ValueError),
        ({"direction": "sideways"}, ValueError),
        ({"wire_bytes": -1}, ValueError),
        ({"control_down_bytes": -1}, ValueError),
        ({"state_bytes": 21}, ValueError),  # more state than the message's wire bytes
        ({"payload_bytes": 1.5}, TypeError),
        ({"round": True}, TypeError),
    ],
)
def test_ledger_row_validation(changes: dict[str, object], error: type[Exception]) -> None:
    values: dict[str, object] = {
        "round": 1,
        "phase": "train",
        "direction": "up",
        "node_id": 5,
        "kind": "reply",
        "payload_bytes": 10,
        "wire_bytes": 20,
        "control_up_bytes": 30,
        "control_down_bytes": 40,
        "state_bytes": 5,
    }
    values.update(changes)
    with pytest.raises(error):
        LedgerRow(**values)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ByteLedger().append({"round": 1})  # type: ignore[arg-type]


def _row(node_id: int, direction: str, wire: int, payload: int, control: int) -> LedgerRow:
    # control: request (up) and response (down) bytes of the message, split 1 : 4
    return LedgerRow(
        1, "train", direction, node_id, "model", payload, wire, control // 5, control - control // 5
    )


def test_saved_vs_counts_network_bytes_up_and_down() -> None:
    # Prepare: payload differs from wire, so counting it would change the answer
    ledger = ByteLedger([_row(1, "down", 100, 7, 50), _row(1, "up", 150, 3, 200)])
    baseline = ByteLedger([_row(1, "down", 500, 1, 250), _row(1, "up", 500, 1, 750)])
    # Execute / Assert: wire plus control, each protobuf in the direction it travels
    totals = ledger.totals()
    assert (totals["bytes_up"], totals["bytes_down"]) == (150 + 10 + 40, 100 + 40 + 160)
    assert ledger.total_bytes() == 500
    assert ledger.saved_vs(baseline) == pytest.approx(0.75)
    assert ledger.saved_vs(2000) == pytest.approx(0.75)
    assert ledger.saved_vs(250) == pytest.approx(-1.0)
    assert ledger.saved_vs(ByteLedger()) == 0.0
    assert saved_fraction(30, 120) == pytest.approx(0.75)


def test_a_record_sent_to_many_nodes_is_deflated_once_and_counted_for_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: one model record (several chunks) and state record shared by five instructions,
    # as a round's messages share them; their sizes measured one message at a time.
    content = _model_content(700_000)
    content[STATE_RECORD] = ArrayRecord({"cmd-state": Array(np.arange(5000, dtype=np.uint8))})
    messages = [make_instruction(RecordDict(dict(content.items())), n) for n in range(1, 6)]
    expected = [
        (message_wire_bytes(m, "down"), message_record_wire_bytes(m, STATE_RECORD))
        for m in messages
    ]
    deflated: list[int] = []
    for cls in {type(o) for m in messages for o in _tree(m)} - {Message}:
        real = cls.deflate

        def counting(self: Any, real: Any = real) -> bytes:
            deflated.append(id(self))
            return real(self)

        monkeypatch.setattr(cls, "deflate", counting)

    # Execute
    ledger = ByteLedger()
    rows = [ledger.record_message(1, "train", "down", n, m) for n, m in enumerate(messages, 1)]

    # Assert: every row as measured alone; each shared object deflated for the first only.
    assert [(r.wire_bytes, r.state_bytes) for r in rows] == expected
    shared = {id(o) for o in _tree(messages[0])[2:]}  # below the message and its RecordDict
    assert len(shared) > 3  # the records, the arrays and the model's chunks
    measured = [oid for oid in deflated if oid in shared]
    assert len(measured) == len(set(measured)) == len(shared)


def _tree(obj: Any) -> list[Any]:
    """Every object of an inflatable object's tree (itself included)."""
    found = [obj]
    for child in (obj.children or {}).values():
        found.extend(_tree(child))
    return found


def test_first_state_messages_takes_each_nodes_first_state_bearing_instruction() -> None:
    def down(round: int, node: int, wire: int, state: int, phase: str = "train") -> LedgerRow:
        return LedgerRow(round, phase, "down", node, "message", wire, wire, 5, 95, state)

    ledger = ByteLedger(
        [
            down(1, 7, 1000, 0),  # the dense round: 1,100 network bytes
            down(1, 8, 1000, 0),
            down(2, 7, 900, 300, phase="evaluate"),  # state in an evaluation is not kept
            down(3, 7, 1200, 300),  # node 7's first state: larger than the dense message
            down(4, 7, 500, 50),  # a later delta: not a first message
            down(5, 8, 800, 400),
            LedgerRow(5, "train", "up", 8, "message", 2000, 2000, 5, 95, 0),
        ]
    )
    first = ledger.first_state_messages()
    assert first == {
        "nodes": 2,
        "max_bytes": 1300,
        "mean_bytes": 1100,
        "dense_bytes": 1100,
        "over_dense": 1,
    }
    assert ByteLedger().first_state_messages()["nodes"] == 0
