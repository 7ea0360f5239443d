"""A strategy whose server keeps the global model as one flat float32 vector plus extras."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.metered import MeteredFedAvg


class FlatModelStrategy(MeteredFedAvg):
    """Base of the compressing strategies (CMD, APF): they send parts of one flat vector.

    ``global_flat`` holds the modelled weights in layout order (float32) and ``global_extras``
    the dense extras; both are checkpointed. Parameters are those of :class:`MeteredFedAvg`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.global_flat: np.ndarray | None = None
        self.global_extras: list[np.ndarray] = []

    def set_global(self, arrays: ArrayRecord) -> None:
        """Take the global model from a dense ArrayRecord."""
        state = {key: arr.numpy() for key, arr in arrays.items()}
        self.global_flat = self.layout.flatten_numpy(state).astype(np.float32)
        self.global_extras = self.layout.extra_tensors(state)

    def global_arrays(self) -> ArrayRecord:
        """The current global model as a dense ArrayRecord (for server-side evaluation)."""
        assert self.global_flat is not None
        state = self.layout.state_dict(self.global_flat.copy(), self.global_extras)
        return ArrayRecord({key: Array(value.numpy()) for key, value in state.items()})

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The base state plus the flat global model."""
        arrays, meta = super().checkpoint()
        if self.global_flat is not None:
            arrays["global_flat"] = self.global_flat
            arrays.update({f"extras.{i}": x for i, x in enumerate(self.global_extras)})
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint` saved."""
        super().restore(arrays, meta)
        if "global_flat" in arrays:
            self.global_flat = arrays["global_flat"].astype(np.float32)
            count = sum(1 for key in arrays if key.startswith("extras."))
            self.global_extras = [arrays[f"extras.{i}"] for i in range(count)]
