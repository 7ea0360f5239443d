"""Coded downlink: the server's model travels as a coded delta against the model clients hold.

Both sides keep the *public model*: the full flat float32 model that the last training message
carried, with its version (the round that sent it). Each round the server moves the public
model towards its global model: it encodes ``target - base`` with the run's codec, where
``target`` and ``base`` are the values that travel (the whole flat model under FedAvg, the free
weights and references under CMD) taken from the global and the public model. Decoding
``base + decode(blob)`` uses exact float32 operations only, so a client holding the base
version ends with bitwise the server's new public model, and the model checksum check stays
exact.

Error feedback on the downlink needs no residual of its own: the server keeps its global model
at full precision and adds the round's averaged update to it (not to the public model the
clients trained from; see `MeteredFedAvg.apply_average`), so whatever the codec left out
of ``target - base`` is still in the next round's gap, and is sent then.

A node that does not hold the base version (new, missed a round, its reply was lost) is sent a
*keyframe*: the public model coded on its own (a delta against zeros) with `keyframe_spec`
(int8 for ``topk``, whose sparse blob cannot carry a whole model; the run's codec otherwise). It
trains on what it decodes, which the server computes too (its checksum is checked), and the
server adds the node's update to the public model like any other: the keyframe's rounding moves
the point the node's gradient is taken at, never the global model. Such a node holds no public
version, so it gets a keyframe again until it is sent the public model as it is. Without
keyframes (``keyframes=False``), in round 1, in CMD's probe rounds and in the first round after
a resume, it gets the public model as it is (float32) and stores it. A client asked to apply
a delta to a version it does not hold fails with a clear error; the server then sends it a
keyframe or the whole model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from cmd_fl.codec import CodecSpec, decode, encode
from cmd_fl.coded import CodedUpdate

CODED_DENSE = "coded-dense-model"  # record name: FedAvg's coded model (the whole flat model)
CODED_CMD = "coded-cmd-model"  # record name: CMD's coded model (free weights and references)
KEYFRAME_DENSE = "keyframe-dense-model"  # record name: FedAvg's model coded on its own
KEYFRAME_CMD = "keyframe-cmd-model"  # record name: CMD's free weights and references, coded

# Train-config keys (present when the downlink is coded).
PUBLIC_VERSION = "public-version"  # version of the public model the message makes
PUBLIC_BASE = "public-base"  # version a coded message's delta applies to

_FLAT = "flat"
_VERSION = "version"

Assemble = Callable[[np.ndarray], np.ndarray]  # travelling values -> full flat model


def keyframe_spec(spec: CodecSpec) -> CodecSpec:
    """The codec of a keyframe (a whole model coded on its own) under the run's codec ``spec``:
    ``spec`` itself, except int8 (same block size) for ``topk``."""
    if spec.name != "topk":
        return spec
    return CodecSpec(name="int8", block_size=spec.block_size, error_feedback=False)


def decode_keyframe(blob: np.ndarray, spec: CodecSpec, length: int) -> np.ndarray:
    """The values a keyframe blob carries (``0 + decode``, as `PublicModel.keyframe` computes)."""
    return decode(blob, keyframe_spec(spec), length)


class PublicModel:
    """The server's side of the coded downlink: the public model, its version, and which
    nodes hold which version (no residual: see the module's docstring).

    Parameters
    ----------
    spec : CodecSpec
        The codec (not ``none``).
    n_weights : int
        Length of the full flat model.
    """

    def __init__(self, spec: CodecSpec, n_weights: int) -> None:
        if spec.name == "none":
            raise ValueError("a coded downlink needs a codec other than 'none'")
        self.spec = spec
        self.n_weights = n_weights
        self.flat: np.ndarray | None = None  # the public model (None before the first round)
        self.version = 0
        self.base_version = 0  # the version the latest blob applies to
        self.holders: dict[int, int] = {}  # node -> version its last reply proved it holds

    def advance(
        self,
        version: int,
        target: np.ndarray,
        assemble: Assemble,
        indices: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """Move the public model to ``version`` towards ``target``; return the coded delta.

        Parameters
        ----------
        version : int
            The new version (the round); must exceed the current one.
        target : np.ndarray
            The full flat global model.
        assemble : callable
            Builds the full flat model from the travelling values (as the client does).
        indices : np.ndarray or None
            Positions of the travelling values in the flat model; None: all of them, in order.

        Returns
        -------
        np.ndarray or None
            The blob every holder of the previous version decodes; None in the first round
            (nobody holds a base: everyone gets ``assemble(target values)`` as it is).
        """
        if version <= self.version:
            raise ValueError(f"public model version {version} is not after {self.version}")
        travel = _select(target, indices)
        if self.flat is None:
            blob = None
            self.flat = assemble(travel)
        else:
            base = _select(self.flat, indices)
            blob = encode(travel - base, self.spec)
            # Rebuild from the blob as the client does.
            self.flat = assemble(CodedUpdate(blob, np.empty(0, np.uint8)).values(self.spec, base))
        self.base_version, self.version = self.version, version
        return blob

    def keyframe(
        self, assemble: Assemble, indices: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The public model's travelling values coded on their own, and the full flat model a
        node decodes from them (``assemble`` and ``indices`` as for :meth:`advance`)."""
        if self.flat is None:
            raise ValueError("no public model yet: the first round sends the model as it is")
        travel = _select(self.flat, indices)
        blob = encode(travel, keyframe_spec(self.spec))
        return blob, assemble(decode_keyframe(blob, self.spec, travel.size))

    def holds_base(self, node_id: int) -> bool:
        """Whether ``node_id`` can decode this round's blob (it holds the base version)."""
        return self.base_version > 0 and self.holders.get(node_id) == self.base_version

    def note_reply(self, node_id: int, proved: bool) -> None:
        """A reply proved (checksum) that ``node_id`` holds the current version, or did not."""
        if proved:
            self.holders[node_id] = self.version
        else:
            self.holders.pop(node_id, None)

    def config(self) -> ConfigRecord:
        """The train-config entries of this round's messages."""
        return ConfigRecord({PUBLIC_VERSION: self.version, PUBLIC_BASE: self.base_version})

    def lag(self, target: np.ndarray) -> np.ndarray:
        """``target - public``: what the downlink has yet to deliver (zeros before round 1)."""
        if self.flat is None:
            return np.zeros(self.n_weights, dtype=np.float32)
        return np.subtract(target, self.flat, dtype=np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The public model and its version (for checkpoints; holders are not kept: a resumed
        run talks to new client contexts)."""
        if self.flat is None:
            return {}
        return {
            "flat": self.flat,
            "version": np.asarray([self.version, self.base_version], dtype=np.int64),
        }

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`to_arrays` saved."""
        if "flat" not in arrays:
            return
        self.flat = arrays["flat"].astype(np.float32)
        self.version, self.base_version = (int(v) for v in arrays["version"])
        self.holders = {}


def _select(flat: np.ndarray, indices: np.ndarray | None) -> np.ndarray:
    selected = flat if indices is None else flat[indices]
    return selected.astype(np.float32, copy=False)  # read only: no copy needed


# --- the client's side ----------------------------------------------------------------------
def held_public(store: RecordDict, key: str, config: ConfigRecord, n_weights: int) -> np.ndarray:
    """The public model a client holds, which must be the version a coded message applies to.

    Raises
    ------
    ValueError
        If the client holds no public model, another version, or one of another length.
    """
    base = int(config[PUBLIC_BASE])  # type: ignore[arg-type]
    if key not in store.array_records:
        raise ValueError(
            f"the server sent a model coded against version {base}, but this client holds no "
            "model yet (the server sends the whole model once this error reaches it)"
        )
    record = store.array_records[key]
    version = int(record[_VERSION].numpy()[0])
    flat = record[_FLAT].numpy()
    if version != base or flat.shape != (n_weights,):
        raise ValueError(
            f"the server sent a model coded against version {base}, but this client holds "
            f"version {version} (the server sends the whole model once this error reaches it)"
        )
    return flat


def store_public(
    store: RecordDict, key: str, config: ConfigRecord, flat: np.ndarray, keyframe: bool = False
) -> None:
    """Keep the model just received as the public model, when the downlink is coded; a
    keyframe is not the public model, so none is held after one."""
    if keyframe:
        if key in store.array_records:
            del store[key]
        return
    if PUBLIC_VERSION not in config:
        return
    version = np.asarray([int(config[PUBLIC_VERSION])], dtype=np.int64)  # type: ignore[arg-type]
    store[key] = ArrayRecord(
        {
            _FLAT: Array(np.ascontiguousarray(flat, dtype=np.float32)),
            _VERSION: Array(version),
        }
    )


__all__ = [
    "CODED_CMD",
    "CODED_DENSE",
    "KEYFRAME_CMD",
    "KEYFRAME_DENSE",
    "PUBLIC_BASE",
    "PUBLIC_VERSION",
    "PublicModel",
    "decode_keyframe",
    "held_public",
    "keyframe_spec",
    "store_public",
]
