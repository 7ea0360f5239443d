"""Checkpoint files: named numpy arrays plus JSON metadata, one file, written atomically.

No pickle anywhere: arrays go through ``np.savez`` and are read with ``allow_pickle=False``;
metadata is JSON stored as UTF-8 bytes inside the same file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_META_KEY = "__meta__"


def save_checkpoint(
    path: str | os.PathLike[str], arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> None:
    """Write ``arrays`` and ``meta`` to ``path`` atomically (a reader sees old or new, never half).

    Raises
    ------
    ValueError
        If an array key is the reserved metadata key or an array holds Python objects.
    """
    if _META_KEY in arrays:
        raise ValueError(f"{_META_KEY!r} is reserved")
    for key, value in arrays.items():
        if np.asarray(value).dtype.hasobject:
            raise ValueError(f"array {key!r} holds Python objects; checkpoints hold no pickle")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(arrays)
    payload[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            savez: Any = np.savez  # numpy's stubs mistype **kwds
            savez(handle, **payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` (no pickle is ever loaded)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files if key != _META_KEY}
        if _META_KEY not in data.files:
            raise ValueError(f"{path} is not a cmd-fl checkpoint (no metadata)")
        meta = json.loads(data[_META_KEY].tobytes().decode("utf-8"))
    return arrays, meta


def prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with every key prefixed by ``prefix + "."``."""
    return {f"{prefix}.{key}": value for key, value in arrays.items()}


def unprefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays under ``prefix + "."``, with the prefix removed."""
    head = prefix + "."
    return {key[len(head) :]: value for key, value in arrays.items() if key.startswith(head)}
