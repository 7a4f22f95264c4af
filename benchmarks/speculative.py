"""Speculative decoding on CPU: acceptance rate and tokens/s against plain decoding, for the debug LM as the target
and a smaller attention LM as the draft, k in {2, 4}, with and without FR-Spec (draft vocabulary 25%).

    python benchmarks/speculative.py [--steps 300] [--new-tokens 128] [--runs DIR] [--write docs/benchmarks.md]

Both models are trained `--steps` steps on the same corpus (configs/debug.yaml; the draft: d_model 64, 2 layers,
mlp 192). Every configuration decodes the same prompts with the same seeds once to compile, then again timed (compilation
excluded);
plain decoding is the loop of jaxeff/models/decoding.py with one jitted call per token. The cost ratio is the time
of one single-token call of the draft over the target's, and of the target's (k+1)-token verify call over its
single-token call. `--runs DIR` keeps the trained runs in DIR and reuses them when run again.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxeff.config import load_config  # noqa: E402
from jaxeff.infer import export_checkpoint  # noqa: E402
from jaxeff.infer.fr_spec import frequent_subset, write_token_counts  # noqa: E402
from jaxeff.infer.generate import load_inference_model  # noqa: E402
from jaxeff.infer.speculative import SpeculativeStats, speculative_generate_ids  # noqa: E402
from jaxeff.models.decoding import decode_caches, make_forward, sample_next  # noqa: E402
from jaxeff.train import train  # noqa: E402

COMMON = ["sample.max_new_tokens=0", "logging.progress_bar=false", "checkpoint.keep=1", "train.eval_every=1000"]
DRAFT = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.mlp_dim=192"]
PROMPTS = ["def ", "import os\n", "class Reader:\n    def __init__(self"]
VOCAB, EOS = 259, 258


def _prompt_ids(text: str) -> list[int]:
    return [257, *text.encode()]


def plain_decode(model, params, forward, prompt_ids, new: int, temperature: float, seed: int) -> list[int]:
    """generate_ids's loop with a forward compiled once (no stop at EOS: every run makes `new` tokens)."""
    caches = decode_caches(model, params, 1, len(prompt_ids) + new)
    logits, caches = forward(params, jnp.asarray([prompt_ids], jnp.int32), jnp.arange(len(prompt_ids))[None], caches)
    key, out = jax.random.key(seed), []
    for i in range(new):
        key, sub = jax.random.split(key)
        token = int(sample_next(logits, sub, temperature, 40, VOCAB)[0])
        out.append(token)
        logits, caches = forward(params, jnp.asarray([[token]], jnp.int32),
                                 jnp.asarray([[len(prompt_ids) + i]]), caches)
    return out


