"""Mixture of experts: routing rules, losses, capacity dropping, dropless, expert parallelism on 8 CPU devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.config import ConfigError, check_consistency, load_config
from jaxeff.layers.moe import (MoE, capacity, dispatch_slots, expert_layer, load_balance_loss, route,
                               router_z_loss)
from jaxeff.parallel.mesh import build_mesh
from jaxeff.parallel.sharding import BATCH_AXES


def moe_config(**extra):
    base = {"model.d_model": 32, "model.n_layers": 2, "model.mlp_dim": 48, "model.channel_mixer_pattern": "[moe]",
            "model.moe.n_experts": 8, "model.moe.top_k": 2}
    base.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


# ---------------------------------------------------------------------------------------------- routing rules


def test_capacity_rule_on_a_hand_built_routing():
    # 5 tokens, top-2 over 3 experts, 2 slots per expert. Order: all first choices (tokens 0..4), then seconds.
    experts = jnp.array([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1]])
    slot, kept = dispatch_slots(experts, 3, 2)
    # first choices: e0 <- t0 (pos 0), t1 (1), t2 (2: dropped); e1 <- t3 (0); e2 <- t4 (0)
    # second choices: e1 <- t0 (1), t2 (2: dropped), t4 (3: dropped); e2 <- t1 (1); e0 <- t3 (3: dropped)
    expected_kept = np.array([[1, 1], [1, 1], [0, 0], [1, 0], [1, 0]], bool)
    np.testing.assert_array_equal(kept, expected_kept)
    expected_slot = np.array([[0, 3], [1, 5], [6, 6], [2, 6], [4, 6]])  # expert * 2 + position; 6 = dropped
    np.testing.assert_array_equal(slot, expected_slot)
    assert capacity(tokens=5, top_k=2, n_experts=3, factor=1.0) == 4  # ceil(10 / 3)


def test_route_and_losses_equal_their_formulas():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 6)).astype(np.float32) * 2
    experts, gates, probs = route(jnp.asarray(logits), 2, True)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.sort(experts, -1), np.sort(top, -1))
    g = np.take_along_axis(p, np.asarray(experts), -1)
    np.testing.assert_allclose(gates, g / g.sum(-1, keepdims=True), rtol=1e-5)
    f = np.bincount(np.asarray(experts).ravel(), minlength=6) / experts.size
    np.testing.assert_allclose(load_balance_loss(probs, experts), 6 * np.sum(f * p.mean(0)), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(router_z_loss(jnp.asarray(logits)), np.mean(lse**2), rtol=1e-5)
    # a bias changes the choice, not the gate values
    bias = np.zeros(6, np.float32)
    bias[5] = 10.0
    experts_b, gates_b, _ = route(jnp.asarray(logits), 2, False, jnp.asarray(bias))
    assert (np.asarray(experts_b) == 5).any(axis=-1).all()
    np.testing.assert_allclose(gates_b, np.take_along_axis(p, np.asarray(experts_b), -1), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- reference


def dense_loop(x_BSD, params, cfg):
    """Every expert on every token, weighted by the token's gates (nothing dropped): the ground truth."""
    sec = cfg.moe
    x = x_BSD.reshape(-1, x_BSD.shape[-1]).astype(jnp.float32)
    experts, gates, _ = route(x @ params["router"], sec.top_k, sec.normalize_top_k)
    return dense_experts(params, x, sec, lambda e: jnp.sum(jnp.where(experts == e, gates, 0.0), axis=-1)).reshape(
        x_BSD.shape)


def dense_experts(params, x_ND, sec, weight_of_expert):
    """Every expert on every token, expert e weighted by `weight_of_expert(e)` [N], with the structure's
    projections and (residual) its dense branch around it."""
    payload_NP = x_ND @ params["descend"]["kernel"] if sec.structure == "dcca" else x_ND
    y = jnp.zeros_like(payload_NP)
    for e in range(params["w_in"].shape[0]):
        y = y + weight_of_expert(e)[:, None] * (jax.nn.gelu(payload_NP @ params["w_in"][e]) @ params["w_out"][e])
    if sec.structure == "dcca":
        y = y @ params["ascend"]["kernel"]
    if sec.structure == "residual":
        dense = jax.nn.gelu(x_ND @ params["dense_in"]["kernel"]) @ params["dense_out"]["kernel"]
        mix = jax.nn.softmax(x_ND @ params["mix"]["kernel"], -1)
        y = mix[:, :1] * y + mix[:, 1:] * dense
    return y


