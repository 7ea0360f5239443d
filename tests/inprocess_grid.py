"""A small in-process Flower Grid: the real ServerApp and ClientApp code, no Ray, no network.

Messages cross as Flower's transport moves them: deflated into their object tree and inflated
again on the other side. Every (instruction, reply) pair is kept so tests can read what crossed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from cmd_fl.ledger import message_control_split, message_wire_bytes

# (node_id, server_round, reply) -> reply to deliver instead (tests use it to corrupt replies)
Tamper = Callable[[int, int, Message], Message]
# (node_id, server_round) -> True if the node fails (an error reply) this round
Failure = Callable[[int, int], bool]


def transmit(message: Message) -> Message:
    """The message as the other side receives it: deflated objects, inflated again."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    received = inflate_object_from_contents(message.object_id, contents)
    assert isinstance(received, Message)
    received.metadata.__dict__["_message_id"] = message.metadata.message_id
    return received


@dataclass
class Exchange:
    """One instruction and the reply that came back."""

    server_round: int
    node_id: int
    instruction: Message
    reply: Message


def network_bytes(exchanges: Iterable[Exchange]) -> dict[str, int]:
    """What the exchanges moved, measured on the messages as `ByteLedger.totals` counts it.

    ``up``/``down``: the objects of the replies / instructions plus every Fleet API request /
    response; ``wire_up``/``wire_down``: the objects alone.
    """
    out = dict.fromkeys(("up", "down", "wire_up", "wire_down"), 0)
    for exchange in exchanges:
        for message, direction in ((exchange.instruction, "down"), (exchange.reply, "up")):
            wire = message_wire_bytes(message, direction)  # type: ignore[arg-type]
            request, response = message_control_split(message, direction)  # type: ignore[arg-type]
            out[f"wire_{direction}"] += wire
            out[direction] += wire
            out["up"] += request
            out["down"] += response
    return out


def csv_network_bytes(rows: Iterable[dict[str, str]]) -> dict[str, int]:
    """Network bytes ``up`` and ``down`` of ``ledger.csv`` rows (as `csv.DictReader` reads them).

    A message's objects count in its direction, its Fleet API request up, its response down.
    """
    out = {"up": 0, "down": 0}
    for row in rows:
        out[row["direction"]] += int(row["wire_bytes"])
        out["up"] += int(row["control_up_bytes"])
        out["down"] += int(row["control_down_bytes"])
    return out


@dataclass
class InProcessGrid(Grid):
    """Runs a ClientApp for each message, in this process, with per-node persistent state."""

    client_app: ClientApp
    num_nodes: int
    run_config: dict[str, Any]
    tamper: Tamper | None = None
    failure: Failure | None = None
    exchanges: list[Exchange] = field(default_factory=list)
    queries: list[Exchange] = field(default_factory=list)
    # Node i's id (it holds partition i); default 1000 + i. A real SuperLink draws them at random.
    node_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.node_ids:
            self.node_ids = [1000 + i for i in range(self.num_nodes)]
        if len(set(self.node_ids)) != self.num_nodes:
            raise ValueError("node_ids must be num_nodes distinct ids")
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": self.num_nodes},
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
            for i, node in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1

    def set_run(self, run: Run) -> None:
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(1)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        # By id, as a SuperLink's set of random ids comes out: not in partition order.
        return sorted(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = message.metadata.dst_node_id
            server_round = int(message.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
            delivered = transmit(message)
            if self.failure is not None and self.failure(node, server_round):
                reply = Message(
                    Error(ErrorCode.CLIENT_APP_CRASHED, "node failed"), reply_to=delivered
                )
            else:
                try:
                    reply = self.client_app(delivered, self.contexts[node])
                except Exception as err:
                    reply = Message(
                        Error(
                            ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"
                        ),
                        reply_to=delivered,
                    )
            reply = transmit(reply)
            if self.tamper is not None and reply.has_content():
                reply = self.tamper(node, server_round, reply)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            exchange = Exchange(server_round, node, message, reply)
            # Queries (sampling by data) apart: tests read `exchanges` as the model's traffic.
            is_query = message.metadata.message_type == MessageType.QUERY
            (self.queries if is_query else self.exchanges).append(exchange)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))
