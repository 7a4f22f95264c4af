"""The zeroth-order optimizer (jaxeff/train/zo.py): the estimator against its equations and in expectation, the
subspace projection, int8 storage of frozen matrices, memory of the compiled steps, CLI training and exact resume."""

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import run_jaxeff, tiny_config, tiny_overrides
from jaxeff.artifacts.load import load_trained
from jaxeff.config import ConfigError, load_config, validate
from jaxeff.parallel.report import tree_bytes_per_device
from jaxeff.train.comm_report import compile_train_step
from jaxeff.train.loop import train
from jaxeff.train.zo import (dequantize, dequantize_params, perturbation, project_off, quantize, subspace_basis,
                             zo_gradient)

# ----------------------------------------------------------------------------- the estimator


def _quadratic(d: int, seed: int):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(d, d)) / np.sqrt(d)
    a, b = m @ m.T + np.eye(d), rng.normal(size=d)
    theta = rng.normal(size=d)
    params = {"u": jnp.asarray(theta[:2], jnp.float32), "w": jnp.asarray(theta[2:], jnp.float32)}

    def loss(p):
        x = jnp.concatenate([p["u"], p["w"]])
        return 0.5 * x @ jnp.asarray(a, jnp.float32) @ x + jnp.asarray(b, jnp.float32) @ x

    return loss, params, a @ theta + b  # the true gradient


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in ("u", "w")])


