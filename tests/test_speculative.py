"""Speculative decoding (jaxeff/infer/speculative.py): greedy output equals plain greedy decoding, the acceptance rule
reproduces the target's distribution, FR-Spec's subset, and the CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.infer.export import export_checkpoint
from jaxeff.infer.fr_spec import COUNTS_FILE, frequent_subset, write_token_counts
from jaxeff.infer.generate import load_inference_model
from jaxeff.infer.speculative import accept_sampled, speculative_generate_ids, token_probs
from jaxeff.models.decoding import generate_ids
from jaxeff.models.lm import build_model
from jaxeff.train.loop import train

from helpers import assert_user_error, run_jaxeff, tiny_config

PROMPT = [257, *b"def main():\n    "]


RECURRENT = {"model.mixer_pattern": "[lightning,mlstm]", "model.lightning.block_size": 16,
             "model.mlstm.chunk_size": 16}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny attention target and a smaller draft, each trained 3 steps and exported."""
    root = tmp_path_factory.mktemp("spec")
    specs = {
        "attention": {"model.tie_embeddings": "false"},
        "draft": {"model.n_layers": 1, "model.d_model": 16, "model.n_heads": 2, "model.n_kv_heads": 1,
                  "model.mlp_dim": 32},
    }
    out = {}
    for name, extra in specs.items():
        extra = {"train.steps": 3, "train.warmup_steps": 0, "train.eval_every": 1000, "checkpoint.every": 3, **extra}
        train(tiny_config(**extra), root / name, console=False)
        out[name] = export_checkpoint(root / name, root / f"{name}-export")[0]
        out[name + "-workdir"] = root / name
    return out


