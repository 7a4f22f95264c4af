"""xLSTM 7B model pieces: the 7B shape and init, soft caps, decoding with the recurrent state, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, full_and_stepped_logits, tiny_config
from jaxeff.config import ConfigError, ModelConfig, MlstmConfig, load_config, validate
from jaxeff.layers.mlstm import soft_cap
from jaxeff.models.lm import build_model, flops_per_token
from jaxeff.train import train
from jaxeff.models.params import count_params


def xlstm_config(impl: str = "chunked", **kw) -> ModelConfig:
    base = dict(d_model=64, n_layers=2, n_heads=2, mlp_dim=192, mixer_pattern=["mlstm"],
                channel_mixer_pattern=["swiglu"], tie_embeddings=False, logit_soft_cap=30.0, compute_dtype="float32",
                mlstm=MlstmConfig(impl=impl, chunk_size=4))
    base.update(kw)
    return ModelConfig(**base)


def init_params(cfg, seed=1, seq=8):
    model = build_model(cfg, 259, platform="cpu")
    return model, nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, seq), jnp.int32)))["params"]


def test_the_7b_config_has_the_published_parameter_count():
    cfg = load_config(REPO / "configs/xlstm-7b.yaml")
    model = build_model(cfg.model, 259)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    n = count_params(nn.meta.unbox(shapes))
    assert abs(n / 6.87e9 - 1) < 0.005, n
    layer = nn.meta.unbox(shapes)["layer_0"]["mixer"]
    assert layer["q"]["kernel"].shape == (4096, 8, 256) and layer["v"]["kernel"].shape == (4096, 8, 512)
    assert model.vocab_size == 50304


def test_the_7b_initialisation():
    cfg = xlstm_config(n_heads=4)
    _, params = init_params(cfg)
    mixer = params["layer_1"]["mixer"]
    np.testing.assert_array_equal(mixer["igate"]["bias"], np.full(4, -10.0, np.float32))
    np.testing.assert_allclose(mixer["fgate"]["bias"], np.linspace(3.0, 6.0, 4), rtol=1e-6)
    for name in ("igate", "fgate", "ogate"):
        assert not np.any(mixer[name]["kernel"]), name  # gate and output-gate weights start at zero
    q = np.asarray(mixer["q"]["kernel"])
    assert abs(q.std() / np.sqrt(2 / (5 * 64)) - 1) < 0.1  # "small init"
    out = np.asarray(mixer["out"]["kernel"])
    assert abs(out.std() / (2 / (2 * np.sqrt(64))) - 1) < 0.1  # "wang init"


def test_soft_cap_is_bounded_with_slope_one_at_zero():
    x = jnp.linspace(-200.0, 200.0, 101)
    assert jnp.all(jnp.abs(soft_cap(x, 15.0)) <= 15.0)  # float32 tanh saturates to exactly 1 far out
    assert jnp.all(jnp.abs(soft_cap(jnp.linspace(-40.0, 40.0, 81), 15.0)) < 15.0)
    assert jnp.allclose(jax.grad(lambda t: soft_cap(t, 15.0))(0.0), 1.0)
    assert soft_cap(x, None) is x


@pytest.mark.parametrize("prompt", [5, 8])
def test_prefill_then_step_decoding_matches_the_full_forward(prompt):
    def random_gates(params):  # random (not zero) gate weights: gates that depend on the input, as after training
        return jax.tree_util.tree_map_with_path(
            lambda path, x: jax.random.normal(jax.random.key(len(str(path))), x.shape) * 0.3
            if "gate" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path) else x, params)

    full, stepped, caches = full_and_stepped_logits(xlstm_config(), prompt, edit_params=random_gates)
    assert caches[0]["state"][0].shape == (2, 2, 16, 32)  # C: [batch, heads, d_qk, d_v]
    np.testing.assert_allclose(stepped, full, rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(full))) < 30.0  # logits soft cap


def test_model_gradients_agree_between_reference_and_chunked_cells():
    tokens = jax.random.randint(jax.random.key(3), (2, 11), 0, 259)
    results = []
    for impl in ("reference", "chunked"):
        model, params = init_params(xlstm_config(impl=impl), seed=4)
        loss = lambda p: jnp.mean(model.apply({"params": p}, tokens)[0] ** 2)  # noqa: E731
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), results[0][1], results[1][1])


def test_flops_per_token_counts_the_mlstm_projections():
    cfg = xlstm_config()
    d, h, dk, dv = 64, 2, 16, 32
    mixer = 2 * d * h * (2 * dk + 2 * dv) + 2 * d * 2 * h + 2 * h * dv * d
    cell = 2 * h * (dk + dv) * 5 / 2 + 4 * h * dk * dv  # chunk 4
    mlp = 6 * d * 192
    assert flops_per_token(cfg, 259, 32) == pytest.approx(2 * (mixer + cell + mlp) + 2 * d * 384)


@pytest.mark.parametrize("overrides, message", [
    (["model.mlstm.qk_dim_factor=0.3"], r"model.mlstm.qk_dim_factor=0.3: model.d_model \* qk_dim_factor = 38.4"),
    (["model.mlstm.chunk_size=256"], r"model.mlstm.chunk_size=256 is longer than data.seq_len=128"),
    (["model.vocab_size=100"], r"model.vocab_size=100 is smaller than the tokenizer's vocabulary \(259 ids\)"),
])
def test_mlstm_settings_are_checked_when_a_layer_uses_it(overrides, message, tmp_path):
    cfg = load_config(REPO / "configs/xlstm-debug.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1)
        build_model(cfg.model, 259)
    validate(load_config(REPO / "configs/debug.yaml", [o for o in overrides if "mlstm" in o]), 1)


def test_xlstm_trains_and_generates(tmp_path):
    cfg = tiny_config(**{"model.mixer_pattern": "[mlstm]", "model.n_heads": 2, "model.n_kv_heads": "null",
                         "model.tie_embeddings": False, "model.logit_soft_cap": 30.0, "model.mlstm.chunk_size": 16,
                         "model.mlstm.impl": "chunked", "train.steps": 30, "train.eval_every": 15,
                         "train.warmup_steps": 5, "mesh.data": 2, "sample.max_new_tokens": 10})
    result = train(cfg, tmp_path)
    assert np.mean([result.losses[s] for s in range(26, 31)]) < result.losses[1] - 1.0
    assert result.sample.startswith("def ") and len(result.sample) > 4
