"""Build the `jax.sharding.Mesh` the trainer runs on from the `mesh:` config section."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import math

from jaxeff.errors import ConfigError
from jaxeff.parallel.sharding import BATCH_AXES

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


def process_row_shards(mesh: Mesh, global_batch_size: int) -> dict[int, tuple[int, int]]:
    """process index -> (i, n): process p loads share i of n of every global batch's rows.

    Rows are split over the batch axes only, so processes whose devices hold the same rows (a `sequence` or
    `tensor` group spanning hosts: e.g. 1M-token rows over 8 chips on 2 hosts) load the same share; n is the
    number of distinct shares, not the number of processes. ConfigError when a process's rows are not one
    contiguous share, or when the batch does not split into n equal shares."""
    blocks = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
    rows_of_device = NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape))).devices_indices_map(
        (blocks,))
    held: dict[int, set[int]] = {}
    for device, (rows,) in rows_of_device.items():
        held.setdefault(device.process_index, set()).update(range(*rows.indices(blocks)))
    shares = sorted({tuple(sorted(r)) for r in held.values()})
    flat = [b for share in shares for b in share]
    if sorted(flat) != list(range(blocks)) or any(list(s) != list(range(s[0], s[-1] + 1)) for s in shares) or \
            len({len(s) for s in shares}) != 1:
        raise ConfigError(f"mesh {dict(mesh.shape)}: the processes' devices do not hold equal, contiguous shares of "
                          f"the batch rows ({len(held)} processes); make mesh.data*mesh.fsdp*mesh.expert a multiple "
                          f"of the number of hosts, or keep mesh.sequence*mesh.tensor within one host")
    if global_batch_size % len(shares):
        raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by the {len(shares)} "
                          f"shares of rows the {len(held)} processes load (each loads an equal share of every "
                          f"batch); use a multiple of {len(shares)}")
    return {p: (shares.index(tuple(sorted(r))), len(shares)) for p, r in held.items()}