def _noisy(params, scale, seed):
    """params + scale * (each leaf's std) * N(0, 1)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jnp.std(x) * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


def _fresh(model, seed):
    return model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]


def _target_model(runs, name):
    if name == "attention":
        return load_inference_model(runs["attention"]).model
    return build_model(tiny_config(**{"model.tie_embeddings": "false", **RECURRENT}).model, 259)


def _speculative(target, t_params, draft, d_params, k, new=40, subset=None):
    return speculative_generate_ids(target, t_params, draft, d_params, PROMPT, new, draft_tokens=k, vocab_size=259,
                                    stop_id=258, draft_subset=subset)


@pytest.mark.parametrize("target_name", ["attention", "recurrent"])
def test_greedy_equals_plain_greedy(runs, target_name):
    target = _target_model(runs, target_name)
    draft = load_inference_model(runs["draft"]).model
    # A few training steps teach a tiny model only that spaces are frequent (its greedy text is all spaces, and so
    # is the draft's), and a fresh one with tied embeddings repeats its input: fresh random weights with an untied
    # output layer give a target whose greedy text varies.
    t_params = _fresh(target, 0)
    plain = generate_ids(target, t_params, PROMPT, 40, vocab_size=259, stop_id=258)
    assert len(plain) == 40 and len(set(plain)) > 3
    spec, stats = _speculative(target, t_params, draft, _fresh(draft, 1), k=3)
    assert spec == plain
    assert stats.accepted < stats.drafted / 2, stats.accepted_per_round  # a different draft: mostly rejected
    # The target with noise on its weights as the draft: rejections after 0 and after 1 or 2 accepted tokens.
    spec, stats = _speculative(target, t_params, target, _noisy(t_params, 0.3, 2), k=3)
    assert spec == plain
    assert 0 in stats.accepted_per_round and {1, 2} & set(stats.accepted_per_round), stats.accepted_per_round
    spec, stats = _speculative(target, t_params, target, t_params, k=3)  # draft = target: every draft kept
    assert spec == plain
    assert stats.accepted == stats.drafted and stats.rounds == 10  # 40 tokens = 10 rounds of 3 + 1


def _emitted_first_token(p_V, q_V, n_samples, rule=accept_sampled):
    """Empirical distribution of the first emitted token with k=1: draft x ~ q, then the acceptance rule."""
    keys = jax.random.split(jax.random.key(0), n_samples)

    def one(key):
        kd, ka = jax.random.split(key)
        x = jax.random.categorical(kd, jnp.log(q_V))
        n, nxt = rule(ka, x[None], q_V[None], jnp.stack([p_V, p_V]))
        return jnp.where(n == 1, x, nxt)

    tokens = jax.vmap(one)(keys)
    return np.bincount(np.asarray(tokens), minlength=len(p_V)) / n_samples


def test_rejection_sampling_gives_target_distribution():
    rng = np.random.default_rng(0)
    p_V = jnp.asarray(rng.dirichlet(np.ones(6) * 0.7), jnp.float32)
    q_V = jnp.asarray(rng.dirichlet(np.ones(6) * 0.7), jnp.float32)
    n = 200_000  # TV of an exact sampler ~ sqrt(V / n) / 2 ~ 0.003
    tv = 0.5 * np.abs(_emitted_first_token(p_V, q_V, n) - np.asarray(p_V)).sum()
    assert tv < 0.01, tv
    # A draft restricted to a subset (FR-Spec: q = 0 outside it) still yields p, tokens outside included.
    q_sub = jnp.asarray(np.where(np.arange(6) < 3, np.asarray(q_V), 0) / np.asarray(q_V)[:3].sum(), jnp.float32)
    assert 0.5 * np.abs(_emitted_first_token(p_V, q_sub, n) - np.asarray(p_V)).sum() < 0.01

    def always_accept(key, drafts, q, p):
        return jnp.asarray(1), drafts[0]

    def resample_from_p(key, drafts, q, p):  # the wrong residual: p instead of max(0, p - q)
        n_, _ = accept_sampled(key, drafts, q, p)
        return n_, jax.random.categorical(jax.random.fold_in(key, 1), jnp.log(p[0]))

    for wrong in (always_accept, resample_from_p):
        assert 0.5 * np.abs(_emitted_first_token(p_V, q_V, n, wrong) - np.asarray(p_V)).sum() > 0.03


def test_token_probs_match_plain_sampling_filter():
    logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0, 3.0]])
    p = np.asarray(token_probs(logits, 0.5, 2))[0]
    assert (p[[1, 2, 3]] == 0).all() and np.isclose(p.sum(), 1)


def test_fr_spec_subset_and_greedy(runs):
    counts = np.array([5, 9, 1, 9, 0, 3])
    assert frequent_subset(counts, 0.5, eos_id=4).tolist() == [1, 3, 4]  # EOS takes the third place from id 0
    path = write_token_counts(runs["draft-workdir"], runs["draft"])
    assert path.name == COUNTS_FILE
    counts = np.load(str(path))
    subset = frequent_subset(counts, 0.25, eos_id=258)
    assert 258 in subset and len(subset) == 65
    assert {int(i) for i in np.argsort(-counts, kind="stable")[:20]} <= set(subset.tolist())
    assert counts[ord(" ")] > 0 and ord(" ") in subset
    target, draft = _target_model(runs, "recurrent"), load_inference_model(runs["draft"])
    t_params = _fresh(target, 0)
    spec, stats = _speculative(target, t_params, draft.model, draft.params, k=3, subset=subset)
    assert spec == generate_ids(target, t_params, PROMPT, 40, vocab_size=259, stop_id=258)


def test_cli_speculative_and_errors(runs, tmp_path):
    proc = run_jaxeff("generate", "--workdir", str(runs["attention"]), "--draft", str(runs["draft"]), "--prompt",
                      "def", "--max-new-tokens", "12", "--temperature", "0", "--draft-tokens", "3",
                      "--draft-vocab", "0.5")
    assert proc.returncode == 0, proc.stderr
    target = load_inference_model(runs["attention"])
    plain = generate_ids(target.model, target.params, [257, *b"def"], 12, vocab_size=259, stop_id=258)
    assert proc.stdout == "def" + target.tokenizer.decode(plain) + "\n"
    assert "acceptance" in proc.stderr and "tokens/s" in proc.stderr
    sampled = run_jaxeff("generate", "--workdir", str(runs["attention"]), "--draft", str(runs["draft"]), "--prompt",
                         "def", "--max-new-tokens", "8", "--seed", "3")
    assert sampled.returncode == 0, sampled.stderr
    assert_user_error(run_jaxeff("generate", "--workdir", str(runs["attention"]), "--prompt", "x", "--draft-vocab",
                                 "0.25"), "need --draft")


def test_other_tokenizer_is_refused(runs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from jaxeff.config import ConfigError
    from jaxeff.data.tokenizer import load_tokenizer
    from jaxeff.infer.generate import check_same_tokenizer

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["def f(x): return x\n" * 20], trainers.BpeTrainer(vocab_size=280,
                                                                                special_tokens=["<unk>", "<s>", "</s>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    target = load_inference_model(runs["attention"])
    other = dataclasses.replace(target, tokenizer=load_tokenizer(str(tmp_path / "tokenizer.json")))
    check_same_tokenizer(target, target)
    with pytest.raises(ConfigError, match=r"uses tokenizer .*tokenizer.json.* \(vocabulary \d+\) but .*'byte' "
                                          r"\(vocabulary 259\)"):
        check_same_tokenizer(target, other)
