"""`jaxeff quantize`: a float export -> a FlexQ-quantized export (packed b-bit weights + scales, the scheme in
config.json) that `jaxeff generate` runs. Calibration-free: nothing but the weights is read. See
docs/serving/quantize.md."""

from __future__ import annotations

import jax

from jaxeff.artifacts.export import check_new_out_dir, is_export, write_config, write_params
from jaxeff.artifacts.load import load_trained
from jaxeff.artifacts.packed_flexq import pack_flexq
from jaxeff.config import ConfigError
from jaxeff.models.flexq import DEFAULT_A8_LAYERS, SCHEMES
from jaxeff.models.params import count_params
from jaxeff.paths import Path, PathLike, as_path, make_writable_dir


def check_settings(scheme: str, group_size: int) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"--scheme {scheme!r} is not a quantization scheme; pick one of {', '.join(SCHEMES)}")
    if group_size < 1:
        raise ConfigError(f"--group-size {group_size}: must be a positive number of input elements per scale "
                          "(FlexQ uses 128)")


def quantize_export(source: PathLike, out: PathLike, scheme: str, group_size: int = 128,
                    a8_layers: list[str] | None = None) -> tuple[Path, dict]:
    """Write the quantized export; returns (its directory, the config.json quantization record)."""
    check_settings(scheme, group_size)
    source = as_path(source, "--from")
    if not is_export(source):
        raise ConfigError(f"--from {source} is not an export (config.json + params/); write one with `jaxeff export "
                          f"--workdir {source} --out DIR` and quantize that")
    out = check_new_out_dir(out)
    loaded = load_trained(source)
    if loaded.quantized or loaded.qat.enabled:
        kind = (loaded.quantization or {}).get("scheme") or (loaded.quantization or {}).get("kind") or loaded.qat.kind
        raise ConfigError(f"--from {source} is already quantized ({kind}); quantize the float export it came from")
    params = jax.device_get(loaded.params)
    a8 = DEFAULT_A8_LAYERS if a8_layers is None else a8_layers
    packed, record = pack_flexq(params, SCHEMES[scheme], group_size, a8, loaded.cfg.model.d_model)
    if not record["params"]:
        raise ConfigError(f"--from {source}: no mixer or channel projection kernel (layer_*/mixer/*/kernel, "
                          "layer_*/channel/*/kernel) to quantize in this model")
    make_writable_dir(out, "--out")
    write_params(out, packed)
    write_config(out, loaded.cfg, loaded.meta, step=loaded.step, param_count=count_params(loaded.params),
                 source_dir=loaded.files_dir, quantization=record)
    return out, record
