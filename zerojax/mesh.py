"""The device mesh: data-parallel axes ('replica', 'fsdp') and an optional 'tensor' axis."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

REPLICA = "replica"
FSDP = "fsdp"
TENSOR = "tensor"
DATA_AXES = (REPLICA, FSDP)
AXES = (REPLICA, FSDP, TENSOR)


def make_mesh(
    fsdp: int | None = None,
    *,
    replica: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a `('replica', 'fsdp', 'tensor')` mesh; `fsdp` defaults to what the other axes leave.

    Devices are laid out replica-major, so an `fsdp` group is a run of consecutive devices (the
    devices of one host on a multi-host run). Axes are `Auto`: zerojax places arrays with explicit
    `NamedSharding`s and writes its ZeRO collectives itself (see `zerojax.step`).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("replica", replica), ("tensor", tensor)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"make_mesh: {name}={size!r} must be a positive integer.")
    if fsdp is None:
        if n % (replica * tensor):
            raise ValueError(
                f"make_mesh: {n} devices cannot be split into replica={replica} x tensor={tensor} "
                f"groups; choose sizes whose product divides {n}."
            )
        fsdp = n // (replica * tensor)
    if not isinstance(fsdp, int) or fsdp < 1:
        raise ValueError(f"make_mesh: fsdp={fsdp!r} must be a positive integer.")
    if replica * fsdp * tensor != n:
        raise ValueError(
            f"make_mesh: replica={replica} x fsdp={fsdp} x tensor={tensor} = "
            f"{replica * fsdp * tensor} devices, but {n} are available; the product must equal the "
            "device count (pass devices=... to use a subset)."
        )
    grid = np.asarray(devices, dtype=object).reshape(replica, fsdp, tensor)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """The number of data-parallel (ZeRO) ranks: the product of the 'replica' and 'fsdp' axes."""
    return math.prod(mesh.shape[a] for a in DATA_AXES)


def check_batch_rows(batch, multiple: int, explain: Callable[[str, tuple], str]) -> None:
    """Raises a ValueError, `explain(leaf name, shape)`, for the first leaf of `batch` whose leading
    (batch) dimension is missing or not a multiple of `multiple`."""
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        if np.ndim(x) == 0 or np.shape(x)[0] % multiple:
            raise ValueError(explain(jax.tree_util.keystr(path) or "batch", tuple(np.shape(x))))
