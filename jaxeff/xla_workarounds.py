"""Work-arounds for XLA bugs that change results, applied when jaxeff is imported.

jaxlib 0.10.x, XLA:CPU: the YNNPACK reduction fusion miscompiles `w_HD * sum(v_HD * x_BHD, -1, keepdims=True)`
(a reduction over a product with a parameter broadcast along the batch, then a broadcast multiply): jit results
are off by O(1) while eager mode is right (tests/test_xla_workarounds.py has the reproducer; SpaceTime's
closed-loop decoder hit it). Removing `reduce` from the YNN fusion types restores exact results. The flag is
only added for jaxlib versions known to have it: XLA aborts on flags it does not know.

XLA reads XLA_FLAGS when the first backend starts, so import jaxeff before computing anything with JAX.
"""

from __future__ import annotations

import importlib.metadata
import os

YNN_REDUCE_OFF = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
_AFFECTED_JAXLIB = ("0.10.",)


def apply() -> None:
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if version.startswith(_AFFECTED_JAXLIB) and "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_REDUCE_OFF}".strip()
