"""CMDClient catches a train_fn that ignores its optimizer hook under ``step`` projection."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from clients.cmd_client import HOOK_WARNING, CMDClient, OptimizerHook, Projection
from cmd_fl.payload import CMD_MODEL, CONFIG, SERVER_ROUND, STATE_VERSION, CMDModel, save_state
from tests.test_torch_projection import _setup


def _message(model: CMDModel, server_round: int) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    content = RecordDict(
        {
            CMD_MODEL: model.to_record(),
            CONFIG: ConfigRecord({SERVER_ROUND: server_round, STATE_VERSION: 1}),
        }
    )
    message = Message(content, dst_node_id=1000, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = f"m{server_round}"
    return message


def _train_fn(calls_hook: bool):  # type: ignore[no-untyped-def]
    def train_fn(module: torch.nn.Module, hook: OptimizerHook | None) -> dict[str, float]:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
        if calls_hook and hook is not None:
            hook(optimizer)
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            optimizer.zero_grad()
            module(x).pow(2).mean().backward()
            optimizer.step()
        return {"num-examples": 16}

    return train_fn


def _two_rounds(
    calls_hook: bool, projection: Projection = "step"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train two rounds; the flat live models and the full models the replies define."""
    module, layout, state = _setup()
    context = Context(1, 1000, {}, RecordDict(), {})
    save_state(context.state, "cmd-fl", state)
    free, refs = state.split(layout.flatten_numpy(module.state_dict()))
    lives, replied = [], []
    for server_round in (1, 2):
        # A fresh client per message, as a Flower ClientApp builds one.
        client = CMDClient(module, _train_fn(calls_hook), projection=projection)
        reply = client.train(
            _message(CMDModel(free, refs, np.zeros(0, np.uint8)), server_round), context
        )
        out = CMDModel.from_record(
            reply.content.array_records[CMD_MODEL], free.size, state.n_modes, 0
        )
        free, refs = out.free, out.references
        lives.append(layout.flatten_numpy(module.state_dict()))
        replied.append(state.assemble(free, refs))
    return lives, replied


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if HOOK_WARNING in r.getMessage()]


def test_ignored_hook_is_re_projected_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    # Execute: two rounds with a train_fn that never calls optimizer_hook.
    with caplog.at_level(logging.WARNING, logger="clients.cmd_client"):
        lives, replied = _two_rounds(calls_hook=False)

    # Assert: one warning naming the fix; the live model is exactly the CMD model it reports.
    assert len(_warnings(caplog)) == 1
    assert "call optimizer_hook(optimizer) in train_fn before training" in HOOK_WARNING
    for live, model in zip(lives, replied, strict=True):
        np.testing.assert_array_equal(live, model)


@pytest.mark.parametrize(
    ("calls_hook", "projection"), [(True, "step"), (False, "round")], ids=["step", "round"]
)
def test_no_warning_when_the_drift_is_expected_or_absent(
    caplog: pytest.LogCaptureFixture, calls_hook: bool, projection: Projection
) -> None:
    with caplog.at_level(logging.WARNING, logger="clients.cmd_client"):
        lives, replied = _two_rounds(calls_hook, projection)

    assert not _warnings(caplog)
    if projection == "step":
        for live, model in zip(lives, replied, strict=True):
            np.testing.assert_array_equal(live, model)