def _layer_and_params(cfg, seed=0):
    layer = MoE(cfg.model, layer_index=0)
    x = jax.random.normal(jax.random.key(seed), (8, 6, cfg.model.d_model))
    params = jax.tree.map(lambda b: b, layer.init(jax.random.key(seed + 1), x)["params"])
    import flax.linen as nn

    return layer, nn.meta.unbox(params), x


@pytest.mark.parametrize("structure, mesh", [
    ("cdac", {"mesh.data": 2, "mesh.expert": 4}),
    ("dcca", {"mesh.data": 2, "mesh.expert": 4}),
    ("residual", {"mesh.data": 2, "mesh.expert": 4}),
    ("cdac", {"mesh.data": 2, "mesh.expert": 2, "mesh.tensor": 2}),
])
def test_expert_parallel_equals_the_dense_loop(structure, mesh):
    top_k = 1 if structure == "residual" else 2
    # capacity_factor = n_experts: C >= tokens * top_k, so nothing can be dropped
    cfg = moe_config(**{"model.moe.structure": structure, "model.moe.top_k": top_k, "model.moe.capacity_factor": 8.0,
                        **mesh})
    layer, params, x = _layer_and_params(cfg)
    ct = jax.random.normal(jax.random.key(9), x.shape)

    def loss_ep(params, x):
        y, aux = layer.apply({"params": params}, x)
        return jnp.sum(y * ct), aux

    def loss_ref(params, x):
        return jnp.sum(dense_loop(x, params, cfg.model) * ct)

    with jax.set_mesh(build_mesh(cfg)):
        (value, aux), grads = jax.jit(jax.value_and_grad(loss_ep, argnums=(0, 1), has_aux=True))(params, x)
    ref_value, ref_grads = jax.value_and_grad(loss_ref, argnums=(0, 1))(params, x)
    assert float(aux["aux/moe/layer0/dropped"]) == 0.0
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for (path, g), r in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh", [{"mesh.data": 2}, {"mesh.data": 2, "mesh.expert": 4},
                                  {"mesh.expert": 2, "mesh.tensor": 2, "mesh.data": 2}])
def test_dropless_equals_the_dense_loop(mesh):
    # with mesh.expert > 1 the token-choices travel by ragged all-to-all (emulated on CPU)
    cfg = moe_config(**{"model.moe.capacity_factor": "null", **mesh})
    layer, params, x = _layer_and_params(cfg, seed=3)
    with jax.set_mesh(build_mesh(cfg)):
        y, aux = jax.jit(lambda p, x: layer.apply({"params": p}, x))(params, x)
    np.testing.assert_allclose(y, dense_loop(x, params, cfg.model), rtol=1e-5, atol=1e-6)
    with jax.set_mesh(build_mesh(cfg)):
        g = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x)[0] ** 2)))(params)
    r = jax.grad(lambda p: jnp.sum(dense_loop(x, p, cfg.model) ** 2))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(r)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_tight_capacity_drops_exactly_what_the_rule_drops():
    cfg = moe_config(**{"model.moe.capacity_factor": 0.5})
    layer, params, x = _layer_and_params(cfg, seed=5)
    y, aux = layer.apply({"params": params}, x)  # one device: the rule applies to all 48 tokens at once
    tokens = x.reshape(-1, x.shape[-1])
    experts, gates, _ = route(tokens @ params["router"], 2, True)
    _, kept = dispatch_slots(experts, 8, capacity(48, 2, 8, 0.5))
    np.testing.assert_allclose(aux["aux/moe/layer0/dropped"], 1 - np.mean(kept), rtol=1e-6)
    expected = jnp.zeros_like(tokens)
    for e in range(8):
        weight = jnp.sum(jnp.where((experts == e) & kept, gates, 0.0), -1)
        expected += weight[:, None] * (jax.nn.gelu(tokens @ params["w_in"][e]) @ params["w_out"][e])
    np.testing.assert_allclose(y.reshape(tokens.shape), expected, rtol=1e-5, atol=1e-6)


