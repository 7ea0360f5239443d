"""Parameter layout: which tensors of a model CMD models, and one flat vector for them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

TensorLike = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model.

    Attributes
    ----------
    name : str
        The state-dict key.
    shape : tuple[int, ...]
        The tensor's shape.
    dtype : torch.dtype
        The tensor's dtype, kept on every round trip.
    modelled : bool
        True for floating-point trainable parameters (CMD-modelled); False for extras (buffers,
        frozen or integer parameters), which travel densely.
    offset : int
        Start of this tensor in the flat CMD vector (modelled) or its position among the extras.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    modelled: bool
    offset: int

    @property
    def numel(self) -> int:
        """Number of scalars in the tensor."""
        return int(np.prod(self.shape, dtype=np.int64))


class ParameterLayout:
    """The ordered tensors of a model, split into CMD-modelled weights and dense extras.

    The modelled tensors, in state-dict order, are concatenated into one flat vector of
    ``n_weights`` scalars (the CMD weight index ``i`` used everywhere else). Extras (buffers such
    as BatchNorm statistics) are kept as a list of tensors in state-dict order.

    Parameters
    ----------
    specs : list[TensorSpec]
        Tensor descriptions in state-dict order.
    """

    def __init__(self, specs: list[TensorSpec]) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in layout")
        self.specs: tuple[TensorSpec, ...] = tuple(specs)
        self.modelled: tuple[TensorSpec, ...] = tuple(s for s in specs if s.modelled)
        self.extras: tuple[TensorSpec, ...] = tuple(s for s in specs if not s.modelled)
        self.n_weights: int = sum(s.numel for s in self.modelled)
        dtypes = {s.dtype for s in self.modelled}
        # One flat dtype for all modelled tensors: the widest floating type among them.
        self.flat_dtype: torch.dtype = (
            torch.float32 if not dtypes else _widest_float(sorted(dtypes, key=str))
        )

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: torch.nn.Module) -> ParameterLayout:
        """Layout of a module: trainable floating parameters are modelled, the rest are extras.

        Tied parameters (one tensor under several names) are modelled once, under the first name;
        their aliases are left out since loading the first name sets them too.
        """
        trainable = {
            id(p) for p in module.parameters() if p.requires_grad and p.is_floating_point()
        }
        specs: list[TensorSpec] = []
        seen: set[int] = set()
        n_flat = 0
        n_extra = 0
        for name, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            modelled = id(tensor) in trainable
            offset = n_flat if modelled else n_extra
            spec = TensorSpec(name, tuple(tensor.shape), tensor.dtype, modelled, offset)
            specs.append(spec)
            if modelled:
                n_flat += spec.numel
            else:
                n_extra += 1
        return cls(specs)

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, TensorLike], modelled_names: set[str] | None = None
    ) -> ParameterLayout:
        """Layout of a state dict.

        Parameters
        ----------
        state : Mapping[str, Tensor | ndarray]
            Tensors in order.
        modelled_names : set[str] | None
            Names to model. Default: every floating-point tensor except BatchNorm-style
            statistics (names ending in ``running_mean``, ``running_var``,
            ``num_batches_tracked``).
        """
        stat_suffixes = ("running_mean", "running_var", "num_batches_tracked")
        specs: list[TensorSpec] = []
        n_flat = 0
        n_extra = 0
        for name, value in state.items():
            tensor = torch.as_tensor(value)
            if modelled_names is None:
                modelled = tensor.is_floating_point() and not name.endswith(stat_suffixes)
            else:
                modelled = name in modelled_names
                if modelled and not tensor.is_floating_point():
                    raise ValueError(f"tensor {name!r} is {tensor.dtype}, CMD models floats only")
            offset = n_flat if modelled else n_extra
            spec = TensorSpec(name, tuple(tensor.shape), tensor.dtype, modelled, offset)
            specs.append(spec)
            if modelled:
                n_flat += spec.numel
            else:
                n_extra += 1
        if modelled_names is not None:
            unknown = modelled_names - {s.name for s in specs}
            if unknown:
                raise ValueError(f"modelled names not in state dict: {sorted(unknown)}")
        return cls(specs)

    # --- properties ---------------------------------------------------------------------------
    @property
    def tensor_sizes(self) -> list[int]:
        """Sizes of the modelled tensors in flat order (for layer-balanced sampling)."""
        return [s.numel for s in self.modelled]

    def tensor_of(self, index: int) -> tuple[TensorSpec, int]:
        """The modelled tensor holding flat weight ``index`` and the index within it."""
        if not 0 <= index < self.n_weights:
            raise IndexError(f"weight index {index} out of range [0, {self.n_weights})")
        offsets = [s.offset for s in self.modelled]
        pos = int(np.searchsorted(offsets, index, side="right")) - 1
        spec = self.modelled[pos]
        return spec, index - spec.offset

    # --- flattening ---------------------------------------------------------------------------
    def flatten(self, state: Mapping[str, TensorLike]) -> torch.Tensor:
        """The modelled tensors of ``state`` as one flat tensor of ``flat_dtype`` (a new tensor)."""
        self._check_keys(state, self.modelled)
        if not self.modelled:
            return torch.empty(0, dtype=self.flat_dtype)
        parts = []
        for spec in self.modelled:
            tensor = torch.as_tensor(state[spec.name]).detach()
            if tuple(tensor.shape) != spec.shape:
                raise ValueError(
                    f"tensor {spec.name!r} has shape {tuple(tensor.shape)}, "
                    f"layout says {spec.shape}"
                )
            parts.append(tensor.reshape(-1).to(device="cpu", dtype=self.flat_dtype))
        return torch.cat(parts)

    def flatten_numpy(self, state: Mapping[str, TensorLike]) -> np.ndarray:
        """:meth:`flatten` as a numpy array."""
        return self.flatten(state).numpy()

    def unflatten(self, flat: TensorLike) -> dict[str, torch.Tensor]:
        """Modelled tensors from a flat vector: views into it when its dtype already matches."""
        vector = torch.as_tensor(flat)
        if vector.ndim != 1 or vector.numel() != self.n_weights:
            raise ValueError(
                f"flat vector has shape {tuple(vector.shape)}, expected ({self.n_weights},)"
            )
        out: dict[str, torch.Tensor] = {}
        for spec in self.modelled:
            view = vector[spec.offset : spec.offset + spec.numel].view(spec.shape)
            out[spec.name] = view if view.dtype == spec.dtype else view.to(spec.dtype)
        return out

    def extra_tensors(self, state: Mapping[str, TensorLike]) -> list[np.ndarray]:
        """The extras of ``state`` as numpy arrays in layout order, dtypes kept."""
        self._check_keys(state, self.extras)
        return [_to_numpy(state[spec.name]) for spec in self.extras]

    def extra_specs(self) -> list[tuple[tuple[int, ...], np.dtype]]:
        """(shape, numpy dtype) of each extra, for packing them into one blob."""
        return [(s.shape, _numpy_dtype(s.dtype)) for s in self.extras]

    def state_dict(
        self, flat: TensorLike, extras: list[np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        """A full state dict in layout order from a flat vector and the extras."""
        modelled = self.unflatten(flat)
        if extras is None:
            extras = []
            if self.extras:
                raise ValueError(f"layout has {len(self.extras)} extras, none given")
        if len(extras) != len(self.extras):
            raise ValueError(f"expected {len(self.extras)} extras, got {len(extras)}")
        out: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            if spec.modelled:
                out[spec.name] = modelled[spec.name]
            else:
                value = torch.as_tensor(extras[spec.offset])
                if tuple(value.shape) != spec.shape or value.dtype != spec.dtype:
                    raise ValueError(
                        f"extra {spec.name!r}: got {tuple(value.shape)} {value.dtype}, "
                        f"expected {spec.shape} {spec.dtype}"
                    )
                out[spec.name] = value
        return out

    @torch.no_grad()
    def load_into(
        self, module: torch.nn.Module, flat: TensorLike, extras: list[np.ndarray] | None = None
    ) -> None:
        """Copy a flat vector (and extras, if given) into a module's tensors in place."""
        own = module.state_dict(keep_vars=True)
        for name, value in self.unflatten(flat).items():
            own[name].copy_(value)
        if extras is not None:
            if len(extras) != len(self.extras):
                raise ValueError(f"expected {len(self.extras)} extras, got {len(extras)}")
            for spec in self.extras:
                own[spec.name].copy_(torch.as_tensor(extras[spec.offset]))

    def _check_keys(self, state: Mapping[str, TensorLike], specs: tuple[TensorSpec, ...]) -> None:
        missing = [s.name for s in specs if s.name not in state]
        if missing:
            raise KeyError(f"state is missing tensors: {missing[:5]}")


def _widest_float(dtypes: list[torch.dtype]) -> torch.dtype:
    widest = dtypes[0]
    for dtype in dtypes[1:]:
        widest = torch.promote_types(widest, dtype)
    return widest


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _to_numpy(value: TensorLike) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return value.detach().cpu().numpy()
