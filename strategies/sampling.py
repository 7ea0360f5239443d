"""Which nodes train each round: FedAvg's random sample, drawn so that every method picks the same
data for the same seed.

Flower samples node ids, and node ids are new at every start (a simulated SuperNode gets a random
one each run). Two runs with the same seed, one FedAvg and one CMD, then train different clients
from round 1 on, and the round-to-round luck of which clients were drawn swamps the difference the
method makes. With ``sample_by="data"`` the strategy asks each node once which data it trains on
(a small ``query`` message, metered like every other) and draws from the nodes ordered by that key,
so the same seed draws the same partitions in every run.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from cmd_fl.ledger import ByteLedger
from cmd_fl.payload import ASK, CONFIG, DATA_KEY, SERVER_ROUND

logger = logging.getLogger("flwr.cmd_fl")

SAMPLE_BY = ("data", "node-id")
# Keys are partition ids or CRC-32s of data paths.
MAX_DATA_KEY = 2**32 - 1


def wait_for_nodes(grid: Grid, minimum: int) -> list[int]:
    """The connected node ids, once at least ``minimum`` are connected (Flower's wait)."""
    while len(nodes := list(grid.get_node_ids())) < minimum:
        logger.info(
            "Waiting for nodes to connect: %d connected (minimum required: %d).",
            len(nodes),
            minimum,
        )
        time.sleep(1)
    return nodes


def data_key_query(server_round: int, node_id: int) -> Message:
    """The one-off question "which data do you train on?" to ``node_id``."""
    config = ConfigRecord({SERVER_ROUND: server_round, ASK: DATA_KEY})
    return Message(
        content=RecordDict({CONFIG: config}), message_type=MessageType.QUERY, dst_node_id=node_id
    )


def data_key_answer(reply: Message) -> int | None:
    """The key a query's reply carries, or None for an error or malformed reply."""
    if not reply.has_content():
        return None
    record = reply.content.metric_records.get(DATA_KEY)
    value = None if record is None else record.get(DATA_KEY)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DATA_KEY:
        return None
    return value


class NodeSampler:
    """Draws each round's nodes with its own RNG.

    Not Python's global one, which Flower's sampling uses: Flower's message transfer draws from
    it too, for the jitter of its retry delays, so how often depends on timing and two runs with
    one seed would draw different nodes from the first retry on.

    Parameters
    ----------
    ledger : ByteLedger
        Where the data-key queries and their replies are metered (phase ``"query"``).
    sample_by : {"data", "node-id"}
        ``"data"``: draw from the nodes ordered by the data they train on (asked once per node,
        only when a round samples fewer than all connected nodes). ``"node-id"``: Flower's own
        draw from the nodes in the order the grid lists them (the default).
    timeout : float
        Seconds to wait for the answers to a query; a node that does not answer in time is
        ordered after the others, by node id.
    seed : int or None
        Seed of the draws (None: from the operating system).
    """

    def __init__(
        self,
        ledger: ByteLedger,
        sample_by: str = "node-id",
        timeout: float = 600.0,
        seed: int | None = None,
    ):
        if sample_by not in SAMPLE_BY:
            raise ValueError(f"sample_by must be one of {SAMPLE_BY}, got {sample_by!r}")
        self.ledger = ledger
        self.sample_by = sample_by
        self.timeout = timeout
        self.rng = random.Random(seed)
        # Node id -> its data key (None: asked, no valid answer).
        self.data_keys: dict[int, int | None] = {}

    def sample(
        self, grid: Grid, server_round: int, fraction: float, min_nodes: int, min_available: int
    ) -> list[int]:
        """FedAvg's sample: ``fraction`` of the connected nodes, at least ``min_nodes``, sorted."""
        size = max(int(len(list(grid.get_node_ids())) * fraction), min_nodes)
        nodes = wait_for_nodes(grid, max(min_available, size))
        if self.sample_by == "data" and size < len(nodes):
            nodes = self.data_order(grid, server_round, nodes)
        return sorted(self.rng.sample(nodes, size))

    def data_keys_of(self, nodes: list[int]) -> list[int]:
        """The sorted data keys of those ``nodes`` that gave one (asked before)."""
        keys = (self.data_keys.get(node) for node in nodes)
        return sorted(key for key in keys if key is not None)

    def rng_state(self) -> list[Any]:
        """The RNG's state, JSON-friendly (for checkpoints)."""
        version, internal, gauss = self.rng.getstate()
        return [version, list(internal), gauss]

    def set_rng_state(self, state: list[Any]) -> None:
        """Restore what :meth:`rng_state` returned."""
        version, internal, gauss = state
        self.rng.setstate((version, tuple(internal), gauss))

    def data_order(self, grid: Grid, server_round: int, nodes: list[int]) -> list[int]:
        """``nodes`` ordered by their data keys (asking the nodes not asked before)."""
        unknown = [node for node in nodes if node not in self.data_keys]
        if unknown:
            self.data_keys.update(self.ask(grid, server_round, unknown))
        no_key = MAX_DATA_KEY + 1

        def order(node: int) -> tuple[int, int]:
            key = self.data_keys[node]
            return (no_key if key is None else key, node)

        return sorted(nodes, key=order)

    def ask(self, grid: Grid, server_round: int, nodes: list[int]) -> dict[int, int | None]:
        """Query ``nodes`` for their data keys; every message both ways goes into the ledger."""
        queries = [data_key_query(server_round, node) for node in nodes]
        logger.info(
            "round %d: asking %d nodes which data they train on (sample-by = data)",
            server_round,
            len(nodes),
        )
        for query in queries:
            self.ledger.record_message(
                server_round, "query", "down", query.metadata.dst_node_id, query, kind=DATA_KEY
            )
        keys: dict[int, int | None] = dict.fromkeys(nodes)
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            node = reply.metadata.src_node_id
            self.ledger.record_message(server_round, "query", "up", node, reply, kind=DATA_KEY)
            if node in keys:
                keys[node] = data_key_answer(reply)
        unanswered = sum(key is None for key in keys.values())
        if unanswered:
            logger.warning(
                "round %d: %d of %d nodes gave no data key; they are drawn after the others, "
                "in node-id order (runs are not paired on them)",
                server_round,
                unanswered,
                len(nodes),
            )
        return keys
