"""`jaxeff export`: a workdir's newest checkpoint as an export (params/ + config.json; see jaxeff/artifacts/export.py).

Any task: the loader builds the model from the run's config and recorded meta, and the task decides which files its
meta needs next to the export (a language model's tokenizer).
"""

from __future__ import annotations

import jax

from jaxeff.artifacts.export import check_new_out_dir, write_config, write_params
from jaxeff.artifacts.load import load_trained
from jaxeff.models.params import count_params
from jaxeff.paths import Path, PathLike, make_writable_dir


def export_checkpoint(workdir: PathLike, out: PathLike) -> tuple[Path, int]:
    """Write the export; returns (its directory, the training step exported)."""
    out = check_new_out_dir(out)
    loaded = load_trained(workdir)
    make_writable_dir(out, "--out")
    write_params(out, jax.device_get(loaded.params))
    write_config(out, loaded.cfg, loaded.meta, step=loaded.step, param_count=count_params(loaded.params),
                 source_dir=loaded.files_dir)
    return out, loaded.step
