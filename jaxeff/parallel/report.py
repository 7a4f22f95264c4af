"""The start-of-run sharding report: where each parameter lives and what each device holds."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _bytes_per_device(abstract: jax.ShapeDtypeStruct, sharding) -> int:
    return int(np.prod(sharding.shard_shape(abstract.shape), dtype=np.int64)) * abstract.dtype.itemsize


def tree_bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
    return sum(_bytes_per_device(a, s) for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)))


def parameter_table(abstract_params: Any, logical_axes: Any, shardings: Any) -> list[str]:
    """One row per parameter: path, shape, logical axes, mesh partition spec, bytes per device."""
    rows = [("parameter", "shape", "logical axes", "mesh sharding", "bytes/device")]
    flat = jax.tree.leaves_with_path(abstract_params)
    axes = jax.tree.leaves(logical_axes, is_leaf=lambda x: isinstance(x, tuple))
    for (path, a), names, s in zip(flat, axes, jax.tree.leaves(shardings)):
        rows.append(("/".join(str(getattr(p, "key", p)) for p in path), str(tuple(a.shape)),
                     str(names), str(tuple(s.spec)), f"{_bytes_per_device(a, s):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def memory_summary(abstract_state: dict, shardings: dict, compiled=None) -> str:
    params = tree_bytes_per_device(abstract_state["params"], shardings["params"])
    opt = tree_bytes_per_device(abstract_state["opt_state"], shardings["opt_state"])
    text = f"per device: params {params / 2**20:.2f} MiB, optimizer state {opt / 2**20:.2f} MiB"
    analysis = compiled.memory_analysis() if compiled is not None else None
    if analysis is not None:
        text += f", train step temporaries {analysis.temp_size_in_bytes / 2**20:.2f} MiB"
    return text
