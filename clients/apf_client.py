"""Run any PyTorch model under APF (Adaptive Parameter Freezing) inside a Flower ClientApp."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.cmd_client import TrainFn, metric_record
from cmd_fl.codec import CodecSpec, decode
from cmd_fl.coded import codec_from_config, encode_update
from cmd_fl.layout import ParameterLayout
from cmd_fl.payload import (
    APF_BASE_VERSION,
    APF_MASK_ID,
    APF_MODEL,
    APF_MODEL_VERSION,
    CONFIG,
    METRICS,
    MODEL_CHECKSUM,
    APFModel,
    extras_nbytes,
    model_checksum,
)
from cmd_fl.torch_projection import StepPostHook
from cmd_fl.wire import (
    decode_index_set,
    from_array_record,
    pack_tensors,
    to_array_record,
    unpack_tensors,
)

_FLAT = "flat"
_MASK = "mask"


@dataclass
class _FrozenPart:
    param: torch.nn.Parameter
    local_idx: torch.Tensor  # flat positions of the frozen entries inside the parameter
    values: torch.Tensor  # their synchronised values


class FrozenEntryReset(StepPostHook):
    """Resets the frozen entries of a live model to their synchronised values after every
    optimizer step.

    Gradients of frozen entries are still computed (APF saves communication, not compute); the
    optimizer may move them, and the post-hook puts them back, bitwise, whatever the optimizer.

    Parameters
    ----------
    module : torch.nn.Module
        The live model; its modelled parameters follow ``layout``.
    layout : ParameterLayout
        The module's layout.
    frozen : ndarray of bool, shape (N,)
        Which flat entries are frozen this round.
    synced : ndarray, shape (N,)
        The synchronised flat model (the values frozen entries keep).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        layout: ParameterLayout,
        frozen: np.ndarray,
        synced: np.ndarray,
    ) -> None:
        super().__init__()
        if frozen.shape != (layout.n_weights,) or synced.shape != (layout.n_weights,):
            raise ValueError(f"frozen mask and synced model must have {layout.n_weights} entries")
        params = dict(module.named_parameters())
        self._parts: list[_FrozenPart] = []
        for spec in layout.modelled:
            local = np.flatnonzero(frozen[spec.offset : spec.offset + spec.numel])
            if local.size == 0:
                continue
            param = params[spec.name]
            values = torch.from_numpy(synced[spec.offset + local].copy())
            self._parts.append(
                _FrozenPart(
                    param=param,
                    local_idx=torch.from_numpy(local).to(param.device),
                    values=values.to(param.device, param.dtype),
                )
            )

    @torch.no_grad()
    def reset(self) -> None:
        """Put every frozen entry back to its synchronised value."""
        for part in self._parts:
            part.param.data.view(-1)[part.local_idx] = part.values

    def after_step(self) -> None:
        """Reset the frozen entries (the step post-hook)."""
        self.reset()


@dataclass
class _Synced:
    """What a client holds between rounds: the synchronised flat model and the mask."""

    flat: np.ndarray  # float32, (N,)
    mask: np.ndarray  # the encoded active set (uint8), as the server sent it
    model_version: int
    mask_id: int


