"""Keeping clients' CMD state in step with the server's: the version log and state deltas."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from cmd_fl.embedding import EmbeddingState
from cmd_fl.wire import StateDelta


def full_state(state: EmbeddingState) -> StateDelta:
    """Everything a client with no state needs (also how a client persists its own state)."""
    emb = state.embedded_indices
    return StateDelta(
        from_version=0,
        to_version=state.version,
        embed_indices=emb,
        embed_a=state.frozen_a[emb],
        embed_b=state.frozen_b[emb],
        embed_modes=state.modes[emb],
        references=state.references,
    )


class EmbeddingHistory:
    """The server's log of embedding changes, so any client can be brought up to date.

    Every version after the first records which weights it embedded and released, and which
    it re-fit (same ``a``, new ``b``). The delta from version v to the current one is composed
    from the current state: a weight touched by any change after v is sent as it is now
    (embedded with its current coefficients, or released); a weight only re-fit since v is
    sent with its new ``b`` alone. Re-applying a change is harmless, so a client that already
    got part of it (its reply was lost) ends in the same state.

    Parameters
    ----------
    state : EmbeddingState
        The state at its first version (right after warm-up).
    """

    def __init__(self, state: EmbeddingState) -> None:
        self.first_version = state.version
        self._touched: dict[int, np.ndarray] = {}
        self._refit: dict[int, np.ndarray] = {}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The log as named arrays (for checkpoints)."""
        out = {"first_version": np.asarray(self.first_version)}
        out.update({f"touched.{v}": t for v, t in self._touched.items()})
        out.update({f"refit.{v}": t for v, t in self._refit.items()})
        return out

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`to_arrays` saved."""
        self.first_version = int(arrays["first_version"])
        self._touched, self._refit = (
            {
                int(key.split(".", 1)[1]): value.astype(np.int64)
                for key, value in arrays.items()
                if key.startswith(prefix)
            }
            for prefix in ("touched.", "refit.")
        )

    def record(self, version: int, touched: np.ndarray, refit: np.ndarray | None = None) -> None:
        """Log that ``version`` changed the weights ``touched`` (embedded or released) and gave
        the weights ``refit`` (embedded, and staying so) a new offset ``b``."""
        self._touched[version] = np.asarray(touched, dtype=np.int64)
        if refit is not None and len(refit):
            self._refit[version] = np.asarray(refit, dtype=np.int64)

    def delta(self, state: EmbeddingState, from_version: int) -> StateDelta:
        """What a client at ``from_version`` (0: nothing) needs to reach ``state.version``."""
        if from_version > state.version:
            raise ValueError(f"version {from_version} is newer than the server's {state.version}")
        if from_version < self.first_version:
            return full_state(state)
        touched = _union(t for v, t in self._touched.items() if v > from_version)
        refit = _union(t for v, t in self._refit.items() if v > from_version)
        refit = np.setdiff1d(refit, touched, assume_unique=True)
        now_embedded = state.embedded[touched]
        emb = touched[now_embedded]
        return StateDelta(
            from_version=from_version,
            to_version=state.version,
            embed_indices=emb,
            embed_a=state.frozen_a[emb],
            embed_b=state.frozen_b[emb],
            embed_modes=state.modes[emb],
            release_indices=touched[~now_embedded],
            refit_indices=refit,
            refit_b=state.frozen_b[refit],
        )


def _union(sets: Iterable[np.ndarray]) -> np.ndarray:
    """Sorted union of index arrays (empty ``int64`` for none)."""
    parts = list(sets)
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def apply_delta(
    state: EmbeddingState | None, delta: StateDelta, n_weights: int | None = None
) -> EmbeddingState:
    """A client's state after ``delta`` (a new object for a full state, else ``state`` changed).

    ``n_weights`` (N) is needed for a full state only (a full state does not carry the mode id
    of every weight, so it does not tell N); it defaults to ``state``'s.

    Raises
    ------
    ValueError
        If the delta does not start from a version the client can use: a gap (the client is
        older than ``delta.from_version``) or a client newer than ``delta.to_version``; or N is
        unknown for a full state.
    """
    if delta.is_full:
        assert delta.references is not None
        if n_weights is None and state is not None:
            n_weights = state.n_weights
        if n_weights is None:
            raise ValueError("applying a full state needs the number of weights N")
        fresh = EmbeddingState(
            _known_modes(np.zeros(n_weights, dtype=np.uint8), delta.references, delta),
            delta.references,
            version=delta.to_version,
        )
        fresh.embed(delta.embed_indices, delta.embed_a, delta.embed_b)
        return fresh
    if state is None:
        raise ValueError("client has no CMD state and the server sent a partial delta")
    if not delta.from_version <= state.version <= delta.to_version:
        raise ValueError(
            f"delta {delta.from_version}->{delta.to_version} cannot update a client at version "
            f"{state.version}"
        )
    if delta.release_indices.size:
        state.release(delta.release_indices)
    if delta.embed_indices.size:
        state.modes = _known_modes(state.modes, state.references, delta)
        state.embed(delta.embed_indices, delta.embed_a, delta.embed_b)
    if delta.refit_indices.size:
        refit = delta.refit_indices
        if not state.embedded[refit].all():
            raise ValueError("the delta re-fits weights this client does not hold embedded")
        state.embed(refit, state.frozen_a[refit], delta.refit_b)
    state.version = delta.to_version
    return state


def _known_modes(modes: np.ndarray, references: np.ndarray, delta: StateDelta) -> np.ndarray:
    """``modes`` with each reference's mode and the modes of the weights ``delta`` embeds.

    A client knows the modes of the references and of the weights it holds embedded; the
    others keep what they had (0 for a new client) and are never read: free weights travel
    as values.
    """
    out = modes.copy()
    out[references] = np.arange(references.size, dtype=np.uint8)
    out[delta.embed_indices] = delta.embed_modes
    return out
