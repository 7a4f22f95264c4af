"""Device mesh and the logical-axis -> mesh-axis sharding rules."""

from jaxeff.parallel.mesh import MESH_AXES, build_mesh
from jaxeff.parallel.sharding import BATCH_AXES, LOGICAL_AXIS_RULES, batch_sharding, logical_shardings

__all__ = ["BATCH_AXES", "LOGICAL_AXIS_RULES", "MESH_AXES", "batch_sharding", "build_mesh", "logical_shardings"]
