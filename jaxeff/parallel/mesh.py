"""Build the `jax.sharding.Mesh` the trainer runs on from the `mesh:` config section."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxeff.config import Config, resolve_mesh_shape

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def build_mesh(cfg: Config, devices: list | None = None) -> Mesh:
    """A mesh over `devices` (default: all global devices) with the config's axis sizes.

    Axis types are Auto (GSPMD propagation): jax.make_mesh now defaults to Explicit, under which
    ordinary matmuls over sharded contracting dims are rejected.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(cfg.mesh, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    n = int(np.prod(shape))
    try:
        device_grid = mesh_utils.create_device_mesh(shape, devices[:n])
    except Exception:  # non-physical device sets (e.g. a CPU subset): plain row-major order
        device_grid = np.asarray(devices[:n]).reshape(shape)
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
