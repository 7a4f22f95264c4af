"""The companion SSM as an LM token mixer: decoding with the state = the full forward; it trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import full_and_stepped_logits, tiny_config
from jaxeff.config import CompanionConfig, ConfigError, ModelConfig, load_config, validate
from jaxeff.layers.companion import l1_normalise
from jaxeff.train import train


def companion_config(**kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, mlp_dim=64, mixer_pattern=["companion", "attention"],
                compute_dtype="float32", companion=CompanionConfig(state_dim=8, n_kernels=4))
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("prompt", [1, 6])
def test_prefill_then_step_decoding_matches_the_full_forward(prompt):
    full, stepped, caches = full_and_stepped_logits(companion_config(), prompt, seq=11)
    assert caches[0]["state"].shape == (2, 32, 8)
    np.testing.assert_allclose(stepped, full, rtol=1e-4, atol=1e-5)


def test_l1_normalisation_keeps_the_spectrum_in_the_unit_disc():
    a = l1_normalise(jax.random.normal(jax.random.key(2), (6, 8)) * 5.0)
    np.testing.assert_allclose(jnp.abs(a).sum(-1), 1.0, rtol=1e-6)
    for row in np.asarray(a):
        companion = np.eye(8, k=-1)
        companion[:, -1] = row
        assert np.max(np.abs(np.linalg.eigvals(companion))) <= 1.0 + 1e-6
    np.testing.assert_array_equal(l1_normalise(jnp.zeros((1, 4))), 0.0)  # a zero column stays zero, no NaN


def test_n_kernels_must_divide_the_width_when_the_mixer_is_used():
    with pytest.raises(ConfigError, match=r"model.companion.n_kernels=5 does not divide model.d_model=128"):
        validate(load_config(None, ["model.companion.n_kernels=5", "model.mixer_pattern=[companion]"]), 1)
    validate(load_config(None, ["model.companion.n_kernels=5"]), 1)


def test_a_companion_lm_trains(tmp_path):
    cfg = tiny_config(**{"model.mixer_pattern": "[companion, attention]", "model.companion.state_dim": 8,
                         "model.companion.n_kernels": 4, "train.steps": 30, "train.eval_every": 15,
                         "train.warmup_steps": 5, "mesh.data": 2})
    result = train(cfg, tmp_path)
    assert np.mean([result.losses[s] for s in range(26, 31)]) < result.losses[1] - 1.0
