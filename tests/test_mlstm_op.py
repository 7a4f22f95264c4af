"""mLSTM op: reference = chunked = step loop = an independent NumPy oracle; gradients; states; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mlstm import mlstm, mlstm_step


def inputs(seed: int, *, b=2, s=37, h=2, dk=8, dv=12, i_offset=0.0, dtype=np.float32, with_state=False):
    """Fresh random inputs in the op's layout; forget pre-activations around 3 (as xLSTM's bias init)."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, b, s, h, dk)).astype(dtype)
    v = rng.standard_normal((b, s, h, dv)).astype(dtype)
    i = (rng.standard_normal((b, s, h)) + i_offset).astype(dtype)
    f = (rng.standard_normal((b, s, h)) + 3.0).astype(dtype)
    state = None
    if with_state:
        state = (0.5 * rng.standard_normal((b, h, dk, dv)).astype(dtype), 0.5 * rng.standard_normal((b, h, dk)).astype(dtype),
                 rng.standard_normal((b, h)).astype(dtype))
    return (q, k, v, i, f), state


def numpy_oracle(q, k, v, i, f, state=None, eps=1e-6):
    """The definition, token by token, in float64 NumPy (no code shared with the op)."""
    q, k, v, i, f = (np.asarray(x, np.float64) for x in (q, k, v, i, f))
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    if state is None:
        C, n, m = np.zeros((b, h, dk, dv)), np.zeros((b, h, dk)), np.zeros((b, h))
    else:
        C, n, m = (np.array(x, np.float64) for x in state)
    out = np.zeros((b, s, h, dv))
    for t in range(s):
        logf = -np.logaddexp(0.0, -f[:, t])  # log sigmoid
        m_new = np.maximum(logf + m, i[:, t])
        fa, ia = np.exp(logf + m - m_new), np.exp(i[:, t] - m_new)
        C = fa[..., None, None] * C + ia[..., None, None] * np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        n = fa[..., None] * n + ia[..., None] * k[:, t]
        qs = q[:, t] / np.sqrt(dk)
        num = np.einsum("bhk,bhkv->bhv", qs, C)
        den = np.maximum(np.abs(np.einsum("bhk,bhk->bh", qs, n)), np.exp(-m_new)) + eps
        out[:, t] = num / den[..., None]
        m = m_new
    return out, (C, n, m)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


@pytest.mark.parametrize("i_offset", [0.0, -5.0, -10.0])
@pytest.mark.parametrize("with_state", [False, True])
def test_all_forms_equal_the_numpy_oracle(i_offset, with_state):
    args, state = inputs(1, i_offset=i_offset, with_state=with_state)
    expected, (c_ref, n_ref, m_ref) = numpy_oracle(*args, state)
    for impl, chunk in (("reference", 64), ("chunked", 16), ("chunked", 64), ("auto", 16)):
        h, (c, n, m) = mlstm(*args, initial_state=state, return_final_state=True, chunk_size=chunk, impl=impl)
        assert h.dtype == jnp.float32 and h.shape == expected.shape
        assert rel_err(h, expected) < 2e-5, (impl, chunk, rel_err(h, expected))
        for got, want in ((c, c_ref), (n, n_ref), (m, m_ref)):
            assert rel_err(got, want) < 2e-5, (impl, chunk)


def test_float64_forms_agree_to_rounding():
    with jax.enable_x64(True):
        args, state = inputs(2, s=40, i_offset=-10.0, dtype=np.float64, with_state=True)
        expected, _ = numpy_oracle(*args, state)
        for impl in ("reference", "chunked"):
            h = mlstm(*args, initial_state=state, chunk_size=16, impl=impl)
            assert h.dtype == jnp.float64 and rel_err(h, expected) < 1e-12, impl


