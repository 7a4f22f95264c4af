"""`jaxeff export`: a workdir's newest checkpoint as an export (params/ + config.json; see jaxeff/artifacts/export.py).

Any task: the loader builds the model from the run's config and recorded meta, and the task decides which files its
meta needs next to the export (a language model's tokenizer). A quantization-aware run (`train.qat`) exports its
quantized matrices packed, 2 bits per weight plus scales (jaxeff/artifacts/packed.py); `quantize` does the same
to a float run (post-training ternary rounding).
"""

from __future__ import annotations

import dataclasses

import jax

from jaxeff.artifacts.export import check_new_out_dir, write_config, write_params
from jaxeff.artifacts.load import load_trained
from jaxeff.artifacts.packed import pack_params
from jaxeff.config import ConfigError
from jaxeff.config.qat import QatConfig
from jaxeff.models.params import count_params
from jaxeff.paths import Path, PathLike, make_writable_dir


def export_checkpoint(workdir: PathLike, out: PathLike, quantize: QatConfig | None = None) -> tuple[Path, int]:
    """Write the export; returns (its directory, the training step exported). `quantize`: round a float run's
    matrices to ternary (a QAT run, or a packed export, is written packed without it)."""
    out = check_new_out_dir(out)
    loaded = load_trained(workdir)
    if (loaded.quantization or {}).get("kind") == "flexq":  # it serves int8 codes: nothing to re-export
        raise ConfigError(f"--workdir {workdir} is already a quantized export ({loaded.quantization['scheme']}); "
                          "copy the directory, or export the float run and quantize it again")
    if quantize is not None and quantize.enabled:
        if loaded.qat.enabled:
            raise ConfigError(f"--workdir {workdir} is already quantized (train.qat.kind={loaded.qat.kind}); export "
                              "it without --ternary")
        loaded = dataclasses.replace(loaded, qat=quantize)
    try:
        params, record = jax.device_get(loaded.run_params), None
    except ConfigError as e:  # the flag's name in place of the setting's
        raise ConfigError(str(e).replace("train.qat.group_size", "--group-size")) from None
    if loaded.qat.enabled:
        params, record = pack_params(params, loaded.qat)
    make_writable_dir(out, "--out")
    write_params(out, params)
    write_config(out, loaded.cfg, loaded.meta, step=loaded.step, param_count=count_params(loaded.params),
                 source_dir=loaded.files_dir, quantization=record)
    return out, loaded.step
