"""Embedding safety in the Flower strategy: the cap, and the guard that undoes bad events."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import strategies.cmd_strategy as cmd_strategy_module
from cmd_fl.embedding import EmbeddingSelector, EmbeddingState, embedding_event
from cmd_fl.payload import CMD_STATE, METRICS
from cmd_fl.posthoc import CMDFit
from cmd_fl.wire import StateDelta
from strategies.cmd_strategy import CMDStrategy
from tests.test_flower_apps import WARMUP, _free_length, simulate

BAD_ROUND = WARMUP + 2


def _corrupting_event(
    selector: EmbeddingSelector,
    fit: CMDFit,
    state: EmbeddingState,
    reference_values: np.ndarray | None = None,
) -> np.ndarray:
    """The real event, except that at BAD_ROUND it freezes wildly wrong coefficients."""
    chosen = embedding_event(selector, fit, state, reference_values)
    if state.version == 1 + (BAD_ROUND - WARMUP) and chosen.size:
        state.embed(chosen, -3.0 * fit.a[chosen], fit.b[chosen] + 1.0)
    return chosen


def test_planted_bad_event_is_undone_and_views_stay_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cmd_strategy_module, "embedding_event", _corrupting_event)
    outcome, grid = simulate(tmp_path, num_server_rounds=BAD_ROUND + 3, cmd_guard_pause=1)
    strategy = outcome.strategy
    assert isinstance(strategy, CMDStrategy) and strategy.state is not None

    events = {e["round"]: e for e in outcome.summary["guard_events"]}
    assert events[BAD_ROUND]["undone"]
    assert events[BAD_ROUND]["accuracy_after"] < events[BAD_ROUND]["accuracy_before"] - 0.02
    assert not any(e["undone"] for r, e in events.items() if r != BAD_ROUND)
    # Embedding paused for guard-pause rounds, then went on.
    assert BAD_ROUND + 1 not in events and BAD_ROUND + 2 in events
    # After the roll-back, clients rebuilt bitwise the server's model every round.
    for exchange in grid.exchanges:
        client_view = exchange.reply.content.metric_records[METRICS]["model-checksum"]
        assert client_view == strategy.sent_checksums[exchange.server_round]
    assert outcome.summary["rejected_replies"]["total"] == 0
    rows = {r["round"]: r for r in outcome.summary["rounds"]}
    assert rows[BAD_ROUND]["embedded_fraction"] == rows[BAD_ROUND - 1]["embedded_fraction"]
    # The released weights travel again from the next round on.
    n, m = strategy.layout.n_weights, strategy.state.n_modes
    embedded = round(rows[BAD_ROUND - 1]["embedded_fraction"] * n)
    next_round = [e for e in grid.exchanges if e.server_round == BAD_ROUND + 1]
    assert next_round
    for exchange in next_round:
        assert _free_length(exchange.instruction) == n - embedded - m
        assert _free_length(exchange.reply) == n - embedded - m


def test_guard_does_not_undo_healthy_events(tmp_path: Path) -> None:
    outcome, _ = simulate(tmp_path, num_server_rounds=6)
    events = outcome.summary["guard_events"]
    assert len(events) == 6 - WARMUP
    assert not any(e["undone"] for e in events)


@pytest.mark.parametrize("cap", [0.3, 0.55])
def test_cap_is_never_exceeded_in_a_run(tmp_path: Path, cap: float) -> None:
    outcome, _ = simulate(
        tmp_path, num_server_rounds=8, cmd_embed_percent=25.0, cmd_max_embedded=cap
    )
    fractions = [r["embedded_fraction"] for r in outcome.summary["rounds"]]
    assert max(fractions) <= cap
    assert max(fractions) > cap - 0.01


def test_refresh_releases_drifted_weights_for_good(tmp_path: Path) -> None:
    outcome, grid = simulate(
        tmp_path,
        num_server_rounds=9,
        cmd_projection="round",
        cmd_refresh_every=3,
        cmd_refresh_tolerance=0.05,
    )
    strategy = outcome.strategy
    assert isinstance(strategy, CMDStrategy) and strategy.state is not None
    assert strategy.selector is not None
    refreshes = {e["round"]: e for e in outcome.summary["refresh_events"]}

    assert set(refreshes) == {WARMUP + 3, WARMUP + 6}
    assert sum(e["released"] for e in refreshes.values()) > 0
    # Probe replies carried the embedded weights' trained values; other rounds did not.
    for exchange in grid.exchanges[4 * WARMUP :]:
        record = exchange.reply.content.array_records["cmd-model"]
        assert ("embedded" in record) == (exchange.server_round in refreshes)
    # Released weights are never embedded again, and the views stayed bitwise identical.
    assert not (strategy.selector.excluded & strategy.state.embedded).any()
    assert strategy.selector.excluded.sum() == sum(e["released"] for e in refreshes.values())
    for exchange in grid.exchanges:
        client_view = exchange.reply.content.metric_records[METRICS]["model-checksum"]
        assert client_view == strategy.sent_checksums[exchange.server_round]


@pytest.mark.parametrize("refill", [False, True])
def test_released_weights_keep_their_place_under_the_cap_unless_refilled(
    tmp_path: Path, refill: bool
) -> None:
    cap = 0.55
    outcome, _ = simulate(
        tmp_path,
        num_server_rounds=WARMUP + 6,
        cmd_projection="round",
        cmd_embed_percent=30.0,
        cmd_max_embedded=cap,
        cmd_refresh_every=3,
        cmd_refresh_tolerance=0.05,
        cmd_refresh_refill=refill,
    )
    strategy = outcome.strategy
    assert isinstance(strategy, CMDStrategy) and strategy.state is not None
    assert strategy.selector is not None
    released = int(strategy.selector.excluded.sum())
    assert released > 0
    cap_count = strategy.schedule.cap_count(strategy.state.n_weights, strategy.state.n_modes)
    rows = {r["round"]: r for r in outcome.summary["rounds"]}
    assert rows[WARMUP + 2]["embedded_fraction"] == pytest.approx(cap, abs=0.01)  # cap reached
    if refill:  # events embedded other weights in the released ones' place
        assert strategy.state.n_embedded == cap_count
    else:  # the embedded share fell by what was released and stayed down
        assert strategy.state.n_embedded + released == cap_count
        late = [rows[r]["embedded_fraction"] for r in range(WARMUP + 3, WARMUP + 7)]
        assert max(late) < rows[WARMUP + 2]["embedded_fraction"]


def test_refresh_refit_moves_offsets_to_the_trained_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = WARMUP + 3
    seen: dict[str, np.ndarray] = {}
    refresh = CMDStrategy._refresh

    def spying_refresh(self: CMDStrategy, server_round: int, trained: np.ndarray) -> None:
        assert self.state is not None
        seen["embedded"] = self.state.embedded_indices.copy()
        seen["b_before"] = self.state.frozen_b.copy()
        seen["trained"] = trained.copy()
        refresh(self, server_round, trained)
        assert self.global_flat is not None
        seen["after"] = self.global_flat.copy()

    monkeypatch.setattr(CMDStrategy, "_refresh", spying_refresh)
    outcome, grid = simulate(
        tmp_path,
        num_server_rounds=probe + 2,
        cmd_refresh_every=3,
        cmd_refresh_tolerance=0.05,
        cmd_refresh_refit=True,
    )
    strategy = outcome.strategy
    assert isinstance(strategy, CMDStrategy) and strategy.state is not None
    (event,) = outcome.summary["refresh_events"]
    assert event["round"] == probe
    assert event["refit"] == event["probed"] - event["released"] > 0

    embedded = seen["embedded"]
    kept = np.isin(embedded, strategy.state.embedded_indices)
    refit = embedded[kept]
    assert refit.size == event["refit"]
    # The kept weights now sit on the clients' averaged trained values (float32 rounding).
    np.testing.assert_allclose(seen["after"][refit], seen["trained"][kept], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(seen["b_before"][refit], strategy.state.frozen_b[refit])
    # The next round's state delta carries the new offsets alone (a is unchanged), beside
    # that round's event.
    for exchange in grid.exchanges:
        if exchange.server_round != probe + 1:
            continue
        delta = StateDelta.from_array_record(
            exchange.instruction.content.array_records[CMD_STATE],
            strategy.state.n_weights,
            strategy.state.n_modes,
        )
        assert not np.isin(delta.embed_indices, refit).any()
        np.testing.assert_array_equal(delta.refit_indices, refit)
        np.testing.assert_array_equal(delta.refit_b, strategy.state.frozen_b[refit])
    # Client and server still rebuild bitwise the same model every round.
    for exchange in grid.exchanges:
        client_view = exchange.reply.content.metric_records[METRICS]["model-checksum"]
        assert client_view == strategy.sent_checksums[exchange.server_round]
