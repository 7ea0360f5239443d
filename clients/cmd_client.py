"""Run any PyTorch model under CMD inside a Flower ClientApp."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from cmd_fl.coded import CODED_UPDATE, CodedUpdate, codec_from_config, encode_update
from cmd_fl.downlink import (
    CODED_CMD,
    CODED_DENSE,
    KEYFRAME_CMD,
    KEYFRAME_DENSE,
    decode_keyframe,
    held_public,
    store_public,
)
from cmd_fl.embedding import EmbeddingState
from cmd_fl.layout import ParameterLayout
from cmd_fl.payload import (
    CMD_MODEL,
    CMD_STATE,
    CONFIG,
    DENSE_MODEL,
    METRICS,
    MODEL_CHECKSUM,
    N_MODES,
    NUM_EXAMPLES,
    PROBE,
    STATE_VERSION,
    CMDModel,
    extras_nbytes,
    load_state,
    model_checksum,
    save_state,
)
from cmd_fl.sync import apply_delta
from cmd_fl.torch_projection import EmbeddedProjector
from cmd_fl.wire import StateDelta, pack_tensors, unpack_tensors

OptimizerHook = Callable[[torch.optim.Optimizer], object]
TrainFn = Callable[[torch.nn.Module, OptimizerHook | None], Mapping[str, float]]
EvaluateFn = Callable[[torch.nn.Module], Mapping[str, float]]

Projection = Literal["step", "round"]

logger = logging.getLogger(__name__)

HOOK_WARNING = (
    "CMD step projection: the embedded weights left the CMD model during training (usually: "
    "train_fn never called optimizer_hook); they were re-projected from the trained references. "
    "Fix: call optimizer_hook(optimizer) in train_fn before training."
)


class CMDClient:
    """Wraps a PyTorch model and the user's training function for the CMD protocol.

    The client keeps its CMD state (modes, references, frozen coefficients, state version) in
    ``context.state``, so it persists across rounds in simulation and deployment. Each training
    message is answered with the trained free vector, the reference values, the packed extras,
    ``num-examples``, the state version and the checksum of the model it received. Dense
    messages (FedAvg, and CMD's warm-up) are answered densely.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its architecture must be the server's.
    train_fn : callable ``(model, optimizer_hook) -> metrics``
        Trains ``model`` in place and returns metrics including ``num-examples``. When
        ``optimizer_hook`` is not None, it must be called once with the optimizer before training
        (``step`` projection registers its hooks there).
    projection : {"step", "round"}
        ``step``: embedded weights stay on the CMD model during local training (gradients masked,
        re-projected after every optimizer step). ``round``: every weight trains locally; only
        the free weights and references are sent, and the embedded ones are re-projected from the
        averaged references at the round boundary. Default ``step``. In a refresh probe round
        (``cmd-probe`` in the config) every weight trains and the embedded ones are sent too.
    state_key : str
        Key of the CMD state in ``context.state``.
    reference_gradient : {"own", "mode"}
        How references train under ``step`` projection (see :class:`EmbeddedProjector`).
        Default ``"mode"``.

    Notes
    -----
    A ``train_fn`` that ignores ``optimizer_hook`` under ``step`` projection trains the embedded
    weights freely, and that drift is lost (only free weights and references are sent). After
    training the client compares the embedded weights with ``a * w_ref + b`` (one vectorised
    comparison); if any is off, it re-projects them from the trained references, so the live
    model matches what it reports, and logs a warning naming the fix once per client state
    (a flag in ``context.state``, since Flower may build a new client for every message).
    It warns rather than refuses: the round's result is still a valid CMD update, only a
    poorer one. ``round`` projection and probe rounds expect the drift and are not checked.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_fn: TrainFn,
        projection: Projection = "step",
        state_key: str = "cmd-fl",
        reference_gradient: str = "mode",
    ) -> None:
        if projection not in ("step", "round"):
            raise ValueError(f"projection must be 'step' or 'round', got {projection!r}")
        self.model = model
        self.train_fn = train_fn
        self.projection = projection
        self.state_key = state_key
        self.reference_gradient = reference_gradient
        self.layout = ParameterLayout.from_module(model)
        self._extras_specs = self.layout.extra_specs()
        self._extras_bytes = extras_nbytes(self._extras_specs)

    def train(self, msg: Message, context: Context) -> Message:
        """Answer one training message (dense or CMD)."""
        content = msg.content
        records = content.array_records
        if CMD_MODEL in records or CODED_CMD in records or KEYFRAME_CMD in records:
            reply = self._train_cmd(content, context)
        elif DENSE_MODEL in records or CODED_DENSE in records or KEYFRAME_DENSE in records:
            reply = self._train_dense(content, context)
        else:
            raise ValueError(
                f"training message carries none of {DENSE_MODEL!r}, {CMD_MODEL!r}, "
                f"{CODED_DENSE!r}, {CODED_CMD!r}, {KEYFRAME_DENSE!r}, {KEYFRAME_CMD!r} arrays"
            )
        return Message(reply, reply_to=msg)

    def _train_dense(self, content: RecordDict, context: Context) -> RecordDict:
        config = content.config_records[CONFIG]
        codec = codec_from_config(config)
        keyframe = KEYFRAME_DENSE in content.array_records
        if keyframe or CODED_DENSE in content.array_records:
            name = KEYFRAME_DENSE if keyframe else CODED_DENSE
            values, extras_blob = self._decoded(content, name, context, lambda held: held)
            self.layout.load_into(
                self.model, values, unpack_tensors(extras_blob, self._extras_specs)
            )
        else:
            arrays = content.array_records[DENSE_MODEL]
            self.model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        loaded = self.model.state_dict()
        received = self.layout.flatten_numpy(loaded)
        checksum = model_checksum(received, pack_tensors(self.layout.extra_tensors(loaded)))
        store_public(context.state, self._public_key, config, received, keyframe)
        metrics = dict(self.train_fn(self.model, None))
        metrics[MODEL_CHECKSUM] = checksum
        trained = self.model.state_dict()
        if codec is None:
            model_record = {DENSE_MODEL: ArrayRecord(trained)}
        else:
            blob = encode_update(
                context.state,
                self.state_key + ".residual",
                codec,
                received,
                self.layout.flatten_numpy(trained),
            )
            extras = pack_tensors(self.layout.extra_tensors(trained))
            model_record = {CODED_UPDATE: CodedUpdate(blob, extras).to_record()}
        return RecordDict({**model_record, METRICS: metric_record(metrics)})

    def _train_cmd(self, content: RecordDict, context: Context) -> RecordDict:
        config = content.config_records[CONFIG]
        state = self._synced_state(content, context)
        received = self._cmd_model(content, state, context)
        flat = self._load_cmd_model(received, state)
        checksum = model_checksum(flat, received.extras)
        keyframe = KEYFRAME_CMD in content.array_records
        store_public(context.state, self._public_key, config, flat, keyframe)

        probe = bool(config.get(PROBE, 0))
        projector = None
        hook: OptimizerHook | None = None
        if self.projection == "step" and state.n_embedded and not probe:
            projector = EmbeddedProjector(
                self.model, self.layout, state, reference_gradient=self.reference_gradient
            )
            hook = projector.attach
        try:
            metrics = dict(self.train_fn(self.model, hook))
        finally:
            if projector is not None:
                projector.detach()

        trained = self.model.state_dict()
        trained_flat = self.layout.flatten_numpy(trained)
        if projector is not None:
            self._check_on_model(projector, state, trained_flat, context)
        free, refs = state.split(trained_flat)
        embedded = trained_flat[state.embedded_indices].astype(np.float32) if probe else None
        extras_blob = pack_tensors(self.layout.extra_tensors(trained))
        metrics[STATE_VERSION] = state.version
        metrics[MODEL_CHECKSUM] = checksum
        codec = codec_from_config(config)
        if codec is not None and not probe:  # probes send every value as it is
            blob = encode_update(
                context.state,
                self.state_key + ".residual",
                codec,
                np.concatenate([received.free, received.references]),
                np.concatenate([free, refs]),
                positions=np.concatenate([state.free_indices, state.references]),
            )
            model_record = CodedUpdate(blob, extras_blob).to_record()
            return RecordDict({CODED_UPDATE: model_record, METRICS: metric_record(metrics)})
        return RecordDict(
            {
                CMD_MODEL: CMDModel(free, refs, extras_blob, embedded).to_record(),
                METRICS: metric_record(metrics),
            }
        )

    @property
    def _public_key(self) -> str:
        return self.state_key + ".public"

    def _decoded(
        self,
        content: RecordDict,
        name: str,
        context: Context,
        base_of: Callable[[np.ndarray], np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        """The values of the coded model record ``name``: ``base + decode(blob)``, the base
        taken by ``base_of`` from the public model this client holds (a keyframe needs none);
        and the packed extras."""
        config = content.config_records[CONFIG]
        codec = codec_from_config(config)
        if codec is None:
            raise ValueError(f"the message carries {name!r} but names no codec")
        coded = CodedUpdate.from_record(content.array_records[name], self._extras_bytes)
        if name in (KEYFRAME_DENSE, KEYFRAME_CMD):
            length = base_of(np.zeros(self.layout.n_weights, dtype=np.float32)).size
            return decode_keyframe(coded.update, codec, length), coded.extras
        held = held_public(context.state, self._public_key, config, self.layout.n_weights)
        return coded.values(codec, base_of(held)), coded.extras

    def _cmd_model(
        self, content: RecordDict, state: EmbeddingState, context: Context | None = None
    ) -> CMDModel:
        """The CMD message's model: as it is, or decoded against the public model this client
        holds (split with the state after the message's delta, as the server split it)."""
        records = content.array_records
        name = KEYFRAME_CMD if KEYFRAME_CMD in records else CODED_CMD
        if name not in records:
            return CMDModel.from_record(
                records[CMD_MODEL],
                state.free_indices.size,
                state.n_modes,
                self._extras_bytes,
            )
        if context is None:
            raise ValueError("a coded CMD message needs the node's context")
        values, extras_blob = self._decoded(
            content, name, context, lambda held: np.concatenate(state.split(held))
        )
        n_free = state.free_indices.size
        return CMDModel(values[:n_free], values[n_free:], extras_blob)

    def _load_cmd_model(self, model: CMDModel, state: EmbeddingState) -> np.ndarray:
        """Load a CMD model (embedded weights rebuilt) into the torch model; returns it flat."""
        flat = state.assemble(model.free, model.references)
        extras = unpack_tensors(model.extras, self._extras_specs)
        self.layout.load_into(self.model, flat, extras)
        return flat

    def _check_on_model(
        self,
        projector: EmbeddedProjector,
        state: EmbeddingState,
        trained: np.ndarray,
        context: Context,
    ) -> None:
        """Re-project embedded weights that left the CMD model, and warn once per state.

        ``trained`` is the flat trained model; it and the live model are re-projected in place.
        """
        embedded = trained[state.embedded_indices]
        # With the hook attached the projector writes these values bitwise; the tolerance only
        # absorbs a dtype round trip, not training.
        expected = state.embedded_values(trained[state.references])
        if np.allclose(embedded, expected, rtol=1e-6, atol=1e-7):
            return
        projector.project()
        state.project(trained)
        flag = self.state_key + ".hook-warned"
        if flag not in context.state.config_records:
            context.state[flag] = ConfigRecord({"warned": 1})
            drift = float(np.max(np.abs(embedded - expected)))
            logger.warning("%s (max drift %.3g)", HOOK_WARNING, drift)

    def _synced_state(
        self, content: RecordDict, context: Context, persist: bool = True
    ) -> EmbeddingState:
        """The client's state brought to the server's version, or a clear error.

        ``persist``: store a state delta that came with the message in ``context.state``.
        """
        config = content.config_records[CONFIG]
        server_version = int(config[STATE_VERSION])  # type: ignore[arg-type]
        state = load_state(context.state, self.state_key, self.layout.n_weights)
        if CMD_STATE in content.array_records:
            n_modes = int(config[N_MODES])  # type: ignore[arg-type]
            delta = StateDelta.from_array_record(
                content.array_records[CMD_STATE], self.layout.n_weights, n_modes
            )
            state = apply_delta(state, delta, self.layout.n_weights)
            if persist:
                save_state(context.state, self.state_key, state)
        if state is None:
            raise ValueError("client has no CMD state and the message carries none")
        if state.version != server_version:
            raise ValueError(
                f"client CMD state is at version {state.version}, the server's is {server_version}"
            )
        return state

    def evaluate(
        self, msg: Message, evaluate_fn: EvaluateFn, context: Context | None = None
    ) -> Message:
        """Answer an evaluation message with ``evaluate_fn``'s metrics.

        Dense messages (FedAvg, CMD's warm-up) carry the whole model. After the warm-up, CMD
        evaluation messages carry only what training messages carry (free vector, references,
        extras, and a state delta when this node is behind); they need ``context``, where the
        node's CMD state lives. A state delta that comes with an evaluation is used for it and
        not stored: the stored state moves only with training, which the server tracks.
        """
        content = msg.content
        if CMD_MODEL in content.array_records:
            if context is None:
                raise ValueError(
                    "a CMD evaluation message needs the node's context: "
                    "call CMDClient.evaluate(msg, evaluate_fn, context)"
                )
            state = self._synced_state(content, context, persist=False)
            self._load_cmd_model(self._cmd_model(content, state), state)
        elif DENSE_MODEL in content.array_records:
            self.model.load_state_dict(
                content.array_records[DENSE_MODEL].to_torch_state_dict(), strict=True
            )
        else:
            raise ValueError(
                f"evaluation message carries neither {DENSE_MODEL!r} nor {CMD_MODEL!r} arrays"
            )
        metrics = dict(evaluate_fn(self.model))
        return Message(RecordDict({METRICS: metric_record(metrics)}), reply_to=msg)


def metric_record(metrics: Mapping[str, float]) -> MetricRecord:
    """Metrics as a MetricRecord: ``num-examples`` and ints as int, the rest as float."""
    out = MetricRecord()
    for key, value in metrics.items():
        out[key] = int(value) if isinstance(value, int) or key == NUM_EXAMPLES else float(value)
    return out
