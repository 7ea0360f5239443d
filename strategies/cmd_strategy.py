"""The CMD strategy: FedAvg during warm-up, then embedded CMD with a compact wire format."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from cmd_fl.checkpoint import prefixed, unprefixed
from cmd_fl.codec import encoded_nbytes
from cmd_fl.coded import CODED_UPDATE, CodedUpdate
from cmd_fl.downlink import CODED_CMD, KEYFRAME_CMD
from cmd_fl.embedding import (
    EmbeddingSchedule,
    EmbeddingSelector,
    EmbeddingState,
    embedding_event,
)
from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import ByteLedger
from cmd_fl.online import OnlineCMD
from cmd_fl.payload import (
    CMD_MODEL,
    CMD_STATE,
    CONFIG,
    METRICS,
    N_MODES,
    PROBE,
    STATE_VERSION,
    CMDModel,
    extras_nbytes,
    model_checksum,
)
from cmd_fl.posthoc import CMDFit
from cmd_fl.sync import EmbeddingHistory
from cmd_fl.wire import pack_tensors, unpack_tensors
from strategies.flat_model import FlatModelStrategy
from strategies.metered import ParsedReply, RejectedReply, finite_extras, only_record

logger = logging.getLogger("flwr.cmd_fl")


# Accuracy of a flat model (with the current extras) on the server's validation split.
ValidateFn = Callable[[np.ndarray, list[np.ndarray]], float]


COEFFICIENT_PRECISIONS = ("float32", "float16", "grid")  # `CMDOptions.coefficients`, finest first


@dataclass(frozen=True)
class CMDOptions:
    """How embedding is kept safe (see ``shared/docs/cmd-method.md``, "Measured here").

    Parameters
    ----------
    selection_rule : str
        ``"stability"`` (the paper's) or ``"stability+fit"``. Default ``"stability+fit"``.
    max_abs_a : float or None
        Weights with ``|a|`` above this are never embedded. Default 10.
    max_residual : float or None
        Weights whose relative fit residual is above this are never embedded. Default None.
    reference_std_ratio : float
        References must move at least this fraction of their cluster's median std. Default 0.25.
    guard_margin : float
        After an event, if the validation accuracy of the new model falls more than this below
        the pre-event model's, the event is undone. Default 0.02. Needs a ``validate_fn``.
    guard_pause : int
        Rounds without embedding events after an undone event. Default 5.
    refresh_every : int
        Every this many rounds after warm-up (with weights embedded) is a refresh probe: clients
        train every weight and also send their embedded ones; embedded weights whose trained
        value drifted more than ``refresh_tolerance`` (relative) from the CMD model are released
        for good and travel again. 0 turns refresh off. Default 20.
    refresh_tolerance : float
        Relative drift ``|w - (a w_ref + b)| / max(|w|, |a w_ref + b|)`` that releases a weight.
        Default 0.25.
    refresh_max_fraction : float
        At most this share of the N weights is released per refresh. Default 0.1.
    refresh_refit : bool
        In a refresh probe, also re-fit the offset ``b`` of every embedded weight that stays
        embedded, so the CMD model passes through the clients' averaged trained value
        (``b = w - a w_ref``): the frozen weights take one round of learning, and only the
        changed coefficients travel (in the next state delta). Default True: under Dirichlet
        label skew, 80-round runs without it lost ground against FedAvg after round 40 (README).
    refresh_refill : bool
        Whether later events may embed other weights in the place of released ones. Default
        False: a release lowers the embedded share for good.
    coefficients : {"float32", "float16", "grid"}
        Precision of the frozen coefficients, set when a weight is embedded: as fitted
        (4 bytes each on the wire), rounded to float16 (`EmbeddingState.round_coefficients`,
        2 bytes each), or ``a`` on a one-byte grid and ``b`` in float16
        (`EmbeddingState.a_on_grid`, 3 bytes a weight). Default "float32"; the run config
        picks "grid" when clients are sampled and "float16" with a lossy codec unless
        ``cmd-coefficients`` says otherwise.
    """

    selection_rule: str = "stability+fit"
    max_abs_a: float | None = 10.0
    max_residual: float | None = None
    reference_std_ratio: float = 0.25
    guard_margin: float = 0.02
    guard_pause: int = 5
    refresh_every: int = 20
    refresh_tolerance: float = 0.25
    refresh_max_fraction: float = 0.1
    refresh_refit: bool = True
    refresh_refill: bool = False
    coefficients: str = "float32"

    def __post_init__(self) -> None:
        """Reject a coefficient precision this version does not know."""
        if self.coefficients not in COEFFICIENT_PRECISIONS:
            raise ValueError(
                f"coefficients must be one of {COEFFICIENT_PRECISIONS}, got {self.coefficients!r}"
            )


class CMDStrategy(FlatModelStrategy):
    """Federated embedded CMD (see ``shared/docs/fl-protocol.md``).

    Rounds 1..F are FedAvg and the server keeps the global snapshots w(0..F). After round F,
    post-hoc CMD fixes the modes and references (state version 1); every later round updates the
    coefficients online, and every L rounds an embedding event freezes the most stable weights.
    From round F + 1 on, messages carry only the free weights, the M reference values and the
    packed extras, plus a state delta for nodes whose state version is behind. The server
    rebuilds the embedded weights from the averaged references with the same float32 arithmetic
    as the clients, so both hold bitwise the same model.

    Parameters
    ----------
    layout : ParameterLayout
        The model's layout.
    ledger : ByteLedger
        Where every message's bytes are recorded.
    schedule : EmbeddingSchedule
        Warm-up F, event interval L, percent P, cap on the embedded share.
    n_modes : int
        M, the largest number of modes. Default 10.
    n_samples : int
        K, weights sampled for clustering. Default 1000.
    seed : int
        Seed of the clustering sample. Default 0.
    options : CMDOptions
        Selection rule, bounds, and the guard.
    validate_fn : callable ``(flat, extras) -> accuracy`` or None
        Server-side validation (never the test split); enables the guard.
    **kwargs
        Passed to :class:`MeteredFedAvg` (sampling, validation bounds).
    """

    def __init__(
        self,
        layout: ParameterLayout,
        ledger: ByteLedger,
        schedule: EmbeddingSchedule,
        n_modes: int = 10,
        n_samples: int = 1000,
        seed: int = 0,
        options: CMDOptions | None = None,
        validate_fn: ValidateFn | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(layout, ledger, **kwargs)
        self.schedule = schedule
        self.options = options or CMDOptions()
        self.validate_fn = validate_fn
        self.online = OnlineCMD(
            n_modes, schedule.warmup, n_samples, seed, layout, self.options.reference_std_ratio
        )
        self.guard_events: list[dict[str, Any]] = []
        self.refresh_events: list[dict[str, Any]] = []
        self._paused_until = 0
        self._probe_rounds: set[int] = set()
        self.state: EmbeddingState | None = None
        self.history: EmbeddingHistory | None = None
        self.selector: EmbeddingSelector | None = None
        self.node_versions: dict[int, int] = {}
        self._in_step: dict[int, int] = {}  # node -> last round its reply proved its state
        self._extras_specs = layout.extra_specs()
        self._extras_bytes = extras_nbytes(self._extras_specs)

    @property
    def cmd_active(self) -> bool:
        """True once warm-up is over and messages use the CMD format."""
        return self.state is not None

    # --- sending ------------------------------------------------------------------------------
    def train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        """Dense messages in warm-up; afterwards the free vector, references and state deltas."""
        if self.global_flat is None:  # the first round: w(0) is the first snapshot
            self.set_global(arrays)
            assert self.global_flat is not None
            self.online.update(self.global_flat)
        if self.state is None:
            return super().train_messages(server_round, arrays, config, node_ids)
        assert self.global_flat is not None
        probe = self._is_probe_round(server_round)
        config[PROBE] = int(probe)
        if probe:
            self._probe_rounds.add(server_round)
        if self.downlink is None:
            self._sent_flat = self.global_flat
            messages = self._cmd_messages(config, node_ids, MessageType.TRAIN, self.global_flat)
        else:
            messages = self._coded_cmd_messages(server_round, config, node_ids)
        assert self._sent_flat is not None
        self.sent_checksums[server_round] = model_checksum(
            self._sent_flat, pack_tensors(self.global_extras)
        )
        return messages

    def evaluate_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        """Dense in warm-up; afterwards what CMD sends for training (free vector, references).

        A node behind the server's state version gets the state delta with it, as for training;
        the node does not keep it (its stored state moves only with training replies, whose
        checksums prove it), so an evaluation never puts client and server views out of step.
        The model is the global one as it is, also when the training downlink is coded.
        """
        if self.state is None or self.global_flat is None:
            return super().evaluate_messages(server_round, arrays, config, node_ids)
        return self._cmd_messages(config, node_ids, MessageType.EVALUATE, self.global_flat)

    def _cmd_messages(
        self,
        config: ConfigRecord,
        node_ids: list[int],
        message_type: str,
        flat: np.ndarray,
        coded: np.ndarray | None = None,
        keyframe: tuple[int, np.ndarray] | None = None,
    ) -> list[Message]:
        """One CMD message per node: the free vector and references of ``flat`` with the extras
        (or the ``coded`` blob of them, to nodes that hold the downlink's base; the ``keyframe``
        blob of round ``keyframe[0]``, if any, to the others), and the state delta if the node
        is behind."""
        assert self.state is not None and self.history is not None
        free, refs = self.state.split(flat)
        extras = pack_tensors(self.global_extras)
        model_record = CMDModel(free, refs, extras).to_record()
        coded_record = None if coded is None else CodedUpdate(coded, extras).to_record()
        keyframe_record = None if keyframe is None else CodedUpdate(keyframe[1], extras).to_record()
        config[STATE_VERSION] = self.state.version
        config[N_MODES] = self.state.n_modes
        messages = []
        for node in node_ids:
            if coded_record is not None and self.downlink and self.downlink.holds_base(node):
                content = RecordDict({CODED_CMD: coded_record, CONFIG: config})
            elif keyframe is not None and keyframe_record is not None:
                content = RecordDict({KEYFRAME_CMD: keyframe_record, CONFIG: config})
                self.note_keyframe(keyframe[0], node)
            else:
                content = RecordDict({CMD_MODEL: model_record, CONFIG: config})
            known = self.node_versions.get(node, 0)
            if known < self.state.version:
                delta = self.history.delta(self.state, known)
                content[CMD_STATE] = delta.to_array_record(self.state.n_weights, self.state.n_modes)
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def _coded_cmd_messages(
        self, server_round: int, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        """Training messages of a coded downlink: the public model moves towards the global
        one in the free weights and references; the embedded ones follow (``assemble``)."""
        assert self.state is not None and self.downlink is not None
        assert self.global_flat is not None
        state = self.state
        n_free = state.free_indices.size
        blob = self.downlink.advance(
            server_round,
            self.global_flat,
            lambda values: state.assemble(values[:n_free], values[n_free:]),
            np.concatenate([state.free_indices, state.references]),
        )
        assert self.downlink.flat is not None
        self._sent_flat = self.downlink.flat
        self.note_downlink_lag(self.global_flat)
        config.update(self.downlink.config())
        keyframe = None
        # Probe replies send trained values as they are: they must start from the public model.
        if blob is not None and not config.get(PROBE, 0):
            keyframe_blob = self.keyframe(
                server_round,
                lambda values: state.assemble(values[:n_free], values[n_free:]),
                pack_tensors(self.global_extras),
                np.concatenate([state.free_indices, state.references]),
            )
            if keyframe_blob is not None:
                keyframe = (server_round, keyframe_blob)
        return self._cmd_messages(
            config, node_ids, MessageType.TRAIN, self._sent_flat, blob, keyframe
        )

    # --- receiving ----------------------------------------------------------------------------
    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        """Validate and average, rebuild the embedded weights, update CMD, run events."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            if self.state is None:
                self.set_global(arrays)
            assert self.global_flat is not None
            self.online.update(self.global_flat)
            if self.state is None and self.online.ready:
                self._start_embedding(server_round)
            elif self.state is not None and self.schedule.is_event(server_round):
                self._embedding_event(server_round)
            arrays = self.global_arrays()
        self.round_info[server_round] = {
            "embedded_fraction": 0.0 if self.state is None else self.state.embedded_fraction,
            "state_version": 0 if self.state is None else self.state.version,
            "n_free": self.layout.n_weights if self.state is None else self.state.free_indices.size,
        }
        return arrays, metrics

    def parse_train_reply(self, server_round: int, reply: Message) -> ParsedReply:
        """Dense replies in warm-up; CMD replies must match this round's state exactly."""
        if self.state is None:
            return super().parse_train_reply(server_round, reply)
        self._note_node_state(server_round, reply)
        content = self.reply_content(reply)
        metrics = self.reply_metrics(server_round, content, reply.metadata.src_node_id)
        version = metrics.pop(STATE_VERSION, None)
        if version != self.state.version:
            raise RejectedReply(
                f"trained with state version {version}, the round's is {self.state.version}"
            )
        probe = server_round in self._probe_rounds
        if self.codec is not None and not probe:  # probes send every value as it is
            model = self._coded_cmd_model(content)
        else:
            model = CMDModel.from_record(
                only_record(content, CMD_MODEL),
                self.state.free_indices.size,
                self.state.n_modes,
                self._extras_bytes,
                n_embedded=self.state.n_embedded if probe else None,
            )
        extras = finite_extras(unpack_tensors(model.extras, self._extras_specs))
        probed = [] if model.embedded is None else [model.embedded]
        return ParsedReply(
            reply.metadata.src_node_id,
            metrics.pop("num-examples"),
            [model.free, model.references, *probed, *extras],
            metrics,
        )

    def _coded_cmd_model(self, content: RecordDict) -> CMDModel:
        """A coded CMD reply as the model it stands for: sent free + references plus the update."""
        assert self.state is not None and self.global_flat is not None and self.codec
        coded = CodedUpdate.from_record(only_record(content, CODED_UPDATE), self._extras_bytes)
        assert self._sent_flat is not None
        values = coded.values(self.codec, np.concatenate(self.state.split(self._sent_flat)))
        n_free = self.state.free_indices.size
        return CMDModel(values[:n_free], values[n_free:], coded.extras)

    def apply_average(self, server_round: int, averaged: list[np.ndarray]) -> ArrayRecord:
        """Dense in warm-up; in the CMD phase rebuild the full model from the averaged parts
        (free vector, references, the probe's embedded values, extras)."""
        if self.state is None:
            return super().apply_average(server_round, averaged)
        free, refs, *rest = averaged
        probe = server_round in self._probe_rounds
        trained_embedded = rest.pop(0) if probe else None
        lag = self._downlink_lag
        if lag is not None:  # the update lands on the global model, not on the public one
            lag_free, lag_refs = self.state.split(lag)
            free, refs = free + lag_free, refs + lag_refs
            if trained_embedded is not None:
                trained_embedded = trained_embedded + lag[self.state.embedded_indices]
        self.global_flat = self.state.assemble(free, refs)
        self.global_extras = rest
        if trained_embedded is not None:
            self._refresh(server_round, trained_embedded)
        return self.global_arrays()

    def _note_node_state(self, server_round: int, reply: Message) -> None:
        """Record a node whose reply trained on exactly the round's model (state version and
        checksum): it holds the current state, whether or not the reply is then accepted."""
        assert self.state is not None
        if not self._proves_model(server_round, reply):
            return
        if reply.content.metric_records[METRICS].get(STATE_VERSION) == self.state.version:
            node = reply.metadata.src_node_id
            self.node_versions[node] = self.state.version
            self._in_step[node] = server_round

    def reject(self, server_round: int, node_id: int, reason: str) -> None:
        """Drop the reply; its node is sent a full state next time, unless the reply proved the
        node holds the current state (rejected for a non-finite loss, say)."""
        super().reject(server_round, node_id, reason)
        if self._in_step.get(node_id) != server_round:
            self.node_versions.pop(node_id, None)

    # --- CMD bookkeeping ----------------------------------------------------------------------
    def _start_embedding(self, server_round: int) -> None:
        fit = self.online.fit
        self.state = EmbeddingState(fit.modes, fit.references, version=1)
        self._set_coefficient_precision()
        self.history = EmbeddingHistory(self.state)
        self._start_selector(fit)
        sizes = np.bincount(fit.modes, minlength=fit.n_modes)
        logger.info(
            "round %d: CMD warm-up done: %d modes (sizes %s), state version 1",
            server_round,
            fit.n_modes,
            sizes.tolist(),
        )

    def _start_selector(self, fit: CMDFit) -> None:
        self.selector = EmbeddingSelector(
            self.schedule,
            fit,
            rule=self.options.selection_rule,
            max_abs_a=self.options.max_abs_a,
            max_residual=self.options.max_residual,
            refill_released=self.options.refresh_refill,
        )

    def _set_coefficient_precision(self) -> None:
        assert self.state is not None
        self.state.round_coefficients = self.options.coefficients == "float16"
        self.state.a_on_grid = self.options.coefficients == "grid"

    def _embedding_event(self, server_round: int) -> None:
        assert self.state is not None and self.selector is not None and self.history is not None
        assert self.global_flat is not None
        if server_round <= self._paused_until:
            logger.info("round %d: embedding paused by the guard", server_round)
            return
        before = self.global_flat.copy()
        references = self.global_flat[self.state.references]
        chosen = embedding_event(self.selector, self.online.fit, self.state, references)
        if chosen.size:
            self.history.record(self.state.version, chosen)
            self.state.project(self.global_flat)
            self._guard(server_round, before, chosen)
        logger.info(
            "round %d: embedding event: %d weights embedded now, %.1f %% in all (version %d)",
            server_round,
            chosen.size,
            100 * self.state.embedded_fraction,
            self.state.version,
        )

    def _guard(self, server_round: int, before: np.ndarray, chosen: np.ndarray) -> None:
        """Undo the event just made if it cost validation accuracy; pause embedding then."""
        if self.validate_fn is None:
            return
        assert self.state is not None and self.history is not None
        assert self.global_flat is not None
        accuracy_before = self.validate_fn(before, self.global_extras)
        accuracy_after = self.validate_fn(self.global_flat, self.global_extras)
        undone = accuracy_before - accuracy_after > self.options.guard_margin
        if undone:
            self.state.release(chosen)
            self.state.version += 1
            self.history.record(self.state.version, chosen)
            self.global_flat = before
            self._paused_until = server_round + self.options.guard_pause
            logger.warning(
                "round %d: guard undid the event (validation accuracy %.4f -> %.4f); "
                "embedding paused until round %d",
                server_round,
                accuracy_before,
                accuracy_after,
                self._paused_until,
            )
        self.guard_events.append(
            {
                "round": server_round,
                "embedded": int(chosen.size),
                "accuracy_before": accuracy_before,
                "accuracy_after": accuracy_after,
                "undone": undone,
            }
        )

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything CMD needs to continue bitwise as if never stopped.

        Node state versions are not kept: a resumed run talks to new client contexts, so every
        node gets a full state in its first round after the resume.
        """
        arrays, meta = super().checkpoint()
        arrays.update(prefixed("online", self.online.to_arrays()))
        if self.state is not None:
            assert self.history is not None and self.selector is not None
            arrays.update(prefixed("state", self.state.to_arrays()))
            arrays.update(prefixed("history", self.history.to_arrays()))
            arrays.update(prefixed("selector", self.selector.to_arrays()))
        meta.update(
            {
                "paused_until": self._paused_until,
                "probe_rounds": sorted(self._probe_rounds),
                "guard_events": self.guard_events,
                "refresh_events": self.refresh_events,
            }
        )
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint` saved."""
        super().restore(arrays, meta)
        self.online.load_arrays(unprefixed("online", arrays))
        if "state.modes" in arrays:
            self.state = EmbeddingState.from_arrays(unprefixed("state", arrays))
            self._set_coefficient_precision()
            self.history = EmbeddingHistory(self.state)
            self.history.load_arrays(unprefixed("history", arrays))
            self._start_selector(self.online.fit)
            assert self.selector is not None
            self.selector.load_arrays(unprefixed("selector", arrays))
        self._paused_until = int(meta["paused_until"])
        self._probe_rounds = set(meta["probe_rounds"])
        self.guard_events = list(meta["guard_events"])
        self.refresh_events = list(meta["refresh_events"])
        self.node_versions = {}

    def extra_reply_bytes(self, server_round: int) -> int:
        """A probe reply also carries the embedded weights' values."""
        if server_round in self._probe_rounds and self.state is not None:
            return 4 * self.state.n_embedded
        return 0

    def coded_reply_bytes(self, server_round: int) -> int:
        """In the CMD phase a coded reply codes the free weights and references; a probe's
        reply sends them as they are (the embedded ones: `extra_reply_bytes`)."""
        if self.state is None or self.codec is None:
            return super().coded_reply_bytes(server_round)
        n_values = self.state.free_indices.size + self.state.n_modes
        if server_round in self._probe_rounds:
            return 4 * n_values + self._extras_bytes
        return encoded_nbytes(self.codec, n_values) + self._extras_bytes

    def _is_probe_round(self, server_round: int) -> bool:
        every = self.options.refresh_every
        return (
            every > 0
            and self.state is not None
            and self.state.n_embedded > 0
            and (server_round - self.schedule.warmup) % every == 0
        )

    def _refresh(self, server_round: int, trained: np.ndarray) -> None:
        """Release the embedded weights that the clients' training pulled off the CMD model."""
        assert self.state is not None and self.history is not None
        assert self.global_flat is not None and self.selector is not None
        embedded = self.state.embedded_indices
        modelled = self.global_flat[embedded]
        scale = np.maximum(np.abs(trained), np.abs(modelled))
        floor = 1e-3 * float(np.median(np.abs(self.global_flat))) + 1e-12
        drift = np.abs(trained - modelled) / np.maximum(scale, floor)
        over = np.flatnonzero(drift > self.options.refresh_tolerance)
        limit = int(self.options.refresh_max_fraction * self.state.n_weights)
        if over.size > limit:
            over = over[np.argsort(drift[over])[::-1][:limit]]
        released = np.sort(embedded[over])
        kept = np.delete(np.arange(embedded.size), over)
        refit = embedded[kept] if self.options.refresh_refit else embedded[:0]
        if refit.size:
            # b such that a * w_ref + b is the averaged trained value (float32, as clients do).
            refs = self.global_flat[self.state.references][self.state.modes[refit]]
            a = self.state.frozen_a[refit]
            self.state.embed(refit, a, trained[kept].astype(np.float32) - a * refs)
        if released.size:
            self.state.release(released)
            self.selector.excluded[released] = True
            self.global_flat[released] = trained[np.searchsorted(embedded, released)]
        if released.size or refit.size:
            self.state.version += 1
            self.history.record(self.state.version, released, refit=refit)
            self.state.project(self.global_flat)
        self.refresh_events.append(
            {
                "round": server_round,
                "probed": int(embedded.size),
                "released": int(released.size),
                "refit": int(refit.size),
                "median_drift": float(np.median(drift)) if drift.size else 0.0,
            }
        )
        logger.info(
            "round %d: refresh released %d of %d embedded weights (median drift %.3f)",
            server_round,
            released.size,
            embedded.size,
            self.refresh_events[-1]["median_drift"],
        )
