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
    """The embedded entries of one parameter tensor, in ascending flat position.

    ``a``, ``b`` and ``modes`` live on the parameter's device. The projection reads the
    references with ``index_select`` and writes through the boolean mask with
    ``masked_scatter_``: on a CPU several times faster than advanced indexing with an index list.
    """

    param: torch.nn.Parameter
    local_idx: torch.Tensor  # flat positions inside the parameter (CPU)
    a: torch.Tensor
    b: torch.Tensor
    modes: torch.Tensor
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
        unconstrained step would have moved all its weights. Default ``"own"``.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        layout: ParameterLayout,
        state: EmbeddingState,
        reference_gradient: str = "own",
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
        self._ref_slots: list[tuple[torch.nn.Parameter, int]] = []
        # References grouped by tensor, so reading all M is one gather per tensor.
        groups: dict[str, tuple[torch.nn.Parameter, list[int], list[int]]] = {}
        for mode, index in enumerate(state.references.tolist()):
            spec, local = layout.tensor_of(int(index))
            self._ref_slots.append((params[spec.name], local))
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
            idx = emb[lo:hi]
            param = params[spec.name]
            device = param.device
            local_idx = torch.from_numpy(idx - spec.offset)
            embedded = torch.zeros(spec.numel, dtype=torch.bool)
            embedded[local_idx] = True
            self._parts.append(
                _TensorPart(
                    param=param,
                    local_idx=local_idx,
                    a=torch.from_numpy(state.frozen_a[idx]).to(device),
                    b=torch.from_numpy(state.frozen_b[idx]).to(device),
                    modes=torch.from_numpy(state.modes[idx].astype(np.int64)).to(device),
                    keep=(~embedded).to(param.dtype).view(spec.shape).to(device),
                    embedded=embedded.to(device),
                )
            )

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
        refs = self.reference_values()
        for part in self._parts:
            flat = part.param.data.view(-1)
            values = part.a * refs.to(flat.device).index_select(0, part.modes) + part.b
            flat.masked_scatter_(part.embedded, values.to(flat.dtype))

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
        """Fold the embedded weights' gradients into their references' (``"mode"``)."""
        pull = torch.zeros(self._n_modes, dtype=torch.float64)
        weight = torch.ones(self._n_modes, dtype=torch.float64)
        for part in self._parts:
            if part.param.grad is None:
                continue
            grad = part.param.grad.view(-1)
            local = part.local_idx.to(grad.device)
            a = part.a.cpu().to(torch.float64)
            modes = part.modes.cpu()
            pull.index_add_(0, modes, a * grad[local].detach().cpu().to(torch.float64))
            weight.index_add_(0, modes, a * a)
            grad[local] = 0
        for mode, (param, index) in enumerate(self._ref_slots):
            if param.grad is None:
                continue
            flat = param.grad.view(-1)
            own = float(flat[index])
            flat[index] = (own + float(pull[mode])) / float(weight[mode])

    def after_step(self) -> None:
        """Project the embedded weights (the step post-hook)."""
        self.project()
