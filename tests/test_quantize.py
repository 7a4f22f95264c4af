"""`jaxeff quantize` (FlexQ W6A6 / W6A8 / W8A8 / W4A16): the quantizer against a NumPy transcription of FlexQ's
released one (symmetric, zero point off), bit for bit; dense packing round trips; a trained tiny model quantized
through the CLI runs in `jaxeff generate` (int8 codes through the quantized matmul) and its logits are a fake-quant
forward's up to float32 summation order, and close to the float ones."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_user_error, run_jaxeff, tiny_overrides
from jaxeff.artifacts import bitpack
from jaxeff.config import ConfigError
from jaxeff.models.flexq import dequantize_kernel, fake_quant_activation, quantize_kernel


def flexq_numpy(w_OI: np.ndarray, bits: int, group: int) -> np.ndarray:
    """FlexQ's UniformAffineQuantizer(symmetric=True, disable_zero_point=True, group_size=G) on a float32 [O, I]
    weight (rows = output features): zero-pad I to a multiple of G, groups of G along each row, scale = absmax /
    (2^(b-1) - 1) clamped to [1e-5, 1e4], codes round-half-even clamped to [-2^(b-1), 2^(b-1) - 1]."""
    o, i = w_OI.shape
    pad = -i % group
    x = np.concatenate([w_OI, np.zeros((o, pad), np.float32)], axis=1).reshape(-1, group)
    absmax = np.maximum(np.abs(x.max(-1, keepdims=True)), np.abs(x.min(-1, keepdims=True)))
    scale = np.clip(absmax / (2 ** (bits - 1) - 1), 1e-5, 1e4).astype(np.float32)
    codes = np.clip(np.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (codes * scale).astype(np.float32).reshape(o, i + pad)[:, :i]


def _weights(rng, shape, group):
    """Random weights viewed as [I, O] with all-zero groups: output 0 entirely, and the first group of inputs of
    every output when there are several; output 1's other groups below the scale floor (absmax / qmax < 1e-5)."""
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    w_IO = w.reshape(shape[0], -1)
    w_IO[:, 0] = 0
    if shape[0] > group:
        w_IO[:group] = 0
    w_IO[:, 1] *= 1e-4
    return w


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("shape,group", [((300, 48), 128), ((200, 24), 128), ((40, 4, 16), 64)])
def test_weight_quantizer_equals_flexq_bit_for_bit(bits, shape, group):
    rng = np.random.default_rng(bits * 7 + group)
    w = _weights(rng, shape, group)
    if bits == 8:  # an absmax beyond the scale's upper clamp: codes reach -2^(b-1)
        w.reshape(shape[0], -1)[-2:, 2] = [5e6, -5e6]
    got = np.asarray(dequantize_kernel(*quantize_kernel(jnp.asarray(w), 1, bits, group), w.shape, group))
    want = flexq_numpy(w.reshape(shape[0], -1).T, bits, group).T.reshape(shape)  # FlexQ's weight is [out, in]
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.array_equal(got, want)  # every bit, but for the sign of zero (codes are stored as integers)
    assert np.all(got.reshape(shape[0], -1)[:, 0] == 0)
    assert shape[0] % group  # the last group is ragged


def test_output_projection_groups_run_down_its_flattened_inputs():
    w = _weights(np.random.default_rng(0), (4, 40, 24), 128)  # [H, K, D]: inputs H*K = 160, a ragged second group
    got = np.asarray(dequantize_kernel(*quantize_kernel(jnp.asarray(w), 2, 6, 128), w.shape, 128))
    assert np.array_equal(got, flexq_numpy(w.reshape(160, 24).T, 6, 128).T.reshape(w.shape))


