"""Keep a live PyTorch model on the CMD model while it trains (``step`` projection)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from cmd_fl.embedding import EmbeddingState
from cmd_fl.layout import ParameterLayout


@dataclass
class _TensorPart:
    """Where one parameter tensor holds embedded entries.

    The projection writes a tensor's embedded values through its boolean mask with
    ``masked_scatter_``: on a CPU several times faster than advanced indexing with an index list.
    """

    param: torch.nn.Parameter
    size: int  # embedded entries in this tensor
    keep: torch.Tensor  # gradient mask: 0 on embedded entries
    embedded: torch.Tensor  # flat bool mask


REFERENCE_GRADIENTS = ("own", "mode")


class StepPostHook(ABC):
    """Runs :meth:`after_step` after every step of an optimizer it is attached to.

    Subclasses implement ``after_step``; ``attach`` also runs it once, so the model obeys the
    constraint before the first step.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    @abstractmethod
    def after_step(self) -> None:
        """Restore the constraint on the live model."""

    def attach(self, optimizer: torch.optim.Optimizer) -> StepPostHook:
        """Hook into ``optimizer``; returns self."""
        self._handles.append(optimizer.register_step_post_hook(self._on_step))
        self.after_step()
        return self

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.after_step()

    def detach(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class _ModeFold:
    """What the ``"mode"`` reference gradient needs, as flat tensors over all N weights.

    The embedded weights are held grouped by mode, so each mode's ``sum_i a_i g_i`` is one dot
    product over a contiguous slice of a single gather: on a CPU faster than a float64
    scatter-add of the products into M bins (79 vs 129 us for the Fashion-MNIST CNN at 80 %
    embedded, one thread).
    """

    embedded: torch.Tensor  # flat indices of the embedded weights, grouped by mode
    a: tuple[torch.Tensor, ...]  # per mode: the slopes of its embedded weights (float32)
    sizes: list[int]  # per mode: how many of its weights are embedded
    references: torch.Tensor  # flat indices of the M references
    weight: torch.Tensor  # 1 + sum of a^2 over each mode's embedded weights, float64

    @classmethod
    def build(cls, state: EmbeddingState, device: torch.device) -> _ModeFold:
        emb = state.embedded_indices
        modes = state.modes[emb]
        order = np.argsort(modes, kind="stable")
        a = state.frozen_a[emb].astype(np.float32)
        sizes = np.bincount(modes, minlength=state.n_modes)
        weight = 1.0 + np.bincount(modes, a.astype(np.float64) ** 2, minlength=state.n_modes)
        a = a[order]
        return cls(
            embedded=torch.from_numpy(emb[order]).to(device),
            a=torch.from_numpy(a).to(device).split(sizes.tolist()),
            sizes=sizes.tolist(),
            references=torch.from_numpy(state.references).to(device),
            weight=torch.from_numpy(weight).to(device),
        )

    def reference_gradients(self, flat_grad: torch.Tensor) -> torch.Tensor:
        """``(g_ref + sum_i a_i g_i) / (1 + sum_i a_i^2)`` per mode (float64)."""
        gathered = flat_grad.index_select(0, self.embedded).to(torch.float32)
        pull = torch.stack(
            [torch.dot(a, g) for a, g in zip(self.a, gathered.split(self.sizes), strict=True)]
        )
        own = flat_grad.index_select(0, self.references)
        return (own.double() + pull.double()) / self.weight


class EmbeddedProjector(StepPostHook):
    """Masks the gradients of embedded weights and re-projects them after every optimizer step.

    After each ``optimizer.step()`` every embedded weight equals ``a * w_ref + b`` exactly
    (float32, multiply then add, as :class:`EmbeddingState` computes it), whatever the optimizer did
    (momentum, weight decay). Works for any ``torch.optim.Optimizer`` through a step post-hook.

    Parameters
    ----------
    module : torch.nn.Module
        The live model; its modelled parameters follow ``layout``.
    layout : ParameterLayout
        The module's layout.
    state : EmbeddingState
        Which weights are embedded, their references and frozen coefficients.
    reference_gradient : {"own", "mode"}
        ``"own"`` (the paper's): a reference trains on its own gradient and the embedded weights'
        gradients are dropped. ``"mode"``: before each step the reference's gradient becomes the
        least-squares projection of the whole mode's gradient onto the CMD model,
        ``(g_ref + sum_i a_i g_i) / (1 + sum_i a_i^2)`` over the mode's embedded weights i, so
        that (for plain SGD) the step moves the mode as close as the model allows to where the
        unconstrained step would have moved all its weights. Default ``"mode"``: with ``"own"``
        a reference ignores what its move does to the weights that follow it, and in 80-round
        runs some references drifted steadily and dragged their modes with them (see the
        README's long-run table).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        layout: ParameterLayout,
        state: EmbeddingState,
        reference_gradient: str = "mode",
    ) -> None:
        super().__init__()
        if reference_gradient not in REFERENCE_GRADIENTS:
            raise ValueError(
                f"reference_gradient must be one of {REFERENCE_GRADIENTS}, "
                f"got {reference_gradient!r}"
            )
        self.reference_gradient = reference_gradient
        self._n_modes = state.n_modes
        if state.n_weights != layout.n_weights:
            raise ValueError(f"state has {state.n_weights} weights, the layout {layout.n_weights}")
        params = dict(module.named_parameters())
        # References grouped by tensor, so reading all M is one gather per tensor.
        groups: dict[str, tuple[torch.nn.Parameter, list[int], list[int]]] = {}
        for mode, index in enumerate(state.references.tolist()):
            spec, local = layout.tensor_of(int(index))
            group = groups.setdefault(spec.name, (params[spec.name], [], []))
            group[1].append(local)
            group[2].append(mode)
        self._ref_groups = [
            (param, torch.tensor(local, device=param.device), torch.tensor(mode))
            for param, local, mode in groups.values()
        ]
        self._parts: list[_TensorPart] = []
        emb = state.embedded_indices
        for spec in layout.modelled:
            lo, hi = np.searchsorted(emb, [spec.offset, spec.offset + spec.numel])
            if hi == lo:
                continue
            param = params[spec.name]
            embedded = torch.zeros(spec.numel, dtype=torch.bool)
            embedded[torch.from_numpy(emb[lo:hi] - spec.offset)] = True
            self._parts.append(
                _TensorPart(
                    param=param,
                    size=int(hi - lo),
                    keep=(~embedded).to(param.dtype).view(spec.shape).to(param.device),
                    embedded=embedded.to(param.device),
                )
            )
        self._modelled = [params[spec.name] for spec in layout.modelled]
        device = self._modelled[0].device if self._modelled else torch.device("cpu")
        # Coefficients of all embedded weights in flat order (tensor by tensor, ascending inside
        # each), so the projection computes every value in three operations, not three per tensor.
        self._a = torch.from_numpy(state.frozen_a[emb]).to(device)
        self._b = torch.from_numpy(state.frozen_b[emb]).to(device)
        self._modes = torch.from_numpy(state.modes[emb].astype(np.int64)).to(device)
        self._sizes = [part.size for part in self._parts]
        if reference_gradient == "mode":
            self._fold = _ModeFold.build(state, device)

    def reference_values(self) -> torch.Tensor:
        """The current M reference values (float32, on the CPU)."""
        refs = torch.empty(self._n_modes, dtype=torch.float32)
        for param, local, modes in self._ref_groups:
            refs[modes] = param.detach().reshape(-1)[local].to(torch.float32).cpu()
        return refs

    @torch.no_grad()
    def project(self) -> None:
        """Set every embedded weight to ``a * w_ref + b`` from the current references.

        Multiply, then add, in float32, as :class:`EmbeddingState` does, so the values are
        bitwise the server's.
        """
        refs = self.reference_values().to(self._a.device)
        values = self._a * refs.index_select(0, self._modes) + self._b
        for part, part_values in zip(self._parts, values.split(self._sizes), strict=True):
            flat = part.param.data.view(-1)
            flat.masked_scatter_(part.embedded, part_values.to(flat.device, flat.dtype))

    def attach(self, optimizer: torch.optim.Optimizer) -> EmbeddedProjector:
        """Mask embedded gradients and project after each step of ``optimizer``; returns self."""
        if self.reference_gradient == "own":
            for part in self._parts:
                keep = part.keep
                self._handles.append(part.param.register_hook(lambda grad, keep=keep: grad * keep))
        else:
            self._handles.append(optimizer.register_step_pre_hook(self._mode_gradient))
        super().attach(optimizer)
        return self

    @torch.no_grad()
    def _mode_gradient(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Fold the embedded weights' gradients into their references' (``"mode"``).

        One gather over the concatenated gradient instead of a few small operations per
        tensor: on a CPU the per-operation overhead, not the arithmetic, was the cost.
        """
        grads = [
            torch.zeros_like(param).view(-1) if param.grad is None else param.grad.view(-1)
            for param in self._modelled
        ]
        folded = self._fold.reference_gradients(torch.cat(grads))
        for part in self._parts:
            if part.param.grad is not None:
                part.param.grad.mul_(part.keep)
        for param, local, modes in self._ref_groups:
            if param.grad is not None:
                param.grad.view(-1).index_copy_(
                    0, local, folded[modes.to(folded.device)].to(param.grad.dtype)
                )

    def after_step(self) -> None:
        """Project the embedded weights (the step post-hook)."""
        self.project()
