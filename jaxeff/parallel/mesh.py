"""Build the `jax.sharding.Mesh` the trainer runs on from the `mesh:` config section."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

import math

from jaxeff.errors import ConfigError

# Outermost first: the device order puts the axes that talk most (tensor, then expert) on the nearest devices.
MESH_AXES = ("data", "fsdp", "sequence", "tensor", "expert")


def resolve_mesh_shape(mesh, num_devices: int) -> dict[str, int]:
    """Axis sizes of the `mesh:` section with the -1 axis filled in; ConfigError when they do not fit the devices."""
    sizes = {axis: getattr(mesh, axis) for axis in MESH_AXES}
    free = [k for k, v in sizes.items() if v == -1]
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k}={v}: axis sizes must be positive, or -1 for 'the remaining devices'")
    if len(free) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + k for k in free)}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: the fixed axes use {fixed} devices, which does not divide the {num_devices} devices "
                f"present; change mesh.{'/'.join(k for k in sizes if k not in free)}"
            )
        sizes[free[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total > num_devices:
        raise ConfigError(
            f"mesh: {'*'.join(MESH_AXES)} = {'*'.join(str(v) for v in sizes.values())} = {total} devices, "
            f"but only {num_devices} {'is' if num_devices == 1 else 'are'} present; shrink the mesh (e.g. mesh.data=-1)"
        )
    return sizes


def build_mesh(cfg, devices: list | None = None) -> Mesh:
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
