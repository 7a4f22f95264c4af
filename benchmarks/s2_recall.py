"""Associative recall with small models: dense vs all-S2 vs hybrid vs same-offset-for-all-heads vs LongGen.

    python benchmarks/s2_recall.py [--steps 2000] [--write docs/benchmarks.md]

Each sequence (64 tokens) is random filler with 4 key-value pairs planted at random depths, then the 4 keys
again in a random order, each followed by its value: the model must find the key earlier in the context and
copy the value after it (multi-query associative recall). Only the 4 answer positions are trained and scored.
Blocks of 4 tokens, a 2-block window, vertical stride 4: a pair usually lies outside a sparse head's window, so
it is found only through the vertical blocks of some head, or through a dense layer. Same model (4 layers,
d 64, 4 heads), data, optimiser and steps for every schedule; accuracy on 1024 fresh sequences; one CPU device.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import jaxeff  # noqa: E402,F401
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from common import plot_eval_curves, write_section  # noqa: E402
from jaxeff.config import load_config  # noqa: E402
from jaxeff.models.lm import build_model  # noqa: E402

SEQ, PAIRS, BATCH = 64, 4, 64
FILLER, KEYS, VALUES = (0, 64), (64, 128), (128, 192)
SCHEDULES = {
    "dense": ["[attention]"],
    "all S2 (heterogeneous)": ["[s2]"],
    "hybrid S2 / dense": ["[s2, attention]"],
    "all S2, same offset for all heads": ["[s2]", "model.s2.head_sliding_step=0"],
    "LongGen (sink+window, dense middle)": ["[sink_window, attention, attention, sink_window]"],
}


def make_batch(rng: np.random.Generator, batch: int):
    """(tokens [B, SEQ], answer mask [B, SEQ]): the mask marks positions whose next token is an answer."""
    tokens = rng.integers(*FILLER, size=(batch, SEQ))
    mask = np.zeros((batch, SEQ), bool)
    query_start = SEQ - 2 * PAIRS
    for b in range(batch):
        keys = rng.choice(np.arange(*KEYS), PAIRS, replace=False)
        values = rng.integers(*VALUES, size=PAIRS)
        slots = rng.choice((query_start - 2) // 2, PAIRS, replace=False) * 2
        tokens[b, slots], tokens[b, slots + 1] = keys, values
        order = rng.permutation(PAIRS)
        tokens[b, query_start::2], tokens[b, query_start + 1::2] = keys[order], values[order]
        mask[b, query_start:-1:2] = True  # predicting the token after each queried key
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


def train_schedule(overrides: list[str], steps: int, seed: int = 0):
    pattern, *rest = overrides
    cfg = load_config(None, [f"model.mixer_pattern={pattern}", "model.d_model=64", "model.n_layers=4",
                             "model.n_heads=4", "model.n_kv_heads=4", "model.mlp_dim=128", "model.s2.block_size=4",
                             "model.s2.local_blocks=2", "model.s2.vert_stride=4", "model.s2.sink_blocks=1",
                             "model.s2.impl=xla", "model.vocab_multiple=64", *rest]).model
    model = build_model(cfg, 192, platform="cpu")
    rng = np.random.default_rng(seed)
    params = model.init(jax.random.key(seed), make_batch(rng, 1)[0])["params"]
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(50, steps // 10), steps, 3e-4), weight_decay=0.01)
    opt = tx.init(params)

    def loss_fn(params, tokens, mask):
        logits = model.apply({"params": params}, tokens)[0][:, :-1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        m = mask[:, :-1]
        correct = (jnp.argmax(logits, -1) == tokens[:, 1:]) & m
        return jnp.sum(ce * m) / jnp.sum(m), jnp.sum(correct) / jnp.sum(m)

    @jax.jit
    def step(params, opt, tokens, mask):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, mask)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, acc

    evaluate = jax.jit(loss_fn)
    eval_rng = np.random.default_rng(10_000 + seed)
    eval_batches = [make_batch(eval_rng, 128) for _ in range(8)]
    curve = {}
    for i in range(1, steps + 1):
        params, opt, loss, acc = step(params, opt, *make_batch(rng, BATCH))
        if i % 100 == 0 or i == steps:
            curve[i] = float(np.mean([evaluate(params, *b)[0] for b in eval_batches]))
    final = [evaluate(params, *b) for b in eval_batches]
    return float(np.mean([f[0] for f in final])), float(np.mean([f[1] for f in final])), curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--write", default=None, metavar="MARKDOWN")
    args = parser.parse_args()
    rows = ["| schedule | answer loss | recall accuracy | seconds |", "|---|---|---|---|"]
    curves = {}
    for name, overrides in SCHEDULES.items():
        t0 = time.perf_counter()
        loss, acc, curves[name] = train_schedule(overrides, args.steps)
        rows.append(f"| {name} | {loss:.3f} | {acc:.1%} | {time.perf_counter() - t0:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    repo = Path(__file__).resolve().parents[1]
    plot_eval_curves(curves, f"associative recall, {SEQ} tokens, {PAIRS} pairs", repo / "docs/img/s2_recall.png", dpi=110)
    if args.write:
        write_section(repo / args.write, "s2-recall", "Quality: associative recall, dense vs S2 schedules (CPU)",
                      f"`python benchmarks/s2_recall.py --write docs/benchmarks.md`: {args.steps} steps, batch {BATCH}; "
                      "4 layers, d 64, 4 heads; blocks of 4, window 2 blocks, stride 4; loss and accuracy on the "
                      f"{PAIRS} answers of 1024 fresh sequences (chance: 1/64).\n\n"
                      f"{table}\n\n![recall](img/s2_recall.png)")


if __name__ == "__main__":
    main()
