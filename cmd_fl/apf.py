"""Adaptive Parameter Freezing (APF, Chen et al., ICDCS 2021): the per-parameter freezing math.

Every scalar parameter i keeps two exponential moving averages of its synchronised round-to-round
change d = value before the round - value after it: ``m`` (of d) and ``a`` (of |d|), both from 0,
without bias correction. After a round in which i was active, i is *stable* when ``a > 0`` and
``|m| / a < T`` (the updates cancel out: the parameter oscillates around its optimum); ``a = 0``
counts as unstable. Its freeze length L grows additively when stable and halves when not
(AIMD, as TCP's window): i is then frozen for the next L rounds and active again in round
``this + L + 1``. An always-stable parameter is active in rounds 1, 3, 6, 10, 15, 21, ...
When more than 80 % of the parameters are frozen for the next round, the global threshold T
halves (on consecutive rounds too; it never rises). Frozen rounds are skipped, not fed as zeros.

"APF + random freezing" is the aggressive variant of the authors' later code: after each round
every parameter gets one extra frozen round with probability 0.5, from a seeded generator.

Defaults and why
----------------
``alpha = 0.99`` and ``threshold = 0.05`` are the values of the authors' code closest to the
ICDCS paper (see ``shared/docs/apf.md``). With them |m| / a starts at 1 and falls below T only
after tens of active rounds, so a 40-round run freezes little: results must state alpha and T0,
and any short-run tuning is reported next to the defaults, never instead of them. Measured on
digits (4 clients, 40 rounds, momentum 0.9, 3 local epochs): 4.3 % frozen on average at the
defaults; a smaller alpha alone does not help (0.9, 0.8, 0.5 froze 6.0, 5.4, 2.4 %: a short EMA
is noisier, and even a perfectly alternating update has |m| / a near (1 - alpha) / (1 + alpha),
above T0 for alpha < 0.9); the threshold is the lever (alpha = 0.9, T0 = 0.3: 22 %).

No Flower here: this module is the state and its update rule; ``strategies/apf_strategy.py``
runs it on the server.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DEFAULT_ALPHA", "DEFAULT_THRESHOLD", "HALVE_ABOVE", "AdaptiveFreezing"]

DEFAULT_ALPHA = 0.99
"""EMA factor of the authors' code closest to the ICDCS paper."""

DEFAULT_THRESHOLD = 0.05
"""Initial stability threshold T0 of that code (a later version: 0.01 with random freezing)."""

HALVE_ABOVE = 0.8
"""T halves when more than this share of the parameters is frozen for the next round."""


