"""LoRA adapters (jaxeff/models/lora.py, jaxeff/train/lora.py): the merged weight and its gradients against NumPy,
the optimizer that leaves frozen parameters alone and keeps state for the trainable ones only, fine-tuning an export
from the CLI (the frozen parameters stay bitwise, resume is bitwise, the export is the merged forward), the
zeroth-order optimizer on adapters over int8 base weights, and the one-line errors."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from helpers import rewind, tiny_config
from jaxeff.artifacts.load import load_trained
from jaxeff.config import ConfigError, validate
from jaxeff.infer.export import export_checkpoint as export
from jaxeff.models.lora import adapt, is_adapted, merge, merged_matrix
from jaxeff.train.comm_report import compile_train_step
from jaxeff.train.loop import train
from jaxeff.train.lora import LoraModel, with_lora

D = 8  # d_model of the unit tests' kernels


def _tree(rng):
    return {"q": {"kernel": jnp.asarray(rng.normal(size=(D, 2, 3)), jnp.float32)},  # DenseGeneral D -> H, K
            "o": {"kernel": jnp.asarray(rng.normal(size=(2, 3, D)), jnp.float32)},  # H, K -> D
            "up": {"kernel": jnp.asarray(rng.normal(size=(D, 5)), jnp.float32)},
            "norm": {"scale": jnp.asarray(rng.normal(size=(D,)), jnp.float32)}}


def _random_b(params, rng):
    return jax.tree.map(lambda n: {**n, "lora_B": jnp.asarray(rng.normal(size=n["lora_B"].shape), jnp.float32)}
                        if is_adapted(n) else n, params, is_leaf=is_adapted)


def _as_matrix(w, in_axes):
    return np.asarray(w, np.float64).reshape(int(np.prod(w.shape[:in_axes])), -1)


IN_AXES = {"q": 1, "o": 2, "up": 1}


def test_merged_weight_is_base_plus_scaled_product_and_starts_at_base():
    rng = np.random.default_rng(0)
    plain = _tree(rng)
    params = adapt(plain, r"kernel$", 2, D, jax.random.key(1))
    assert not is_adapted(params["norm"]["scale"])
    start = merge(params, 4.0)
    for name in IN_AXES:  # B = 0: the model starts as the model it adapts
        np.testing.assert_array_equal(start[name]["kernel"], plain[name]["kernel"])
        m = _as_matrix(plain[name]["kernel"], IN_AXES[name]).shape[0]
        a = np.asarray(params[name]["kernel"]["lora_A"])
        assert a.shape[-1] == 2 and np.abs(a).max() <= 1 / np.sqrt(m) and a.std() > 0.3 / np.sqrt(m)
    params = _random_b(params, rng)
    merged = merge(params, 4.0)
    for name, k in IN_AXES.items():
        node = params[name]["kernel"]
        a, b = _as_matrix(node["lora_A"], k), np.asarray(node["lora_B"], np.float64).reshape(-1, 2)
        want = _as_matrix(node["base"], k) + 4.0 * a @ b.T
        np.testing.assert_allclose(_as_matrix(merged[name]["kernel"], k), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("freeze", ["all", "adapted"])
def test_gradients_reach_the_adapters_and_what_freeze_leaves_trainable(freeze):
    rng = np.random.default_rng(2)
    params = _random_b(adapt(_tree(rng), r"kernel$", 3, D, jax.random.key(3)), rng)
    targets = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), merge(params, 1.0))

    def loss(p):  # dL/dW = the target for every merged leaf
        return sum(jnp.sum(w * t) for w, t in zip(jax.tree.leaves(merge(p, 0.5, freeze)), jax.tree.leaves(targets)))

    grads = jax.grad(loss)(params)
    for name, k in IN_AXES.items():
        node, g = params[name]["kernel"], grads[name]["kernel"]
        G = _as_matrix(targets[name]["kernel"], k)
        a, b = _as_matrix(node["lora_A"], k), np.asarray(node["lora_B"], np.float64).reshape(-1, 3)
        np.testing.assert_allclose(_as_matrix(g["lora_A"], k), 0.5 * G @ b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(g["lora_B"]).reshape(-1, 3), 0.5 * G.T @ a, rtol=1e-5, atol=1e-5)
        assert not np.any(np.asarray(g["base"]))
    norm_grad = np.asarray(grads["norm"]["scale"])
    if freeze == "all":
        assert not np.any(norm_grad)
    else:
        np.testing.assert_array_equal(norm_grad, targets["norm"]["scale"])


@pytest.mark.parametrize("freeze", ["all", "adapted"])
def test_optimizer_changes_and_keeps_state_for_trainable_leaves_only(freeze):
    from jaxeff.config.sections import TrainConfig
    rng = np.random.default_rng(4)
    params = adapt(_tree(rng), r"kernel$", 2, D, jax.random.key(5))
    cfg = TrainConfig(lora={"rank": 2, "freeze": freeze})
    tx = with_lora(optax.adam(0.1), cfg)
    state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    adapters = sum(n[k].size for n in jax.tree.leaves(params, is_leaf=is_adapted) if is_adapted(n)
                   for k in ("lora_A", "lora_B"))
    trainable = adapters + (D if freeze == "adapted" else 0)
    moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert moments == 2 * trainable  # Adam's mu and nu of the trainable leaves, nothing for the frozen ones
    for name in IN_AXES:
        before, after = params[name]["kernel"], new[name]["kernel"]
        np.testing.assert_array_equal(after["base"], before["base"])
        assert not np.array_equal(after["lora_A"], before["lora_A"])
        assert not np.array_equal(after["lora_B"], before["lora_B"])
    assert np.array_equal(new["norm"]["scale"], params["norm"]["scale"]) == (freeze == "all")


# ----------------------------------------------------------------------------- training from the CLI


# Fine-tuning moves the model from Python source (the base run's stdlib files) to this repository's prose.
DOCS = [str(p) for p in sorted((Path(__file__).resolve().parents[1] / "docs").rglob("*.md"))]
LORA = {"train.lora.rank": 4, "train.lora.alpha": 8.0, "train.steps": 10, "train.warmup_steps": 1,
        "checkpoint.every": 5, "train.eval_every": 10, "train.learning_rate": 1e-2, "data.source": "text",
        "data.paths": DOCS}


@pytest.fixture(scope="module")
def base_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    train(tiny_config(**{"train.steps": 40, "train.eval_every": 40, "checkpoint.every": 40,
                         "train.learning_rate": 1e-2}), root / "base", console=False)
    export(root / "base", root / "base-export")
    return root / "base-export"


def _checkpoint(step_dir):
    return {item: ocp.PyTreeCheckpointer().restore(str(step_dir / item)) for item in ("params", "train_state")}


def _flat(tree, is_leaf=None):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


def test_fine_tuning_an_export_keeps_frozen_weights_resumes_bitwise_and_exports_merged(base_export, tmp_path):
    overrides = {**LORA, "train.init_from": str(base_export)}
    result = train(tiny_config(**overrides), tmp_path / "run", console=False)
    # The same batches through the untouched base model (a run whose updates are ~0): the first step's loss is the
    # base model's (B = 0), and the adapters lower the loss of the steps after and the held-out loss.
    control = train(tiny_config(**{**overrides, "train.learning_rate": 1e-12}), tmp_path / "control", console=False)
    assert abs(result.losses[1] - control.losses[1]) < 1e-6
    late = range(6, 11)
    assert sum(result.losses[k] for k in late) < sum(control.losses[k] for k in late) - 0.3, (
        result.losses, control.losses)
    assert result.eval_losses[10] < control.eval_losses[10] - 0.05
    saved = _checkpoint(tmp_path / "run" / "checkpoints" / "10")
    base = _flat(load_trained(base_export).params)
    tuned = _flat(saved["params"])
    adapters = [n for n in tuned if n.endswith(("/lora_A", "/lora_B"))]
    assert len(adapters) == 2 * 14  # q, k, v, o, gate, up, down of both layers
    for name, value in tuned.items():  # frozen: the base weights, embeddings, norms, head
        if name not in adapters:
            np.testing.assert_array_equal(value, base[name.removesuffix("/base")], err_msg=name)
    assert all(np.any(tuned[n]) for n in adapters if n.endswith("lora_B"))  # B left zero: the adapters trained

    resumed = rewind(tmp_path / "run", tmp_path / "resumed", 5)
    again = train(tiny_config(**overrides), resumed, console=False)
    assert again.losses[6] == result.losses[6] and again.losses[10] == result.losses[10]
    again_saved = _checkpoint(resumed / "checkpoints" / "10")
    for (path, x), y in zip(jax.tree.leaves_with_path(saved), jax.tree.leaves(again_saved)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)

    export(tmp_path / "run", tmp_path / "export")
    exported = load_trained(tmp_path / "export")
    plain = _flat(exported.params)
    assert set(plain) == set(base)  # the model's own tree: adapters merged away
    cfg = tiny_config(**overrides)
    node = saved["params"]["layer_1"]["mixer"]["q"]["kernel"]
    want = merged_matrix({k: jnp.asarray(v) for k, v in node.items()}, 8.0 / 4)
    np.testing.assert_allclose(plain["layer_1/mixer/q/kernel"], want, rtol=1e-6, atol=1e-6)
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 259)
    adapted = jax.tree.map(jnp.asarray, saved["params"])
    want_logits = LoraModel(exported.model, cfg.train.lora, cfg.model.d_model).apply({"params": adapted}, tokens)[0]
    got_logits = exported.model.apply({"params": exported.params}, tokens)[0]
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)


def test_zeroth_order_trains_adapters_over_int8_base_weights(base_export, tmp_path):
    overrides = {**LORA, "train.init_from": str(base_export), "train.optimizer": "zo", "train.zo.trainable": "lora",
                 "train.zo.frozen_int8": True, "train.zo.probes": 2, "train.steps": 3, "train.eval_every": 3}
    train(tiny_config(**overrides), tmp_path / "zo", console=False)
    saved = _flat(_checkpoint(tmp_path / "zo" / "checkpoints" / "3")["params"])
    assert saved["layer_0/mixer/q/kernel/base/int8"].dtype == np.int8
    assert saved["embed/embedding/int8"].dtype == np.int8
    assert saved["layer_0/mixer/q/kernel/lora_A"].dtype == np.float32 and np.any(saved["layer_0/mixer/q/kernel/lora_B"])
    loaded = _flat(load_trained(tmp_path / "zo").params)  # the merged float model
    base = _flat(load_trained(base_export).params)
    assert set(loaded) == set(base)
    assert not np.array_equal(loaded["layer_0/mixer/q/kernel"], base["layer_0/mixer/q/kernel"])


def test_compiled_step_keeps_optimizer_state_for_the_adapters_only():
    from jaxeff.parallel.report import tree_bytes_per_device
    full = compile_train_step(tiny_config(), jax.devices()[:1], with_data=False)
    lora = compile_train_step(tiny_config(**{"train.lora.rank": 2}), jax.devices()[:1], with_data=False)
    full_opt = tree_bytes_per_device(full.abstract["opt_state"], full.shardings["opt_state"])
    lora_opt = tree_bytes_per_device(lora.abstract["opt_state"], lora.shardings["opt_state"])
    adapters = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(lora.abstract["params"])
                   if jax.tree_util.keystr(p).endswith(("'lora_A']", "'lora_B']")))
    assert lora_opt < 2 * 4 * adapters + 64 < full_opt  # two float32 moments per adapter entry (+ counters)


@pytest.mark.parametrize("override,message", [
    ({"train.sst.rank": 4}, "use one of them"),
    ({"train.qat.kind": "ternary"}, "does not combine with train.qat.kind='ternary'"),
    ({"train.optimizer": "zo"}, "set train.zo.trainable=lora and train.lora.freeze=all"),
    ({"train.optimizer": "zo", "train.zo.trainable": "lora", "train.lora.freeze": "adapted"},
     "set train.zo.trainable=lora and train.lora.freeze=all"),
])
def test_unsupported_combinations_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(**{"train.lora.rank": 2, **override}), 1)


def test_a_pattern_that_adapts_nothing_is_refused():
    with pytest.raises(ConfigError, match="train.lora.layers='nothing' matches no parameter matrix"):
        compile_train_step(tiny_config(**{"train.lora.rank": 2, "train.lora.layers": "nothing"}), jax.devices()[:1],
                           with_data=False)


def test_blocks_merge_their_own_adapters_so_no_merged_copy_outlives_its_layer(monkeypatch):
    """With remat, merging every adapter before the model runs keeps a merged copy of all weights alive from the
    forward to the backward pass; merging inside each block (DecoderLM.block_params) does not. A model whose
    parameters outweigh its activations (d 128, 1 x 8 tokens), compiled for an H100 (`jaxeff plan`; XLA's CPU
    scheduler keeps the copies either way): the temporaries differ by about the parameters' size."""
    import jaxeff.train.lora as lora_module
    from jaxeff.train.plan import make_plan
    cfg = tiny_config(**{"model.d_model": 128, "model.mlp_dim": 512, "model.remat": "full", "data.seq_len": 8,
                         "train.global_batch_size": 1, "train.lora.rank": 2})
    inside = make_plan(cfg, "h100x1")
    monkeypatch.setattr(lora_module, "DecoderLM", type("NotADecoder", (), {}))  # forces the merge before the model
    outside = make_plan(cfg, "h100x1")
    assert inside.temp_bytes < outside.temp_bytes - inside.param_bytes // 2, (inside.temp_bytes, outside.temp_bytes)