def test_estimate_follows_its_equations_with_regenerated_perturbations():
    loss, params, _ = _quadratic(5, 0)
    key, n, eps, dim = jax.random.key(3), 3, 1e-3, 4
    g, diffs = jax.jit(lambda p: zo_gradient(loss, p, key, n, eps, dim=dim))(params)
    zs = [_flat(perturbation(key, i, params)) for i in range(n)]
    # Leaf j of z_i comes from fold_in(fold_in(key, i), j), leaves in tree order ("u" then "w").
    np.testing.assert_array_equal(zs[1][:2], np.asarray(jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(key, 1), 0), (2,), jnp.float32)))
    base = float(loss(params))
    want_diffs = [(float(loss(jax.tree.map(lambda p, z: p + eps * z, params, perturbation(key, i, params)))) - base)
                  / eps for i in range(n)]
    np.testing.assert_allclose(diffs, want_diffs, rtol=1e-5, atol=1e-5)
    want = sum(gi * z for gi, z in zip(np.asarray(diffs, np.float64), zs)) / (np.sqrt((dim + n - 1) / n) * n)
    np.testing.assert_allclose(_flat(g), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d,n", [(3, 1), (6, 2)])
def test_estimate_mean_is_the_gradient_over_its_normalisation(d, n):
    """E[g] = grad * sqrt(n / (d + n - 1)) (exact on a quadratic: the eps term has zero mean). 20000 independent
    estimates; the mean is compared per coordinate within 5 standard errors, and its component along the gradient
    separates the right constant from (d + n + 1), (d + n), no square root, and the wrong sign."""
    loss, params, grad = _quadratic(d, 1)
    m = 20000
    keys = jax.random.split(jax.random.key(7), m)
    gs = jax.jit(jax.vmap(lambda k: zo_gradient(loss, params, k, n, 1e-3)[0]))(keys)
    gs = np.concatenate([np.asarray(gs["u"], np.float64), np.asarray(gs["w"], np.float64)], axis=1)
    c = np.sqrt((d + n - 1) / n)
    mean, se = gs.mean(0), gs.std(0, ddof=1) / np.sqrt(m)
    assert np.all(np.abs(mean - grad / c) < 5 * se), (mean, grad / c, se)
    along = gs @ grad / (grad @ grad)  # estimates 1 / c
    est, err = along.mean(), along.std(ddof=1) / np.sqrt(m)
    assert abs(est - 1 / c) < 5 * err, (est, 1 / c, err)
    for wrong in (np.sqrt((d + n + 1) / n), np.sqrt((d + n) / n), (d + n - 1) / n, 1.0, -c):
        assert abs(est - 1 / wrong) > 5 * err, (wrong, est, err)


# ----------------------------------------------------------------------------- the subspace


def _snapshots(tau: int, d: int, amplitudes, seed: int = 0):
    """tau snapshots of a {"a": [5, 4], "b": [d - 20]} tree moving along orthonormal directions q_j with
    standard deviations `amplitudes` (plus a constant offset); returns (tree, Q [d, len(amplitudes)])."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, len(amplitudes))))
    coeff = rng.normal(size=(tau, len(amplitudes)))
    coeff, _ = np.linalg.qr(coeff - coeff.mean(0))  # centred, uncorrelated columns: the components are the q_j
    coeff = coeff * np.sqrt(tau) * np.asarray(amplitudes)
    x = rng.normal(size=d) + coeff @ q.T
    tree = {"a": jnp.asarray(x[:, :20].reshape(tau, 5, 4), jnp.float32), "b": jnp.asarray(x[:, 20:], jnp.float32)}
    return tree, q


def _as_vector(tree) -> np.ndarray:
    return np.concatenate([np.asarray(tree["a"], np.float64).reshape(-1), np.asarray(tree["b"], np.float64)])


def test_projection_removes_exactly_the_low_variance_directions():
    d, tau = 60, 32
    # Two directions carry almost all the variance (99.8%), three move a little: nu = 0.01 keeps the two and removes
    # the three; the other 55 directions carry none (the snapshots never moved along them) and stay.
    snaps, q = _snapshots(tau, d, [1.0, 0.6, 0.03, 0.03, 0.03])
    basis, removed, variances = jax.jit(lambda s: subspace_basis(s, 0.01))(snaps)
    assert int(removed) == 3
    np.testing.assert_allclose(np.asarray(variances)[:5] * (tau - 1) / tau, [1.0, 0.36, 9e-4, 9e-4, 9e-4], rtol=2e-3)
    assert np.all(np.asarray(variances)[5:] < 1e-6)  # float32 round-off: no direction (below 1e-6 of the largest)
    g = np.random.default_rng(5).normal(size=d)
    g_tree = {"a": jnp.asarray(g[:20].reshape(5, 4), jnp.float32), "b": jnp.asarray(g[20:], jnp.float32)}
    projected = _as_vector(jax.jit(project_off)(g_tree, basis))
    # Tolerance: the snapshots are float32 (offsets ~1 round to ~1e-7 against moves of 0.03), |g| ~ 8.
    small = q[:, 2:]
    np.testing.assert_allclose(projected, g - small @ (small.T @ g), atol=2e-4)
    assert np.abs(small.T @ projected).max() < 2e-4  # the low-variance directions are gone
    np.testing.assert_allclose(q[:, :2].T @ projected, q[:, :2].T @ g, atol=2e-4)  # the moving ones stay
    # nu = 0.3: the first component alone explains 1 / 1.36 = 74% > 70%, so the second goes too.
    basis, removed, _ = jax.jit(lambda s: subspace_basis(s, 0.3))(snaps)
    assert int(removed) == 4
    projected = _as_vector(project_off(g_tree, basis))
    np.testing.assert_allclose(projected, g - q[:, 1:] @ (q[:, 1:].T @ g), atol=2e-4)


# ----------------------------------------------------------------------------- int8 frozen matrices


@pytest.mark.parametrize("shape,axis", [((32, 4, 8), 2), ((50, 16), 0)])
def test_int8_dequantizes_within_half_a_step(shape, axis):
    w = jax.random.normal(jax.random.key(0), shape) * jnp.linspace(0.01, 3.0, shape[axis]).reshape(
        [-1 if a == axis else 1 for a in range(len(shape))])
    q, s = quantize(w, axis)
    assert q.dtype == jnp.int8 and int(jnp.abs(q.astype(jnp.int32)).max()) == 127
    assert s.shape == tuple(n if a == axis else 1 for a, n in enumerate(shape))
    err = jnp.abs(dequantize({"int8": q, "scale": s}) - w)
    assert bool(jnp.all(err <= s / 2 * (1 + 1e-6)))
    tree = {"x": {"int8": q, "scale": s}, "y": w}
    restored = dequantize_params(tree)
    assert restored["x"].shape == shape and restored["y"] is w


def _compiled_memory(**extra) -> dict[str, int]:
    """The figures of the run header ("per device: params, optimizer state, train step temporaries")."""
    cfg = tiny_config(**extra)
    step = compile_train_step(cfg, jax.devices()[:1], with_data=False)
    return {"params": tree_bytes_per_device(step.abstract["params"], step.shardings["params"]),
            "optimizer": tree_bytes_per_device(step.abstract["opt_state"], step.shardings["opt_state"]),
            "temporaries": step.compiled.memory_analysis().temp_size_in_bytes}


def test_frozen_int8_zo_step_needs_less_memory_than_backprop():
    backprop = _compiled_memory()
    zo_float = _compiled_memory(**{"train.optimizer": "zo", "train.zo.trainable": "embeddings"})
    zo_int8 = _compiled_memory(**{"train.optimizer": "zo", "train.zo.trainable": "embeddings",
                                  "train.zo.frozen_int8": True})
    assert sum(zo_int8.values()) < sum(backprop.values()), (zo_int8, backprop)
    assert zo_int8["temporaries"] < backprop["temporaries"]
    assert zo_int8["optimizer"] < backprop["optimizer"] / 2  # moments of the embedding table only
    # The frozen matrices as int8 (+ a float32 scale per channel): their bytes shrink about 4x.
    embedding = 384 * 32 * 4
    assert zo_int8["params"] - embedding < (zo_float["params"] - embedding) / 3, (zo_int8, zo_float)


# ----------------------------------------------------------------------------- training, errors, resume


def test_cli_training_with_zo_lowers_the_loss(tmp_path):
    proc = run_jaxeff("train", "--config", "configs/debug.yaml", "--workdir", str(tmp_path), *tiny_overrides(**{
        "train.optimizer": "zo", "train.zo.probes": 8, "train.learning_rate": 1e-2, "train.steps": 30,
        "train.eval_every": 10, "train.eval_batches": 2, "checkpoint.every": 30}), timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    evals = {int(s): float(v) for s, v in re.findall(r"step (\d+): eval loss ([\d.]+)", proc.stdout)}
    assert set(evals) == {10, 20, 30}, proc.stdout
    assert evals[30] < evals[10] - 0.1, evals
    assert "jaxeff: done, step 30" in proc.stdout


@pytest.mark.parametrize("override,message", [
    ({"train.microbatches": 2}, "set train.microbatches=1"),
    ({"train.zo.trainable": "lora"}, "train.zo.trainable=lora needs LoRA adapters: set train.lora.rank"),
    ({"train.qat.kind": "ternary"}, "does not combine with train.qat.kind='ternary'"),
    ({"train.sst.rank": 4}, "does not combine with train.sst.rank=4"),
])
def test_unsupported_combinations_are_one_line_errors(override, message):
    cfg = tiny_config(**{"train.optimizer": "zo", **override})
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1)


def test_a_pattern_that_selects_nothing_names_the_parameters():
    cfg = tiny_config(**{"train.optimizer": "zo", "train.zo.trainable": "no_such_layer"})
    with pytest.raises(ConfigError, match="selects no parameter; this model's parameters are embed/embedding"):
        compile_train_step(cfg, jax.devices()[:1], with_data=False)
    cfg = tiny_config(**{"train.optimizer": "zo", "train.zo.frozen_int8": True})  # trainable: all
    with pytest.raises(ConfigError, match="leaves no frozen matrix to store in int8"):
        compile_train_step(cfg, jax.devices()[:1], with_data=False)
    with pytest.raises(ConfigError, match="neither one of all, embeddings, lora nor a valid regular expression"):
        load_config(None, tiny_overrides(**{"train.zo.trainable": "(unclosed"}))


def _checkpoint(step_dir):
    return {item: ocp.PyTreeCheckpointer().restore(str(step_dir / item)) for item in ("params", "train_state")}


def test_resume_is_bitwise_with_int8_weights_subspace_and_a_sharded_state(tmp_path):
    """6 steps straight vs 3 + 3 from the checkpoint (fsdp=2: parameters, int8 codes, scales, moments and snapshots
    sharded); the PCA after step 4 uses snapshots 1-3 restored from the checkpoint, steps 5 and 6 project with it."""
    overrides = {"train.optimizer": "zo", "train.zo.trainable": "embedding|layer_1/mixer/q", "train.zo.probes": 3,
                 "train.zo.frozen_int8": True, "train.zo.subspace_every": 4, "train.zo.variance_threshold": 0.5,
                 "train.steps": 6, "train.warmup_steps": 1, "checkpoint.every": 3, "train.eval_every": 6,
                 "mesh.fsdp": 2, "train.learning_rate": 1e-2}
    straight = train(tiny_config(**overrides), tmp_path / "straight", console=False)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "6")
    shutil.rmtree(resumed_dir / "tb")
    resumed = train(tiny_config(**overrides), resumed_dir, console=False)
    assert resumed.final_step == straight.final_step == 6
    a, b = _checkpoint(tmp_path / "straight" / "checkpoints" / "6"), _checkpoint(resumed_dir / "checkpoints" / "6")
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
    zo = a["train_state"]["opt_state"]["zo"]
    assert int(zo["removed"]) > 0  # the projection was active in the resumed steps
    assert a["params"]["layer_0"]["mixer"]["q"]["kernel"]["int8"].dtype == np.int8
    for k in (4, 5, 6):
        assert straight.losses[k] == resumed.losses[k]
    # The shared loader (export, generate, init_from) restores the int8 layout and hands out the float model.
    loaded = load_trained(tmp_path / "straight")
    q_kernel = a["params"]["layer_0"]["mixer"]["q"]["kernel"]
    np.testing.assert_array_equal(np.asarray(loaded.params["layer_0"]["mixer"]["q"]["kernel"]),
                                  np.asarray(dequantize({k: jnp.asarray(v) for k, v in q_kernel.items()})))
    np.testing.assert_array_equal(np.asarray(loaded.params["embed"]["embedding"]), a["params"]["embed"]["embedding"])
