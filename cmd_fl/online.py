"""Online CMD: post-hoc CMD after a warm-up, then exact recursive least squares per snapshot."""

from __future__ import annotations

import numpy as np
import torch

from cmd_fl.layout import ParameterLayout
from cmd_fl.posthoc import CHUNK, CMDFit, as_trajectories, posthoc_cmd


class OnlineCMD:
    """CMD that runs beside training.

    Snapshots 0..``warmup`` are kept; after snapshot ``warmup`` post-hoc CMD runs on them and the
    modes and references are fixed. From then on only running sums are kept, so that after
    snapshot t the coefficients equal the least-squares fit on snapshots 0..t (exact recursive
    least squares), at O(N) cost per update and no trajectory storage.

    Persistent state after warm-up: per weight a float32 shift (its value at the end of warm-up,
    which keeps the sums well conditioned) and three float64 sums, plus a uint8 mode id: 29 bytes
    per weight; per mode O(T) reference history.

    Parameters
    ----------
    n_modes : int
        M, the largest number of modes.
    warmup : int
        F: post-hoc CMD runs on snapshots 0..F (F + 1 of them, so F >= 1).
    n_samples : int
        K, weights sampled for clustering (default 1000).
    seed : int
        Seed of the sampling.
    layout : ParameterLayout, list of tensor sizes, or None
        Tensor boundaries for layer-balanced sampling.
    reference_std_ratio : float
        See :func:`posthoc_cmd`. Default 0 (the paper's rule).
    """

    def __init__(
        self,
        n_modes: int,
        warmup: int,
        n_samples: int = 1000,
        seed: int = 0,
        layout: ParameterLayout | list[int] | None = None,
        reference_std_ratio: float = 0.0,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (two snapshots at least), got {warmup}")
        if n_modes < 1 or n_modes > 255:
            raise ValueError(f"n_modes must be in [1, 255], got {n_modes}")
        self.n_modes = n_modes
        self.warmup = warmup
        self.n_samples = n_samples
        self.seed = seed
        self.layout = layout
        self.reference_std_ratio = reference_std_ratio
        self.n_snapshots = 0
        self._warmup_traj: np.ndarray | None = None
        # After warm-up:
        self.modes: np.ndarray | None = None  # uint8 (N,)
        self.references: np.ndarray | None = None  # int64 (M,)
        self.reference_history: list[np.ndarray] = []  # (M,) float64 per snapshot
        self._shift: np.ndarray | None = None  # float32 (N,)
        self._ref_centre: np.ndarray | None = None  # float64 (M,)
        self._sum_w: np.ndarray | None = None  # sum_t (w - shift)
        self._sum_ww: np.ndarray | None = None  # sum_t (w - shift)^2
        self._sum_wr: np.ndarray | None = None  # sum_t (w - shift)(r - centre)
        self._sum_r: np.ndarray | None = None  # per mode sum_t (r - centre)
        self._sum_rr: np.ndarray | None = None  # per mode sum_t (r - centre)^2

    @property
    def ready(self) -> bool:
        """True once warm-up is over and a fit exists."""
        return self.modes is not None

    @property
    def n_weights(self) -> int | None:
        """N, known after the first snapshot."""
        if self._warmup_traj is not None:
            return int(self._warmup_traj.shape[0])
        return None if self._shift is None else int(self._shift.shape[0])

    def update(self, weights: np.ndarray | torch.Tensor) -> None:
        """Add one flat snapshot of the N modelled weights."""
        w = _as_vector(weights)
        if self.n_snapshots == 0:
            self._warmup_traj = np.empty((w.size, self.warmup + 1), dtype=w.dtype)
        elif w.size != self.n_weights:
            raise ValueError(f"snapshot has {w.size} weights, expected {self.n_weights}")
        if not np.isfinite(w).all():
            raise ValueError("snapshot contains NaN or Inf values")
        if self._warmup_traj is not None:
            self._warmup_traj[:, self.n_snapshots] = w
            self.n_snapshots += 1
            if self.n_snapshots == self.warmup + 1:
                self._finish_warmup()
            return
        self._accumulate(w)
        self.n_snapshots += 1

    def _finish_warmup(self) -> None:
        traj = self._warmup_traj
        assert traj is not None
        fit = posthoc_cmd(
            traj, self.n_modes, self.n_samples, self.seed, self.layout, self.reference_std_ratio
        )
        self.modes = fit.modes.astype(np.uint8)
        self.references = fit.references
        m = fit.n_modes
        ref_traj = traj[fit.references].astype(np.float64)
        self._ref_centre = ref_traj.mean(axis=1)
        self._shift = traj[:, -1].astype(np.float32)
        n = traj.shape[0]
        self._sum_w = np.zeros(n)
        self._sum_ww = np.zeros(n)
        self._sum_wr = np.zeros(n)
        self._sum_r = np.zeros(m)
        self._sum_rr = np.zeros(m)
        self._warmup_traj = None
        self.n_snapshots = 0
        for t in range(traj.shape[1]):
            self._accumulate(traj[:, t])
            self.n_snapshots += 1

    def _accumulate(self, w: np.ndarray) -> None:
        assert self.references is not None and self.modes is not None
        assert self._ref_centre is not None and self._shift is not None
        assert self._sum_w is not None and self._sum_ww is not None and self._sum_wr is not None
        assert self._sum_r is not None and self._sum_rr is not None
        ref = w[self.references].astype(np.float64)
        self.reference_history.append(ref)
        d = ref - self._ref_centre
        self._sum_r += d
        self._sum_rr += d * d
        for start in range(0, w.size, CHUNK):
            stop = start + CHUNK
            dev = w[start:stop].astype(np.float64)
            dev -= self._shift[start:stop]
            self._sum_w[start:stop] += dev
            self._sum_wr[start:stop] += dev * d[self.modes[start:stop]]
            dev *= dev
            self._sum_ww[start:stop] += dev

    @property
    def fit(self) -> CMDFit:
        """Least-squares fit on all snapshots so far, with the warm-up's modes and references."""
        if not self.ready:
            raise RuntimeError(
                f"online CMD is warming up: {self.n_snapshots} of {self.warmup + 1} snapshots"
            )
        assert self.references is not None and self.modes is not None
        assert self._ref_centre is not None and self._shift is not None
        assert self._sum_w is not None and self._sum_ww is not None and self._sum_wr is not None
        assert self._sum_r is not None and self._sum_rr is not None
        count = float(self.n_snapshots)
        mean_d = self._sum_r / count
        ss_rr = self._sum_rr - count * mean_d * mean_d
        scale = np.maximum(np.abs(np.asarray(self.reference_history)).max(axis=0), 1e-300)
        degenerate = ss_rr <= count * (scale * 1e-12) ** 2
        inv_ss = np.where(degenerate, 0.0, 1.0 / np.where(degenerate, 1.0, ss_rr))
        n = self._sum_w.size
        a = np.empty(n)
        b = np.empty(n)
        residual = np.empty(n)
        for start in range(0, n, CHUNK):
            stop = start + CHUNK
            modes = self.modes[start:stop]
            mean_w = self._sum_w[start:stop] / count
            ss_wr = self._sum_wr[start:stop] - count * mean_w * mean_d[modes]
            ss_ww = self._sum_ww[start:stop] - count * mean_w * mean_w
            slope = ss_wr * inv_ss[modes]
            a[start:stop] = slope
            b[start:stop] = (
                mean_w + self._shift[start:stop] - slope * (mean_d[modes] + self._ref_centre[modes])
            )
            sse = np.maximum(ss_ww - slope * ss_wr, 0.0)
            rel = np.zeros_like(sse)
            np.divide(sse, ss_ww, out=rel, where=ss_ww > 0)
            residual[start:stop] = np.sqrt(np.clip(rel, 0.0, 1.0))
        a[self.references] = 1.0
        b[self.references] = 0.0
        residual[self.references] = 0.0
        return CMDFit(
            modes=self.modes.astype(np.int64),
            references=self.references.copy(),
            a=a,
            b=b,
            residual=residual,
        )

    _STATE_FIELDS = (
        "modes",
        "references",
        "_shift",
        "_ref_centre",
        "_sum_w",
        "_sum_ww",
        "_sum_wr",
        "_sum_r",
        "_sum_rr",
        "_warmup_traj",
    )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to continue exactly where this left off (for checkpoints)."""
        out = {"n_snapshots": np.asarray(self.n_snapshots)}
        for name in self._STATE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name.lstrip("_")] = value
        if self.reference_history:
            out["reference_history"] = np.stack(self.reference_history)
        return out

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore the state saved by :meth:`to_arrays` (same constructor arguments)."""
        self.n_snapshots = int(arrays["n_snapshots"])
        for name in self._STATE_FIELDS:
            value = arrays.get(name.lstrip("_"))
            # Copies: the sums are updated in place and must not alias the caller's arrays.
            setattr(self, name, None if value is None else np.array(value, copy=True))
        history = arrays.get("reference_history")
        self.reference_history = [] if history is None else [row.copy() for row in history]

    def state_bytes(self) -> int:
        """Bytes held by the persistent per-weight and per-mode state (not the warm-up buffer)."""
        arrays = [
            self.modes,
            self._shift,
            self._sum_w,
            self._sum_ww,
            self._sum_wr,
            self._sum_r,
            self._sum_rr,
            self._ref_centre,
            self.references,
        ]
        total = sum(x.nbytes for x in arrays if x is not None)
        return total + sum(r.nbytes for r in self.reference_history)


def _as_vector(weights: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().numpy()
    w = np.asarray(weights)
    if w.ndim != 1:
        raise ValueError(f"a snapshot must be a flat (N,) vector, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"a snapshot must be floating point, got {w.dtype}")
    return w


__all__ = ["OnlineCMD", "as_trajectories"]
