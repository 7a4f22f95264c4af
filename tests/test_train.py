"""Trainer, in process: loss falls, 1 vs 8 devices, gradient accumulation, NaN guard, TensorBoard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from jaxeff.config import ConfigError
from jaxeff.layers.mlp import SwiGLU
from jaxeff.layers.registry import CHANNEL_MIXERS, ChannelMixerSpec, register_channel_mixer
from jaxeff.train import TrainingStopped, train


def test_thirty_steps_reduce_the_loss(tmp_path):
    result = train(tiny_config(**{"train.steps": 30, "train.eval_every": 10, "train.warmup_steps": 5}), tmp_path)
    assert sorted(result.losses) == list(range(1, 31))
    first, last = result.losses[1], np.mean([result.losses[s] for s in range(26, 31)])
    assert first > np.log(259) - 0.3  # starts near uniform over the byte vocabulary
    assert last < first - 1.5, result.losses
    assert result.eval_losses[30] < result.eval_losses[10] < first


def test_one_device_and_eight_device_mesh_agree(tmp_path):
    single = train(tiny_config(**{"mesh.data": 1}), tmp_path / "one")
    sharded = train(tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), tmp_path / "eight")
    assert len(sharded.params["embed"]["embedding"].sharding.device_set) == 8
    steps = sorted(single.losses)
    np.testing.assert_allclose([sharded.losses[s] for s in steps], [single.losses[s] for s in steps], rtol=1e-5)
    np.testing.assert_allclose(sharded.eval_losses[6], single.eval_losses[6], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 single.params, sharded.params)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    full = train(tiny_config(**{"train.steps": 3, "mesh.data": 2}), tmp_path / "full")
    accum = train(tiny_config(**{"train.steps": 3, "mesh.data": 2, "train.microbatches": 2}), tmp_path / "acc")
    np.testing.assert_allclose(list(accum.losses.values()), list(full.losses.values()), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 full.params, accum.params)


class PoisonedSwiGLU(SwiGLU):
    """A channel mixer whose output is NaN: every gradient is non-finite."""

    def __call__(self, x_BSD):
        y, aux = super().__call__(x_BSD)
        return y * jnp.nan, aux


@pytest.fixture
def poisoned_mixer():
    """Registered for one test only: the registry is global, and the docs are generated from it."""
    register_channel_mixer(ChannelMixerSpec("poisoned_swiglu_for_tests", PoisonedSwiGLU, lambda cfg, layer: 0.0))
    yield
    del CHANNEL_MIXERS["poisoned_swiglu_for_tests"]


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path, poisoned_mixer):
    cfg = tiny_config(**{"model.channel_mixer_pattern": "[poisoned_swiglu_for_tests]",
                         "train.max_consecutive_nonfinite": 3, "train.steps": 10, "mesh.data": 1})
    with pytest.raises(TrainingStopped, match=r"3 steps in a row had non-finite gradients \(step 3\)"):
        train(cfg, tmp_path)
    # The stop saved a checkpoint whose parameters are the untouched, finite initial ones.
    from jaxeff.infer import load_inference_model

    loaded = load_inference_model(tmp_path)
    assert loaded.step >= 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(loaded.params))
    fresh = train(tiny_config(**{"train.steps": 1, "train.warmup_steps": 0, "mesh.data": 1,
                                 "train.learning_rate": 1e-30}), tmp_path / "ref")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12),
                 loaded.params, fresh.params)


def test_tensorboard_scalars_match_the_run(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    result = train(tiny_config(), tmp_path)
    acc = ea.EventAccumulator(str(tmp_path / "tb"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s",
            "model_tflops_per_s_per_device"} <= tags
    logged = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(logged) == list(range(1, 7))
    np.testing.assert_allclose([logged[s] for s in logged], [result.losses[s] for s in logged], rtol=1e-6)
    lrs = [e.value for e in acc.Scalars("learning_rate")]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-3, rel=1e-5)  # warmup from 0 to the peak


def test_warmup_longer_than_training_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.warmup_steps=10 must be smaller than train.steps=6"):
        train(tiny_config(**{"train.warmup_steps": 10}), tmp_path)


def test_workdir_of_another_model_is_refused(tmp_path):
    train(tiny_config(**{"train.steps": 3, "mesh.data": 1}), tmp_path)
    with pytest.raises(ConfigError, match=r"different run \(model.d_model: 32 -> 64"):
        train(tiny_config(**{"train.steps": 3, "mesh.data": 1, "model.d_model": 64}), tmp_path)


def test_eager_mode_matches_jit(tmp_path):
    jitted = train(tiny_config(**{"train.steps": 2, "train.warmup_steps": 1, "mesh.data": 1, "train.eval_every": 100}), tmp_path / "jit")
    eager = train(tiny_config(**{"train.steps": 2, "train.warmup_steps": 1, "mesh.data": 1, "train.eval_every": 100, "train.jit": False}),
                  tmp_path / "eager")
    np.testing.assert_allclose(list(eager.losses.values()), list(jitted.losses.values()), rtol=1e-5)


