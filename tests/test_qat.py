"""Ternary quantization-aware training (train.qat): the quantizer against its equations, the 2-bit packing, training
from the CLI (from a float run with train.init_from, resumed exactly), and the packed export whose logits are the
fake-quantized training forward."""

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, rewind, run_jaxeff, tb_losses, tiny_config, tiny_overrides
from jaxeff.artifacts.load import load_trained
from jaxeff.artifacts.packed import pack_codes, pack_params, unpack_codes
from jaxeff.config import ConfigError, load_config
from jaxeff.config.qat import QatConfig
from jaxeff.infer import export_checkpoint
from jaxeff.models.decoding import generate_text
from jaxeff.models.lm import build_model
from jaxeff.models.params import abstract_params
from jaxeff.models.qat import EPS, on_quantized_params, param_quantizer, quantized_names, straight_through, ternary, ternary_codes
from jaxeff.tasks import task_class
from jaxeff.tasks.lm import lm_loss
from jaxeff.train import train

TERNARY = QatConfig(kind="ternary")


def fresh_rng():
    """A new seed every run (printed on failure): the quantizer must hold on any input, not on chosen ones."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    return np.random.default_rng(seed), f"seed {seed}"


def oracle(w: np.ndarray, group_size: int):
    """BitNet b1.58's absmean quantizer in float64 NumPy, written from the equations."""
    w_GN = w.astype(np.float64).reshape(1, -1) if group_size == 0 else w.astype(np.float64).reshape(-1, group_size)
    gamma = np.maximum(np.abs(w_GN).mean(axis=1, keepdims=True), EPS)
    x = w_GN / gamma
    return np.clip(np.round(x), -1, 1).reshape(w.shape), gamma.reshape(-1), x.reshape(w.shape)