def test_bias_balancing_evens_out_a_skewed_router():
    import optax

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(512, 8)).astype(np.float32) + np.linspace(0, 3, 8, dtype=np.float32))
    bias = jnp.zeros(8)
    tx = optax.adam(0.05)
    state = tx.init(bias)

    def push(bias):  # the zero-valued term the layer adds; its gradient is load - mean(load)
        experts, _, _ = route(logits, 2, True, bias)
        from jaxeff.layers.moe import expert_load

        load = expert_load(experts, 8)
        term = jnp.sum(bias * jax.lax.stop_gradient(load - jnp.mean(load)))
        return term - jax.lax.stop_gradient(term), load

    loads = []
    for _ in range(60):
        (_, load), grad = jax.value_and_grad(push, has_aux=True)(bias)
        updates, state = tx.update(grad, state)
        bias = optax.apply_updates(bias, updates)
        loads.append(float(jnp.max(load)) * 8)
    assert loads[0] > 2.0 and loads[-1] < 1.3 and min(loads[-10:]) < loads[0] / 1.6, loads


@pytest.mark.parametrize("overrides, message", [
    ({"model.moe.n_experts": "[4, 8, 8]"}, "has 3 entries but the model has 2 MoE layers"),
    ({"model.moe.top_k": 9}, "top_k=9 is larger than the 8 experts"),
    ({"model.moe.structure": "residual"}, "set model.moe.top_k=1"),
    ({"mesh.expert": 3, "model.moe.n_experts": 8}, "not divisible by mesh.expert=3"),
])
def test_moe_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        check_consistency(moe_config(**overrides))


def test_expert_count_is_checked_against_the_resolved_expert_axis():
    from jaxeff.config import validate

    cfg = moe_config(**{"mesh.data": 1, "mesh.expert": -1, "model.moe.n_experts": 6, "train.global_batch_size": 12})
    check_consistency(cfg)  # before the mesh is known, -1 says nothing
    validate(cfg, 3)  # 3 expert-parallel devices hold 2 experts each
    with pytest.raises(ConfigError, match=r"n_experts \[6\] not divisible by mesh.expert=4 \(resolved from -1\)"):
        validate(cfg, 4)


