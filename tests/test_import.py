"""`jaxeff import` of transformers' xLSTM: logits equal transformers' own PyTorch model (full forward and
step decoding); bad directories are one line naming the tensor; fine-tuning starts from an import."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import xLSTMConfig, xLSTMForCausalLM
from transformers.models.xlstm.modeling_xlstm import xLSTMCache

from helpers import assert_user_error, run_jaxeff, tiny_config
from jaxeff.errors import UserError
from jaxeff.infer import load_inference_model
from jaxeff.infer.hf_import import import_checkpoint
from jaxeff.models.lm import build_model, init_caches
from jaxeff.train import train

VOCAB = 300
TOKENS = np.arange(3, 43)[None] % VOCAB  # 40 tokens: two chunks of 16 and a recurrent tail in transformers


@pytest.fixture(scope="module")
def hf_xlstm(tmp_path_factory):
    """A tiny random xLSTM built and saved by transformers itself (d_qk 32 != d_v 64 per head)."""
    torch.manual_seed(0)
    config = xLSTMConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_heads=2, qk_dim_factor=0.5,
                         v_dim_factor=1.0, mode="inference", chunk_size=16, autocast_kernel_dtype="float32",
                         weight_mode="single")
    model = xLSTMForCausalLM(config).float().eval()
    with torch.no_grad():  # every weight random (the default init zeroes the gates, which would hide mistakes)
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "gate" in name else 0.1) + (1.0 if "norm" in name else 0.0))
    directory = tmp_path_factory.mktemp("hf") / "tiny_xlstm"
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def imported(hf_xlstm, tmp_path_factory):
    out, arch, n_params = import_checkpoint(hf_xlstm[0], tmp_path_factory.mktemp("imp") / "export")
    assert arch == "xlstm" and n_params == sum(p.numel() for p in hf_xlstm[1].parameters()) + 84 * 128 * 2
    return out


def _ours(export_dir, impl="chunked"):
    loaded = load_inference_model(export_dir)
    cfg = loaded.model_config.model_copy(deep=True)
    cfg.mlstm.impl, cfg.compute_dtype = impl, "float32"
    return build_model(cfg, loaded.tokenizer.vocab_size, platform="cpu"), loaded.params, cfg


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_imported_xlstm_logits_equal_transformers(hf_xlstm, imported, impl):
    model, params, _ = _ours(imported, impl)
    ours = model.apply({"params": params}, jnp.asarray(TOKENS))[0][..., :VOCAB]
    with torch.no_grad():
        theirs = hf_xlstm[1](torch.tensor(TOKENS)).logits.numpy()
    assert rel(ours, theirs) < 1e-4


def test_imported_xlstm_step_decoding_equals_transformers_cache(hf_xlstm, imported):
    model, params, cfg = _ours(imported)
    apply = jax.jit(model.apply)
    caches = init_caches(cfg, 1, 40, jnp.float32)
    prompt = 21
    logits, caches, _ = apply({"params": params}, jnp.asarray(TOKENS[:, :prompt]),
                              jnp.arange(prompt)[None], caches)
    ours = [logits[:, -1]]
    for t in range(prompt, 40):
        logits, caches, _ = apply({"params": params}, jnp.asarray(TOKENS[:, t:t + 1]), jnp.full((1, 1), t), caches)
        ours.append(logits[:, -1])
    cache = xLSTMCache(hf_xlstm[1].config, max_batch_size=1, dtype=torch.float32)
    theirs = []
    with torch.no_grad():
        out = hf_xlstm[1](torch.tensor(TOKENS[:, :prompt]), cache=cache, use_cache=True)
        theirs.append(out.logits[:, -1].numpy())
        for t in range(prompt, 40):
            out = hf_xlstm[1](torch.tensor(TOKENS[:, t:t + 1]), cache=out.cache, use_cache=True)
            theirs.append(out.logits[:, -1].numpy())
    assert rel(jnp.stack(ours)[..., :VOCAB], np.stack(theirs)) < 1e-4


def test_bfloat16_import_rounds_each_tensor_once(imported, hf_xlstm, tmp_path):
    out, _, _ = import_checkpoint(hf_xlstm[0], tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["param_dtype"] == "bfloat16"
    f32, bf16 = load_inference_model(imported).params, load_inference_model(out).params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32),
                                                            np.asarray(b, np.float32)), f32, bf16)


def test_the_import_is_a_plain_orbax_checkpoint(imported, hf_xlstm):
    import orbax.checkpoint as ocp

    params = ocp.StandardCheckpointer().restore(imported / "params")
    q = hf_xlstm[1].state_dict()["backbone.blocks.1.mlstm_layer.q.weight"].numpy()  # [H*d_qk, D]
    np.testing.assert_array_equal(params["layer_1"]["mixer"]["q"]["kernel"], q.T.reshape(128, 2, 32))
    assert sorted(p.name for p in imported.iterdir()) == ["config.json", "params"]


def test_generate_from_an_import(imported):
    proc = run_jaxeff("generate", "--workdir", str(imported), "--prompt", "ab", "--max-new-tokens", "4",
                      "--temperature", "0")
    assert proc.returncode == 0 and proc.stdout.startswith("ab"), proc.stderr[-2000:]


def _copy_with(src, dst, drop=(), reshape=None, config_change=None):
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    for name in drop:
        del tensors[name]
    for name, shape in (reshape or {}).items():
        tensors[name] = np.zeros(shape, np.float32)
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config.update(config_change or {})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("kind, message", [
    ("missing", "tensor 'backbone.blocks.1.mlstm_layer.fgate_preact.bias' is missing"),
    ("shape", "tensor 'backbone.blocks.0.mlstm_layer.q.weight' has shape (32, 128), which does not fit"),
    ("arch", "model_type 'llama' cannot be imported; supported: xlstm, transnormer"),
    ("extra", "1 tensor(s) have no place in the xlstm model, e.g. 'backbone.blocks.2.norm_ffn.weight'"),
])
def test_bad_checkpoints_are_one_line_naming_the_tensor(hf_xlstm, tmp_path, kind, message):
    src = hf_xlstm[0]
    bad = {"missing": lambda d: _copy_with(src, d, drop=["backbone.blocks.1.mlstm_layer.fgate_preact.bias"]),
           "shape": lambda d: _copy_with(src, d, reshape={"backbone.blocks.0.mlstm_layer.q.weight": (32, 128)}),
           "arch": lambda d: _copy_with(src, d, config_change={"model_type": "llama"}),
           "extra": lambda d: _copy_with(src, d, reshape={"backbone.blocks.2.norm_ffn.weight": (128,)})}[kind](
        tmp_path / "bad")
    with pytest.raises(UserError, match=None):
        import_checkpoint(bad, tmp_path / "out_api")
    assert_user_error(run_jaxeff("import", "--from", str(bad), "--out", str(tmp_path / "out")), message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_api").exists()  # nothing half-written


def test_fine_tuning_starts_from_the_imported_parameters(imported, tmp_path):
    loaded = load_inference_model(imported)
    model_keys = {f"model.{k}": json.dumps(v) for k, v in loaded.model_config.model_dump(mode="json").items()
                  if not isinstance(v, dict)}
    model_keys.update({"model.mlstm.impl": "chunked", "model.mlstm.chunk_size": 16,
                       "model.mlstm.qk_dim_factor": 0.5, "model.compute_dtype": "float32"})
    cfg = tiny_config(**{**model_keys, "train.steps": 3, "train.warmup_steps": 1, "mesh.data": 1,
                         "train.learning_rate": 1e-9, "train.init_from": str(imported)})
    result = train(cfg, tmp_path / "ft")
    # With a negligible learning rate the trained parameters are still the imported ones.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                 result.params, loaded.params)
    bad = tiny_config(**{"train.steps": 3, "train.warmup_steps": 1, "mesh.data": 1, "train.init_from": str(imported)})
    with pytest.raises(UserError, match=r"train.init_from=.*: parameter .* is in the checkpoint|this model"):
        train(bad, tmp_path / "bad")


# ----------------------------------------------------------------------------- TransNormerLLM's released layout


def test_transnormer_released_layout_imports_onto_the_lightning_model(tmp_path):
    """A tiny TNL written in OpenNLPLab's layout (fused qkvu, l1/l2/l3, lrpe theta [H, 1, d], no norm weights)
    from a jaxeff model's own parameters; the import must give back exactly that model."""
    from jaxeff.config import LightningConfig, ModelConfig
    import flax.linen as nn

    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, mlp_dim=48, mixer_pattern=["lightning"],
                      channel_mixer_pattern=["sglu"], norm="srms", scale_embeddings=True, tie_embeddings=True,
                      compute_dtype="float32", vocab_size=300, lightning=LightningConfig(lrpe_layers=[0], impl="chunked"))
    model = build_model(cfg, 259, platform="cpu")
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), params)
    p = jax.tree.map(np.asarray, params)
    tensors = {"model.embed_tokens.weight": p["embed"]["embedding"][:300]}
    for i in range(2):
        mixer, channel = p[f"layer_{i}"]["mixer"], p[f"layer_{i}"]["channel"]
        fused = [mixer[n]["kernel"].reshape(32, 32).T for n in ("q", "k", "v", "u")]
        tensors[f"model.layers.{i}.token_mixer.qkvu_proj.weight"] = np.concatenate(fused, 0)
        tensors[f"model.layers.{i}.token_mixer.out_proj.weight"] = mixer["o"]["kernel"].reshape(32, 32).T
        tensors[f"model.layers.{i}.channel_mixer.l1.weight"] = channel["gate"]["kernel"].T
        tensors[f"model.layers.{i}.channel_mixer.l2.weight"] = channel["up"]["kernel"].T
        tensors[f"model.layers.{i}.channel_mixer.l3.weight"] = channel["down"]["kernel"].T
        if i == 0:
            tensors["model.layers.0.token_mixer.lrpe.theta"] = mixer["lrpe_theta"].reshape(4, 1, 8)
    src = tmp_path / "tnl"
    src.mkdir()
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({
        "model_type": "transnormer", "decoder_embed_dim": 32, "decoder_layers": 2, "decoder_attention_heads": 4,
        "hidden_dim": 32, "glu_dim": 48, "vocab_size": 300, "linear_use_lrpe_list": [1, 0], "bias": False,
        "norm_type": "simplermsnorm", "no_scale_embedding": False}))
    out, arch, _ = import_checkpoint(src, tmp_path / "out")
    imported, imported_params, _ = _ours_tnl(out)
    tokens = jnp.asarray(TOKENS)
    assert arch == "transnormer"
    np.testing.assert_allclose(imported.apply({"params": imported_params}, tokens)[0][..., :300],
                               model.apply({"params": params}, tokens)[0][..., :300], rtol=1e-5, atol=1e-5)


def _ours_tnl(export_dir):
    loaded = load_inference_model(export_dir)
    cfg = loaded.model_config.model_copy(deep=True)
    cfg.lightning.impl, cfg.compute_dtype = "chunked", "float32"
    return build_model(cfg, loaded.tokenizer.vocab_size, platform="cpu"), loaded.params, cfg


def test_a_subword_model_without_its_tokenizer_is_warned_about(tmp_path, capsys):
    """Without tokenizer.json a 32000-token model would be driven by byte ids: the import says so and how to fix it."""
    from jaxeff.infer.hf_import import _tokenizer_for
    from jaxeff.paths import as_path

    _tokenizer_for(as_path(tmp_path), 300)  # a byte-sized vocabulary: nothing to say
    assert "tokenizer" not in capsys.readouterr().err
    _tokenizer_for(as_path(tmp_path), 32000)
    assert "copy the model's tokenizer.json" in capsys.readouterr().err
