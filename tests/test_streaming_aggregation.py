"""MeteredFedAvg.aggregate_train streams: one parsed reply at a time, in content order."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import overload

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from benchmarks.server_scale import NodeGrid, pushed
from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import ByteLedger
from cmd_fl.payload import DENSE_MODEL, METRICS, MODEL_CHECKSUM, NUM_EXAMPLES
from strategies.metered import MeteredFedAvg, ParsedReply

NODES = list(range(1, 10))
State = dict[str, np.ndarray]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))  # floats and an int64 0-d buffer


def _trained(node: int) -> tuple[State, int]:
    """What node ``node`` sends back: its trained state and its number of examples."""
    rng = np.random.default_rng(node)
    state = {key: value.numpy().copy() for key, value in _model().state_dict().items()}
    for key, value in state.items():
        if value.dtype.kind == "f":
            state[key] = (value + rng.standard_normal(value.shape)).astype(value.dtype)
        else:
            state[key] = np.array(value + node, dtype=value.dtype)
    return state, 10 * node + 3


class Round:
    """A strategy with round 1 configured for NODES, and the replies its nodes would send."""

    def __init__(self, strategy_cls: type[MeteredFedAvg] = MeteredFedAvg) -> None:
        model = _model()
        self.layout = ParameterLayout.from_module(model)
        self.strategy = strategy_cls(
            self.layout, ByteLedger(), min_train_nodes=len(NODES), min_available_nodes=len(NODES)
        )
        arrays = ArrayRecord({k: Array(v.numpy().copy()) for k, v in model.state_dict().items()})
        self.instructions = pushed(
            self.strategy.configure_train(1, arrays, ConfigRecord(), NodeGrid(NODES))
        )

    def reply(self, node: int, state: State | None = None, loss: float = 0.5) -> Message:
        """Node ``node``'s reply to its instruction (``state``: instead of its trained one)."""
        trained, examples = _trained(node)
        state = trained if state is None else state
        instruction = next(m for m in self.instructions if m.metadata.dst_node_id == node)
        metrics = {
            NUM_EXAMPLES: examples,
            MODEL_CHECKSUM: self.strategy.sent_checksums[1],
            "train-loss": loss,
        }
        content = RecordDict(
            {
                DENSE_MODEL: ArrayRecord({k: Array(v) for k, v in state.items()}),
                METRICS: MetricRecord(metrics),  # type: ignore[arg-type]
            }
        )
        return Message(content, reply_to=instruction)

    def replies(self, nodes: Sequence[int] = NODES) -> list[Message]:
        """The honest replies of ``nodes``, in that order."""
        return [self.reply(node) for node in nodes]


def _model_bytes(arrays: ArrayRecord | None) -> dict[str, bytes]:
    assert arrays is not None
    return {key: arr.numpy().tobytes() for key, arr in arrays.items()}


def test_a_streamed_round_is_the_weighted_mean_whatever_the_arrival_order() -> None:
    # Prepare
    states = {node: _trained(node) for node in NODES}
    weights = [float(states[node][1]) for node in NODES]

    # Execute: arrival order, then shuffled orders, each with its own strategy
    first = Round()
    arrays, metrics = first.strategy.aggregate_train(1, first.replies())
    shuffled = []
    for seed in range(3):
        again = Round()
        order = np.random.default_rng(seed).permutation(NODES).tolist()
        shuffled.append(again.strategy.aggregate_train(1, again.replies(order))[0])

    # Assert
    assert arrays is not None and metrics is not None
    assert metrics[NUM_EXAMPLES] == sum(weights) and metrics["num-replies"] == len(NODES)
    for key, arr in arrays.items():
        got = arr.numpy()
        stacked = np.stack([states[node][0][key] for node in NODES])
        want = np.average(stacked.astype(np.float64), axis=0, weights=weights)
        assert got.dtype == stacked.dtype and got.shape == stacked.shape[1:]
        if got.dtype.kind == "i":  # num_batches_tracked: rounded
            assert int(got) == int(np.rint(want))
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for other in shuffled:
        assert _model_bytes(other) == _model_bytes(arrays)