@pytest.mark.parametrize("shape, group_size", [((24, 40), 0), ((24, 40), 8), ((6, 4, 10), 40), ((4, 3, 8), 96)])
def test_quantizer_against_the_equations(shape, group_size):
    rng, seed = fresh_rng()
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 1.0)).astype(np.float32)
    w.reshape(-1)[rng.integers(0, w.size, 5)] *= 8  # outliers: beyond the clip
    codes, scales = ternary_codes(jnp.asarray(w), group_size)
    want_codes, want_gamma, x = oracle(w, group_size)
    near_half = np.abs(np.abs(x) - np.round(np.abs(x) - 0.5) - 0.5) < 1e-5  # ties: float32 vs float64 may differ
    assert np.array_equal(np.asarray(codes)[~near_half], want_codes[~near_half]), seed
    np.testing.assert_allclose(np.asarray(scales), want_gamma, rtol=1e-6, err_msg=seed)
    assert len(scales) == (1 if group_size == 0 else w.size // group_size)
    # The values are {-1, 0, +1} x their group's scale, per group.
    q = np.asarray(ternary(jnp.asarray(w), group_size))
    q_GN = q.reshape(len(scales), -1)
    assert np.all((q_GN == 0) | (np.abs(q_GN) == np.asarray(scales)[:, None])), seed
    assert set(np.unique(np.asarray(codes))) <= {-1.0, 0.0, 1.0}
    assert (np.abs(x) > 1.5).any(), seed  # the outliers were clipped to +-1
    assert np.array_equal(np.asarray(codes)[np.abs(x) > 1.5], np.sign(x[np.abs(x) > 1.5])), seed


def test_straight_through_forward_is_exactly_q_and_gradient_the_identity():
    rng, seed = fresh_rng()
    w = jnp.asarray(rng.standard_normal((16, 12)).astype(np.float32) * 0.1)
    w = w.at[0, :3].set(jnp.array([5.0, -5.0, 0.9]))  # far beyond the clip
    cotangent = jnp.asarray(rng.standard_normal((16, 12)).astype(np.float32))

    def f(w):
        return jnp.sum(straight_through(w, ternary(w, 0)) * cotangent)

    forward = straight_through(w, ternary(w, 0))
    assert np.array_equal(np.asarray(forward), np.asarray(ternary(w, 0))), seed  # not w + (q - w): rounding
    # BitNet's STE bypasses round and clip: dL/dW = dL/dQ everywhere (beyond the clip too), nothing through gamma.
    assert np.array_equal(np.asarray(jax.grad(f)(w)), np.asarray(cotangent)), seed


def test_the_scale_floor_keeps_zero_and_tiny_tensors_finite():
    for w in (jnp.zeros((8, 8)), jnp.full((8, 8), 1e-9)):
        codes, scales = ternary_codes(w, 0)
        assert float(scales[0]) == pytest.approx(EPS) and not np.asarray(codes).any()
        assert np.isfinite(np.asarray(ternary(w, 0))).all()


@pytest.mark.parametrize("n", [1, 4, 7, 33, 1000])
def test_pack_unpack_round_trips(n):
    rng, seed = fresh_rng()
    codes = rng.integers(-1, 2, n).astype(np.int8)
    packed = pack_codes(codes)
    assert packed.dtype == np.uint8 and packed.shape == (math.ceil(n / 4),)
    assert np.array_equal(np.asarray(unpack_codes(packed, n)), codes), seed


def test_packing_layout():
    # element 4i + j in bits 2j..2j+1 of byte i; 0 -> 0, +1 -> 1, -1 -> 2
    assert pack_codes(np.array([1, -1, 0, 1, -1])).tolist() == [1 | 2 << 2 | 0 << 4 | 1 << 6, 2]


def tiny_params(**extra):
    """The parameter shapes of a tiny model (the selection needs no values)."""
    model = build_model(tiny_config(**extra).model, 259, platform="cpu")
    return abstract_params(model, jax.ShapeDtypeStruct((1, 8), np.int32))


def test_default_selection_and_errors():
    params = tiny_params()
    names = quantized_names(params, TERNARY)
    assert names == [f"layer_{i}/{m}/kernel" for i in range(2)
                     for m in ("channel/down", "channel/gate", "channel/up", "mixer/k", "mixer/o", "mixer/q", "mixer/v")]
    mlstm = tiny_params(**{"model.mixer_pattern": "[mlstm]"})
    mlstm_names = quantized_names(mlstm, TERNARY)
    assert "layer_0/mixer/ogate/kernel" in mlstm_names and "layer_0/mixer/out/kernel" in mlstm_names
    assert not [n for n in mlstm_names if "/igate/" in n or "/fgate/" in n]  # kept float (float32 gating)
    with pytest.raises(ConfigError, match=r"group_size=48 does not divide layer_0/channel/down/kernel \(2048 elements\)"
                                          r"; pick one that divides every quantized matrix, e.g. \[16, 32, 64, 128"):
        param_quantizer(QatConfig(kind="ternary", group_size=48), params)
    with pytest.raises(ConfigError, match=r"no parameter of this model matches train.qat.params=\['nothing'\]"):
        param_quantizer(QatConfig(kind="ternary", params=["nothing"]), params)
    with pytest.raises(ConfigError, match=r"matches final_norm/scale of shape \(32,\), not a matrix"):
        param_quantizer(QatConfig(kind="ternary", params=["*"]), params)
    assert param_quantizer(QatConfig(), params)(params) is params  # kind none: the identity


def logits_of(trained_or_model, params, tokens):
    return np.asarray(jax.jit(trained_or_model.apply)({"params": params}, tokens)[0])


@pytest.fixture(scope="module")
def float_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("float")
    train(tiny_config(**{"train.steps": 6}), workdir, console=False)
    return workdir


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def test_post_training_rounding_export_is_packed_and_exact(float_run, tmp_path):
    float_export, _ = export_checkpoint(float_run, tmp_path / "float")
    packed, _ = export_checkpoint(float_run, tmp_path / "ptq", QatConfig(kind="ternary", group_size=16))
    record = json.loads((packed / "config.json").read_text())["quantization"]
    assert record["kind"] == "ternary" and record["group_size"] == 16 and len(record["params"]) == 14
    source = load_trained(float_run)
    want = param_quantizer(QatConfig(kind="ternary", group_size=16), source.params)(source.params)
    got = load_trained(packed)
    assert got.quantized and got.run_params is got.params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got.params, want)
    # Re-exporting the packed export writes the same codes and scales (the values are not re-quantized).
    again, _ = export_checkpoint(packed, tmp_path / "again")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 load_trained(again).params, want)
    # 2 bits per weight: the quantized matrices' codes are 1/16 of their float32 bytes; scales and the rest stay.
    tree, _ = pack_params(jax.device_get(want), QatConfig(kind="ternary", group_size=16))
    codes = [x for p, x in jax.tree_util.tree_leaves_with_path(tree) if p[-1].key == "codes"]
    floats = sum(4 * math.prod(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(want)
                 if jax.tree_util.keystr(p, simple=True, separator="/") in record["params"])
    assert floats == 16 * sum(c.nbytes for c in codes)
    assert du(packed / "params") < du(float_export / "params")
    with pytest.raises(ConfigError, match="is already quantized"):
        export_checkpoint(packed, tmp_path / "twice", QatConfig(kind="ternary"))


@pytest.mark.slow
def test_qat_from_the_cli_init_from_resume_export_generate(float_run, tmp_path):
    overrides = [*tiny_overrides(**{"train.steps": 6}), "train.qat.kind=ternary", "train.qat.group_size=16",
                 f"train.init_from={float_run}"]
    workdir = tmp_path / "qat"
    # 8 devices like this process (conftest): the resumed half below runs here, on the same mesh.
    proc = run_jaxeff("train", "--config", "configs/debug.yaml", "--workdir", str(workdir), *overrides, devices=8)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"initialised from {float_run}" in proc.stdout
    assert "train.qat: ternary weights in 14 matrices" in proc.stdout

    # Resume: a copy rewound to step 3 trains steps 4-6 to the same losses and float weights, bit for bit.
    resumed = rewind(workdir, tmp_path / "resumed", 3)
    result = train(load_config(REPO / "configs/debug.yaml", overrides), resumed, console=False)
    want = tb_losses(workdir)
    assert sorted(result.losses) == [4, 5, 6] and all(result.losses[s] == want[s] for s in result.losses), want
    a, b = load_trained(workdir), load_trained(resumed)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)

    # The packed export's logits and loss are the fake-quantized training forward's (the loss's own quantizer).
    out, _ = export_checkpoint(workdir, tmp_path / "export")
    exported = load_trained(out)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 259)
    quantize = param_quantizer(a.cfg.train.qat, a.params)
    assert np.array_equal(logits_of(a.model, quantize(a.params), tokens),
                          logits_of(exported.model, exported.params, tokens))
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    train_loss = on_quantized_params(functools.partial(lm_loss, a.model), quantize)
    assert float(train_loss(a.params, batch)[0]) == float(lm_loss(exported.model, exported.params, batch)[0])

    # `jaxeff generate` runs the packed model: the same greedy text as the workdir's quantized weights.
    proc = run_jaxeff("generate", "--workdir", str(out), "--prompt", "def ", "--max-new-tokens", "12",
                      "--temperature", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokenizer = task_class("lm").tokenizer_of(a.meta)
    assert proc.stdout.rstrip("\n") == generate_text(a.model, a.run_params, tokenizer, "def ", 12, 0.0, 0, 0)


def test_qat_config_errors_stop_the_run(tmp_path):
    with pytest.raises(ConfigError, match="train.qat.group_size=48 does not divide"):
        train(tiny_config(**{"train.qat.kind": "ternary", "train.qat.group_size": 48}), tmp_path, console=False)
