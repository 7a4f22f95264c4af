"""One table maps the logical axis names that parameters and activations carry to mesh axes."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Batch rows are split over every axis that does not split the model's width: "data", "fsdp" (which also
# shards parameters) and "expert" (which also holds different MoE experts; dense layers see it as data).
BATCH_AXES = ("data", "fsdp", "expert")

# A row's tokens are split into contiguous chunks over "sequence" (jaxeff.parallel.sequence). Parameters shard over
# fsdp x sequence: the sequence devices hold the same weights, so keeping a full copy on each would waste their
# memory; they are gathered per layer as FSDP's are.
SEQUENCE_AXIS = "sequence"

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", ("fsdp", SEQUENCE_AXIS)),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("activation_embed", None),
    ("head_dim", None),
    ("length", SEQUENCE_AXIS),
    ("layers", None),
    ("norm", None),
)


def logical_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
    """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`) abstract arrays."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def with_logical_constraint(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Activation sharding hint by logical names; a no-op unless traced under `jax.set_mesh(mesh)`."""
    return nn.with_logical_constraint(x, axes, rules=LOGICAL_AXIS_RULES)


def logical_spec(axes: tuple[str | None, ...]) -> P:
    """The mesh PartitionSpec of logical axis names (LOGICAL_AXIS_RULES)."""
    return nn.logical_to_mesh_axes(axes, LOGICAL_AXIS_RULES)


def per_shard(fn: Callable, args: tuple, in_axes: tuple[tuple[str | None, ...], ...],
              out_axes: tuple[str | None, ...]):
    """`fn(*args)` run on each device's own shard (a `shard_map` over the mesh set while tracing), the shards
    named by logical axes. Pallas kernels need it: XLA does not partition a Mosaic kernel at all, nor a Triton
    one without gathering its operands, so an op whose rows and heads are independent runs per shard instead.
    Without a mesh of more than one device (tests, inference, `model.init`), `fn(*args)`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args)
    in_specs = tuple(_specs(a) for a in in_axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=_specs(out_axes), check_vma=False)(*args)


def _specs(axes):
    """One array's logical axes (names or None) -> its PartitionSpec; a tuple of such (several outputs, a state
    tuple) -> the same structure of PartitionSpecs."""
    if all(a is None or isinstance(a, str) for a in axes):
        return logical_spec(axes)
    return tuple(_specs(a) for a in axes)


def sequence_shards() -> int:
    """How many chunks the mesh being traced under splits each row into (mesh.sequence; 1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get(SEQUENCE_AXIS, 1)


def sequence_axis() -> str | None:
    """"sequence" when the mesh being traced under splits the sequence (mesh.sequence > 1), else None."""
    return SEQUENCE_AXIS if sequence_shards() > 1 else None


def per_sequence_shard(whole: Callable, sharded: Callable, args: tuple, in_axes: tuple[tuple[str | None, ...], ...],
                       out_axes: tuple[str | None, ...]):
    """`per_shard` of an op with a sequence-parallel form: `whole(*args)` on each shard, or, when the mesh splits the
    sequence, `sharded(*args, axis_name="sequence")` there (the form that exchanges what crosses chunk borders)."""
    axis = sequence_axis()
    fn = whole if axis is None else functools.partial(sharded, axis_name=axis)
    return per_shard(fn, args, in_axes, out_axes)
