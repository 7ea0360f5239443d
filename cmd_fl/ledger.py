"""Byte ledger: every byte that crosses between server and clients, measured on real messages.

Three numbers per message, all measured on the `Message` object itself, never estimated
from formulas:

- payload: the records' own byte counts (``count_bytes()``: array data with npy headers,
  plus keys);
- wire: the deflated Flower objects the message travels as (Message, RecordDict, records,
  Arrays, ArrayChunks). Flower 1.42 does not compress them; this is what the SuperLink counts
  for object pushes (uplink) and pulls (downlink) on the Fleet API;
- control: the Fleet API protobuf request and response that carry the message's metadata and
  object tree (``PullMessages`` for an instruction, ``PushMessages`` for a reply). A request
  travels up (client to SuperLink) and a response down, whatever the message's own direction,
  so each row keeps the two apart (``control_up_bytes``, ``control_down_bytes``). The
  SuperLink books them the same way (requests inbound, responses outbound). Neither side
  counts heartbeats, GetRun, GetFab or ConfirmMessageReceived, nor a reply the SuperLink writes
  itself (NODE_UNAVAILABLE).

A row also says how many of its wire bytes carried CMD state (``state_bytes``: the objects of
the ``cmd-state`` record), so state and model traffic can be told apart.

The headline number is what crossed the network: ``bytes_up`` = wire bytes of replies plus all
requests, ``bytes_down`` = wire bytes of instructions plus all responses (`ByteLedger.totals`).
Summed over a run that is what ``flwr ls --run-id N`` reports as network traffic, per direction
(inbound, outbound) and in total. Checked against a deployed SuperLink (two SuperNodes, two
rounds, ``flwr ls`` network-traffic): downlink objects and control bytes agreed to the byte.
Uplink too, except for content-addressed deduplication: the SuperLink does not ask for an
object it already holds (e.g. a reply's ``MetricRecord`` identical to another client's reply
pushed moments before, or an identical 5 MiB chunk). That depends on timing, so it is not
modelled: the ledger is an upper bound that is exact when no two messages share an object.

In simulation nothing crosses a network and message ids are 36-character uuids instead of
64-character object ids, so a reply measured there is about 28 B smaller (in the Message object)
and 28 B smaller in control bytes than the same reply in deployment.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, get_args

from flwr.app import Message, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import (  # pylint: disable=no-name-in-module
    PullMessagesRequest,
    PullMessagesResponse,
    PushMessagesRequest,
    PushMessagesResponse,
    Reconnect,
)
from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=no-name-in-module
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    iterate_object_tree,
)

from cmd_fl.payload import CMD_STATE as STATE_RECORD  # the record a StateDelta travels in

__all__ = [
    "BYTE_COUNTING",
    "STATE_RECORD",
    "ByteLedger",
    "Direction",
    "LedgerRow",
    "Phase",
    "message_control_bytes",
    "message_control_split",
    "message_payload_bytes",
    "message_record_wire_bytes",
    "message_wire_bytes",
    "saved_fraction",
]

# What a summary's byte totals count (``summary.json`` ``byte_counting``): wire and control bytes.
# Summaries without it counted wire bytes only.
BYTE_COUNTING = "network"

Phase = Literal["train", "evaluate", "query"]
Direction = Literal["down", "up"]

_PHASES: tuple[str, ...] = get_args(Phase)
_DIRECTIONS: tuple[str, ...] = get_args(Direction)
_SESSION_ID_LENGTH = 36  # the SuperLink's object-push session id is a uuid4 string
_RECONNECT_SECONDS = 5  # what the SuperLink puts in every PushMessagesResponse


def message_payload_bytes(content: RecordDict) -> int:
    """Return the payload size of a message content: the sum of its records' ``count_bytes()``.

    Parameters
    ----------
    content : RecordDict
        The message content.

    Returns
    -------
    int
        Bytes of array data (npy headers included), config and metric values, and keys.
    """
    return sum(record.count_bytes() for record in content.values())


def _direction_of(message: Message, direction: Direction | None) -> Direction:
    if direction is None:
        return "up" if message.metadata.reply_to_message_id else "down"
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    return direction


def _tree_object_sizes(
    object_id: str, obj: InflatableObject, known: dict[str, int] | None = None
) -> Iterator[tuple[str, int]]:
    """Yield ``(object_id, deflated size)`` of every node of `obj`'s tree, children first.

    A shared object appears once per parent, as in Flower's `iterate_object_tree`. Child ids
    come from the parents' ``children`` (cached by Flower), so array chunks are not re-hashed.
    ``known`` maps object ids to sizes already measured (an id is the SHA-256 of the deflated
    bytes, so equal ids have equal sizes); new sizes are added to it.
    """
    for child_id, child in (obj.children or {}).items():
        yield from _tree_object_sizes(child_id, child, known)
    if known is None:
        yield object_id, len(obj.deflate())
        return
    size = known.get(object_id)
    if size is None:
        size = known[object_id] = len(obj.deflate())
    yield object_id, size


def _object_tree(object_id: str, obj: InflatableObject) -> ObjectTree:
    """Flower's `get_object_tree`, reusing the parents' cached child ids (no re-hashing)."""
    children = [_object_tree(cid, child) for cid, child in (obj.children or {}).items()]
    return ObjectTree(object_id=object_id, children=children)


def message_wire_bytes(
    message: Message, direction: Direction | None = None, known: dict[str, int] | None = None
) -> int:
    """Return the bytes of deflated Flower objects that carry `message` across the Fleet API.

    A downlink (instruction) message is pulled by the SuperNode node by node of its object
    tree, so an object shared by two parents (rare: identical Arrays in two records) counts
    twice. An uplink (reply) message is pushed once per distinct object.

    Parameters
    ----------
    message : Message
        The message as sent or received.
    direction : {"down", "up"} | None, default None
        Server-to-client or client-to-server. None: "up" when the message replies to another.
    known : dict[str, int] | None, default None
        Sizes of objects measured before, by object id (read and extended): a record sent to
        many nodes is deflated once.

    Returns
    -------
    int
        Sum of ``len(obj.deflate())`` over the objects transferred.

    Notes
    -----
    Content-addressed deduplication across messages is not modelled: if the SuperLink already
    holds an identical object (e.g. two clients reply with the same Array in one round), it is
    not pushed again, and this count is an upper bound.
    """
    sizes = list(_tree_object_sizes(message.object_id, message, known))
    if _direction_of(message, direction) == "down":
        return sum(size for _, size in sizes)
    return sum(dict(sizes).values())


def message_control_bytes(message: Message, direction: Direction | None = None) -> int:
    """Return the bytes of the Fleet API protobufs that carry `message`'s metadata and tree.

    The sum of `message_control_split`: request plus response.
    """
    up, down = message_control_split(message, direction)
    return up + down


def message_control_split(message: Message, direction: Direction | None = None) -> tuple[int, int]:
    """Return the Fleet API control bytes of `message` as ``(up, down)``.

    Downlink: ``PullMessagesRequest`` (up) and the ``PullMessagesResponse`` holding the message
    (down). Uplink: ``PushMessagesRequest`` (up) and ``PushMessagesResponse`` (down, it lists
    the objects to push). Built as the SuperNode and SuperLink build them, with ``message_id``
    set to the message's object id as Flower does on the way.

    Parameters
    ----------
    message : Message
        The message as sent or received.
    direction : {"down", "up"} | None, default None
        Server-to-client or client-to-server. None: "up" when the message replies to another.

    Returns
    -------
    tuple[int, int]
        Protobuf ``ByteSize()`` of the request (client to SuperLink) and of the response.
    """
    message_id = message.object_id
    proto = message_to_proto(remove_content_from_message(message))  # a fresh proto
    proto.metadata.message_id = message_id
    tree = _object_tree(message_id, message)
    if _direction_of(message, direction) == "down":
        pull_request = PullMessagesRequest(node=Node(node_id=message.metadata.dst_node_id))
        pull_response = PullMessagesResponse(messages_list=[proto], message_object_trees=[tree])
        return int(pull_request.ByteSize()), int(pull_response.ByteSize())
    push_request = PushMessagesRequest(
        node=Node(node_id=message.metadata.src_node_id),
        messages_list=[proto],
        message_object_trees=[tree],
        clientapp_runtime_list=[0.0],  # a double: its size does not depend on the value
    )
    push_response = PushMessagesResponse(
        reconnect=Reconnect(reconnect=_RECONNECT_SECONDS),
        results={message_id: 0},
        objects_to_push=[node.object_id for node in iterate_object_tree(tree)],
        session_id="0" * _SESSION_ID_LENGTH,
    )
    return int(push_request.ByteSize()), int(push_response.ByteSize())


def message_record_wire_bytes(
    message: Message, name: str, known: dict[str, int] | None = None
) -> int:
    """Return the wire bytes of one record of `message` (0 when it has no such record).

    The deflated record and every object under it (Arrays, chunks), counted as an instruction
    is pulled (`message_wire_bytes`, direction "down").

    Parameters
    ----------
    message : Message
        The message.
    name : str
        The record's key in the message content.
    known : dict[str, int] | None, default None
        Sizes measured before, by object id (as for `message_wire_bytes`).
    """
    if not message.has_content() or name not in message.content:
        return 0
    record = message.content[name]
    return sum(size for _, size in _tree_object_sizes(record.object_id, record, known))


def saved_fraction(spent: int | float, baseline: int | float) -> float:
    """Return the fraction of `baseline` bytes not spent: ``1 - spent / baseline``.

    Parameters
    ----------
    spent : int | float
        Bytes a run sent (negative savings when it sent more than the baseline).
    baseline : int | float
        Bytes of the reference run; 0 (nothing to compare with) gives 0.0.

    Returns
    -------
    float
        The saving as a fraction, e.g. 0.75 for a quarter of the baseline's bytes.
    """
    return 1.0 - spent / baseline if baseline else 0.0


_BYTE_COLUMNS = (
    "payload_bytes",
    "wire_bytes",
    "control_up_bytes",
    "control_down_bytes",
    "state_bytes",
)
_INT_COLUMNS = frozenset(("round", "node_id", *_BYTE_COLUMNS))


@dataclass(frozen=True)
class LedgerRow:
    """One message that crossed between the server and one client.

    Parameters
    ----------
    round : int
        Server round (0 for anything before the first round).
    phase : {"train", "evaluate", "query"}
        Which exchange the message belongs to.
    direction : {"down", "up"}
        Server-to-client or client-to-server.
    node_id : int
        The client's node id.
    kind : str
        What the message carried, e.g. "model", "state", "reply".
    payload_bytes : int
        Records' own byte counts (`message_payload_bytes`).
    wire_bytes : int
        Deflated objects transferred (`message_wire_bytes`), in the message's direction.
    control_up_bytes : int, default 0
        The Fleet API request that carried the message (client to SuperLink).
    control_down_bytes : int, default 0
        The Fleet API response (SuperLink to client), see `message_control_split`.
    state_bytes : int, default 0
        Of `wire_bytes`, those of the CMD state record (`message_record_wire_bytes`).
    """

    round: int
    phase: str
    direction: str
    node_id: int
    kind: str
    payload_bytes: int
    wire_bytes: int
    control_up_bytes: int = 0
    control_down_bytes: int = 0
    state_bytes: int = 0

    def __post_init__(self) -> None:
        """Reject rows that cannot be right."""
        if self.phase not in _PHASES:
            raise ValueError(f"phase must be one of {_PHASES}, got {self.phase!r}")
        if self.direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, got {self.direction!r}")
        for name in _INT_COLUMNS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if min(getattr(self, name) for name in _BYTE_COLUMNS) < 0:
            raise ValueError("byte counts must be non-negative")
        if self.state_bytes > self.wire_bytes:
            raise ValueError("state_bytes cannot exceed wire_bytes")

    @property
    def control_bytes(self) -> int:
        """Both Fleet API protobufs of the message: request plus response."""
        return self.control_up_bytes + self.control_down_bytes

    @property
    def network_up(self) -> int:
        """Bytes this message moved from the client to the SuperLink (wire and control)."""
        return (self.wire_bytes if self.direction == "up" else 0) + self.control_up_bytes

    @property
    def network_down(self) -> int:
        """Bytes this message moved from the SuperLink to the client (wire and control)."""
        return (self.wire_bytes if self.direction == "down" else 0) + self.control_down_bytes


_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(LedgerRow))
_TOTAL_KEYS = (
    "bytes_up",
    "bytes_down",
    "wire_up",
    "wire_down",
    "control_up",
    "control_down",
    "state_up",
    "state_down",
    "payload_up",
    "payload_down",
    "messages_up",
    "messages_down",
)


class ByteLedger:
    """An append-only list of `LedgerRow` with totals and CSV persistence.

    Parameters
    ----------
    rows : Iterable[LedgerRow], default ()
        Initial rows.
    """

    # Object sizes kept between messages (a round's shared records), dropped beyond this many.
    KNOWN_SIZES_LIMIT = 65_536

    def __init__(self, rows: Iterable[LedgerRow] = ()) -> None:
        self._rows: list[LedgerRow] = []
        self._known_sizes: dict[str, int] = {}  # object id -> deflated size
        self.extend(rows)

    @property
    def rows(self) -> tuple[LedgerRow, ...]:
        """All rows, in the order they were added."""
        return tuple(self._rows)

    def __len__(self) -> int:
        """Return the number of rows."""
        return len(self._rows)

    def __iter__(self) -> Iterator[LedgerRow]:
        """Iterate over the rows in order."""
        return iter(tuple(self._rows))

    def append(self, row: LedgerRow) -> None:
        """Add one row."""
        if not isinstance(row, LedgerRow):
            raise TypeError(f"expected a LedgerRow, got {type(row).__name__}")
        self._rows.append(row)

    def extend(self, rows: Iterable[LedgerRow]) -> None:
        """Add rows (e.g. another `ByteLedger`) in order."""
        for row in rows:
            self.append(row)

    def record_message(
        self,
        round: int,
        phase: Phase,
        direction: Direction,
        node_id: int,
        message: Message,
        kind: str = "message",
        state_record: str | None = STATE_RECORD,
    ) -> LedgerRow:
        """Measure a real message and add its row.

        Parameters
        ----------
        round : int
            Server round.
        phase : {"train", "evaluate", "query"}
            Which exchange the message belongs to.
        direction : {"down", "up"}
            Server-to-client (instruction) or client-to-server (reply).
        node_id : int
            The client's node id.
        message : Message
            The message as sent or received. An error reply has no content: payload 0. A reply
            the SuperLink made itself (source node ``SUPERLINK_NODE_ID``) never crossed the
            network: wire and control 0.
        kind : str, default "message"
            What the message carried.
        state_record : str | None, default "cmd-state"
            The content record whose wire bytes count as state (None: no state).

        Returns
        -------
        LedgerRow
            The row added.
        """
        if len(self._known_sizes) > self.KNOWN_SIZES_LIMIT:
            self._known_sizes = {}
        known = self._known_sizes  # the state record's objects were sized with the message's
        payload = message_payload_bytes(message.content) if message.has_content() else 0
        wire = message_wire_bytes(message, direction, known)
        control_up, control_down = message_control_split(message, direction)
        state = message_record_wire_bytes(message, state_record, known) if state_record else 0
        if direction == "up" and message.metadata.src_node_id == SUPERLINK_NODE_ID:
            # The SuperLink wrote this reply itself (an error such as NODE_UNAVAILABLE for a
            # node that stopped sending heartbeats): nothing crossed the Fleet API.
            wire = control_up = control_down = state = 0
        row = LedgerRow(
            round=int(round),
            phase=phase,
            direction=direction,
            node_id=int(node_id),
            kind=kind,
            payload_bytes=payload,
            wire_bytes=wire,
            control_up_bytes=control_up,
            control_down_bytes=control_down,
            state_bytes=state,
        )
        self.append(row)
        return row

    def totals(
        self,
        *,
        round: int | None = None,
        phase: Phase | None = None,
        node_id: int | None = None,
    ) -> dict[str, int]:
        """Sum the rows that match every given filter.

        Parameters
        ----------
        round : int | None, default None
            Only this round.
        phase : {"train", "evaluate", "query"} | None, default None
            Only this phase.
        node_id : int | None, default None
            Only this client.

        Returns
        -------
        dict[str, int]
            ``bytes_up``/``bytes_down``: what crossed the network each way (wire and control,
            see `LedgerRow.network_up`); ``wire_up``/``wire_down``: the objects of replies and
            of instructions; ``control_up``/``control_down``: the Fleet API requests and
            responses; ``state_up``/``state_down``: wire bytes of CMD state;
            ``payload_up``/``payload_down`` and ``messages_up``/``messages_down`` by the
            messages' direction.
        """
        out = dict.fromkeys(_TOTAL_KEYS, 0)
        for row in self._rows:
            if round is not None and row.round != round:
                continue
            if phase is not None and row.phase != phase:
                continue
            if node_id is not None and row.node_id != node_id:
                continue
            out["bytes_up"] += row.network_up
            out["bytes_down"] += row.network_down
            out[f"wire_{row.direction}"] += row.wire_bytes
            out["control_up"] += row.control_up_bytes
            out["control_down"] += row.control_down_bytes
            out[f"state_{row.direction}"] += row.state_bytes
            out[f"payload_{row.direction}"] += row.payload_bytes
            out[f"messages_{row.direction}"] += 1
        return out

    def total_bytes(self) -> int:
        """Return what crossed the network, both ways: the project's "total" bytes."""
        totals = self.totals()
        return totals["bytes_up"] + totals["bytes_down"]

    def saved_vs(self, baseline: ByteLedger | int) -> float:
        """Return the fraction of network bytes saved against a baseline run.

        Network bytes (wire and control, up plus down) are the headline number, as in
        ``summary.json``'s ``total_bytes_up``/``total_bytes_down`` and the comparison report.

        Parameters
        ----------
        baseline : ByteLedger | int
            The reference run's ledger, or its total network bytes.

        Returns
        -------
        float
            ``1 - self.total_bytes() / baseline bytes`` (0.0 for an empty baseline).
        """
        base = baseline.total_bytes() if isinstance(baseline, ByteLedger) else int(baseline)
        return saved_fraction(self.total_bytes(), base)

    def round_totals(self, round: int) -> dict[str, int]:
        """Return `totals` for one round."""
        return self.totals(round=round)

    def rounds(self) -> list[int]:
        """Return the rounds that have rows, sorted."""
        return sorted({row.round for row in self._rows})

    def node_totals(self) -> dict[int, dict[str, int]]:
        """Return `totals` per client node id, sorted by node id."""
        return {node: self.totals(node_id=node) for node in sorted({r.node_id for r in self._rows})}

    def first_state_messages(self) -> dict[str, int]:
        """What each node's first training instruction with CMD state cost, against a dense one.

        Network bytes (wire and control) of every node's first ``train`` / ``down`` message
        whose ``state_bytes`` are not 0 (in a cross-device run: the message that brings a
        node the whole state), and of the largest training instruction of round 1 (the dense
        model every method starts with).

        Returns
        -------
        dict
            ``nodes`` (how many nodes got state), ``max_bytes``, ``mean_bytes`` (0 when none),
            ``dense_bytes`` (0 without a round 1), and ``over_dense`` (how many first messages
            were larger than the dense one).
        """
        first: dict[int, int] = {}
        dense = 0
        for row in self._rows:
            if row.phase != "train" or row.direction != "down":
                continue
            size = row.wire_bytes + row.control_bytes
            if row.round == 1:
                dense = max(dense, size)
            if row.state_bytes and row.node_id not in first:
                first[row.node_id] = size
        sizes = list(first.values())
        return {
            "nodes": len(sizes),
            "max_bytes": max(sizes, default=0),
            "mean_bytes": round(sum(sizes) / len(sizes)) if sizes else 0,
            "dense_bytes": dense,
            "over_dense": sum(size > dense for size in sizes) if dense else 0,
        }

    def to_rows(self) -> list[dict[str, int | str]]:
        """Return the rows as plain dicts (JSON-ready)."""
        return [asdict(row) for row in self._rows]

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger as CSV, atomically (temporary file, then rename).

        Parameters
        ----------
        path : str | os.PathLike[str]
            Destination file; its directory must exist.
        """
        target = Path(path)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=_COLUMNS)
                writer.writeheader()
                writer.writerows(self.to_rows())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str]) -> ByteLedger:
        """Read a ledger written by `to_csv`.

        Parameters
        ----------
        path : str | os.PathLike[str]
            CSV file with exactly the `LedgerRow` columns.

        Returns
        -------
        ByteLedger
            The rows, in file order.

        Raises
        ------
        ValueError
            If the header differs or a value does not parse.
        """
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != _COLUMNS:
                raise ValueError(f"{path}: expected columns {_COLUMNS}, got {reader.fieldnames}")
            rows = []
            for line, raw in enumerate(reader, start=2):
                try:
                    values = {
                        key: int(raw[key]) if key in _INT_COLUMNS else raw[key] for key in _COLUMNS
                    }
                    rows.append(LedgerRow(**values))  # type: ignore[arg-type]
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{path}, line {line}: {err}") from err
        return cls(rows)
