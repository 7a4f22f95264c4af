"""`jaxeff plan --serve`: serving memory compiled for an H100 this host lacks. The params it plans are the tree the
loader holds for a real quantized export; its byte counts are checked by hand; bad arguments are one line."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from helpers import assert_user_error, run_jaxeff, tiny_config
from jaxeff.artifacts.packed_flexq import activation_bits_of, pack_flexq, unpack_flexq
from jaxeff.config import ConfigError
from jaxeff.infer.serve_plan import format_serve_plans, make_serve_plan, serving_params
from jaxeff.models.flexq import DEFAULT_A8_LAYERS, SCHEMES
from jaxeff.models.lm import init_caches
from jaxeff.tasks import build_task

G = 32


def _abstract_and_real(cfg):
    task = build_task(cfg, with_data=False)
    x = jnp.zeros(task.init_input.shape, task.init_input.dtype)
    params = nn.meta.unbox(task.model.init(jax.random.key(0), x)["params"])
    return jax.eval_shape(lambda: params), jax.device_get(params)


def test_planned_params_are_the_tree_the_loader_holds_for_a_quantized_export(scheme="w6a6"):
    cfg = tiny_config(**{"model.mlp_dim": 80})  # 80: a ragged last group of the down projection
    abstract, params = _abstract_and_real(cfg)
    packed, record = pack_flexq(params, SCHEMES[scheme], G, DEFAULT_A8_LAYERS, cfg.model.d_model)
    held = unpack_flexq(packed, abstract, record, dequantize=False)  # what `jaxeff generate` serves from
    planned, bits_of = serving_params(abstract, scheme, G, DEFAULT_A8_LAYERS, cfg.model.d_model)
    assert jax.tree.structure(planned) == jax.tree.structure(held)
    for (path, p), h in zip(jax.tree_util.tree_leaves_with_path(planned), jax.tree.leaves(held)):
        coded = path[-1].key in ("codes", "scales")  # int8 codes and float32 scales as held; the rest in bf16
        assert p.shape == h.shape and p.dtype == (h.dtype if coded else jnp.bfloat16), path
    assert bits_of == activation_bits_of(record) and len(bits_of) == 2 * (4 + 3)  # q k v o + up gate down, 2 layers


def test_a_w6a8_serve_plan_for_an_h100_counts_its_bytes_by_hand():
    cfg = tiny_config()
    abstract, _ = _abstract_and_real(cfg)
    plans = [make_serve_plan(cfg, "h100x1", s, batch=2, context=64, group_size=G) for s in ("bf16", "w6a8")]
    bf16, w6 = plans
    names = {jax.tree_util.keystr(p, simple=True, separator="/"): a
             for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
    coded = set(serving_params(abstract, "w6a8", G, [], cfg.model.d_model)[1])
    d = cfg.model.d_model
    mlp = cfg.model.mlp_dim  # the down projection contracts mlp_dim; the others d_model (or H K = d_model)
    io = {n: (i, math.prod(names[n].shape) // i) for n in coded for i in [mlp if n.endswith("down/kernel") else d]}
    padded = {n: (-(-i // G) * G, -(-o // 128) * 128) for n, (i, o) in io.items()}  # the serving layout
    assert w6.weight_bytes["codes"] == sum(i * o for i, o in padded.values())  # one int8 per weight on the device
    assert w6.weight_bytes["scales"] == 4 * sum(i // G * o for i, o in padded.values())
    rest = sum(a.size for n, a in names.items() if n not in coded)
    assert w6.weight_bytes["float"] == 2 * rest and bf16.weights_total == 2 * sum(a.size for a in names.values())
    caches = jax.eval_shape(lambda: init_caches(cfg.model, 2, 64, jnp.bfloat16))
    assert w6.cache_bytes == bf16.cache_bytes == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(caches))
    for plan in plans:
        for program in (plan.prefill, plan.decode):
            assert program.argument_bytes >= plan.weights_total + plan.cache_bytes
            assert program.alias_bytes >= plan.cache_bytes  # the caches are donated
        assert plan.fits and plan.decode_floor_s == pytest.approx(
            (plan.weights_total + plan.cache_bytes) / 3.35e12)
    lines = format_serve_plans(plans, "tiny")
    assert lines[1] == "| | bf16 | w6a8 |" and json.loads(lines[-1])["scheme"] == "w6a8"


def test_bad_serving_arguments_are_one_line():
    cfg = tiny_config()
    for scheme, batch, context, match in [("w5a5", 1, 64, "--serve 'w5a5'"), ("w6a8", 0, 64, "--batch 0"),
                                          ("w6a8", 1, 1, "--context 1")]:
        with pytest.raises(ConfigError, match=match):
            make_serve_plan(cfg, "h100x1", scheme, batch=batch, context=context)
    proc = run_jaxeff("plan", "--config", "configs/spacetime-co2.yaml", "--target", "h100x1", "--serve", "w6a8")
    assert_user_error(proc, "task: lm")
