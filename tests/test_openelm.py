"""OpenELM's layer-wise scaling (model.layer_scaling) and q/k RMSNorm: the published presets' per-layer shapes
against the authors' formula written out here independently, parameter counts, every per-head token mixer under
per-layer widths (forward and cached decoding), and the errors."""

import jax
import numpy as np
import pytest

from helpers import REPO, full_and_stepped_logits, tiny_config
from jaxeff.config import ConfigError, load_config, validate
from jaxeff.models.lm import build_model
from jaxeff.models.params import abstract_params, count_params

PRESETS = {"270m": (16, 1280, 64), "450m": (20, 1536, 64), "1_1b": (28, 2048, 64), "3b": (36, 3072, 128)}


def corenet_divisible(v, divisor):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def formula_shapes(n_layers, d_model, head_dim, groups=4):
    """(query heads, kv heads, FFN width) per layer, as corenet's general_gpt computes them (with numpy)."""
    alphas = [round(float(v), 2) for v in np.linspace(0.5, 1.0, n_layers)]
    betas = [round(float(v), 2) for v in np.linspace(0.5, 4.0, n_layers)]
    heads = [corenet_divisible(d_model * a, head_dim * groups) // head_dim for a in alphas]
    return [(h, h // groups, corenet_divisible(b * d_model, 256)) for h, b in zip(heads, betas)]


def formula_param_count(n_layers, d_model, head_dim, vocab=32000):
    """Tied embedding + final norm + per layer: q, k, v, o, q/k norms, SwiGLU (3 matrices), two block norms."""
    total = vocab * d_model + d_model
    for h, kv, f in formula_shapes(n_layers, d_model, head_dim):
        total += d_model * (h + 2 * kv) * head_dim + h * head_dim * d_model + 2 * head_dim + 3 * d_model * f + 2 * d_model
    return total


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_the_published_per_layer_shapes_and_parameter_counts(name):
    n_layers, d_model, head_dim = PRESETS[name]
    cfg = load_config(REPO / f"configs/openelm-{name}.yaml")
    validate(cfg, 1)
    got = [(s.n_heads, s.n_kv_heads, s.mlp_dim) for s in cfg.model.layer_shapes()]
    assert got == formula_shapes(n_layers, d_model, head_dim)
    params = abstract_params(build_model(cfg.model, 32000), jax.ShapeDtypeStruct((1, 8), np.int32))
    assert count_params(params) == formula_param_count(n_layers, d_model, head_dim)
    layer0, last = params["layer_0"], params[f"layer_{n_layers - 1}"]
    assert layer0["mixer"]["q"]["kernel"].shape == (d_model, got[0][0], head_dim)
    assert last["mixer"]["k"]["kernel"].shape == (d_model, got[-1][1], head_dim)
    assert last["channel"]["down"]["kernel"].shape[0] == got[-1][2]


def test_the_270m_preset_is_the_released_model():
    """The released OpenELM-270M: query heads 12 x5, 16 x7, 20 x4; SwiGLU 768 ... 5120; 271.5M parameters (0.27B in
    the paper's table)."""
    shapes = load_config(REPO / "configs/openelm-270m.yaml").model.layer_shapes()
    assert [s.n_heads for s in shapes] == [12] * 5 + [16] * 7 + [20] * 4
    assert [s.n_kv_heads for s in shapes] == [3] * 5 + [4] * 7 + [5] * 4
    assert shapes[0].mlp_dim == 768 and shapes[-1].mlp_dim == 5120
    assert formula_param_count(16, 1280, 64) == 271_527_168


SCALED = {"model.n_layers": 3, "model.head_dim": 8, "model.layer_scaling.kind": "explicit",
          "model.layer_scaling.query_heads": "[2,4,6]", "model.layer_scaling.kv_heads": "[1,2,3]",
          "model.layer_scaling.mlp_dims": "[32,64,96]"}


@pytest.mark.parametrize("mixer", ["attention", "lightning", "mlstm", "s2"])
def test_every_per_head_mixer_takes_per_layer_widths_and_decodes_as_it_runs(mixer):
    extra = {"s2": {"model.s2.block_size": 4, "model.s2.local_blocks": 1}, "lightning": {"model.lightning.block_size": 8},
             "mlstm": {"model.mlstm.chunk_size": 8}}.get(mixer, {})
    heads = [2, 4, 8] if mixer == "mlstm" else [2, 4, 6]  # mLSTM splits a fixed width (d_model x factor) into heads
    scaled = {**SCALED, "model.layer_scaling.query_heads": str(heads).replace(" ", ""),
              "model.layer_scaling.kv_heads": str([h // 2 for h in heads]).replace(" ", "")}
    cfg = tiny_config(**scaled, **extra, **{"model.mixer_pattern": f"[{mixer}]"})
    validate(cfg, 1)
    params = abstract_params(build_model(cfg.model, 259), jax.ShapeDtypeStruct((1, 8), np.int32))
    widths = [sorted({leaf.shape[-1] for leaf in jax.tree.leaves(params[f"layer_{i}"]["channel"])}) for i in range(3)]
    assert [max(w) for w in widths] == [32, 64, 96]  # the SwiGLU hidden width of each layer
    d_model = cfg.model.d_model  # input projections are [d_model, heads, head width]: the widest has the query heads
    got = [max(x.shape[1] for x in jax.tree.leaves(params[f"layer_{i}"]["mixer"]) if x.ndim == 3 and x.shape[0] == d_model)
           for i in range(3)]
    assert got == heads
    full, stepped, _ = full_and_stepped_logits(cfg.model, prompt=5, seq=9)
    np.testing.assert_allclose(stepped, full, rtol=2e-4, atol=2e-4)


def test_qk_norm_makes_attention_blind_to_the_scale_of_its_query_and_key_projections():
    def scaled(params, factor):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x * factor if any(getattr(p, "key", None) in ("q", "k") for p in path) else x, params)

    for qk_norm, should_change in ((True, False), (False, True)):
        cfg = tiny_config(**{"model.qk_norm": qk_norm}).model
        base, _, _ = full_and_stepped_logits(cfg, prompt=4, seq=6)
        tripled, _, _ = full_and_stepped_logits(cfg, prompt=4, seq=6, edit_params=lambda p: scaled(p, 3.0))
        changed = not np.allclose(base, tripled, rtol=1e-4, atol=1e-4)
        assert changed == should_change, qk_norm


@pytest.mark.parametrize("extra, message", [
    ({"model.layer_scaling.kind": "openelm"}, r"needs? .*model.head_dim|set model.head_dim"),
    ({**SCALED, "model.layer_scaling.mlp_dims": "[32,64]"}, r"model.layer_scaling.mlp_dims: .*one value per layer"),
    ({**SCALED, "model.layer_scaling.kv_heads": "[1,3,3]"}, r"layer 1\): n_kv_heads=3 must divide .*n_heads=4"),
    ({"model.qk_norm": True, "model.mixer_pattern": "[attention,lightning]"}, r"model.qk_norm=true .* lightning"),
])
def test_bad_layer_scaling_settings_are_config_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(**extra), 1)


def test_a_layer_whose_heads_do_not_split_over_mesh_tensor_is_named():
    cfg = tiny_config(**SCALED, **{"mesh.tensor": 4, "mesh.data": 1, "mesh.fsdp": 1})
    with pytest.raises(ConfigError, match=r"layer 0\): n_heads=2 is not divisible by mesh.tensor=4"):
        validate(cfg, 4)
