"""The APF baseline (Adaptive Parameter Freezing, Chen et al., ICDCS 2021) as a metered strategy.

The server owns the mask: ``cmd_fl.apf.AdaptiveFreezing`` decides which scalar parameters are
active each round, and every client of a round works with that one mask. What travels
(``shared/docs/apf.md``):

- downlink, per node: the values the node lacks (every entry changed since the model version it
  last synced, in flat order), the packed extras, the round's active set as an index set only when
  the node's known mask is not the current one, and the set of the values sent only when it is not
  the node's known mask (a node that took part in the last round needs none). A node the server
  knows nothing about (first contact, or its last reply failed) gets the whole flat model;
- uplink: the trained values of the active entries only, the packed extras, num-examples, the id
  of the mask it trained with and the checksum of the model it received.

The server averages the active entries (frozen ones stay as they are), then updates the APF
statistics of the active parameters with d = value before - value after.

With a codec (`cmd_fl.codec`) the uplink sends the blob of ``trained - received`` over the active
entries, with error feedback on the client. With a coded downlink too, the server keeps a
*public model* beside its full-precision global one: what every node holds, bitwise. After each
round it moves the public model's updated entries towards the global model through one coded
blob, which a node that holds the previous version applies to its copy; the global model keeps
what the codec left out (its lag), and the next update of those entries carries it (error
feedback). A node further behind gets the public model's changed values as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from cmd_fl.apf import DEFAULT_ALPHA, DEFAULT_THRESHOLD, AdaptiveFreezing
from cmd_fl.checkpoint import prefixed, unprefixed
from cmd_fl.codec import decode, encode, encoded_nbytes
from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import ByteLedger
from cmd_fl.payload import (
    APF_BASE_VERSION,
    APF_MASK_ID,
    APF_MODEL,
    APF_MODEL_VERSION,
    CONFIG,
    NUM_EXAMPLES,
    APFModel,
    extras_nbytes,
    model_checksum,
)
from cmd_fl.wire import encode_index_set, pack_tensors, unpack_tensors
from strategies.flat_model import FlatModelStrategy
from strategies.metered import ParsedReply, RejectedReply

logger = logging.getLogger("flwr.cmd_fl")

FULL_MODEL = -1
"""``apf-base-version`` of a message whose values are the whole flat model."""


class APFStrategy(FlatModelStrategy):
    """Federated APF: only active parameters travel; the server decides the mask.

    The APF logic starts at round 1 (every parameter is active in it). Nodes are tracked by the
    model version and mask id they hold, committed when their reply is valid; a node without a
    valid reply in a round it was sent a message is forgotten and gets the whole model next time,
    whatever it applied. Client and server hold bitwise the same model (checked by checksum).

    Parameters
    ----------
    layout : ParameterLayout
        The model's layout: its modelled weights are the APF parameters; extras travel densely.
    ledger : ByteLedger
        Where every message's bytes are recorded.
    alpha : float
        EMA factor of the APF statistics. Default 0.99 (see ``cmd_fl.apf``).
    threshold : float
        Initial stability threshold T0. Default 0.05.
    random_freeze : bool
        "APF + random freezing": one extra frozen round with probability 0.5 per parameter and
        round. Default False.
    seed : int
        Seed of the random freezing. Default 0.
    **kwargs
        Passed to :class:`MeteredFedAvg` (sampling, validation bounds, ``codec`` and
        ``code_downlink``: see the module's docstring).
    """

    def __init__(
        self,
        layout: ParameterLayout,
        ledger: ByteLedger,
        alpha: float = DEFAULT_ALPHA,
        threshold: float = DEFAULT_THRESHOLD,
        random_freeze: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        code_downlink = bool(kwargs.pop("code_downlink", True))
        # APF codes its own downlink (below), not through MeteredFedAvg's dense public model.
        super().__init__(layout, ledger, code_downlink=False, **kwargs)
        self.code_downlink = self.codec is not None and code_downlink
        # What nodes hold: the global model itself, or its coded copy under a coded downlink.
        self.public_flat: np.ndarray | None = None
        self._public_blob: np.ndarray | None = None  # moves version _blob_base to model_version
        self._blob_base = FULL_MODEL
        self.freezing = AdaptiveFreezing(
            layout.n_weights, alpha, threshold, random_freeze=random_freeze, seed=seed
        )
        self.last_changed = np.zeros(layout.n_weights, dtype=np.int64)  # round of last update
        self.model_version = 0  # the last round that changed the global model
        self.mask_id = 0
        self.masks: dict[int, np.ndarray] = {}  # mask id -> encoded active set (canonical)
        self.active = np.arange(layout.n_weights, dtype=np.int64)
        self.node_state: dict[int, tuple[int, int]] = {}  # node -> (model version, mask id)
        self._pending: dict[int, tuple[int, int]] = {}
        self._valid_nodes: set[int] = set()
        self._extras_specs = layout.extra_specs()
        self._extras_bytes = extras_nbytes(self._extras_specs)

    # --- sending ------------------------------------------------------------------------------
    def train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        """One message per node: the values it lacks, the extras, the mask if its own is stale."""
        if self.global_flat is None:  # the first round: the initial model
            self.set_global(arrays)
            assert self.global_flat is not None
            self.public_flat = self.global_flat.copy() if self.code_downlink else self.global_flat
        assert self.global_flat is not None and self.public_flat is not None
        n_weights = self.layout.n_weights
        self.active = self.freezing.active_indices(server_round)
        mask = encode_index_set(self.active, n_weights)
        if self.mask_id == 0 or not np.array_equal(mask, self.masks[self.mask_id]):
            self.mask_id += 1
            self.masks[self.mask_id] = mask
        extras = pack_tensors(self.global_extras)
        self.sent_checksums[server_round] = model_checksum(self.public_flat, extras)
        config[APF_MASK_ID] = self.mask_id
        config[APF_MODEL_VERSION] = self.model_version

        records: dict[tuple[int, int], ArrayRecord] = {}  # one record per distinct node state
        self._pending = {}
        messages = []
        for node in node_ids:
            known = self.node_state.get(node, (FULL_MODEL, 0))
            if known not in records:
                records[known] = self._model_record(known, extras)
            content = RecordDict(
                {
                    APF_MODEL: records[known],
                    CONFIG: ConfigRecord({**dict(config.items()), APF_BASE_VERSION: known[0]}),
                }
            )
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
            )
            self._pending[node] = (self.model_version, self.mask_id)
        return messages

    def extra_reply_bytes(self, server_round: int) -> int:
        """A reply carries the round's active values, which can outnumber the values a node was
        sent (say, when many parameters thaw at once): its whole size is allowed."""
        n_active = int(self.active.size)
        coded = 0 if self.codec is None else encoded_nbytes(self.codec, n_active)
        return max(4 * n_active, coded) + self._extras_bytes

    def coded_reply_bytes(self, server_round: int) -> int:
        """Covered by :meth:`extra_reply_bytes` (a reply codes the active entries only)."""
        return 0

    def _model_record(self, known: tuple[int, int], extras: np.ndarray) -> ArrayRecord:
        """The record for a node holding model version ``known[0]`` and mask id ``known[1]``."""
        assert self.public_flat is not None
        base, known_mask = known
        mask = None if known_mask == self.mask_id else self.masks[self.mask_id]
        if base == FULL_MODEL:
            return APFModel(self.public_flat, extras, mask=mask).to_record()
        changed = np.flatnonzero(self.last_changed > base)
        sync = encode_index_set(changed, self.layout.n_weights)
        # The node's own mask says which values these are when it is the same set.
        implied = np.array_equal(sync, self.masks[known_mask])
        sync_set = None if implied else sync
        if self._public_blob is not None and base == self._blob_base:
            # The blob of the last update is over exactly the entries changed since base.
            empty = np.empty(0, dtype=np.float32)
            return APFModel(
                empty, extras, mask=mask, sync=sync_set, coded=self._public_blob
            ).to_record()
        return APFModel(self.public_flat[changed], extras, mask=mask, sync=sync_set).to_record()

    # --- receiving ----------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and average; commit what each node holds; record the frozen share."""
        self._valid_nodes = set()
        arrays, metrics = super().aggregate_train(server_round, replies)
        for node, known in self._pending.items():
            if node in self._valid_nodes:
                self.node_state[node] = known
            else:
                self.node_state.pop(node, None)
        self._pending = {}
        in_use = {mask_id for _, mask_id in self.node_state.values()} | {self.mask_id}
        self.masks = {key: blob for key, blob in self.masks.items() if key in in_use}
        frozen = self.freezing.frozen_fraction(server_round + 1)
        self.round_info[server_round] = {
            "embedded_fraction": frozen,  # the report's key for CMD's embedded / APF's frozen
            "frozen_fraction": frozen,  # for the next round
            "n_active": int(self.active.size),  # this round
            "threshold": self.freezing.threshold,
            "mask_id": self.mask_id,
        }
        return arrays, metrics

    def parse_train_reply(self, server_round: int, reply: Message) -> ParsedReply:
        """A reply must hold exactly the round's active values, trained with its mask."""
        content = self.reply_content(reply)
        metrics = self.reply_metrics(server_round, content, reply.metadata.src_node_id)
        node = reply.metadata.src_node_id
        mask_id = metrics.pop(APF_MASK_ID, None)
        if mask_id != self.mask_id:
            raise RejectedReply(f"trained with mask {mask_id}, the round's is {self.mask_id}")
        if set(content.array_records) != {APF_MODEL}:
            raise RejectedReply(
                f"array records {sorted(content.array_records)}, expected apf-model"
            )
        model = APFModel.from_record(
            content.array_records[APF_MODEL], self._extras_bytes, n_values=self.active.size
        )
        if self.codec is not None and model.coded is None:
            raise RejectedReply(f"reply is uncoded, the run's codec is {self.codec.name}")
        if self.codec is None and model.coded is not None:
            raise RejectedReply("reply is coded, the run has no codec")
        values = model.values
        if model.coded is not None:
            assert self.codec is not None and self.public_flat is not None
            sent = self.public_flat[self.active]
            values = sent + decode(model.coded, self.codec, self.active.size)
        extras = unpack_tensors(model.extras, self._extras_specs)
        for value in extras:
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                raise RejectedReply("extras hold NaN or Inf")
        self._valid_nodes.add(node)
        return ParsedReply(node, metrics.pop(NUM_EXAMPLES), [values, *extras], metrics)

    def apply_average(self, server_round: int, averaged: list[np.ndarray]) -> ArrayRecord:
        """Take the averaged active entries and extras; update the APF statistics of the active
        ones."""
        assert self.global_flat is not None and self.public_flat is not None
        values, *extras = averaged
        before = self.global_flat
        after = before.copy()
        after[self.active] = values
        if self.code_downlink:
            assert self.codec is not None
            if self.codec.error_feedback:
                # Clients trained from the public model: what it lacked joins the update.
                after[self.active] += before[self.active] - self.public_flat[self.active]
            self._advance_public(after)
        self.freezing.update(server_round, before, after)
        self.last_changed[self.active] = server_round
        self._blob_base, self.model_version = self.model_version, server_round
        self.global_flat = after
        if not self.code_downlink:
            self.public_flat = after
        self.global_extras = extras
        logger.info(
            "round %d: %d of %d parameters active, %.1f %% frozen next round (T = %.3g)",
            server_round,
            self.active.size,
            self.layout.n_weights,
            100 * self.freezing.frozen_fraction(server_round + 1),
            self.freezing.threshold,
        )
        return self.global_arrays()

    def _advance_public(self, target: np.ndarray) -> None:
        """Move the public model's active entries towards ``target`` through one coded blob,
        decoded here exactly as a node decodes it."""
        assert self.codec is not None and self.public_flat is not None
        base = self.public_flat[self.active]
        blob = encode(np.subtract(target[self.active], base, dtype=np.float32), self.codec)
        public = self.public_flat.copy()
        public[self.active] = base + decode(blob, self.codec, self.active.size)
        self.public_flat = public
        self._public_blob = blob

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything APF needs to continue bitwise as if never stopped.

        What nodes hold is not kept: a resumed run talks to new client contexts, so every node
        gets the whole model in its first round after the resume.
        """
        arrays, meta = super().checkpoint()
        freezing_arrays, freezing_meta = self.freezing.checkpoint()
        arrays.update(prefixed("apf", freezing_arrays))
        arrays["last_changed"] = self.last_changed
        if self.code_downlink and self.public_flat is not None:
            arrays["public_flat"] = self.public_flat
        if self.mask_id:
            arrays["mask"] = self.masks[self.mask_id]
        meta.update(
            {"apf": freezing_meta, "model_version": self.model_version, "mask_id": self.mask_id}
        )
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint` saved."""
        super().restore(arrays, meta)
        self.freezing.restore(unprefixed("apf", arrays), meta["apf"])
        self.last_changed = arrays["last_changed"].astype(np.int64)
        self.model_version = int(meta["model_version"])
        self.mask_id = int(meta["mask_id"])
        self.masks = {self.mask_id: arrays["mask"]} if self.mask_id else {}
        self.node_state = {}
        if "public_flat" in arrays:
            self.public_flat = arrays["public_flat"].astype(np.float32)
        else:
            self.public_flat = self.global_flat
        self._public_blob = None  # no node holds a version after a resume

    # --- the global model ---------------------------------------------------------------------
