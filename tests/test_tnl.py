"""TransNormerLLM model pieces: decay schedule, LRPE-d, SRMSNorm/SGLU blocks, decoding, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import full_and_stepped_logits, tiny_config
from jaxeff.config import ConfigError, LightningConfig, ModelConfig, load_config, validate
from jaxeff.models.decoding import generate_ids
from jaxeff.layers.lightning import alibi_slopes, decay_rates, lrpe, lrpe_theta_init
from jaxeff.models.lm import build_model
from jaxeff.train import train


def tnl_config(impl: str = "auto", **kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=3, n_heads=4, mlp_dim=48, mixer_pattern=["lightning"],
                channel_mixer_pattern=["sglu"], norm="srms", scale_embeddings=True, compute_dtype="float32",
                lightning=LightningConfig(impl=impl, block_size=4, lrpe_layers=[0]))
    base.update(kw)
    return ModelConfig(**base)


def test_code_convention_decays_match_released_values():
    lam = lambda layer: np.exp(-decay_rates(8, 24, layer, "code"))
    np.testing.assert_allclose([lam(0)[0], lam(12)[0], lam(23)[0]], [0.606528, 0.787308, 0.999995], atol=1e-6)
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    # H=32: the first slope is 2^-0.25, the last 2^-8.
    np.testing.assert_allclose(alibi_slopes(32)[[0, -1]], [2 ** -0.25, 2 ** -8])


def test_alibi_slopes_for_a_head_count_that_is_not_a_power_of_two():
    # 6 heads: the 4 slopes of H=4, then every other slope of H=8, truncated to 2.
    np.testing.assert_allclose(alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_paper_convention_decays():
    rates = decay_rates(8, 24, 6, "paper")
    np.testing.assert_allclose(rates, 8 * np.arange(1, 9) / 8 * (1 - 6 / 24))
    assert (rates > 0).all() and np.all(np.diff(rates) > 0)


def test_lrpe_scores_depend_only_on_relative_position():
    key_q, key_k = jax.random.split(jax.random.key(0))
    q = jax.random.normal(key_q, (1, 6, 2, 8))
    k = jax.random.normal(key_k, (1, 6, 2, 8))
    theta = lrpe_theta_init(None, (2, 8))
    pos = jnp.arange(6)[None]

    def scores(offset):
        return jnp.einsum("bthd,bshd->bhts", lrpe(q, pos + offset, theta), lrpe(k, pos + offset, theta))

    np.testing.assert_allclose(scores(0), scores(1000), rtol=2e-4, atol=2e-4)
    direct = jnp.einsum("bthd,bshd,hd->bhts", q, k, jnp.ones((2, 8)))  # at t == s the phases cancel
    np.testing.assert_allclose(jnp.diagonal(scores(0), axis1=2, axis2=3), jnp.diagonal(direct, axis1=2, axis2=3),
                               rtol=1e-5)
    assert not np.allclose(scores(0), direct, atol=1e-3)  # but not elsewhere: the phases matter


@pytest.mark.parametrize("prompt", [5, 8])
def test_prefill_then_step_decoding_matches_the_full_forward(prompt):
    full, stepped, caches = full_and_stepped_logits(tnl_config(), prompt)
    assert caches[0]["state"].shape == (2, 4, 16, 8) and caches[1]["state"].shape == (2, 4, 8, 8)  # LRPE doubles d_k
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_of_tnl_equals_full_forward_argmax():
    cfg = tnl_config(init_std=0.5)
    model = build_model(cfg, 259, platform="cpu")
    params = nn.meta.unbox(model.init(jax.random.key(2), jnp.zeros((1, 4), jnp.int32)))["params"]
    prompt = [257, 10, 20, 30, 40, 50]
    generated = generate_ids(model, params, prompt, 5, temperature=0.0, vocab_size=259)
    seq, apply = list(prompt), jax.jit(model.apply)
    for _ in range(5):
        logits, _, _ = apply({"params": params}, jnp.asarray([seq]))
        seq.append(int(jnp.argmax(logits[0, -1, :259])))
    assert generated == seq[len(prompt):]


def test_model_gradients_agree_between_reference_and_chunked_impls():
    tokens = jax.random.randint(jax.random.key(3), (2, 11), 0, 259)
    losses, grads = [], []
    for impl in ("reference", "chunked"):
        model = build_model(tnl_config(impl=impl), 259, platform="cpu")
        params = nn.meta.unbox(model.init(jax.random.key(4), tokens))["params"]
        loss = lambda p: jnp.mean(model.apply({"params": p}, tokens)[0] ** 2)
        value, grad = jax.jit(jax.value_and_grad(loss))(params)
        losses.append(value)
        grads.append(grad)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads[0], grads[1])


def test_lrpe_layer_out_of_range_is_a_config_error_only_when_lightning_is_used():
    with pytest.raises(ConfigError, match=r"model.lightning.lrpe_layers=\[7\]: layers \[7\] are outside 0..3"):
        validate(load_config(None, ["model.lightning.lrpe_layers=[7]", "model.mixer_pattern=[attention, lightning]"]), 1)
    validate(load_config(None, ["model.lightning.lrpe_layers=[7]", "model.mixer_pattern=[attention]"]), 1)


def test_tnl_trains_and_generates(tmp_path):
    cfg = tiny_config(**{"model.mixer_pattern": "[lightning]", "model.channel_mixer_pattern": "[sglu]",
                         "model.norm": "srms", "model.scale_embeddings": True, "model.lightning.block_size": 16,
                         "train.steps": 30, "train.eval_every": 15, "train.warmup_steps": 5, "mesh.data": 2,
                         "sample.max_new_tokens": 10})
    result = train(cfg, tmp_path)
    assert np.mean([result.losses[s] for s in range(26, 31)]) < result.losses[1] - 1.5
    assert result.sample.startswith("def ") and len(result.sample) > 4
