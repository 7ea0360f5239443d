"""FedAvg with a byte ledger, reply validation, and model checksums: the baseline and the base
of every cmd-fl strategy."""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from cmd_fl.checkpoint import prefixed, unprefixed
from cmd_fl.codec import CodecSpec, encoded_nbytes
from cmd_fl.coded import CODED_UPDATE, CodedUpdate, codec_config
from cmd_fl.downlink import CODED_DENSE, KEYFRAME_DENSE, PublicModel
from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import ByteLedger, LedgerRow
from cmd_fl.payload import (
    CONFIG,
    DENSE_MODEL,
    METRICS,
    MODEL_CHECKSUM,
    NUM_EXAMPLES,
    SERVER_ROUND,
    extras_nbytes,
    model_checksum,
)
from cmd_fl.wire import WireFormatError, from_array_record, pack_tensors, unpack_tensors
from strategies.aggregation import RunningAverage
from strategies.sampling import NodeSampler

logger = logging.getLogger("flwr.cmd_fl")

# Bytes a reply may carry beyond the round's downlink payload (metrics, record keys).
REPLY_ALLOWANCE = 16 * 1024


class RejectedReply(ValueError):
    """A client reply that must not be aggregated; the message says why."""


@dataclass
class ParsedReply:
    """A validated training reply."""

    node_id: int
    num_examples: float
    arrays: list[np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Envelope:
    """What the first pass of `MeteredFedAvg.aggregate_train` keeps of one reply."""

    index: int  # arrival order
    node_id: int
    problem: str | None  # why the reply cannot be trusted, from `_reply_node`
    payload_bytes: int
    digest: str  # the content's object id: the summation order


def only_record(content: RecordDict, name: str) -> ArrayRecord:
    """The reply's one array record, which must be ``name``."""
    if set(content.array_records) != {name}:
        raise RejectedReply(f"array records {sorted(content.array_records)}, expected {name}")
    return content.array_records[name]


def finite_extras(extras: list[np.ndarray]) -> list[np.ndarray]:
    """The unpacked extras of a reply, refused if a float one holds NaN or Inf."""
    for value in extras:
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise RejectedReply("extras hold NaN or Inf")
    return extras


class MeteredFedAvg(FedAvg):
    """FedAvg whose every message is measured, and whose replies are validated before averaging.

    Replies that are errors, malformed (keys, shapes, dtypes, NaN/Inf), trained on a different
    model than the one sent (checksum), or that claim a non-positive or too large number of
    examples are dropped with a logged reason and listed in ``rejections``; they never touch the
    model. A round with fewer than ``min_valid_replies`` valid replies keeps the previous model.

    Parameters
    ----------
    layout : ParameterLayout
        The model's layout (for checksums and validation).
    ledger : ByteLedger
        Where every message's bytes are recorded.
    fraction_train : float
        Share of connected nodes sampled for training each round. Default 1.0.
    min_train_nodes : int
        Fewest nodes sampled for training. Default 2.
    min_available_nodes : int
        Nodes that must be connected before a round starts. Default 2.
    fraction_evaluate : float
        Share of nodes for client-side evaluation. Default 0.0: evaluation runs on the server
        (``evaluate_fn``), so no model is sent for it.
    min_evaluate_nodes : int
        Fewest nodes sampled for client-side evaluation. Default 0.
    min_valid_replies : int
        Fewest valid replies to update the model. Default 1.
    max_num_examples : int or None
        Replies claiming more examples are rejected. Default None (no bound).
    codec : CodecSpec or None
        Codec of the training replies' updates (`cmd_fl.codec`); None or ``none``: replies
        carry the model as it is.
    code_downlink : bool
        With a codec, also code the training messages: a delta against the public model the
        nodes hold (`cmd_fl.downlink`), a keyframe (or the model as it is) to a node that does
        not hold it. Default True. Evaluation messages always carry the global model as it is.
    keyframes : bool
        With a coded downlink, a node that does not hold the public model's base gets the model
        coded on its own (`cmd_fl.downlink.keyframe_spec`) from round 2 on, instead of float32.
        Default True.
    sample_by : {"node-id", "data"}
        How a round that samples fewer than all nodes draws them (`strategies.sampling`).
        Default ``"node-id"``, Flower's draw. ``"data"`` asks each node once which data it trains
        on and draws by that, so runs with the same seed train the same data: the nodes'
        ClientApp must answer the query (``simulations.client_app`` does).
    sample_seed : int or None
        Seed of the sampler's own RNG. Default None: seeded by the operating system.
    max_abs_value : float
        Replies holding a float of larger magnitude are rejected (finite but absurd values
        would wreck the average). Default 1e6.

    Besides, a node that replies twice in a round has all its replies dropped, a node that was
    not sampled is not heard, and a reply may be at most as large as the larger of the round's
    largest downlink payload and a coded reply's size (``coded_reply_bytes``), plus what the
    protocol adds to replies (``extra_reply_bytes``) and ``REPLY_ALLOWANCE`` for metrics.
    """

    def __init__(
        self,
        layout: ParameterLayout,
        ledger: ByteLedger,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 0,
        min_valid_replies: int = 1,
        max_num_examples: int | None = None,
        max_abs_value: float = 1e6,
        codec: CodecSpec | None = None,
        code_downlink: bool = True,
        keyframes: bool = True,
        sample_by: str = "node-id",
        sample_seed: int | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
        )
        self.layout = layout
        self.ledger = ledger
        self.sampler = NodeSampler(ledger, sample_by, seed=sample_seed)
        self.min_valid_replies = min_valid_replies
        self.max_num_examples = max_num_examples
        self.rejections: list[dict[str, Any]] = []
        self.round_info: dict[int, dict[str, Any]] = {}
        self.max_abs_value = max_abs_value
        self._global: ArrayRecord | None = None
        self._sampled: dict[int, set[int]] = {}
        self._instructions: dict[int, list[Message]] = {}
        self._reply_bound: dict[int, int] = {}
        self.sent_checksums: dict[int, int] = {}
        self.codec = codec if codec is not None and codec.name != "none" else None
        self._sent_flat: np.ndarray | None = None  # the flat model sent (coded replies' base)
        self.downlink = (
            PublicModel(self.codec, layout.n_weights)
            if self.codec is not None and code_downlink
            else None
        )
        # Global minus public model of the round (downlink error feedback), or None.
        self._downlink_lag: np.ndarray | None = None
        self.keyframes = keyframes and self.downlink is not None
        # This round's keyframe: its model's checksum and the nodes it went to.
        self._keyframe_sent: tuple[int, int, set[int]] | None = None  # (round, checksum, nodes)
        self._keyframes_paused = False  # for the first round after a resume

    # --- sampling and sending -----------------------------------------------------------------
    def sample_train_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """Sample this round's training nodes as FedAvg does (see `NodeSampler`)."""
        return self._sample(grid, server_round, self.fraction_train, self.min_train_nodes)

    def _sample(self, grid: Grid, server_round: int, fraction: float, min_nodes: int) -> list[int]:
        """FedAvg's sampling: ``fraction`` of the connected nodes, at least ``min_nodes``."""
        return self.sampler.sample(
            grid, server_round, fraction, min_nodes, self.min_available_nodes
        )

    def trained_data_keys(self, server_round: int) -> list[int]:
        """The sorted data keys of the nodes sampled to train in ``server_round`` (sampling by
        data; empty when no node was asked)."""
        return self.sampler.data_keys_of(list(self._sampled.get(server_round, ())))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and build (and meter) one training message per node."""
        if self.fraction_train == 0.0:
            return []
        node_ids = self.sample_train_nodes(grid, server_round)
        # A copy per round: messages already sent must not change when the next round's
        # config is written (Flower passes the same ConfigRecord every round).
        config = ConfigRecord(dict(config.items()))
        config[SERVER_ROUND] = server_round
        if self.codec is not None:
            for key, value in codec_config(self.codec).items():
                config[key] = value
        self._keyframe_sent = None  # until train_messages makes this round's
        messages = self.train_messages(server_round, arrays, config, node_ids)
        largest = 0
        for message in messages:
            row = self.ledger.record_message(
                server_round, "train", "down", message.metadata.dst_node_id, message
            )
            largest = max(largest, row.payload_bytes)
        self._sampled[server_round] = set(node_ids)
        self._instructions[server_round] = messages  # the Grid sets their ids when it pushes
        largest = max(largest, self.coded_reply_bytes(server_round))
        self._reply_bound[server_round] = (
            largest + self.extra_reply_bytes(server_round) + REPLY_ALLOWANCE
        )
        logger.info("round %d: sent %d training messages", server_round, len(messages))
        return messages

    def train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        """Dense FedAvg messages: the whole model to every node (coded where it can be)."""
        self._global = arrays
        sent = {key: arr.numpy() for key, arr in arrays.items()}
        extra_tensors = self.layout.extra_tensors(sent)
        extras = pack_tensors(extra_tensors)
        if self.downlink is None:
            self._sent_flat = self.layout.flatten_numpy(sent)
            self.sent_checksums[server_round] = model_checksum(self._sent_flat, extras)
            content = RecordDict({DENSE_MODEL: arrays, CONFIG: config})
            return [
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                for node in node_ids
            ]
        blob = self.downlink.advance(server_round, self.layout.flatten_numpy(sent), self._as_loaded)
        public = self.downlink.flat
        assert public is not None
        self._sent_flat = public
        self.sent_checksums[server_round] = model_checksum(public, extras)
        config.update(self.downlink.config())
        dense = RecordDict(
            {
                DENSE_MODEL: ArrayRecord(self.layout.state_dict(public, extra_tensors)),
                CONFIG: config,
            }
        )
        coded = keyframe = None
        if blob is not None:
            coded = RecordDict({CODED_DENSE: CodedUpdate(blob, extras).to_record(), CONFIG: config})
            keyframe_blob = self.keyframe(server_round, self._as_loaded, extras)
            if keyframe_blob is not None:
                record = CodedUpdate(keyframe_blob, extras).to_record()
                keyframe = RecordDict({KEYFRAME_DENSE: record, CONFIG: config})
        return self._downlink_messages(server_round, node_ids, dense, coded, keyframe)

    def keyframe(
        self,
        server_round: int,
        assemble: Callable[[np.ndarray], np.ndarray],
        extras: np.ndarray,
        indices: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """This round's keyframe blob (None without keyframes); the checksum of the model a
        node decodes from it, which that node's reply must carry, is kept for the round."""
        if not self.keyframes or self.downlink is None or self.downlink.flat is None:
            return None
        if self._keyframes_paused:
            self._keyframes_paused = False
            return None
        blob, flat = self.downlink.keyframe(assemble, indices)
        self._keyframe_sent = (server_round, model_checksum(flat, extras), set())
        return blob

    def sent_keyframe(self, server_round: int, node_id: int | None) -> bool:
        """Whether ``node_id`` was sent ``server_round``'s keyframe."""
        sent = self._keyframe_sent
        return sent is not None and sent[0] == server_round and node_id in sent[2]

    def expected_checksum(self, server_round: int, node_id: int | None) -> int | None:
        """The checksum of the model ``node_id`` was sent in ``server_round`` (its keyframe's,
        or the round's model), None if no model was sent."""
        if self._keyframe_sent is not None and self.sent_keyframe(server_round, node_id):
            return self._keyframe_sent[1]
        return self.sent_checksums.get(server_round)

    def note_downlink_lag(self, target: np.ndarray) -> None:
        """Keep ``target - public`` of the round, added to its aggregate (error feedback)."""
        assert self.downlink is not None
        feedback = self.downlink.spec.error_feedback
        self._downlink_lag = self.downlink.lag(target) if feedback else None

    def _as_loaded(self, flat: np.ndarray) -> np.ndarray:
        """A flat model as a client holds it once loaded (cast to the tensors' dtypes)."""
        return self.layout.flatten_numpy(self.layout.unflatten(flat))

    def _downlink_messages(
        self,
        server_round: int,
        node_ids: list[int],
        whole: RecordDict,
        coded: RecordDict | None,
        keyframe: RecordDict | None = None,
    ) -> list[Message]:
        """The coded content to nodes that hold the base version; the keyframe, if any, or the
        whole model to the others."""
        assert self.downlink is not None
        messages = []
        for node in node_ids:
            if coded is not None and self.downlink.holds_base(node):
                content = coded
            elif keyframe is not None:
                content = keyframe
                self.note_keyframe(server_round, node)
            else:
                content = whole
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
            )
        return messages

    def note_keyframe(self, server_round: int, node_id: int) -> None:
        """``node_id`` is sent this round's keyframe."""
        assert self._keyframe_sent is not None and self._keyframe_sent[0] == server_round
        self._keyframe_sent[2].add(node_id)

    def coded_reply_bytes(self, server_round: int) -> int:
        """Payload bytes a coded reply may take (the bound must admit it when the downlink is
        coded too, or smaller than the reply); 0 without a codec."""
        if self.codec is None:
            return 0
        extras = extras_nbytes(self.layout.extra_specs())
        return encoded_nbytes(self.codec, self.layout.n_weights) + extras

    # --- receiving ----------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Meter, validate and average the replies one at a time; None keeps the previous model.

        A first pass, in arrival order, reads each reply's envelope (its node, so that a node
        that replied twice loses every reply, and its size) and meters it. The second parses and
        validates one reply at a time and adds it into a `RunningAverage`, dropping its parsed
        arrays before the next is read: the server holds one parsed model, however many replies
        there are. It takes them in the order of their content's digest (Flower's content
        address ``RecordDict.object_id``, a SHA-256 tree over the reply's raw bytes that the
        ledger has just computed), not in arrival order, so the float sums, and with them a run
        with the same seed, repeat bitwise. Rejections are recorded in arrival order.

        ``replies`` is read twice: a ``Sequence`` is indexed (it may build its messages on
        demand), any other iterable is listed first (its messages, not their parsed arrays).
        """
        messages = replies if isinstance(replies, Sequence) else list(replies)
        instructions = {
            m.metadata.message_id: m.metadata.dst_node_id
            for m in self._instructions.pop(server_round, [])
            if m.metadata.message_id
        }
        envelopes: list[_Envelope] = []
        for index, reply in enumerate(messages):
            node_id, problem = self._reply_node(reply, instructions)
            row = self.ledger.record_message(server_round, "train", "up", node_id, reply)
            if self.downlink is not None and not problem:
                # A keyframe's model is not the public one: its node holds no public version.
                holds = self._proves_model(server_round, reply)
                self.downlink.note_reply(
                    node_id, holds and not self.sent_keyframe(server_round, node_id)
                )
            digest = reply.content.object_id if reply.has_content() else ""
            envelopes.append(_Envelope(index, node_id, problem, row.payload_bytes, digest))
        counts = Counter(envelope.node_id for envelope in envelopes)
        failures: dict[int, tuple[int, str]] = {}  # arrival index -> (node, reason)
        candidates: list[_Envelope] = []
        for envelope in envelopes:
            try:
                if envelope.problem:
                    raise RejectedReply(envelope.problem)
                count = counts[envelope.node_id]
                self._check_envelope(server_round, envelope.node_id, count, envelope.payload_bytes)
                candidates.append(envelope)
            except RejectedReply as err:
                failures[envelope.index] = (envelope.node_id, str(err))

        average = RunningAverage()
        accepted: list[tuple[float, dict[str, float]]] = []  # (num-examples, metrics)
        for envelope in sorted(candidates, key=lambda e: e.digest):
            try:
                parsed = self.parse_train_reply(server_round, messages[envelope.index])
                self._check_magnitudes(parsed)
                average.add(parsed.arrays, parsed.num_examples)  # all or nothing
            except (RejectedReply, WireFormatError, KeyError, TypeError, ValueError) as err:
                failures[envelope.index] = (envelope.node_id, str(err))
                continue
            accepted.append((parsed.num_examples, parsed.metrics))
            del parsed  # before the next reply is parsed
        for index in sorted(failures):
            self.reject(server_round, *failures[index])

        if len(accepted) < max(1, self.min_valid_replies):
            logger.warning(
                "round %d: %d valid replies (< %d): the model is unchanged",
                server_round,
                len(accepted),
                max(1, self.min_valid_replies),
            )
            return None, None
        averaged = average.result()
        del average  # its float64 sums, before the subclass builds the new model
        arrays = self.apply_average(server_round, averaged)
        weights = [examples for examples, _ in accepted]
        metrics = MetricRecord({NUM_EXAMPLES: int(sum(weights)), "num-replies": len(accepted)})
        keys = sorted(set.intersection(*(set(m) for _, m in accepted)))
        for key in keys:
            values = [m[key] for _, m in accepted]
            metrics[key] = float(np.average(values, weights=weights))
        return arrays, metrics

    def _proves_model(self, server_round: int, reply: Message) -> bool:
        """Whether the reply's checksum shows its node trained on the model sent to it this
        round (the round's model, or its keyframe)."""
        if reply.has_error() or METRICS not in reply.content.metric_records:
            return False
        sent = self.expected_checksum(server_round, reply.metadata.src_node_id)
        checksum = reply.content.metric_records[METRICS].get(MODEL_CHECKSUM)
        return sent is not None and checksum == sent

    @staticmethod
    def _reply_node(reply: Message, instructions: dict[str, int]) -> tuple[int, str | None]:
        """The node a reply is from, and why it cannot be trusted (None if it can).

        A reply is matched to its instruction: the SuperLink answers for a node that vanished
        with an error reply of its own (source: the SuperLink), which belongs to that node.
        """
        source = reply.metadata.src_node_id
        if not instructions:  # messages that were never pushed (unit tests): trust the source
            return source, None
        target = instructions.get(reply.metadata.reply_to_message_id)
        if target is None:
            return source, "reply answers no instruction of this round"
        if source == SUPERLINK_NODE_ID:
            return target, None
        if source != target:
            return source, f"reply answers node {target}'s instruction"
        return target, None

    def _check_envelope(
        self, server_round: int, node_id: int, count: int, payload_bytes: int
    ) -> None:
        """Who may reply this round, once, and how large the reply may be."""
        if count > 1:
            raise RejectedReply(f"node sent {count} replies this round (all are dropped)")
        sampled = self._sampled.get(server_round)
        if sampled is not None and node_id not in sampled:
            raise RejectedReply("node was not sampled this round")
        bound = self._reply_bound.get(server_round)
        if bound is not None and payload_bytes > bound:
            raise RejectedReply(f"reply of {payload_bytes} B exceeds the round's bound {bound} B")

    def _check_magnitudes(self, parsed: ParsedReply) -> None:
        for value in parsed.arrays:
            if value.dtype.kind == "f" and value.size:
                largest = float(np.max(np.abs(value)))
                if largest > self.max_abs_value:
                    raise RejectedReply(
                        f"a value of magnitude {largest:.3g} exceeds max_abs_value "
                        f"{self.max_abs_value:g}"
                    )

    def extra_reply_bytes(self, server_round: int) -> int:
        """Bytes a reply may carry beyond what the round's downlink carried (0 for FedAvg)."""
        return 0

    def reject(self, server_round: int, node_id: int, reason: str) -> None:
        """Log and record a dropped reply."""
        logger.warning("round %d: rejected reply from node %d: %s", server_round, node_id, reason)
        self.rejections.append({"round": server_round, "node_id": node_id, "reason": reason})

    def parse_train_reply(self, server_round: int, reply: Message) -> ParsedReply:
        """Validate a dense reply against the global model sent this round."""
        content = self.reply_content(reply)
        metrics = self.reply_metrics(server_round, content, reply.metadata.src_node_id)
        if self._global is None:
            raise RejectedReply("no model was sent this round")
        if self.codec is not None:
            return self._parse_coded_dense(reply, content, metrics)
        expected = {
            key: (arr.numpy().dtype, int(np.prod(arr.shape, dtype=np.int64)))
            for key, arr in self._global.items()
        }
        parts = from_array_record(only_record(content, DENSE_MODEL), expected)
        arrays = []
        for key, arr in self._global.items():
            if tuple(parts[key].shape) != tuple(arr.shape):
                raise RejectedReply(f"array {key!r} has shape {parts[key].shape}")
            arrays.append(parts[key])
        return ParsedReply(reply.metadata.src_node_id, metrics.pop(NUM_EXAMPLES), arrays, metrics)

    def _parse_coded_dense(
        self, reply: Message, content: RecordDict, metrics: dict[str, float]
    ) -> ParsedReply:
        """A coded dense reply: the sent model plus the decoded update, extras as sent."""
        assert self._global is not None and self._sent_flat is not None and self.codec
        specs = self.layout.extra_specs()
        coded = CodedUpdate.from_record(only_record(content, CODED_UPDATE), extras_nbytes(specs))
        extras = finite_extras(unpack_tensors(coded.extras, specs))
        state = self.layout.state_dict(coded.values(self.codec, self._sent_flat), extras)
        arrays = [state[key].numpy() for key in self._global.keys()]
        return ParsedReply(reply.metadata.src_node_id, metrics.pop(NUM_EXAMPLES), arrays, metrics)

    def reply_content(self, reply: Message) -> RecordDict:
        """The content of a reply that is not an error."""
        if reply.has_error():
            raise RejectedReply(f"client error: {reply.error.reason}")
        return reply.content

    def reply_metrics(
        self, server_round: int, content: RecordDict, node_id: int | None = None
    ) -> dict[str, float]:
        """Validated metrics of a reply: num-examples and the checksum of the model trained
        (the one sent to ``node_id``)."""
        if METRICS not in content.metric_records:
            raise RejectedReply("reply has no metrics record")
        raw = content.metric_records[METRICS]
        metrics: dict[str, float] = {}
        for key, value in raw.items():
            if isinstance(value, list) or isinstance(value, bool):
                continue
            if not np.isfinite(float(value)):
                raise RejectedReply(f"metric {key!r} is not finite")
            metrics[key] = float(value)
        examples = metrics.get(NUM_EXAMPLES)
        if examples is None or examples <= 0:
            raise RejectedReply(f"num-examples must be positive, got {examples}")
        if self.max_num_examples is not None and examples > self.max_num_examples:
            raise RejectedReply(f"num-examples {examples:g} exceeds {self.max_num_examples}")
        checksum = raw.get(MODEL_CHECKSUM)
        sent = self.expected_checksum(server_round, node_id)
        if sent is not None and checksum != sent:
            raise RejectedReply(
                f"client trained on a different model (checksum {checksum} != {sent})"
            )
        metrics.pop(MODEL_CHECKSUM, None)
        return metrics

    def apply_average(self, server_round: int, averaged: list[np.ndarray]) -> ArrayRecord:
        """The round's new global model from the weighted average of the accepted replies'
        arrays (`ParsedReply.arrays` order: the global model's arrays), dtypes kept.

        With a coded downlink the clients trained from the public model, which lags the global
        one; the lag is added back, so the averaged update lands on the global model and what
        the downlink has not delivered yet is sent in later rounds (error feedback).
        """
        assert self._global is not None
        keys = list(self._global.keys())
        if self._downlink_lag is not None:
            state = dict(zip(keys, averaged, strict=True))
            moved = self.layout.unflatten(self.layout.flatten_numpy(state) + self._downlink_lag)
            averaged = [moved[key].numpy() if key in moved else state[key] for key in keys]
        return ArrayRecord({key: Array(value) for key, value in zip(keys, averaged, strict=True)})

    # --- the round loop, with resume ---------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        after_round: Callable[[int, ArrayRecord], None] | None = None,
    ) -> Result:
        """Flower's round loop (train, client evaluation, server evaluation), able to resume.

        Parameters are those of ``Strategy.start``, plus ``first_round`` (a resumed run starts
        after its checkpoint's round; ``initial_arrays`` is then the checkpoint's model) and
        ``after_round``, called with the round and the global model once a round is complete
        (the checkpoint hook). Logs what Flower's own strategies log (start summary, per-round
        aggregated metrics, the final `Result`) and, per round, the bytes of the ledger.
        """
        logger.info("Starting %s strategy:", type(self).__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        if first_round > 1:
            logger.info("\t└──> Resumed: rounds %d..%d", first_round, num_rounds)
        logger.info("")
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        started = time.time()
        self.sampler.timeout = timeout
        arrays = initial_arrays
        result.arrays = arrays
        if evaluate_fn is not None and first_round == 1:
            initial = evaluate_fn(0, arrays)
            logger.info("Initial global evaluation results: %s", initial)
            if initial is not None:
                result.evaluate_metrics_serverapp[0] = initial
        for server_round in range(first_round, num_rounds + 1):
            logger.info("")
            logger.info("[ROUND %d/%d]", server_round, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(server_round, arrays, train_config, grid),
                timeout=timeout,
            )
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = new_arrays
                result.arrays = arrays
            if train_metrics is not None:
                logger.info("\t└──> Aggregated MetricRecord: %s", train_metrics)
                result.train_metrics_clientapp[server_round] = train_metrics
            evaluate_messages = list(
                self.configure_evaluate(server_round, arrays, evaluate_config, grid)
            )
            if evaluate_messages:
                evaluate_metrics = self.aggregate_evaluate(
                    server_round, grid.send_and_receive(evaluate_messages, timeout=timeout)
                )
                if evaluate_metrics is not None:
                    logger.info("\t└──> Aggregated MetricRecord: %s", evaluate_metrics)
                    result.evaluate_metrics_clientapp[server_round] = evaluate_metrics
            self._log_round_bytes(server_round)
            if evaluate_fn is not None:
                logger.info("Global evaluation")
                server_metrics = evaluate_fn(server_round, arrays)
                logger.info("\t└──> MetricRecord: %s", server_metrics)
                if server_metrics is not None:
                    result.evaluate_metrics_serverapp[server_round] = server_metrics
            if after_round is not None:
                after_round(server_round, arrays)
        logger.info("")
        logger.info("Strategy execution finished in %.2fs", time.time() - started)
        logger.info("")
        logger.info("Final results:")
        logger.info("")
        for line in io.StringIO(str(result)):
            logger.info("\t%s", line.rstrip("\n"))
        logger.info("")
        return result

    def _log_round_bytes(self, server_round: int) -> None:
        """One line: the round's network bytes per direction and the run's total so far."""
        round_bytes = self.ledger.round_totals(server_round)
        logger.info(
            "\t└──> Bytes (network): %.3f MB down, %.3f MB up in round %d; %.3f MB in all",
            round_bytes["bytes_down"] / 1e6,
            round_bytes["bytes_up"] / 1e6,
            server_round,
            self.ledger.total_bytes() / 1e6,
        )

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The strategy's state as arrays and JSON metadata (the ledger included)."""
        meta = {
            "rejections": self.rejections,
            "round_info": {str(k): v for k, v in self.round_info.items()},
            "sent_checksums": {str(k): v for k, v in self.sent_checksums.items()},
            "ledger": self.ledger.to_rows(),
            "sampler_rng": self.sampler.rng_state(),
        }
        arrays = {} if self.downlink is None else prefixed("downlink", self.downlink.to_arrays())
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint` saved (into a strategy built with the same config)."""
        self.rejections = list(meta["rejections"])
        self.round_info = {int(k): v for k, v in meta["round_info"].items()}
        self.sent_checksums = {int(k): int(v) for k, v in meta["sent_checksums"].items()}
        self.ledger.extend(LedgerRow(**row) for row in meta["ledger"])
        if "sampler_rng" in meta:  # checkpoints before the sampler had its own RNG have none
            self.sampler.set_rng_state(meta["sampler_rng"])
        if self.downlink is not None:
            self.downlink.load_arrays(unprefixed("downlink", arrays))
        # Nodes that kept running still hold the public model: the first round sends it as it
        # is, so the run continues bitwise as if never stopped.
        self._keyframes_paused = True

    # --- evaluation (metered; off by default) -------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and build (and meter) one evaluation message per node.

        Off unless ``fraction_evaluate > 0``: by default the server evaluates the global model
        itself (``evaluate_fn``) and no model travels for it.
        """
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self._sample(grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes)
        config = ConfigRecord(dict(config.items()))  # a copy per round, as for training
        config[SERVER_ROUND] = server_round
        messages = self.evaluate_messages(server_round, arrays, config, node_ids)
        for message in messages:
            self.ledger.record_message(
                server_round, "evaluate", "down", message.metadata.dst_node_id, message
            )
        return messages

    def evaluate_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        """Dense evaluation messages: the whole model to every node."""
        content = RecordDict({DENSE_MODEL: arrays, CONFIG: config})
        return [
            Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node)
            for node in node_ids
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """FedAvg's metric aggregation, metered; error replies are logged and skipped."""
        replies = list(replies)
        for reply in replies:
            self.ledger.record_message(
                server_round, "evaluate", "up", reply.metadata.src_node_id, reply
            )
        return super().aggregate_evaluate(server_round, replies)