def test_expert_parallel_checkpoint_resumes_on_fewer_expert_devices(tmp_path):
    from helpers import tiny_overrides
    from jaxeff.train import train

    def cfg(steps, expert, **extra):
        over = tiny_overrides(**{"model.channel_mixer_pattern": "[swiglu, moe]", "model.moe.n_experts": 4,
                                 "model.moe.top_k": 2, "model.moe.capacity_factor": 4.0, "train.steps": steps,
                                 "checkpoint.every": 2, "train.eval_every": 100, "mesh.data": 1, "train.warmup_steps": 0,
                                 "train.min_lr_ratio": 1.0,  # a constant rate: train.steps may grow between runs
                                 "mesh.expert": expert, "checkpoint.async_save": False, **extra})
        return load_config(None, over)

    reference = train(cfg(6, 1), tmp_path / "one_device", console=False)  # capacity 4: nothing is ever dropped
    first = train(cfg(2, 4), tmp_path / "moved", console=False)
    second = train(cfg(4, 2), tmp_path / "moved", console=False)
    third = train(cfg(6, 1), tmp_path / "moved", console=False)
    losses = {**first.losses, **second.losses, **third.losses}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([losses[s] for s in range(1, 7)], [reference.losses[s] for s in range(1, 7)],
                               rtol=2e-5)
    for a, b in zip(jax.tree.leaves(third.params), jax.tree.leaves(reference.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)  # Adam magnifies reduction-order differences


def test_all_to_all_bytes_match_the_closed_form_and_dcca_is_r_times_cdac():
    import math

    from helpers import tiny_overrides
    from jaxeff.parallel.collectives import collective_stats
    from jaxeff.train.comm_report import compile_train_step

    def a2a(structure, ratio):
        over = tiny_overrides(**{"model.channel_mixer_pattern": "[swiglu, moe]", "model.moe.n_experts": 8,
                                 "model.moe.top_k": 2, "model.moe.structure": structure, "model.moe.ratio": ratio,
                                 "mesh.data": 2, "mesh.expert": 4})
        cfg = load_config(None, over)
        stats = collective_stats(compile_train_step(cfg, jax.devices()[:8]).compiled)
        m, t = cfg.model, cfg.train
        tokens = t.global_batch_size // 8 * cfg.data.seq_len  # per device
        slots = math.ceil(m.moe.capacity_factor * tokens * m.moe.top_k / m.moe.n_experts)
        width = m.moe.low_dim(m.d_model) if structure == "dcca" else m.d_model
        n_moe = m.n_layers // 2
        # dispatch + combine, forward and backward, float32 buffers [E, C, width]
        assert stats["all-to-all"]["bytes"] == n_moe * 4 * m.moe.n_experts * slots * width * 4, stats
        assert stats["all-to-all"]["count"] == n_moe * 4, stats
        # each device keeps its own quarter (ep = 4): BigMac's (ep - 1) / ep volume factor
        assert stats["all-to-all"]["bytes_off_device"] == stats["all-to-all"]["bytes"] * 3 // 4, stats
        return stats["all-to-all"]["bytes"]

    cdac = a2a("cdac", 0.25)
    assert a2a("dcca", 0.25) * 4 == cdac
    assert a2a("dcca", 0.5) * 2 == cdac


def test_active_parameters_and_flops_count_only_the_chosen_experts():
    import flax.linen as nn

    from jaxeff.layers.moe import moe_flops_per_token
    from jaxeff.models.lm import build_model, inactive_params

    cfg = moe_config(**{"model.moe.n_experts": "[4, 8]", "model.moe.structure": "dcca", "model.moe.ratio": 0.25})
    model = build_model(cfg.model, 259, "cpu")
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"])
    per_expert = {f"layer_{i}": params[f"layer_{i}"]["channel"]["w_in"].shape for i in range(2)}
    assert per_expert == {"layer_0": (4, 8, 32), "layer_1": (8, 8, 32)}  # pyramid; dcca: r h = 8 -> h = 32 -> 8
    unused = (4 - 2) * 2 * 8 * 32 + (8 - 2) * 2 * 8 * 32
    assert inactive_params(cfg.model) == unused  # summed over the layers' channel-mixer specs
    # forward FLOPs per token: router + top-2 experts (2 matmuls) + descend and ascend
    assert moe_flops_per_token(cfg.model, 1) == 2 * 32 * 8 + 2 * 2 * 2 * 8 * 32 + 2 * 2 * 32 * 8


@pytest.mark.parametrize("target", ["cuda", "tpu"])
def test_dropless_expert_parallel_lowers_to_ragged_all_to_all_for_accelerators(target):
    # XLA:CPU cannot compile the ragged collective (CPU runs emulate it); GPU and TPU programs must use it
    import flax.linen as nn

    cfg = moe_config(**{"model.moe.capacity_factor": "null", "mesh.data": 2, "mesh.expert": 4})
    layer = MoE(cfg.model, layer_index=0)
    params = nn.meta.unbox(jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((8, 6, 32))))["params"])
    x = jax.ShapeDtypeStruct((8, 6, 32), jnp.float32)

    def grads(p, x):
        return jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x)[0] ** 2))(p)

    with jax.set_mesh(build_mesh(cfg)):
        text = jax.jit(grads).trace(params, x).lower(lowering_platforms=(target,)).as_text()
    assert "ragged_all_to_all" in text


# ---------------------------------------------------------------------------------------------- one routing per layer


