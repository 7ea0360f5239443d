"""Models a Flower user brings: buffers of every dtype and shape, norm layers, frozen parameters.

Each model runs for a few rounds through the real client wrappers (CMDClient, APFClient) and the
real strategies (MeteredFedAvg, APFStrategy, CMDStrategy) on the in-process grid, on small
shares of scikit-learn's digits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from sklearn.datasets import load_digits
from torch import nn

from clients.apf_client import APFClient
from clients.cmd_client import CMDClient, OptimizerHook
from cmd_fl import EmbeddingSchedule, ParameterLayout
from cmd_fl.ledger import ByteLedger
from cmd_fl.payload import APF_MODEL, CMD_MODEL, DENSE_MODEL, METRICS, state_checksum
from cmd_fl.wire import unpack_tensors
from strategies.apf_strategy import APFStrategy
from strategies.cmd_strategy import CMDStrategy
from strategies.metered import MeteredFedAvg
from tests.inprocess_grid import Exchange, InProcessGrid

ROUNDS = 3
BATCH = 20
SIZES = (100, 120, 140)  # unequal shares: the averages are weighted, not plain means
BATCHES = tuple(-(-n // BATCH) for n in SIZES)  # optimizer steps per node and round: 5, 6, 7
EVAL_CHECKSUM = "eval-model-checksum"


# --- the models ------------------------------------------------------------------------------
class BatchNormNet(nn.Module):
    """conv - BatchNorm2d - relu - maxpool - fc - BatchNorm1d - fc, for 1x8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.bn1d = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.fc2(F.relu(self.bn1d(self.fc1(x))))


