"""`jaxeff plan --serve SCHEME`: the memory of serving a language model on one chip this host does not have, in
bfloat16 and quantized (FlexQ, `jaxeff quantize`) side by side, and the decode speed that memory bounds.

What `jaxeff generate` runs, compiled by the target's real compiler on abstract arrays (nothing allocated, no
checkpoint read):
* weights: every matrix `jaxeff quantize` quantizes held as int8 codes + float32 scales in quant_matmul's serving
  layout, as the loader holds an export on the device (6- and 4-bit codes sit in int8 there: the packing is for
  disk; rows padded to whole groups, columns to 128), the rest bfloat16;
* decode caches for `batch` sequences of `context` tokens, in the model's compute dtype;
* two programs: the prefill of a `context`-token prompt and one decode step, caches donated, both through the
  quantized forward (jaxeff/models/flexq_forward.py: the Pallas quant_matmul on GPU/TPU).
Peak = arguments + outputs - donated + temporaries (XLA's memory analysis). A decode step reads every weight and
the whole cache at least once, so (weights + caches) / HBM bandwidth bounds its time from below.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxeff.artifacts.packed_flexq import activation_bits_of, flexq_record
from jaxeff.config import ConfigError
from jaxeff.models.decoding import decode_caches
from jaxeff.models.flexq import DEFAULT_A8_LAYERS, SCHEMES, input_axes, quantized_names
from jaxeff.models.flexq_forward import CodedServing
from jaxeff.models.params import abstract_params
from jaxeff.parallel.hardware import HEADROOM, CompileFailed, Target, compile_only_devices, get_target
from pallas_kernels.quant_matmul import serving_shapes

BASELINE = "bf16"


@dataclasses.dataclass
class ProgramMemory:
    """XLA's memory analysis of one compiled program, bytes."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass
class ServePlan:
    scheme: str  # "bf16" or a FlexQ scheme
    target: Target
    batch: int
    context: int
    weight_bytes: dict[str, int]  # "codes", "scales", "float"
    cache_bytes: int
    prefill: ProgramMemory
    decode: ProgramMemory
    compile_s: float

    @property
    def weights_total(self) -> int:
        return sum(self.weight_bytes.values())

    @property
    def peak_bytes(self) -> int:
        return max(self.prefill.peak_bytes, self.decode.peak_bytes)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= HEADROOM * self.target.chip.hbm_bytes

    @property
    def decode_floor_s(self) -> float:
        """The memory-bound floor of one decode step: every weight and cache byte read once."""
        return (self.weights_total + self.cache_bytes) / self.target.chip.hbm_bandwidth

    def summary(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "target": self.target.name, "batch": self.batch, "context": self.context,
                "weight_bytes": self.weights_total, "cache_bytes": self.cache_bytes,
                "prefill_peak_bytes": self.prefill.peak_bytes, "decode_peak_bytes": self.decode.peak_bytes,
                "fits": self.fits, "decode_floor_s": round(self.decode_floor_s, 6),
                "compile_s": round(self.compile_s, 2)}


def serving_params(abstract_params, scheme: str, group_size: int, a8_layers: list[str], d_model: int):
    """(the params tree `jaxeff generate` holds for a model served in `scheme`, {coded kernel: activation bits}):
    quantized kernels as {"codes": int8, "scales": float32} in the serving layout, every other float leaf bf16."""
    shapes = {_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract_params)}
    names = [] if scheme == BASELINE else quantized_names(shapes)
    n_in = {n: input_axes(shapes[n], d_model) for n in names}

    def one(path, a):
        name = _name(path)
        if name not in n_in:
            return jax.ShapeDtypeStruct(a.shape, jnp.bfloat16 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype)
        codes, scales = serving_shapes(math.prod(a.shape[:n_in[name]]), math.prod(a.shape[n_in[name]:]), group_size)
        return {"codes": jax.ShapeDtypeStruct(codes, jnp.int8), "scales": jax.ShapeDtypeStruct(scales, jnp.float32)}

    params = jax.tree_util.tree_map_with_path(one, abstract_params)
    if scheme == BASELINE:
        return params, {}
    return params, activation_bits_of(flexq_record(n_in, SCHEMES[scheme], group_size, a8_layers))


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _weight_bytes(params) -> dict[str, int]:
    out = {"codes": 0, "scales": 0, "float": 0}
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        last = _name(path).rsplit("/", 1)[-1]
        out[last if last in ("codes", "scales") else "float"] += a.size * a.dtype.itemsize
    return out