def time_call(fn, args, reps: int = 50) -> float:
    """Median seconds of one call (the median: the 2 CPU cores are shared)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=Path, default=None, help="keep (and reuse) the trained runs here")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    tmp = args.runs or Path(tempfile.mkdtemp(prefix="bench-spec-"))
    t0 = time.time()
    runs = {}
    for name, extra in (("target", []), ("draft", DRAFT)):
        runs[name] = tmp / f"{name}-export"
        if (runs[name] / "config.json").exists():
            continue
        overrides = [*COMMON, f"train.steps={args.steps}", f"checkpoint.every={args.steps}", *extra]
        train(load_config(REPO / "configs/debug.yaml", overrides), tmp / name, console=False)
        export_checkpoint(tmp / name, runs[name])
    if not (runs["draft"] / "token_counts.npy").exists():
        write_token_counts(tmp / "draft", runs["draft"])
    target, draft = load_inference_model(runs["target"]), load_inference_model(runs["draft"])
    subset = frequent_subset(np.load(str(runs["draft"] / "token_counts.npy")), 0.25, EOS)
    n_params = {n: sum(x.size for x in jax.tree.leaves(m.params)) for n, m in (("target", target), ("draft", draft))}
    print(f"trained (or reused) in {time.time() - t0:.0f} s; target {n_params['target']:,} params, draft {n_params['draft']:,}",
          flush=True)

    # Cost of one call, compiled.
    fwd_t, fwd_d = make_forward(target.model), make_forward(draft.model)
    costs = {}
    for name, m, fwd in (("target", target, fwd_t), ("draft", draft, fwd_d)):
        caches = decode_caches(m.model, m.params, 1, 256)
        _, caches = fwd(m.params, jnp.asarray([_prompt_ids("def f(x):\n")]), jnp.arange(11)[None], caches)
        for s in (1, 3, 5):
            costs[name, s] = time_call(fwd, (m.params, jnp.zeros((1, s), jnp.int32),
                                             jnp.arange(11, 11 + s)[None], caches))
    print("one call (ms): " + ", ".join(f"{n} {s} token(s) {t * 1e3:.2f}" for (n, s), t in costs.items()), flush=True)

    rows = []
    for temperature in (0.0, 0.7):
        # Plain decoding.
        for p in PROMPTS:
            plain_decode(target.model, target.params, fwd_t, _prompt_ids(p), args.new_tokens, temperature, 0)
        t = time.perf_counter()
        for i, p in enumerate(PROMPTS):
            plain_decode(target.model, target.params, fwd_t, _prompt_ids(p), args.new_tokens, temperature, i)
        plain_tps = len(PROMPTS) * args.new_tokens / (time.perf_counter() - t)
        rows.append((temperature, "plain", "-", "-", None, plain_tps))
        print(f"T={temperature} plain {plain_tps:.1f} tok/s", flush=True)
        for k in (2, 4):
            for fr in (None, subset):
                def run(seed_base):
                    total = SpeculativeStats()
                    for i, p in enumerate(PROMPTS):
                        _, st = speculative_generate_ids(
                            target.model, target.params, draft.model, draft.params, _prompt_ids(p), args.new_tokens,
                            draft_tokens=k, temperature=temperature, top_k=40, seed=seed_base + i, vocab_size=VOCAB,
                            stop_id=None, draft_subset=fr)
                        total.drafted += st.drafted
                        total.accepted += st.accepted
                        total.generated += st.generated
                        total.seconds += st.seconds
                        total.rounds += st.rounds
                    return total
                run(0)  # compiles every call shape the timed run needs: the same seeds take the same path
                st = run(0)
                label = "25%" if fr is not None else "full"
                rows.append((temperature, f"k={k}", label, f"{st.acceptance_rate:.1%}",
                             st.generated / st.rounds, st.tokens_per_s))
                print(f"T={temperature} k={k} draft vocab {label}: acceptance {st.acceptance_rate:.1%}, "
                      f"{st.generated / st.rounds:.2f} tokens/round, {st.tokens_per_s:.1f} tok/s "
                      f"({st.tokens_per_s / plain_tps:.2f}x plain)", flush=True)

    lines = ["| temperature | decoding | draft vocabulary | acceptance | tokens per target call | tokens/s | vs plain |",
             "|---|---|---|---|---|---|---|"]
    plain = {}
    for temperature, dec, voc, acc, per_call, tps in rows:
        if dec == "plain":
            plain[temperature] = tps
        lines.append(f"| {temperature:g} | {dec} | {voc} | {acc} | {'1' if per_call is None else f'{per_call:.2f}'} "
                     f"| {tps:.1f} | {tps / plain[temperature]:.2f}x |")
    table = "\n".join(lines)
    ratio = costs["draft", 1] / costs["target", 1]
    cost_line = (f"One compiled call: target {costs['target', 1] * 1e3:.2f} ms for 1 token, "
                 f"{costs['target', 3] * 1e3:.2f} ms for 3, {costs['target', 5] * 1e3:.2f} ms for 5; draft "
                 f"{costs['draft', 1] * 1e3:.2f} ms for 1 token (draft/target = {ratio:.2f}).")
    print(table)
    print(cost_line)
    if args.write:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from common import write_section

        body = (f"`python benchmarks/speculative.py --steps {args.steps} --new-tokens {args.new_tokens}` "
                f"(x86_64, 2 shared CPU cores, jax {jax.__version__}): target configs/debug.yaml "
                f"({n_params['target']:,} parameters), draft d_model 64 x 2 layers ({n_params['draft']:,}), both "
                f"trained {args.steps} steps on the stdlib; {len(PROMPTS)} prompts x {args.new_tokens} new tokens, "
                f"compilation excluded; sampled rows with top-k 40.\n\n{table}\n\n{cost_line}\n")
        write_section(args.write, "speculative", "Speculative decoding (jaxeff generate --draft)", body)


if __name__ == "__main__":
    main()