class NormNet(nn.Module):
    """conv - GroupNorm - relu - maxpool - LayerNorm - fc: affine norms, no buffers at all."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8 * 4 * 4)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.gn(self.conv(x))), 2).flatten(1)
        return self.fc(self.ln(x))


class FrozenNet(nn.Module):
    """A frozen first layer, a fixed float64 class prior, and odd buffers of the user's own.

    - ``stem`` (conv weight and bias): ``requires_grad=False``, a fixed feature extractor;
    - ``prior`` (float64, 10): a fixed parameter added to the logits, ``requires_grad=False``;
    - ``counts`` (int32, (3,)): [steps, examples, 7] counted in training mode;
    - ``input_mean`` (float32, 0-d): an EMA of the batch means, updated in training mode;
    - ``input_std`` (float16, 0-d): an EMA of the batch standard deviations, likewise;
    - ``version`` (float64, 0-d) and ``flags`` (bool, (2,)): constants nobody changes.
    """

    counts: torch.Tensor
    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.stem.requires_grad_(False)
        self.prior = nn.Parameter(torch.linspace(-0.1, 0.1, 10, dtype=torch.float64) / 3)
        self.prior.requires_grad_(False)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.register_buffer("counts", torch.tensor([0, 0, 7], dtype=torch.int32))
        self.register_buffer("input_mean", torch.tensor(0.0))
        self.register_buffer("input_std", torch.tensor(0.0, dtype=torch.float16))
        self.register_buffer("version", torch.tensor(0.1, dtype=torch.float64))
        self.register_buffer("flags", torch.tensor([True, False]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.counts += torch.tensor([1, x.shape[0], 0], dtype=torch.int32)
                self.input_mean.mul_(0.9).add_(0.1 * x.mean())
                self.input_std.mul_(0.9).add_(0.1 * x.std().half())
        x = F.max_pool2d(F.relu(self.stem(x)), 2).flatten(1)
        logits: torch.Tensor = self.fc(x)
        return logits + self.prior.to(x.dtype)


def _seeded(model_cls: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_cls()


# --- data, client app, and one run -----------------------------------------------------------
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(labels, dtype=torch.long)


X, Y = _digits()
OFFSETS = np.cumsum((0, *SIZES))
X_TEST, Y_TEST = X[1400:], Y[1400:]


def _train(model: nn.Module, partition: int, server_round: int, hook: OptimizerHook | None) -> int:
    x = X[OFFSETS[partition] : OFFSETS[partition + 1]]
    y = Y[OFFSETS[partition] : OFFSETS[partition + 1]]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    if hook is not None:
        hook(optimizer)
    model.train()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(server_round))
    for start in range(0, len(y), BATCH):
        batch = order[start : start + BATCH]
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return len(y)


def _accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(X_TEST).argmax(1) == Y_TEST).float().mean())


def make_client_app(model_cls: Callable[[], nn.Module]) -> ClientApp:
    """A user-style ClientApp: the model under CMD or APF (whichever the message is for)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        server_round = int(str(msg.content.config_records["config"]["server-round"]))

        def train_fn(model: nn.Module, hook: OptimizerHook | None) -> dict[str, float]:
            return {"num-examples": _train(model, partition, server_round, hook)}

        model = model_cls()
        if APF_MODEL in msg.content.array_records:
            return APFClient(model, train_fn).train(msg, context)
        return CMDClient(model, train_fn).train(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Reports the checksum of the model the client rebuilt from the message."""
        model = model_cls()

        def evaluate_fn(loaded: nn.Module) -> dict[str, float]:
            layout = ParameterLayout.from_module(loaded)
            checksum = state_checksum(layout, loaded.state_dict())
            return {"num-examples": 1, EVAL_CHECKSUM: checksum}

        def no_training(model: nn.Module, hook: OptimizerHook | None) -> dict[str, float]:
            raise RuntimeError("an evaluation handler does not train")

        return CMDClient(model, no_training).evaluate(msg, evaluate_fn, context)

    return app


@dataclass
class Run:
    """One finished run: the strategy, what crossed the grid, the model after each round."""

    strategy: MeteredFedAvg
    grid: InProcessGrid
    layout: ParameterLayout
    initial: dict[str, torch.Tensor]
    after: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    accuracy: dict[int, float] = field(default_factory=dict)

    def exchanges(self, server_round: int, kind: str = "train") -> list[Exchange]:
        return [
            e
            for e in self.grid.exchanges
            if e.server_round == server_round and e.instruction.metadata.message_type == kind
        ]


def simulate(
    model_cls: Callable[[], nn.Module], strategy: str, fraction_evaluate: float = 0.0
) -> Run:
    """ROUNDS rounds of ``strategy`` on ``model_cls`` with one node per share of SIZES."""
    torch.set_num_threads(1)
    model = _seeded(model_cls)
    layout = ParameterLayout.from_module(model)
    ledger = ByteLedger()
    common: dict[str, Any] = {
        "min_available_nodes": len(SIZES),
        "min_train_nodes": len(SIZES),
        "fraction_evaluate": fraction_evaluate,
        "min_evaluate_nodes": len(SIZES) if fraction_evaluate else 0,
    }
    chosen: MeteredFedAvg
    if strategy == "fedavg":
        chosen = MeteredFedAvg(layout, ledger, **common)
    elif strategy == "apf":
        chosen = APFStrategy(layout, ledger, **common)
    else:
        schedule = EmbeddingSchedule(warmup=1, every=1, percent=20.0, max_fraction=0.8)
        chosen = CMDStrategy(layout, ledger, schedule, n_modes=2, n_samples=200, **common)
    grid = InProcessGrid(make_client_app(model_cls), len(SIZES), {})
    result = Run(chosen, grid, layout, {k: v.clone() for k, v in model.state_dict().items()})
    probe = model_cls()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        probe.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        result.accuracy[server_round] = _accuracy(probe)
        return MetricRecord({"accuracy": result.accuracy[server_round]})

    def after_round(server_round: int, arrays: ArrayRecord) -> None:
        result.after[server_round] = {key: arr.numpy().copy() for key, arr in arrays.items()}

    chosen.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=ROUNDS,
        evaluate_fn=evaluate,
        after_round=after_round,
    )
    return result


# --- what the replies carried ----------------------------------------------------------------
def sent_extras(run: Run, exchange: Exchange) -> dict[str, np.ndarray]:
    """The buffers (layout extras) a training reply carried, by name, whatever the format."""
    records = exchange.reply.content.array_records
    names = [spec.name for spec in run.layout.extras]
    if DENSE_MODEL in records:
        return {name: records[DENSE_MODEL][name].numpy() for name in names}
    record = records[CMD_MODEL] if CMD_MODEL in records else records[APF_MODEL]
    values = unpack_tensors(record["extras"].numpy(), run.layout.extra_specs())
    return dict(zip(names, values, strict=True))


def num_examples(exchange: Exchange) -> float:
    return float(exchange.reply.content.metric_records[METRICS]["num-examples"])  # type: ignore[arg-type]


def assert_client_and_server_agree(run: Run) -> None:
    """No reply was rejected and every client trained on bitwise the model the server sent."""
    assert run.strategy.rejections == []
    trained = [e for e in run.grid.exchanges if e.instruction.metadata.message_type == "train"]
    assert len(trained) == ROUNDS * len(SIZES)
    for exchange in trained:
        assert not exchange.reply.has_error(), exchange.reply.error
        checksum = exchange.reply.content.metric_records[METRICS]["model-checksum"]
        assert checksum == run.strategy.sent_checksums[exchange.server_round]
    assert sorted(run.after) == list(range(1, ROUNDS + 1))


def assert_dtypes_and_shapes_kept(run: Run) -> None:
    for server_round, state in run.after.items():
        assert list(state) == list(run.initial), server_round
        for name, tensor in run.initial.items():
            value = state[name]
            assert value.shape == tuple(tensor.shape), (server_round, name)
            assert value.dtype == tensor.numpy().dtype, (server_round, name)


STRATEGIES = ["fedavg", "apf", "cmd"]


# --- 1. BatchNorm ----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batchnorm_buffers_travel_and_average_under_every_strategy(strategy: str) -> None:
    # Execute: a CNN with BatchNorm2d and BatchNorm1d, three unequal nodes, three rounds
    run = simulate(BatchNormNet, strategy)

    # Assert: nothing rejected, client and server held bitwise the same model every round
    assert_client_and_server_agree(run)
    assert_dtypes_and_shapes_kept(run)
    if strategy == "cmd":
        assert isinstance(run.strategy, CMDStrategy) and run.strategy.state is not None
        assert run.strategy.round_info[ROUNDS]["embedded_fraction"] > 0
        assert CMD_MODEL in run.exchanges(ROUNDS)[0].reply.content.array_records
    # ... every round's running stats are the example-weighted mean of what the nodes sent
    for server_round in range(1, ROUNDS + 1):
        exchanges = run.exchanges(server_round)
        weights = np.array([num_examples(e) for e in exchanges])
        np.testing.assert_array_equal(weights, SIZES)
        sent = [sent_extras(run, e) for e in exchanges]
        for name in ("bn.running_mean", "bn.running_var", "bn1d.running_mean", "bn1d.running_var"):
            stacked = np.stack([s[name] for s in sent]).astype(np.float64)
            expected = (weights @ stacked) / weights.sum()
            np.testing.assert_allclose(run.after[server_round][name], expected, rtol=1e-6)
            assert not np.allclose(stacked[0], stacked[1])  # the nodes did send different stats
        # ... and the step counter is the rounded weighted mean: 5, 6, 7 steps a round -> 6
        for name in ("bn.num_batches_tracked", "bn1d.num_batches_tracked"):
            counts = [int(s[name]) for s in sent]
            assert counts == [6 * (server_round - 1) + b for b in BATCHES]
            tracked = run.after[server_round][name]
            assert tracked.shape == () and tracked.dtype == np.int64
            assert int(tracked) == 6 * server_round
    # ... and the model learned (10 classes: chance is 0.1)
    assert run.accuracy[ROUNDS] > run.accuracy[0] + 0.2


# --- 2. GroupNorm and LayerNorm --------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fedavg", "cmd"])
def test_groupnorm_and_layernorm_models_learn_and_clients_rebuild_the_servers_model(
    strategy: str,
) -> None:
    # Execute: a model whose norms have only affine parameters; clients evaluate every round
    run = simulate(NormNet, strategy, fraction_evaluate=1.0)

    # Assert: no buffers, every norm parameter is a CMD weight
    assert run.layout.extras == ()
    assert {"gn.weight", "gn.bias", "ln.weight", "ln.bias"} <= {s.name for s in run.layout.modelled}
    assert_client_and_server_agree(run)
    assert_dtypes_and_shapes_kept(run)
    # ... after every round each client rebuilt bitwise the server's model from what it was sent
    # (dense in warm-up, free weights + references under CMD)
    for server_round in range(1, ROUNDS + 1):
        expected = state_checksum(run.layout, run.after[server_round])
        evaluations = run.exchanges(server_round, "evaluate")
        assert len(evaluations) == len(SIZES)
        for exchange in evaluations:
            if strategy == "cmd" and server_round > 1:
                assert CMD_MODEL in exchange.instruction.content.array_records
            metrics = exchange.reply.content.metric_records[METRICS]
            assert metrics[EVAL_CHECKSUM] == expected
    if strategy == "cmd":
        assert run.strategy.round_info[ROUNDS]["embedded_fraction"] > 0
    # ... the norm parameters were trained, and the model learned
    for name in ("gn.weight", "ln.bias"):
        assert not np.array_equal(run.after[ROUNDS][name], run.initial[name].numpy())
    assert run.accuracy[ROUNDS] > max(0.5, run.accuracy[0] + 0.3)


# --- 3. frozen parameters and odd buffers ----------------------------------------------------
def test_the_layout_leaves_frozen_parameters_out_of_the_cmd_weights() -> None:
    model = FrozenNet()
    layout = ParameterLayout.from_module(model)

    assert [s.name for s in layout.modelled] == ["fc.weight", "fc.bias"]
    assert layout.n_weights == sum(p.numel() for p in model.parameters() if p.requires_grad)
    extras = {s.name: (s.shape, s.dtype) for s in layout.extras}
    assert extras == {
        "stem.weight": ((8, 1, 3, 3), torch.float32),
        "stem.bias": ((8,), torch.float32),
        "prior": ((10,), torch.float64),
        "counts": ((3,), torch.int32),
        "input_mean": ((), torch.float32),
        "input_std": ((), torch.float16),
        "version": ((), torch.float64),
        "flags": ((2,), torch.bool),
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_parameters_keep_their_value_bitwise_and_odd_buffers_average(
    strategy: str,
) -> None:
    # Execute: the frozen stem and prior, an int32 (3,) buffer, 0-d float32 and float64 buffers
    run = simulate(FrozenNet, strategy)

    # Assert: nothing rejected, every buffer kept its dtype and shape
    assert_client_and_server_agree(run)
    assert_dtypes_and_shapes_kept(run)
    if strategy == "cmd":
        assert isinstance(run.strategy, CMDStrategy)
        assert run.strategy.round_info[ROUNDS]["embedded_fraction"] > 0
    for server_round in range(1, ROUNDS + 1):
        # ... what never changes stays bitwise what it was: on every node and on the server
        sent = [sent_extras(run, e) for e in run.exchanges(server_round)]
        for name in ("stem.weight", "stem.bias", "prior", "version", "flags"):
            initial = run.initial[name].numpy()
            for values in sent:
                assert values[name].tobytes() == initial.tobytes(), (server_round, name)
            assert run.after[server_round][name].tobytes() == initial.tobytes(), (
                server_round,
                name,
            )
        # ... the counters are the rounded weighted mean of the nodes' counts
        weights = np.array([num_examples(e) for e in run.exchanges(server_round)])
        counts = np.stack([s["counts"] for s in sent]).astype(np.float64)
        expected_counts = np.rint(weights @ counts / weights.sum()).astype(np.int32)
        np.testing.assert_array_equal(run.after[server_round]["counts"], expected_counts)
        assert run.after[server_round]["counts"].tolist() == [
            6 * server_round,
            122 * server_round,
            7,
        ]
        # ... and the 0-d EMAs are the weighted means of the nodes' EMAs
        for name, rtol in (("input_mean", 1e-6), ("input_std", 1e-3)):
            means = np.array([float(s[name]) for s in sent])
            assert len(set(means)) == len(SIZES), name
            np.testing.assert_allclose(
                run.after[server_round][name], weights @ means / weights.sum(), rtol=rtol
            )
    # ... the trainable layer did train
    assert not np.array_equal(run.after[ROUNDS]["fc.weight"], run.initial["fc.weight"].numpy())
