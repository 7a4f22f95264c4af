"""Sparse Spectral Training: the update against a NumPy transcription of its equations (docs/methods/sst.md), frozen
unsampled vectors, r-column optimizer state, the sampler's distribution, and a CLI run (loss falls, resume is
bitwise, the export's logits are the factorised forward's)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rewind, run_jaxeff, tiny_config, tiny_overrides
from jaxeff.models.sst import factorise, factorised_abstract, is_factorised, materialise, materialise_matrix
from jaxeff.train.sst import SstModel, draw, sst, with_sst

B1, B2, EPS = 0.9, 0.999, 1e-8


def _node(rng, m, n):
    u, s, vt = np.linalg.svd(rng.normal(size=(m, n)), full_matrices=False)
    return {"U": jnp.asarray(u, jnp.float32), "s": jnp.asarray(s, jnp.float32), "V": jnp.asarray(vt.T, jnp.float32)}


def _sst_grads(node, g):
    """The gradients the parameterisation hands the optimizer for dL/dW = g."""
    _, vjp = jax.vjp(materialise_matrix, node)
    return vjp(jnp.asarray(g, jnp.float32))[0]


def test_gradients_are_the_enhanced_ones():
    rng = np.random.default_rng(0)
    node, g = _node(rng, 7, 5), rng.normal(size=(7, 5))
    got = _sst_grads(node, g)
    u, v = np.asarray(node["U"], np.float64), np.asarray(node["V"], np.float64)
    np.testing.assert_allclose(got["U"], g @ v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["V"], g.T @ u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["s"], np.einsum("mi,mn,ni->i", u, g, v), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(materialise_matrix(node), (u * np.asarray(node["s"])) @ v.T, rtol=1e-5, atol=1e-6)


def test_update_equals_the_equations_step_by_step():
    """Three steps on a 6 x 4 matrix, r = 2, fresh gradients each step, by hand in float64 NumPy."""
    rng = np.random.default_rng(1)
    m, n, r, lr = 6, 4, 2, 0.05
    params = {"w": _node(rng, m, n)}
    tx = sst(lr, rank=r, resample_every=2, svd_every=0, seed=3)
    state = tx.init(params)
    u, s, v = (np.asarray(params["w"][k], np.float64) for k in ("U", "s", "V"))
    mu_u = nu_u = np.zeros((m, r))
    mu_v = nu_v = np.zeros((n, r))
    for step in range(3):
        g = rng.normal(size=(m, n))
        grads = {"w": _sst_grads(params["w"], g)}
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, d: p + d, params, updates)
        idx = np.asarray(state.matrices[0]["idx"])  # this step's active pairs (drawn by the sampler)
        if step % 2 == 0:  # a new draw: moments restart
            mu_u, nu_u, mu_v, nu_v = np.zeros((m, r)), np.zeros((m, r)), np.zeros((n, r)), np.zeros((n, r))
        t = step % 2 + 1
        grad_s = np.einsum("mi,mn,ni->i", u, g, v)  # U_i^T G V_i
        gu, gv = g @ v[:, idx], g.T @ u[:, idx]  # G V_i, G^T U_i (no s_i)
        mu_u, nu_u = B1 * mu_u + (1 - B1) * gu, B2 * nu_u + (1 - B2) * gu ** 2
        mu_v, nu_v = B1 * mu_v + (1 - B1) * gv, B2 * nu_v + (1 - B2) * gv ** 2
        ua = u[:, idx] - lr * (mu_u / (1 - B1 ** t)) / (np.sqrt(nu_u / (1 - B2 ** t)) + EPS)
        va = v[:, idx] - lr * (mu_v / (1 - B1 ** t)) / (np.sqrt(nu_v / (1 - B2 ** t)) + EPS)
        u, v = u.copy(), v.copy()
        u[:, idx], v[:, idx] = ua / np.linalg.norm(ua, axis=0), va / np.linalg.norm(va, axis=0)
        s = np.maximum(s - lr * grad_s, 0)
        for key, want in (("U", u), ("s", s), ("V", v)):
            np.testing.assert_allclose(params["w"][key], want, rtol=2e-5, atol=2e-6, err_msg=f"{key} at step {step}")
        np.testing.assert_allclose(state.matrices[0]["mu_U"], mu_u, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(state.matrices[0]["nu_V"], nu_v, rtol=2e-5, atol=1e-9)


def test_unsampled_vectors_never_change_and_svd_restores_orthogonality():
    rng = np.random.default_rng(2)
    params = {"a": _node(rng, 8, 6), "b": _node(rng, 5, 9)}
    tx = sst(0.1, rank=2, resample_every=3, svd_every=0, seed=0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    seen = [set(), set()]
    for _ in range(12):
        grads = {k: _sst_grads(params[k], rng.normal(size=materialise_matrix(params[k]).shape)) for k in params}
        updates, state = update(grads, state, params)
        new = jax.tree.map(lambda p, d: p + d, params, updates)
        for j, k in enumerate(params):
            idx = set(np.asarray(state.matrices[j]["idx"]).tolist())
            seen[j] |= idx
            frozen = [i for i in range(params[k]["s"].shape[0]) if i not in idx]
            for f in ("U", "V"):
                assert np.array_equal(np.asarray(new[k][f])[:, frozen], np.asarray(params[k][f])[:, frozen])
                assert np.allclose(np.linalg.norm(np.asarray(new[k][f]), axis=0), 1, atol=1e-5)
        params = new
    assert all(len(x) > 2 for x in seen)  # the draws moved on
    # a re-orthogonalisation keeps W and makes U, V orthonormal again
    tx = sst(0.0, rank=2, resample_every=1, svd_every=1, seed=0)
    w_before = materialise(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    after = jax.tree.map(lambda p, d: p + d, params, updates)
    for k in params:
        np.testing.assert_allclose(materialise(after)[k], w_before[k], atol=2e-5)
        for f in ("U", "V"):
            x = np.asarray(after[k][f])
            np.testing.assert_allclose(x.T @ x, np.eye(x.shape[1]), atol=2e-5)


def test_optimizer_state_holds_r_columns_only():
    cfg = tiny_config(**{"train.sst.rank": 3})
    from jaxeff.models.lm import build_model
    model = build_model(cfg.model, 259, "cpu")
    params = factorise(nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"],
                       cfg.train.sst.layers, cfg.model.d_model)
    tx = with_sst(__import__("optax").adam(1e-3), cfg.train, lambda _: 1e-3)
    state = jax.eval_shape(tx.init, params)
    factorised = [x for x in jax.tree.leaves(params, is_leaf=is_factorised) if is_factorised(x)]
    assert len(factorised) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for node, st in zip(factorised, state.sst.matrices):
        m, n = node["U"].size // node["s"].size, node["V"].size // node["s"].size
        assert st["mu_U"].shape == st["nu_U"].shape == (m, 3) and st["mu_V"].shape == st["nu_V"].shape == (n, 3)
        assert st["idx"].shape == (3,)
    dense_leaves = jax.tree.leaves(state.dense)  # Adam's moments: the plain parameters only (embedding, norms)
    plain = sum(x.size for x in jax.tree.leaves(params)) - sum(x.size for node in factorised for x in node.values())
    assert sum(x.size for x in dense_leaves) == 2 * plain + 1  # mu, nu and a count


def test_sampler_follows_s():
    """One draw (r = 1) is index i with probability s_i / sum(s); r = 3 of 4 leaves out the smallest most often."""
    s = jnp.asarray([4.0, 3.0, 2.0, 1.0, 0.0])
    keys = jax.random.split(jax.random.key(0), 20000)
    first = np.asarray(jax.vmap(lambda k: draw(k, s, 1)[0])(keys))
    freq = np.bincount(first, minlength=5) / len(first)
    p = np.asarray(s) / float(s.sum())
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / len(first)) + 1e-9), freq
    three = np.asarray(jax.vmap(lambda k: draw(k, s, 3))(keys[:4000]))
    assert all(len(set(row)) == 3 and 4 not in row for row in three.tolist())  # distinct; s = 0 never drawn
    left_out = np.bincount([({0, 1, 2, 3} - set(row)).pop() for row in three.tolist()], minlength=4)
    assert left_out[3] > left_out[2] > left_out[1] > left_out[0]


SST = {"train.sst.rank": 4, "train.sst.resample_every": 3, "train.sst.svd_every": 6, "train.steps": 12,
       "checkpoint.every": 6, "train.eval_every": 6, "train.learning_rate": 0.01}


@pytest.fixture(scope="module")
def sst_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sst")
    proc = run_jaxeff("train", "--config", "configs/debug.yaml", "--workdir", str(workdir), *tiny_overrides(**SST),
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc.stdout


def test_cli_trains_and_resumes_bitwise(sst_run, tmp_path):
    workdir, out = sst_run
    from helpers import tb_losses
    losses = tb_losses(workdir)
    assert losses[12] < losses[1] - 0.3, losses
    resumed = rewind(workdir, tmp_path / "resumed", 6)
    proc = run_jaxeff("train", "--config", "configs/debug.yaml", "--workdir", str(resumed), *tiny_overrides(**SST),
                      timeout=300)
    assert proc.returncode == 0 and "resumed from checkpoint step 6" in proc.stdout, proc.stdout[-3000:] + proc.stderr
    import orbax.checkpoint as ocp
    trees = [{item: ocp.StandardCheckpointer().restore(d / "checkpoints" / "12" / item)  # factors, optimizer,
              for item in ("params", "train_state")} for d in (workdir, resumed)]  # sampler state, rng
    a, b = (jax.tree.leaves_with_path(t) for t in trees)
    assert len(a) == len(b) and any("'U'" in jax.tree_util.keystr(p) for p, _ in a)
    for (path, x), (_, y) in zip(a, b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def test_export_is_the_factorised_forward(sst_run, tmp_path):
    workdir, _ = sst_run
    out = tmp_path / "export"
    proc = run_jaxeff("export", "--workdir", str(workdir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from jaxeff.artifacts.checkpoint import CheckpointStore
    from jaxeff.artifacts.load import load_trained
    exported = load_trained(out)
    assert not any(is_factorised(x) for x in jax.tree.leaves(exported.params, is_leaf=is_factorised))
    cfg = tiny_config(**SST)
    from jaxeff.models.params import abstract_params
    abstract = factorised_abstract(abstract_params(exported.model, jax.ShapeDtypeStruct((1, 32), np.int32)),
                                   cfg.train.sst.layers, cfg.model.d_model)
    store = CheckpointStore(workdir / "checkpoints", read_only=True)
    factors = store.restore_params(12, abstract)
    store.close()
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 259)
    want, _, _ = SstModel(exported.model, cfg.train.sst.layers, cfg.model.d_model).apply({"params": factors}, tokens)
    got, _, _ = exported.model.apply({"params": exported.params}, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