def _nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _compile(fn, args, device, donate: int) -> ProgramMemory:
    sharding = jax.sharding.SingleDeviceSharding(device)
    placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    try:
        compiled = jax.jit(fn, donate_argnums=donate).trace(*placed).lower().compile()
    except jax.errors.JaxRuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CompileFailed(f"the serving program does not compile for {device.platform}: {first}") from None
    m = compiled.memory_analysis()
    return ProgramMemory(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                         m.temp_size_in_bytes)


def check_serve_args(cfg, scheme: str, batch: int, context: int, group_size: int) -> None:
    if cfg.task != "lm":
        raise ConfigError(f"--serve plans language-model serving (task: lm); this config's task is {cfg.task!r}")
    if scheme != BASELINE and scheme not in SCHEMES:
        raise ConfigError(f"--serve {scheme!r}: pick {BASELINE} or a quantization scheme: {', '.join(SCHEMES)}")
    if batch < 1 or context < 2:
        raise ConfigError(f"--batch {batch} --context {context}: need at least 1 sequence of at least 2 tokens")
    if group_size < 1:
        raise ConfigError(f"--group-size {group_size}: must be a positive number of inputs per scale (FlexQ: 128)")


def make_serve_plan(cfg, target_name: str, scheme: str, *, batch: int = 1, context: int = 4096,
                    group_size: int = 128, a8_layers: list[str] | None = None) -> ServePlan:
    """Compile `cfg`'s model as `jaxeff generate` serves it in `scheme` on one chip of `target_name`."""
    from jaxeff.tasks import build_task

    check_serve_args(cfg, scheme, batch, context, group_size)
    target = get_target(target_name)
    device = compile_only_devices(target)[0]  # serving one model on one chip, whatever the slice
    task = build_task(cfg, device.platform, with_data=False)
    model = task.build_inference_model(cfg, task.meta, device.platform)
    abstract = abstract_params(model, task.init_input, jax.sharding.SingleDeviceSharding(device))
    params, bits_of = serving_params(abstract, scheme, group_size,
                                     DEFAULT_A8_LAYERS if a8_layers is None else a8_layers, cfg.model.d_model)
    served = CodedServing(model, bits_of, group_size) if bits_of else model
    caches = jax.eval_shape(lambda p: decode_caches(model, p, batch, context), params)

    def forward(params, tokens_BS, positions_BS, caches):
        logits_BSV, caches, _ = served.apply({"params": params}, tokens_BS, positions_BS, caches)
        return logits_BSV[:, -1], caches

    start = time.perf_counter()
    prompt = jax.ShapeDtypeStruct((batch, context), jnp.int32)
    prefill = _compile(forward, (params, prompt, prompt, caches), device, donate=3)
    one = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    decode = _compile(forward, (params, one, one, caches), device, donate=3)
    return ServePlan(scheme, target, batch, context, _weight_bytes(params), _nbytes(caches), prefill, decode,
                     time.perf_counter() - start)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_serve_plans(plans: list[ServePlan], config_name: str) -> list[str]:
    """A table with one column per scheme (the baseline first), then one JSON line per plan."""
    first, chip = plans[0], plans[0].target.chip
    rows = [("weights", lambda p: _gib(p.weights_total)),
            ("  of which int8 codes / float32 scales", lambda p: (f"{_gib(p.weight_bytes['codes'])} / "
                                                                   f"{_gib(p.weight_bytes['scales'])}")),
            (f"decode caches ({first.batch} x {first.context} tokens)", lambda p: _gib(p.cache_bytes)),
            ("prefill: temporaries / peak", lambda p: f"{_gib(p.prefill.temp_bytes)} / {_gib(p.prefill.peak_bytes)}"),
            ("decode step: temporaries / peak", lambda p: f"{_gib(p.decode.temp_bytes)} / {_gib(p.decode.peak_bytes)}"),
            (f"fits (peak <= {HEADROOM:.0%} of {_gib(chip.hbm_bytes)})", lambda p: "yes" if p.fits else "NO"),
            (f"decode step floor at {chip.hbm_bandwidth / 1e12:.2f} TB/s",
             lambda p: f"{p.decode_floor_s * 1e3:.3g} ms ({first.batch / p.decode_floor_s:,.0f} tokens/s)")]
    lines = [f"serve plan: {config_name} on one {chip.name} ({first.target.name}), batch {first.batch}, context "
             f"{first.context} tokens; compiled in {sum(p.compile_s for p in plans):.1f} s",
             "| | " + " | ".join(p.scheme for p in plans) + " |", "|---|" + "---|" * len(plans)]
    lines += ["| " + label + " | " + " | ".join(fmt(p) for p in plans) + " |" for label, fmt in rows]
    return lines + [json.dumps(p.summary()) for p in plans]


__all__ = ["BASELINE", "ServePlan", "format_serve_plans", "make_serve_plan", "serving_params"]