class APFClient:
    """Wraps a PyTorch model and the user's training function for the APF protocol.

    The client keeps its synchronised flat model and the server's mask in ``context.state``. A
    training message brings the values it lacks (applied to that model), the extras and, when it
    changed, the mask; the client trains every parameter, resets the frozen entries after every
    optimizer step, and answers with the active values only, the packed extras, num-examples, the
    mask id and the checksum of the model it received. When the message names a codec, a coded
    message's values arrive as a blob of their change, and the reply sends the blob of
    ``trained - received`` over the active entries (`cmd_fl.coded.encode_update`, the residual
    kept in ``context.state``).

    Parameters
    ----------
    model : torch.nn.Module
        The model; its architecture must be the server's.
    train_fn : callable ``(model, optimizer_hook) -> metrics``
        Trains ``model`` in place and returns metrics including ``num-examples``; it must call
        ``optimizer_hook`` once with the optimizer before training.
    state_key : str
        Key of the APF state in ``context.state``.
    """

    def __init__(
        self, model: torch.nn.Module, train_fn: TrainFn, state_key: str = "apf-fl"
    ) -> None:
        self.model = model
        self.train_fn = train_fn
        self.state_key = state_key
        self.layout = ParameterLayout.from_module(model)
        self._extras_specs = self.layout.extra_specs()
        self._extras_bytes = extras_nbytes(self._extras_specs)

    def train(self, msg: Message, context: Context) -> Message:
        """Answer one APF training message."""
        content = msg.content
        received = APFModel.from_record(
            content.array_records[APF_MODEL], self._extras_bytes, index_sets=True
        )
        config = content.config_records[CONFIG]
        codec = codec_from_config(config)
        synced = self._sync(received, config, context, codec)
        n_weights = self.layout.n_weights
        active_idx = decode_index_set(synced.mask, n_weights)
        active = np.zeros(n_weights, dtype=bool)
        active[active_idx] = True
        extras = unpack_tensors(received.extras, self._extras_specs)
        self.layout.load_into(self.model, synced.flat, extras)
        checksum = model_checksum(synced.flat, received.extras)

        reset = FrozenEntryReset(self.model, self.layout, ~active, synced.flat)
        try:
            metrics = dict(self.train_fn(self.model, reset.attach))
        finally:
            reset.detach()
        trained = self.model.state_dict()
        values = self.layout.flatten_numpy(trained)[active]
        extras_blob = pack_tensors(self.layout.extra_tensors(trained))
        if codec is None:
            model = APFModel(values, extras_blob)
        else:
            blob = encode_update(
                context.state,
                self.state_key + ".residual",
                codec,
                synced.flat[active_idx],
                values,
                positions=active_idx,
            )
            model = APFModel(np.empty(0, dtype=np.float32), extras_blob, coded=blob)
        self._save(context, synced)  # only once training succeeded
        metrics[APF_MASK_ID] = synced.mask_id
        metrics[MODEL_CHECKSUM] = checksum
        reply = RecordDict({APF_MODEL: model.to_record(), METRICS: metric_record(metrics)})
        return Message(reply, reply_to=msg)

    def _sync(
        self,
        received: APFModel,
        config: ConfigRecord,
        context: Context,
        codec: CodecSpec | None,
    ) -> _Synced:
        """The synchronised model and mask after applying a message, or a clear error."""
        base = int(config[APF_BASE_VERSION])  # type: ignore[arg-type]
        version = int(config[APF_MODEL_VERSION])  # type: ignore[arg-type]
        mask_id = int(config[APF_MASK_ID])  # type: ignore[arg-type]
        n_weights = self.layout.n_weights
        held = self._load(context)
        if received.coded is not None and (codec is None or base < 0):
            raise ValueError("coded values need a codec and a model version to apply them to")
        if base < 0:  # a full model
            if received.sync is not None:
                raise ValueError("a full model carries no sync set")
            if received.values.size != n_weights:
                raise ValueError(f"full model has {received.values.size} values, not {n_weights}")
            flat = received.values.astype(np.float32, copy=True)
        else:
            if held is None or held.model_version != base:
                have = None if held is None else held.model_version
                raise ValueError(f"message updates model version {base}, the client holds {have}")
            # The values sent are, in flat order, the entries of the sync set or else of the
            # mask this client holds (before a new mask replaces it).
            which = held.mask if received.sync is None else received.sync
            changed = decode_index_set(which, n_weights)
            flat = held.flat.copy()
            if received.coded is not None:
                assert codec is not None
                # The server decoded the same blob onto the same values: bitwise its model.
                flat[changed] += decode(received.coded, codec, changed.size)
            elif received.values.size != changed.size:
                raise ValueError(
                    f"message has {received.values.size} values for {changed.size} entries"
                )
            else:
                flat[changed] = received.values
        if received.mask is not None:
            decode_index_set(received.mask, n_weights)  # validate before keeping it
            mask = received.mask.copy()
        elif held is not None and held.mask_id == mask_id:
            mask = held.mask
        else:
            have = None if held is None else held.mask_id
            raise ValueError(f"message uses mask {mask_id} without sending it; client holds {have}")
        return _Synced(flat, mask, version, mask_id)

    def _load(self, context: Context) -> _Synced | None:
        store = context.state
        if self.state_key not in store:
            return None
        parts = from_array_record(
            store.array_records[self.state_key],
            {_FLAT: (np.float32, self.layout.n_weights), _MASK: (np.uint8, None)},
        )
        meta = store.config_records[self.state_key + ".meta"]
        return _Synced(
            parts[_FLAT],
            parts[_MASK],
            int(meta[APF_MODEL_VERSION]),  # type: ignore[arg-type]
            int(meta[APF_MASK_ID]),  # type: ignore[arg-type]
        )

    def _save(self, context: Context, synced: _Synced) -> None:
        context.state[self.state_key] = to_array_record({_FLAT: synced.flat, _MASK: synced.mask})
        context.state[self.state_key + ".meta"] = ConfigRecord(
            {APF_MODEL_VERSION: synced.model_version, APF_MASK_ID: synced.mask_id}
        )