@pytest.mark.parametrize("bits", [6, 8])
def test_activation_quantizer_per_token_groups(bits):
    x = np.random.default_rng(bits).standard_normal((2, 3, 200)).astype(np.float32)
    x[0, 1, :128] = 0  # an all-zero group of one token
    got = np.asarray(fake_quant_activation(jnp.asarray(x), 1, bits, 128))
    assert np.array_equal(got, flexq_numpy(x.reshape(6, 200), bits, 128).reshape(x.shape))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_packing_round_trips(bits):
    rng = np.random.default_rng(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for n in (1, 2, 3, 5, 1001):
        codes = rng.integers(lo, hi + 1, n)
        codes[0] = lo
        packed = bitpack.pack(codes, bits)
        assert packed.size == bitpack.packed_size(n, bits) == -(-n * bits // 8) + (0 if bits != 6 else
                                                                                 3 * -(-n // 4) - -(-n * 6 // 8))
        assert np.array_equal(np.asarray(bitpack.unpack(packed, bits, n)), codes)
    with pytest.raises(ValueError, match="outside"):
        bitpack.pack([hi + 1], bits)


def test_settings_errors_are_one_line(tmp_path):
    from jaxeff.infer.quantize import quantize_export

    with pytest.raises(ConfigError, match="--scheme 'w5a5' is not a quantization scheme; pick one of w6a6"):
        quantize_export(tmp_path, tmp_path / "o", "w5a5")
    with pytest.raises(ConfigError, match="--group-size 0: must be a positive"):
        quantize_export(tmp_path, tmp_path / "o", "w6a8", 0)
    with pytest.raises(ConfigError, match="is not an export"):
        quantize_export(tmp_path, tmp_path / "o", "w6a8")
    assert_user_error(run_jaxeff("quantize", "--from", str(tmp_path), "--out", str(tmp_path / "o"), "--scheme", "w9"),
                      "--scheme 'w9' is not a quantization scheme")


@pytest.fixture(scope="module")
def float_export(tmp_path_factory):
    from jaxeff.infer import export_checkpoint

    root = tmp_path_factory.mktemp("flexq")
    proc = run_jaxeff("train", "--config", "configs/debug.yaml", "--workdir", str(root / "run"),
                      *tiny_overrides(**{"train.steps": 12, "train.eval_every": 12, "checkpoint.every": 12}),
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export_checkpoint(root / "run", root / "float")
    return root


def _logits(path, tokens_BS):
    from jaxeff.artifacts.load import load_trained

    loaded = load_trained(path)
    positions = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
    return loaded, loaded.model.apply({"params": loaded.run_params}, tokens_BS, positions, None)[0]


def test_cli_quantize_w6a8_then_generate(float_export):
    from jaxeff.models.flexq_forward import ActivationQuantized
    from jaxeff.models.qat import param_name

    out = float_export / "w6a8"
    proc = run_jaxeff("quantize", "--from", str(float_export / "float"), "--out", str(out), "--scheme", "w6a8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "config.json").read_text())["quantization"]
    assert record["scheme"] == "w6a8" and record["weight_bits"] == 6 and record["group_size"] == 128
    assert "layer_0/channel/down/kernel" in record["params"] and "embed/embedding" not in record["params"]
    gen = run_jaxeff("generate", "--workdir", str(out), "--prompt", "def ", "--max-new-tokens", "8",
                     "--temperature", "0")
    assert gen.returncode == 0 and gen.stdout.startswith("def "), gen.stderr[-3000:]

    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 24)), jnp.int32)
    float_model, float_logits = _logits(float_export / "float", tokens)
    quant_model, quant_logits = _logits(out, tokens)
    # the fake-quant reference: the float weights through the NumPy FlexQ quantizer, 8-bit activations per token
    d = float_model.cfg.model.d_model

    def fake(path, w):
        name = param_name(path)
        if name not in record["params"]:
            return w
        n_in = record["params"][name]["input_axes"]
        w_OI = np.asarray(w).reshape(int(np.prod(w.shape[:n_in])), -1).T
        return jnp.asarray(flexq_numpy(w_OI, 6, 128).T.reshape(w.shape))

    ref_params = jax.tree_util.tree_map_with_path(fake, float_model.params)
    # the export's weights are FlexQ's bit for bit; served, they stay int8 codes (the quantized matmul op)
    for path, w in jax.tree_util.tree_leaves_with_path(ref_params):
        assert np.array_equal(np.asarray(w), np.asarray(_at(quant_model.params, path))), param_name(path)
    served = quant_model.run_params["layer_0"]["channel"]["down"]["kernel"]
    # the serving layout: [64, 32] padded once, to whole groups of 128 rows and 128 columns, with zero codes
    assert served["codes"].dtype == jnp.int8 and served["codes"].shape == (128, 128)
    assert served["scales"].shape == (1, 128) and not np.asarray(served["codes"])[64:].any()
    assert not np.asarray(served["codes"])[:, 32:].any()
    ref_model = ActivationQuantized(float_model.model, {n: 8 for n in record["params"]}, 128)
    positions = jnp.broadcast_to(jnp.arange(24), tokens.shape)
    ref_logits = ref_model.apply({"params": ref_params}, tokens, positions, None)[0]
    assert d == 32
    scale = float(jnp.max(jnp.abs(float_logits)))
    np.testing.assert_allclose(np.asarray(quant_logits), np.asarray(ref_logits), rtol=0, atol=1e-5 * scale)
    err = float(jnp.max(jnp.abs(quant_logits - float_logits)))
    assert 0 < err < 0.05 * scale, err


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_refuses_a_quantized_export(float_export):
    from jaxeff.infer import export_checkpoint
    from jaxeff.infer.quantize import quantize_export

    out = float_export / "w4"
    quantize_export(float_export / "float", out, "w4a16")
    assert json.loads((out / "config.json").read_text())["quantization"]["activation_bits"] is None
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 200, (1, 16)), jnp.int32)
    _, float_logits = _logits(float_export / "float", tokens)
    _, w4_logits = _logits(out, tokens)  # weight-only: dequantized inside the matmul
    assert float(jnp.max(jnp.abs(w4_logits - float_logits))) < 0.1 * float(jnp.max(jnp.abs(float_logits)))
    with pytest.raises(ConfigError, match="is already quantized \\(w4a16\\); quantize the float export"):
        quantize_export(out, float_export / "again", "w6a8")
    with pytest.raises(ConfigError, match="is already a quantized export \\(w4a16\\)"):
        export_checkpoint(out, float_export / "again")


def test_a_quantized_target_decodes_speculatively_as_it_decodes_plainly(float_export):
    """The W6A8 export served through the quantized matmul as the target, its float export as the draft: greedy
    speculative output is the quantized model's own plain greedy output."""
    from jaxeff.infer.generate import load_inference_model
    from jaxeff.infer.quantize import quantize_export
    from jaxeff.infer.speculative import speculative_generate_ids
    from jaxeff.models.decoding import generate_ids

    out = float_export / "w6a8-target"
    quantize_export(float_export / "float", out, "w6a8")
    target, draft = load_inference_model(out), load_inference_model(float_export / "float")
    prompt, kw = [257, *b"def main():\n"], dict(vocab_size=259, stop_id=258)
    plain = generate_ids(target.model, target.params, prompt, 24, **kw)
    spec, stats = speculative_generate_ids(target.model, target.params, draft.model, draft.params, prompt, 24,
                                           draft_tokens=3, **kw)
    assert spec == plain and stats.drafted > 0