def _old_kept(experts_NA, n_experts, slots):
    """The capacity rule: per expert, the first `slots` token-choices in (choice rank, token) order."""
    n, a = experts_NA.shape
    choices = experts_NA.T.reshape(-1)
    onehot = jax.nn.one_hot(choices, n_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    return (position < slots).reshape(a, n).T


def two_routing_reference(params, x_BSD, cfg, shards=1, mistake=None):
    """The layer before routing once (`route` itself did not change, and is tested above): (y, aux) with a routing
    for the dispatch (each of `shards` devices applies
    the capacity rule to its own tokens) and a second routing of all tokens for the losses. The experts run densely
    (every expert on every token, weighted by its kept gates). `mistake` plants a bug, to show the check sees it."""
    sec = cfg.moe
    x_ND = x_BSD.reshape(-1, x_BSD.shape[-1]).astype(jnp.float32)
    logits_NE = x_ND @ params["router"]
    n_experts = logits_NE.shape[-1]
    bias_E = params.get("balance_bias")
    normalize = sec.normalize_top_k and mistake != "gates"
    # routing 1: dispatch
    experts_NA, gates_NA, _ = route(logits_NE, sec.top_k, normalize, bias_E)
    kept_NA = jnp.ones(experts_NA.shape, bool)
    if sec.capacity_factor is not None:
        local = x_ND.shape[0] // shards
        slots = max(1, math.ceil(sec.capacity_factor * local * sec.top_k / n_experts))
        kept_NA = jnp.concatenate([_old_kept(experts_NA[i * local:(i + 1) * local], n_experts, slots)
                                   for i in range(shards)])
    y = dense_experts(params, x_ND, sec, lambda e: jnp.sum(jnp.where((experts_NA == e) & kept_NA, gates_NA, 0.0),
                                                           axis=-1))
    # routing 2: the losses, from all tokens
    experts2_NA, _, probs_NE = route(logits_NE, sec.top_k, sec.normalize_top_k, bias_E)
    load_E = jnp.sum(jax.nn.one_hot(experts2_NA, n_experts), axis=(0, 1)) / experts2_NA.size
    tag = "moe/layer0"
    aux = {f"loss/{tag}/balance": sec.load_balance_weight * n_experts * jnp.sum(load_E * probs_NE.mean(0)),
           f"aux/{tag}/dropped": jnp.mean(~kept_NA), f"aux/{tag}/max_load": jnp.max(load_E) * n_experts,
           f"aux/{tag}/entropy": jnp.mean(-jnp.sum(probs_NE * jnp.log(jnp.maximum(probs_NE, 1e-30)), -1))}
    if mistake != "z":
        aux[f"loss/{tag}/z"] = sec.z_loss_weight * jnp.mean(jax.nn.logsumexp(logits_NE, -1) ** 2)
    if bias_E is not None:
        push = jnp.sum(bias_E * jax.lax.stop_gradient(load_E - jnp.mean(load_E)))
        aux[f"loss/{tag}/bias_balancing"] = push - jax.lax.stop_gradient(push)
    return y.reshape(x_BSD.shape), aux


def _routing_case(structure, capacity_factor, bias_balancing, mesh):
    """Layer, params (sharper router, random balancing bias), input, and `objective(fn)`: the value_and_grad of
    sum(y * ct) + the loss/ entries of fn's aux."""
    cfg = moe_config(**{"model.moe.structure": structure, "model.moe.top_k": 1 if structure == "residual" else 2,
                        "model.moe.capacity_factor": capacity_factor,
                        "model.moe.bias_balancing": str(bias_balancing).lower(),
                        "model.moe.load_balance_weight": 1.0, "model.moe.z_loss_weight": 0.1, **mesh})
    layer, params, x = _layer_and_params(cfg, seed=7)
    params = {**params, "router": params["router"] * 10}
    if bias_balancing:  # zeros at init would leave the choice untouched
        params["balance_bias"] = 0.05 * jax.random.normal(jax.random.key(11), params["balance_bias"].shape)
    ct = jax.random.normal(jax.random.key(12), x.shape)

    def objective(fn):
        def value(params, x):
            y, aux = fn(params, x)
            return jnp.sum(y * ct) + sum(v for k, v in aux.items() if k.startswith("loss/")), (y, aux)

        return jax.value_and_grad(value, argnums=(0, 1), has_aux=True)

    return cfg, layer, params, x, objective


def _assert_same_layer(got, want):
    """Output, every aux entry, the objective and the gradients (all params and the input) to ~1e-6."""
    (value, (y, aux)), grads = got
    (ref_value, (ref_y, ref_aux)), ref_grads = want
    np.testing.assert_allclose(y, ref_y, rtol=1e-6, atol=1e-6)
    assert sorted(aux) == sorted(ref_aux)
    for key in aux:
        np.testing.assert_allclose(aux[key], ref_aux[key], rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    ref_leaves = dict(jax.tree.leaves_with_path(ref_grads))
    assert len(ref_leaves) == len(jax.tree.leaves(grads))
    for path, g in jax.tree.leaves_with_path(grads):
        np.testing.assert_allclose(g, ref_leaves[path], rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("structure, capacity_factor, bias_balancing, mesh", [
    ("cdac", 0.5, False, {}),  # tight: token-choices are dropped
    ("cdac", 1.0, True, {}),
    ("dcca", 0.5, True, {}),
    ("residual", 1.0, True, {}),
    ("cdac", "null", True, {}),
    ("dcca", "null", False, {}),
    ("residual", "null", True, {}),
    ("cdac", 1.0, True, {"mesh.data": 2, "mesh.expert": 4}),  # capacity rule per device, all-to-all
    ("dcca", "null", True, {"mesh.data": 2, "mesh.expert": 4}),  # ragged all-to-all (emulated)
])
def test_one_routing_equals_the_old_two_routings(structure, capacity_factor, bias_balancing, mesh):
    cfg, layer, params, x, objective = _routing_case(structure, capacity_factor, bias_balancing, mesh)
    shards = 1
    if mesh:
        built = build_mesh(cfg)
        shards = math.prod(built.shape[a] for a in BATCH_AXES if a in built.shape)
        with jax.set_mesh(built):
            got = jax.jit(objective(lambda p, x: layer.apply({"params": p}, x)))(params, x)
    else:
        got = jax.jit(objective(lambda p, x: layer.apply({"params": p}, x)))(params, x)
    want = jax.jit(objective(lambda p, x: two_routing_reference(p, x, cfg.model, shards)))(params, x)
    if capacity_factor != "null" and capacity_factor < 1:
        assert float(want[0][1][1]["aux/moe/layer0/dropped"]) > 0.05
    _assert_same_layer(got, want)


@pytest.mark.parametrize("mistake", ["gates", "z"])
def test_the_routing_comparison_catches_a_wrong_gate_and_a_missing_loss(mistake):
    cfg, layer, params, x, objective = _routing_case("cdac", 1.0, True, {})
    got = jax.jit(objective(lambda p, x: layer.apply({"params": p}, x)))(params, x)
    wrong = jax.jit(objective(lambda p, x: two_routing_reference(p, x, cfg.model, mistake=mistake)))(params, x)
    with pytest.raises(AssertionError):
        _assert_same_layer(got, wrong)


def test_decoding_is_dropless_so_a_call_over_many_tokens_equals_one_token_calls():
    """With a capacity, which tokens an expert drops depends on the tokens sharing a call: a prefill or a speculative
    verify over k tokens would differ from k one-token calls. The model `jaxeff generate` builds routes every token."""
    from helpers import full_and_stepped_logits, tiny_config
    from jaxeff.models.lm import decoding_config
    from jaxeff.tasks.lm import LanguageModelTask

    cfg = tiny_config(**{"model.channel_mixer_pattern": "[moe]", "model.moe.n_experts": 4, "model.moe.top_k": 2,
                         "model.moe.capacity_factor": 0.25})
    full, stepped, _ = full_and_stepped_logits(cfg.model, prompt=2, seq=6)
    assert float(jnp.max(jnp.abs(full - stepped))) > 1e-3 * float(jnp.max(jnp.abs(full)))  # training: drops
    full, stepped, _ = full_and_stepped_logits(decoding_config(cfg.model), prompt=2, seq=6)
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), atol=1e-5)
    served = LanguageModelTask.build_inference_model(cfg, {"vocab_size": 259})
    assert served.cfg.moe.capacity_factor is None and cfg.model.moe.capacity_factor == 0.25
