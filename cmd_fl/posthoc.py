"""Post-hoc CMD: cluster weight trajectories into modes and fit each weight to its reference."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from cmd_fl.layout import ParameterLayout

# Rows of the trajectory matrix processed at once when assigning and fitting all N weights:
# bounds the float64 temporaries to CHUNK * T * 8 bytes whatever N is.
CHUNK = 1 << 19


@dataclass
class CMDFit:
    """A CMD model: every weight i is ``a[i] * w_ref[modes[i]] + b[i]``.

    Attributes
    ----------
    modes : ndarray of int64, shape (N,)
        Mode of each weight, 0 being the largest mode.
    references : ndarray of int64, shape (M,)
        Weight index of each mode's reference weight.
    a, b : ndarray of float64, shape (N,)
        Affine coefficients; a reference's own are exactly (1, 0).
    residual : ndarray of float64, shape (N,) or None
        Relative residual of each weight's fit, ``sqrt(SSE / SS_tot)`` (0 for a perfect fit, 1 for
        no better than the weight's mean), when known.
    """

    modes: np.ndarray
    references: np.ndarray
    a: np.ndarray
    b: np.ndarray
    residual: np.ndarray | None = field(default=None)

    @property
    def n_weights(self) -> int:
        """N, the number of modelled weights."""
        return int(self.modes.shape[0])

    @property
    def n_modes(self) -> int:
        """M, the number of modes."""
        return int(self.references.shape[0])

    def reconstruct(self, reference_values: np.ndarray | torch.Tensor) -> np.ndarray:
        """Weights from reference values: (M,) gives (N,), (M, T) gives (N, T)."""
        refs = np.asarray(reference_values, dtype=np.float64)
        if refs.ndim not in (1, 2) or refs.shape[0] != self.n_modes:
            raise ValueError(
                f"reference values must have shape ({self.n_modes},) or ({self.n_modes}, T), "
                f"got {refs.shape}"
            )
        per_weight = refs[self.modes]
        if refs.ndim == 1:
            return self.a * per_weight + self.b
        return self.a[:, None] * per_weight + self.b[:, None]


def as_trajectories(trajectories: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate an (N, T) trajectory matrix; return it as a float array (no copy if possible)."""
    if isinstance(trajectories, torch.Tensor):
        trajectories = trajectories.detach().cpu().numpy()
    traj = np.asarray(trajectories)
    if traj.ndim != 2:
        raise ValueError(f"trajectories must be a 2-d (N, T) array, got shape {traj.shape}")
    if not np.issubdtype(traj.dtype, np.floating):
        traj = traj.astype(np.float64)
    n, t = traj.shape
    if n < 1:
        raise ValueError("trajectories hold no weights (N = 0)")
    if t < 2:
        raise ValueError(f"CMD needs at least 2 snapshots per trajectory, got T = {t}")
    for start in range(0, n, CHUNK):
        if not np.isfinite(traj[start : start + CHUNK]).all():
            raise ValueError("trajectories contain NaN or Inf values")
    return traj