def test_step_loop_equals_the_sequence_and_continues_it():
    (q, k, v, i, f), _ = inputs(3, s=21)
    full, final = mlstm(q, k, v, i, f, return_final_state=True, impl="chunked", chunk_size=8)
    step = jax.jit(mlstm_step)
    state, outs = None, []
    for t in range(q.shape[1]):
        h, state = step(q[:, t], k[:, t], v[:, t], i[:, t], f[:, t], state)
        outs.append(h)
    assert rel_err(jnp.stack(outs, 1), full) < 1e-5
    for a, b in zip(state, final):
        assert rel_err(a, b) < 1e-5
    # prefill 13 tokens, then continue from the returned state: the same as the whole sequence
    _, mid = mlstm(q[:, :13], k[:, :13], v[:, :13], i[:, :13], f[:, :13], return_final_state=True, impl="chunked")
    rest = mlstm(q[:, 13:], k[:, 13:], v[:, 13:], i[:, 13:], f[:, 13:], initial_state=mid, impl="chunked")
    assert rel_err(rest, full[:, 13:]) < 1e-5


@pytest.mark.parametrize("i_offset", [0.0, -10.0])
def test_chunked_gradients_match_the_quadratic_oracle(i_offset):
    args, state = inputs(4, s=29, i_offset=i_offset, with_state=True)
    rng = np.random.default_rng(5)
    w_h = rng.standard_normal((2, 29, 2, 12)).astype(np.float32)
    w_c = rng.standard_normal((2, 2, 8, 12)).astype(np.float32)

    def loss(impl, q, k, v, i, f, c0, n0):
        h, (c, n, _) = mlstm(q, k, v, i, f, initial_state=(c0, n0, state[2]), return_final_state=True,
                             impl=impl, chunk_size=8)
        # a layer norm of h first, as the peers test: it removes the scale so every entry matters
        h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)
        return jnp.sum(h * w_h) + jnp.sum(c * w_c) + jnp.sum(n)

    grads = {impl: jax.grad(loss, argnums=tuple(range(1, 8)))(impl, *args, state[0], state[1])
             for impl in ("reference", "chunked")}
    names = ("q", "k", "v", "i", "f", "C0", "n0")
    for name, a, b in zip(names, grads["chunked"], grads["reference"]):
        tol = 1e-3 if name == "f" else 2e-4  # the forget-gate gradient sums many cancelling terms
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
        assert np.all(np.isfinite(np.asarray(a)))


def test_input_gate_shift_only_moves_the_floor():
    """With |n.q| far above exp(-m), adding c to every input gate changes h only at rounding level."""
    (q, k, v, i, f), _ = inputs(6, s=16)
    a = mlstm(q, k, v, i + 10.0, f, impl="chunked", eps=0.0)  # exp(-m) ~ 5e-5: the floor never binds
    b = mlstm(q, k, v, i + 14.0, f, impl="chunked", eps=0.0)
    assert rel_err(a, b) < 1e-4
    low = mlstm(q, k, v, i - 10.0, f, impl="chunked", eps=0.0)  # ... and at i - 10 it does: h shrinks
    assert np.max(np.abs(np.asarray(low))) < 0.5 * np.max(np.abs(np.asarray(a)))


@pytest.mark.parametrize("change, message", [
    (dict(k=np.zeros((2, 5, 2, 4))), r"k has shape \(2, 5, 2, 4\), expected \[batch, seq, heads, d_qk\]"),
    (dict(i_preact=np.zeros((2, 5))), r"i_preact has shape \(2, 5\), expected \[batch, seq, heads\]"),
    (dict(impl="fast"), r"unknown impl='fast'"),
    (dict(chunk_size=0), r"chunk_size must be a positive int"),
    (dict(initial_state=(np.zeros((2, 2, 8, 12)), np.zeros((2, 2, 8)), np.zeros((2,)))),
     r"initial_state m has shape \(2,\), expected \[2, 2\]"),
])
def test_bad_arguments_name_the_argument_and_the_expected_shape(change, message):
    (q, k, v, i, f), _ = inputs(7, s=5)
    kwargs = dict(q=q, k=k, v=v, i_preact=i, f_preact=f)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        mlstm(**kwargs)


