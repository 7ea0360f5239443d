"""Embedded CMD: the embedding schedule, the shared embedding state, and event selection."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cmd_fl.posthoc import CMDFit
from cmd_fl.wire import nearest_float16, snap_to_a_grid


@dataclass(frozen=True)
class EmbeddingSchedule:
    """When and how many weights are embedded.

    Events happen at steps ``t = warmup + k * every`` for k >= 1 (counted from the end of
    warm-up; the authors' code uses ``t % every == 0`` instead, which only shifts events by
    ``warmup mod every``).

    Parameters
    ----------
    warmup : int
        F, snapshots 0..F feed post-hoc CMD. Default 20.
    every : int
        L, steps between embedding events. Default 10.
    percent : float
        P, percent embedded per event: of all N weights (absolute), or of the not yet embedded
        non-reference weights (``relative=True``). Default 10.
    relative : bool
        Use the relative variant of P. Default False.
    max_fraction : float
        Cap on the share of the N weights embedded at once. 1.0 is the paper's rule (no cap); the
        measurements in the docs saw training collapse at 90 % and above, so the default is 0.8.
    """

    warmup: int = 20
    every: int = 10
    percent: float = 10.0
    relative: bool = False
    max_fraction: float = 0.8

    def __post_init__(self) -> None:
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {self.warmup}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if not 0.0 <= self.percent <= 100.0:
            raise ValueError(f"percent must be in [0, 100], got {self.percent}")
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {self.max_fraction}")

    def is_event(self, step: int) -> bool:
        """True if an embedding event happens at ``step``."""
        return step > self.warmup and (step - self.warmup) % self.every == 0

    def events_until(self, step: int) -> int:
        """Number of events at steps <= ``step``."""
        return max(0, (step - self.warmup) // self.every)

    def cap_count(self, n_weights: int, n_references: int) -> int:
        """The most weights that may be embedded at once."""
        return min(math.floor(self.max_fraction * n_weights), n_weights - n_references)

    def quota(self, n_weights: int, n_references: int, n_embedded: int) -> int:
        """How many weights the next event embeds, given ``n_embedded`` already are."""
        candidates = n_weights - n_references - n_embedded
        if self.relative:
            wanted = math.ceil(self.percent * candidates / 100.0)
        else:
            wanted = math.ceil(self.percent * n_weights / 100.0)
        room = self.cap_count(n_weights, n_references) - n_embedded
        return max(0, min(wanted, room, candidates))

    def embedded_count(self, step: int, n_weights: int, n_references: int) -> int:
        """Weights embedded after ``step`` when every event embeds its full quota.

        Absolute P: ``min(events * ceil(P N / 100), cap)``; relative P compounds per event.
        """
        count = 0
        for _ in range(self.events_until(step)):
            count += self.quota(n_weights, n_references, count)
        return count


class EmbeddingState:
    """The CMD state that server and clients share, and the model assembly it defines.

    A weight is either a reference (trained, travels as a mode coefficient), embedded (not
    trained; always ``frozen_a * w_ref + frozen_b``), or free (trained, travels in the free
    vector). All arithmetic is float32 numpy, element by element (multiply, then add), so every
    holder of the same state computes bitwise the same model.

    Parameters
    ----------
    modes : ndarray (N,)
        Mode of each weight (< 256).
    references : ndarray (M,)
        Weight index of each mode's reference.
    version : int
        State version: 1 after warm-up, +1 at every change of the embedded set.

    Attributes
    ----------
    round_coefficients : bool
        If True, :meth:`embed` rounds ``a`` and ``b`` to the nearest float16 (kept as float32;
        values beyond float16's range stay as they are), so state deltas carry them in 2 bytes
        each, losslessly. The server sets it; clients hold the values they are sent.
    a_on_grid : bool
        If True, :meth:`embed` also snaps ``a`` to the one-byte grid of `cmd_fl.wire`
        (`snap_to_a_grid`) and moves ``b`` so that the weight keeps the value it has at the
        given reference values; only the reference's later motion sees the rounding of ``a``.
        State deltas then carry ``a`` in one byte. Implies float16 ``b``.
    """

    round_coefficients: bool = False
    a_on_grid: bool = False

    def __init__(self, modes: np.ndarray, references: np.ndarray, version: int = 1) -> None:
        modes = np.asarray(modes)
        references = np.asarray(references, dtype=np.int64)
        if modes.ndim != 1 or references.ndim != 1:
            raise ValueError("modes and references must be 1-d")
        n = modes.size
        if references.size < 1 or references.min() < 0 or references.max() >= n:
            raise ValueError("reference indices out of range")
        if np.unique(references).size != references.size:
            raise ValueError("reference indices repeat")
        if modes.size and (modes.min() < 0 or modes.max() >= references.size):
            raise ValueError(f"mode ids must be in [0, {references.size})")
        if not np.array_equal(modes[references], np.arange(references.size)):
            raise ValueError("each reference must belong to its own mode")
        self.modes = modes.astype(np.uint8)
        self.references = references
        self.version = version
        self.embedded = np.zeros(n, dtype=bool)
        self.frozen_a = np.zeros(n, dtype=np.float32)
        self.frozen_b = np.zeros(n, dtype=np.float32)
        self._is_reference = np.zeros(n, dtype=bool)
        self._is_reference[references] = True
        self._refresh()

    @property
    def n_weights(self) -> int:
        """N."""
        return int(self.modes.size)

    @property
    def n_modes(self) -> int:
        """M."""
        return int(self.references.size)

    @property
    def n_embedded(self) -> int:
        """Number of embedded weights."""
        return int(self._embedded_idx.size)

    @property
    def embedded_fraction(self) -> float:
        """Share of the N weights that are embedded."""
        return self.n_embedded / self.n_weights

    @property
    def free_indices(self) -> np.ndarray:
        """Sorted indices of the free weights (neither embedded nor references)."""
        return self._free_idx

    @property
    def embedded_indices(self) -> np.ndarray:
        """Sorted indices of the embedded weights."""
        return self._embedded_idx

    def _refresh(self) -> None:
        self._free_idx = np.flatnonzero(~self.embedded & ~self._is_reference)
        self._embedded_idx = np.flatnonzero(self.embedded)
        self._emb_a = self.frozen_a[self._embedded_idx]
        self._emb_b = self.frozen_b[self._embedded_idx]
        self._emb_modes = self.modes[self._embedded_idx]

    # --- changes ------------------------------------------------------------------------------
    def embed(
        self,
        indices: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
        reference_values: np.ndarray | None = None,
    ) -> None:
        """Freeze ``indices`` with coefficients (a, b); references cannot be embedded.

        ``reference_values`` (the M references' current values) lets `a_on_grid` keep each
        weight's current value when it snaps ``a``; without it ``b`` is kept as given.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_weights):
            raise ValueError("embedded index out of range")
        if self._is_reference[idx].any():
            raise ValueError("reference weights are never embedded")
        a32 = np.asarray(a, dtype=np.float32)
        b32 = np.asarray(b, dtype=np.float32)
        if a32.shape != idx.shape or b32.shape != idx.shape:
            raise ValueError("coefficients must match the indices in length")
        if not (np.isfinite(a32).all() and np.isfinite(b32).all()):
            raise ValueError("frozen coefficients must be finite")
        if self.a_on_grid:
            snapped = snap_to_a_grid(a32)
            if reference_values is not None:
                refs = np.asarray(reference_values, dtype=np.float32)[self.modes[idx]]
                b32 = (b32 + (a32 - snapped) * refs).astype(np.float32)
            a32, b32 = snapped, nearest_float16(b32)
        elif self.round_coefficients:
            a32, b32 = nearest_float16(a32), nearest_float16(b32)
        self.embedded[idx] = True
        self.frozen_a[idx] = a32
        self.frozen_b[idx] = b32
        self._refresh()

    def release(self, indices: np.ndarray) -> None:
        """Un-embed ``indices``: they are trained and travel again."""
        idx = np.asarray(indices, dtype=np.int64)
        self.embedded[idx] = False
        self.frozen_a[idx] = 0.0
        self.frozen_b[idx] = 0.0
        self._refresh()

    # --- the model ----------------------------------------------------------------------------
    def embedded_values(self, reference_values: np.ndarray) -> np.ndarray:
        """Values of the embedded weights (in ``embedded_indices`` order) for given references."""
        refs = np.asarray(reference_values, dtype=np.float32)
        return self._emb_a * refs[self._emb_modes] + self._emb_b

    def project(self, weights: np.ndarray) -> None:
        """Put the embedded weights of a flat float32 vector on the CMD model, in place."""
        weights[self._embedded_idx] = self.embedded_values(weights[self.references])

    def assemble(self, free: np.ndarray, reference_values: np.ndarray) -> np.ndarray:
        """The full flat float32 model from the free vector and the M reference values."""
        free = np.asarray(free, dtype=np.float32)
        refs = np.asarray(reference_values, dtype=np.float32)
        if free.shape != self._free_idx.shape:
            raise ValueError(f"free vector has {free.size} values, expected {self._free_idx.size}")
        if refs.shape != self.references.shape:
            raise ValueError(f"expected {self.n_modes} reference values, got {refs.size}")
        full = np.empty(self.n_weights, dtype=np.float32)
        full[self._free_idx] = free
        full[self.references] = refs
        full[self._embedded_idx] = self.embedded_values(refs)
        return full

    def split(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(free vector, reference values) of a full flat vector, as float32 copies."""
        w = np.asarray(weights)
        if w.shape != (self.n_weights,):
            raise ValueError(f"expected a ({self.n_weights},) vector, got {w.shape}")
        return w[self._free_idx].astype(np.float32), w[self.references].astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as named arrays (for checkpoints)."""
        return {
            "modes": self.modes,
            "references": self.references,
            "embedded": self.embedded,
            "frozen_a": self.frozen_a,
            "frozen_b": self.frozen_b,
            "version": np.asarray(self.version),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EmbeddingState:
        """A state saved by :meth:`to_arrays`."""
        state = cls(arrays["modes"], arrays["references"], int(arrays["version"]))
        state.embedded = arrays["embedded"].astype(bool)
        state.frozen_a = arrays["frozen_a"].astype(np.float32)
        state.frozen_b = arrays["frozen_b"].astype(np.float32)
        state._refresh()
        return state

    def copy(self) -> EmbeddingState:
        """An independent copy."""
        other = EmbeddingState(self.modes, self.references, self.version)
        other.round_coefficients = self.round_coefficients
        other.a_on_grid = self.a_on_grid
        other.embedded = self.embedded.copy()
        other.frozen_a = self.frozen_a.copy()
        other.frozen_b = self.frozen_b.copy()
        other._refresh()
        return other


SELECTION_RULES = ("stability", "stability+fit")


class EmbeddingSelector:
    """Chooses which weights an event embeds.

    Rules:

    - ``"stability"`` (the paper's): the smallest change of the coefficients since the previous
      event, ``||(a_i, b_i)(now) - (a_i, b_i)(previous event)||_2``; at the first event the
      previous coefficients are the warm-up fit's.
    - ``"stability+fit"``: stable is not well fitted (see ``shared/docs/cmd-method.md``), so
      candidates are ranked by the sum of two percentile ranks among the candidates: their
      stability and the relative residual of their affine fit (``CMDFit.residual``). A weight
      must be both stable and well fitted to be embedded first.

    Whatever the rule, candidates with ``|a| > max_abs_a`` (hypersensitive to their reference),
    a relative residual above ``max_residual``, or marked in ``excluded`` (released by a
    refresh) are never embedded.

    Parameters
    ----------
    schedule : EmbeddingSchedule
        Quota and cap per event.
    start_fit : CMDFit
        The fit at the end of warm-up.
    rule : str
        ``"stability"`` or ``"stability+fit"``. Default ``"stability"``.
    max_abs_a : float or None
        Bound on ``|a|`` of embedded weights. Default None (no bound).
    max_residual : float or None
        Bound on the relative fit residual of embedded weights. Default None (no bound).
    refill_released : bool
        Whether events may embed other weights in the place of weights a refresh released.
        Default False: released weights keep their place under the cap, so each release lowers
        the embedded share for good (the clients' training showed the model needs that room).
    """

    def __init__(
        self,
        schedule: EmbeddingSchedule,
        start_fit: CMDFit,
        rule: str = "stability",
        max_abs_a: float | None = None,
        max_residual: float | None = None,
        refill_released: bool = False,
    ) -> None:
        if rule not in SELECTION_RULES:
            raise ValueError(f"rule must be one of {SELECTION_RULES}, got {rule!r}")
        self.schedule = schedule
        self.rule = rule
        self.max_abs_a = max_abs_a
        self.max_residual = max_residual
        self.refill_released = refill_released
        self._last_a = start_fit.a.astype(np.float32)
        self._last_b = start_fit.b.astype(np.float32)
        # Weights never to embed again (released by a refresh).
        self.excluded = np.zeros(start_fit.n_weights, dtype=bool)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """What the selector remembers between events (for checkpoints)."""
        return {"last_a": self._last_a, "last_b": self._last_b, "excluded": self.excluded}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`to_arrays` saved."""
        self._last_a = arrays["last_a"].astype(np.float32)
        self._last_b = arrays["last_b"].astype(np.float32)
        self.excluded = arrays["excluded"].astype(bool)

    def stability(self, fit: CMDFit) -> np.ndarray:
        """Per-weight change of (a, b) since the previous event (float64)."""
        da = fit.a - self._last_a
        db = fit.b - self._last_b
        return np.hypot(da, db)

    def eligible(self, fit: CMDFit, candidates: np.ndarray) -> np.ndarray:
        """The candidates that pass the finiteness, |a| and residual bounds."""
        a = fit.a[candidates]
        keep = np.isfinite(a) & np.isfinite(fit.b[candidates]) & ~self.excluded[candidates]
        if self.max_abs_a is not None:
            keep &= np.abs(a) <= self.max_abs_a
        if self.max_residual is not None:
            if fit.residual is None:
                raise ValueError("max_residual needs a fit with residuals")
            keep &= fit.residual[candidates] <= self.max_residual
        return candidates[keep]

    def score(self, fit: CMDFit, candidates: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Lower is embedded first."""
        if self.rule == "stability":
            return delta[candidates]
        if fit.residual is None:
            raise ValueError("the stability+fit rule needs a fit with residuals")
        return _percentile_rank(delta[candidates]) + _percentile_rank(fit.residual[candidates])

    def select(self, fit: CMDFit, state: EmbeddingState) -> np.ndarray:
        """Sorted indices the event embeds (the quota's best-scored candidates), and remember
        this event's coefficients for the next one."""
        held = 0 if self.refill_released else int(self.excluded.sum())
        quota = self.schedule.quota(state.n_weights, state.n_modes, state.n_embedded + held)
        delta = self.stability(fit)
        self._last_a = fit.a.astype(np.float32)
        self._last_b = fit.b.astype(np.float32)
        if quota == 0:
            return np.empty(0, dtype=np.int64)
        candidates = self.eligible(fit, state.free_indices)
        score = self.score(fit, candidates, delta)
        quota = min(quota, candidates.size)
        if quota < candidates.size:
            pick = np.argpartition(score, quota - 1)[:quota]
        else:
            pick = np.arange(candidates.size)
        return np.sort(candidates[pick])


def _percentile_rank(values: np.ndarray) -> np.ndarray:
    """Rank of each value in [0, 1] (ties broken by position)."""
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[np.argsort(values, kind="stable")] = np.arange(values.size)
    return ranks / max(values.size - 1, 1)


def embedding_event(
    selector: EmbeddingSelector,
    fit: CMDFit,
    state: EmbeddingState,
    reference_values: np.ndarray | None = None,
) -> np.ndarray:
    """Run one embedding event: select, freeze at the fit's coefficients, bump the version.

    ``reference_values`` are the references' current values (see `EmbeddingState.embed`).
    Returns the newly embedded indices.
    """
    chosen = selector.select(fit, state)
    if chosen.size:
        state.embed(chosen, fit.a[chosen], fit.b[chosen], reference_values)
        state.version += 1
    return chosen