def sample_weights(
    n_weights: int, n_samples: int, tensor_sizes: list[int] | None = None, seed: int = 0
) -> np.ndarray:
    """Layer-balanced sample of weight indices (sorted, unique).

    Each tensor gets ``min(size, K // (2 * #tensors))`` uniform samples; the other samples are drawn
    uniformly from the weights not yet taken, so each tensor's share of them is proportional to its
    size. With ``K // 2 < #tensors`` (or no layout) the K samples are uniform over all N weights.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rng = np.random.default_rng(seed)
    if n_samples >= n_weights:
        return np.arange(n_weights, dtype=np.int64)
    sizes = tensor_sizes if tensor_sizes else [n_weights]
    if sum(sizes) != n_weights:
        raise ValueError(f"tensor sizes sum to {sum(sizes)}, expected {n_weights}")
    if n_samples // 2 < len(sizes):
        return np.sort(rng.choice(n_weights, size=n_samples, replace=False)).astype(np.int64)
    per_tensor = n_samples // (2 * len(sizes))
    chosen: list[np.ndarray] = []
    offset = 0
    for size in sizes:
        take = min(size, per_tensor)
        chosen.append(offset + rng.choice(size, size=take, replace=False))
        offset += size
    base = np.concatenate(chosen)
    remaining = n_samples - base.size
    if remaining > 0:
        available = np.ones(n_weights, dtype=bool)
        available[base] = False
        pool = np.flatnonzero(available)
        base = np.concatenate([base, rng.choice(pool, size=remaining, replace=False)])
    return np.sort(base).astype(np.int64)


def abs_correlation(rows: np.ndarray) -> np.ndarray:
    """|Pearson correlation| between the rows of a (K, T) matrix; a constant row correlates 0."""
    centred = rows.astype(np.float64) - rows.mean(axis=1, keepdims=True, dtype=np.float64)
    norms = np.linalg.norm(centred, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = centred / safe[:, None]
    unit[norms == 0] = 0.0
    corr = np.abs(unit @ unit.T)
    np.clip(corr, 0.0, 1.0, out=corr)
    return corr


def cluster_modes(corr: np.ndarray, n_modes: int) -> np.ndarray:
    """Complete-linkage clustering of |corr| rows into at most ``n_modes`` clusters.

    Returns labels 0..M'-1 numbered by cluster size, largest first (ties: first member first).
    """
    k = corr.shape[0]
    if k == 1:
        return np.zeros(1, dtype=np.int64)
    tree = linkage(corr, method="complete", metric="euclidean")
    raw = fcluster(tree, t=n_modes, criterion="maxclust")
    labels, first, counts = np.unique(raw, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    relabel = np.empty(labels.max() + 1, dtype=np.int64)
    relabel[labels[order]] = np.arange(order.size)
    return relabel[raw]


def choose_references(
    corr: np.ndarray,
    labels: np.ndarray,
    stds: np.ndarray | None = None,
    std_ratio: float = 0.0,
) -> np.ndarray:
    """Per cluster, the member (a row of ``corr``) with the highest mean |corr| to its cluster.

    With ``std_ratio > 0`` only members whose trajectory std is at least ``std_ratio`` times the
    cluster's median std may be references: a near-constant reference makes ``|a|`` of its
    members huge and the whole mode hypersensitive to it.
    """
    refs = []
    for mode in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == mode)
        within = corr[np.ix_(members, members)].mean(axis=1)
        if stds is not None and std_ratio > 0:
            member_std = stds[members]
            allowed = member_std >= std_ratio * np.median(member_std)
            if allowed.any():
                within = np.where(allowed, within, -np.inf)
        refs.append(members[int(np.argmax(within))])
    return np.asarray(refs, dtype=np.int64)


def assign_and_fit(
    trajectories: np.ndarray, references: np.ndarray, modes: np.ndarray | None = None
) -> CMDFit:
    """Assign every weight to its most correlated reference (unless ``modes`` is given) and fit
    ``w_i = a_i * w_ref + b_i`` by least squares, in float64, chunk by chunk.

    A reference with (numerically) zero variance gets the pseudo-inverse solution for its members:
    ``a = 0``, ``b = mean(w_i)``. Constant weights go to mode 0. References fit themselves as
    (1, 0).
    """
    n, t = trajectories.shape
    ref_traj = trajectories[references].astype(np.float64)
    ref_mean = ref_traj.mean(axis=1)
    ref_centred = ref_traj - ref_mean[:, None]
    ref_ss = np.einsum("mt,mt->m", ref_centred, ref_centred)
    # pinv-style cut-off: variances this small relative to the reference's scale are zero.
    scale = np.maximum(np.abs(ref_traj).max(axis=1), 1e-300)
    degenerate = ref_ss <= (t * (scale * 1e-12) ** 2)
    inv_ss = np.where(degenerate, 0.0, 1.0 / np.where(degenerate, 1.0, ref_ss))
    sqrt_inv_ss = np.sqrt(inv_ss)

    out_modes = np.empty(n, dtype=np.int64) if modes is None else np.asarray(modes, np.int64)
    a = np.empty(n, dtype=np.float64)
    b = np.empty(n, dtype=np.float64)
    residual = np.empty(n, dtype=np.float64)
    for start in range(0, n, CHUNK):
        block = trajectories[start : start + CHUNK].astype(np.float64)
        mean = block.mean(axis=1)
        centred = block - mean[:, None]
        cross = centred @ ref_centred.T  # (chunk, M): sum_t (w - mean w)(r - mean r)
        if modes is None:
            # argmax |corr| = argmax |cross| / ||ref||: the weight's own norm does not matter.
            scores = np.abs(cross) * sqrt_inv_ss
            chunk_modes = scores.argmax(axis=1)
            chunk_modes[scores.max(axis=1) == 0] = 0
            out_modes[start : start + block.shape[0]] = chunk_modes
        chunk_modes = out_modes[start : start + block.shape[0]]
        rows = np.arange(block.shape[0])
        slope = cross[rows, chunk_modes] * inv_ss[chunk_modes]
        a[start : start + block.shape[0]] = slope
        b[start : start + block.shape[0]] = mean - slope * ref_mean[chunk_modes]
        ss_tot = np.einsum("nt,nt->n", centred, centred)
        sse = np.maximum(ss_tot - slope * cross[rows, chunk_modes], 0.0)
        residual[start : start + block.shape[0]] = _relative_residual(sse, ss_tot)
    out_modes[references] = np.arange(references.size)
    a[references] = 1.0
    b[references] = 0.0
    residual[references] = 0.0
    return CMDFit(modes=out_modes, references=references.copy(), a=a, b=b, residual=residual)


def _relative_residual(sse: np.ndarray, ss_tot: np.ndarray) -> np.ndarray:
    out = np.zeros_like(sse)
    np.divide(sse, ss_tot, out=out, where=ss_tot > 0)
    return np.sqrt(np.clip(out, 0.0, 1.0))


def posthoc_cmd(
    trajectories: np.ndarray | torch.Tensor,
    n_modes: int,
    n_samples: int = 1000,
    seed: int = 0,
    layout: ParameterLayout | list[int] | None = None,
    reference_std_ratio: float = 0.0,
) -> CMDFit:
    """Post-hoc CMD of a whole trajectory matrix.

    Parameters
    ----------
    trajectories : ndarray or Tensor, shape (N, T)
        Weight i's value at snapshot t; T >= 2, finite.
    n_modes : int
        M, the largest number of modes (clusters); fewer come back if the sample has fewer
        distinct clusters.
    n_samples : int
        K, weights sampled (layer-balanced) for clustering. Default 1000.
    seed : int
        Seed of the sampling.
    layout : ParameterLayout, list of tensor sizes, or None
        Tensor boundaries for layer-balanced sampling; None samples uniformly.
    reference_std_ratio : float
        References must move: a member whose trajectory std is below this fraction of its
        cluster's median std is not chosen as reference. Default 0 (the paper's rule).

    Returns
    -------
    CMDFit
        Modes, references and affine coefficients of all N weights.
    """
    traj = as_trajectories(trajectories)
    n = traj.shape[0]
    if n_modes < 1:
        raise ValueError(f"n_modes must be >= 1, got {n_modes}")
    sizes = layout.tensor_sizes if isinstance(layout, ParameterLayout) else layout
    sample = sample_weights(n, n_samples, sizes, seed)
    if n_modes > sample.size:
        raise ValueError(
            f"n_modes = {n_modes} exceeds the number of sampled weights ({sample.size})"
        )
    sampled = traj[sample]
    corr = abs_correlation(sampled)
    labels = cluster_modes(corr, n_modes)
    stds = sampled.std(axis=1, dtype=np.float64)
    references = sample[choose_references(corr, labels, stds, reference_std_ratio)]
    fit = assign_and_fit(traj, references)
    return _number_modes_by_size(fit)


def _number_modes_by_size(fit: CMDFit) -> CMDFit:
    """Renumber modes by their final size over all N weights, largest first."""
    sizes = np.bincount(fit.modes, minlength=fit.n_modes)
    order = np.argsort(-sizes, kind="stable")
    new_id = np.empty_like(order)
    new_id[order] = np.arange(order.size)
    fit.modes = new_id[fit.modes]
    fit.references = fit.references[order]
    return fit