class AdaptiveFreezing:
    """The APF state of ``n_weights`` scalar parameters and its round-by-round update.

    Rounds are numbered from ``first_round`` (Flower's first server round is 1), and every
    parameter is active in the first round. A parameter is active in round r when its next active
    round is ``<= r``: with every round updated this is the paper's ``next == r``; a round that was
    not updated (say, no valid replies) simply leaves its active parameters active in the next.

    Parameters
    ----------
    n_weights : int
        Number of scalar parameters N.
    alpha : float
        EMA factor in [0, 1). Default 0.99.
    threshold : float
        Initial stability threshold T0 > 0. Default 0.05.
    random_freeze : bool
        Whether to add the random extra frozen round after every update. Default False.
    freeze_probability : float
        Probability of that extra round, per parameter and round. Default 0.5.
    seed : int
        Seed of the random freezing generator. Default 0.
    halve_above : float
        T halves when the frozen share of the next round exceeds it. Default 0.8.
    first_round : int
        The first round number. Default 1.
    """

    def __init__(
        self,
        n_weights: int,
        alpha: float = DEFAULT_ALPHA,
        threshold: float = DEFAULT_THRESHOLD,
        *,
        random_freeze: bool = False,
        freeze_probability: float = 0.5,
        seed: int = 0,
        halve_above: float = HALVE_ABOVE,
        first_round: int = 1,
    ) -> None:
        if n_weights < 0:
            raise ValueError(f"n_weights must be >= 0, got {n_weights}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if not threshold > 0.0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if not 0.0 <= freeze_probability <= 1.0:
            raise ValueError(f"freeze_probability must be in [0, 1], got {freeze_probability}")
        self.n_weights = int(n_weights)
        self.alpha = float(alpha)
        self.threshold = float(threshold)
        self.random_freeze = bool(random_freeze)
        self.freeze_probability = float(freeze_probability)
        self.halve_above = float(halve_above)
        self.rng = np.random.default_rng(seed)
        self.m = np.zeros(self.n_weights, dtype=np.float64)
        self.a = np.zeros(self.n_weights, dtype=np.float64)
        self.freeze_length = np.zeros(self.n_weights, dtype=np.int64)
        self.next_active = np.full(self.n_weights, first_round, dtype=np.int64)
        self.last_round = first_round - 1  # the last round that was updated

    # --- the mask -----------------------------------------------------------------------------
    def active_mask(self, server_round: int) -> np.ndarray:
        """Boolean mask of the parameters active in ``server_round`` (the others are frozen)."""
        return self.next_active <= server_round

    def active_indices(self, server_round: int) -> np.ndarray:
        """Indices (int64, increasing) of the parameters active in ``server_round``."""
        return np.flatnonzero(self.active_mask(server_round)).astype(np.int64)

    def frozen_fraction(self, server_round: int) -> float:
        """Share of the parameters frozen in ``server_round`` (0.0 for an empty model)."""
        if self.n_weights == 0:
            return 0.0
        return float(np.count_nonzero(~self.active_mask(server_round))) / self.n_weights

    # --- the update ---------------------------------------------------------------------------
    def update(self, server_round: int, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        """Update the statistics and schedule of the parameters active in ``server_round``.

        Parameters
        ----------
        server_round : int
            The round just aggregated; later than the last updated one.
        before, after : ndarray, shape (N,)
            The synchronised (global) values at the start and at the end of the round. Only the
            active entries are read: d = before - after, in float64.

        Returns
        -------
        ndarray of bool, shape (N,)
            Which of the active parameters were judged stable (False for frozen ones).
        """
        if server_round <= self.last_round:
            raise ValueError(f"round {server_round} comes after round {self.last_round}")
        before = np.asarray(before).reshape(-1)
        after = np.asarray(after).reshape(-1)
        if before.size != self.n_weights or after.size != self.n_weights:
            raise ValueError(
                f"expected {self.n_weights} values, got {before.size} and {after.size}"
            )
        active = self.active_indices(server_round)
        change = before[active].astype(np.float64) - after[active].astype(np.float64)
        m = self.alpha * self.m[active] + (1.0 - self.alpha) * change
        a = self.alpha * self.a[active] + (1.0 - self.alpha) * np.abs(change)
        self.m[active], self.a[active] = m, a
        # a == 0 is unstable: |m| < T * a is then false (|m| = 0 too), without dividing by zero.
        stable_active = (a > 0) & (np.abs(m) < self.threshold * a)
        lengths = self.freeze_length[active]
        lengths = np.where(stable_active, lengths + 1, lengths // 2)
        self.freeze_length[active] = lengths
        self.next_active[active] = server_round + lengths + 1
        if self.random_freeze:
            extra = self.rng.random(self.n_weights) < self.freeze_probability
            self.next_active += extra.astype(np.int64)
        self.last_round = server_round
        if self.frozen_fraction(server_round + 1) > self.halve_above:
            self.threshold /= 2.0
        stable = np.zeros(self.n_weights, dtype=bool)
        stable[active] = stable_active
        return stable

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The state as arrays and JSON-able metadata (the generator's state included)."""
        arrays = {
            "m": self.m,
            "a": self.a,
            "freeze_length": self.freeze_length,
            "next_active": self.next_active,
        }
        meta = {
            "threshold": self.threshold,
            "last_round": self.last_round,
            "rng": self.rng.bit_generator.state,
        }
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint` saved (into an instance built with the same settings).

        Raises
        ------
        ValueError
            If the arrays do not have this instance's number of parameters.
        """
        for key in ("m", "a", "freeze_length", "next_active"):
            if arrays[key].shape != (self.n_weights,):
                raise ValueError(f"checkpoint {key!r} has shape {arrays[key].shape}")
        self.m = arrays["m"].astype(np.float64)
        self.a = arrays["a"].astype(np.float64)
        self.freeze_length = arrays["freeze_length"].astype(np.int64)
        self.next_active = arrays["next_active"].astype(np.int64)
        self.threshold = float(meta["threshold"])
        self.last_round = int(meta["last_round"])
        self.rng.bit_generator.state = meta["rng"]