class Watched(MeteredFedAvg):
    """Records, each time a reply is parsed, how many earlier parsed replies are still alive."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.parsed: list[weakref.ref[np.ndarray]] = []
        self.alive_at_parse: list[int] = []

    def parse_train_reply(self, server_round: int, reply: Message) -> ParsedReply:
        """Count the parsed replies alive, then parse (and watch) this one."""
        self.alive_at_parse.append(sum(ref() is not None for ref in self.parsed))
        parsed = super().parse_train_reply(server_round, reply)
        self.parsed.append(weakref.ref(parsed.arrays[0]))
        return parsed


def test_replies_from_a_generator_are_parsed_and_dropped_one_at_a_time() -> None:
    # Prepare
    watched = Round(Watched)
    replies = watched.replies()
    reference = Round()

    # Execute: a one-shot generator
    arrays, _ = watched.strategy.aggregate_train(1, (reply for reply in replies))

    # Assert: no earlier reply's parsed arrays were alive when the next was parsed (the old
    # code kept every parsed model until the average), and the result is the same
    strategy = watched.strategy
    assert isinstance(strategy, Watched)
    assert strategy.alive_at_parse == [0] * len(NODES)
    want, _ = reference.strategy.aggregate_train(1, reference.replies())
    assert _model_bytes(arrays) == _model_bytes(want)


class BuiltOnDemand(Sequence[Message]):
    """Replies built when read (a fresh Message each time); it watches how many stay alive."""

    def __init__(self, replies: list[Message], instructions: list[Message]) -> None:
        to = {m.metadata.dst_node_id: m for m in instructions}
        self._contents = [(m.content, to[m.metadata.src_node_id]) for m in replies]
        self.alive_at_build: list[int] = []
        self._built: list[weakref.ref[Message]] = []

    def __len__(self) -> int:
        return len(self._contents)

    @overload
    def __getitem__(self, index: int) -> Message: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Message]: ...

    def __getitem__(self, index: int | slice) -> Message | Sequence[Message]:
        if isinstance(index, slice):
            raise TypeError("not sliced here")
        content, instruction = self._contents[index]
        self.alive_at_build.append(sum(ref() is not None for ref in self._built))
        message = Message(RecordDict(dict(content.items())), reply_to=instruction)
        self._built.append(weakref.ref(message))
        return message


def test_a_sequence_of_replies_is_read_on_demand_not_copied() -> None:
    # Prepare
    lazy = Round()
    replies = BuiltOnDemand(lazy.replies(), lazy.instructions)

    # Execute
    arrays, metrics = lazy.strategy.aggregate_train(1, replies)

    # Assert: each reply read twice (envelope, then parse), never more than one other alive
    assert metrics is not None and metrics["num-replies"] == len(NODES)
    assert len(replies.alive_at_build) == 2 * len(NODES)
    assert max(replies.alive_at_build) <= 1
    reference = Round()
    want, _ = reference.strategy.aggregate_train(1, reference.replies())
    assert _model_bytes(arrays) == _model_bytes(want)


def _mid_stream(round_: Round, node: int, state: State, others: list[Message]) -> Message:
    """Node ``node``'s reply holding ``state``, with a loss chosen so that its content digest
    (the summation order) falls strictly between the others'."""
    digests = sorted(m.content.object_id for m in others)
    for loss in np.linspace(0.1, 0.9, 200):
        reply = round_.reply(node, state, float(loss))
        if digests[0] < reply.content.object_id < digests[-1]:
            return reply
    raise AssertionError("no loss puts the reply mid-stream")


def test_replies_rejected_mid_stream_are_never_averaged_and_are_listed_in_arrival_order() -> None:
    # Prepare: node 3 sends a huge value in its last array (it parses, then fails the
    # magnitude check), node 6 a NaN in a buffer, node 8 a weight of the right size but the
    # wrong shape (it fails after the wire checks); all three mid-stream
    bad_round = Round()
    honest_nodes = [n for n in NODES if n not in (3, 6, 8)]
    honest = bad_round.replies(honest_nodes)
    huge, nan, wrong = _trained(3)[0], _trained(6)[0], _trained(8)[0]
    last = list(huge)[-2]  # the last float array (the very last is num_batches_tracked)
    huge[last] = huge[last].copy()
    huge[last].reshape(-1)[-1] = 1e9
    buffer = next(k for k in nan if "running_var" in k)
    nan[buffer] = nan[buffer].copy()
    nan[buffer][0] = np.nan
    weight = next(k for k in wrong if k.endswith("weight"))
    wrong[weight] = wrong[weight].T.copy()
    bad = {n: _mid_stream(bad_round, n, s, honest) for n, s in [(3, huge), (6, nan), (8, wrong)]}
    arrival = [bad[n] if n in bad else honest[honest_nodes.index(n)] for n in NODES]

    # Execute
    arrays, metrics = bad_round.strategy.aggregate_train(1, arrival)
    clean = Round()
    want, want_metrics = clean.strategy.aggregate_train(1, clean.replies(honest_nodes))

    # Assert
    assert [r["node_id"] for r in bad_round.strategy.rejections] == [3, 6, 8]
    reasons = [r["reason"] for r in bad_round.strategy.rejections]
    assert "max_abs_value" in reasons[0] and "non-finite" in reasons[1] and "shape" in reasons[2]
    assert _model_bytes(arrays) == _model_bytes(want)
    assert metrics is not None and want_metrics is not None
    assert metrics["num-replies"] == want_metrics["num-replies"] == len(honest_nodes)