def _assert_pallas_matches_reference(args, state, w, variant):
    """Value and gradients (q, k, v, gates, initial C and n) of the Pallas op against the reference, with an initial
    state and the final state in the loss."""

    def loss(impl, q, k, v, i, f, c0, n0):
        h, (c, n, _) = mlstm(q, k, v, i, f, initial_state=(c0, n0, state[2]), return_final_state=True, impl=impl,
                             chunk_size=16, pallas_variant=variant if impl == "pallas" else None)
        return jnp.sum(h * w) + jnp.sum(c) + jnp.sum(n)

    ref = jax.value_and_grad(loss, argnums=tuple(range(1, 8)))("reference", *args, state[0], state[1])
    pal = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(1, 8))), static_argnums=0)("pallas", *args,
                                                                                         state[0], state[1])
    assert abs(float(pal[0]) - float(ref[0])) < 1e-4 * abs(float(ref[0]))
    for name, a, b in zip(("q", "k", "v", "i", "f", "C0", "n0"), pal[1], ref[1]):
        assert rel_err(a, b) < (1e-3 if name == "f" else 2e-4), (name, rel_err(a, b))


@pytest.mark.parametrize("variant", ["triton", "tpu"])
def test_pallas_impl_through_the_op_matches_the_reference_forward_and_gradients(variant):
    args, state = inputs(8, s=23, i_offset=-5.0, with_state=True)
    w = np.random.default_rng(9).standard_normal((2, 23, 2, 12)).astype(np.float32)
    _assert_pallas_matches_reference(args, state, w, variant)


def test_pallas_impl_with_several_d_v_tiles_matches_the_reference():
    """d_v = 200 (padded to 256): the Triton body's state kernels and the d_q/d_k kernel's sum run over 4 d_v tiles
    of 64 by default (kernel._tiles)."""
    args, state = inputs(11, s=23, dv=200, i_offset=-5.0, with_state=True)
    w = np.random.default_rng(12).standard_normal((2, 23, 2, 200)).astype(np.float32)
    _assert_pallas_matches_reference(args, state, w, "triton")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dk, dv", [(8, 12), (256, 512)])  # small heads; xLSTM 7B's heads (kernels tile them)
@pytest.mark.parametrize("platform, marker", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
def test_auto_lowers_to_the_platform_kernels(platform, marker, dk, dv, dtype):
    sd = jax.ShapeDtypeStruct
    args = [sd((2, 40, 2, dk), dtype)] * 2 + [sd((2, 40, 2, dv), dtype)] + [sd((2, 40, 2), jnp.float32)] * 2
    loss = lambda q, k, v, i, f: jnp.sum(mlstm(q, k, v, i, f, chunk_size=16).astype(jnp.float32))  # noqa: E731
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    text = grad.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == 7  # forward: states, outputs; backward: states, prep, reverse states, dv, dq/dk


@pytest.mark.parametrize("platform, kernels", [("cuda", 0), ("tpu", 2)])
def test_auto_takes_the_chunked_form_only_for_d_qk_beyond_the_gpu_kernels(platform, kernels):
    """d_qk 1024 outgrows the Triton kernels' shared memory: "auto" lowers the chunked form for GPU; TPU keeps the
    kernels (forward: states, outputs)."""
    sd = jax.ShapeDtypeStruct
    args = [sd((1, 40, 1, 1024), jnp.bfloat16)] * 2 + [sd((1, 40, 1, 64), jnp.bfloat16)]
    args += [sd((1, 40, 1), jnp.float32)] * 2
    fwd = jax.jit(lambda q, k, v, i, f: mlstm(q, k, v, i, f, chunk_size=16))
    text = fwd.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count("tpu_custom_call") + text.count("__gpu$xla.gpu.triton") == kernels
